"""Sample quality against the number of network evaluations (NFE), for every sampler, on trained models.

2-D: an MLP velocity field trained by CondOT flow matching from N(0, I) to moons; quality is the sliced
W2 distance (and energy distance) of 2,048 samples to fresh data. A consistency model distilled from that
field (Heun teacher) is compared at 1 and 2 NFE.
Digits (``--digits RUN_DIR``, e.g. the output of ``./run.sh``): the trained U-Net, guided at w = 2, and the
digits classifier's Fréchet distance of 500 samples (``--per-class 50``) to the held-out digits. A consistency
model of that guided field (``jaxgen train digits_cd``, ``--cd-steps``) is compared at 1 and 2 NFE.
Flow maps (``--samplers meanflow,shortcut`` to rerun only them): on 2-D a MeanFlow and a shortcut model trained from
scratch on the same data (``--fm-steps``), on digits a ``jaxgen train digits_meanflow`` run (``--meanflow RUN_DIR``,
guided at w = 2 through its guidance input), each at 1, 2, 4 and 8 jumps (NFE = jumps) from the same noise.

Every sampler gets the NFE budgets {1, 2, 4, 8, 16, 32, 100}; a sampler that cannot spend a budget exactly
takes the most steps within it (a budget that adds no step is skipped), and the NFE it reports is printed. Writes
``nfe_table.csv`` / ``.json`` and ``nfe_quality.png`` into ``--out``.

Usage: python benchmarks/bench_samplers_nfe.py [--out runs/bench_nfe] [--steps 20000] [--digits runs/digits_cfm]
       [--samplers dpm_solver_2,dpm_solver_3]   # re-run some samplers; their rows replace those in OUT
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BUDGETS = (1, 2, 4, 8, 16, 32, 100)
FLOW_MAP_BUDGETS = (1, 2, 4, 8)
FLOW_MAP_MODELS = ("meanflow", "shortcut", "scm")


def samplers(path, prediction="velocity"):
    """name -> (nfe(steps), run(field, x0, steps, key, cond)); ``nfe`` is each sampler's documented count."""
    from jaxgen.samplers import DDIM, EDM, RK4, DPMSolver, DPMSolverPP, Euler, Heun, UniPC, sample

    def run(solver, with_path=True):
        kw = dict(path=path, prediction=prediction) if with_path else {}
        return lambda f, x0, n, key, cond: sample(f, x0, solver, steps=n, cond=cond, **kw)

    # single-step DPM-Solver-k: the first and last steps are first order (lambda = -inf at t = 0, beta = 0 at 1)
    dpm_nfe = lambda k: lambda n: n if n <= 2 else k * (n - 2) + 2
    return {
        "euler": (lambda n: n, run(Euler(), with_path=False)),
        "heun": (lambda n: 2 * n, run(Heun(), with_path=False)),
        "rk4": (lambda n: 4 * n, run(RK4(), with_path=False)),
        "ddim": (lambda n: n, run(DDIM())),
        "dpm_solver_2": (dpm_nfe(2), run(DPMSolver(order=2))),
        "dpm_solver_3": (dpm_nfe(3), run(DPMSolver(order=3))),
        "dpm_solver++_2m": (lambda n: n, run(DPMSolverPP())),
        "dpm_solver++_3m": (lambda n: n, run(DPMSolverPP(order=3))),
        "unipc_2": (lambda n: n, run(UniPC(order=2))),
        "edm_heun": (lambda n: 2 * n - 1, run(EDM())),
    }


SELECTED: set | None = None  # --samplers: the samplers to run (None: all)


def _selected(name: str) -> bool:
    return SELECTED is None or name in SELECTED


def steps_within(nfe_of, budget):
    """The most steps whose NFE fits the budget (None if even one step does not)."""
    fits = [n for n in range(1, budget + 1) if nfe_of(n) <= budget]
    return max(fits) if fits else None


