r"""Field algebra: exact conversions between the parameterisations of a Gaussian path.

On a Gaussian path ``x_t = alpha_t z + beta_t eps`` a network can predict any of five quantities,
and each determines the others given ``(x, t)``. jaxgen names them:

=============  =====================================================  ============================
name           meaning                                                aliases
=============  =====================================================  ============================
``velocity``   ``u_t(x) = E[d_alpha z + d_beta eps | x_t = x]``      ``u``, ``flow``
``score``      ``grad log p_t(x) = -E[eps | x] / beta_t``            (notes eq. 3.3.3)
``eps``        ``E[eps | x_t = x]`` (DDPM noise prediction)           ``noise``, ``epsilon``
``data``       ``E[z | x_t = x]`` (Tweedie's formula; "x0-pred.")     ``x0``, ``x1``, ``x_data``
``v``          ``alpha_t eps - beta_t z`` (Salimans & Ho 2022)         ``v_prediction``
=============  =====================================================  ============================

Every conversion goes through the pair ``(z_hat, eps_hat)`` = (posterior mean of the data, of the
noise), which satisfies ``x = alpha z_hat + beta eps_hat`` exactly. Decoding uses the
best-conditioned formula for each parameterisation:

* velocity: solve ``[x; u] = [[a, b], [da, db]] [z; eps]``; its determinant ``a db - b da`` is
  negative inside ``(0, 1)`` for a valid schedule (checked at construction), and non-zero at the
  endpoints for linear, cosine, VP, VE and EDM. E.g. the score from a velocity is
  ``s = -(a u - da x) / (beta (a db - b da))``: the notes' eq. 4.2.3 rearranged without dividing by
  ``alpha_t``. Where the determinant vanishes (polynomial ``n > 1`` at t=0) the non-zero one of
  ``alpha``/``beta`` decodes ``x`` directly.
* v: solve ``[x; v] = [[a, b], [-b, a]] [z; eps]``, determinant ``a^2 + b^2 > 0``.
* eps/score: ``z = (x - b eps) / a`` divides by ``alpha_t`` (zero at t=0, where the data mean is
  not identifiable from ``x``); data: ``eps = (x - a z) / b`` divides by ``beta_t`` (zero at t=1).
  These divisions are floored (``|den| >= 1e-6``): exact elsewhere, finite everywhere.

Finite is not accurate: where a divisor vanishes the information is genuinely missing. A data
(x0) prediction says nothing about the noise at t=1 (``beta_1 = 0``), an eps or score prediction
nothing about the data at t=0 (``alpha_0 = 0``), and the floored division amplifies a network's error
by up to ``1e6`` there. Sample such fields on a grid that does not evaluate them at that end: Euler,
Euler-Maruyama and Langevin never evaluate at their final time; for Heun use
``Heun(final_euler=True)`` (EDM's Algorithm 1) and start eps/score fields at ``t0 > 0``
(e.g. ``1e-3``) on paths with ``alpha_0 = 0``. Velocity and v predictions are safe at both ends.
"""

from __future__ import annotations

from typing import Callable, Protocol

import jax
import jax.numpy as jnp

from jaxgen._checks import batch_time, check_same_shape, expand_like, is_concrete, safe_divide
from jaxgen.paths.gaussian import GaussianPath, as_path

Array = jax.Array

PREDICTIONS = ("velocity", "score", "eps", "data", "v")
_ALIASES = {
    "velocity": "velocity", "u": "velocity", "flow": "velocity", "vector_field": "velocity",
    "score": "score",
    "eps": "eps", "noise": "eps", "epsilon": "eps",
    "data": "data", "x0": "data", "x1": "data", "x_data": "data", "sample": "data", "denoised": "data",
    "v": "v", "v_prediction": "v",
}


