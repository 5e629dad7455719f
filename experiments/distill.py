"""Consistency distillation of a trained image run: one-network-call samples from a flow-matching teacher.

``jaxgen train digits_cd --set teacher=runs/digits_cfm --out runs/digits_cd`` loads the teacher run (``./run.sh``'s
output), builds its guided velocity field ``u_w = (1 - w) u(x | null) + w u(x | y)`` at the teacher's
``eval_guidance`` ``w``, and trains a class-conditional consistency function for that field's probability-flow ODE by
consistency distillation (Song et al. 2023, Algorithm 2; :mod:`jaxgen.losses.consistency`) with the EMA target of
:class:`jaxgen.training.Trainer`.

The student is the teacher's U-Net, initialised with the teacher's weights, in the *denoiser* parameterisation
``f(x, t) = z_hat(x, t)`` (:class:`jaxgen.models.ConsistencyFunction` with ``parameterization="denoiser"``): at
initialisation ``f`` is the teacher's own one-step Euler jump ``x + (1 - t) u(x, t)`` on the linear path, i.e. the
posterior mean ``E[z | x_t]``, and distillation sharpens it into the end point of the guided ODE.

The run directory holds, besides the shared files (:mod:`experiments.common`), ``samples_{k}step.png`` for every
sampling schedule, ``report.md``/``report.json`` (label accuracy and the digits classifier's Fréchet distance of the
1-, 2-, ... step samples next to the teacher's Euler at the same NFE) and ``samples.npy``/``labels.npy`` (the one-step
samples).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import ClassVar

import numpy as np

from experiments import common


@dataclasses.dataclass
class DistillConfig:
    """Consistency distillation of a trained image run (:mod:`experiments.distill`)."""

    experiment: ClassVar[str] = "distill"
    name: str = "digits_cd"
    teacher: str = "runs/digits_cfm"  # the run directory of the teacher (`jaxgen train digits_cfm`)
    guidance: float | None = None  # w of the teacher's guided field; None: the teacher run's eval_guidance
    # the student: the teacher's U-Net, initialised from its weights, f = z_hat(x, t) ("denoiser") or the
    # paper's skip parameterisation ("edm")
    init_from_teacher: bool = True
    parameterization: str = "denoiser"
    sigma_data: float = 0.5
    # consistency distillation (Song et al. 2023, Algorithm 2)
    num_scales: int = 18  # N: the teacher takes one ODE step between neighbouring times
    solver: str = "heun"
    distance: str = "l2"
    rho: float = 1.0  # time grid exponent (1: uniform in t)
    target_decay: float = 0.95  # mu of the EMA target
    # optimisation
    steps: int = 2000
    batch_size: int = 64
    learning_rate: float = 1e-4
    clip_norm: float = 1.0
    seed: int = 0
    checkpoint_every: int = 500
    checked: bool = True  # jaxgen's checked mode: each batch checked on the device (finite, labels in range)
    # sampling and evaluation: the jump times of each row (noise at t = 0; the data end t = 1 follows)
    samples_per_class: int = 50
    sample_ts: tuple = ((0.0,), (0.0, 0.5))


# Settings that do not enter the compiled training step (they may change when a run is resumed).
FREE_FIELDS = frozenset({"steps", "checkpoint_every", "samples_per_class", "sample_ts", "checked"})


def check_config(cfg: DistillConfig) -> None:
    """Clear errors for a bad config, before any work (and before anything is written)."""
    from jaxgen.losses.consistency import DISTANCES, SOLVERS
    from jaxgen.models.consistency import PARAMETERIZATIONS

    common.check_fields(cfg, {
        "steps": lambda v: v >= 0, "batch_size": lambda v: v >= 1, "num_scales": lambda v: v >= 2,
        "solver": lambda v: v in SOLVERS, "distance": lambda v: v in DISTANCES, "target_decay": lambda v: 0 <= v < 1,
        "parameterization": lambda v: v in PARAMETERIZATIONS, "checkpoint_every": lambda v: v >= 1,
        "samples_per_class": lambda v: v >= 1, "learning_rate": lambda v: v > 0,
        "sample_ts": lambda v: len(v) >= 1 and all(len(ts) >= 1 and all(0 <= s < 1 for s in ts) and list(ts) == sorted(set(ts)) for ts in v),
    }, {
        "steps": "must be >= 0", "batch_size": "must be >= 1", "num_scales": "must be >= 2",
        "solver": f"use one of {SOLVERS}", "distance": f"use one of {DISTANCES}", "target_decay": "must be in [0, 1)",
        "parameterization": f"use one of {PARAMETERIZATIONS}", "checkpoint_every": "must be >= 1",
        "samples_per_class": "must be >= 1", "learning_rate": "must be > 0",
        "sample_ts": "give increasing jump times in [0, 1) per row, rows separated by |, e.g. sample_ts=0|0,0.5",
    })
    common.read_config(common.run_dir_of(cfg.teacher))  # the teacher run exists
    common.check_batch_size(cfg.batch_size)


def build_student(cfg: DistillConfig, teacher_cfg, teacher, shape):
    """The consistency function: the teacher's network (weights copied unless ``init_from_teacher=False``)."""
    from flax import nnx

    from experiments.images import build_model
    from jaxgen.models import ConsistencyFunction

    net = nnx.clone(teacher) if cfg.init_from_teacher else build_model(teacher_cfg, shape, cfg.seed)
    net.train()
    return ConsistencyFunction(net, teacher_cfg.schedule, parameterization=cfg.parameterization,
                               prediction=teacher_cfg.prediction, sigma_data=cfg.sigma_data)


