r"""Differentiating through generation: research examples on a 2-D flow, one ``jaxgen train`` each.

Each example takes a trained velocity field ``u_theta`` (flow matching ``N(0, I) -> target``, trained here for
``base_steps`` fused steps, or the toy2d run ``base_run``) and differentiates a function of its samples
``Phi(x_0; theta, ts)``, the K-step solve of ``dx/dt = u_theta(x, t)`` from noise at ``t = 0`` to data at ``t = 1``,
with ``jax.grad`` through :func:`jaxgen.samplers.sample` (discretise-then-optimise: the exact gradient of the K-step
map), optimised by optax's Adam in jitted ``lax.scan`` chunks (:func:`optimise`):

* ``invert_noise``: the noise ``x_0`` with ``Phi(x_0) = y`` for held-out data ``y``, against the ODE run backwards;
* ``learn_time_grid``: a monotone K-step grid ``[0, cumsum(softmax(a))]`` against the uniform one at equal NFE;
* ``learn_guidance``: the classifier-free guidance scale ``w`` of a class-conditional flow on 8 Gaussians;
* ``reward_finetune``: DRaFT/AlignProp (Clark et al. 2023; Prabhudesai et al. 2023), the parameters fine-tuned on a
  reward backpropagated through the sampler, with a drift-change penalty keeping them near the base.

Outputs in ``--out``: ``report.md`` (printed by the CLI), ``metrics.json``, ``config.json``, ``<task>.png``,
``opt_loss.png`` and, for a base trained in place, ``checkpoints/`` and ``loss.png``. Another example may reuse the
directory (``task`` is free): it resumes the base instead of training it (learn_guidance's base is conditional).
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import ClassVar

import numpy as np

from experiments import common

TASKS = ("invert_noise", "learn_time_grid", "learn_guidance", "reward_finetune")
GRID_OBJECTIVES = ("distill", "sliced_w2")


@dataclasses.dataclass
class DifferentiableConfig:
    """One example of differentiating through a sampler (:mod:`experiments.differentiable`)."""

    experiment: ClassVar[str] = "differentiable"
    name: str = "toy2d_invert_noise"
    task: str = "invert_noise"  # one of TASKS
    # the base flow N(0, I) -> target: trained here, or a toy2d run directory with a Gaussian source
    base_run: str = ""
    target: str = "moons"
    base_steps: int = 3000
    base_batch_size: int = 256
    base_learning_rate: float = 1e-3
    base_width: int = 64
    base_hidden_layers: int = 3
    base_ema_decay: float = 0.999
    label_dropout: float = 0.2  # learn_guidance: the conditional base learns u(x|null) too
    seed: int = 0
    checked: bool = True  # jaxgen's checked mode for the base's training batches
    # the differentiated sampler and the optimisation
    solver: str = "euler"
    sample_steps: int = 8  # K
    opt_steps: int = 300
    opt_learning_rate: float = 0.05
    opt_batch: int = 256  # points inverted / noise draws per optimisation step
    num_eval: int = 2048  # fresh noise for the before/after numbers
    chunk: int = 100  # optimisation steps per compiled chunk (progress bar)
    prior_weight: float = 1e-3  # invert_noise: lambda
    reference_steps: int = 100  # RK4 steps of the accurate solves (the exact inversion, the grid's reference)
    grid_objective: str = "distill"  # learn_time_grid: one of GRID_OBJECTIVES
    guidance_init: float = 0.0  # learn_guidance: w at the start
    drift_weight: float = 0.1  # reward_finetune: lambda


# The base's training uses only the other fields: these may change when a run directory is reused.
FREE_FIELDS = frozenset({
    "task", "base_steps", "checked", "solver", "sample_steps", "opt_steps", "opt_learning_rate", "opt_batch",
    "num_eval", "chunk", "prior_weight", "reference_steps", "grid_objective", "guidance_init", "drift_weight"})
_RULES = {  # field: (check, what a good value is)
    "task": (lambda v: v in TASKS, f"choose one of {', '.join(TASKS)}"),
    "grid_objective": (lambda v: v in GRID_OBJECTIVES, f"choose one of {', '.join(GRID_OBJECTIVES)}"),
    "base_ema_decay": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
    "label_dropout": (lambda v: 0 < v < 1, "must be in (0, 1) (guidance needs u(x|null))"),
    **{k: (lambda v: v >= 0, "must be >= 0") for k in ("base_steps", "prior_weight", "drift_weight")},
    **{k: (lambda v: v > 0, "must be > 0") for k in ("base_learning_rate", "opt_learning_rate")},
    **{k: (lambda v: v >= 1, "must be >= 1") for k in ("base_batch_size", "base_width", "base_hidden_layers",
                                                       "sample_steps", "opt_steps", "chunk", "reference_steps")},
    **{k: (lambda v: v >= 16, "must be >= 16") for k in ("opt_batch", "num_eval")},
}
_GAUSSIAN = ("gaussian", "normal", "standard_normal")


def check_config(cfg: DifferentiableConfig) -> None:
    """Clear errors for a bad config, before any work."""
    from jaxgen.data.toy2d import get_distribution
    from jaxgen.samplers import get_solver

    common.check_fields(cfg, {k: c for k, (c, _) in _RULES.items()}, {k: h for k, (_, h) in _RULES.items()})
    solver = get_solver(cfg.solver)
    if not solver.takes_steps() or solver.needs_key():
        raise ValueError(f"config field solver={cfg.solver!r} is invalid: the differentiated sampler must be a "
                         "deterministic fixed-step solver (euler, heun, midpoint, rk4, ...).")
    if cfg.task == "learn_guidance":
        if cfg.base_run:
            raise ValueError("learn_guidance trains its own class-conditional base (8 Gaussians, label = mode); leave "
                             "base_run empty (toy2d runs are unconditional).")
        if cfg.target not in ("8gaussians", "eight_gaussians", "8_gaussians"):
            raise ValueError(f"learn_guidance's data are the 8 Gaussians labelled by mode; got target={cfg.target!r} "
                             "(set target=8gaussians).")
        if cfg.opt_batch % 8 or cfg.num_eval % 8:
            raise ValueError("learn_guidance samples the 8 classes equally: opt_batch and num_eval must be multiples "
                             "of 8.")
    elif cfg.base_run:
        raw = common.read_config(common.run_dir_of(cfg.base_run))
        if raw["experiment"] != "toy2d" or raw.get("source") not in _GAUSSIAN:
            raise ValueError(f"base_run={cfg.base_run!r} must be a toy2d run with a Gaussian source (jaxgen train "
                             f"toy2d_gaussian_to_moons), got a {raw['experiment']} run with source "
                             f"{raw.get('source')!r}.")
    else:
        get_distribution(cfg.target)
    common.check_batch_size(cfg.base_batch_size, "base_batch_size")


# ---------------------------------------------------------------------------------------------------------------
# The base flow and the optimisation loop.
# ---------------------------------------------------------------------------------------------------------------

_S = 2 ** -0.5
MODES = 5.0 * np.array([[1, 0], [-1, 0], [0, 1], [0, -1], [_S, _S], [_S, -_S], [-_S, _S], [-_S, -_S]], np.float32)
MODE_STD = 0.1 ** 0.25


def eight_gaussians_labelled(key, n: int) -> dict:
    """TorchCFM's 8 Gaussians (:func:`jaxgen.data.toy2d.eight_gaussians`: radius 5, std ``0.1 ** 0.25``) with each
    point's mode index as its label: ``{"x": (n, 2), "y": (n,)}``."""
    import jax

    ky, kx = jax.random.split(key)
    y = jax.random.randint(ky, (n,), 0, 8)
    return {"x": jax.numpy.asarray(MODES)[y] + MODE_STD * jax.random.normal(kx, (n, 2)), "y": y}


