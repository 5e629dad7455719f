"""One command, one Markdown report: jaxgen's speed against its peers on this machine, in one run.

Runs, one after the other on the same machine:

1. the 2-D recipe (8 Gaussians -> moons, MLP 64x3, batch 256): training steps/s and Euler-100 samples/s of TorchCFM,
   flow_matching, jaxgen's trainer (one step per call, fused steps, fused with EMA) and a hand-written fused JAX loop
   (``bench_toy2d.py``), ``--rounds`` times; the EMA / hand-written ratio is the median of the rounds;
2. the digits U-Net (0.70M parameters, batch 128; Euler-20 sampling of 256 images, conditional and classifier-free
   guided) against TorchCFM's ``UNetModelWrapper`` (``bench_digits_unet.py``), ``--rounds`` times;
3. sampler overhead: time per NFE / one bare network call, 8 samplers, MLP and U-Net (``bench_sampler_overhead.py``);
4. compile times: the fused training steps and the samplers, and ``jaxgen train digits_smoke`` with a cold and a
   warm persistent compilation cache;
5. a 1-to-8 fake-device run (a subprocess with 8 CPU devices): the digits U-Net trained on 1 device and on a data
   mesh of 8, for correctness (the losses) and the overhead of the sharded program (not speed: the 8 devices share
   the same cores).

Usage::

    python benchmarks/report.py [--out benchmark-report.md] [--rounds 3] [--no-peers] [--peers-python PATH] [--quick]

On a GPU or TPU machine the same command measures jaxgen there (the PyTorch peers then run on that machine's CPU
unless their environment has a CUDA build of torch; pass ``--no-peers`` to skip them). About 12 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)

import bench_digits_unet  # noqa: E402
import bench_sampler_overhead  # noqa: E402
import bench_toy2d  # noqa: E402


def _cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo, else what the platform module knows)."""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def _memory_gib() -> str:
    try:
        with open("/proc/meminfo") as f:
            kb = int(f.readline().split()[1])
        return f"{kb / 2**20:.0f} GiB"
    except (OSError, ValueError, IndexError):
        return "unknown"


def machine(peers_python: str | None) -> list[str]:
    import flax
    import jax
    import jaxlib
    import optax

    dev = jax.devices()
    kinds = sorted({d.device_kind for d in dev})
    torch_version = "not run"
    if peers_python:
        out = subprocess.run([peers_python, "-c", "import torch; print(torch.__version__)"], capture_output=True,
                             text=True)
        torch_version = out.stdout.strip() or "unknown"
    return [
        f"- Date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
        f"- CPU: {_cpu_model()}, {os.cpu_count()} cores visible, {_memory_gib()} memory; {platform.platform()}",
        f"- JAX backend: {jax.default_backend()}, {len(dev)} device(s) ({', '.join(kinds)})",
        f"- Python {platform.python_version()}, jax {jax.__version__}, jaxlib {jaxlib.__version__}, "
        f"flax {flax.__version__}, optax {optax.__version__}; peers: torch {torch_version}",
        f"- Load average at start: {', '.join(f'{x:.2f}' for x in os.getloadavg())}",
    ]


def _table(header: list[str], rows: list[list]) -> list[str]:
    def cell(v):
        if isinstance(v, float):
            return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}"
        return str(v)

    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return out


def _med(xs):
    xs = [x for x in xs if x == x]
    return statistics.median(xs) if xs else float("nan")


