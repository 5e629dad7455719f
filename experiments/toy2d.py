"""2-D flow matching end to end: train, sample (Euler, adaptive, Euler-Maruyama), evaluate, plot.

Run it through the shared command line (configs ``experiments/configs/toy2d_*.py``)::

    jaxgen train toy2d_8gaussians_to_moons --out runs/toy2d                 # ./run.sh toy2d
    jaxgen train toy2d_gaussian_to_checkerboard --set steps=30000 --set schedule=cosine
    jaxgen sample --checkpoint runs/toy2d --sampler dpm_solver_pp --steps 8
    jaxgen evaluate --checkpoint runs/toy2d --sampler heun --steps 16

Outputs in the run directory: ``samples.npy`` (Euler samples), ``samples_adaptive.npy``, ``metrics.json``,
``samples.png`` (source / samples / target scatter), ``trajectories.png``, ``loss.png``, ``config.json``,
``checkpoints/``, ``metrics.jsonl``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import ClassVar

import numpy as np

from experiments import common


@dataclasses.dataclass
class Toy2DConfig:
    """One 2-D flow-matching experiment (:mod:`experiments.toy2d`)."""

    experiment: ClassVar[str] = "toy2d"
    name: str = "toy2d_8gaussians_to_moons"
    source: str = "8gaussians"  # "gaussian" (N(0, I)) or any jaxgen.data.toy2d distribution
    target: str = "moons"
    schedule: str = "linear"  # probability path (linear = CondOT)
    sigma_min: float = 0.0  # linear schedule only: beta_t = 1 - (1 - sigma_min) t (target CFM, Lipman et al. 2023)
    bridge_noise: float = 0.0  # > 0: interpolant noise gamma_t xi of scale sigma = bridge_noise (SB-CFM / interpolant)
    bridge_gamma: str = "brownian_bridge"  # gamma_t: sigma sqrt(t(1-t)) (brownian_bridge) or sigma t(1-t) (quadratic)
    coupling: str = "independent"  # jaxgen.couplings spec: "exact" (OT-CFM), "sinkhorn:epsilon=0.5", ...
    coupling_scope: str = "device"  # several devices: OT within each device's shard ("device") or the global batch
    train_score: bool = False  # also learn the score (needs bridge_noise > 0); Euler-Maruyama then uses both fields
    steps: int = 20_000
    batch_size: int = 256
    learning_rate: float = 1e-3
    warmup_steps: int = 0
    lr_decay: bool = True  # cosine decay of the learning rate to 0 over `steps` (false: constant, TorchCFM's recipe)
    width: int = 64
    hidden_layers: int = 3
    activation: str = "selu"
    init: str = "lecun_normal"  # dense layers' initialisation: Flax's "lecun_normal" or "pytorch" (TorchCFM's MLP)
    ema_decay: float = 0.999
    seed: int = 0
    euler_steps: int = 100
    adaptive_method: str = "tsit5"
    adaptive_tol: float = 1e-5
    num_samples: int = 2048
    sde_sigma: float = 0.5  # Euler-Maruyama noise level (Gaussian source only)
    chunk: int = 1000
    checkpoint_every: int = 5000
    checked: bool = True  # jaxgen's checked mode: each batch checked on the device (finite); overhead within noise


# Fields that may change when a run is resumed.
FREE_FIELDS = frozenset({"steps", "euler_steps", "adaptive_method", "adaptive_tol", "num_samples", "sde_sigma",
                         "chunk", "checkpoint_every", "checked"})


def check_config(cfg: Toy2DConfig) -> None:
    """Clear errors for a bad config, before any work."""
    from jaxgen.data.toy2d import get_distribution
    from jaxgen.paths import get_schedule

    common.check_fields(cfg, {
        "steps": lambda v: v >= 0, "batch_size": lambda v: v >= 1, "width": lambda v: v >= 1,
        "euler_steps": lambda v: v >= 1, "num_samples": lambda v: v >= 2, "chunk": lambda v: v >= 1,
        "checkpoint_every": lambda v: v >= 1, "learning_rate": lambda v: v > 0, "sde_sigma": lambda v: v >= 0,
    }, {
        "steps": "must be >= 0", "batch_size": "must be >= 1", "width": "must be >= 1", "euler_steps": "must be >= 1",
        "num_samples": "must be >= 2", "chunk": "must be >= 1", "checkpoint_every": "must be >= 1",
        "learning_rate": "must be > 0", "sde_sigma": "must be >= 0",
    })
    from jaxgen.models.mlp import ACTIVATIONS, INITS

    if cfg.activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {cfg.activation!r}; choose from {sorted(ACTIVATIONS)}.")
    if cfg.init not in INITS:
        raise ValueError(f"init must be one of {INITS} (Flax's default, or PyTorch nn.Linear's), got {cfg.init!r}.")
    get_distribution(cfg.target)
    if cfg.source not in ("gaussian", "normal", "standard_normal"):
        get_distribution(cfg.source)
    get_schedule(cfg.schedule)
    if cfg.sigma_min != 0.0 and cfg.schedule not in ("linear", "cond_ot"):
        raise ValueError(f"sigma_min (target CFM) applies to the linear schedule only, got schedule={cfg.schedule!r}; "
                         "use --set schedule=linear.")
    if not 0.0 <= cfg.sigma_min < 1.0:
        raise ValueError(f"sigma_min must be in [0, 1), got {cfg.sigma_min}.")
    if not (cfg.bridge_noise >= 0.0 and np.isfinite(cfg.bridge_noise)):
        raise ValueError(f"bridge_noise must be a finite number >= 0, got {cfg.bridge_noise}.")
    if cfg.bridge_gamma not in ("brownian_bridge", "quadratic"):
        raise ValueError(f"bridge_gamma must be 'brownian_bridge' (sigma sqrt(t(1-t))) or 'quadratic' (sigma t(1-t)), "
                         f"got {cfg.bridge_gamma!r}.")
    if cfg.train_score and cfg.bridge_noise <= 0:
        raise ValueError("train_score learns the score -xi/gamma_t of a stochastic interpolant: set bridge_noise > 0 "
                         "(e.g. --set bridge_noise=0.5), or train_score=false.")
    from jaxgen.couplings import get_coupling

    get_coupling(cfg.coupling)
    if cfg.coupling_scope not in ("device", "global"):
        raise ValueError(f"coupling_scope must be 'device' (OT within each device's shard of the batch) or 'global' "
                         f"(the whole batch, all-gathered), got {cfg.coupling_scope!r}.")
    if cfg.checked and cfg.coupling_scope == "device" and not _independent(cfg) and common.mesh() is not None:
        raise ValueError("checked mode cannot trace a per-device coupling on several devices (JAX's checkify does not "
                         "support the solver's while loops inside shard_map): pass --set checked=false, or --set "
                         "coupling_scope=global.")
    common.check_sampler(cfg.adaptive_method, rtol=cfg.adaptive_tol, atol=cfg.adaptive_tol)
    common.check_batch_size(cfg.batch_size)


def _independent(cfg: Toy2DConfig) -> bool:
    from jaxgen.couplings import IndependentCoupling, get_coupling

    return isinstance(get_coupling(cfg.coupling), IndependentCoupling)


def method_name(cfg: Toy2DConfig) -> str:
    """The TorchCFM name of a config's method: I-CFM, OT-CFM, SB-CFM, target CFM, VP-CFM, or ``"<schedule> FM"``."""
    ot = not _independent(cfg)
    if cfg.bridge_noise > 0:
        if cfg.bridge_gamma != "brownian_bridge":
            return f"stochastic interpolant ({cfg.bridge_gamma})" + (" + OT" if ot else "")
        return "SB-CFM" if ot else "SI (Brownian bridge)"
    if cfg.sigma_min > 0:
        return "target CFM" + (" + OT" if ot else "")
    base = {"linear": "CFM", "cond_ot": "CFM", "cosine": "VP-CFM"}.get(cfg.schedule, f"{cfg.schedule} FM")
    if base == "CFM":
        return "OT-CFM" if ot else "I-CFM"
    return base + (" + OT" if ot else "")