def base_flow(cfg: DifferentiableConfig, out: str, progress: bool) -> dict:
    """``{"field", "path", "target", "info"}``: the base velocity field (EMA weights), its path and data sampler
    ``target(key, n)``; trained in ``out/checkpoints`` (resumed there) unless ``cfg.base_run`` names a toy2d run."""
    import jax
    from flax import nnx

    from jaxgen.data.toy2d import get_distribution
    from jaxgen.losses import flow_matching_loss
    from jaxgen.models import MLPField
    from jaxgen.paths import GaussianPath
    from jaxgen.training import Trainer, adam_with_schedule

    if cfg.base_run:
        from experiments import toy2d

        tcfg, trainer, state = toy2d.load_run(cfg.base_run)
        return {"field": trainer.model(state, ema=trainer.ema_decay is not None),
                "path": GaussianPath.from_name(tcfg.schedule), "target": get_distribution(tcfg.target),
                "info": {"from": common.run_dir_of(cfg.base_run), "target": tcfg.target, "steps": int(state.step)}}
    path = GaussianPath.from_name("linear")
    guided = cfg.task == "learn_guidance"
    if guided:
        data, target = eight_gaussians_labelled, lambda key, n: eight_gaussians_labelled(key, n)["x"]
        loss = flow_matching_loss(path, label_dropout=cfg.label_dropout, null_label=8)
    else:
        data = target = get_distribution(cfg.target)
        loss = flow_matching_loss(path)
    model = MLPField(2, width=cfg.base_width, hidden_layers=cfg.base_hidden_layers, num_classes=8 if guided else None,
                     rngs=nnx.Rngs(cfg.seed))
    trainer = Trainer(model, loss, adam_with_schedule(cfg.base_learning_rate, total_steps=cfg.base_steps),
                      data=lambda key: data(key, cfg.base_batch_size), checked=cfg.checked, mesh=common.mesh(),
                      ema_decay=cfg.base_ema_decay if cfg.base_ema_decay > 0 else None)
    state, losses, _ = common.train(trainer, trainer.init(jax.random.key(cfg.seed)), out=out, steps=cfg.base_steps,
                                    checkpoint_every=max(cfg.base_steps, 1), chunk=1000, progress=progress,
                                    config=common.config_record(cfg))
    info = {"from": "trained here", "target": "8gaussians (labelled)" if guided else cfg.target,
            "steps": int(state.step), "steps_this_session": len(losses),
            "final_loss_mean_last_500": float(np.mean(losses[-500:])) if len(losses) else None}
    return {"field": trainer.model(state, ema=trainer.ema_decay is not None), "path": path, "target": target,
            "info": info}


