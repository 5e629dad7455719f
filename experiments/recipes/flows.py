"""Normalizing flows as families of the ``generative`` experiment: RealNVP, Glow (discrete flows, exact likelihood)
and FFJORD (a continuous normalizing flow), all trained by maximum likelihood.

Data conventions. 2-D targets are continuous (the experiment standardises them). Images are discrete: the digits'
grey levels ``k / 8 - 1`` lie on a grid of spacing ``w = 1/8`` (other images, 8-bit on ``[-1, 1]``: ``w = 2/255``),
and the flows are trained on uniformly dequantised images ``x + w u``, ``u ~ U[0, 1)`` (Theis et al. 2016), the
convention of the experiment's test digits: ``log_likelihood`` is then the density of dequantised data, whose bits per
dimension :func:`jaxgen.likelihood.bits_per_dim` gives with ``data_range=(-1, 1 + w)`` and ``num_bins=17``. Samples
are mapped back to the grid (``quantize=true``): a continuous sample ``x`` falls in the bin ``[k w - 1, (k + 1) w - 1)``
of grey level ``k``, the inverse of the dequantisation, so ``generate`` returns grey levels in ``[-1, 1]``.

Data-dependent initialisation of Glow's (and RealNVP's) actnorm layers happens on the first training batch (the
layers hold it as non-trainable state, which the trainer carries; see :class:`jaxgen.models.flows.ActNorm`), so no
data is needed at build time.
"""

from __future__ import annotations

from typing import Any, Callable

from experiments.recipes import Context, Recipe, options


def _bin_width(ctx: Context, dequantize: bool) -> float:
    """The grid spacing of ``ctx``'s data: 1/8 for the 8x8 digits, 2/255 for other ([-1, 1], 8-bit) images, 0 for
    vectors (continuous) or without dequantisation."""
    if not dequantize or not ctx.is_image:
        return 0.0
    return 1.0 / 8.0 if tuple(ctx.shape) == (8, 8, 1) else 2.0 / 255.0


def _quantize(x, width: float):
    """Grey level of the bin each value falls in: ``-1 + w floor((x + 1) / w)``, clipped to the grid ``[-1, 1]``."""
    import jax.numpy as jnp

    levels = int(round(2.0 / width))
    k = jnp.clip(jnp.floor((x + 1.0) / width), 0, levels)
    return -1.0 + width * k


def _unconditional(loss: Callable, ctx: Context) -> Callable:
    """The flows here are unconditional: with a class-conditional context the labels are dropped from the batch."""
    if ctx.num_classes is None:
        return loss

    def unconditional(model, batch, key):
        return loss(model, {"x": batch["x"]} if isinstance(batch, dict) else batch, key)

    return unconditional


def _optimizer(ctx: Context, clip: float):
    import optax

    schedule = optax.cosine_decay_schedule(ctx.learning_rate, max(ctx.steps, 1))
    adam = optax.adam(schedule)
    return optax.chain(optax.clip_by_global_norm(clip), adam) if clip > 0 else adam


def _discrete_flow_recipe(ctx: Context, model: Any, opt: dict, name: str) -> Recipe:
    import jax
    import jax.numpy as jnp

    from jaxgen.losses.likelihood import dequantize_uniform, maximum_likelihood_loss
    from jaxgen.models.flows import standard_normal_log_prob

    width = _bin_width(ctx, opt["dequantize"])
    dims = model.dim
    temperature = float(opt["temperature"])

    def generate(model, key, num, labels=None):
        x = model.sample(key, num, temperature=temperature)
        if width and opt["quantize"]:
            x = _quantize(x, width)
        return x, 1

    def log_likelihood(model, x, key):
        return model.log_prob(x)

    @jax.jit
    def diagnostics(model, x, key):
        x = dequantize_uniform(key, jnp.asarray(x, jnp.float32), width or None)
        z, logdet = model.forward(x)
        lp = standard_normal_log_prob(z) + logdet
        return {"logdet_per_dim": jnp.mean(logdet) / dims, "abs_logdet_per_dim": jnp.mean(jnp.abs(logdet)) / dims,
                "latent_mean": jnp.mean(z), "latent_std": jnp.std(z), "nll_nats_per_dim": -jnp.mean(lp) / dims}

    kind = "exact (change of variables)" + (f", of data dequantised over bins of width {width:g}" if width else "")
    return Recipe(model=model, objective=_unconditional(maximum_likelihood_loss(dequant_width=width or None), ctx),
                  optimizer=_optimizer(ctx, opt["clip"]), generate=generate,
                  log_likelihood=log_likelihood, likelihood_kind=kind, diagnostics=diagnostics,
                  ema_decay=opt["ema_decay"] or None,
                  sampler=f"{name} inverse, one pass" + (f", temperature {temperature:g}" if temperature != 1 else ""),
                  conditional=False)