def build_trainer(cfg: DistillConfig):
    """``(trainer, teacher_cfg, teacher, shape, w)`` for distilling the run ``cfg.teacher`` (``teacher``: its
    network, in eval mode; the distilled field is ``guided_field(teacher, w)``).

    Cached per process on the teacher's directory and latest checkpoint and on the settings that enter the
    training step, so that resuming or re-evaluating in the same process reuses the compiled programs.
    """
    from jaxgen.training import Checkpointer

    teacher_dir = common.run_dir_of(cfg.teacher)
    teacher_step = None
    if os.path.isdir(os.path.join(teacher_dir, "checkpoints")):
        with Checkpointer(os.path.join(teacher_dir, "checkpoints")) as ckpt:
            teacher_step = ckpt.latest_step()
    record = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in FREE_FIELDS}
    record["teacher"] = teacher_dir
    return _build_trainer(json.dumps(record, sort_keys=True), teacher_step)


@functools.lru_cache(maxsize=4)
def _build_trainer(cfg_key: str, teacher_step):
    import optax

    from experiments import images
    from jaxgen.data.images import device_sampler
    from jaxgen.fields import guided_field
    from jaxgen.losses import consistency_distillation_loss
    from jaxgen.training import Trainer

    cfg = common.config_from_record(DistillConfig, json.loads(cfg_key))
    tcfg, ttrainer, tstate, shape = images.load_run(cfg.teacher, step=teacher_step)
    teacher = ttrainer.model(tstate, ema=ttrainer.ema_decay is not None)
    teacher.eval()
    w = tcfg.eval_guidance if cfg.guidance is None else cfg.guidance
    teacher_field = guided_field(teacher, w, null_label=tcfg.num_classes)
    loss = consistency_distillation_loss(tcfg.schedule, teacher_field, num_scales=cfg.num_scales, solver=cfg.solver,
                                         distance=cfg.distance, teacher_prediction=tcfg.prediction, rho=cfg.rho)
    opt = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), optax.adam(cfg.learning_rate)) if cfg.clip_norm \
        else optax.adam(cfg.learning_rate)
    student = build_student(cfg, tcfg, teacher, shape)
    train_set = images.load_dataset(tcfg, "train")
    # the EMA of the student's weights is the paper's target network theta^-, with mu = target_decay
    trainer = Trainer(student, loss, opt, data=device_sampler(train_set, cfg.batch_size), ema_decay=cfg.target_decay,
                      ema_warmup=False, checked=cfg.checked, mesh=common.mesh())
    return trainer, tcfg, teacher, shape, w