def section_toy2d(peers_python, rounds, steps, peer_steps, threads):
    runs = []
    for r in range(rounds):
        print(f"[report] 2-D recipe, round {r + 1}/{rounds}", flush=True)
        peers = bench_toy2d.run_peers(peers_python, peer_steps, threads) if peers_python else {}
        runs.append((peers, bench_toy2d.run_jax(steps)))
    rows = []
    for name in ("torchcfm", "flow_matching"):
        if any(name in p for p, _ in runs):
            per = [p[name] for p, _ in runs if name in p]
            rows.append([name, _med([x["steps_per_s"] for x in per]), _med([2048e3 / x["sample_ms"] for x in per])])
    jx = [j for _, j in runs]
    sampled = _med([2048e3 / j["jaxgen sample ms"] for j in jx])
    rows += [["jaxgen Trainer, one jitted step per call", _med([j["jaxgen jit step"] for j in jx]), sampled],
             [f"jaxgen Trainer, {steps} steps fused", _med([j["jaxgen fused"] for j in jx]), sampled],
             [f"jaxgen Trainer + EMA, {steps} steps fused", _med([j["jaxgen+ema fused"] for j in jx]), sampled],
             [f"hand-written JAX loop, {steps} steps fused", _med([j["hand-written fused"] for j in jx]),
              _med([2048e3 / j["hand-written scan ms"] for j in jx])]]
    ema_ratio = [j["jaxgen+ema fused"] / j["hand-written fused"] for j in jx]
    lines = [f"## 2-D recipe: 8 Gaussians -> moons, MLP 64x3 SELU, batch 256, Adam 1e-3 (median of {rounds} rounds)",
             "", *_table(["", "training steps/s", "Euler-100 samples/s (2,048 points)"], rows), "",
             "- Trainer with EMA / hand-written fused loop, per round: "
             + ", ".join(f"{x:.1%}" for x in ema_ratio) + f"; median **{_med(ema_ratio):.1%}** (target >= 95%)"]
    tc = [j["jaxgen fused"] / p["torchcfm"]["steps_per_s"] for p, j in runs if "torchcfm" in p]
    if tc:
        lines.append(f"- jaxgen fused / TorchCFM: median **{_med(tc):.2f}x**")
    return lines


def section_unet(peers_python, rounds, steps, threads):
    runs = []
    for r in range(rounds):
        print(f"[report] digits U-Net, round {r + 1}/{rounds}", flush=True)
        peer = bench_digits_unet.run_peer(peers_python, steps, threads) if peers_python else None
        runs.append((peer, bench_digits_unet.run_jax(steps)))
    rows, ratios = [], {"images_per_s": [], "cond_sampling": [], "guided_sampling": []}
    for i, (peer, jx) in enumerate(runs, 1):
        if peer:
            rows.append([f"TorchCFM, round {i}", peer["steps_per_s"], peer["images_per_s"], peer["cond_sampling"],
                         peer["guided_sampling"]])
            for k in ratios:
                ratios[k].append(jx[k] / peer[k])
        rows.append([f"jaxgen, round {i}", jx["steps_per_s"], jx["images_per_s"], jx["cond_sampling"],
                     jx["guided_sampling"]])
    lines = [f"## Digits U-Net (0.70M parameters): batch 128; Euler-20 sampling of 256 images ({rounds} rounds)", "",
             *_table(["", "train steps/s", "train images/s", "conditional sampling img/s", "guided sampling img/s"],
                     rows), ""]
    if ratios["images_per_s"]:
        lines.append("- jaxgen / TorchCFM, median of the rounds (target >= 1x each): training images/s **"
                     f"{_med(ratios['images_per_s']):.2f}x**, conditional sampling **{_med(ratios['cond_sampling']):.2f}x**, "
                     f"guided sampling **{_med(ratios['guided_sampling']):.2f}x**")
    return lines


def section_overhead(steps, repeats):
    import jax
    from flax import nnx

    from jaxgen.models import MLPField, UNetField
    from jaxgen.paths import GaussianPath

    path = GaussianPath.from_name("linear")
    samplers = bench_sampler_overhead.DEFAULT_SAMPLERS
    mlp = MLPField(2, width=64, hidden_layers=3, rngs=nnx.Rngs(0))
    unet = UNetField(1, channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,), dropout=0.0,
                     image_size=8, rngs=nnx.Rngs(0))
    unet.eval()
    print("[report] sampler overhead", flush=True)
    bare_m, rows_m = bench_sampler_overhead.measure("MLP", mlp, jax.random.normal(jax.random.key(0), (2048, 2)), path,
                                                    samplers, steps, repeats)
    bare_u, rows_u = bench_sampler_overhead.measure("U-Net", unet, jax.random.normal(jax.random.key(0), (256, 8, 8, 1)),
                                                    path, samplers, steps, repeats)
    rows = [[rm[0], rm[1], rm[3], ru[3]] for rm, ru in zip(rows_m, rows_u)]  # sampler, NFE, MLP ratio, U-Net ratio
    return [f"## Sampler overhead: time per NFE / one bare network call ({steps} steps)", "",
            f"One bare call: MLP (batch 2,048) {bare_m * 1e3:.3f} ms, U-Net (batch 256) {bare_u * 1e3:.2f} ms. "
            "1.00 means the sampler costs nothing beyond its network calls.", "",
            *_table(["sampler", "NFE", "2-D MLP", "digits U-Net"], rows)]


