"""One experiment for every family of generative models: VAEs, normalizing flows, GANs, EBMs, score models and flow
matching, on the same data, trainer, checkpoints and metrics.

``jaxgen train digits_vae`` (or any config whose ``family`` names a :data:`experiments.recipes.registry.FAMILIES`
entry) trains the family with :class:`jaxgen.training.Trainer` (resuming from ``out/checkpoints``), then writes:

* ``samples.png`` (a grid of digits, or a scatter of 2-D samples over the target), ``samples.npy``;
* ``report.md`` / ``report.json``: sample quality (2-D: sliced W2, energy distance, MMD, k-NN precision/recall and
  density/coverage against fresh target samples, modes covered on 8 Gaussians; digits: the digits classifier's class
  histogram, its Inception-style score, Fréchet distance and precision/recall in its feature space), each figure with
  its extractor, sample count, sampler and NFE; the negative log-likelihood where the family has one (bits/dim of the
  dequantised test digits, nats per 2-D point); samples per second; the family's diagnostics (KL per latent and active
  units, codebook perplexity, critic gap, ...); the training speed.

2-D data are standardised for training (each coordinate divided by its standard deviation over 100,000 target
samples) and mapped back for sampling, metrics and likelihoods (the log-density gains ``-sum log scale``), so every
family sees data of unit scale whatever the target's.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, ClassVar

import numpy as np

from experiments import common

DIGIT_BIN = 1.0 / 8.0  # digits are k / 8 - 1 for grey levels k = 0..16: one level is 1/8 wide in data units


@dataclasses.dataclass
class GenerativeConfig:
    """A model family trained on one dataset (:mod:`experiments.generative`)."""

    experiment: ClassVar[str] = "generative"
    name: str = "digits_vae"
    family: str = "vae"  # a family spec "name:key=value,...": vae, beta_vae, hvae, vqvae, latent_fm, realnvp, ...
    data: str = "digits"  # "digits" or a 2-D distribution of jaxgen.data.toy2d ("moons", "8gaussians", ...)
    steps: int = 3000
    batch_size: int = 128
    learning_rate: float = 1e-3
    width: int = 64  # MLP width / base channels
    depth: int = 3  # MLP hidden layers
    latent_dim: int = 8  # latent size (VAEs, GAN noise)
    seed: int = 0
    num_samples: int = 1000  # samples generated for the metrics
    likelihood_samples: int = 256  # held-out points scored for the NLL (0: skip it)
    chunk: int = 500
    checkpoint_every: int = 1000
    checked: bool = False  # jaxgen's checked mode (each batch checked on the device)


FREE_FIELDS = frozenset({"steps", "num_samples", "likelihood_samples", "chunk", "checkpoint_every", "checked"})


def check_config(cfg: GenerativeConfig) -> None:
    """Clear errors for a bad config, before any work."""
    from experiments.recipes.registry import parse_family

    common.check_fields(cfg, {
        "steps": lambda v: v >= 0, "batch_size": lambda v: v >= 2, "learning_rate": lambda v: v > 0,
        "width": lambda v: v >= 1, "depth": lambda v: v >= 1, "latent_dim": lambda v: v >= 1,
        "num_samples": lambda v: v >= 10, "likelihood_samples": lambda v: v >= 0, "chunk": lambda v: v >= 1,
        "checkpoint_every": lambda v: v >= 1,
    }, {
        "steps": "must be >= 0", "batch_size": "must be >= 2", "learning_rate": "must be > 0", "width": "must be >= 1",
        "depth": "must be >= 1", "latent_dim": "must be >= 1", "num_samples": "must be >= 10 (the k-NN metrics "
        "need neighbours)", "likelihood_samples": "must be >= 0", "chunk": "must be >= 1",
        "checkpoint_every": "must be >= 1",
    })
    parse_family(cfg.family)
    if cfg.data != "digits":
        from jaxgen.data.toy2d import get_distribution

        try:
            get_distribution(cfg.data)
        except ValueError as err:
            raise ValueError(f"config field data={cfg.data!r}: {err} (or 'digits')") from None
    common.check_batch_size(cfg.batch_size)


# -- set-up ----------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _scale_2d(name: str) -> np.ndarray:
    """Per-coordinate standard deviation of a 2-D target (100,000 samples, a fixed key)."""
    import jax

    from jaxgen.data.toy2d import get_distribution

    return np.asarray(get_distribution(name)(jax.random.key(12345), 100_000)).std(0).astype(np.float32)


@dataclasses.dataclass
class Setup:
    recipe: Any
    trainer: Any
    shape: tuple
    scale: np.ndarray | None  # 2-D data: the standardisation; None for images
    reference: Any  # reference(key, n) -> target samples in data units (2-D), or the test images (digits)


def setup(cfg: GenerativeConfig) -> Setup:
    """The family's recipe, a trainer on the config's data, and the reference data for the metrics."""
    import jax.numpy as jnp

    from experiments.recipes import Context
    from experiments.recipes.registry import build
    from jaxgen.training import Trainer

    if cfg.data == "digits":
        from jaxgen.data.images import device_sampler, load_digits

        train_set = load_digits("train")
        shape, scale = tuple(train_set.images.shape[1:]), None
        data = device_sampler(train_set, cfg.batch_size, with_labels=False)
        reference = load_digits("test")
    else:
        from jaxgen.data.toy2d import get_distribution

        target = get_distribution(cfg.data)
        scale = _scale_2d(cfg.data)
        inv = jnp.asarray(1.0 / scale)
        shape = (int(scale.shape[0]),)
        data = lambda key: {"x": target(key, cfg.batch_size) * inv}  # noqa: E731
        reference = target
    ctx = Context(shape=shape, width=cfg.width, depth=cfg.depth, latent_dim=cfg.latent_dim, steps=cfg.steps,
                  learning_rate=cfg.learning_rate, batch_size=cfg.batch_size, seed=cfg.seed)
    recipe = build(cfg.family, ctx)
    trainer = Trainer(recipe.model, recipe.objective, recipe.optimizer, data=data, ema_decay=recipe.ema_decay,
                      fuse_steps=recipe.fuse_steps, checked=cfg.checked, mesh=common.mesh())
    return Setup(recipe, trainer, shape, scale, reference)


def _model(s: Setup, state):
    return s.trainer.model(state, ema=s.recipe.ema_decay is not None)


def generate(s: Setup, state, num: int, key) -> tuple[np.ndarray, int, float]:
    """``num`` samples in data units, their NFE, and samples per second (timed on a second, compiled call)."""
    import jax

    model = _model(s, state)
    fn = jax.jit(lambda m, k: s.recipe.generate(m, k, num, None))
    x, nfe = jax.block_until_ready(fn(model, key))  # compiles
    t0 = time.perf_counter()
    jax.block_until_ready(fn(model, jax.random.fold_in(key, 1)))
    rate = num / (time.perf_counter() - t0)
    x = np.asarray(x, np.float32)
    if s.scale is not None:
        x = x * s.scale
    return x, int(nfe), float(rate)


# -- training and evaluation ----------------------------------------------------------------------

def train(cfg: GenerativeConfig, out: str, *, progress: bool = True) -> dict:
    """Train (resuming from ``out/checkpoints``), then evaluate and write the report."""
    import jax

    check_config(cfg)
    out = os.path.abspath(out)
    common.check_resume(out, cfg, FREE_FIELDS)
    s = setup(cfg)
    common.write_config(out, cfg)
    state, losses, seconds = common.train(s.trainer, s.trainer.init(jax.random.key(cfg.seed)), out=out,
                                          steps=cfg.steps, checkpoint_every=cfg.checkpoint_every, chunk=cfg.chunk,
                                          progress=progress, config=common.config_record(cfg))
    report = evaluate(cfg, out, s, state)
    report["train"] = {"steps": cfg.steps, "steps_this_session": int(len(losses)), "seconds": round(seconds, 2),
                       "steps_per_second": round(len(losses) / seconds, 1) if len(losses) else None}
    _write_report(report, out)
    return report


def evaluate(cfg: GenerativeConfig, out: str, s: Setup, state) -> dict:
    """Samples, their metrics, the NLL and the family's diagnostics; writes ``samples.png`` and ``samples.npy``."""
    import jax

    from experiments.recipes.registry import FAMILIES, parse_family

    keys = jax.random.split(jax.random.key(cfg.seed + 1), 4)
    x, nfe, rate = generate(s, state, cfg.num_samples, keys[0])
    name = parse_family(cfg.family)[0]
    report: dict[str, Any] = {
        "config": cfg.name, "family": cfg.family, "description": FAMILIES[name][3], "data": cfg.data,
        "step": int(state.step), "sampler": s.recipe.sampler, "nfe": nfe, "samples_per_second": round(rate, 1),
        "num_samples": cfg.num_samples, "finite_fraction": float(np.isfinite(x).all(axis=tuple(range(1, x.ndim))).mean()),
    }
    x = np.nan_to_num(x, nan=0.0, posinf=1e6, neginf=-1e6)
    if cfg.data == "digits":
        report["quality"] = _digits_quality(x, s.reference)
    else:
        report["quality"] = _quality_2d(cfg.data, x, s.reference, keys[1])
    report["nll"] = _nll(cfg, s, state, keys[2])
    if s.recipe.diagnostics is not None:
        batch = (s.reference.images[:512] if cfg.data == "digits"
                 else np.asarray(s.reference(keys[3], 512)) / s.scale)
        report["diagnostics"] = _floats(s.recipe.diagnostics(_model(s, state), jax.numpy.asarray(batch), keys[3]))
    if common.writes():
        os.makedirs(out, exist_ok=True)
        np.save(os.path.join(out, "samples.npy"), x)
        _plot_samples(cfg, x, s, os.path.join(out, "samples.png"), report)
    return report


