"""What every experiment shares: its run directory, resumable training with logs, plots and reports.

A run directory holds ``config.json`` (the experiment's config, with ``"experiment"`` naming its module),
``checkpoints/`` (training resumes from the latest one), ``metrics.jsonl`` (and ``tensorboard/`` when
``tensorboardX`` is installed), ``losses.npy``/``loss.png``, and the experiment's samples and reports.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Iterable

import numpy as np


def config_record(cfg) -> dict:
    """The JSON record of a config: its fields and ``"experiment"`` (the module that runs it)."""
    return {"experiment": cfg.experiment, **json.loads(json.dumps(dataclasses.asdict(cfg)))}


def check_resume(out: str, cfg, free_fields: Iterable[str]) -> None:
    """Refuse a run directory that holds a run of another configuration (the fields outside ``free_fields``, those
    that enter training, must be equal)."""
    path = os.path.join(out, "config.json")
    if not os.path.exists(path):
        return
    with open(path) as fh:
        saved = json.load(fh)
    record = config_record(cfg)
    defaults = config_record(type(cfg)())
    free = set(free_fields) | {"name"}
    changed = sorted(k for k in record if k not in free and saved.get(k, defaults.get(k)) != record[k])
    if changed:
        raise ValueError(f"{out} holds a run with a different configuration ({path}; differs in {', '.join(changed)}); "
                         "resume it with the same config or choose another --out directory.")


def mesh():
    """The data-parallel mesh over every device of every process, or None on one device (the single-device
    program)."""
    import jax

    from jaxgen.training import data_mesh

    return data_mesh() if jax.device_count() > 1 else None


def check_batch_size(batch_size: int, name: str = "batch_size") -> None:
    """A clear error, before any work, for a batch that does not split over the devices."""
    import jax

    from jaxgen.training.parallel import check_batch_divisible

    check_batch_divisible(batch_size, jax.device_count(), name=f"config field {name}")


def writes() -> bool:
    """Whether this process writes files and prints (process 0 of a multi-process run, or the only one)."""
    from jaxgen.training import is_main_process

    return is_main_process()


def write_config(out: str, cfg) -> None:
    if not writes():
        return
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as fh:
        json.dump(config_record(cfg), fh, indent=2)


def read_config(run_dir: str) -> dict:
    """The ``config.json`` of a run directory (given directly or as its ``checkpoints`` folder)."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{run_dir} is not a jaxgen run directory (no config.json); pass the --out folder of "
                                "`jaxgen train`.")
    with open(path) as fh:
        raw = json.load(fh)
    raw.setdefault("experiment", "images")  # runs written before configs named their experiment
    return raw


def run_dir_of(path: str) -> str:
    path = os.path.abspath(path).rstrip("/")
    return os.path.dirname(path) if os.path.basename(path) == "checkpoints" else path


def config_from_record(cls, raw: dict):
    """Rebuild a config dataclass from its JSON record (lists back to tuples; unknown keys dropped)."""
    def tuples(v):
        return tuple(tuples(u) for u in v) if isinstance(v, list) else v

    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: tuples(v) for k, v in raw.items() if k in names})


def train(trainer, state, *, out: str, steps: int, checkpoint_every: int, keep_checkpoints: int = 3,
          chunk: int = 500, progress: bool = True, config=None, callbacks=()) -> tuple[Any, np.ndarray, float]:
    """Resume from ``out/checkpoints`` and train to step ``steps``, with checkpoints every ``checkpoint_every`` steps,
    ``metrics.jsonl`` (and TensorBoard) logs and the given callbacks; returns ``(state, losses, seconds)``.

    The losses of this call are saved as ``losses.npy`` and plotted to ``loss.png`` (those of the whole run, read back
    from ``metrics.jsonl``, when this call trained nothing)."""
    from jaxgen.training import Checkpointer, Checkpointing, MetricLogger, MetricWriter

    t_start = time.perf_counter()
    with Checkpointer(os.path.join(out, "checkpoints"), max_to_keep=keep_checkpoints) as ckpt, \
            MetricWriter(out) as writer:
        state = ckpt.restore(state, missing_ok=True)
        state, losses = trainer.fit(state, until_step=steps, chunk=chunk, progress=progress,
                                    callbacks=[Checkpointing(ckpt, every=checkpoint_every, config=config),
                                               MetricLogger(writer), *callbacks])
    seconds = time.perf_counter() - t_start
    log_path = os.path.join(out, "metrics.jsonl")
    if not writes():
        return state, losses, seconds
    if len(losses):
        np.save(os.path.join(out, "losses.npy"), np.asarray(losses))
        plot_loss(np.asarray(losses), os.path.join(out, "loss.png"))
    elif os.path.exists(log_path):
        from jaxgen.training import read_jsonl

        logged = [r["loss"] for r in read_jsonl(log_path) if isinstance(r.get("loss"), float)]
        if logged:
            plot_loss(np.asarray(logged), os.path.join(out, "loss.png"))
    return state, losses, seconds