def _first_and_steady(fn):
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return first, time.perf_counter() - t0


def section_compile(quick):
    import jax
    import optax
    from flax import nnx

    from jaxgen.data.images import device_sampler, load_digits
    from jaxgen.data.toy2d import eight_gaussians, moons
    from jaxgen.fields import chunked_field, guided_field
    from jaxgen.losses import flow_matching_loss
    from jaxgen.models import MLPField, UNetField
    from jaxgen.samplers import Euler, sample
    from jaxgen.training import Trainer

    print("[report] compile times", flush=True)
    rows = []
    mlp = Trainer(MLPField(2, width=64, hidden_layers=3, activation="selu", rngs=nnx.Rngs(0)),
                  flow_matching_loss("linear", source=eight_gaussians), optax.adam(1e-3),
                  data=lambda key: moons(key, 256), ema_decay=0.999)
    state = mlp.init(0)
    first, steady = _first_and_steady(lambda: mlp.steps(state, 500)[1])
    rows.append(["2-D MLP Trainer + EMA, 500 fused steps", first - steady, steady])
    model = mlp.model(state)
    x0 = eight_gaussians(jax.random.key(1), 2048)
    euler = jax.jit(lambda m, x: sample(m, x, Euler(), steps=100).x)
    first, steady = _first_and_steady(lambda: euler(model, x0))
    rows.append(["2-D MLP Euler-100 sampling of 2,048", first - steady, steady])

    unet = UNetField(1, channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,), dropout=0.1,
                     num_classes=10, image_size=8, rngs=nnx.Rngs(0))
    tr = Trainer(unet, flow_matching_loss("linear", label_dropout=0.1, null_label=10), optax.adam(2e-4),
                 data=device_sampler(load_digits("all"), 128))
    ustate = tr.init(0)
    first, steady = _first_and_steady(lambda: tr.steps(ustate, 10)[1])
    rows.append(["digits U-Net Trainer, 10 fused steps", first - steady, steady])
    m = tr.model(ustate)
    m.eval()
    labels = jax.numpy.arange(256) % 10
    guided = jax.jit(lambda m, x: sample(guided_field(chunked_field(m, 128), 2.0, null_label=10), x, Euler(), steps=20,
                                         cond={"y": labels}).x)
    xu = jax.random.normal(jax.random.key(2), (256, 8, 8, 1))
    first, steady = _first_and_steady(lambda: guided(m, xu))
    rows.append(["digits U-Net guided Euler-20 sampling of 256", first - steady, steady])
    lines = ["## Compile times", "", *_table(["program", "compile s (first call - steady call)", "steady call s"], rows)]
    if not quick:
        cli = []
        with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as out:
            env = {**os.environ, "JAXGEN_CACHE": cache}
            env.pop("JAXGEN_COMPILATION_CACHE", None)
            for label in ("cold cache", "warm cache"):
                print(f"[report] jaxgen train digits_smoke, {label}", flush=True)
                t0 = time.perf_counter()
                r = subprocess.run([sys.executable, "-m", "experiments.cli", "train", "digits_smoke", "--out",
                                    os.path.join(out, label.replace(" ", "_"))], cwd=ROOT, env=env,
                                   capture_output=True, text=True)
                cli.append((label, time.perf_counter() - t0, r.returncode))
        lines += ["", "`jaxgen train digits_smoke` end to end (a fresh `JAXGEN_CACHE`): "
                  + ", ".join(f"{label} {s:.1f} s" + ("" if rc == 0 else f" (exit {rc})") for label, s, rc in cli)]
    return lines