def optimise(loss_fn, params, tx, steps: int, key, *, chunk: int, progress: bool, desc: str):
    """Minimise ``loss_fn(params, key) -> scalar`` with the optax transformation ``tx``: ``steps`` steps, step ``i``
    with ``fold_in(key, i)``, run as jitted ``lax.scan`` chunks of ``chunk`` steps under a progress bar. Returns
    ``(params, losses, seconds)``; a non-finite loss stops it with an error naming the step."""
    import jax
    import jax.numpy as jnp
    import optax
    from tqdm.auto import tqdm

    def body(carry, i):
        p, s = carry
        value, grad = jax.value_and_grad(loss_fn)(p, jax.random.fold_in(key, i))
        updates, s = tx.update(grad, s, p)
        return (optax.apply_updates(p, updates), s), value

    run = jax.jit(lambda carry, start, n: jax.lax.scan(body, carry, start + jnp.arange(n)), static_argnums=2)
    carry, losses, done, t = (params, tx.init(params)), [], 0, time.perf_counter()
    with tqdm(total=steps, desc=desc, disable=not progress or not common.writes(), unit="step") as bar:
        while done < steps:
            n = min(chunk, steps - done)
            carry, values = run(carry, done, n)
            values = np.asarray(values)
            if not np.all(np.isfinite(values)):
                raise FloatingPointError(f"{desc}: the loss became non-finite at step "
                                         f"{done + int(np.argmax(~np.isfinite(values)))}; lower opt_learning_rate.")
            losses.append(values)
            done += n
            bar.update(n)
            bar.set_postfix(loss=f"{values[-1]:.4g}")
    return carry[0], np.concatenate(losses), round(time.perf_counter() - t, 2)


