"""Class-conditional flow matching on images with classifier-free guidance: train, sample, evaluate.

``jaxgen train digits_cfm`` (``./run.sh``) trains a U-Net on the embedded digits, then writes a per-class sample grid,
a guidance sweep, the loss curve, the evaluation report and the raw guided samples (``samples.npy`` in [-1, 1],
``labels.npy``) to the run directory (:mod:`experiments.common`); ``jaxgen sample`` and ``jaxgen evaluate`` use any
sampler by name on a trained run. With ``objective="meanflow"`` (``jaxgen train digits_meanflow``) the same experiment
trains a flow-map U-Net ``u(x, r, t | y, w)`` with the guidance scale as an input, sampled guided in one jump.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, ClassVar

import numpy as np

from experiments import common, conditioning


@dataclasses.dataclass
class ImageConfig:
    """A class-conditional flow-matching (or diffusion) experiment on images (:mod:`experiments.images`)."""

    experiment: ClassVar[str] = "images"
    name: str = "digits_cfm"
    dataset: str = "digits"  # digits (embedded) | mnist | fashion_mnist | cifar10 (TFDS, prepared locally)
    schedule: str = "linear"
    prediction: str = "velocity"
    # the objective: "flow_matching" (regression on `prediction`), or "meanflow" with options as
    # "meanflow:p=0,equal_fraction=0.25,w_min=1,w_max=4": a flow-map U-Net u(x, r, t | y, w) trained by
    # jaxgen.losses.meanflow_loss with guidance built in (w ~ U[w_min, w_max] as an input), sampled with
    # sampler="flow_map" in sample_steps jumps (or any other sampler through its diagonal u(x, t, t | y, w));
    # "shortcut[:max_doublings=7,consistency_fraction=0.25,w_min=1,w_max=4]": the same network trained as a shortcut
    # model (jaxgen.losses.shortcut_loss, guidance built in the same way);
    # "scm[:sigma_data=0.5,p_mean=-1,p_std=1.4,warmup_steps=1000,tangent_c=0.1]": continuous-time consistency training
    # from scratch (jaxgen.losses.scm_loss, TrigFlow on the cosine path), class-conditional without guidance (sCT
    # learns no unconditional velocity to guide with), sampled with sampler="consistency" in sample_steps jumps
    objective: str = "flow_matching"
    # network: "unet" (the fields below) or a DiT, "dit" with options as "dit:hidden=96,depth=4,heads=4,patch=2"
    # (jaxgen.models.DiTField; those defaults have 724,356 parameters, the U-Net's 702,753)
    network: str = "unet"
    # what the samples are conditioned on (experiments.conditioning): "label" (the class, guided by classifier-free
    # guidance), "caption[:p_attribute=0.3,dim=64,depth=2,heads=4]" (a caption of the digit's label, stroke thickness
    # and slant, e.g. "seven, thick, slanted right", through a token encoder trained from scratch and cross-attention;
    # guided over the caption) or "control[:kind=edges]" (a ControlNet on the frozen label-conditioned run `base_run`,
    # following an edge map, kind=lowres a 4x4 image, kind=mask a masked image)
    conditioning: str = "label"
    base_run: str = ""  # the frozen base run of conditioning=control
    channels: int = 32
    channel_mult: tuple = (1, 2)
    num_res_blocks: int = 1
    attention_resolutions: tuple = (4,)
    num_heads: int = 1
    dropout: float = 0.1
    # conditioning and guidance (label num_classes is the null label)
    num_classes: int = 10
    label_dropout: float = 0.1
    guidance_scales: tuple = (0.0, 1.0, 2.0, 4.0)  # w in (1 - w) u(x|null) + w u(x|y)
    eval_guidance: float = 2.0
    # optimisation
    steps: int = 1000  # 1000 steps: 216 s of training on 2 CPU cores, guided accuracy 1.0 at w=2 (measured)
    batch_size: int = 128
    learning_rate: float = 2e-3
    warmup_steps: int = 200
    clip_norm: float = 1.0
    ema_decay: float = 0.999
    compute_dtype: str = "float32"  # float32 | bfloat16
    seed: int = 0
    # checkpoints, logging and sampling during training
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    sample_every: int = 1000
    # sampling and evaluation: any sampler by name, with options (jaxgen.samplers.get_solver), e.g.
    # "dpm_solver_pp:order=3"
    sampler: str = "heun"
    sample_steps: int = 20
    samples_per_class: int = 100
    sample_chunk: int = 0  # network batch while sampling: 0 = auto (64 on CPU, whole batch elsewhere), N = chunks of N
    # jaxgen's checked mode (jaxgen.checked): batches and sampler inputs checked on the device (finite, labels in
    # range) inside the compiled programs; measured overhead on the digits U-Net below 1%
    checked: bool = True


# Fields that may change when a run is resumed: the step budget and everything about logging and sampling.
FREE_FIELDS = frozenset({"steps", "checkpoint_every", "keep_checkpoints", "sample_every", "guidance_scales",
                         "eval_guidance", "sampler", "sample_steps", "samples_per_class", "sample_chunk",
                         "checked"})


def check_config(cfg: ImageConfig) -> None:
    """Clear errors for a bad config, before any work (and before anything is written)."""
    common.check_fields(cfg, {
        "steps": lambda v: v >= 0, "batch_size": lambda v: v >= 1, "channels": lambda v: v >= 1,
        "checkpoint_every": lambda v: v >= 1, "sample_steps": lambda v: v >= 1,
        "samples_per_class": lambda v: v >= 1, "compute_dtype": lambda v: v in ("float32", "bfloat16"),
        "learning_rate": lambda v: v > 0, "label_dropout": lambda v: 0 <= v < 1,
        "guidance_scales": lambda v: len(v) >= 1, "sample_every": lambda v: v >= 0,
        "warmup_steps": lambda v: v >= 0, "num_res_blocks": lambda v: v >= 1,
        "num_heads": lambda v: v >= 1 and cfg.channels % v == 0, "dropout": lambda v: 0 <= v < 1,
        "channel_mult": lambda v: len(v) >= 1 and all(m >= 1 for m in v),
        "attention_resolutions": lambda v: all(r >= 1 for r in v), "num_classes": lambda v: v >= 1,
        "clip_norm": lambda v: v >= 0, "keep_checkpoints": lambda v: v >= 1, "sample_chunk": lambda v: v >= 0,
    }, {
        "steps": "the number of training steps must be >= 0", "batch_size": "must be >= 1",
        "channels": "must be >= 1", "checkpoint_every": "must be >= 1", "sample_steps": "must be >= 1",
        "samples_per_class": "must be >= 1", "compute_dtype": "use float32 or bfloat16",
        "learning_rate": "must be > 0", "label_dropout": "must be in [0, 1)",
        "guidance_scales": "give at least one scale, e.g. guidance_scales=0,2", "sample_every": "must be >= 0",
        "warmup_steps": "must be >= 0", "num_res_blocks": "must be >= 1",
        "num_heads": f"must be >= 1 and divide channels={cfg.channels}", "dropout": "must be in [0, 1)",
        "channel_mult": "give one positive multiplier per level, e.g. channel_mult=1,2",
        "attention_resolutions": "give resolutions >= 1 (or none: attention_resolutions=)",
        "num_classes": "must be >= 1", "clip_norm": "must be >= 0 (0: no clipping)", "keep_checkpoints": "must be >= 1",
        "sample_chunk": "must be >= 0 (0: automatic)",
    })
    common.check_sampler(cfg.sampler)
    common.check_batch_size(cfg.batch_size)
    network_options(cfg)
    conditioning.check_config(cfg)
    name, opt = objective_options(cfg)
    if name in FLOW_MAP_OBJECTIVES and cfg.prediction != "velocity":
        raise ValueError(f"objective {name} learns an average velocity: set prediction=velocity (got "
                         f"{cfg.prediction!r}).")
    if name in FLOW_MAP_OBJECTIVES and not 0 <= opt["w_min"] <= opt["w_max"]:
        raise ValueError(f"objective {name} needs 0 <= w_min <= w_max, got w_min={opt['w_min']}, "
                         f"w_max={opt['w_max']}.")
    if name == "shortcut" and opt["max_doublings"] < 1:
        raise ValueError(f"objective shortcut needs max_doublings >= 1, got {opt['max_doublings']}.")
    if name == "scm":
        if cfg.schedule != "cosine" or cfg.prediction != "velocity" or cfg.label_dropout != 0:
            raise ValueError("objective scm is TrigFlow on the cosine path with a velocity network, trained on the "
                             "labels as given: set schedule=cosine, prediction=velocity and label_dropout=0 (got "
                             f"schedule={cfg.schedule!r}, prediction={cfg.prediction!r}, "
                             f"label_dropout={cfg.label_dropout}).")
        if cfg.sampler.split(":")[0] != "consistency":
            raise ValueError(f"objective scm trains a consistency model: set sampler=consistency (got {cfg.sampler!r}).")
        if cfg.eval_guidance != 1.0 or any(w != 1.0 for w in cfg.guidance_scales):
            raise ValueError("objective scm samples without guidance (consistency training learns no unconditional "
                             "velocity to guide with): set eval_guidance=1 and guidance_scales=1.")
        if not (opt["sigma_data"] > 0 and opt["p_std"] > 0 and opt["tangent_c"] > 0 and opt["warmup_steps"] >= 0):
            raise ValueError(f"objective scm needs sigma_data, p_std and tangent_c > 0 and warmup_steps >= 0, got {opt}.")
    elif cfg.sampler.split(":")[0] == "consistency":
        raise ValueError("the consistency sampler needs a consistency model: train with objective=scm, or choose an "
                         "ODE sampler (e.g. sampler=heun).")
    if name not in FLOW_MAP_OBJECTIVES and cfg.sampler.split(":")[0] == "flow_map":
        raise ValueError("the flow_map sampler needs a flow-map model: train with objective=meanflow (or shortcut), "
                         "or choose an ODE sampler (e.g. sampler=heun).")


OBJECTIVES = {
    "flow_matching": {},
    "meanflow": {"p": 0.0, "equal_fraction": 0.25, "mean": -0.4, "std": 1.0, "w_min": 1.0, "w_max": 4.0},
    "shortcut": {"max_doublings": 7, "consistency_fraction": 0.25, "w_min": 1.0, "w_max": 4.0},
    "scm": {"sigma_data": 0.5, "p_mean": -1.0, "p_std": 1.4, "warmup_steps": 1000, "tangent_c": 0.1},
}
FLOW_MAP_OBJECTIVES = ("meanflow", "shortcut")  # objectives that train a flow map u(x, r, t | y, w)
NETWORKS = {"unet": {}, "dit": {"hidden": 96, "depth": 4, "heads": 4, "patch": 2}}


def _spec(value: str, table: dict, what: str, example: str) -> tuple[str, dict]:
    """A ``"name:key=value,..."`` spec's name and options (``table[name]``'s defaults overridden, each cast to its
    default's type: numbers checked, words kept as they are), with a clear error for an unknown name or option."""
    from jaxgen.samplers import parse_solver_spec

    name, opts = parse_solver_spec(value)
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; choose from {', '.join(table)} (options as {example!r}).")
    unknown = sorted(set(opts) - set(table[name]))
    if unknown:
        raise ValueError(f"{what} {name!r} has no option {', '.join(map(repr, unknown))}; its options are "
                         f"{', '.join(f'{k}={v!r}' for k, v in table[name].items()) or 'none'}.")
    out = dict(table[name])
    for k, v in opts.items():
        want = type(table[name][k])
        if want is str:
            out[k] = str(v)
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (want is int and not isinstance(v, int)):
            raise ValueError(f"{what} {name!r}: option {k} must be {'an integer' if want is int else 'a number'}, "
                             f"got {v!r}.")
        out[k] = want(v)
    return name, out


