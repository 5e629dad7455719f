"""Sampler overhead: the time per field evaluation of each sampler divided by the time of one bare network call.

A ratio of 1.00 means the sampler adds nothing to the network's own cost; the excess is its bookkeeping (the
solver's arithmetic, the scan, noise draws, parameterisation conversions). Measured for the 2-D MLP of the toy
recipe (batch 2,048) and the digits U-Net (batch 256), both untrained (the cost does not depend on the weights), with
every sampler compiled once and timed as the best of ``--repeats`` runs.

Usage::

    python benchmarks/bench_sampler_overhead.py [--steps 20] [--repeats 5] [--samplers euler,heun,...]

Timings drift with machine load: compare figures from the same run only.
"""

from __future__ import annotations

import argparse
import time

DEFAULT_SAMPLERS = ("euler", "heun", "rk4", "dpm_solver_pp", "unipc", "ddim", "euler_maruyama", "ddpm")


def _best(fn, repeats):
    import jax

    jax.block_until_ready(fn())  # compile
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best


def measure(name, model, x0, path, samplers, steps, repeats):
    import jax
    import jax.numpy as jnp

    from jaxgen.samplers import sample

    t = jnp.full((x0.shape[0],), 0.5)
    network = jax.jit(lambda x: model(x, t))
    bare = _best(lambda: network(x0), repeats)
    rows = []
    for spec in samplers:
        kwargs = dict(path=path, steps=steps, key=jax.random.key(1))
        run = jax.jit(lambda x, spec=spec, kwargs=kwargs: sample(model, x, spec, **kwargs).x)
        nfe = sample(model, x0, spec, **kwargs).nfe  # the exact count (traced once, eagerly)
        seconds = _best(lambda run=run: run(x0), repeats)
        rows.append((spec, int(nfe), seconds, seconds / int(nfe) / bare))
    print(f"\n=== {name}: one bare network call {bare * 1e3:.3f} ms ===")
    print(f"{'sampler':16s} {'NFE':>5s} {'total ms':>10s} {'per NFE / bare call':>20s}")
    for spec, nfe, seconds, ratio in rows:
        print(f"{spec:16s} {nfe:5d} {seconds * 1e3:10.2f} {ratio:20.2f}")
    return bare, rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--samplers", default=",".join(DEFAULT_SAMPLERS))
    args = p.parse_args(argv)

    import jax
    from flax import nnx

    from jaxgen.models import MLPField, UNetField
    from jaxgen.paths import GaussianPath

    samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    path = GaussianPath.from_name("linear")
    print(f"JAX {jax.__version__} on {jax.devices()[0].platform} ({jax.device_count()} device(s)); steps={args.steps}")
    mlp = MLPField(2, width=64, hidden_layers=3, rngs=nnx.Rngs(0))
    measure("2-D MLP (width 64, 3 hidden layers), batch 2048", mlp, jax.random.normal(jax.random.key(0), (2048, 2)),
            path, samplers, args.steps, args.repeats)
    unet = UNetField(1, channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,), dropout=0.0,
                     image_size=8, rngs=nnx.Rngs(0))
    unet.eval()
    measure("digits U-Net (0.70M parameters), batch 256", unet, jax.random.normal(jax.random.key(0), (256, 8, 8, 1)),
            path, samplers, args.steps, args.repeats)


if __name__ == "__main__":
    main()