def _solve(field, x0, cfg, **kw):
    """``cfg.solver`` from ``x0`` with ``cfg.sample_steps`` uniform steps (or the grid ``ts=``)."""
    from jaxgen.samplers import sample

    return sample(field, x0, cfg.solver, **({} if "ts" in kw else {"steps": cfg.sample_steps}), **kw)


def _sw2(x, y, key, projections: int = 128):
    from jaxgen import metrics

    return metrics.sliced_wasserstein(x, y, key, num_projections=projections)


def _mean_norm(d) -> float:
    import jax.numpy as jnp

    return float(jnp.mean(jnp.linalg.norm(d, axis=-1)))


# ---------------------------------------------------------------------------------------------------------------
# The examples: each returns (metrics, report lines, plot panels, optimisation losses).
# ---------------------------------------------------------------------------------------------------------------

def invert_noise(cfg, base, key, progress):
    """Noise-space inversion: minimise ``|Phi(x_0) - y|^2 + lambda |x_0|^2 / 2`` over ``x_0`` (the second term is
    ``-lambda log N(x_0; 0, I)`` + const) by Adam with a cosine decay from a random draw, for held-out data ``y``;
    against the exact inversion, the ODE integrated backwards from ``y`` at ``t = 1`` to ``t = 0`` (RK4 with
    ``reference_steps`` steps), which inverts the continuous flow rather than the K-step sampler."""
    import jax
    import jax.numpy as jnp
    import optax

    from jaxgen.samplers import sample

    field, path, (k_y, k_0) = base["field"], base["path"], jax.random.split(key)
    lo, hi = float(path.schedule.t_min), float(path.schedule.t_max)
    y = base["target"](k_y, cfg.opt_batch)  # fresh draws: held-out data
    forward = jax.jit(lambda x0: _solve(field, x0, cfg, path=path).x)
    loss = lambda x0, _: jnp.mean(jnp.sum((_solve(field, x0, cfg, path=path).x - y) ** 2, -1)
                                  + cfg.prior_weight * 0.5 * jnp.sum(x0 ** 2, -1))
    x_init = path.sample_prior(k_0, y.shape)
    tx = optax.adam(optax.cosine_decay_schedule(cfg.opt_learning_rate, cfg.opt_steps))
    x_opt, losses, seconds = optimise(loss, x_init, tx, cfg.opt_steps, key, chunk=cfg.chunk, progress=progress,
                                      desc="invert")
    ode = jax.jit(lambda x, t0, t1: sample(field, x, "rk4", path=path, steps=cfg.reference_steps, t0=t0, t1=t1).x)
    x_ode = ode(y, hi, lo)  # the exact inversion: t = 1 -> 0
    half_sq = lambda x: float(jnp.mean(0.5 * jnp.sum(x ** 2, -1)))
    m = {"points": cfg.opt_batch, "sampler": f"{cfg.solver} x {cfg.sample_steps}", "seconds": seconds,
         "error_before": _mean_norm(forward(x_init) - y), "error_after": _mean_norm(forward(x_opt) - y),
         "error_ode_inversion": _mean_norm(forward(x_ode) - y),
         "ode_roundtrip_error": _mean_norm(ode(x_ode, lo, hi) - y),
         "distance_to_ode_inversion": _mean_norm(x_opt - x_ode),
         "half_sq_norm": {"gradient": half_sq(x_opt), "ode": half_sq(x_ode), "N(0,I) expected": 1.0}}
    lines = [f"Inverting {cfg.opt_batch} held-out {base['info']['target']} points y through {m['sampler']} (Adam, "
             f"{cfg.opt_steps} steps, prior weight {cfg.prior_weight}, {seconds} s). Mean |Phi(x0) - y|:", "",
             "| x0 | error |", "|---|---|", f"| random N(0, I) draw (the start) | {m['error_before']:.4f} |",
             f"| gradient inversion | {m['error_after']:.2e} |",
             f"| exact inversion (RK4 x {cfg.reference_steps} backwards) | {m['error_ode_inversion']:.4f} |", "",
             f"The exact inversion inverts the continuous ODE (RK4 round trip: {m['ode_roundtrip_error']:.1e}); the "
             f"gradient one inverts the {m['sampler']} sampler itself. Mean |x0_grad - x0_ode| = "
             f"{m['distance_to_ode_inversion']:.3f}; mean |x0|^2/2: {m['half_sq_norm']['gradient']:.3f} (gradient), "
             f"{m['half_sq_norm']['ode']:.3f} (ODE), 1 under N(0, I)."]
    arrays = [np.asarray(a) for a in (x_init, x_ode, x_opt, y, forward(x_ode), forward(x_opt))]
    panels = [("noise space", list(zip(arrays[:3], ("start", "ODE inversion", "gradient inversion"), _COLORS, ".x."))),
              ("data space", list(zip(arrays[3:], ("targets y", "Phi(x0_ode)", "Phi(x0_grad)"),
                                      ("black", "tab:orange", "tab:blue"), "ox.")))]
    return m, lines, panels, losses


