"""Minibatch OT couplings (:mod:`jaxgen.couplings.ot`): speed against pairing quality, to pick OT-CFM's default.

At batch ``n`` (256) of 2-D points, 8 Gaussians (source, t = 0) -> moons (data, t = 1):

1. per-call time of each jitted ``coupling.indices`` (median over many calls after warm-up, one fixed batch), and the
   quality of its pairing over ``--batches`` fresh batches: the mean squared transport cost ``mean ||x0_i - x1_j||^2``
   of the pairs, its ratio to the exact OT cost of the whole batch (scipy), and the share of distinct sources / data
   points used (100% for a permutation; sampled plans reuse some points and skip others); for some couplings also the
   whole training step of TorchCFM's recipe with the coupling inline (SELU MLP width 64 x 3, Adam, CondOT path,
   jaxgen's ``Trainer``): ms per jitted step and per step of a fused ``lax.scan`` of steps;
2. the Sinkhorn plan itself by epsilon and iterations: its expected cost against its source-marginal error;
3. in a subprocess with 8 fake CPU devices and the batch sharded over a mesh axis ``"data"``: per-device couplings
   (:class:`~jaxgen.couplings.OnMesh`, ``shard_map``) against vmapped ``blocks=8`` and the global coupling under plain
   ``jit`` sharding, with the collectives in each compiled program. The 8 fake devices share this machine's cores, so
   a global coupling that every device solves redundantly costs 8 times its work here (not on 8 real devices).

Usage::

    python benchmarks/bench_couplings.py [--n 256] [--batches 8] [--budget 2.0] [--steps 500] [--no-train] [--no-mesh]

Host reference: scipy's ``linear_sum_assignment`` (what POT's exact solver does on the host for TorchCFM's
``exact`` OT-CFM) on the same cost matrix. Timings drift with machine load (printed): compare rows of one run only.
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
sys.path.insert(0, ROOT)

SPECS = [  # (spec, also time the training step)
    ("independent", True),
    ("exact", True),
    ("exact:warm_start=60", True),
    ("exact:blocks=2,warm_start=40", False),
    ("exact:blocks=4", False),
    ("exact:blocks=4,warm_start=20", True),
    ("exact:blocks=8", False),
    ("exact:blocks=8,warm_start=10", True),
    ("sinkhorn:epsilon=0.1,max_iterations=20", False),
    ("sinkhorn:epsilon=0.05,max_iterations=20", True),
    ("sinkhorn", True),  # the defaults: epsilon=0.05, max_iterations=30, sample=conditional
    ("sinkhorn:epsilon=0.05,max_iterations=50", False),
    ("sinkhorn:epsilon=0.03,max_iterations=50", True),
    ("sinkhorn:epsilon=0.02,max_iterations=30", False),
    ("sinkhorn:epsilon=0.02,max_iterations=100", False),
    ("sinkhorn:sample=without_replacement", False),
    ("sinkhorn:sample=with_replacement", False),
    ("sinkhorn:sample=permutation", False),
    ("sinkhorn:sample=argmax", False),
    ("sinkhorn:backend=ott", False),
    ("sinkhorn:blocks=4", False),
]
PLAN_GRID = [(0.1, 20), (0.05, 20), (0.05, 30), (0.05, 50), (0.03, 30), (0.03, 50), (0.03, 100), (0.02, 30),
             (0.02, 50), (0.02, 100), (0.01, 100), (0.01, 300)]


def median_ms(fn, budget: float, max_calls: int = 1000) -> float:
    """Median wall time of ``fn()`` in ms after two warm-up calls, over as many calls as fit in ``budget`` seconds."""
    fn(), fn()
    times, start = [], time.perf_counter()
    while len(times) < 5 or (time.perf_counter() - start < budget and len(times) < max_calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * float(np.median(times))


def batches(n: int, count: int, seed: int = 0):
    import jax

    from jaxgen.data import toy2d

    source, data = toy2d.get_distribution("8gaussians"), toy2d.get_distribution("moons")
    keys = jax.random.split(jax.random.key(seed), count)
    return [(np.asarray(source(jax.random.fold_in(k, 0), n)), np.asarray(data(jax.random.fold_in(k, 1), n)))
            for k in keys]


def exact_cost(x0, x1) -> float:
    from scipy.optimize import linear_sum_assignment

    c = np.sum((x0[:, None].astype(np.float64) - x1[None]) ** 2, -1)
    r, k = linear_sum_assignment(c)
    return float(c[r, k].mean())


def quality(indices, data) -> tuple[float, float, float, float]:
    """Mean pair cost, its ratio to exact OT, and the shares of distinct sources and data points, over ``data``."""
    import jax

    costs, ratios, src, dat = [], [], [], []
    for b, (x0, x1) in enumerate(data):
        i, j = (np.asarray(a) for a in indices(jax.random.key(100 + b), x0, x1))
        cost = float(np.mean(np.sum((x0[i] - x1[j]) ** 2, -1)))
        costs.append(cost)
        ratios.append(cost / exact_cost(x0, x1))
        src.append(len(set(i.tolist())) / len(i))
        dat.append(len(set(j.tolist())) / len(j))
    return float(np.mean(costs)), float(np.mean(ratios)), float(np.mean(src)), float(np.mean(dat))


def train_step_ms(spec: str, n: int, steps: int, budget: float) -> tuple[float, float]:
    """(ms per jitted Trainer.step, ms per step of a fused scan of ``steps``) with the coupling inline."""
    import jax
    import optax
    from flax import nnx

    from jaxgen.couplings import get_coupling
    from jaxgen.data.toy2d import eight_gaussians, moons
    from jaxgen.losses import flow_matching_loss
    from jaxgen.models import MLPField
    from jaxgen.training import Trainer

    model = MLPField(2, width=64, hidden_layers=3, activation="selu", rngs=nnx.Rngs(0))
    coupling = None if spec == "independent" else get_coupling(spec)
    trainer = Trainer(model, flow_matching_loss("linear", source=eight_gaussians, coupling=coupling),
                      optax.adam(1e-3), data=lambda key: moons(key, n))
    holder = {"s": trainer.init(0)}

    def one():
        holder["s"], loss = trainer.step(holder["s"])
        jax.block_until_ready(loss)

    def fused():
        holder["s"], loss = trainer.steps(holder["s"], steps)
        jax.block_until_ready(loss)

    single = median_ms(one, budget)
    return single, median_ms(fused, budget, max_calls=5) / steps


def single_device(args) -> None:
    import jax
    from scipy.optimize import linear_sum_assignment

    from jaxgen.couplings import get_coupling

    data = batches(args.n, args.batches)
    x0, x1 = data[0]
    key = jax.random.key(0)
    independent = np.mean([np.sum((a - b) ** 2, -1).mean() for a, b in data])
    print(f"\n## 1. Couplings at n={args.n}, 2-D (8 Gaussians -> moons), {jax.devices()[0].platform}; exact OT cost "
          f"{np.mean([exact_cost(*b) for b in data]):.3f}, independent pairs {independent:.3f}\n")
    head = "| coupling | ms / call | pair cost | / exact OT | sources used | data used |"
    print(head + (" step ms (jit) | step ms (fused) |" if args.train else ""))
    print("|" + "---|" * (6 + 2 * args.train))
    cost = np.sum((x0[:, None].astype(np.float64) - x1[None]) ** 2, -1)
    ms = median_ms(lambda: linear_sum_assignment(cost), args.budget)
    c, r, s, d = quality(lambda k, a, b: linear_sum_assignment(np.sum((a[:, None] - b[None]) ** 2, -1)), data)
    print(f"| host scipy linear_sum_assignment (reference, not in-graph) | {ms:.3f} | {c:.3f} | {r:.3f} | "
          f"{100 * s:.0f}% | {100 * d:.0f}% |" + (" | |" if args.train else ""))
    for spec, with_step in SPECS:
        coupling = get_coupling(spec)
        f = jax.jit(coupling.indices)
        ms = median_ms(lambda f=f: jax.block_until_ready(f(key, x0, x1)), args.budget)
        c, r, s, d = quality(f, data)
        row = f"| `{spec}` | {ms:.3f} | {c:.3f} | {r:.3f} | {100 * s:.0f}% | {100 * d:.0f}% |"
        if args.train:
            row += " {:.3f} | {:.3f} |".format(*train_step_ms(spec, args.n, args.steps, args.budget)) if with_step \
                else " | |"
        print(row, flush=True)


def plan_rows(args) -> None:
    """Quality of the Sinkhorn plan itself against its marginal error, by epsilon and iterations."""
    import jax
    import jax.numpy as jnp

    from jaxgen.metrics.transport import _relative_eps, sinkhorn_potentials, squared_distances

    data = batches(args.n, args.batches)
    solve = jax.jit(sinkhorn_potentials, static_argnums=2)
    print(f"\n## 2. The kernel-domain Sinkhorn plan P at n={args.n}: expected cost E_P ||x0 - x1||^2 over the exact OT "
          "cost, and the source marginal's relative error |n P 1 - 1| (mean, max; the data marginal is exact)\n")
    print("| epsilon (x mean cost) | iterations | E_P cost / exact OT | source marginal error, mean | max |")
    print("|---|---|---|---|---|")
    for epsilon, iterations in PLAN_GRID:
        ratios, mean_err, max_err = [], [], []
        for x0, x1 in data:
            cost = squared_distances(x0, x1)
            eps = _relative_eps(cost, epsilon)
            f, g = solve(cost, eps, iterations)
            plan = np.asarray(jnp.exp((f[:, None] + g[None, :] - cost) / eps), np.float64)
            err = np.abs(plan.sum(1) * args.n - 1)
            ratios.append(float((plan * np.asarray(cost)).sum() / plan.sum()) / exact_cost(x0, x1))
            mean_err.append(err.mean())
            max_err.append(err.max())
        print(f"| {epsilon} | {iterations} | {np.mean(ratios):.3f} | {100 * np.mean(mean_err):.1f}% | "
              f"{100 * np.mean(max_err):.1f}% |", flush=True)


def mesh_rows(args) -> None:
    """Runs inside the 8-device subprocess."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxgen.couplings import ExactOT, OnMesh, SinkhornOT

    devices = jax.devices()
    mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
    shard = NamedSharding(mesh, PartitionSpec("data", None))
    data = batches(args.n, args.batches)
    x0, x1 = (jax.device_put(a, shard) for a in data[0])
    key = jax.random.key(0)
    d = len(devices)
    sink = SinkhornOT()
    rows = [
        (f"ExactOT(blocks={d}) under jit sharding (vmapped blocks)", ExactOT(blocks=d)),
        ("OnMesh(ExactOT()) per device (shard_map)", OnMesh(coupling=ExactOT(), mesh=mesh)),
        ("OnMesh(ExactOT(warm_start=10)) per device", OnMesh(coupling=ExactOT(warm_start=10), mesh=mesh)),
        ("ExactOT() global under jit sharding", ExactOT()),
        ("OnMesh(ExactOT(warm_start=60), per_device=False) global", OnMesh(coupling=ExactOT(warm_start=60), mesh=mesh,
                                                                           per_device=False)),
        (f"SinkhornOT(blocks={d}) under jit sharding", SinkhornOT(blocks=d)),
        ("OnMesh(SinkhornOT()) per device", OnMesh(coupling=sink, mesh=mesh)),
        ("SinkhornOT() global under jit sharding", sink),
        ("OnMesh(SinkhornOT(), per_device=False) global", OnMesh(coupling=sink, mesh=mesh, per_device=False)),
    ]
    print(f"\n## 3. {d} fake CPU devices, batch {args.n} sharded over mesh axis 'data' ({args.n // d} per device)\n")
    print("| coupling | ms / call | / exact OT | all-gather | all-reduce | all-to-all |")
    print("|---|---|---|---|---|---|")
    for name, coupling in rows:
        f = jax.jit(coupling.indices)
        hlo = f.lower(key, x0, x1).compile().as_text()
        counts = [len(re.findall(op + r"[-(.]", hlo)) for op in ("all-gather", "all-reduce", "all-to-all")]
        ms = median_ms(lambda f=f: jax.block_until_ready(f(key, x0, x1)), args.budget, max_calls=200)
        ratio = quality(lambda k, a, b, f=f: f(k, jax.device_put(a, shard), jax.device_put(b, shard)), data)[1]
        print(f"| {name} | {ms:.3f} | {ratio:.3f} | " + " | ".join(map(str, counts)) + " |", flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=256)
    p.add_argument("--batches", type=int, default=8, help="fresh batches over which the quality is averaged")
    p.add_argument("--budget", type=float, default=2.0, help="seconds of timed calls per row")
    p.add_argument("--steps", type=int, default=500, help="training steps per fused scan")
    p.add_argument("--no-train", dest="train", action="store_false", help="skip the training-step columns")
    p.add_argument("--no-mesh", dest="mesh", action="store_false", help="skip the 8-fake-device section")
    p.add_argument("--mesh-only", action="store_true", help=argparse.SUPPRESS)  # the subprocess
    p.add_argument("--devices", type=int, default=8)
    args = p.parse_args(argv)
    if args.mesh_only:
        mesh_rows(args)
        return
    print(f"# bench_couplings: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at start")
    single_device(args)
    plan_rows(args)
    if args.mesh:
        env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                                           f" --xla_force_host_platform_device_count={args.devices}").strip(),
                   JAX_PLATFORMS="cpu")
        cmd = [sys.executable, os.path.abspath(__file__), "--mesh-only", "--n", str(args.n), "--batches",
               str(args.batches), "--budget", str(args.budget)]
        sys.stdout.flush()
        subprocess.run(cmd, env=env, check=True)
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