def train(cfg: DistillConfig, out: str, *, progress: bool = True) -> dict:
    """Distil (resuming from ``out/checkpoints``), then sample, evaluate and write the report."""
    import jax

    check_config(cfg)
    cfg = dataclasses.replace(cfg, teacher=common.run_dir_of(cfg.teacher))
    out = os.path.abspath(out)
    common.check_resume(out, cfg, FREE_FIELDS)
    trainer, tcfg, teacher, shape, w = build_trainer(cfg)
    common.write_config(out, cfg)
    state, _, seconds = common.train(trainer, trainer.init(jax.random.key(cfg.seed)), out=out, steps=cfg.steps,
                                     checkpoint_every=cfg.checkpoint_every, chunk=min(cfg.checkpoint_every, 100),
                                     progress=progress, config=common.config_record(cfg))
    report = evaluate(cfg, out, trainer, state, tcfg, teacher, shape, w)
    report["train_seconds_this_session"] = round(seconds, 1)
    common.write_json(os.path.join(out, "report.json"), report)
    return report


def _restore(out: str, step: int | None):
    """``(trainer, state, cfg, teacher_cfg, teacher, shape, w)`` of a distillation run."""
    import jax

    from jaxgen.training import Checkpointer

    out = common.run_dir_of(out)
    cfg = common.config_from_record(DistillConfig, common.read_config(out))
    trainer, tcfg, teacher, shape, w = build_trainer(cfg)
    with Checkpointer(os.path.join(out, "checkpoints")) as ckpt:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint in {out}/checkpoints yet.")
        state = ckpt.restore(jax.eval_shape(trainer.init, jax.random.key(cfg.seed)), step=step)  # allocates nothing
    return trainer, state, cfg, tcfg, teacher, shape, w


def load_run(out: str, *, step: int | None = None):
    """Restore a distillation run: ``(f, cfg, teacher_cfg, shape)`` with ``f`` the target network theta^-."""
    trainer, state, cfg, tcfg, _, shape, _ = _restore(out, step)
    f = trainer.model(state, ema=True)
    f.eval()
    return f, cfg, tcfg, shape


@functools.lru_cache(maxsize=16)
def _compiled_sampler(schedule: str, spec: str, grid: tuple | None, steps: int | None, shape: tuple):
    import jax

    from jaxgen.paths import GaussianPath
    from jaxgen.samplers import get_solver, sample

    path = GaussianPath.from_name(schedule)
    solver = get_solver(spec)

    def run(f, labels, key):
        k0, k1 = jax.random.split(key)  # k0: the same noise as experiments.images.generate with this key
        x0 = path.sample_prior(k0, (labels.shape[0],) + shape)
        res = sample(f, x0, solver, prediction="data", path=path, ts=grid, steps=None if grid else steps, key=k1,
                     cond={"y": labels})
        return res.x, res.nfe

    return jax.jit(run)


def sample(f, tcfg, labels, shape, key, *, ts=None, sampler: str = "consistency", steps: int | None = None):
    """Samples of the consistency function for ``labels``: consistency sampling (Algorithm 1) at the jump times
    ``ts`` (or ``steps`` uniform jumps), or any sampler by name with ``f`` as a data prediction; returns (images in
    [-1, 1], NFE). The noise is the same draw as :func:`experiments.images.generate`'s with the same ``key``, so the
    teacher's samplers can be compared on identical starting points."""
    import jax.numpy as jnp

    f.eval()
    grid = None if ts is None else tuple(float(s) for s in ts) + (float(f.t_end),)  # the jumps, then the data end
    x, nfe = _compiled_sampler(tcfg.schedule, sampler, grid, steps, tuple(shape))(f, jnp.asarray(labels, jnp.int32), key)
    return np.clip(np.asarray(x), -1.0, 1.0), int(nfe)