def run_table(name, field, x0, quality, path, cond=None):
    import jax

    rows = []
    for sname, (nfe_of, run) in samplers(path).items():
        if not _selected(sname):
            continue
        seen = set()
        for budget in BUDGETS:
            n = steps_within(nfe_of, budget)
            if not n or n in seen:
                continue
            seen.add(n)
            fn = jax.jit(lambda f_x0, key, n=n, run=run: run(field, f_x0, n, key, cond))
            t0 = time.perf_counter()
            try:
                res = fn(x0, jax.random.key(0))
                x = np.asarray(jax.block_until_ready(res.x))
            except Exception as err:  # report, don't hide: a sampler that fails at a budget is a finding
                print(f"[{name}] {sname} steps={n}: failed: {type(err).__name__}: {str(err)[:200]}")
                continue
            if int(res.nfe) != nfe_of(n):
                print(f"[{name}] {sname} steps={n}: reported NFE {int(res.nfe)} != documented {nfe_of(n)}")
            q = quality(x)
            rows.append({"model": name, "sampler": sname, "budget": budget, "steps": n, "nfe": int(res.nfe),
                         **q, "seconds": round(time.perf_counter() - t0, 2)})
            print(f"[{name}] {sname:16s} budget {budget:3d} steps {n:3d} NFE {int(res.nfe):3d}  " +
                  "  ".join(f"{k} {v:.4f}" for k, v in q.items()), flush=True)
    return rows


def flow_map_rows(model, sampler, f, x0, quality, cond=None):
    """Rows of a flow-map model ``f(x, r, t, **cond)`` at :data:`FLOW_MAP_BUDGETS` uniform jumps from ``x0``."""
    import jax

    from jaxgen.samplers import FlowMap, sample

    rows = []
    for n in FLOW_MAP_BUDGETS:
        t0 = time.perf_counter()
        res = jax.jit(lambda x, n=n: sample(f, x, FlowMap(), steps=n, cond=cond))(x0)
        x = np.asarray(jax.block_until_ready(res.x))
        q = quality(x)
        rows.append({"model": model, "sampler": sampler, "budget": n, "steps": n, "nfe": int(res.nfe), **q,
                     "seconds": round(time.perf_counter() - t0, 2)})
        print(f"[{model}] {sampler:16s} budget {n:3d} steps {n:3d} NFE {int(res.nfe):3d}  " +
              "  ".join(f"{k} {v:.4f}" for k, v in q.items()), flush=True)
    return rows


def bench_2d_flow_maps(args, x0, quality):
    """MeanFlow and a shortcut model trained from scratch on the 2-D data (FlowMapMLP of the flow model's width,
    ``--fm-steps`` Adam steps with a cosine decay, EMA 0.999), at 1-8 jumps."""
    import optax
    from flax import nnx

    from jaxgen.data.toy2d import moons
    from jaxgen.losses import meanflow_loss, meanflow_times, shortcut_loss
    from jaxgen.models import FlowMapMLP
    from jaxgen.training import Trainer

    losses = {"meanflow": meanflow_loss("linear", time_sampler=meanflow_times(equal_fraction=0.25), p=0.0),
              "shortcut": shortcut_loss("linear")}
    rows = []
    for name, loss in losses.items():
        if not _selected(name):
            continue
        net = FlowMapMLP(2, width=128, activation="silu", rngs=nnx.Rngs(0))
        tr = Trainer(net, loss, optax.adam(optax.cosine_decay_schedule(1e-3, args.fm_steps)),
                     data=lambda key: moons(key, 256), ema_decay=0.999)
        state, _ = tr.fit(tr.init(0), args.fm_steps, progress=False)
        rows += flow_map_rows("2d", f"{name} (from scratch)", tr.model(state, ema=True), x0, quality)
    if _selected("scm"):
        rows += bench_2d_scm(args, x0, quality)
    return rows


