"""Flow matching as one family among the others: the library's core objective, for the cross-family comparison."""

from __future__ import annotations

from experiments.recipes import Context, Recipe, options


def build_flow_matching(ctx: Context) -> Recipe:
    """Conditional flow matching on the CondOT path (Lipman et al. 2023, eq. 23): an MLP field on 2-D data, a small
    U-Net on images; samples by Heun's method (``sample_steps`` steps, NFE ``2 * steps - 1`` with the final Euler
    step), log-likelihood through the probability-flow ODE (exact divergence in 2-D, Hutchinson's estimator on
    images)."""
    import jax
    import optax
    from flax import nnx

    from jaxgen.likelihood import log_likelihood
    from jaxgen.losses import flow_matching_loss
    from jaxgen.models import MLPField, UNetField
    from jaxgen.samplers import Heun, sample

    opt = options(ctx, {"schedule": "linear", "sample_steps": 10, "channels": 32, "ema_decay": 0.999}, "flow_matching")
    rngs = nnx.Rngs(ctx.seed)
    if ctx.is_image:
        h, _, c = ctx.shape
        model = UNetField(c, channels=opt["channels"], channel_mult=(1, 2), num_res_blocks=1,
                          attention_resolutions=(), num_heads=1, dropout=0.0, image_size=h, rngs=rngs)
    else:
        model = MLPField(ctx.shape[0], width=ctx.width, hidden_layers=ctx.depth, rngs=rngs)
    path = opt["schedule"]
    solver = Heun(final_euler=True)

    def generate(model, key, num, labels=None):
        x0 = jax.random.normal(key, (num, *ctx.shape))
        res = sample(model, x0, solver, steps=opt["sample_steps"])
        return res.x, res.nfe

    divergence = "hutchinson" if ctx.is_image else "exact"

    def ll(model, x, key):
        return log_likelihood(model, x, path=path, divergence=divergence, key=key, rtol=1e-4, atol=1e-4).log_prob

    schedule = optax.cosine_decay_schedule(ctx.learning_rate, max(ctx.steps, 1))
    return Recipe(model=model, objective=flow_matching_loss(path), optimizer=optax.adam(schedule), generate=generate,
                  log_likelihood=ll, likelihood_kind=f"PF-ODE (Tsit5, tol 1e-4, {divergence} divergence)",
                  ema_decay=opt["ema_decay"] or None, sampler=f"Heun, {opt['sample_steps']} steps",
                  conditional=False)


__all__ = ["build_flow_matching"]