def evaluate(cfg: DistillConfig, out: str, trainer, state, tcfg, teacher, shape, w) -> dict:
    """Samples of every schedule in ``cfg.sample_ts`` and the teacher's Euler at the same NFE, evaluated."""
    import jax

    from experiments.images import evaluate_samples, generate

    f = trainer.model(state, ema=True)  # theta^-, the target network (Song et al. 2023 sample with it)
    labels = np.repeat(np.arange(tcfg.num_classes), cfg.samples_per_class)
    report = {"teacher": cfg.teacher, "step": int(state.step), "guidance": w, "rows": []}
    per_row = min(cfg.samples_per_class, 12)
    grid_idx = np.concatenate([np.arange(k * cfg.samples_per_class, k * cfg.samples_per_class + per_row)
                               for k in range(tcfg.num_classes)])
    key = jax.random.key(cfg.seed + 3)
    for i, ts in enumerate(cfg.sample_ts):
        imgs, nfe = sample(f, tcfg, labels, shape, key, ts=ts)
        if i == 0:
            np.save(os.path.join(out, "samples.npy"), imgs.astype(np.float32))
            np.save(os.path.join(out, "labels.npy"), labels.astype(np.int32))
        common.save_grid(imgs[grid_idx], os.path.join(out, f"samples_{nfe}step.png"), nrow=per_row,
                         row_labels=list(range(tcfg.num_classes)),
                         title=f"consistency model, {nfe} step(s) ts={list(ts)}, w = {w:g}")
        teacher_imgs, _ = generate(teacher, tcfg, labels, w, key, sampler="euler", steps=nfe, shape=shape)
        ours = evaluate_samples(tcfg, imgs, labels)
        ref = evaluate_samples(tcfg, teacher_imgs, labels)
        keep = ("fd", "accuracy", "pixel_std_within_class")
        report["rows"].append({"sampler": "consistency", "ts": [float(s) for s in ts], "nfe": nfe,
                               **{k: ours[k] for k in keep if k in ours},
                               "teacher_euler_same_nfe": {k: ref[k] for k in keep if k in ref}})
    _write_markdown(report, os.path.join(out, "report.md"))
    return report


def sample_command(run_dir: str, args) -> str:
    """``jaxgen sample`` on a distillation run: consistency samples (``--steps`` jumps, default the first row of
    ``sample_ts``) or any ``--sampler`` with the student as a data prediction."""
    import jax

    f, cfg, tcfg, shape = load_run(run_dir, step=args.step)
    labels, lab = common.sample_labels(args, tcfg.num_classes)
    sampler = args.sampler or "consistency"
    ts = cfg.sample_ts[0] if sampler == "consistency" and not args.steps else None
    imgs, nfe = sample(f, tcfg, lab, shape, jax.random.key(args.seed), ts=ts, sampler=sampler,
                       steps=args.steps or (None if ts else 1))
    return common.write_samples(imgs, lab, args.out, nrow=min(args.num, 16),
                                title=f"labels {labels}, {sampler} (NFE {nfe})", what=f"{sampler}, NFE {nfe}")


def evaluate_command(run_dir: str, args) -> str:
    """``jaxgen evaluate`` on a distillation run: the report of every sampling schedule."""
    trainer, state, cfg, tcfg, teacher, shape, w = _restore(run_dir, args.step)
    out = args.out or common.run_dir_of(run_dir)
    os.makedirs(out, exist_ok=True)
    report = evaluate(cfg, out, trainer, state, tcfg, teacher, shape, w)
    common.write_json(os.path.join(out, "report.json"), report)
    with open(os.path.join(out, "report.md")) as fh:
        return fh.read()


def _write_markdown(report: dict, path: str):
    lines = [f"# Consistency distillation at step {report['step']}", "",
             f"Teacher {report['teacher']}, guided field w = {report['guidance']:g}.", "",
             "| sampler | NFE | Fréchet distance | label accuracy | teacher Euler, same NFE: FD | accuracy |",
             "|---|---|---|---|---|---|"]
    for r in report["rows"]:
        t = r["teacher_euler_same_nfe"]
        lines.append(f"| consistency ts={r['ts']} | {r['nfe']} | {r.get('fd', float('nan')):.2f} | "
                     f"{r.get('accuracy', float('nan')):.3f} | {t.get('fd', float('nan')):.2f} | "
                     f"{t.get('accuracy', float('nan')):.3f} |")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