def objective_options(cfg: ImageConfig) -> tuple[str, dict]:
    """The objective's name and options (:data:`OBJECTIVES`)."""
    return _spec(cfg.objective, OBJECTIVES, "objective", "meanflow:p=0,w_max=4")


def network_options(cfg: ImageConfig) -> tuple[str, dict]:
    """The network's name and options (:data:`NETWORKS`)."""
    return _spec(cfg.network, NETWORKS, "network", "dit:hidden=96,depth=4")


def is_flow_map(cfg: ImageConfig) -> bool:
    return objective_options(cfg)[0] in FLOW_MAP_OBJECTIVES


def consistency_scale(cfg: ImageConfig) -> float:
    """``sigma_data`` of an ``scm`` run (its model works on the data divided by it), 0 for other objectives."""
    name, opt = objective_options(cfg)
    return opt["sigma_data"] if name == "scm" else 0.0


# -- building blocks ---------------------------------------------------------------------------

def load_dataset(cfg: ImageConfig, split: str):
    from jaxgen.data.images import load_digits, load_tfds

    if cfg.dataset == "digits":
        return load_digits(split)
    return load_tfds(cfg.dataset, split)


def build_model(cfg: ImageConfig, image_shape, seed: int):
    from flax import nnx

    from jaxgen.models.dit import DiTField, FlowMapDiT
    from jaxgen.models.unet import FlowMapUNet, UNetField

    h, _, c = image_shape
    extra = dict(guidance_input=True) if is_flow_map(cfg) else {}
    scm = consistency_scale(cfg) > 0
    if scm:
        extra = dict(time_scale=10.0)  # the sCM tangent differentiates the network in time: a smooth embedding
    net, opt = network_options(cfg)
    kind, cond_opt = conditioning.options(cfg)
    if kind == "control":  # a ControlNet around the frozen base run's network
        return conditioning.build_controlled(cfg, image_shape, seed)
    num_classes = cfg.num_classes
    if kind == "caption":  # conditioned on the caption's tokens only (the label is one of its words)
        extra, num_classes = dict(extra, context_dim=cond_opt["dim"]), None
    rngs = nnx.Rngs(seed)
    if net == "dit":
        model = (FlowMapDiT if is_flow_map(cfg) else DiTField)(
            c, image_size=h, patch_size=opt["patch"], hidden=opt["hidden"], depth=opt["depth"],
            num_heads=opt["heads"], num_classes=num_classes, rngs=rngs, **extra)
    else:
        model = (FlowMapUNet if is_flow_map(cfg) else UNetField)(
            c, channels=cfg.channels, channel_mult=tuple(cfg.channel_mult), num_res_blocks=cfg.num_res_blocks,
            attention_resolutions=tuple(cfg.attention_resolutions), num_heads=cfg.num_heads, dropout=cfg.dropout,
            num_classes=num_classes, image_size=h, rngs=rngs, **extra)
    if kind == "caption":
        model = conditioning.caption_field(model, cond_opt, rngs)
    if scm:  # TrigFlow's consistency function around the velocity network, with sCM's learned weighting
        from jaxgen.models import ConsistencyFunction
        from jaxgen.models.consistency import LogVariance

        model = ConsistencyFunction(model, "cosine", parameterization="trigflow", logvar=LogVariance(rngs=rngs))
    return model


