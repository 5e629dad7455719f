r"""Posterior-mean guidance for linear inverse problems: DPS and PiGDM as velocity fields.

To sample ``p(x | y)`` for a measurement ``y = A x_1 (+ noise)`` with a field trained on ``p(x_1)`` only, the
conditional score of the path splits (Bayes) as

.. math:: \nabla_x \log p_t(x \mid y) = \nabla_x \log p_t(x) + \nabla_x \log p(y \mid x_t = x),

and the measurement term is approximated through the posterior mean ``x1_hat(x) = E[x_1 | x_t = x]`` (Tweedie),
decoded from any parameterisation by :func:`jaxgen.fields.algebra.to_data_and_noise`, with
``J = d x1_hat / d x`` applied as a vector-Jacobian product (one network evaluation and one ``jax.vjp``):

* **DPS** (Chung et al. 2023, "Diffusion Posterior Sampling for General Noisy Inverse Problems", Alg. 1):
  ``p(y | x_t) ~ p(y | x_1 = x1_hat)``; the correction is the gradient of ``-||y - A x1_hat||^2`` with the step size
  ``zeta_i = zeta' / ||y - A x1_hat||`` of the paper::

      g_DPS = -scale * grad_x ||y - A x1_hat||^2 / ||y - A x1_hat|| = 2 scale J^T A^T (y - A x1_hat) / ||y - A x1_hat||

  (the norm per sample, held constant). Here it is added to the *score* (the paper adds ``zeta_i`` times the
  gradient to a DDPM step instead, so ``scale`` is not the paper's ``zeta'`` number for number). DPS's normalisation
  absorbs the measurement noise, so ``noise_std`` does not enter.
* **PiGDM** (Song, Vahdat, Mardani & Kautz 2023, "Pseudoinverse-Guided Diffusion Models for Inverse Problems",
  eq. 7-8): ``p(x_1 | x_t) ~ N(x1_hat, r_t^2 I)``, so ``p(y | x_t) ~ N(A x1_hat, r_t^2 A A^T + sigma_y^2 I)`` and::

      g_PiGDM = scale * J^T A^T (r_t^2 A A^T + sigma_y^2 I)^{-1} (y - A x1_hat)
              = scale * J^T (A^+ y - A^+ A x1_hat) / r_t^2                         (sigma_y = 0, eq. 8)

  With ``A A^T = c I`` (every operator of :mod:`jaxgen.inverse.operators`) the inverse is the number
  ``1 / (c r_t^2 + sigma_y^2)``. The paper's ``r_t^2 = sigma_t^2 / (1 + sigma_t^2)`` is the posterior variance of
  unit-variance data under ``x_t = x_1 + sigma_t eps`` (VE); our path ``x_t = alpha_t x_1 + beta_t eps`` is that
  VE process scaled by ``alpha_t`` with ``sigma_t = beta_t / alpha_t``, which gives

  .. math:: r_t^2 = \frac{\beta_t^2}{\alpha_t^2 + \beta_t^2}

  (VP: ``alpha^2 + beta^2 = 1``, ``r_t^2 = 1 - alpha_t^2 = 1 - abar``, the paper's VP choice). For data
  ``N(mu, I)`` this is the exact posterior variance, and PiGDM is then exact posterior sampling.

From score to velocity. At fixed ``x`` a change ``ds`` of the score moves the noise estimate by
``-beta_t ds`` and the data estimate by ``beta_t^2 / alpha_t ds`` (since ``x = alpha z + beta eps``), hence the
velocity ``u = d_alpha z + d_beta eps`` (notes eq. 4.2.3, :mod:`jaxgen.fields.algebra`) by

.. math:: du = c_t\, ds, \qquad c_t = \frac{\beta_t (\beta_t \dot\alpha_t - \alpha_t \dot\beta_t)}{\alpha_t}
          \quad (\text{linear path: } (1 - t) / t).

The correction's coefficient (``c_t`` for DPS, ``c_t / (c r_t^2 + sigma_y^2)`` for PiGDM) is written as one
fraction with the common factors cancelled (:func:`pigdm_coefficient`) and its denominator floored
(:func:`jaxgen._checks.safe_divide`), so it is finite on the whole ``[0, 1]``. Two ends need care:

* ``t = 0`` (``alpha = 0``): ``c_t ~ 1 / alpha_t``, but an exact denoiser has ``J = (alpha_t / beta_t^2)
  Cov[x_1 | x_t] = O(alpha_t)`` (Tweedie's second moment), so the product stays bounded; a trained network's
  ``J`` is not exactly ``O(alpha_t)`` there, and the guidance at ``t ~ 0`` carries no information anyway: start
  guided sampling of a network at ``t0 > 0`` (e.g. ``1e-2``), as the papers do.
* ``t = 1`` (``beta = 0``) with ``noise_std = 0``: PiGDM's coefficient grows like ``1 / beta_t`` (linear path:
  ``~ 1 / (1 - t)``), the pull ``A^+(y - A x) / (1 - t)`` that lands exactly on the measurement, like the
  conditional velocity ``(x_1 - x) / (1 - t)`` of CondOT. Sample with a solver that does not evaluate the field at
  ``t1`` (:class:`~jaxgen.samplers.Euler`, ``Heun(final_euler=True)``), or give ``noise_std > 0`` (the
  correction then vanishes smoothly at ``t = 1``). DPS's coefficient ``c_t`` vanishes at ``t = 1``.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import numpy as np
import jax
import jax.numpy as jnp

from jaxgen._checks import batch_time, check_finite, expand_like, is_concrete, safe_divide
from jaxgen.fields.algebra import canonical_prediction, from_data_and_noise, to_data_and_noise
from jaxgen.inverse.operators import broadcasts_to, check_observation, check_operator
from jaxgen.paths.gaussian import GaussianPath, as_path

Array = jax.Array

METHODS = ("dps", "pigdm")
_METHOD_ALIASES = {"dps": "dps", "pigdm": "pigdm", "pgdm": "pigdm", "pi_gdm": "pigdm", "pseudoinverse": "pigdm"}


class GuidanceTerms(NamedTuple):
    """The pieces of one guided evaluation (:func:`guidance_terms`), each of the shape of ``x`` except ``residual``.

    Attributes:
      velocity: the guided velocity ``u + c_t g`` (what :func:`posterior_guided_field` returns).
      base_velocity: the field's own velocity ``u``.
      score_correction: the guidance term ``g``, the approximation of ``grad_x log p(y | x_t = x)`` (``scale``
        included).
      data: the posterior mean ``x1_hat(x)``.
      residual: ``y - A x1_hat`` (the shape of a measurement).
    """

    velocity: Array
    base_velocity: Array
    score_correction: Array
    data: Array
    residual: Array


def canonical_method(method: str) -> str:
    """``"dps"`` or ``"pigdm"`` (aliases ``pgdm``, ``pi_gdm``, ``pseudoinverse``), or ``ValueError``."""
    key = str(method).lower().replace("-", "_")
    if key not in _METHOD_ALIASES:
        raise ValueError(f"unknown guidance method {method!r}; use 'dps' (Chung et al. 2023) or 'pigdm' (Song et al. "
                         "2023, pseudo-inverse guidance).")
    return _METHOD_ALIASES[key]


def _path_coeffs(path: GaussianPath, x: Array, t: Array):
    c = path.coefficients(t)
    return tuple(expand_like(v.astype(x.dtype), x) for v in c)


def pigdm_variance(path: GaussianPath | str, t: Array) -> Array:
    r"""PiGDM's posterior variance proxy on a Gaussian path: ``r_t^2 = beta_t^2 / (alpha_t^2 + beta_t^2)`` (Song et
    al. 2023, sec. 3.1, ``r_t^2 = sigma_t^2 / (1 + sigma_t^2)``, with ``sigma_t = beta_t / alpha_t``): 1 at the noise
    end (``alpha = 0``), 0 at the data end (``beta = 0``)."""
    a, b = as_path(path).schedule.values(jnp.asarray(t))
    return b * b / (a * a + b * b)


def score_to_velocity_coefficient(path: GaussianPath | str, t: Array) -> Array:
    r"""``c_t = beta_t (beta_t d_alpha_t - alpha_t d_beta_t) / alpha_t``: a score change ``ds`` at fixed ``x`` changes the
    velocity by ``c_t ds`` (notes eq. 4.2.3; the linear path's ``(1 - t) / t``). The division by ``alpha_t`` is floored
    (finite at ``t = 0``, ``1e6`` times the numerator there)."""
    c = as_path(path).coefficients(jnp.asarray(t))
    return safe_divide(c.beta * (c.beta * c.d_alpha - c.alpha * c.d_beta), c.alpha)


def pigdm_coefficient(path: GaussianPath | str, t: Array, *, gram: float | Array = 1.0,
                      noise_std: float | Array = 0.0) -> Array:
    r"""The velocity coefficient of PiGDM's correction, ``c_t / (gram r_t^2 + sigma_y^2)`` (:func:`pigdm_variance`,
    :func:`score_to_velocity_coefficient`), as one fraction with a floored denominator:

    * ``noise_std = 0``: ``(beta d_alpha - alpha d_beta)(alpha^2 + beta^2) / (alpha beta gram)``, applied to
      ``J^T A^T (y - A x1_hat)`` -- equivalently ``(...)/(alpha beta)`` applied to ``J^T A^+ (y - A x1_hat)``
      (``gram = 1``), which needs no ``gram``;
    * ``noise_std > 0``: ``beta (beta d_alpha - alpha d_beta)(alpha^2 + beta^2) / (alpha (gram beta^2 +
      sigma_y^2 (alpha^2 + beta^2)))``, which vanishes at ``beta = 0``.
    """
    c = as_path(path).coefficients(jnp.asarray(t))
    a, b, da, db = c
    n2 = a * a + b * b
    slope = b * da - a * db
    if isinstance(noise_std, (int, float)) and noise_std == 0:
        return safe_divide(slope * n2, a * b * gram)
    s2 = jnp.asarray(noise_std, a.dtype) ** 2
    return safe_divide(b * slope * n2, a * (gram * b * b + s2 * n2))


def _per_sample_norm(r: Array) -> Array:
    return jnp.sqrt(jnp.sum(jnp.reshape(r * r, (r.shape[0], -1)), axis=-1))


def guidance_terms(field: Callable, operator, y: Array, x: Array, t, *, path: GaussianPath | str,
                   prediction: str = "velocity", method: str = "pigdm", scale: float | Array = 1.0,
                   noise_std: float | Array = 0.0, cond: dict | None = None) -> GuidanceTerms:
    r"""One guided evaluation at ``(x, t)``: the field once, and one vector-Jacobian product through it.

    Returns :class:`GuidanceTerms`; ``velocity`` is what :func:`posterior_guided_field` returns (module docstring for
    the formulas: DPS, Chung et al. 2023 Alg. 1; PiGDM, Song et al. 2023 eq. 7-8).
    """
    path = as_path(path)
    prediction = canonical_prediction(prediction)
    method = canonical_method(method)
    cond = dict(cond or {})
    t = batch_time(t, x)

    def decode(xx):
        out = field(xx, t, **cond)
        z, eps = to_data_and_noise(path, out, xx, t, prediction)
        return z, (out, eps)

    z, pullback, (out, eps) = jax.vjp(decode, x, has_aux=True)
    az = operator(z)
    yy = jnp.asarray(y, az.dtype)
    if not broadcasts_to(yy.shape, az.shape):
        raise ValueError(f"the observation y of shape {tuple(yy.shape)} does not match the measurement A x of shape "
                         f"{tuple(az.shape)} (x of shape {tuple(x.shape)}); pass y = operator(x_true) (+ noise) for "
                         "images of the sampled shape.")
    residual = yy - az
    base_u = out if prediction == "velocity" else from_data_and_noise(path, z, eps, t, "velocity")
    scale = jnp.asarray(scale, x.dtype)
    if method == "dps":
        (g,) = pullback(operator.transpose(residual).astype(x.dtype))  # J^T A^T (y - A x1_hat)
        norm = jnp.maximum(_per_sample_norm(residual), jnp.finfo(x.dtype).tiny)
        ds = 2.0 * scale * g / expand_like(norm, g)
        k = expand_like(score_to_velocity_coefficient(path, t).astype(x.dtype), x)
        return GuidanceTerms(base_u + k * ds, base_u, ds, z, residual)
    zero_noise = isinstance(noise_std, (int, float)) and noise_std == 0
    a, b, _, _ = _path_coeffs(path, x, t)
    r2 = b * b / (a * a + b * b)
    if zero_noise:
        (g,) = pullback(operator.pinv(residual).astype(x.dtype))  # J^T A^+ (y - A x1_hat)
        weight = safe_divide(jnp.ones_like(r2), r2)
        k = pigdm_coefficient(path, t)
    else:
        gram = operator.gram_scale(tuple(x.shape))
        (g,) = pullback(operator.transpose(residual).astype(x.dtype))  # J^T A^T (y - A x1_hat)
        weight = 1.0 / (gram * r2 + jnp.asarray(noise_std, x.dtype) ** 2)
        k = pigdm_coefficient(path, t, gram=gram, noise_std=noise_std)
    k = expand_like(k.astype(x.dtype), x)
    return GuidanceTerms(base_u + scale * k * g, base_u, scale * weight * g, z, residual)


def posterior_guided_field(field: Callable, operator, y: Array, *, path: GaussianPath | str,
                           prediction: str = "velocity", method: str = "pigdm", scale: float | Array = 1.0,
                           noise_std: float | Array = 0.0) -> Callable:
    r"""A velocity field ``(x, t, **cond)`` that samples the posterior of the measurement ``y = A x_1 (+ noise)``.

    The field's posterior mean ``x1_hat`` is guided towards ``y`` with DPS (Chung et al. 2023, Alg. 1) or PiGDM
    (Song et al. 2023, eq. 7-8), the score correction mapped into the velocity exactly by the path's
    velocity-score relation (module docstring). Sample it with any ODE or SDE solver and ``prediction="velocity"``::

        guided = posterior_guided_field(net, MaskOperator(mask), y, path="linear", prediction="velocity",
                                        method="pigdm")
        x = sample(guided, x0, Euler(), path="linear", steps=100).x

    Each call is one network evaluation plus one vector-Jacobian product (``sample`` counts one NFE).

    Args:
      field: the trained field ``field(x, t, **cond)`` (any parameterisation).
      operator: a linear operator (:mod:`jaxgen.inverse.operators`): ``A x``, ``transpose``, ``pinv`` (and
        ``gram_scale`` for PiGDM with ``noise_std > 0``).
      y: the measurement, of the shape of ``operator(x)`` (or broadcastable to it: one measurement for the batch).
      path: the path the field was trained on.
      prediction: what ``field`` predicts.
      method: ``"dps"`` or ``"pigdm"``.
      scale: the guidance weight (PiGDM: 1 is the paper's approximation of the posterior score; DPS: the
        ``zeta'`` of the step size ``zeta' / ||y - A x1_hat||``, applied to the score).
      noise_std: the measurement noise ``sigma_y`` (PiGDM; DPS's normalisation absorbs it).

    Returns:
      ``guided(x, t, **cond)`` -> the guided velocity (finite on ``[0, 1]``; see the module docstring for the ends).
    """
    if not callable(field):
        raise TypeError(f"posterior_guided_field needs a field callable as field(x, t, **cond), got "
                        f"{type(field).__name__}.")
    check_operator(operator, "posterior_guided_field")
    y = check_observation(y, "posterior_guided_field")
    if path is None:
        raise ValueError("posterior_guided_field decodes the posterior mean x1_hat on the path the field was trained "
                         "on: pass path=... (e.g. path='linear').")
    path = as_path(path)
    prediction = canonical_prediction(prediction)
    method = canonical_method(method)
    check_finite(scale, name="scale", hint="Use a finite guidance weight (PiGDM: 1.0).")
    if is_concrete(noise_std):
        ns = np.asarray(noise_std)
        if ns.ndim != 0 or not np.isfinite(ns) or ns < 0:
            raise ValueError(f"noise_std must be a finite number >= 0 (the measurement noise sigma_y), got "
                             f"{noise_std!r}.")
        noise_std = float(ns)
    if method == "pigdm" and not (isinstance(noise_std, float) and noise_std == 0) \
            and not callable(getattr(operator, "gram_scale", None)):
        raise ValueError(f"PiGDM with measurement noise needs A A^T = c I and the operator's gram_scale(shape) = c; "
                         f"{type(operator).__name__} has none: subclass jaxgen.inverse.LinearOperator, or use "
                         "noise_std=0.")

    def guided(x, t, **cond):
        return guidance_terms(field, operator, y, x, t, path=path, prediction=prediction, method=method,
                              scale=scale, noise_std=noise_std, cond=cond).velocity

    return guided


__all__ = ["posterior_guided_field", "guidance_terms", "GuidanceTerms", "METHODS", "pigdm_variance",
           "pigdm_coefficient", "score_to_velocity_coefficient", "canonical_method"]
