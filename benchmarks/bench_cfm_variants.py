"""TorchCFM's 2-D table, side by side in one run: I-CFM, OT-CFM, SB-CFM and target CFM in jaxgen and in TorchCFM.

For each task (8 Gaussians -> moons; N(0, I) -> 8 Gaussians) and method, both libraries train TorchCFM's recipe (MLP of
width 64, SELU, PyTorch's nn.Linear initialisation (``--init``), batch 256, Adam 1e-3 at a constant rate, no EMA, the
same number of steps) and sample 2,048 points with
Euler at 1 and 100 steps from their own source draws. The same code then measures, for both: the exact W2 to 2,048
fresh target points (host Hungarian solver, ``jaxgen.metrics.wasserstein2_exact``), the straightness of the 100-step
trajectories (``jaxgen.metrics.straightness``: 0 for straight lines at constant speed) and the training steps/s on this
machine. The 1-step W2 on N(0, I) -> 8 Gaussians varies by +-0.05 from seed to seed in both libraries (the floor,
two target sets, is 0.56): compare means over 10 or more seeds. jaxgen runs its experiment code (``experiments.toy2d``: the ``jaxgen train`` configs) with the training steps
fused in chunks on the device, the coupling computed inside the compiled step; TorchCFM computes its exact OT plan with
POT on the host at every step (``ot_method="exact"``, also for SB-CFM).

    python benchmarks/bench_cfm_variants.py [--steps 5000] [--seeds 3] [--ot-coupling exact] [--init lecun_normal]
        [--tasks gaussian_to_8gaussians] [--only OT-CFM] [--no-peers] [--out t.md]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

TASKS = {"8gaussians_to_moons": ("8gaussians", "moons"), "gaussian_to_8gaussians": ("gaussian", "8gaussians")}


def methods(a) -> list[tuple[str, str | None, dict]]:
    """``(label, peer method or None, Toy2DConfig overrides)``: TorchCFM's classes and jaxgen's configs of the same
    method (``None``: a jaxgen-only row)."""
    return [
        ("I-CFM", "i", {}),
        ("OT-CFM", "ot", {"coupling": a.ot_coupling}),
        ("OT-CFM, exact OT", None, {"coupling": "exact"}),
        (f"SB-CFM (sigma {a.sb_sigma:g})", "sb", {"coupling": a.ot_coupling, "bridge_noise": a.sb_sigma}),
        (f"target CFM (sigma_min {a.sigma_min:g})", "target", {"sigma_min": a.sigma_min}),
    ]


def metrics_of(x1, one, traj, ref):
    import jax.numpy as jnp

    from jaxgen.metrics import straightness, wasserstein2_exact

    return {"w2_1": wasserstein2_exact(one, ref), "w2_100": wasserstein2_exact(x1, ref),
            "straightness": float(straightness(jnp.asarray(traj), jnp.linspace(0.0, 1.0, traj.shape[0])))}


def run_jaxgen(task, over, steps, num, seed, init="pytorch", chunk=500):
    import jax

    from experiments import toy2d
    from jaxgen.samplers import Euler, sample

    src, tgt = TASKS[task]
    cfg = toy2d.Toy2DConfig(name=f"bench_{task}", source=src, target=tgt, steps=steps, ema_decay=0.0, lr_decay=False,
                            checked=False, seed=seed, init=init, **over)
    toy2d.check_config(cfg)
    path, target, source_sampler, _, trainer = toy2d._setup(cfg)
    state = trainer.init(jax.random.key(seed))
    chunk = min(chunk, steps)
    state, _ = trainer.steps(state, chunk)  # compile (and 'chunk' steps of warm-up, as the peers' 50)
    jax.block_until_ready(state)
    start = time.perf_counter()
    done = 0
    while done < steps:
        state, losses = trainer.steps(state, chunk)
        done += chunk
    jax.block_until_ready(state)
    seconds = time.perf_counter() - start
    field = trainer.model(state)
    x0 = source_sampler(jax.random.key(seed + 1), num)
    res = jax.jit(lambda f, x: sample(f, x, Euler(), steps=100, save_trajectory=True))(field, x0)
    one = jax.jit(lambda f, x: sample(f, x, Euler(), steps=1))(field, x0)
    return {"steps_per_second": done / seconds, "final_loss": float(losses[-1])}, np.asarray(res.x), \
        np.asarray(one.x), np.asarray(res.trajectory)


def run_peer(py, peer_method, task, steps, sigma, num, seed, threads):
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "samples.npz")
        cmd = [py, os.path.join(os.path.dirname(os.path.abspath(__file__)), "peer_torchcfm_variants.py"),
               "--method", peer_method, "--task", task, "--steps", str(steps), "--sigma", str(sigma), "--num", str(num),
               "--seed", str(seed), "--threads", str(threads), "--out", out]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            print(f"[bench] TorchCFM {peer_method} on {task} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            return None
        info = json.loads(proc.stdout.strip().splitlines()[-1])
        d = np.load(out)
        return info, d["euler100"], d["euler1"], d["trajectory"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--num", type=int, default=2048)
    p.add_argument("--seeds", type=int, default=1, help="seeds 0..N-1 per row: the table shows mean (and std)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--ot-coupling", default="sinkhorn:max_iterations=20",
                   help="jaxgen's coupling spec for OT-CFM and SB-CFM")
    p.add_argument("--init", default="pytorch", choices=["pytorch", "lecun_normal"],
                   help="jaxgen's MLP initialisation: PyTorch's (TorchCFM's recipe) or Flax's default")
    p.add_argument("--sb-sigma", type=float, default=0.5)
    p.add_argument("--sigma-min", type=float, default=0.01)
    p.add_argument("--tasks", default=",".join(TASKS))
    p.add_argument("--only", default="", help="comma-separated method labels' prefixes to run (e.g. 'OT,I-')")
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--peers-python", default=None)
    p.add_argument("--out", default=None, help="also write the Markdown table here")
    a = p.parse_args(argv)
    import jax

    from bench_toy2d import _peer_python
    from jaxgen.data.toy2d import get_distribution
    from jaxgen.metrics import wasserstein2_exact

    py = None if a.no_peers else _peer_python(a.peers_python)
    rows = []
    keys = ("w2_1", "w2_100", "straightness", "steps_per_second")

    def summary(runs):
        return {k: (float(np.mean([r[k] for r in runs])), float(np.std([r[k] for r in runs]))) for k in keys}

    for task in a.tasks.split(","):
        ref = np.asarray(get_distribution(TASKS[task][1])(jax.random.key(10_000), a.num))
        ref2 = np.asarray(get_distribution(TASKS[task][1])(jax.random.key(20_000), a.num))
        nan = (float("nan"), float("nan"))
        rows.append((task, "floor: two target sets", "", {"w2_1": nan, "w2_100": (wasserstein2_exact(ref2, ref), nan[1]),
                                                           "straightness": nan, "steps_per_second": nan}))
        for label, peer_method, over in methods(a):
            if a.only and not any(label.startswith(o) for o in a.only.split(",")):
                continue
            if peer_method == "target" and TASKS[task][0] != "gaussian":
                continue  # TorchCFM's target CFM assumes a N(0, I) source
            sigma = {"sb": a.sb_sigma, "target": a.sigma_min}.get(peer_method, 0.0)
            runs = []
            for seed in range(a.seeds):
                info, x1, one, traj = run_jaxgen(task, over, a.steps, a.num, seed, a.init)
                runs.append({**metrics_of(x1, one, traj, ref), **info})
                print(f"[bench] {task} {label} jaxgen seed {seed}: {runs[-1]}", flush=True)
            rows.append((task, label, "jaxgen", summary(runs)))
            if py and peer_method:
                runs = []
                for seed in range(a.seeds):
                    got = run_peer(py, peer_method, task, a.steps, sigma, a.num, seed, a.threads)
                    if got is not None:
                        info, x1, one, traj = got
                        runs.append({**metrics_of(x1, one, traj, ref), **info})
                        print(f"[bench] {task} {label} TorchCFM seed {seed}: {runs[-1]}", flush=True)
                if runs:
                    rows.append((task, label, "TorchCFM", summary(runs)))
    lines = [f"{a.steps} training steps each, batch 256, {a.seeds} seed(s) (mean, and std over seeds when several); W2 "
             f"of {a.num} Euler samples to {a.num} fresh target points; jaxgen OT coupling: `{a.ot_coupling}`, MLP "
             f"init `{a.init}`.", "",
             "| task | method | library | W2, 1 Euler step | W2, 100 Euler steps | straightness | train steps/s |",
             "|---|---|---|---|---|---|---|"]

    def fmt(v, digits=3):
        mean, std = v
        if mean != mean:
            return ""
        text = f"{mean:,.{digits}f}"
        return text + (f" ± {std:,.{digits}f}" if a.seeds > 1 and std == std else "")

    for task, label, lib, m in rows:
        lines.append(f"| {task} | {label} | {lib} | {fmt(m['w2_1'])} | {fmt(m['w2_100'])} | {fmt(m['straightness'])} "
                     f"| {fmt(m['steps_per_second'], 0)} |")
    table = "\n".join(lines)
    print(table)
    if a.out:
        with open(a.out, "w") as fh:
            fh.write(table + "\n")


if __name__ == "__main__":
    main()