def build_loss(cfg: ImageConfig):
    """The training objective of ``cfg.objective`` (:data:`OBJECTIVES`)."""
    from jaxgen.losses import meanflow_loss, meanflow_times, regression_loss, scm_loss, shortcut_loss

    name, opt = objective_options(cfg)
    if name == "scm":
        return scm_loss("cosine", sigma_data=opt["sigma_data"], p_mean=opt["p_mean"], p_std=opt["p_std"],
                        tangent_c=opt["tangent_c"], warmup_steps=opt["warmup_steps"])
    if name == "shortcut":
        return shortcut_loss(cfg.schedule, max_doublings=opt["max_doublings"],
                             consistency_fraction=opt["consistency_fraction"], label_dropout=cfg.label_dropout,
                             null_label=cfg.num_classes, guidance_scales=(opt["w_min"], opt["w_max"]))
    if name == "meanflow":
        times = meanflow_times(mean=opt["mean"], std=opt["std"], equal_fraction=opt["equal_fraction"])
        return meanflow_loss(cfg.schedule, time_sampler=times, p=opt["p"], label_dropout=cfg.label_dropout,
                             null_label=cfg.num_classes, guidance_scales=(opt["w_min"], opt["w_max"]))
    key, null = conditioning.guided_key(cfg)
    return regression_loss(cfg.schedule, cfg.prediction, label_dropout=cfg.label_dropout, null_label=null,
                           label_key=key)