def _setup(cfg: Toy2DConfig):
    """``(path, target sampler, source sampler, gaussian_source, trainer)``; ``path`` is the Gaussian path or the
    stochastic interpolant the field is trained on."""
    import jax.numpy as jnp
    from flax import nnx

    from jaxgen.couplings import OnMesh, get_coupling
    from jaxgen.data.toy2d import get_distribution
    from jaxgen.losses import flow_matching_loss, velocity_and_score_loss
    from jaxgen.models import MLPField, VelocityAndScore
    from jaxgen.paths import GaussianPath, StochasticInterpolant
    from jaxgen.training import Trainer, adam_with_schedule

    options = {"sigma_min": cfg.sigma_min} if cfg.sigma_min > 0 else {}
    path = GaussianPath.from_name(cfg.schedule, **options)
    if cfg.bridge_noise > 0:
        path = StochasticInterpolant(path, gamma=cfg.bridge_gamma, sigma=cfg.bridge_noise)
    mesh = common.mesh()
    coupling = None if _independent(cfg) else get_coupling(cfg.coupling)
    if coupling is not None and mesh is not None:  # a sharded batch: per device, or the all-gathered global batch
        coupling = OnMesh(coupling=coupling, mesh=mesh, axis=mesh.axis_names[0],
                          per_device=cfg.coupling_scope == "device")
    make_loss = velocity_and_score_loss if cfg.train_score else flow_matching_loss
    target = get_distribution(cfg.target)
    gaussian_source = cfg.source in ("gaussian", "normal", "standard_normal")
    if gaussian_source:
        prior = path.path if isinstance(path, StochasticInterpolant) else path
        source_sampler = lambda key, n: prior.sample_prior(key, (n, 2))
        loss = make_loss(path, coupling=coupling)
    else:
        raw_source = get_distribution(cfg.source)
        loss = make_loss(path, source=raw_source, coupling=coupling)
        # x_0 = alpha_0 z + beta_0 x_source: beta_0 = 1 except for VE/EDM, whose prior is scaled up.
        beta0 = float(path.coefficients(jnp.zeros(())).beta)
        source_sampler = lambda key, n: beta0 * raw_source(key, n)

    def mlp(seed):
        return MLPField(2, width=cfg.width, hidden_layers=cfg.hidden_layers, activation=cfg.activation,
                        init=cfg.init, rngs=nnx.Rngs(seed))

    model = VelocityAndScore(mlp(cfg.seed), mlp(cfg.seed + 1)) if cfg.train_score else mlp(cfg.seed)
    optimizer = adam_with_schedule(cfg.learning_rate, total_steps=cfg.steps if cfg.lr_decay else None,
                                   warmup_steps=cfg.warmup_steps)
    trainer = Trainer(model, loss, optimizer, data=lambda key: target(key, cfg.batch_size),
                      ema_decay=cfg.ema_decay if cfg.ema_decay > 0 else None, checked=cfg.checked,
                      mesh=mesh)
    return path, target, source_sampler, gaussian_source, trainer


