"""Flow-map families: MeanFlow (Geng et al. 2025) and shortcut models (Frans et al. 2025) trained from scratch,
sampled in any number of jumps."""

from __future__ import annotations

from experiments.recipes import Context, Recipe, options

MEANFLOW_DEFAULTS = {"p": 0.0, "equal_fraction": 0.25, "mean": -0.4, "std": 1.0, "sample_steps": 1,
                     "ema_decay": 0.999}
SHORTCUT_DEFAULTS = {"max_doublings": 7, "consistency_fraction": 0.25, "sample_steps": 1, "ema_decay": 0.999}


def build_meanflow(ctx: Context) -> Recipe:
    r"""MeanFlow: a :class:`jaxgen.models.FlowMapMLP` ``u(x, r, t)`` trained by :func:`jaxgen.losses.meanflow_loss`
    on the CondOT path, sampled by ``sample_steps`` flow-map jumps (:class:`jaxgen.samplers.FlowMap`; NFE =
    ``sample_steps``, default 1); its likelihood through the probability-flow ODE of its diagonal ``u(x, t, t)``
    (:func:`jaxgen.fields.flow_map_velocity`, exact divergence).

    Options: ``p`` (the adaptive weight's power; default 0, plain squared error: on 2-D targets the paper's image
    setting ``p = 1`` trained much worse, N(0, I) -> moons at 5,000 steps 1-NFE sliced W2 0.30 against 0.135),
    ``equal_fraction`` (share of ``r = t``, flow matching on the diagonal; 0.25), ``mean``/``std`` (the logit-normal
    time distribution, the paper's -0.4 / 1.0), ``sample_steps``, ``ema_decay`` (0: none). Vectors only for now: the
    image networks take one time.
    """
    from jaxgen.losses import meanflow_loss, meanflow_times

    opt = _check(ctx, "meanflow", MEANFLOW_DEFAULTS)
    times = meanflow_times(mean=opt["mean"], std=opt["std"], equal_fraction=opt["equal_fraction"])
    return _flow_map_recipe(ctx, opt, meanflow_loss("linear", time_sampler=times, p=opt["p"]))


def build_shortcut(ctx: Context) -> Recipe:
    r"""A shortcut model: a :class:`jaxgen.models.FlowMapMLP` ``u(x, t, t + d)`` trained by
    :func:`jaxgen.losses.shortcut_loss` (flow matching on the diagonal, self-consistency of two half jumps on
    ``consistency_fraction`` of each batch, steps down to ``2^-max_doublings``), sampled and scored as
    :func:`build_meanflow`. Options: ``max_doublings`` (7), ``consistency_fraction`` (0.25), ``sample_steps``,
    ``ema_decay``. Vectors only for now."""
    from jaxgen.losses import shortcut_loss

    opt = _check(ctx, "shortcut", SHORTCUT_DEFAULTS)
    loss = shortcut_loss("linear", max_doublings=opt["max_doublings"],
                         consistency_fraction=opt["consistency_fraction"])
    return _flow_map_recipe(ctx, opt, loss)


def _check(ctx: Context, family: str, defaults: dict) -> dict:
    if ctx.is_image or len(ctx.shape) != 1:
        raise ValueError(f"family {family!r} runs on vectors (2-D targets: --set data=moons); data of shape "
                         f"{tuple(ctx.shape)} needs a two-time image network, which jaxgen does not have yet.")
    if ctx.num_classes is not None:
        raise ValueError(f"family {family!r} is unconditional for now; run it without class labels.")
    opt = options(ctx, defaults, family)
    if opt["sample_steps"] < 1 or not 0.0 <= opt["ema_decay"] < 1.0:
        raise ValueError(f"family {family!r}: sample_steps must be >= 1 and ema_decay in [0, 1), got "
                         f"sample_steps={opt['sample_steps']}, ema_decay={opt['ema_decay']}.")
    return opt


def _flow_map_recipe(ctx: Context, opt: dict, loss) -> Recipe:
    """A FlowMapMLP of ``ctx.width`` x ``ctx.depth`` (SiLU: the JVP-based losses differentiate it smoothly), Adam with
    a cosine decay, ``sample_steps`` flow-map jumps, the likelihood of the diagonal's probability-flow ODE."""
    import jax
    import optax
    from flax import nnx

    from jaxgen.fields import flow_map_velocity
    from jaxgen.likelihood import log_likelihood
    from jaxgen.models import FlowMapMLP
    from jaxgen.samplers import FlowMap, sample

    model = FlowMapMLP(ctx.shape[0], width=ctx.width, hidden_layers=ctx.depth, activation="silu",
                       rngs=nnx.Rngs(ctx.seed))
    steps = opt["sample_steps"]

    def generate(model, key, num, labels=None):
        x0 = jax.random.normal(key, (num, *ctx.shape))
        res = sample(model, x0, FlowMap(), steps=steps)
        return res.x, res.nfe

    def ll(model, x, key):
        return log_likelihood(flow_map_velocity(model), x, path="linear", divergence="exact", rtol=1e-4,
                              atol=1e-4).log_prob

    schedule = optax.cosine_decay_schedule(ctx.learning_rate, max(ctx.steps, 1))
    return Recipe(model=model, objective=loss, optimizer=optax.adam(schedule), generate=generate, log_likelihood=ll,
                  likelihood_kind="PF-ODE of the diagonal u(x, t, t) (Tsit5, tol 1e-4, exact divergence)",
                  ema_decay=opt["ema_decay"] or None, sampler=f"flow-map jumps, {steps} step(s)", conditional=False)


__all__ = ["build_meanflow", "build_shortcut", "MEANFLOW_DEFAULTS", "SHORTCUT_DEFAULTS"]
