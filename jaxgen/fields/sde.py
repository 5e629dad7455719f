r"""Drifts of SDEs built from a field: the SDE extension trick and score_sde's reverse-time SDEs.

* :func:`sde_drift` / :func:`sde_drift_field`: drift ``u_t + sigma_t^2 / 2 * score_t`` (notes eq. 3.3.2), whose SDE
  has the marginals of the ODE for any ``sigma_t``; :func:`interpolant_drift` from two fields (stochastic
  interpolants, SB-CFM).
* :func:`reverse_drift`, :func:`reverse_diffusion`, :func:`probability_flow_velocity`: the reverse-time SDE and the
  probability-flow ODE of a forward SDE (:mod:`jaxgen.paths.sde`), in jaxgen time ``t = 1 - tau``.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxgen._checks import batch_time, expand_like
from jaxgen.fields.algebra import as_field, canonical_prediction, from_data_and_noise, to_data_and_noise
from jaxgen.paths.gaussian import GaussianPath
from jaxgen.paths.sde import SDE, to_diffusion_time

Array = jax.Array


def sde_drift(velocity: Array, score: Array, sigma: Array | float) -> Array:
    r"""SDE extension trick (notes eq. 3.3.2): drift ``u_t(x) + sigma_t^2 / 2 * grad log p_t(x)``.

    With this drift, ``dX = drift dt + sigma_t dW`` has the same marginals ``p_t`` as the ODE
    ``dX = u_t(X) dt``, for any diffusion coefficient ``sigma_t >= 0``.
    """
    sigma = jnp.asarray(sigma, velocity.dtype)
    if sigma.ndim == 1 and velocity.ndim > 1:
        sigma = expand_like(sigma, velocity)
    return velocity + 0.5 * sigma**2 * score


def sde_drift_field(path: GaussianPath, field: Callable, sigma: Callable | float, *, prediction: str = "velocity") -> Callable:
    r"""Drift field ``x, t -> u_t(x) + sigma_t^2/2 * score_t(x)`` from a field of any parameterisation.

    One network call per evaluation: velocity and score are both decoded from the same output.
    ``sigma`` is a constant or a function of ``t`` of shape ``(B,)``.
    """
    prediction = canonical_prediction(prediction)

    def drift(x, t, **cond):
        t = batch_time(t, x)
        out = field(x, t, **cond)
        z, eps = to_data_and_noise(path, out, x, t, prediction)
        u = from_data_and_noise(path, z, eps, t, "velocity")
        s = from_data_and_noise(path, z, eps, t, "score")
        sig = sigma(t) if callable(sigma) else sigma
        return sde_drift(u, s, jnp.broadcast_to(jnp.asarray(sig, x.dtype), t.shape))

    return drift


def interpolant_drift(velocity_field: Callable, score_field: Callable, sigma: Callable | float) -> Callable:
    r"""Drift field ``x, t -> b_t(x) + sigma_t^2/2 * s_t(x)`` from a velocity field and a separate score field.

    The SDE of a stochastic interpolant (Albergo et al. 2023, eq. 2.32 with ``eps_t = sigma_t^2 / 2``) and of
    Schrödinger-bridge CFM (Tong et al. 2024, SF2M: ``sigma_t = sigma``), where ``b`` and ``s`` are learned by two
    regressions (:func:`jaxgen.losses.velocity_and_score_loss`) and one does not determine the other. Sample it with
    ``sample(drift, x0, EulerMaruyama(sigma=sigma, drift="field"), key=key)``; one drift evaluation calls both
    fields (counted as one NFE).
    """

    def drift(x, t, **cond):
        t = batch_time(t, x)
        sig = sigma(t) if callable(sigma) else sigma
        return sde_drift(velocity_field(x, t, **cond), score_field(x, t, **cond),
                         jnp.broadcast_to(jnp.asarray(sig, x.dtype), t.shape))

    return drift


# ---------------------------------------------------------------------------------------------
# reverse SDE and probability-flow ODE in jaxgen time
# ---------------------------------------------------------------------------------------------

def _score_fn(sde: SDE, field: Callable, prediction: str) -> Callable:
    return as_field(sde.path, field, source=canonical_prediction(prediction), target="score")


def reverse_drift(sde: SDE, score_field: Callable, *, probability_flow: bool = False,
                  prediction: str = "score") -> Callable:
    r"""Drift in jaxgen time of the reverse SDE, ``x, t -> -[f(x, tau) - g(tau)^2 s_t(x)]`` with ``tau = 1 - t``.

    Song et al. eq. 6 reads ``dx = [f - g^2 s] d tau + g d W_bar`` for decreasing ``tau``; with ``dt = -d tau``
    the drift per unit of ``t`` changes sign. ``probability_flow=True`` gives the PF-ODE velocity
    ``-[f - 1/2 g^2 s]`` (eq. 13). ``score_field`` predicts ``prediction`` on :attr:`SDE.path` (score by
    default; other parameterisations are converted exactly, one evaluation per call).
    """
    score = _score_fn(sde, score_field, prediction)
    c = 0.5 if probability_flow else 1.0

    def drift(x, t, **cond):
        t = jnp.broadcast_to(jnp.asarray(t, x.dtype), (x.shape[0],))
        f, g = sde.sde(x, to_diffusion_time(t))
        s = score(x, t, **cond)
        return -(f - c * expand_like(g**2, x) * s)

    return drift


def reverse_diffusion(sde: SDE, *, probability_flow: bool = False) -> Callable:
    """Diffusion coefficient in jaxgen time, ``t -> g(1 - t)`` (zero for the probability-flow ODE)."""

    def g(t):
        tau = to_diffusion_time(t)
        return jnp.zeros_like(tau) if probability_flow else sde.diffusion(tau)

    return g


def probability_flow_velocity(sde: SDE, score_field: Callable, *, prediction: str = "score") -> Callable:
    r"""The PF-ODE velocity ``x, t -> -[f(x, 1-t) - 1/2 g(1-t)^2 s_t(x)]`` (Song et al. eq. 13, in jaxgen time).

    It equals the marginal vector field of :attr:`SDE.path`,
    ``fields.convert(sde.path, s, x, t, source="score", target="velocity")``: integrate it with
    :func:`jaxgen.samplers.sample` from ``t = 0`` (up to ``t = 1 - eps``).
    """
    return reverse_drift(sde, score_field, probability_flow=True, prediction=prediction)




__all__ = ["sde_drift", "sde_drift_field", "reverse_drift", "reverse_diffusion", "probability_flow_velocity"]