def build_trainer(cfg: ImageConfig, train_set):
    import jax.numpy as jnp

    from jaxgen.training import Trainer, adam_with_schedule

    model = build_model(cfg, train_set.images.shape[1:], cfg.seed)
    loss = conditioning.objective(cfg, build_loss(cfg))  # a ControlNet trains its own parameters only
    opt = adam_with_schedule(cfg.learning_rate, total_steps=cfg.steps, warmup_steps=cfg.warmup_steps,
                             clip_norm=cfg.clip_norm or None)
    dtype = {"float32": None, "bfloat16": jnp.bfloat16}[cfg.compute_dtype]
    # The steps of a chunk run fused in one XLA program, batches sampled on the device inside it.
    return Trainer(model, loss, opt, data=conditioning.data_sampler(cfg, train_set),
                   ema_decay=cfg.ema_decay or None, compute_dtype=dtype, checked=cfg.checked, mesh=common.mesh())


# -- sampling --------------------------------------------------------------------------------------

def resolve_sampler(spec: str, prediction: str):
    """The solver of a sampler spec (``"heun"``, ``"dpm_solver_pp:order=3"``, ...; :func:`jaxgen.samplers.get_solver`)
    and the first time: eps/score fields start at ``t0 = 1e-3`` (they say nothing about the data where
    ``alpha = 0``) with the solvers that decode the data on a grid from ``t0``."""
    from jaxgen.samplers import EDM, ConsistencyMultistep, DDPMAncestral, PredictorCorrector, get_solver

    solver = get_solver(spec)
    on_own_grid = (EDM, DDPMAncestral, PredictorCorrector, ConsistencyMultistep)
    t0 = 1e-3 if prediction in ("eps", "score") and not isinstance(solver, on_own_grid) else None
    return solver, t0


