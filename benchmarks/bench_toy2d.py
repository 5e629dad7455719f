"""Side-by-side speed of the 2-D flow-matching recipe: TorchCFM / flow_matching vs jaxgen vs a hand-written JAX loop.

The recipe (TorchCFM's): 8 Gaussians -> moons, SELU MLP of width 64 (3 hidden layers), batch 256,
Adam 1e-3, CondOT path. Everything runs in this one process run, on the same CPU, one after the other:

1. the PyTorch peers (``../shared/peers``; built with ``shared/peers/setup.sh``), as subprocesses;
2. jaxgen's :class:`~jaxgen.training.Trainer`: one jitted step per call, and N steps fused in ``lax.scan``;
3. the ceiling: a hand-written JAX loop of the same recipe (plain ``jax.jit`` step, and ``lax.scan``);
4. Euler-100 sampling of 2,048 points: ``jaxgen.samplers.sample`` vs a hand-written ``lax.scan`` Euler.

Usage::

    python benchmarks/bench_toy2d.py [--steps 5000] [--peer-steps 2000] [--threads 2] [--peers-python PATH]

Targets (issue 2): jaxgen >= 8x TorchCFM's training steps/s, >= 90% of the hand-written fused loop,
and fixed-step sampling within 10% of the hand-written scan. Timings drift with machine load: compare
only figures from the same run.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEERS = os.environ.get("JAXGEN_PEERS", os.path.join(os.path.dirname(ROOT), "shared", "peers"))


def _peer_python(explicit: str | None) -> str | None:
    if explicit:
        return explicit
    setup = os.path.join(PEERS, "setup.sh")
    if not os.path.exists(setup):
        return None
    try:
        out = subprocess.run(["bash", setup], capture_output=True, text=True, timeout=900, check=True)
        return out.stdout.strip().splitlines()[-1]
    except (subprocess.SubprocessError, IndexError) as e:
        print(f"[bench] could not build the peers' environment: {e}", file=sys.stderr)
        return None


def run_peers(py: str | None, steps: int, threads: int) -> dict:
    res = {}
    if py is None:
        print("[bench] peers not available (no ../shared/peers or setup failed); jaxgen figures only")
        return res
    for name, script, args in (("torchcfm", "peer_torchcfm_toy2d.py", [str(steps), "cfm", str(threads)]),
                               ("flow_matching", "peer_flow_matching_toy2d.py", [str(steps), str(threads)])):
        out = subprocess.run([py, os.path.join(PEERS, script), *args], capture_output=True, text=True, timeout=1200)
        text = out.stdout + out.stderr
        m = re.search(r"train: ([\d.]+) steps/s", text)
        s = re.search(r"sampling of \d+: ([\d.]+) ms", text)
        w = re.search(r"sliced-W2 to moons ([\d.]+)", text)
        if m is None:
            print(f"[bench] {name} failed:\n{text[-2000:]}")
            continue
        res[name] = {"steps_per_s": float(m.group(1)), "sample_ms": float(s.group(1)) if s else float("nan"),
                     "sliced_w2": float(w.group(1)) if w else float("nan")}
        print(f"[bench] {name}: {res[name]}")
    return res


def _best_rate(fn, n_items: int, repeats: int = 3) -> float:
    """Items per second of ``fn`` (already compiled), best of ``repeats``."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n_items / best