def bench_2d_scm(args, x0, quality):
    """sCT from scratch (TrigFlow consistency function around an MLP of the same width, the learned adaptive
    weighting, the data divided by its standard deviation), sampled by consistency jumps (uniform jump times) at
    1-8 NFE from the same noise (the prior of the scaled data is N(0, I) too), multiplied back."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from jaxgen.data.toy2d import moons
    from jaxgen.losses import scm_loss
    from jaxgen.models import ConsistencyFunction, MLPField
    from jaxgen.models.consistency import LogVariance
    from jaxgen.samplers import ConsistencyMultistep, sample
    from jaxgen.training import Trainer

    sd = float(jnp.std(moons(jax.random.key(7), 4096)))
    rngs = nnx.Rngs(0)
    model = ConsistencyFunction(MLPField(2, width=128, activation="silu", rngs=rngs), "cosine",
                                parameterization="trigflow", logvar=LogVariance(rngs=rngs))
    tr = Trainer(model, scm_loss("cosine", sigma_data=sd, warmup_steps=1000),
                 optax.adam(optax.cosine_decay_schedule(1e-3, args.fm_steps)), data=lambda key: moons(key, 256),
                 ema_decay=0.999)
    state, _ = tr.fit(tr.init(0), args.fm_steps, progress=False)
    f = tr.model(state, ema=True)
    rows = []
    for n in FLOW_MAP_BUDGETS:
        res = jax.jit(lambda x, n=n: sample(f, x, ConsistencyMultistep(), prediction="data", steps=n,
                                            key=jax.random.key(6)))(x0)
        q = quality(sd * np.asarray(res.x))
        rows.append({"model": "2d", "sampler": "scm (from scratch)", "budget": n, "steps": n, "nfe": int(res.nfe), **q,
                     "seconds": 0.0})
        print(f"[2d] scm (from scratch) budget {n:3d} NFE {int(res.nfe):3d}  " +
              "  ".join(f"{k} {v:.4f}" for k, v in q.items()), flush=True)
    return rows


def bench_2d(args):
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from jaxgen import metrics
    from jaxgen.losses import consistency_distillation_loss
    from jaxgen.models import ConsistencyFunction
    from jaxgen.data.toy2d import moons
    from jaxgen.losses import flow_matching_loss
    from jaxgen.models import MLPField
    from jaxgen.paths import GaussianPath
    from jaxgen.samplers import ConsistencyMultistep, sample
    from jaxgen.training import Trainer

    path = GaussianPath.from_name("linear")
    tr = Trainer(MLPField(2, width=128, rngs=nnx.Rngs(0)), flow_matching_loss(path), optax.adam(1e-3),
                 data=lambda key: moons(key, 256), ema_decay=0.999)
    state, _ = tr.fit(tr.init(0), args.steps, progress=False)
    field = tr.model(state, ema=True)
    field.eval()
    x0 = path.sample_prior(jax.random.key(1), (2048, 2))
    target = moons(jax.random.key(2), 2048)

    def quality(x):
        return {"sliced_w2": float(metrics.sliced_wasserstein(jnp.asarray(x), target, jax.random.key(3))),
                "energy_distance": float(metrics.energy_distance(jnp.asarray(x), target))}

    floor = quality(np.asarray(moons(jax.random.key(4), 2048)))
    print(f"[2d] data-vs-data floor: {floor}")
    rows = run_table("2d", field, x0, quality, path)
    rows += bench_2d_flow_maps(args, x0, quality)

    if not _selected("consistency"):
        return rows, floor
    # consistency distillation from the trained field (Heun teacher), 1 and 2 NFE
    sigma_data = float(jnp.std(moons(jax.random.key(7), 4096)))
    cm = ConsistencyFunction(MLPField(2, width=128, rngs=nnx.Rngs(5)), path, sigma_data=sigma_data)
    ctr = Trainer(cm, consistency_distillation_loss(path, field, num_scales=18, solver="heun"), optax.adam(1e-3),
                  data=lambda key: moons(key, 256), ema_decay=0.95, ema_warmup=False)
    cstate, _ = ctr.fit(ctr.init(0), args.cm_steps, progress=False)
    f = ctr.model(cstate)
    for ts, budget in (((0.0,), 1), ((0.0, 0.5), 2)):
        res = sample(f, x0, ConsistencyMultistep(), prediction="data", path=path, ts=ts + (1.0,), key=jax.random.key(6))
        q = quality(np.asarray(res.x))
        rows.append({"model": "2d", "sampler": "consistency (distilled)", "budget": budget, "steps": len(ts),
                     "nfe": int(res.nfe), **q, "seconds": 0.0})
        print(f"[2d] consistency      budget {budget:3d} NFE {int(res.nfe)}  " +
              "  ".join(f"{k} {v:.4f}" for k, v in q.items()))
    return rows, floor


def bench_digits(args):
    import jax
    import jax.numpy as jnp

    from experiments import images
    from jaxgen.evaluation import digits_report
    from jaxgen.fields import chunked_field, guided_field
    from jaxgen.paths import GaussianPath

    cfg, trainer, state, shape = images.load_run(args.digits)
    model = trainer.model(state, ema=trainer.ema_decay is not None)
    model.eval()
    path = GaussianPath.from_name(cfg.schedule)
    labels = jnp.asarray(np.repeat(np.arange(cfg.num_classes), args.per_class), jnp.int32)
    field = guided_field(chunked_field(model, 64), 2.0, null_label=cfg.num_classes)
    x0 = path.sample_prior(jax.random.key(1), (labels.shape[0],) + tuple(shape))
    clf, train_set, test_set = images._digits_classifier()

    def quality(x):
        r = digits_report(clf, np.clip(x, -1, 1), np.asarray(labels), test_set.images)
        return {"fd": float(r["fd"]), "accuracy": float(r["accuracy"])}

    # the same number of real training digits, scored the same way: what a perfect sampler would get
    pick = np.random.default_rng(0).choice(len(train_set.images), labels.shape[0], replace=False)
    floor = float(digits_report(clf, train_set.images[pick], None, test_set.images)["fd"])
    print(f"[digits] {labels.shape[0]} real training digits vs test digits: FD {floor:.2f}")

    rows = run_table("digits", field, x0, quality, path, cond={"y": labels})
    if args.meanflow and _selected("meanflow"):
        mcfg, mtrainer, mstate, _ = images.load_run(args.meanflow)
        if not images.is_flow_map(mcfg):
            raise SystemExit(f"--meanflow {args.meanflow}: not a flow-map run (objective {mcfg.objective!r}); train "
                             "one with `jaxgen train digits_meanflow`.")
        fm = mtrainer.model(mstate, ema=mtrainer.ema_decay is not None)
        fm.eval()
        cond = {"y": labels, "w": jnp.full(labels.shape, 2.0)}
        rows += flow_map_rows("digits", f"meanflow (from scratch, {int(mstate.step)} steps)", fm, x0, quality, cond)

    if not _selected("consistency"):
        return rows, floor
    # consistency distillation of the same guided field (experiments/distill.py; resumes if already run)
    from experiments import configs, distill
    from jaxgen.samplers import ConsistencyMultistep, sample

    cd_out = args.cd_out or os.path.join(args.out, "digits_cd")
    cd_cfg = configs.get_config("digits_cd", [f"steps={args.cd_steps}", "guidance=2.0", f"teacher={args.digits}"])
    distill.train(cd_cfg, cd_out, progress=False)
    f, _, _, _ = distill.load_run(cd_out)
    for ts in ((0.0,), (0.0, 0.5)):
        res = jax.jit(lambda x, y, ts=ts: sample(f, x, ConsistencyMultistep(), prediction="data", path=path,
                                                 ts=ts + (1.0,), key=jax.random.key(6), cond={"y": y}))(x0, labels)
        q = quality(np.asarray(res.x))
        rows.append({"model": "digits", "sampler": "consistency (distilled)", "budget": len(ts), "steps": len(ts),
                     "nfe": int(res.nfe), **q, "seconds": 0.0})
        print(f"[digits] consistency      budget {len(ts):3d} NFE {int(res.nfe)}  " +
              "  ".join(f"{k} {v:.4f}" for k, v in q.items()), flush=True)
    return rows, floor


def plot(rows, out, floors=None):
    """Quality against NFE per model (log-log); ``floors`` maps a model to its data-vs-data value (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.2), squeeze=False)
    for ax, m in zip(axes[0], models):
        metric = "sliced_w2" if m == "2d" else "fd"
        for s in dict.fromkeys(r["sampler"] for r in rows if r["model"] == m):
            pts = sorted((r["nfe"], r[metric]) for r in rows if r["model"] == m and r["sampler"] == s)
            ax.plot(*zip(*pts), "o-" if "consistency" not in s else "s", label=s)
        if floors and m in floors:
            ax.axhline(floors[m], color="gray", ls="--", lw=1, label="data vs data (one draw)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("NFE")
        ax.set_ylabel(metric)
        ax.set_title(f"{m}: quality vs network evaluations")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "nfe_quality.png"), dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/bench_nfe")
    p.add_argument("--steps", type=int, default=20_000, help="2-D flow-matching training steps")
    p.add_argument("--cm-steps", type=int, default=3000, help="consistency-distillation steps")
    p.add_argument("--per-class", type=int, default=50, help="digits samples per class")
    p.add_argument("--digits", default=None, help="a digits run directory (from ./run.sh) to benchmark too")
    p.add_argument("--cd-steps", type=int, default=2000, help="digits consistency-distillation steps")
    p.add_argument("--fm-steps", type=int, default=10_000, help="2-D MeanFlow / shortcut training steps")
    p.add_argument("--meanflow", default=None, help="a digits MeanFlow run (jaxgen train digits_meanflow) to add")
    p.add_argument("--cd-out", default=None, help="digits distillation run directory (default: OUT/digits_cd; "
                                                  "an existing run there is resumed, not redone)")
    p.add_argument("--samplers", default=None,
                   help="comma-separated samplers to run (e.g. dpm_solver_2,consistency); their rows replace those "
                        "of an existing OUT/nfe_table.json, the other rows are kept")
    a = p.parse_args(argv)
    global SELECTED
    SELECTED = None if a.samplers is None else {n.strip() for n in a.samplers.split(",") if n.strip()}
    if SELECTED is not None:
        known = set(samplers("linear")) | {"consistency", *FLOW_MAP_MODELS}
        if SELECTED - known:
            p.error(f"unknown samplers {sorted(SELECTED - known)}; choose from {sorted(known)}")
    os.makedirs(a.out, exist_ok=True)
    rows, floor = bench_2d(a)
    digits_floor = None
    if a.digits:
        digits_rows, digits_floor = bench_digits(a)
        rows += digits_rows
    previous = os.path.join(a.out, "nfe_table.json")
    if SELECTED is not None and os.path.exists(previous):
        kept = [r for r in json.load(open(previous))["rows"] if r["sampler"].split(" ")[0] not in SELECTED]
        rows = kept + rows
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(os.path.join(a.out, "nfe_table.csv"), "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(a.out, "nfe_table.json"), "w") as fh:
        json.dump({"rows": rows, "floor_2d": floor, "floor_digits_fd": digits_floor}, fh, indent=2)
    plot(rows, a.out, {"2d": floor["sliced_w2"], **({"digits": digits_floor} if a.digits else {})})
    print(f"wrote {a.out}/nfe_table.csv, nfe_table.json, nfe_quality.png")


if __name__ == "__main__":
    main()
