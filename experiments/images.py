"""Class-conditional flow matching on images with classifier-free guidance: train, sample, evaluate.

The functions here back the ``jaxgen`` command line (``jaxgen train | sample | evaluate | list``). A run
directory holds ``config.json``, ``checkpoints/`` (orbax; training resumes from the latest one),
``metrics.jsonl``, periodic sample grids, and after training the final outputs: per-class sample grid,
guidance sweep, loss curve, evaluation report, and the raw guided samples (``samples.npy`` in [-1, 1],
``labels.npy``).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any

import numpy as np

from experiments.configs import ImageConfig



# -- building blocks ---------------------------------------------------------------------------

def load_dataset(cfg: ImageConfig, split: str):
    from jaxgen.data.images import load_digits, load_tfds

    if cfg.dataset == "digits":
        return load_digits(split)
    return load_tfds(cfg.dataset, split)


def build_model(cfg: ImageConfig, image_shape, seed: int):
    from flax import nnx

    from jaxgen.models.unet import UNetField

    h, _, c = image_shape
    return UNetField(c, channels=cfg.channels, channel_mult=tuple(cfg.channel_mult), num_res_blocks=cfg.num_res_blocks,
                     attention_resolutions=tuple(cfg.attention_resolutions), num_heads=cfg.num_heads,
                     dropout=cfg.dropout, num_classes=cfg.num_classes, image_size=h, rngs=nnx.Rngs(seed))


# Fields that may change when a run is resumed: the step budget and everything about logging and sampling.
NON_TRAINING_FIELDS = frozenset({"steps", "checkpoint_every", "keep_checkpoints", "sample_every", "guidance_scales",
                                 "eval_guidance", "sampler", "sample_steps", "samples_per_class", "sample_chunk"})


def build_trainer(cfg: ImageConfig, train_set):
    import jax.numpy as jnp

    from jaxgen.data.images import device_sampler
    from jaxgen.losses import regression_loss
    from jaxgen.training import Trainer, adam_with_schedule

    model = build_model(cfg, train_set.images.shape[1:], cfg.seed)
    loss = regression_loss(cfg.schedule, cfg.prediction, label_dropout=cfg.label_dropout, null_label=cfg.num_classes)
    opt = adam_with_schedule(cfg.learning_rate, total_steps=cfg.steps, warmup_steps=cfg.warmup_steps,
                             clip_norm=cfg.clip_norm or None)
    dtype = {"float32": None, "bfloat16": jnp.bfloat16}[cfg.compute_dtype]
    # The steps of a chunk run fused in one XLA program, batches sampled on the device inside it.
    return Trainer(model, loss, opt, data=device_sampler(train_set, cfg.batch_size),
                   ema_decay=cfg.ema_decay or None, compute_dtype=dtype)


def resolve_sampler(spec: str, prediction: str):
    """The solver of a sampler spec (``"heun"``, ``"dpm_solver_pp:order=3"``, ...; :func:`jaxgen.samplers.get_solver`)
    and the interval it needs: eps/score fields start at ``t0 = 1e-3`` (they say nothing about the data where
    ``alpha = 0``), except for the solvers of one process, which run on their own grids."""
    from jaxgen.samplers import get_solver

    solver = get_solver(spec)
    t0 = 1e-3 if prediction in ("eps", "score") and solver.decodes_data and solver.name not in ("edm",) else None
    return solver, t0


@functools.lru_cache(maxsize=32)
def _compiled_generator(schedule: str, prediction: str, sampler: str, steps: int, null_label: int, shape: tuple,
                        chunk: int = 0):
    import jax

    from jaxgen.fields import chunked_field, guided_field
    from jaxgen.paths import GaussianPath
    from jaxgen.samplers import sample

    path = GaussianPath.from_name(schedule)
    solver, t0 = resolve_sampler(sampler, prediction)

    def generate(model, labels, guidance, key):
        k0, k1 = jax.random.split(key)
        x0 = path.sample_prior(k0, (labels.shape[0],) + shape)
        net = chunked_field(model, chunk) if chunk else model  # cache-sized network batches (CPU)
        field = guided_field(net, guidance, null_label=null_label)  # one network call on a doubled batch
        res = sample(field, x0, solver, path=path, prediction=prediction, steps=steps if solver.takes_steps() else None,
                     t0=t0, key=k1, cond={"y": labels})
        return res.x, res.nfe

    return jax.jit(generate)


def generate(model, cfg: ImageConfig, labels, guidance: float, key, *, sampler=None, steps=None, shape=None):
    """Guided samples ``(1 - w) u(x|null) + w u(x|y)`` for ``labels``; returns (images in [-1, 1], NFE)."""
    import jax
    import jax.numpy as jnp

    sampler = sampler or cfg.sampler
    resolve_sampler(sampler, cfg.prediction)  # a clear error for an unknown sampler, before compiling
    chunk = cfg.sample_chunk if cfg.sample_chunk > 0 else (64 if jax.default_backend() == "cpu" else 0)
    gen = _compiled_generator(cfg.schedule, cfg.prediction, sampler, int(steps or cfg.sample_steps),
                              cfg.num_classes, tuple(shape), chunk)
    model.eval()
    x, nfe = gen(model, jnp.asarray(labels, jnp.int32), jnp.asarray(guidance, jnp.float32), key)
    return np.clip(np.asarray(x), -1.0, 1.0), int(nfe)


def save_grid(images, path: str, *, nrow: int, title: str | None = None, row_labels=None):
    """Save images ``(N, H, W, C)`` in [-1, 1] as a PNG grid with ``nrow`` images per row."""
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


def _plot_loss(losses, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(losses, color="lightsteelblue", lw=0.5, label="per step")
    w = max(1, len(losses) // 50)
    if len(losses) > w:
        ax.plot(np.arange(w - 1, len(losses)), np.convolve(losses, np.ones(w) / w, mode="valid"), color="navy",
                label=f"moving average ({w})")
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the commands --------------------------------------------------------------------------------

def train(cfg: ImageConfig, out: str, *, progress: bool = True) -> dict:
    """Train (resuming from ``out/checkpoints`` if present), then write samples, sweep and report."""
    import jax

    from jaxgen.training import Checkpointer

    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    cfg_path = os.path.join(out, "config.json")
    if os.path.exists(cfg_path):
        saved, new = json.load(open(cfg_path)), json.loads(json.dumps(dataclasses.asdict(cfg)))
        defaults = json.loads(json.dumps(dataclasses.asdict(ImageConfig())))
        changed = sorted(k for k in new if k not in NON_TRAINING_FIELDS and saved.get(k, defaults[k]) != new[k])
        if changed:
            raise ValueError(f"{out} holds a run with a different configuration ({cfg_path}; differs in "
                             f"{', '.join(changed)}); resume it with the same config or choose another --out directory.")
    with open(cfg_path, "w") as fh:
        json.dump(dataclasses.asdict(cfg), fh, indent=2)

    train_set = load_dataset(cfg, "train")
    trainer = build_trainer(cfg, train_set)
    state = trainer.init(jax.random.key(cfg.seed))
    shape = train_set.images.shape[1:]
    log_path = os.path.join(out, "metrics.jsonl")
    t_start = time.perf_counter()
    labels_grid = np.repeat(np.arange(cfg.num_classes), min(8, cfg.samples_per_class))

    from jaxgen.training import MetricWriter

    writer = MetricWriter(out)  # metrics.jsonl, plus tensorboard/ when tensorboardX is installed

    def on_chunk(st, chunk_losses):
        step = int(st.step)
        writer.write(step, loss=float(np.mean(chunk_losses)), seconds=round(time.perf_counter() - t_start, 2))
        if cfg.sample_every and step % cfg.sample_every == 0:
            imgs, _ = generate(trainer.model(st, ema=trainer.ema_decay is not None), cfg, labels_grid,
                               cfg.eval_guidance, jax.random.key(1), shape=shape)
            save_grid(imgs, os.path.join(out, f"samples_step{step:07d}.png"), nrow=8,
                      title=f"step {step}, w = {cfg.eval_guidance}")

    from jaxgen.training import Checkpointing

    with Checkpointer(os.path.join(out, "checkpoints"), max_to_keep=cfg.keep_checkpoints) as ckpt:
        try:
            state = ckpt.restore(state, missing_ok=True)
            state, losses = trainer.fit(state, until_step=cfg.steps, progress=progress,
                                        callbacks=[Checkpointing(ckpt, every=cfg.checkpoint_every), on_chunk])
        finally:
            writer.close()
    train_seconds = time.perf_counter() - t_start
    all_losses = [json.loads(l)["loss"] for l in open(log_path)] if os.path.exists(log_path) else []
    if len(losses):
        np.save(os.path.join(out, "losses.npy"), np.asarray(losses))
        _plot_loss(np.asarray(losses), os.path.join(out, "loss.png"))
    elif all_losses:
        _plot_loss(np.asarray(all_losses), os.path.join(out, "loss.png"))
    report = finalize(cfg, out, trainer, state, shape)
    report["train_seconds_this_session"] = round(train_seconds, 1)
    with open(os.path.join(out, "report.json"), "w") as fh:
        json.dump(report, fh, indent=2)
    return report


def finalize(cfg: ImageConfig, out: str, trainer, state, shape) -> dict:
    """Per-class grid, guidance sweep, guided samples at ``eval_guidance`` and the evaluation report."""
    import jax

    model = trainer.model(state, ema=trainer.ema_decay is not None)
    n = cfg.samples_per_class
    labels = np.repeat(np.arange(cfg.num_classes), n)
    imgs, nfe = generate(model, cfg, labels, cfg.eval_guidance, jax.random.key(cfg.seed + 7), shape=shape)
    np.save(os.path.join(out, "samples.npy"), imgs.astype(np.float32))
    np.save(os.path.join(out, "labels.npy"), labels.astype(np.int32))
    per_row = min(n, 12)
    grid_idx = np.concatenate([np.arange(k * n, k * n + per_row) for k in range(cfg.num_classes)])
    save_grid(imgs[grid_idx], os.path.join(out, "samples_per_class.png"), nrow=per_row,
              row_labels=list(range(cfg.num_classes)),
              title=f"{cfg.sampler} {cfg.sample_steps} steps (NFE {nfe}), guidance w = {cfg.eval_guidance}")
    sweep_labels = np.repeat(np.arange(cfg.num_classes), min(8, n))  # the same shape as the periodic grids
    sweep = []
    for w in cfg.guidance_scales:
        s, _ = generate(model, cfg, sweep_labels, w, jax.random.key(cfg.seed + 11), shape=shape)
        sweep.append(s)
    _save_sweep(sweep, cfg, os.path.join(out, "guidance_sweep.png"))
    report = {"config": cfg.name, "step": int(state.step), "sampler": cfg.sampler, "nfe": nfe,
              "guidance": cfg.eval_guidance}
    report.update(evaluate_samples(cfg, imgs, labels))
    report["guidance_sweep"] = {str(w): evaluate_samples(cfg, s, sweep_labels, brief=True)
                                for w, s in zip(cfg.guidance_scales, sweep)}
    _write_markdown(report, os.path.join(out, "report.md"))
    return report


def _save_sweep(sweep, cfg, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n, h, wd, c = sweep[0].shape
    per = n // cfg.num_classes
    pad = max(1, h // 8)  # a white line between images
    rows_px, cols_px = cfg.num_classes * (h + pad) + pad, per * (wd + pad) + pad
    panel_w = 2.6
    fig, axes = plt.subplots(1, len(sweep), figsize=(panel_w * len(sweep) + 0.2, panel_w * rows_px / cols_px + 0.8),
                             squeeze=False)
    for ax, s, w in zip(axes[0], sweep, cfg.guidance_scales):
        grid = np.ones((rows_px, cols_px, c), np.float32)
        imgs = (np.asarray(s).reshape(cfg.num_classes, per, h, wd, c) + 1) / 2
        for r in range(cfg.num_classes):
            for q in range(per):
                grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (wd + pad):pad + q * (wd + pad) + wd] = imgs[r, q]
        ax.imshow(grid[..., 0] if c == 1 else grid, cmap="gray" if c == 1 else None, vmin=0, vmax=1,
                  interpolation="nearest")
        ax.set_title(f"w = {w:g}")
        ax.axis("off")
    fig.suptitle("classifier-free guidance sweep: rows are classes 0-9", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def evaluate_samples(cfg: ImageConfig, images, labels, *, brief: bool = False) -> dict:
    """Classifier accuracy on the requested labels, diversity and Fréchet distance (digits only)."""
    images = np.asarray(images)
    out: dict[str, Any] = {"pixel_std_within_class": float(np.mean([images[labels == k].std(0).mean()
                                                                     for k in np.unique(labels)]))}
    if cfg.dataset != "digits":
        return out
    from jaxgen.evaluation import digits_report, guided_label_accuracy

    clf, train_set, test_set = _digits_classifier()
    if brief:
        out["label_accuracy"] = float(guided_label_accuracy(clf, images, labels))
        return out
    out.update(digits_report(clf, images, labels, test_set.images, train_images=train_set.images))
    return out


@functools.lru_cache(maxsize=1)
def _digits_classifier():
    from jaxgen.data.images import load_digits
    from jaxgen.evaluation import classifier_accuracy, load_or_train_digits_classifier

    train_set, test_set = load_digits("train"), load_digits("test")
    clf = load_or_train_digits_classifier(train_set.images, train_set.labels)
    acc = classifier_accuracy(clf, test_set.images, test_set.labels)
    if acc < 0.95:
        raise RuntimeError(f"the digits classifier scores {acc:.3f} < 0.95 on held-out digits; clear its cache.")
    return clf, train_set, test_set


def _write_markdown(report: dict, path: str):
    lines = [f"# Evaluation of {report['config']} at step {report['step']}", "",
             f"Sampler {report['sampler']}, NFE {report['nfe']}, guidance w = {report['guidance']}.", ""]
    for k, v in report.items():
        if k in ("config", "step", "sampler", "nfe", "guidance", "guidance_sweep") or isinstance(v, (dict, list)):
            continue
        lines.append(f"- {k}: {v:.4f}" if isinstance(v, float) else f"- {k}: {v}")
    if "guidance_sweep" in report:
        lines += ["", "| w | label accuracy | within-class pixel std (diversity) |", "|---|---|---|"]
        for w, r in report["guidance_sweep"].items():
            lines.append(f"| {w} | {r.get('label_accuracy', float('nan')):.3f} | {r['pixel_std_within_class']:.3f} |")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def load_run(run_dir: str, *, step: int | None = None):
    """Restore a run: its config, trainer and state (from ``run_dir`` or its ``checkpoints`` folder)."""
    import jax

    from jaxgen.training import Checkpointer

    run_dir = os.path.abspath(run_dir)
    if os.path.basename(run_dir.rstrip("/")) == "checkpoints":
        run_dir = os.path.dirname(run_dir.rstrip("/"))
    cfg_path = os.path.join(run_dir, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{run_dir} is not a jaxgen run directory (no config.json); pass the --out folder "
                                "of `jaxgen train`.")
    raw = json.load(open(cfg_path))
    cfg = ImageConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    train_set = load_dataset(cfg, "train")
    trainer = build_trainer(cfg, train_set)
    with Checkpointer(os.path.join(run_dir, "checkpoints")) as ckpt:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint in {run_dir}/checkpoints yet.")
        state = ckpt.restore(trainer.init(jax.random.key(cfg.seed)), step=step)
    return cfg, trainer, state, train_set.images.shape[1:]