def decoding_path(cfg: Toy2DConfig, path):
    """The Gaussian path whose marginals the trained velocity has, for samplers that decode it into a score or noise
    (diffusion solvers, Euler-Maruyama): the schedule's path, or a Brownian-bridge interpolant's marginal path
    (:meth:`~jaxgen.paths.StochasticInterpolant.gaussian_path`); ``None`` when no Gaussian path describes the flow (a
    data source, or an optimal-transport coupling, which changes the marginals between the ends)."""
    from jaxgen.paths import StochasticInterpolant

    gaussian_source = cfg.source in ("gaussian", "normal", "standard_normal")
    if not gaussian_source or not _independent(cfg):
        return None
    return path.gaussian_path() if isinstance(path, StochasticInterpolant) else path


def _solver_for(cfg: Toy2DConfig, path, spec: str | None):
    """``(solver, decoding path)`` for ``spec`` (default Euler), refusing a solver that decodes the field when the run
    has no Gaussian path."""
    from jaxgen.samplers import Diffrax, Euler, Heun, Midpoint, RK4, get_solver

    solver = get_solver(spec) if spec else Euler()
    dpath = decoding_path(cfg, path)
    if dpath is None and not isinstance(solver, (Euler, Heun, Midpoint, RK4, Diffrax)):
        raise ValueError(f"sampler {spec!r} decodes the velocity into a score or noise on a Gaussian path, but this run "
                         f"({method_name(cfg)}, source {cfg.source!r}, coupling {cfg.coupling!r}) has none; use an "
                         "ODE solver: euler, midpoint, heun, rk4 or an adaptive one (tsit5, dopri5).")
    return solver, dpath


