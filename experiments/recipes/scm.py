"""Continuous-time consistency models (sCM, Lu & Song 2025): consistency training from scratch with the TrigFlow
parameterisation on jaxgen's cosine path, sampled in one or a few jumps."""

from __future__ import annotations

from experiments.recipes import Context, Recipe, options

SCM_DEFAULTS = {"sigma_data": 1.0, "p_mean": -1.0, "p_std": 1.4, "warmup_steps": 1000, "tangent_c": 0.1,
                "adaptive_weight": True, "sample_steps": 1, "ema_decay": 0.999}


def build_scm(ctx: Context) -> Recipe:
    r"""sCT: a :class:`jaxgen.models.ConsistencyFunction` with ``parameterization="trigflow"`` around an
    :class:`jaxgen.models.MLPField` velocity network (SiLU: the loss differentiates it through a JVP), trained from
    scratch by :func:`jaxgen.losses.scm_loss` (no teacher) on the data divided by ``sigma_data``, sampled by
    :class:`jaxgen.samplers.ConsistencyMultistep` in ``sample_steps`` jumps (NFE = ``sample_steps``, uniform jump
    times in jaxgen time) and multiplied back by ``sigma_data``. No likelihood.

    Options: ``sigma_data`` (the data's standard deviation per coordinate; 1.0, since the generative experiment
    standardises 2-D data), ``p_mean``/``p_std`` (the log-normal time distribution, the paper's -1.0 / 1.4),
    ``warmup_steps`` (tangent warm-up, 1,000), ``tangent_c`` (tangent normalisation, 0.1), ``adaptive_weight`` (learn
    the weighting ``w_phi(t)``, :class:`jaxgen.models.consistency.LogVariance`; true), ``sample_steps`` (1),
    ``ema_decay`` (for sampling only: the loss's target is always ``stopgrad(theta)``; 0: none). Vectors only for now,
    unconditional.
    """
    import jax
    import optax
    from flax import nnx

    from jaxgen.losses import scm_loss
    from jaxgen.models import ConsistencyFunction, MLPField
    from jaxgen.models.consistency import LogVariance
    from jaxgen.samplers import ConsistencyMultistep, sample

    if ctx.is_image or len(ctx.shape) != 1:
        raise ValueError(f"family 'scm' runs on vectors (2-D targets: --set data=moons); data of shape "
                         f"{tuple(ctx.shape)} needs an image network, which this recipe does not build yet.")
    if ctx.num_classes is not None:
        raise ValueError("family 'scm' is unconditional for now; run it without class labels.")
    opt = options(ctx, SCM_DEFAULTS, "scm")
    if opt["sample_steps"] < 1 or not 0.0 <= opt["ema_decay"] < 1.0 or not opt["sigma_data"] > 0:
        raise ValueError(f"family 'scm': sample_steps must be >= 1, ema_decay in [0, 1) and sigma_data > 0, got "
                         f"sample_steps={opt['sample_steps']}, ema_decay={opt['ema_decay']}, "
                         f"sigma_data={opt['sigma_data']}.")
    rngs = nnx.Rngs(ctx.seed)
    net = MLPField(ctx.shape[0], width=ctx.width, hidden_layers=ctx.depth, activation="silu", rngs=rngs)
    model = ConsistencyFunction(net, "cosine", parameterization="trigflow",
                                logvar=LogVariance(rngs=rngs) if opt["adaptive_weight"] else None)
    loss = scm_loss("cosine", sigma_data=opt["sigma_data"], p_mean=opt["p_mean"], p_std=opt["p_std"],
                    tangent_c=opt["tangent_c"], warmup_steps=opt["warmup_steps"])
    steps, sd = opt["sample_steps"], opt["sigma_data"]

    def generate(model, key, num, labels=None):
        k0, k1 = jax.random.split(key)
        x0 = jax.random.normal(k0, (num, *ctx.shape))
        res = sample(model, x0, ConsistencyMultistep(), prediction="data", steps=steps, key=k1)
        return sd * res.x, res.nfe

    schedule = optax.cosine_decay_schedule(ctx.learning_rate, max(ctx.steps, 1))
    return Recipe(model=model, objective=loss, optimizer=optax.adam(schedule), generate=generate,
                  ema_decay=opt["ema_decay"] or None, sampler=f"consistency jumps, {steps} step(s)", conditional=False)


__all__ = ["build_scm", "SCM_DEFAULTS"]