class VectorField(Protocol):
    """The one field signature of jaxgen: ``field(x, t, **conditioning) -> array like x``.

    ``x`` has shape ``(B, ...)`` and ``t`` has shape ``(B,)``. Flax NNX modules, plain functions,
    ``functools.partial`` objects and the analytic oracle's methods all fit. Conditioning
    (class labels, ...) is passed by keyword, e.g. ``field(x, t, y=labels)``.
    """

    def __call__(self, x: Array, t: Array, **conditioning) -> Array: ...


def canonical_prediction(name: str) -> str:
    """Map a prediction name or alias (``'x0'``, ``'noise'``, ...) to its canonical name."""
    key = str(name).lower().replace("-", "_")
    if key not in _ALIASES:
        raise ValueError(f"unknown prediction type {name!r}; use one of {PREDICTIONS} "
                         f"(aliases: {sorted(k for k in _ALIASES if k not in PREDICTIONS)}).")
    return _ALIASES[key]


def check_data_identifiable(path: GaussianPath, prediction: str, t, *, what: str = "this sampler",
                            where: str = "t0", min_alpha: float = 1e-3, quantity: str = "data estimate",
                            fix: str | None = None) -> None:
    r"""Refuse to decode an eps or score prediction into the data estimate ``z = (x - beta_t eps) / alpha_t`` (or a
    velocity, which needs it) at a time where ``alpha_t < min_alpha`` (or ``alpha_t = 0``).

    There the prediction carries no information about the data (the division amplifies a network's error by
    ``1 / alpha_t``). Velocity, data and v predictions pass, and so does a time traced under ``jit`` (``t`` not
    known at trace time). ``what``, ``where``, ``quantity`` and ``fix`` word the error for the caller.
    """
    prediction = canonical_prediction(prediction)
    if prediction not in ("eps", "score") or t is None or not is_concrete(t):
        return
    with jax.ensure_compile_time_eval():
        alpha = float(path.schedule.values(jnp.asarray(t, jnp.float32))[0])
    if alpha < min_alpha or not alpha > 0:
        fix = fix or ("start later, e.g. t0=1e-3, or use a velocity, data or v parameterisation")
        raise ValueError(f"a {prediction!r} prediction does not determine the {quantity} where alpha_t = 0, and {what} "
                         f"needs it: alpha = {alpha:.3g} at {where}={float(t):g} on path '{path.name}'; {fix}.")


def _coeffs(path: GaussianPath | str, x: Array, t: Array):
    path = as_path(path)
    t = batch_time(t, x)
    c = path.coefficients(t)
    return tuple(expand_like(v.astype(x.dtype), x) for v in c)


def to_data_and_noise(path: GaussianPath, output: Array, x: Array, t: Array, prediction: str) -> tuple[Array, Array]:
    r"""Decode a prediction into ``(z_hat, eps_hat)`` with ``x = alpha_t z_hat + beta_t eps_hat``."""
    prediction = canonical_prediction(prediction)
    check_same_shape(output=output, x=x)
    a, b, da, db = _coeffs(path, x, t)
    if prediction == "velocity":
        det = a * db - b * da  # < 0 inside (0, 1) for a valid schedule
        z = safe_divide(db * x - b * output, det)
        eps = safe_divide(a * output - da * x, det)
        # Where det vanishes (an endpoint of e.g. polynomial(n > 1), whose u_0 = 0 for every z), x
        # alone identifies the component whose coefficient is non-zero: eps = x / beta if alpha = 0,
        # z = x / alpha if beta = 0; the other one is taken from u = da z + db eps.
        noise_end = jnp.abs(a) <= jnp.abs(b)
        eps_alt = jnp.where(noise_end, safe_divide(x, b), safe_divide(output - da * safe_divide(x, a), db))
        z_alt = jnp.where(noise_end, safe_divide(output - db * safe_divide(x, b), da), safe_divide(x, a))
        singular = jnp.abs(det) < 1e-6
        z = jnp.where(singular, z_alt, z)
        eps = jnp.where(singular, eps_alt, eps)
    elif prediction == "v":
        n2 = a * a + b * b
        z = (a * x - b * output) / n2
        eps = (b * x + a * output) / n2
    elif prediction == "eps":
        eps = output
        z = safe_divide(x - b * eps, a)
    elif prediction == "score":
        eps = -b * output
        z = safe_divide(x - b * eps, a)
    else:  # data
        z = output
        eps = safe_divide(x - a * z, b)
    return z, eps