def train(cfg: Toy2DConfig, out: str, *, progress: bool = True) -> dict:
    """Train (resuming from ``out/checkpoints``), then sample with Euler, an adaptive solver and Euler-Maruyama, and
    write the metrics and plots."""
    import jax

    check_config(cfg)
    out = os.path.abspath(out)
    common.check_resume(out, cfg, FREE_FIELDS)
    path, target, source_sampler, gaussian_source, trainer = _setup(cfg)
    common.write_config(out, cfg)
    state, losses, seconds = common.train(trainer, trainer.init(jax.random.key(cfg.seed)), out=out, steps=cfg.steps,
                                          checkpoint_every=cfg.checkpoint_every, chunk=cfg.chunk, progress=progress,
                                          config=common.config_record(cfg))
    report = evaluate(cfg, out, trainer, state, losses=losses)
    report["train"] = {"steps": cfg.steps, "steps_this_session": int(len(losses)), "seconds": round(seconds, 2),
                       "steps_per_second": round(len(losses) / seconds, 1) if len(losses) else None,
                       "final_loss_mean_last_500": float(np.mean(losses[-500:])) if len(losses) else None}
    common.write_json(os.path.join(out, "metrics.json"), report)
    return report


def evaluate(cfg: Toy2DConfig, out: str, trainer, state, *, losses=None, sampler: str | None = None,
             steps: int | None = None) -> dict:
    """Samples of the trained field with Euler (or ``sampler``), the adaptive solver and (Gaussian source)
    Euler-Maruyama, their distances to fresh target samples, and the plots."""
    import jax

    from jaxgen import metrics
    from jaxgen.fields import interpolant_drift
    from jaxgen.samplers import Euler, EulerMaruyama, get_solver, sample

    path, target, source_sampler, gaussian_source, _ = _setup(cfg)
    field = trainer.model(state, ema=trainer.ema_decay is not None)
    keys = jax.random.split(jax.random.key(cfg.seed + 1), 5)
    n = cfg.num_samples
    x0 = source_sampler(keys[0], n)
    solver, dpath = _solver_for(cfg, path, sampler)
    n_steps = (steps or cfg.euler_steps) if solver.takes_steps() else None
    fixed = jax.jit(lambda f, x: sample(f, x, solver, path=dpath, steps=n_steps, key=keys[4], save_trajectory=True))
    res = fixed(field, x0)
    one_step = jax.jit(lambda f, x: sample(f, x, Euler(), steps=1))(field, x0)
    adaptive = sample(field, x0, get_solver(cfg.adaptive_method, rtol=cfg.adaptive_tol, atol=cfg.adaptive_tol))
    ref = target(keys[1], n)
    ref2 = target(keys[2], n)

    def quality(x):
        return {
            "sliced_w2": float(metrics.sliced_wasserstein(x, ref, keys[3], num_projections=256)),
            "energy_distance": float(metrics.energy_distance(x, ref)),
            "mmd_rbf": float(metrics.mmd_rbf(x, ref)),
            "w2_exact_1024": float(metrics.wasserstein2_exact(np.asarray(x[:1024]), np.asarray(ref[:1024]))),
        }

    name = sampler or "euler"
    straight = ({"straightness": float(metrics.straightness(res.trajectory, res.ts)),
                 "curvature": float(metrics.curvature(res.trajectory))}
                if res.trajectory is not None and res.trajectory.shape[0] > 2 else {})
    m = min(n, 1024)  # the flow's transport cost against the OT cost between its own two marginals
    straight["transport_cost"] = float(metrics.transport_cost(x0[:m], res.x[:m]))
    straight["ot_cost_of_its_marginals"] = metrics.wasserstein2_exact(np.asarray(x0[:m]), np.asarray(res.x[:m])) ** 2
    report = {
        "config": cfg.name,
        "step": int(state.step),
        "method": method_name(cfg),
        "euler" if sampler is None else name: {"nfe": int(res.nfe), **quality(res.x), **straight},
        "euler_1_step": {"nfe": 1, **quality(one_step.x)},
        "adaptive": {"method": cfg.adaptive_method, "tol": cfg.adaptive_tol, "nfe": int(adaptive.nfe),
                     **quality(adaptive.x)},
        "reference_two_target_sets": quality(ref2),
        "source_to_target": quality(x0),
        "notes": "metrics compare num_samples generated points with as many fresh target points; "
                 "'reference_two_target_sets' is the floor (two independent target sets).",
    }
    if cfg.train_score:  # the interpolant's SDE: drift b + sigma^2/2 s from the two learned fields
        drift = interpolant_drift(field.velocity, field.score, cfg.bridge_noise)
        sde = sample(drift, x0, EulerMaruyama(cfg.bridge_noise, drift="field"), key=keys[4], steps=cfg.euler_steps)
        report["euler_maruyama"] = {"sigma": cfg.bridge_noise, "nfe": int(sde.nfe), "score": "learned",
                                    **quality(sde.x)}
    elif dpath is not None:
        sde = sample(field, x0, EulerMaruyama(cfg.sde_sigma), path=dpath, key=keys[4], steps=cfg.euler_steps, t0=0.0,
                     t1=1.0)
        report["euler_maruyama"] = {"sigma": cfg.sde_sigma, "nfe": int(sde.nfe), "score": "decoded from the velocity",
                                    **quality(sde.x)}
    np.save(os.path.join(out, "samples.npy"), np.asarray(res.x))
    np.save(os.path.join(out, "samples_adaptive.npy"), np.asarray(adaptive.x))
    if losses is None or not len(losses):
        losses = np.load(os.path.join(out, "losses.npy")) if os.path.exists(os.path.join(out, "losses.npy")) else None
    traj = res.trajectory if res.trajectory is not None else jax.numpy.stack([x0, res.x])
    _plots(out, np.asarray(x0), np.asarray(res.x), np.asarray(ref), np.asarray(traj), losses, cfg, report,
           label=f"{name} {n_steps or ''} (NFE {int(res.nfe)})".replace("  ", " "),
           key="euler" if sampler is None else name)
    return report