def run_jax(steps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from jaxgen.data.toy2d import eight_gaussians, moons
    from jaxgen.losses import flow_matching_loss
    from jaxgen.models import MLPField
    from jaxgen.samplers import Euler, sample
    from jaxgen.training import Trainer

    bs = 256
    res = {}

    # -- jaxgen's trainer -------------------------------------------------------------------
    def make_trainer(ema):
        model = MLPField(2, width=64, hidden_layers=3, activation="selu", rngs=nnx.Rngs(0))
        return Trainer(model, flow_matching_loss("linear", source=eight_gaussians), optax.adam(1e-3),
                       data=lambda key: moons(key, bs), ema_decay=ema)

    for label, ema in (("jaxgen", None), ("jaxgen+ema", 0.999)):
        tr = make_trainer(ema)
        state = tr.init(0)
        state, l = tr.steps(state, steps)  # compile
        jax.block_until_ready(l)
        holder = {"s": state}

        def fused():
            holder["s"], l = tr.steps(holder["s"], steps)
            jax.block_until_ready(l)

        res[f"{label} fused"] = _best_rate(fused, steps)
        if ema is None:
            s = holder["s"]
            for _ in range(20):
                s, l = tr.step(s)
            jax.block_until_ready(l)
            n_single = min(steps, 2000)

            def single():
                nonlocal s
                for _ in range(n_single):
                    s, l = tr.step(s)
                jax.block_until_ready(l)

            res[f"{label} jit step"] = _best_rate(single, n_single)
            trained = tr.model(holder["s"])

    # -- hand-written ceiling ------------------------------------------------------------------
    model = MLPField(2, width=64, hidden_layers=3, activation="selu", rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tx = optax.adam(1e-3)

    def loss_fn(p, key):
        k1, k2, k3 = jax.random.split(key, 3)
        x1, x0 = moons(k1, bs), eight_gaussians(k2, bs)
        t = jax.random.uniform(k3, (bs,))
        xt = t[:, None] * x1 + (1 - t[:, None]) * x0
        return jnp.mean((nnx.merge(graphdef, p)(xt, t) - (x1 - x0)) ** 2)

    def body(carry, key):
        p, o = carry
        l, g = jax.value_and_grad(loss_fn)(p, key)
        u, o = tx.update(g, o, p)
        return (optax.apply_updates(p, u), o), l

    step = jax.jit(body)
    fused_hw = jax.jit(lambda c, key: jax.lax.scan(body, c, jax.random.split(key, steps)))
    carry = (params, tx.init(params))
    carry, l = fused_hw(carry, jax.random.key(0))
    jax.block_until_ready(l)
    hc = {"c": carry, "i": 0}

    def hw_fused():
        hc["i"] += 1
        hc["c"], l = fused_hw(hc["c"], jax.random.key(hc["i"]))
        jax.block_until_ready(l)

    res["hand-written fused"] = _best_rate(hw_fused, steps)
    keys = jax.random.split(jax.random.key(1), min(steps, 2000))
    c = hc["c"]
    c, l = step(c, keys[0])
    jax.block_until_ready(l)

    def hw_single():
        nonlocal c
        for k in keys:
            c, l = step(c, k)
        jax.block_until_ready(l)

    res["hand-written jit step"] = _best_rate(hw_single, len(keys))

    # -- sampling: Euler-100 on 2048 points ------------------------------------------------------
    n = 2048
    x0 = eight_gaussians(jax.random.key(2), n)
    lib = jax.jit(lambda f, x: sample(f, x, Euler(), steps=100).x)

    def hw_euler(f, x):
        h = 1.0 / 100

        def b(x, t):
            return x + h * f(x, jnp.full((x.shape[0],), t)), None

        return jax.lax.scan(b, x, jnp.arange(100, dtype=jnp.float32) * h)[0]

    hw = jax.jit(hw_euler)
    for name, fn in (("jaxgen sample", lib), ("hand-written scan", hw)):
        jax.block_until_ready(fn(trained, x0))
        res[f"{name} ms"] = 1000.0 / _best_rate(lambda: jax.block_until_ready(fn(trained, x0)), 1, repeats=10)
    np.testing.assert_allclose(lib(trained, x0), hw(trained, x0), atol=1e-4)
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=5000, help="JAX training steps per timing")
    p.add_argument("--peer-steps", type=int, default=2000, help="TorchCFM / flow_matching training steps")
    p.add_argument("--threads", type=int, default=2, help="torch threads for the peers")
    p.add_argument("--peers-python", default=None, help="python of an environment with the peers (default: setup.sh)")
    p.add_argument("--no-peers", action="store_true")
    a = p.parse_args(argv)

    peers = {} if a.no_peers else run_peers(_peer_python(a.peers_python), a.peer_steps, a.threads)
    jx = run_jax(a.steps)

    print("\n=== training steps/s (8 Gaussians -> moons, MLP 64x3 SELU, batch 256, Adam 1e-3; same CPU, same run) ===")
    rows = [(k, v["steps_per_s"]) for k, v in peers.items()] + [(k, v) for k, v in jx.items() if not k.endswith("ms")]
    for k, v in rows:
        print(f"{k:28s} {v:10.1f}")
    fused, ceiling = jx["jaxgen fused"], jx["hand-written fused"]
    print("\n=== ratios ===")
    if "torchcfm" in peers:
        print(f"jaxgen fused / torchcfm            {fused / peers['torchcfm']['steps_per_s']:6.2f}x   (target >= 8x)")
        print(f"jaxgen jit step / torchcfm         {jx['jaxgen jit step'] / peers['torchcfm']['steps_per_s']:6.2f}x")
    print(f"jaxgen fused / hand-written fused  {fused / ceiling:6.2%}   (target >= 90%)")
    print(f"jaxgen jit step / hand-written jit {jx['jaxgen jit step'] / jx['hand-written jit step']:6.2%}")
    print(f"jaxgen+ema fused / hand fused      {jx['jaxgen+ema fused'] / ceiling:6.2%}")
    print("\n=== Euler-100 sampling of 2,048 points (ms) ===")
    for k, v in peers.items():
        print(f"{k:28s} {v['sample_ms']:10.1f}")
    print(f"{'jaxgen sample':28s} {jx['jaxgen sample ms']:10.2f}")
    print(f"{'hand-written scan':28s} {jx['hand-written scan ms']:10.2f}")
    print(f"jaxgen / hand-written              {jx['jaxgen sample ms'] / jx['hand-written scan ms']:6.2%}   (target <= 110%)")


if __name__ == "__main__":
    main()
