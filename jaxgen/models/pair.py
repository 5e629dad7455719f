"""Two fields trained together: a velocity and a score (stochastic interpolants, Schrödinger-bridge CFM)."""

from __future__ import annotations

from flax import nnx


class VelocityAndScore(nnx.Module):
    r"""A velocity field ``b_t`` and a score field ``s_t`` as one model: ``model(x, t)`` is the velocity (every ODE
    sampler and the likelihood use it as it is), ``model.score`` the score. Train both with
    :func:`jaxgen.losses.velocity_and_score_loss`; sample the SDE ``dX = (b + sigma^2/2 s) dt + sigma dW`` with
    ``sample(interpolant_drift(model.velocity, model.score, sigma), x0, EulerMaruyama(sigma, drift="field"), ...)``.

    Example::

        model = VelocityAndScore(MLPField(2, rngs=nnx.Rngs(0)), MLPField(2, rngs=nnx.Rngs(1)))
    """

    def __init__(self, velocity: nnx.Module, score: nnx.Module):
        for name, m in (("velocity", velocity), ("score", score)):
            if not callable(m):
                raise TypeError(f"VelocityAndScore needs a callable {name} field(x, t, **cond), got {type(m).__name__}.")
        self.velocity = velocity
        self.score = score

    def __call__(self, x, t, **cond):
        return self.velocity(x, t, **cond)