def load_run(run_dir: str, *, step: int | None = None):
    """Restore a run: ``(cfg, trainer, state)``."""
    import jax

    from jaxgen.training import Checkpointer

    run_dir = common.run_dir_of(run_dir)
    cfg = common.config_from_record(Toy2DConfig, common.read_config(run_dir))
    trainer = _setup(cfg)[-1]
    with Checkpointer(os.path.join(run_dir, "checkpoints")) as ckpt:
        if ckpt.latest_step() is None:
            raise FileNotFoundError(f"no checkpoint in {run_dir}/checkpoints yet.")
        state = ckpt.restore(jax.eval_shape(trainer.init, jax.random.key(cfg.seed)), step=step)  # allocates nothing
    return cfg, trainer, state


def sample_command(run_dir: str, args) -> str:
    """``jaxgen sample`` on a 2-D run: ``--num`` samples with the chosen sampler, as a scatter plot and an array."""
    import jax

    from jaxgen.samplers import sample

    cfg, trainer, state = load_run(run_dir, step=args.step)
    path, target, source_sampler, _, _ = _setup(cfg)
    solver, dpath = _solver_for(cfg, path, args.sampler)
    steps = (args.steps or cfg.euler_steps) if solver.takes_steps() else None
    k0, k1 = jax.random.split(jax.random.key(args.seed))
    res = sample(trainer.model(state, ema=trainer.ema_decay is not None), source_sampler(k0, args.num), solver,
                 path=dpath, steps=steps, key=k1)
    out = args.out or "samples.png"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    stem = os.path.splitext(out)[0]
    np.save(stem + "_samples.npy", np.asarray(res.x))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = np.asarray(target(jax.random.key(args.seed + 1), args.num))
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(*ref.T, s=2, c="C7", alpha=0.4, label=f"target: {cfg.target}")
    ax.scatter(*np.asarray(res.x).T, s=2, c="C1", alpha=0.6, label="samples")
    ax.set_title(f"{args.sampler or 'euler'} (NFE {int(res.nfe)})")
    ax.set_aspect("equal")
    ax.legend(markerscale=4, fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return f"wrote {out} ({args.num} samples, NFE {int(res.nfe)}) and {stem}_samples.npy"


def evaluate_command(run_dir: str, args) -> str:
    """``jaxgen evaluate`` on a 2-D run: the metrics of a sampler (default Euler) and of the adaptive solver."""
    import json

    cfg, trainer, state = load_run(run_dir, step=args.step)
    out = args.out or common.run_dir_of(run_dir)
    os.makedirs(out, exist_ok=True)
    report = evaluate(cfg, out, trainer, state, sampler=args.sampler, steps=args.steps)
    common.write_json(os.path.join(out, "metrics.json"), report)
    return json.dumps({k: v for k, v in report.items() if k != "notes"}, indent=2)


def _plots(out, x0, x1, ref, traj, losses, cfg, report, *, label, key):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lim = np.percentile(np.abs(np.concatenate([x0, x1, ref])), 99.5) * 1.1
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.4), sharex=True, sharey=True)
    for ax, pts, title, color in zip(
        axes, (x0, x1, ref),
        (f"source: {cfg.source}", f"samples ({label})\nsliced W2 = {report[key]['sliced_w2']:.3f}",
         f"target: {cfg.target}"),
        ("tab:gray", "tab:blue", "tab:orange")):
        ax.scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5, color=color)
        ax.set_title(title)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "samples.png"), dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 6))
    m = min(300, traj.shape[1])
    ax.plot(traj[:, :m, 0], traj[:, :m, 1], color="olive", alpha=0.25, lw=0.6)
    ax.scatter(traj[0, :m, 0], traj[0, :m, 1], s=4, color="black", label="t = 0 (source)", zorder=3)
    ax.scatter(traj[-1, :m, 0], traj[-1, :m, 1], s=4, color="tab:blue", label="t = 1 (samples)", zorder=3)
    ax.set_title(f"flow trajectories ({label})")
    ax.legend(loc="upper right")
    ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "trajectories.png"), dpi=120)
    plt.close(fig)

    if losses is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(losses, color="lightsteelblue", lw=0.5, label="per step")
    w = max(1, len(losses) // 100)
    if len(losses) >= w:
        smooth = np.convolve(losses, np.ones(w) / w, mode="valid")
        ax.plot(np.arange(w - 1, len(losses)), smooth, color="navy", label=f"moving average ({w})")
    ax.set_xlabel("step")
    ax.set_ylabel("conditional flow-matching loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss.png"), dpi=120)
    plt.close(fig)