def from_data_and_noise(path: GaussianPath, z: Array, eps: Array, t: Array, prediction: str) -> Array:
    r"""Encode ``(z, eps)`` as a prediction: velocity ``da z + db eps`` (eq. 4.1.3), score ``-eps/beta``
    (eq. 3.3.3), ``eps``, data ``z``, or ``v = alpha eps - beta z``.

    With ``(z, eps)`` a training pair this is the regression target of the loss for that
    parameterisation.
    """
    prediction = canonical_prediction(prediction)
    check_same_shape(z=z, eps=eps)
    a, b, da, db = _coeffs(path, z, t)
    if prediction == "velocity":
        return da * z + db * eps
    if prediction == "score":
        return -safe_divide(eps, b)
    if prediction == "eps":
        return eps
    if prediction == "data":
        return z
    return a * eps - b * z


def convert(path: GaussianPath, output: Array, x: Array, t: Array, *, source: str, target: str) -> Array:
    """Convert a prediction of type ``source`` at ``(x, t)`` into type ``target`` (exact, path-generic)."""
    source, target = canonical_prediction(source), canonical_prediction(target)
    if source == target:
        return output
    z, eps = to_data_and_noise(path, output, x, t, source)
    return from_data_and_noise(path, z, eps, t, target)


# Named conversions for readability (each is `convert` with fixed types).

def velocity_to_score(path: GaussianPath, velocity: Array, x: Array, t: Array) -> Array:
    r"""Score from velocity (notes eq. 4.2.3 solved for the score, without dividing by ``alpha_t``)."""
    return convert(path, velocity, x, t, source="velocity", target="score")


def score_to_velocity(path: GaussianPath, score: Array, x: Array, t: Array) -> Array:
    r"""``u = (beta^2 da/a - db beta) score + (da/a) x`` (notes eq. 4.2.3)."""
    return convert(path, score, x, t, source="score", target="velocity")


def eps_to_score(path: GaussianPath, eps: Array, x: Array, t: Array) -> Array:
    r"""``score = -eps / beta_t`` (notes eq. 3.3.3 / section 4.2.2)."""
    return convert(path, eps, x, t, source="eps", target="score")


def score_to_eps(path: GaussianPath, score: Array, x: Array, t: Array) -> Array:
    r"""``eps = -beta_t score``."""
    return convert(path, score, x, t, source="score", target="eps")


def tweedie_data(path: GaussianPath, score: Array, x: Array, t: Array) -> Array:
    r"""Tweedie's formula ``E[z | x_t] = (x + beta_t^2 grad log p_t(x)) / alpha_t``."""
    return convert(path, score, x, t, source="score", target="data")


# -- fields ------------------------------------------------------------------------------------

def as_field(path: GaussianPath, field: Callable, *, source: str, target: str) -> Callable:
    """Wrap a field predicting ``source`` into a field predicting ``target`` (same signature, one NFE)."""
    if not callable(field):
        raise TypeError(f"as_field needs a field callable as field(x, t, **cond), got {type(field).__name__}.")
    source, target = canonical_prediction(source), canonical_prediction(target)
    if source == target:
        return field

    def converted(x, t, **cond):
        t = batch_time(t, x)
        return convert(path, field(x, t, **cond), x, t, source=source, target=target)

    return converted


__all__ = ["PREDICTIONS", "VectorField", "canonical_prediction", "to_data_and_noise", "from_data_and_noise", "convert",
           "velocity_to_score", "score_to_velocity", "eps_to_score", "score_to_eps", "tweedie_data", "as_field",
           "check_data_identifiable"]
