r"""Recipes of the unnormalised families: an energy-based model (``ebm``), NCSN (``ncsn``) and sliced score matching
(``ssm``).

* ``ebm``: :class:`jaxgen.models.ebm.EnergyNet` trained by contrastive divergence with short-run Langevin negatives
  and a replay buffer (:func:`jaxgen.losses.ebm.contrastive_divergence_loss`; the buffer is the trainer's objective
  state). ``generate`` runs ``sample_steps`` steps of the same Langevin chain from fresh noise
  (:func:`jaxgen.losses.ebm.short_run_langevin`), NFE = ``sample_steps`` energy gradients (each a forward and a
  backward pass of the energy).
* ``ncsn``: Song & Ermon 2019: a noise-conditional score network (``MLPField`` on vectors, ``UNetField`` on images,
  through :func:`jaxgen.losses.score_matching.noise_conditional_score`) trained by denoising score matching on
  ``num_levels`` geometric noise levels of the VE path with ``lambda(sigma) = sigma^2``
  (:func:`jaxgen.losses.score_matching.ncsn_loss`), sampled by annealed Langevin dynamics
  (:func:`jaxgen.losses.score_matching.annealed_langevin`): ``steps_per_level`` steps per level, plus one Tweedie
  denoising step with ``denoise``.
* ``ssm``: the same network and sampler, trained by sliced score matching (SSM-VR, Gaussian projections) on the data
  perturbed at ``num_levels`` noise levels between ``sigma_min`` and ``sigma_max`` (the noise-conditional form of
  :func:`jaxgen.losses.score_matching.sliced_score_matching_loss`, weighted by ``sigma^2``). Perturbing the data
  keeps the target score finite off the data's support; annealing over a few levels lets Langevin dynamics cross
  between modes, which one small noise level does not (Song & Ermon 2019, sec. 3). ``num_levels=1`` is plain SSM at
  ``sigma_min`` sampled by Langevin at that one level.

None has a likelihood (``log_likelihood=None``): an EBM's normaliser is unknown, and the score models define no
density. Unconditional ``ebm``; ``ncsn`` and ``ssm`` honour labels when the run is class-conditional.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from experiments.recipes import Context, Recipe, options
from jaxgen.losses.ebm import contrastive_divergence_loss, short_run_langevin
from jaxgen.losses.score_matching import (annealed_langevin, level_time_sampler, ncsn_loss, ncsn_path, ncsn_times,
                                          noise_conditional_score, sliced_score_matching_loss)
from jaxgen.models import MLPField, UNetField
from jaxgen.models.ebm import EnergyNet

Array = jax.Array


def _check_shape(ctx: Context, family: str) -> None:
    if tuple(ctx.shape) != (2,) and not (len(ctx.shape) == 3 and ctx.shape[0] == ctx.shape[1]):
        raise ValueError(f"family {family!r} builds networks for 2-D points (shape (2,)) or square images (H, H, C); "
                         f"got shape {tuple(ctx.shape)}.")


# ---------------------------------------------------------------------------------------------------------
# EBM
# ---------------------------------------------------------------------------------------------------------

# 2-D targets are unbounded; the experiments standardise them (unit variance per coordinate), and fresh chains start
# uniform on [-init_scale, init_scale]^2 (8 Gaussians, 2,000 steps: from [-8, 8]^2 stragglers stayed far from the data,
# sliced W2 8.4; from [-2, 2]^2, 0.57 with 8/8 modes). Images live in [-1, 1]: uniform noise there, negatives clipped
# into it, a larger step (the energy's pixel gradients are small).
EBM_DEFAULTS_2D = {"langevin_steps": 20, "step_size": 0.1, "noise": 0.1, "buffer_size": 10_000, "reinit": 0.05,
                   "alpha": 0.1, "sample_steps": 200, "init_scale": 2.0, "channels": 16}
EBM_DEFAULTS_IMAGE = {"langevin_steps": 15, "step_size": 10.0, "noise": 0.01, "buffer_size": 10_000, "reinit": 0.2,
                      "alpha": 1.0, "sample_steps": 30, "init_scale": 1.0, "channels": 8}


def build_ebm(ctx: Context) -> Recipe:
    r"""An energy-based model trained by contrastive divergence (Hinton 2002) with short-run Langevin negatives
    (Nijkamp et al. 2019) from a replay buffer (Du & Mordatch 2019).

    Options: ``langevin_steps`` (``K``, the training chains' length), ``step_size`` (``a``) and ``noise``
    (``sigma``) of ``x <- x - a grad E(x) + sigma xi``, ``buffer_size``, ``reinit`` (probability of a fresh start),
    ``alpha`` (energy-magnitude penalty), ``sample_steps`` (``generate``'s chain from noise), ``init_scale`` (fresh
    starts uniform on ``[-init_scale, init_scale]``; images use ``[-1, 1]``), ``channels`` (the convolutional
    energy's first width on images; MLPs use ``ctx.width`` and ``ctx.depth``).
    """
    _check_shape(ctx, "ebm")
    if ctx.num_classes is not None:
        raise ValueError("family 'ebm' trains an unconditional energy E(x); run it without class conditioning, or use "
                         "'ncsn' / 'ssm' for a class-conditional score model.")
    opt = options(ctx, EBM_DEFAULTS_IMAGE if ctx.is_image else EBM_DEFAULTS_2D, "ebm")
    shape = tuple(ctx.shape)
    rngs = nnx.Rngs(ctx.seed)
    if ctx.is_image:
        model = EnergyNet(shape, channels=opt["channels"], width=ctx.width, rngs=rngs)
        init_scale, clip = 1.0, (-1.0, 1.0)
    else:
        model = EnergyNet(shape, width=ctx.width, depth=ctx.depth, rngs=rngs)
        init_scale, clip = opt["init_scale"], None
    chain = {"step_size": opt["step_size"], "noise": opt["noise"], "clip": clip}
    loss = contrastive_divergence_loss(shape, langevin_steps=opt["langevin_steps"], buffer_size=opt["buffer_size"],
                                       reinit=opt["reinit"], alpha=opt["alpha"], init="uniform",
                                       init_scale=init_scale, **chain)
    sample_steps = opt["sample_steps"]

    def generate(model, key, num, labels=None):
        k_init, k_chain = jax.random.split(key)
        res = short_run_langevin(model, loss.sample_noise(k_init, num), k_chain, steps=sample_steps, **chain)
        return res.x, res.nfe

    @jax.jit
    def _diagnostics(model, x, key):
        neg, _ = generate(model, key, x.shape[0])
        e_data, e_model = model.energy(x), model.energy(neg)
        return {"energy_data": jnp.mean(e_data), "energy_samples": jnp.mean(e_model),
                "energy_gap": jnp.mean(e_model) - jnp.mean(e_data),
                "score_norm_data": jnp.mean(jnp.sqrt(jnp.sum(jnp.reshape(model.score(x) ** 2, (x.shape[0], -1)), -1)))}

    def diagnostics(model, x, key):
        """Mean energies of data and of ``generate``'s samples, their gap (> 0: the model puts less energy on the data),
        and the mean score norm on the data."""
        return {k: float(v) for k, v in _diagnostics(model, jnp.asarray(x, jnp.float32), key).items()}

    return Recipe(
        model=model, objective=loss,
        optimizer=optax.chain(optax.clip_by_global_norm(1.0), optax.adam(ctx.learning_rate, b1=0.5)),
        generate=generate, log_likelihood=None, likelihood_kind="none (unnormalised energy)", diagnostics=diagnostics,
        ema_decay=None, sampler=f"Langevin from uniform noise, {sample_steps} steps (step {opt['step_size']:g}, noise "
                                f"{opt['noise']:g})", fuse_steps=True, conditional=False)


# ---------------------------------------------------------------------------------------------------------
# Noise-conditional score models: NCSN (denoising score matching) and SSM (sliced score matching)
# ---------------------------------------------------------------------------------------------------------

# 2-D: an MLP of the run's width; images: a wider MLP on the flattened pixels (a U-Net with net="unet" trains better
# per step but several times slower on CPU). Song & Ermon's epsilon relative to sigma_min^2 (their 2e-5 at 0.01 is
# 0.2 sigma_min^2): 1 on 2-D, 0.5 on images, for 10 steps per level instead of their 100.
SCORE_DEFAULTS_2D = {"num_levels": 10, "sigma_min": 0.01, "sigma_max": 10.0, "steps_per_level": 10,
                     "step_size": 1e-4, "snr": 0.0, "denoise": True, "sigma_data": 1.0, "preconditioning": "edm",
                     "net": "mlp", "width": 0, "channels": 16}
SCORE_DEFAULTS_IMAGE = {"num_levels": 10, "sigma_min": 0.01, "sigma_max": 10.0, "steps_per_level": 10,
                        "step_size": 5e-5, "snr": 0.0, "denoise": True, "sigma_data": 0.5, "preconditioning": "edm",
                        "net": "mlp", "width": 512, "channels": 16}


def _score_net(ctx: Context, channels: int, kind: str, width: int) -> nnx.Module:
    """The noise-conditional network: ``MLPField`` (on flattened pixels for images; ``width`` 0: ``ctx.width``), or
    with ``net="unet"`` a small ``UNetField`` on images (no extra attention, no dropout: the sliced objective
    differentiates it with ``jax.jvp``)."""
    if kind not in ("unet", "mlp") or (kind == "unet" and not ctx.is_image):
        raise ValueError(f"option net must be 'mlp' or (for images) 'unet', got {kind!r} for shape {tuple(ctx.shape)}.")
    rngs = nnx.Rngs(ctx.seed)
    if kind == "unet":
        h, _, c = ctx.shape
        return UNetField(c, channels=channels, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(),
                         dropout=0.0, num_classes=ctx.num_classes, image_size=h, rngs=rngs)
    dim = 1
    for n in ctx.shape:
        dim *= n
    return MLPField(dim, width=width or ctx.width, hidden_layers=ctx.depth, activation="silu",
                    num_classes=ctx.num_classes, rngs=rngs)


def _score_recipe(ctx: Context, family: str, defaults: dict, objective_of) -> Recipe:
    _check_shape(ctx, family)
    opt = options(ctx, defaults, family)
    path = ncsn_path(opt["sigma_min"], opt["sigma_max"])
    net = _score_net(ctx, opt["channels"], opt["net"], opt["width"])
    sigma_data, precond = opt["sigma_data"], opt["preconditioning"]

    def score_of(model):
        return noise_conditional_score(model, path, sigma_data=sigma_data, preconditioning=precond)

    objective = objective_of(opt, path, score_of)
    levels, per_level = opt["num_levels"], opt["steps_per_level"]
    rule = ({"snr": opt["snr"], "step_size": None} if opt["snr"] > 0 else {"snr": None, "step_size": opt["step_size"]})
    shape = tuple(ctx.shape)

    def generate(model, key, num, labels=None):
        k_prior, k_chain = jax.random.split(key)
        cond = None if labels is None else {"y": jnp.asarray(labels, jnp.int32)}
        field = score_of(model)
        x0 = path.sample_prior(k_prior, (num, *shape))
        x, nfe = annealed_langevin(field, x0, k_chain, path, num_levels=levels, steps_per_level=per_level,
                                   denoise=opt["denoise"], cond=cond, **rule)
        return (jnp.clip(x, -1.0, 1.0) if ctx.is_image else x), nfe

    t_high = float(ncsn_times(levels)[0])  # the largest level's time (0, or 1 for a single level)

    @jax.jit
    def _diagnostics(model, x, key):
        field = score_of(model)
        n = x.shape[0]
        xx = jnp.concatenate([x, x])  # both levels in one evaluation
        tb = jnp.concatenate([jnp.full((n,), t_high), jnp.ones((n,))]).astype(x.dtype)
        sigma = path.coefficients(tb).beta.reshape((-1,) + (1,) * (x.ndim - 1))
        eps = jax.random.normal(key, xx.shape, x.dtype)
        resid = sigma * field(xx + sigma * eps, tb) + eps  # sigma s + eps: 0 for the exact DSM target
        per = jnp.sum(jnp.reshape(resid**2, (2 * n, -1)), -1)
        return {"dsm_sigma_max": jnp.mean(per[:n]), "dsm_sigma_min": jnp.mean(per[n:])}

    def diagnostics(model, x, key):
        """Denoising residual ``E||sigma s(x + sigma eps) + eps||^2`` (summed over coordinates) at the largest and the
        smallest level (unconditional batches only)."""
        if ctx.num_classes is not None:
            return {}
        return {k: float(v) for k, v in _diagnostics(model, jnp.asarray(x, jnp.float32), key).items()}

    how = (f"SNR {opt['snr']:g}" if opt["snr"] > 0 else f"epsilon {opt['step_size']:g}")
    return Recipe(
        model=net, objective=objective, optimizer=optax.adam(ctx.learning_rate), generate=generate,
        log_likelihood=None, likelihood_kind="none (score model)", diagnostics=diagnostics, ema_decay=0.999,
        sampler=(f"annealed Langevin, {levels} levels x {per_level} steps ({how})"
                 + (" + Tweedie denoising" if opt["denoise"] else "")),
        fuse_steps=True, conditional=ctx.num_classes is not None)


def build_ncsn(ctx: Context) -> Recipe:
    r"""NCSN (Song & Ermon 2019): denoising score matching over ``num_levels`` geometric noise levels from
    ``sigma_max`` to ``sigma_min`` (the VE path), ``lambda(sigma) = sigma^2``; annealed Langevin sampling with
    ``steps_per_level`` steps per level at Algorithm 1's step ``epsilon sigma_i^2 / sigma_L^2`` (``step_size`` =
    epsilon), or at a target signal-to-noise ratio ``snr`` when ``snr > 0``; ``denoise`` adds a final Tweedie step.
    The network (``net``: ``"mlp"``, an ``MLPField`` of ``width`` (0: ``ctx.width``) and ``ctx.depth`` layers, on
    flattened pixels for images; or ``"unet"``, a ``UNetField`` of base width ``channels``, images only) is turned
    into a score by :func:`jaxgen.losses.score_matching.noise_conditional_score` with ``preconditioning``
    (``"edm"``: a denoiser with a skip connection; ``"ncsn"``: ``net / sigma``) and data scale ``sigma_data``."""
    defaults = SCORE_DEFAULTS_IMAGE if ctx.is_image else SCORE_DEFAULTS_2D

    def objective_of(opt, path, score_of):
        dsm = ncsn_loss(path, opt["num_levels"])

        def loss(model, batch, key):
            return dsm(score_of(model), batch, key)

        return loss

    return _score_recipe(ctx, "ncsn", defaults, objective_of)


def build_ssm(ctx: Context) -> Recipe:
    r"""A score model trained by sliced score matching (Song et al. 2019, SSM-VR with Gaussian projections,
    ``projections`` per sample) on the data perturbed at ``num_levels`` geometric noise levels (weighted by
    ``sigma^2``), sampled by annealed Langevin dynamics over those levels as :func:`build_ncsn` (same options)."""
    base = SCORE_DEFAULTS_IMAGE if ctx.is_image else SCORE_DEFAULTS_2D
    defaults = {**base, "num_levels": 5, "sigma_min": 0.05, "steps_per_level": 20, "projections": 1}
    defaults["step_size"] = base["step_size"] * (0.05 / base["sigma_min"]) ** 2  # the same steps in sigma units

    def objective_of(opt, path, score_of):
        ssm = sliced_score_matching_loss(projection="gaussian", num_projections=opt["projections"], path=path,
                                         time_sampler=level_time_sampler(opt["num_levels"]))

        def loss(model, batch, key):
            return ssm(score_of(model), batch, key)

        return loss

    return _score_recipe(ctx, "ssm", defaults, objective_of)


__all__ = ["build_ebm", "build_ncsn", "build_ssm"]