def _floats(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        a = np.asarray(v)
        out[k] = float(a) if a.ndim == 0 else [round(float(u), 5) for u in a.reshape(-1)]
    return out


def _quality_2d(name: str, x: np.ndarray, target, key) -> dict:
    import jax

    from jaxgen import metrics
    from jaxgen.metrics.manifold import manifold_metrics

    k1, k2, k3 = jax.random.split(key, 3)
    n = x.shape[0]
    ref, ref2 = np.asarray(target(k1, n)), np.asarray(target(k2, n))

    def q(y):
        return {"sliced_w2": float(metrics.sliced_wasserstein(y, ref, k3, num_projections=256)),
                "energy_distance": float(metrics.energy_distance(y, ref)), "mmd_rbf": float(metrics.mmd_rbf(y, ref)),
                **_floats(manifold_metrics(ref, y, k=5))}

    out = {"extractor": "raw 2-D coordinates", "num_samples": n, **q(x), "floor_two_target_sets": q(ref2)}
    if name == "8gaussians":
        from jaxgen.metrics.modes import eight_gaussians_modes, mode_coverage

        cov = mode_coverage(x, *eight_gaussians_modes())
        out["modes"] = {"modes_covered": int(cov.modes_covered), "high_quality": float(cov.high_quality),
                        "kl_from_uniform": float(cov.kl_from_uniform), "counts": np.asarray(cov.counts).tolist(),
                        "rule": "nearest of the 8 centres, within 3 std; covered with >= 0.8% of the samples"}
    return out


@functools.lru_cache(maxsize=1)
def _classifier():
    from jaxgen.data.images import load_digits
    from jaxgen.evaluation import load_or_train_digits_classifier

    train_set = load_digits("train")
    return load_or_train_digits_classifier(train_set.images, train_set.labels)


def _digits_quality(x: np.ndarray, test_set) -> dict:
    from jaxgen.data.images import load_digits
    from jaxgen.evaluation.digits import digits_sample_metrics

    x = np.clip(x, -1.0, 1.0)
    return _floats_nested(digits_sample_metrics(x, classifier=_classifier(), reference=test_set.images,
                                                train_images=load_digits("train").images))


def _floats_nested(d):
    if isinstance(d, dict):
        return {k: _floats_nested(v) for k, v in d.items()}
    if isinstance(d, (str, int, bool)) or d is None:
        return d
    a = np.asarray(d)
    return float(a) if a.ndim == 0 else [round(float(u), 5) for u in a.reshape(-1)]


def _nll(cfg: GenerativeConfig, s: Setup, state, key) -> dict | None:
    """Held-out negative log-likelihood: bits/dim of the dequantised test digits (uniform noise over each grey level's
    bin of width 1/8, Theis et al. 2016), or nats per 2-D point of fresh target samples."""
    import jax
    import jax.numpy as jnp

    from jaxgen.likelihood import bits_per_dim

    if s.recipe.log_likelihood is None or cfg.likelihood_samples == 0:
        return None
    n = cfg.likelihood_samples
    k_data, k_model = jax.random.split(key)
    model = _model(s, state)
    fn = jax.jit(s.recipe.log_likelihood)
    if cfg.data == "digits":
        x = jnp.asarray(s.reference.images[:n])
        x = x + DIGIT_BIN * jax.random.uniform(k_data, x.shape)  # k/8 - 1 + u/8: the bin [k, k + 1) of level k
        lp = np.asarray(fn(model, x, k_model))
        dims = int(np.prod(x.shape[1:]))
        bpd = bits_per_dim(jnp.asarray(lp), dims, data_range=(-1.0, 1.0 + DIGIT_BIN), num_bins=17)
        return {"bits_per_dim": float(np.mean(bpd)), "kind": s.recipe.likelihood_kind, "num_points": n,
                "data": "dequantised test digits, 17 levels (uniform over each level's bin)"}
    x = np.asarray(s.reference(k_data, n))
    lp = np.asarray(fn(model, jnp.asarray(x / s.scale), k_model)) - float(np.sum(np.log(s.scale)))
    return {"nats_per_point": float(-np.mean(lp)), "kind": s.recipe.likelihood_kind, "num_points": n,
            "data": f"fresh {cfg.data} samples"}


def _plot_samples(cfg, x, s: Setup, path: str, report: dict) -> None:
    title = f"{cfg.family} on {cfg.data}: {s.recipe.sampler} (NFE {report['nfe']})"
    if cfg.data == "digits":
        common.save_grid(np.clip(x[:100], -1, 1), path, nrow=10, title=title)
        return
    import jax
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = np.asarray(s.reference(jax.random.key(7), x.shape[0]))
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(*ref.T, s=2, c="C7", alpha=0.4, label=f"target: {cfg.data}")
    ax.scatter(*x.T, s=2, c="C1", alpha=0.6, label="samples")
    lim = float(np.percentile(np.abs(ref), 99.5) * 1.3)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=9)
    ax.legend(markerscale=4, fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write_report(report: dict, out: str) -> None:
    if not common.writes():
        return
    common.write_json(os.path.join(out, "report.json"), report)
    lines = [f"# {report['config']}: {report['description']} on {report['data']}, step {report['step']}", "",
             f"Sampler: {report['sampler']}; NFE {report['nfe']}; {report['samples_per_second']:,} samples/s; "
             f"{report['num_samples']} samples ({report['finite_fraction']:.3f} finite).", ""]

    def flat(prefix, d):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(f"{prefix}{k}.", v)
            else:
                yield f"{prefix}{k}", v

    for section in ("quality", "nll", "diagnostics", "train"):
        if report.get(section):
            lines += [f"## {section}", ""]
            for k, v in flat("", report[section]):
                if isinstance(v, list) and len(v) > 12:
                    v = "[" + ", ".join(f"{u:.3g}" for u in v[:12]) + ", ...]"
                lines.append(f"- {k}: {v:.4f}" if isinstance(v, float) else f"- {k}: {v}")
            lines.append("")
    with open(os.path.join(out, "report.md"), "w") as fh:
        fh.write("\n".join(lines))


# -- the commands ----------------------------------------------------------------------------------

def load_run(run_dir: str, *, step: int | None = None):
    """Restore a run: ``(cfg, setup, state)``."""
    import jax

    from jaxgen.training import Checkpointer

    run_dir = common.run_dir_of(run_dir)
    cfg = common.config_from_record(GenerativeConfig, common.read_config(run_dir))
    s = setup(cfg)
    with Checkpointer(os.path.join(run_dir, "checkpoints")) as ckpt:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint in {run_dir}/checkpoints yet.")
        state = ckpt.restore(jax.eval_shape(s.trainer.init, jax.random.key(cfg.seed)), step=step)
    return cfg, s, state


def sample_command(run_dir: str, args) -> str:
    """``jaxgen sample`` on a family's run: ``--num`` samples (a grid of digits or a 2-D scatter) and their array."""
    import jax

    if args.sampler or args.steps or args.label is not None or args.guidance is not None:
        raise ValueError("--sampler, --steps, --label and --guidance apply to flow and diffusion runs; a family run "
                         "samples as its recipe does (pass the family's options in its config instead).")
    cfg, s, state = load_run(run_dir, step=args.step)
    x, nfe, _ = generate(s, state, args.num, jax.random.key(args.seed))
    out = args.out or "samples.png"
    if not common.writes():
        return f"{args.num} samples; process 0 writes them"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    stem = os.path.splitext(out)[0]
    np.save(stem + "_samples.npy", x)
    _plot_samples(cfg, x, s, out, {"nfe": nfe})
    return f"wrote {out} ({args.num} samples, {s.recipe.sampler}, NFE {nfe}) and {stem}_samples.npy"


def evaluate_command(run_dir: str, args) -> str:
    """``jaxgen evaluate`` on a family's run: its report, written to ``--out`` (default the run directory)."""
    if args.sampler or args.steps:
        raise ValueError("--sampler and --steps apply to flow and diffusion runs; a family run samples as its recipe "
                         "does.")
    cfg, s, state = load_run(run_dir, step=args.step)
    out = args.out or common.run_dir_of(run_dir)
    os.makedirs(out, exist_ok=True)
    report = evaluate(cfg, out, s, state)
    _write_report(report, out)
    with open(os.path.join(out, "report.md")) as fh:
        return fh.read()
