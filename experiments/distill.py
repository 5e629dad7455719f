"""Consistency distillation of a trained image run: one-network-call samples from a flow-matching teacher.

``jaxgen distill --teacher runs/digits_cfm --out runs/digits_cd`` loads the teacher run (``./run.sh``'s
output), builds its guided velocity field ``u_w = (1 - w) u(x | null) + w u(x | y)`` at the teacher's
``eval_guidance`` ``w``, and trains a class-conditional consistency function for that field's
probability-flow ODE by consistency distillation (Song et al. 2023, Algorithm 2; :mod:`jaxgen.losses.consistency`).

The student is the teacher's U-Net, initialised with the teacher's weights, in the *denoiser*
parameterisation ``f(x, t) = z_hat(x, t)`` (:class:`jaxgen.models.ConsistencyFunction` with
``parameterization="denoiser"``): at initialisation ``f`` is the teacher's own one-step Euler jump
``x + (1 - t) u(x, t)`` on the linear path, i.e. the posterior mean ``E[z | x_t]``, and distillation
sharpens it into the end point of the guided ODE.

A run directory holds ``config.json``, ``checkpoints/`` (training resumes from the latest one),
``metrics.jsonl``, and after training ``samples_{k}step.png`` for every sampling schedule, ``loss.png``,
``report.md``/``report.json`` (label accuracy and the digits classifier's Fréchet distance of the
1-, 2-, ... step samples next to the teacher's Euler at the same NFE) and ``samples.npy``/``labels.npy``
(the one-step samples).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time

import numpy as np

from experiments.configs import DistillConfig


def build_student(cfg: DistillConfig, teacher_cfg, teacher, shape):
    """The consistency function: the teacher's network (weights copied unless ``init_from_teacher=False``)."""
    from flax import nnx

    from experiments.images import build_model
    from jaxgen.models import ConsistencyFunction

    net = nnx.clone(teacher) if cfg.init_from_teacher else build_model(teacher_cfg, shape, cfg.seed)
    net.train()
    return ConsistencyFunction(net, teacher_cfg.schedule, parameterization=cfg.parameterization,
                               prediction=teacher_cfg.prediction, sigma_data=cfg.sigma_data)


# Settings that do not enter the compiled training step (they may change when a run is resumed).
FREE_FIELDS = frozenset({"steps", "checkpoint_every", "samples_per_class", "sample_ts"})


def build_trainer(cfg: DistillConfig, teacher_dir: str):
    """``(trainer, teacher_cfg, teacher, shape, w)`` for distilling the run in ``teacher_dir`` (``teacher``: its
    network, in eval mode; the distilled field is ``guided_field(teacher, w)``).

    Cached per process on the teacher's directory and latest checkpoint and on the settings that enter the
    training step, so that resuming or re-evaluating in the same process reuses the compiled programs.
    """
    from jaxgen.training import Checkpointer

    teacher_dir = os.path.abspath(teacher_dir)
    teacher_step = None
    if os.path.isdir(os.path.join(teacher_dir, "checkpoints")):
        with Checkpointer(os.path.join(teacher_dir, "checkpoints")) as ckpt:
            teacher_step = ckpt.latest_step()
    key = json.dumps({k: v for k, v in dataclasses.asdict(cfg).items() if k not in FREE_FIELDS}, sort_keys=True)
    return _build_trainer(key, teacher_dir, teacher_step)


@functools.lru_cache(maxsize=4)
def _build_trainer(cfg_key: str, teacher_dir: str, teacher_step):
    import optax

    from experiments import images
    from jaxgen.losses import consistency_distillation_loss
    from jaxgen.training import Trainer
    from jaxgen.data.images import device_sampler
    from jaxgen.fields import guided_field

    cfg = DistillConfig(**{k: _tuples(v) for k, v in json.loads(cfg_key).items()})
    tcfg, ttrainer, tstate, shape = images.load_run(teacher_dir, step=teacher_step)
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
    trainer = Trainer(student, loss, opt, data=device_sampler(train_set, cfg.batch_size), ema_decay=cfg.target_decay,
                      ema_warmup=False)
    return trainer, tcfg, teacher, shape, w


def _check_resume(out: str, cfg: DistillConfig, teacher_dir: str):
    cfg_path = os.path.join(out, "config.json")
    record = {**dataclasses.asdict(cfg), "teacher": os.path.abspath(teacher_dir)}
    if os.path.exists(cfg_path):
        saved = json.load(open(cfg_path))
        changed = sorted(k for k in record if k not in FREE_FIELDS and json.loads(json.dumps(record[k])) != saved.get(k))
        if changed:
            raise ValueError(f"{out} holds a distillation run with different settings (differs in "
                             f"{', '.join(changed)}); resume it with the same settings or choose another --out.")
    with open(cfg_path, "w") as fh:
        json.dump(record, fh, indent=2)