def learn_time_grid(cfg, base, key, progress):
    """A K-step grid ``ts(a) = t_min + (t_max - t_min) [0, cumsum(softmax(a))]`` (monotone by construction; ``a = 0``
    is uniform) learned by Adam on ``E |Phi(x_0; ts(a)) - Phi_ref(x_0)|^2`` (trajectory distillation onto RK4 with
    ``reference_steps`` steps, over a pool of 16 batches of noise solved once) or on the sliced ``W_2^2`` to data;
    uniform against learned grid at equal NFE on fresh noise."""
    import jax
    import jax.numpy as jnp
    import optax

    from jaxgen.samplers import sample

    field, path = base["field"], base["path"]
    lo, hi = float(path.schedule.t_min), float(path.schedule.t_max)
    reference = jax.jit(lambda x0: sample(field, x0, "rk4", path=path, steps=cfg.reference_steps).x)
    grid = lambda a: lo + (hi - lo) * jnp.concatenate([jnp.zeros(1), jnp.cumsum(jax.nn.softmax(a))]).at[-1].set(1.0)
    pool = path.sample_prior(jax.random.fold_in(key, 10 ** 6 + 1), (16 * cfg.opt_batch, 2))
    pool_ref = reference(pool) if cfg.grid_objective == "distill" else None

    def loss(a, key):
        i = jax.random.randint(key, (cfg.opt_batch,), 0, pool.shape[0])
        x = _solve(field, pool[i], cfg, ts=grid(a), path=path).x
        if cfg.grid_objective == "distill":
            return jnp.mean(jnp.sum((x - pool_ref[i]) ** 2, -1))
        return _sw2(x, base["target"](jax.random.fold_in(key, 1), x.shape[0]), jax.random.fold_in(key, 2)) ** 2

    a, losses, seconds = optimise(loss, jnp.zeros(cfg.sample_steps), optax.adam(cfg.opt_learning_rate),
                                  cfg.opt_steps, key, chunk=cfg.chunk, progress=progress, desc="grid")
    k_0, k_d, k_p = jax.random.split(jax.random.fold_in(key, 10 ** 6), 3)  # fresh noise, data and projections
    x0 = path.sample_prior(k_0, (cfg.num_eval, 2))
    ref, data = reference(x0), base["target"](k_d, cfg.num_eval)
    runs = {"uniform": _solve(field, x0, cfg, path=path), "learned": _solve(field, x0, cfg, ts=grid(a), path=path),
            "uniform_2K": sample(field, x0, cfg.solver, path=path, steps=2 * cfg.sample_steps)}
    m = {"sampler": cfg.solver, "steps": cfg.sample_steps, "objective": cfg.grid_objective, "seconds": seconds,
         "learned_ts": [round(float(v), 4) for v in grid(a)], "reference": {"sliced_w2": float(_sw2(ref, data, k_p))},
         **{k: {"nfe": int(r.nfe), "distill_mse": float(jnp.mean(jnp.sum((r.x - ref) ** 2, -1))),
                "sliced_w2": float(_sw2(r.x, data, k_p))} for k, r in runs.items()}}
    lines = [f"{cfg.solver} with {cfg.sample_steps} steps; grid learned by Adam on the {cfg.grid_objective} objective "
             f"({cfg.opt_steps} steps, {seconds} s). On {cfg.num_eval} fresh noise draws:", "",
             "| grid | NFE | mean squared distance to the reference solve | sliced W2 to data |", "|---|---|---|---|",
             *[f"| {k} | {m[k]['nfe']} | {m[k]['distill_mse']:.4f} | {m[k]['sliced_w2']:.4f} |" for k in runs],
             f"| reference (RK4 x {cfg.reference_steps}) | {4 * cfg.reference_steps} | 0 | "
             f"{m['reference']['sliced_w2']:.4f} |", "",
             "Learned grid: " + ", ".join(map("{:.3f}".format, m["learned_ts"]))]
    samples = [np.asarray(x) for x in (ref, runs["uniform"].x, runs["learned"].x)]
    panels = [("time grids", np.stack([np.asarray(grid(jnp.zeros(cfg.sample_steps))), np.asarray(grid(a))])),
              ("samples", list(zip(samples, ("reference", "uniform grid", "learned grid"), _COLORS, "...")))]
    return m, lines, panels, losses


