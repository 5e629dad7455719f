"""Memory of gradients through a sampler: ``sample(..., gradient="full")`` against ``gradient="checkpoint"``.

The gradient of ``sum(x_1^2)`` with respect to the parameters of a 2-D MLP field (width 64, 3 hidden layers) and the
noise ``x0`` (batch 1,024 by default), through ``N`` Euler steps. ``"full"`` backpropagates through the ``lax.scan``
and keeps every step's residuals (memory linear in ``N``); ``"checkpoint"`` runs the steps as ``sqrt(N)`` blocks of
``sqrt(N)`` steps (:func:`jaxgen.samplers.base.checkpointed_scan`), keeps the state at each block's start and
recomputes one block at a time (memory ``~ sqrt(N)``, one more forward pass). The peak is XLA's temporary buffer size
of the compiled gradient program (``jax.jit(...).lower(...).compile().memory_analysis().temp_size_in_bytes``: the
scratch memory beyond arguments and outputs), read without running it; the time is the best of ``--repeats``
runs. The last column is the growth exponent between consecutive ``N`` (1 for linear, 0.5 for ``sqrt(N)``).

Usage::

    python benchmarks/bench_sampler_memory.py [--steps 16,64,256,1024] [--batch 1024] [--repeats 3]

Timings drift with machine load: compare figures from the same run only.
"""

from __future__ import annotations

import argparse
import math

from bench_sampler_overhead import _best  # best-of-N timing after a warm-up call (this folder is on sys.path)


def measure(steps, batch, repeats, modes=("full", "checkpoint")):
    """``{(mode, N): (temp bytes, seconds per gradient)}`` for each number of steps ``N``."""
    import jax
    from flax import nnx

    from jaxgen.models import MLPField
    from jaxgen.samplers import Euler, sample

    graphdef, params = nnx.split(MLPField(2, width=64, hidden_layers=3, rngs=nnx.Rngs(0)))
    x0 = jax.random.normal(jax.random.key(0), (batch, 2))
    out = {}
    for n in steps:
        for mode in modes:
            def loss(params, x0, n=n, mode=mode):
                x1 = sample(nnx.merge(graphdef, params), x0, Euler(), steps=n, gradient=mode).x
                return (x1**2).sum()

            grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
            temp = grad.lower(params, x0).compile().memory_analysis().temp_size_in_bytes
            out[mode, n] = (temp, _best(lambda: grad(params, x0), repeats))
    return out


def table(results, steps, modes=("full", "checkpoint")) -> str:
    mib = 2.0**20
    head = f"{'N':>6s}" + "".join(f" {m + ' MiB':>16s} {m + ' ms':>15s} {'growth':>7s}" for m in modes)
    lines = [head, "-" * len(head)]
    for i, n in enumerate(steps):
        row = f"{n:6d}"
        for m in modes:
            temp, sec = results[m, n]
            growth = "" if i == 0 else f"{math.log(temp / results[m, steps[i - 1]][0]) / math.log(n / steps[i - 1]):.2f}"
            row += f" {temp / mib:16.2f} {sec * 1e3:15.1f} {growth:>7s}"
        lines.append(row)
    n = steps[-1]
    lines.append(f"at N={n}: checkpoint uses {results['full', n][0] / results['checkpoint', n][0]:.1f}x less "
                 f"temporary memory than full, in {results['checkpoint', n][1] / results['full', n][1]:.2f}x the time")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", default="16,64,256,1024", help="comma-separated numbers of Euler steps")
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    steps = [int(s) for s in args.steps.split(",") if s.strip()]

    import jax

    print(f"JAX {jax.__version__} on {jax.devices()[0].platform} ({jax.device_count()} device(s)); Euler on a 2-D MLP "
          f"(width 64, 3 hidden layers), batch {args.batch}; grad of sum(x1^2) w.r.t. the parameters and x0")
    print(table(measure(steps, args.batch, args.repeats), steps))


if __name__ == "__main__":
    main()