def plot_loss(losses, path: str, *, ylabel: str = "training loss") -> None:
    if not writes():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = np.asarray(losses).reshape(len(losses), -1)[:, 0]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(losses, color="lightsteelblue", lw=0.5, label="per step")
    w = max(1, len(losses) // 50)
    if len(losses) > w:
        ax.plot(np.arange(w - 1, len(losses)), np.convolve(losses, np.ones(w) / w, mode="valid"), color="navy",
                label=f"moving average ({w})")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if np.all(losses > 0):
        ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_grid(images, path: str, *, nrow: int, title: str | None = None, row_labels=None) -> None:
    """Save images ``(N, H, W, C)`` in [-1, 1] as a PNG grid with ``nrow`` images per row."""
    if not writes():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = (np.asarray(images) + 1.0) / 2.0
    n, h, w, c = images.shape
    ncol = nrow
    rows = int(np.ceil(n / ncol))
    pad = 1
    canvas = np.ones((rows * (h + pad) + pad, ncol * (w + pad) + pad, c), np.float32)
    for i in range(n):
        r, q = divmod(i, ncol)
        canvas[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = images[i]
    inch = max(0.9 / (h + pad), 0.025)  # inches per canvas pixel: about 0.9 in per image
    img_w, img_h = canvas.shape[1] * inch, canvas.shape[0] * inch
    left, top = (0.35 if row_labels is not None else 0.05), (0.4 if title else 0.05)
    fig_w, fig_h = img_w + left + 0.05, img_h + top + 0.05
    fig = plt.figure(figsize=(fig_w, fig_h))
    ax = fig.add_axes([left / fig_w, 0.05 / fig_h, img_w / fig_w, img_h / fig_h])
    ax.imshow(canvas[..., 0] if c == 1 else canvas, cmap="gray" if c == 1 else None, vmin=0, vmax=1,
              interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([(h + pad) * r + pad + h / 2 for r in range(rows)] if row_labels is not None else [])
    if row_labels is not None:
        ax.set_yticklabels([str(l) for l in row_labels])
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        fig.text(0.5, 1 - 0.22 / fig_h, title, ha="center", va="center", fontsize=11)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def sample_labels(args, num_classes: int) -> tuple[list[int], np.ndarray]:
    """``jaxgen sample``'s labels (``--label``, default every class), checked, and each repeated ``--num`` times."""
    labels = args.label if args.label is not None else list(range(num_classes))
    bad = [l for l in labels if not 0 <= l < num_classes]
    if bad:
        raise ValueError(f"labels {bad} lie outside [0, {num_classes - 1}]; pass --label values in that range.")
    return labels, np.repeat(np.asarray(labels), args.num)


def write_samples(images, labels, out: str | None, *, nrow: int, title: str, what: str) -> str:
    """``jaxgen sample``'s outputs: a PNG grid at ``out`` (default ``samples.png``) and ``<stem>_samples.npy`` /
    ``<stem>_labels.npy``; returns the line to print (``what`` says how they were sampled)."""
    out = out or "samples.png"
    if not writes():
        return f"{len(labels)} images ({what}); process 0 writes them"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_grid(images, out, nrow=nrow, title=title)
    stem = os.path.splitext(out)[0]
    np.save(stem + "_samples.npy", np.asarray(images))
    np.save(stem + "_labels.npy", np.asarray(labels).astype(np.int32))
    return f"wrote {out} ({len(labels)} images, {what}) and {stem}_samples.npy"


def write_json(path: str, obj) -> None:
    if not writes():
        return
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=2)


def check_sampler(spec: str, **options) -> None:
    """A clear error for an unknown sampler or bad options, before any work (:func:`jaxgen.samplers.get_solver`)."""
    from jaxgen.samplers import get_solver

    get_solver(spec, **options)


def check_fields(cfg, checks: dict[str, Callable[[Any], bool]], hints: dict[str, str]) -> None:
    """Raise ``ValueError`` naming the first field that holds a NaN or inf (alone or in a tuple), or whose check
    fails."""
    import dataclasses
    import math

    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        items = value if isinstance(value, (tuple, list)) else (value,)
        if any(isinstance(v, float) and not math.isfinite(v) for v in items):
            raise ValueError(f"config field {field.name}={value!r} is invalid: every number must be finite.")
    for name, ok in checks.items():
        if not ok(getattr(cfg, name)):
            raise ValueError(f"config field {name}={getattr(cfg, name)!r} is invalid: {hints[name]}.")