def learn_guidance(cfg, base, key, progress):
    """The guidance scale ``w`` of ``u_w = (1 - w) u(x|null) + w u(x|y)`` minimising ``mean_y SW_2^2(samples of class
    y, data of class y)`` (too small a ``w`` mixes the modes, too large a one shrinks them: fidelity and diversity in
    one objective), by Adam on ``w``; a sweep of the same objective over ``w`` on fresh noise checks it."""
    import jax
    import jax.numpy as jnp
    import optax

    from jaxgen.fields import guided_field

    field, path, modes = base["field"], base["path"], jnp.asarray(MODES)

    def evaluate(w, key, n):
        """``(objective, label accuracy, within-class std, samples)`` of ``n`` guided samples, ``n / 8`` per class."""
        k_0, k_d, k_p = jax.random.split(key, 3)
        labels = jnp.repeat(jnp.arange(8), n // 8)
        x = _solve(guided_field(field, w, null_label=8), path.sample_prior(k_0, (n, 2)), cfg, path=path,
                   cond={"y": labels}).x
        data = modes[:, None] + MODE_STD * jax.random.normal(k_d, (8, n // 8, 2))
        sw = jax.vmap(lambda a, b, k: _sw2(a, b, k, 64) ** 2)(x.reshape(8, n // 8, 2), data, jax.random.split(k_p, 8))
        nearest = jnp.argmin(jnp.sum((x[:, None] - modes[None]) ** 2, -1), 1)  # Bayes classifier of equal modes
        return jnp.mean(sw), jnp.mean(nearest == labels), jnp.sqrt(jnp.mean(jnp.var(x.reshape(8, -1, 2), 1))), x

    w, losses, seconds = optimise(lambda w, k: evaluate(w, k, cfg.opt_batch)[0],
                                  jnp.asarray(cfg.guidance_init, jnp.float32), optax.adam(cfg.opt_learning_rate),
                                  cfg.opt_steps, key, chunk=cfg.chunk, progress=progress, desc="guidance")
    w = float(w)
    on_fresh = jax.jit(jax.vmap(lambda v: evaluate(v, jax.random.fold_in(key, 10 ** 6), cfg.num_eval)))
    sweep_w = np.round(np.linspace(0.0, 4.0, 17), 2)
    at_w = (0.0, 1.0, round(w, 3), 3.0)
    obj, acc, std, xs = map(np.asarray, on_fresh(jnp.asarray([*sweep_w, *at_w], jnp.float32)))
    m = {"learned_w": w, "start_w": cfg.guidance_init, "seconds": seconds,
         "sampler": f"{cfg.solver} x {cfg.sample_steps}",
         "sweep": {"w": sweep_w.tolist(), "objective": obj[:17].tolist()}, "data_within_class_std": MODE_STD,
         "at": {f"w={v:g}": {"objective": float(obj[17 + i]), "accuracy": float(acc[17 + i]),
                             "within_class_std": float(std[17 + i])} for i, v in enumerate(at_w)}}
    lines = [f"Guidance scale learned by Adam from w = {cfg.guidance_init} ({cfg.opt_steps} steps, {seconds} s): "
             f"**w = {w:.3f}**; the sweep's best w is {sweep_w[int(np.argmin(obj[:17]))]:g} (grid step 0.25). "
             f"{cfg.num_eval} fresh samples, {m['sampler']}:", "",
             "| w | class-mean sliced W2^2 | label accuracy | within-class std |", "|---|---|---|---|",
             *[f"| {k[2:]} | {s['objective']:.4f} | {s['accuracy']:.3f} | {s['within_class_std']:.3f} |"
               for k, s in m["at"].items()], f"| data | 0 | 1 | {MODE_STD:.3f} |"]
    panels = [("objective against w", (sweep_w, obj[:17], w)),
              ("samples", [(xs[17], "w = 0", "lightgray", "."), (xs[19], f"w = {w:.2f}", "tab:blue", ".")])]
    return m, lines, panels, losses


def reward_finetune(cfg, base, key, progress):
    """DRaFT: Adam on ``theta`` maximising ``E r(Phi(x_0; theta)) - lambda E mean_k |u_theta(x_k, t_k) -
    u_base(x_k, t_k)|^2`` with ``r(x) = -max(0, -x[0])`` (minus the distance to the right half-plane) and ``x_k`` the
    sampled path: the drift change integrated along it (the KL of two SDEs with these drifts, by Girsanov, up to
    the noise scale) keeps the model near the base."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    field, path = base["field"], base["path"]
    graphdef, params, rest = nnx.split(field, nnx.Param, ...)
    reward = lambda x: -jax.nn.relu(-x[:, 0])

    def loss(p, key):
        model = nnx.merge(graphdef, p, rest)
        res = _solve(model, path.sample_prior(key, (cfg.opt_batch, 2)), cfg, path=path, save_trajectory=True)
        change = lambda x, t: jnp.sum((model(x, t) - field(x, t)) ** 2, -1)
        drift = jax.vmap(lambda x, t: jnp.mean(change(x, jnp.full(x.shape[0], t))))(res.trajectory[:-1], res.ts[:-1])
        return -jnp.mean(reward(res.x)) + cfg.drift_weight * jnp.mean(drift)

    tuned, losses, seconds = optimise(loss, params, optax.adam(cfg.opt_learning_rate), cfg.opt_steps, key,
                                      chunk=cfg.chunk, progress=progress, desc="finetune")
    k_0, k_d = jax.random.split(jax.random.fold_in(key, 10 ** 6))
    x0, data = path.sample_prior(k_0, (cfg.num_eval, 2)), base["target"](k_d, cfg.num_eval)
    half = cfg.num_eval // 2
    xs = {"base": _solve(field, x0, cfg, path=path).x,
          "fine-tuned": _solve(nnx.merge(graphdef, tuned, rest), x0, cfg, path=path).x, "data": data[:half]}
    nearest = lambda x: float(jnp.mean(jnp.sqrt(jnp.min(jnp.sum((x[:, None] - data[None, half:]) ** 2, -1), 1))))
    stats = {k: {"reward": float(jnp.mean(reward(x))), "fraction_right": float(jnp.mean(x[:, 0] > 0)),
                 "distance_to_nearest_data_point": nearest(x)} for k, x in xs.items()}
    m = {"sampler": f"{cfg.solver} x {cfg.sample_steps}", "reward": "-max(0, -x[0])", "drift_weight": cfg.drift_weight,
         "seconds": seconds, **stats}
    lines = [f"Fine-tuned by backpropagating the reward through {m['sampler']} (Adam {cfg.opt_learning_rate}, "
             f"{cfg.opt_steps} steps of {cfg.opt_batch} samples, drift penalty {cfg.drift_weight}, {seconds} s). "
             f"{cfg.num_eval} fresh samples ({half} data points against the other {half}):", "",
             "| | mean reward -max(0, -x[0]) | fraction with x[0] > 0 | mean distance to the nearest data point |",
             "|---|---|---|---|", *[f"| {k} | {s['reward']:.4f} | {s['fraction_right']:.3f} | "
                                    f"{s['distance_to_nearest_data_point']:.4f} |" for k, s in stats.items()]]
    sets = [np.asarray(xs[k]) for k in ("data", "base", "fine-tuned")]
    panels = [("samples", list(zip(sets, ("data", "base", "fine-tuned"), _COLORS, "...")))]
    return m, lines, panels, losses


# ---------------------------------------------------------------------------------------------------------------
# The command line.
# ---------------------------------------------------------------------------------------------------------------

def train(cfg: DifferentiableConfig, out: str, *, progress: bool = True) -> dict:
    """The base flow (trained here and resumed from ``out/checkpoints``, or loaded from ``base_run``), then the
    example ``cfg.task``; writes ``metrics.json``, ``report.md`` and the plots."""
    import jax

    check_config(cfg)
    out = os.path.abspath(out)
    common.check_resume(out, cfg, FREE_FIELDS)
    if os.path.exists(os.path.join(out, "config.json")) and \
            (common.read_config(out).get("task") == "learn_guidance") != (cfg.task == "learn_guidance"):
        raise ValueError(f"{out} holds the base of another kind of example (learn_guidance's base is "
                         "class-conditional, the others' are not); choose another --out directory.")
    common.write_config(out, cfg)
    t = time.perf_counter()
    base = base_flow(cfg, out, progress)
    base["info"]["seconds"] = round(time.perf_counter() - t, 2)
    task = {"invert_noise": invert_noise, "learn_time_grid": learn_time_grid, "learn_guidance": learn_guidance,
            "reward_finetune": reward_finetune}[cfg.task]
    metrics, lines, panels, losses = task(cfg, base, jax.random.key(cfg.seed + 1), progress)
    report = {"config": cfg.name, "task": cfg.task, "base": base["info"], cfg.task: metrics}
    common.write_json(os.path.join(out, "metrics.json"), report)
    if common.writes():
        b = base["info"]
        head = [f"# {cfg.name}: {cfg.task.replace('_', ' ')}", "",
                f"Base flow N(0, I) -> {b['target']}: {b['from']}, {b['steps']} steps ({b['seconds']} s).", ""]
        with open(os.path.join(out, "report.md"), "w") as fh:
            fh.write("\n".join(head + lines) + "\n")
        common.plot_loss(losses, os.path.join(out, "opt_loss.png"), ylabel=f"{cfg.task} objective")
        _plot(os.path.join(out, f"{cfg.task}.png"), panels, cfg.name)
    return report


_COLORS = ("lightgray", "tab:orange", "tab:blue")


def _plot(path: str, panels, title: str) -> None:
    """Scatter panels ``(title, [(points, label, color, marker), ...])``, the time grids or the guidance sweep."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 5), squeeze=False)
    for ax, (name, content) in zip(axes[0], panels):
        ax.set_title(name)
        if name == "time grids":
            for row, ts in enumerate(content):
                ax.plot(ts, np.full_like(ts, row), "|-", ms=20, color=_COLORS[1 + row])
            ax.set_yticks([0, 1], ["uniform", "learned"])
            ax.set_ylim(-0.5, 1.5)
            ax.set_xlabel("t (0: noise, 1: data)")
        elif name == "objective against w":
            ws, values, learned = content
            ax.plot(ws, values, "o-", color="tab:gray", label="sweep (fresh noise)")
            ax.axvline(learned, color="tab:blue", label=f"learned w = {learned:.2f}")
            ax.set(xlabel="guidance scale w", ylabel="class-mean sliced W2^2", yscale="log")
            ax.legend()
        else:
            for pts, label, color, marker in content:
                ax.scatter(pts[:, 0], pts[:, 1], s=14 if marker == "o" else 6, color=color, marker=marker, alpha=0.6,
                           label=label)
            ax.set_aspect("equal")
            ax.legend(markerscale=2, fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sample_command(run_dir: str, args) -> str:
    """Not available: these examples report in their run directory."""
    raise ValueError(f"{run_dir} is a differentiable-sampling example: its results are report.md, metrics.json and "
                     "the plots of its run directory; `jaxgen sample` and `jaxgen evaluate` apply to toy2d and image "
                     "runs (a toy2d run can be the base of these examples: --set base_run=RUN).")


evaluate_command = sample_command