def _devices_worker(n: int, steps: int) -> None:
    import jax

    jax.config.update("jax_num_cpu_devices", n)
    import numpy as np
    import optax
    from flax import nnx

    from jaxgen.data.images import device_sampler, load_digits
    from jaxgen.losses import flow_matching_loss
    from jaxgen.models import UNetField
    from jaxgen.training import Trainer, data_mesh

    data = load_digits("all")
    result = {"devices": jax.device_count()}
    losses = {}
    for label, mesh, axis in (("1", None, None), (str(n), data_mesh(), None), ("sharded", data_mesh(), "data")):
        unet = UNetField(1, channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                         dropout=0.1, num_classes=10, image_size=8, shard_axis=axis, rngs=nnx.Rngs(0))
        tr = Trainer(unet, flow_matching_loss("linear", label_dropout=0.1, null_label=10), optax.adam(2e-4),
                     data=device_sampler(data, 128), mesh=mesh, ema_decay=0.999)
        state = tr.init(0)
        t0 = time.perf_counter()
        state, l1 = tr.steps(state, steps)
        jax.block_until_ready(l1)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        state, l2 = tr.steps(state, steps)
        jax.block_until_ready(l2)
        steady = time.perf_counter() - t0
        losses[label] = np.concatenate([np.asarray(l1), np.asarray(l2)])
        arrays = [x for x in jax.tree.leaves((state.params, state.opt_state, state.ema_params)) if hasattr(x, "sharding")]
        result[label] = {"steps_per_s": steps / steady, "compile_s": first - steady,
                         "state_mb": sum(x.addressable_shards[0].data.nbytes for x in arrays) / 1e6,
                         "loss_diff": float(np.max(np.abs(losses[label] - losses["1"])))}
    print("REPORT " + json.dumps(result), flush=True)


def section_devices(n, steps):
    print(f"[report] 1 vs {n} fake devices", flush=True)
    env = {**os.environ, "JAXGEN_COMPILATION_CACHE": "0"}
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--devices-worker", str(n), str(steps)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=3600)
    line = [x for x in r.stdout.splitlines() if x.startswith("REPORT ")]
    if not line:
        return [f"## 1 vs {n} fake CPU devices", "", "The worker failed:", "", "```", (r.stdout + r.stderr)[-3000:],
                "```"]
    res = json.loads(line[0][7:])
    rows = [[name, r["steps_per_s"], r["compile_s"], f"{r['state_mb']:.2f}", "-" if key == "1" else f"{r['loss_diff']:.1e}"]
            for key, name in (("1", "1 device"), (str(n), f"data mesh of {n} fake devices (replicated state)"),
                              ("sharded", f"data mesh of {n}, parameters sharded (`UNetField(shard_axis='data')`)"))
            for r in [res[key]]]
    return [f"## 1 vs {n} fake CPU devices: the digits U-Net with EMA, batch 128, {2 * steps} steps", "",
            f"Correctness and overhead, not speed: the {n} devices share the same {os.cpu_count()} cores.", "",
            *_table(["", "steps/s", "compile s", "state MB on one device", "largest loss difference to 1 device"],
                    rows), "",
            f"- Mesh program time / single-device program time: **{rows[0][1] / rows[1][1]:.2f}x** (replicated), "
            f"**{rows[0][1] / rows[2][1]:.2f}x** (parameters sharded)"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="benchmark-report.md", help="the Markdown file to write")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the peer comparisons (medians are reported)")
    p.add_argument("--threads", type=int, default=2, help="torch threads for the peers")
    p.add_argument("--peers-python", default=None, help="python of an environment with the peers (default: setup.sh)")
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--quick", action="store_true", help="one round, short timings, no CLI compile run")
    p.add_argument("--devices-worker", nargs=2, type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.devices_worker:
        return _devices_worker(*a.devices_worker)
    if a.rounds < 1:
        p.error("--rounds must be >= 1")
    out_dir = os.path.dirname(os.path.abspath(a.out))
    if not os.path.isdir(out_dir):
        p.error(f"--out {a.out}: the folder {out_dir} does not exist")
    rounds = 1 if a.quick else a.rounds
    peers = None if a.no_peers else bench_toy2d._peer_python(a.peers_python)
    t_start = time.perf_counter()
    lines = ["# jaxgen benchmark report", "", f"`python benchmarks/report.py {' '.join(argv or sys.argv[1:])}`".rstrip(),
             "", *machine(peers), ""]
    lines += section_toy2d(peers, rounds, 500 if a.quick else 5000, 300 if a.quick else 2000, a.threads) + [""]
    lines += section_unet(peers, rounds, 10 if a.quick else 40, a.threads) + [""]
    lines += section_overhead(20, 2 if a.quick else 5) + [""]
    lines += section_compile(a.quick) + [""]
    lines += section_devices(8, 5 if a.quick else 10) + [""]
    lines.append(f"Whole report: {time.perf_counter() - t_start:.0f} s. Figures drift with the machine's load: "
                 "compare only figures from the same report.")
    text = "\n".join(lines) + "\n"
    with open(a.out, "w") as f:
        f.write(text)
    print("\n" + text)
    print(f"[report] written to {a.out}")


if __name__ == "__main__":
    main()