@functools.lru_cache(maxsize=32)
def _compiled_generator(schedule: str, prediction: str, sampler: str, steps: int, null_label: int, shape: tuple,
                        chunk: int = 0, checked: bool = False, devices: int = 1, flow_map: bool = False,
                        consistency_scale: float = 0.0, label_key: str = "y"):
    import jax
    import jax.numpy as jnp

    from jaxgen import checked as checked_program

    from jaxgen.fields import chunked_field, flow_map_velocity, guided_field
    from jaxgen.paths import GaussianPath
    from jaxgen.samplers import FlowMap, sample

    path = GaussianPath.from_name("cosine" if consistency_scale else schedule)  # sCM: TrigFlow's cosine path
    solver, t0 = resolve_sampler(sampler, prediction)

    mesh = common.mesh() if devices > 1 else None

    def generate(model, labels, guidance, key, extra):
        k0, k1 = jax.random.split(key)
        x0 = path.sample_prior(k0, (labels.shape[0],) + shape)
        split = mesh is not None and labels.shape[0] % devices == 0
        if split:  # the batch of samples split over the devices: each runs the sampler on its share
            from jaxgen.training.parallel import shard_batch

            x0, labels, extra = shard_batch((x0, labels, extra), mesh)
        cond = {label_key: labels, **extra}
        if consistency_scale:  # a consistency model of the data / sigma_data: jumps to the data end, scaled back
            res = sample(model, x0, solver, prediction="data", steps=steps, key=k1, cond=cond)
            x = consistency_scale * res.x
            if split:
                from jaxgen.training.parallel import replicated

                x = jax.lax.with_sharding_constraint(x, replicated(mesh))
            return x, res.nfe
        if flow_map:  # guidance is an input of the flow map: one call on the batch, jumps or its diagonal
            cond["w"] = jnp.full(labels.shape, guidance, jnp.float32)
            field = model if isinstance(solver, FlowMap) else flow_map_velocity(model)
            if chunk and not isinstance(solver, FlowMap):
                field = chunked_field(field, chunk)
        else:
            net = chunked_field(model, chunk) if chunk else model  # cache-sized network batches (CPU)
            field = guided_field(net, guidance, null_label=null_label, label_key=label_key)  # one call, doubled batch
        res = sample(field, x0, solver, path=path, prediction=prediction, steps=steps if solver.takes_steps() else None,
                     t0=t0, key=k1, cond=cond)
        if split:  # gathered: every process holds all the samples
            from jaxgen.training.parallel import replicated

            return jax.lax.with_sharding_constraint(res.x, replicated(mesh)), res.nfe
        return res.x, res.nfe

    return checked_program(generate) if checked else jax.jit(generate)