def build_realnvp(ctx: Context) -> Recipe:
    """RealNVP (Dinh et al. 2017): vectors, ``layers`` affine couplings with alternating masks and MLP conditioners
    (``ctx.width`` x ``ctx.depth``), each after an actnorm (``linear=true`` adds Glow's LU linear layer); images, the
    multi-scale architecture (``layers`` checkerboard couplings, squeeze, ``layers`` channel couplings, split, then
    ``layers + 1`` checkerboard couplings; conv conditioners of ``hidden`` channels, default 32: the couplings at the
    full 8x8 resolution dominate the cost, and 64 channels train 4x slower per step for a small gain)."""
    from flax import nnx

    from jaxgen.models.flows import RealNVP

    opt = options(ctx, {"layers": 3 if ctx.is_image else 8, "levels": 2, "hidden": 0, "depth": 0, "linear": False,
                        "clamp": 2.0, "learned_prior": True, "dequantize": True, "quantize": True, "temperature": 1.0,
                        "ema_decay": 0.0, "clip": 10.0}, "realnvp")
    hidden = opt["hidden"] or (32 if ctx.is_image else ctx.width)  # 8x8 checkerboard couplings: the cost is here
    model = RealNVP(ctx.shape, num_layers=opt["layers"], levels=opt["levels"], hidden=hidden,
                    depth=opt["depth"] or (2 if ctx.is_image else ctx.depth), linear=opt["linear"],
                    clamp=opt["clamp"], learned_prior=opt["learned_prior"], rngs=nnx.Rngs(ctx.seed))
    return _discrete_flow_recipe(ctx, model, opt, "RealNVP")


def build_glow(ctx: Context) -> Recipe:
    """Glow (Kingma & Dhariwal 2018): ``levels`` scales of ``steps`` steps [actnorm, 1x1 convolution (LU), affine
    coupling], squeeze before and split (learned conditional prior) after each scale but the last, conv coupling
    networks of ``hidden`` channels (default 32: with 64, 3,000 steps on the digits reached a lower training NLL but a
    worse test NLL, 2.46 against 2.34 bits/dim); for vectors ``steps`` steps with an LU linear layer and MLP couplings
    (``ctx.width`` x ``ctx.depth``)."""
    from flax import nnx

    from jaxgen.models.glow import Glow

    opt = options(ctx, {"steps": 4 if ctx.is_image else 8, "levels": 2, "hidden": 0, "depth": 0, "clamp": 2.0,
                        "learned_prior": True, "dequantize": True, "quantize": True, "temperature": 1.0,
                        "ema_decay": 0.0, "clip": 10.0}, "glow")
    hidden = opt["hidden"] or (32 if ctx.is_image else ctx.width)  # 64 channels overfit the 1,438 training digits
    model = Glow(ctx.shape, steps=opt["steps"], levels=opt["levels"], hidden=hidden,
                 depth=opt["depth"] or (2 if ctx.is_image else ctx.depth), clamp=opt["clamp"],
                 learned_prior=opt["learned_prior"], rngs=nnx.Rngs(ctx.seed))
    return _discrete_flow_recipe(ctx, model, opt, "Glow")