def distill(cfg: DistillConfig, teacher_dir: str, out: str, *, progress: bool = True) -> dict:
    """Distil (resuming from ``out/checkpoints``), then sample, evaluate and write the report."""
    import jax

    from experiments.images import _plot_loss
    from jaxgen.training import Checkpointer, Checkpointing, MetricWriter

    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    _check_resume(out, cfg, teacher_dir)
    trainer, tcfg, teacher, shape, w = build_trainer(cfg, teacher_dir)
    state = trainer.init(jax.random.key(cfg.seed))
    writer = MetricWriter(out)
    t_start = time.perf_counter()

    def on_chunk(st, chunk_losses):
        writer.write(int(st.step), loss=float(np.mean(chunk_losses)), seconds=round(time.perf_counter() - t_start, 2))

    with Checkpointer(os.path.join(out, "checkpoints"), max_to_keep=3) as ckpt:
        try:
            state = ckpt.restore(state, missing_ok=True)
            state, losses = trainer.fit(state, until_step=cfg.steps, chunk=min(cfg.checkpoint_every, 100),
                                        progress=progress,
                                        callbacks=[Checkpointing(ckpt, every=cfg.checkpoint_every), on_chunk])
        finally:
            writer.close()
    seconds = time.perf_counter() - t_start
    if len(losses):
        np.save(os.path.join(out, "losses.npy"), np.asarray(losses))
        _plot_loss(np.asarray(losses), os.path.join(out, "loss.png"))
    report = evaluate(cfg, out, trainer, state, tcfg, teacher, shape, w)
    report["train_seconds_this_session"] = round(seconds, 1)
    with open(os.path.join(out, "report.json"), "w") as fh:
        json.dump(report, fh, indent=2)
    return report


def load_run(out: str, *, step: int | None = None):
    """Restore a distillation run: ``(f, cfg, teacher_cfg, shape)`` with ``f`` the target network theta^-."""
    import jax

    from jaxgen.training import Checkpointer

    cfg_path = os.path.join(os.path.abspath(out), "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{out} is not a distillation run directory (no config.json); pass the --out folder "
                                "of `jaxgen distill`.")
    raw = json.load(open(cfg_path))
    teacher_dir = raw.pop("teacher")
    cfg = DistillConfig(**{k: _tuples(v) for k, v in raw.items()})
    trainer, tcfg, _, shape, _ = build_trainer(cfg, teacher_dir)
    with Checkpointer(os.path.join(out, "checkpoints")) as ckpt:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint in {out}/checkpoints yet.")
        state = ckpt.restore(trainer.init(jax.random.key(cfg.seed)), step=step)
    f = trainer.model(state, ema=True)
    f.eval()
    return f, cfg, tcfg, shape


def _tuples(v):
    return tuple(_tuples(u) for u in v) if isinstance(v, list) else v


@functools.lru_cache(maxsize=16)
def _compiled_sampler(schedule: str, ts: tuple, shape: tuple):
    import jax

    from jaxgen.paths import GaussianPath
    from jaxgen.samplers import ConsistencyMultistep, sample

    path = GaussianPath.from_name(schedule)

    def run(f, labels, key):
        k0, k1 = jax.random.split(key)  # k0: the same noise as experiments.images.generate with this key
        x0 = path.sample_prior(k0, (labels.shape[0],) + shape)
        grid = tuple(ts) + (f.t_end,)  # the jump times, then the data end
        res = sample(f, x0, ConsistencyMultistep(), prediction="data", path=path, ts=grid, key=k1, cond={"y": labels})
        return res.x, res.nfe

    return jax.jit(run)


def sample(f, tcfg, labels, shape, ts, key):
    """Consistency samples (Algorithm 1) for ``labels`` at the times ``ts``; returns (images in [-1, 1], NFE).

    The noise is the same draw as :func:`experiments.images.generate`'s with the same ``key``, so the teacher's
    samplers can be compared on identical starting points."""
    import jax.numpy as jnp

    f.eval()
    x, nfe = _compiled_sampler(tcfg.schedule, tuple(float(s) for s in ts), tuple(shape))(
        f, jnp.asarray(labels, jnp.int32), key)
    return np.clip(np.asarray(x), -1.0, 1.0), int(nfe)


def evaluate(cfg: DistillConfig, out: str, trainer, state, tcfg, teacher, shape, w) -> dict:
    """Samples of every schedule in ``cfg.sample_ts`` and the teacher's Euler at the same NFE, evaluated."""
    import jax

    from experiments.images import evaluate_samples, generate, save_grid

    f = trainer.model(state, ema=True)  # theta^-, the target network (Song et al. 2023 sample with it)
    labels = np.repeat(np.arange(tcfg.num_classes), cfg.samples_per_class)
    report = {"teacher": json.load(open(os.path.join(out, "config.json")))["teacher"], "step": int(state.step),
              "guidance": w, "rows": []}
    per_row = min(cfg.samples_per_class, 12)
    grid_idx = np.concatenate([np.arange(k * cfg.samples_per_class, k * cfg.samples_per_class + per_row)
                               for k in range(tcfg.num_classes)])
    key = jax.random.key(cfg.seed + 3)
    for i, ts in enumerate(cfg.sample_ts):
        imgs, nfe = sample(f, tcfg, labels, shape, ts, key)
        if i == 0:
            np.save(os.path.join(out, "samples.npy"), imgs.astype(np.float32))
            np.save(os.path.join(out, "labels.npy"), labels.astype(np.int32))
        save_grid(imgs[grid_idx], os.path.join(out, f"samples_{nfe}step.png"), nrow=per_row,
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