def generate(model, cfg: ImageConfig, labels, guidance: float, key, *, sampler=None, steps=None, shape=None,
             extra: dict | None = None):
    """Guided samples ``(1 - w) u(x|null) + w u(x|y)`` for ``labels`` (a ``meanflow`` run: the flow map it learned
    for that ``w``, one network call per step); returns (images in [-1, 1], NFE). For a caption run ``labels`` are
    the captions' tokens ``(B, L)``; ``extra`` holds further conditioning arrays (a ControlNet's ``control``)."""
    import jax
    import jax.numpy as jnp

    sampler = sampler or cfg.sampler
    resolve_sampler(sampler, cfg.prediction)  # a clear error for an unknown sampler, before compiling
    if consistency_scale(cfg) and (float(guidance) != 1.0 or sampler.split(":")[0] != "consistency"):
        raise ValueError(f"an scm run samples with the consistency sampler and without guidance (w = 1); got "
                         f"sampler {sampler!r}, w = {float(guidance):g}.")
    chunk = cfg.sample_chunk if cfg.sample_chunk > 0 else (64 if jax.default_backend() == "cpu" else 0)
    label_key, null = conditioning.guided_key(cfg)
    gen = _compiled_generator(cfg.schedule, cfg.prediction, sampler, int(steps or cfg.sample_steps),
                              null, tuple(shape), chunk, bool(cfg.checked), jax.device_count(),
                              is_flow_map(cfg), consistency_scale(cfg), label_key)
    model.eval()
    extra = {k: jnp.asarray(v) for k, v in (extra or {}).items()}
    x, nfe = gen(model, jnp.asarray(labels, jnp.int32), jnp.asarray(guidance, jnp.float32), key, extra)
    return np.clip(np.asarray(x), -1.0, 1.0), int(nfe)


# -- the run ---------------------------------------------------------------------------------------

def train(cfg: ImageConfig, out: str, *, progress: bool = True) -> dict:
    """Train (resuming from ``out/checkpoints`` if present), then write samples, sweep and report."""
    import jax

    from jaxgen.training import Every

    cfg = conditioning.with_base(cfg)  # a ControlNet run: its network is the base run's
    check_config(cfg)
    out = os.path.abspath(out)
    common.check_resume(out, cfg, FREE_FIELDS)
    train_set = load_dataset(cfg, "train")
    trainer = build_trainer(cfg, train_set)
    common.write_config(out, cfg)
    shape = train_set.images.shape[1:]
    labels_grid = np.repeat(np.arange(cfg.num_classes), min(8, cfg.samples_per_class))

    grid_inputs, grid_extra = conditioning.inputs_for_labels(cfg, labels_grid, shape)

    def sample_grid(st):
        step = int(st.step)
        imgs, _ = generate(trainer.model(st, ema=trainer.ema_decay is not None), cfg, grid_inputs, cfg.eval_guidance,
                           jax.random.key(1), shape=shape, extra=grid_extra)
        common.save_grid(imgs, os.path.join(out, f"samples_step{step:07d}.png"), nrow=8,
                         title=f"step {step}, w = {cfg.eval_guidance}")

    callbacks = [Every(cfg.sample_every, sample_grid)] if cfg.sample_every else []
    state, _, seconds = common.train(trainer, trainer.init(jax.random.key(cfg.seed)), out=out, steps=cfg.steps,
                                     checkpoint_every=cfg.checkpoint_every, keep_checkpoints=cfg.keep_checkpoints,
                                     progress=progress, config=common.config_record(cfg), callbacks=callbacks)
    report = finalize(cfg, out, trainer, state, shape)
    report["train_seconds_this_session"] = round(seconds, 1)
    common.write_json(os.path.join(out, "report.json"), report)
    return report


def finalize(cfg: ImageConfig, out: str, trainer, state, shape) -> dict:
    """Per-class grid, guidance sweep, guided samples at ``eval_guidance`` and the evaluation report."""
    import jax

    model = trainer.model(state, ema=trainer.ema_decay is not None)
    n = cfg.samples_per_class
    labels = np.repeat(np.arange(cfg.num_classes), n)
    inputs, extra = conditioning.inputs_for_labels(cfg, labels, shape)  # a caption run: the label's word alone
    imgs, nfe = generate(model, cfg, inputs, cfg.eval_guidance, jax.random.key(cfg.seed + 7), shape=shape, extra=extra)
    np.save(os.path.join(out, "samples.npy"), imgs.astype(np.float32))
    np.save(os.path.join(out, "labels.npy"), labels.astype(np.int32))
    per_row = min(n, 12)
    grid_idx = np.concatenate([np.arange(k * n, k * n + per_row) for k in range(cfg.num_classes)])
    common.save_grid(imgs[grid_idx], os.path.join(out, "samples_per_class.png"), nrow=per_row,
                     row_labels=list(range(cfg.num_classes)),
                     title=f"{cfg.sampler} {cfg.sample_steps} steps (NFE {nfe}), guidance w = {cfg.eval_guidance}")
    sweep_labels = np.repeat(np.arange(cfg.num_classes), min(8, n))  # the same shape as the periodic grids
    sweep_inputs, sweep_extra = conditioning.inputs_for_labels(cfg, sweep_labels, shape)
    sweep = []
    for w in cfg.guidance_scales:
        s, _ = generate(model, cfg, sweep_inputs, w, jax.random.key(cfg.seed + 11), shape=shape, extra=sweep_extra)
        sweep.append(s)
    _save_sweep(sweep, cfg, os.path.join(out, "guidance_sweep.png"))
    report = {"config": cfg.name, "step": int(state.step), "sampler": cfg.sampler, "nfe": nfe,
              "guidance": cfg.eval_guidance}
    report.update(evaluate_samples(cfg, imgs, labels))
    report["guidance_sweep"] = {str(w): evaluate_samples(cfg, s, sweep_labels, brief=True)
                                for w, s in zip(cfg.guidance_scales, sweep)}
    extra_lines = conditioning.evaluate(cfg, model, out, shape, report)  # captions' attributes, ControlNet's edges
    _write_markdown(report, os.path.join(out, "report.md"), extra_lines)
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