def build_ffjord(ctx: Context) -> Recipe:
    """FFJORD (Grathwohl et al. 2019): a velocity MLP ``u(x, t)`` (``hidden`` wide, ``ctx.depth`` hidden layers,
    ``activation``) trained by maximum likelihood through the probability-flow ODE from N(0, I) at t=0 to the data at
    t=1 (:func:`jaxgen.losses.likelihood.cnf_loss`: adaptive ``method`` with tolerances ``rtol``/``atol``, divergence
    exact for 2-D, Hutchinson with ``num_probes`` probes for images). Samples: the same ODE forwards
    (:func:`jaxgen.samplers.sample`, adaptive, ``sample_tol``), NFE counted by the solver; likelihood: the ODE
    backwards at ``eval_tol`` (exact divergence for 2-D, Hutchinson for images). On the digits the default width
    (``ctx.width``, 64) is the one that fits the time budget; ``hidden=128`` reached 2.83 instead of 3.03 bits/dim in
    3,000 steps at about 1.8 times the training time (measured on a shared 2-core machine)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxgen.likelihood import log_likelihood as pf_log_likelihood
    from jaxgen.losses.likelihood import cnf_loss, dequantize_uniform
    from jaxgen.models import MLPField
    from jaxgen.samplers import Diffrax, sample

    opt = options(ctx, {"method": "tsit5", "rtol": 1e-3, "atol": 1e-3, "max_steps": 64, "divergence": "",
                        "num_probes": 1, "hidden": 0, "activation": "tanh", "sample_tol": 1e-4, "eval_tol": 1e-4,
                        "dequantize": True, "quantize": True, "ema_decay": 0.0, "clip": 1.0}, "ffjord")
    dims = 1
    for n in ctx.shape:
        dims *= int(n)
    width = _bin_width(ctx, opt["dequantize"])
    train_div = opt["divergence"] or ("hutchinson" if ctx.is_image else "exact")
    eval_div = "hutchinson" if ctx.is_image else "exact"
    model = MLPField(dims, width=opt["hidden"] or ctx.width, hidden_layers=ctx.depth, activation=opt["activation"],
                     rngs=nnx.Rngs(ctx.seed))
    loss = cnf_loss("linear", method=opt["method"], rtol=opt["rtol"], atol=opt["atol"], max_steps=opt["max_steps"],
                    divergence=train_div, num_probes=opt["num_probes"], dequant_width=width or None)
    solver = Diffrax(opt["method"], rtol=opt["sample_tol"], atol=opt["sample_tol"])
    tol = opt["eval_tol"]

    def generate(model, key, num, labels=None):
        res = sample(model, jax.random.normal(key, (num, *ctx.shape)), solver)
        x = _quantize(res.x, width) if width and opt["quantize"] else res.x
        return x, res.nfe

    def log_likelihood(model, x, key):
        return pf_log_likelihood(model, x, path="linear", divergence=eval_div, key=key, rtol=tol, atol=tol,
                                 method=opt["method"]).log_prob

    @jax.jit
    def diagnostics(model, x, key):
        k_deq, k_probe = jax.random.split(key)
        x = dequantize_uniform(k_deq, jnp.asarray(x, jnp.float32), width or None)
        res = pf_log_likelihood(model, x, path="linear", divergence=eval_div, key=k_probe, rtol=tol, atol=tol,
                                method=opt["method"])
        return {"likelihood_nfe": res.nfe, "likelihood_solver_steps": res.num_steps,
                "delta_log_prob_per_dim": jnp.mean(res.delta_log_prob) / dims, "latent_std": jnp.std(res.x_noise),
                "nll_nats_per_dim": -jnp.mean(res.log_prob) / dims}

    return Recipe(model=model, objective=_unconditional(loss, ctx), optimizer=_optimizer(ctx, opt["clip"]),
                  generate=generate, log_likelihood=log_likelihood,
                  likelihood_kind=f"PF-ODE ({opt['method']}, tol {tol:g}, {eval_div} divergence)"
                  + (f", of data dequantised over bins of width {width:g}" if width else ""),
                  diagnostics=diagnostics, ema_decay=opt["ema_decay"] or None,
                  sampler=f"{opt['method']} adaptive, tol {opt['sample_tol']:g}", conditional=False)


__all__ = ["build_realnvp", "build_glow", "build_ffjord"]