def _write_markdown(report: dict, path: str, extra_lines=()):
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
    lines += list(extra_lines)
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


def load_run(run_dir: str, *, step: int | None = None):
    """Restore a run: ``(cfg, trainer, state, image shape)`` (from ``run_dir`` or its ``checkpoints`` folder)."""
    import jax

    from jaxgen.training import Checkpointer

    run_dir = common.run_dir_of(run_dir)
    cfg = common.config_from_record(ImageConfig, common.read_config(run_dir))
    train_set = load_dataset(cfg, "train")
    trainer = build_trainer(cfg, train_set)
    with Checkpointer(os.path.join(run_dir, "checkpoints")) as ckpt:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint in {run_dir}/checkpoints yet.")
        state = ckpt.restore(jax.eval_shape(trainer.init, jax.random.key(cfg.seed)), step=step)  # allocates nothing
    return cfg, trainer, state, train_set.images.shape[1:]


# -- the commands ----------------------------------------------------------------------------------

def sample_command(run_dir: str, args) -> str:
    """``jaxgen sample`` on an image run: a grid of guided samples of the chosen labels, and their arrays."""
    import jax

    conditioning.check_sample_args(args, common.read_config(common.run_dir_of(run_dir)))  # before any work
    cfg, trainer, state, shape = load_run(run_dir, step=args.step)
    model = trainer.model(state, ema=trainer.ema_decay is not None)
    if conditioning.is_inverse_problem(args):  # inpainting / super-resolution of observed images
        return conditioning.inverse_command(cfg, model, shape, args)
    w = cfg.eval_guidance if args.guidance is None else args.guidance
    sampler = args.sampler or cfg.sampler
    if args.caption is not None or args.control is not None:
        inputs, lab, extra, title = conditioning.cli_inputs(cfg, shape, args)
        imgs, nfe = generate(model, cfg, inputs, w, jax.random.key(args.seed), sampler=sampler, steps=args.steps,
                             shape=shape, extra=extra)
        return common.write_samples(imgs, lab, args.out, nrow=min(len(lab), 16),
                                    title=f"{title}, w = {w:g}, {sampler} (NFE {nfe})", what=f"{sampler}, NFE {nfe}")
    labels, lab = common.sample_labels(args, cfg.num_classes)
    inputs, extra = conditioning.inputs_for_labels(cfg, lab, shape)
    imgs, nfe = generate(model, cfg, inputs, w, jax.random.key(args.seed), sampler=sampler, steps=args.steps,
                         shape=shape, extra=extra)
    return common.write_samples(imgs, lab, args.out, nrow=min(args.num, 16),
                                title=f"labels {labels}, w = {w:g}, {sampler} (NFE {nfe})", what=f"{sampler}, NFE {nfe}")


def evaluate_command(run_dir: str, args) -> str:
    """``jaxgen evaluate`` on an image run: the report (with ``--sampler``/``--steps`` if given)."""
    cfg, trainer, state, shape = load_run(run_dir, step=args.step)
    if args.sampler:
        cfg = dataclasses.replace(cfg, sampler=args.sampler)
    if args.steps:
        cfg = dataclasses.replace(cfg, sample_steps=args.steps)
    out = args.out or common.run_dir_of(run_dir)
    os.makedirs(out, exist_ok=True)
    report = finalize(cfg, out, trainer, state, shape)
    common.write_json(os.path.join(out, "report.json"), report)
    with open(os.path.join(out, "report.md")) as fh:
        return fh.read()
