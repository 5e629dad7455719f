r"""DDIM, and the base of the diffusion samplers (DDIM, DPM-Solver, DPM-Solver++, UniPC).

The diffusion samplers work for any Gaussian path ``x_t = alpha_t z + beta_t eps`` (jaxgen's convention: t=0 is
noise, t=1 is data) and any field parameterisation: every field output is decoded once into the pair
``(z_hat, eps_hat)`` = (posterior mean of the data, of the noise) by :meth:`jaxgen.samplers.Model.denoise`, with
``x = alpha_t z_hat + beta_t eps_hat``, and the solvers are written in that pair.

They integrate the probability-flow ODE in the half log signal-to-noise ratio

.. math:: \lambda_t = \log(\alpha_t / \beta_t) \quad (\text{increasing in } t;\ -\infty \text{ where } \alpha_t = 0,\
          +\infty \text{ where } \beta_t = 0),

whose exact solution from ``s`` to ``t`` (Lu et al. 2022, eq. 3.4; Lu et al. 2022b, eq. 8) is

.. math:: x_t = \frac{\alpha_t}{\alpha_s} x_s
          - \alpha_t \int_{\lambda_s}^{\lambda_t} e^{-\lambda} \hat\epsilon\, d\lambda
          = \frac{\beta_t}{\beta_s} x_s + \beta_t \int_{\lambda_s}^{\lambda_t} e^{\lambda} \hat z\, d\lambda .

Freezing ``eps_hat`` (or ``z_hat``) over a step gives DDIM, ``x_t = alpha_t z_hat + beta_t eps_hat``; the
higher-order solvers Taylor-expand the integrand in ``lambda``.

Time grids and the ends of the path
-----------------------------------
By default the grid runs from the path's ``t_min`` to its ``t_max`` (the data end: ``t = 1`` for linear,
cosine, polynomial, VE and EDM, ``1 - 1e-5`` for VP / sub-VP), uniform in ``t`` or, with ``spacing="logsnr"``, in
``lambda`` (:func:`jaxgen.samplers.grids.diffusion_grid`). Fields are evaluated at the left end of every step and
at interior points, never at the final time, so a data prediction is never decoded where ``beta = 0``. On paths
with ``alpha_0 = 0`` (linear, cosine, polynomial) an eps or score prediction says nothing about the data at t=0:
these samplers then raise ``ValueError`` and ask for ``t0 > 0`` (e.g. 1e-3).

A step that starts where ``alpha = 0`` (``lambda = -inf``) or ends where ``beta = 0`` (``lambda = +inf``)
cannot be Taylor-expanded in ``lambda``: it is taken with DDIM (first order, exact formula
``x_t = alpha_t z_hat + beta_t eps_hat`` needing no division). Its local error is ``O(h^2)`` for smooth data, so
the solver is then at most second order (on Gaussian data, DPM-Solver-3 on ``[0, 1]`` of the linear path converges
at slope ~2.1). For the full order use an interval with a finite log-SNR at both ends, as the papers do (e.g.
``t0=1e-3, t1=1-1e-3`` on the linear path, or the VP path), best with ``spacing="logsnr"``. Open ends are
detected at trace time when the grid's ends are known then (Python floats ``t0``/``t1``, or a concrete ``ts``),
otherwise (a ``ts`` traced under ``jit`` or differentiated) from the grid's values inside the program.

Gradients. The samplers can be differentiated (``jax.grad``) with respect to the field's parameters, ``x0`` and
the time grid (a traced ``ts``), also where an end has ``alpha = 0`` or ``beta = 0``: the infinite log-SNR there is
a constant (derivative 0, not ``inf``, which gave ``0 * inf = NaN``; :func:`jaxgen.paths.log_snr_from_coefficients`),
the coefficients are kept non-negative with derivative 1 where they vanish, the interior points of the single-step
solvers move with the grid (:func:`~jaxgen.samplers.grids.times_from_lambdas` has the derivative of the inverse
function), and the terms that stay smooth at such an end (DDIM's ``beta_t`` and its noise coefficient, the weight
``1 - e^{-h}`` of :func:`ddim_weight`) are differentiated as functions of ``alpha`` and ``beta``. With respect to
an open end itself the gradient is that of the DDIM step taken there: the one-sided derivative (tested against
differences in ``tests/test_fast_samplers.py``). (The field's own derivative in ``t`` at an end is the field's
business.)
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import jax
import jax.numpy as jnp

from jaxgen._checks import is_concrete
from jaxgen.paths.gaussian import _log_safe, log_snr_from_coefficients
from jaxgen.samplers.base import Grid, Model, Solver, register
from jaxgen.samplers.grids import SPACINGS, diffusion_grid

Array = jax.Array


# ---------------------------------------------------------------------------------------------------------
# Update formulas (pure functions of the state, the predictions and the path coefficients).
# ---------------------------------------------------------------------------------------------------------


def ddim_update(z_hat: Array, eps_hat: Array, alpha_t: Array, beta_t: Array, *, noise: Array | None = None,
                s: Array | float = 0.0) -> Array:
    r"""DDIM / DPM-Solver-1 step to time ``t`` (Song et al. 2021, eq. 12; Lu et al. 2022, eq. 3.7):

    .. math:: x_t = \alpha_t \hat z + \sqrt{\beta_t^2 - s^2}\, \hat\epsilon + s\, \xi,

    with ``s = 0`` for the deterministic sampler. Written without any division, it is exact at
    ``alpha_s = 0`` and ``beta_t = 0``. Coefficients broadcast against ``z_hat``.

    Differentiable where the noise coefficient ``sqrt(beta_t^2 - s^2)`` vanishes (e.g. ``beta_t = 0`` at the
    data end of a path), where the square root's derivative would give ``0 * inf = NaN``: with the default
    ``s = 0`` the coefficient is ``beta_t``, with derivative 1; with an array ``s`` its derivative there is 0.
    """
    static_zero = isinstance(s, (int, float)) and s == 0
    return _ddim_update(z_hat, eps_hat, alpha_t, beta_t, noise, s, 0.0 if static_zero else 1.0)


def _ddim_update(z_hat, eps_hat, alpha_t, beta_t, noise, s, ratio):
    """:func:`ddim_update`, given ``ratio`` = ``s / beta_t`` near ``beta_t = 0`` (:func:`_noise_coefficient`)."""
    x = alpha_t * z_hat + _noise_coefficient(beta_t, s, ratio) * eps_hat
    return x if noise is None else x + s * noise


@jax.custom_jvp
def _noise_coefficient(beta_t, s, ratio):
    """DDIM's noise coefficient ``sqrt(max(beta_t^2 - s^2, 0))`` (the same operations and values), whose
    derivative where it vanishes is finite: at ``beta_t = s = 0`` it is taken along ``s = ratio beta_t``,
    ``sqrt(1 - ratio^2) d beta_t`` (exact for DDIM's ``s = eta beta_t sqrt(1 - e^{-2h})``, ratio
    ``eta sqrt(1 - e^{-2h})``; ``ratio = 0`` for ``s = 0``), elsewhere 0."""
    return jnp.sqrt(jnp.maximum(beta_t**2 - s**2, 0.0))


@_noise_coefficient.defjvp
def _noise_coefficient_jvp(primals, tangents):
    (beta_t, s, ratio), (d_beta, d_s, _) = primals, tangents
    out = _noise_coefficient(beta_t, s, ratio)
    pos = out > 0  # double where: the division only sees out > 0
    smooth = (beta_t * d_beta - s * d_s) / jnp.where(pos, out, 1.0)
    at_zero = jnp.where((beta_t == 0) & (s == 0), jnp.sqrt(jnp.maximum(1.0 - ratio**2, 0.0)) * d_beta, 0.0)
    return out, jnp.where(pos, smooth, at_zero).astype(out.dtype)


def ddim_noise_scale(beta_t: Array, h: Array, eta: Array | float) -> Array:
    r"""Standard deviation of DDIM's fresh noise for a step of log-SNR increment ``h = lambda_t - lambda_s``:

    .. math:: s = \eta\, \beta_t \sqrt{1 - \Big(\frac{\alpha_s \beta_t}{\alpha_t \beta_s}\Big)^2}
              = \eta\, \beta_t \sqrt{1 - e^{-2h}} .

    ``eta = 1`` is the std of the DDPM posterior ``q(x_t | x_s, z)`` (ancestral sampling). For VP paths
    (``alpha^2 + beta^2 = 1``) this is the paper's ``sigma_t(eta) = eta sqrt((1-a_{t-1})/(1-a_t))
    sqrt(1 - a_t/a_{t-1})`` with ``a = alpha^2`` (Song et al. 2021, eq. 16).
    """
    return eta * beta_t * jnp.sqrt(-jnp.expm1(-2.0 * h))


def ddim_weight(h: Array, alpha_s: Array, beta_s: Array, alpha_t: Array, beta_t: Array) -> Array:
    r"""DDIM's weight ``1 - e^{-h}`` of the data prediction in ``x_t = (beta_t / beta_s) x_s + alpha_t (1 - e^{-h})
    z_hat_s`` (data-prediction form), ``h = lambda_t - lambda_s``.

    Differentiable at an infinite ``h`` (``alpha_s = 0`` or ``beta_t = 0``): there ``e^{-h}`` is computed as
    ``alpha_s beta_t / (beta_s alpha_t)``, its exact value as a function of the path's coefficients (0 at such an
    end, with the derivative of that expression; in ``lambda`` it would be a constant, of derivative 0).
    """
    finite = jnp.isfinite(h)
    den = beta_s * alpha_t
    e_neg_h = alpha_s * beta_t / jnp.where(den > 0, den, 1.0)  # double where: no division by 0
    return jnp.where(finite, -jnp.expm1(-jnp.where(finite, h, 0.0)), 1.0 - e_neg_h)


def step_coefficients(path, t: Array, dtype) -> tuple[Array, Array, Array, Array]:
    """``(alpha, beta, log alpha, lambda)`` at times ``t`` (float32 maths, cast to the state's dtype); the infinite
    logs (where ``alpha`` or ``beta`` is 0) are constants, so that gradients stay finite."""
    alpha, beta = path.schedule.values(t)
    log_a = _log_safe(alpha)
    lam = log_snr_from_coefficients(alpha, beta)
    return tuple(v.astype(dtype) for v in (alpha, beta, log_a, lam))


def check_order(order, allowed, name) -> int:
    if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or int(order) not in allowed:
        raise ValueError(f"{name} order must be one of {allowed}, got {order!r}.")
    return int(order)


# ---------------------------------------------------------------------------------------------------------
# The base of the diffusion solvers, and DDIM.
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DiffusionSolver(Solver):
    """A solver of the probability-flow ODE in log-SNR: needs the path; grids uniform in ``t`` or ``lambda``.

    Args:
      spacing: ``"time"`` (uniform in ``t``) or ``"logsnr"`` (uniform in ``lambda``; needs a finite log-SNR at both
        ends). Ignored when ``ts`` is given.
    """

    spacing: str = "time"

    def __post_init__(self):
        if self.spacing not in SPACINGS:
            raise ValueError(f"unknown spacing {self.spacing!r}; use 'time' (uniform in t) or 'logsnr' (uniform in "
                             "lambda = log(alpha/beta), DPM-Solver's recommendation for low-resolution data).")

    def grid(self, model: Model, steps, t0, t1, ts) -> Grid:
        if model.path is None:
            raise ValueError(f"the {self.name} sampler works on a Gaussian path: pass sample(..., path=...) (the path "
                             "the field was trained on, e.g. path='linear').")
        return diffusion_grid(model.path, self.default_steps if steps is None else steps, t0, t1, ts, self.spacing)


def _check_eta(eta) -> bool:
    """Validate ``eta``; return whether noise is drawn."""
    if is_concrete(eta):
        e = np.asarray(eta)
        if e.ndim != 0 or not np.isfinite(e) or not 0.0 <= float(e) <= 1.0:
            raise ValueError(f"eta must be a number in [0, 1] (0: deterministic DDIM, 1: DDPM-like ancestral "
                             f"sampling), got {eta!r}.")
        return float(e) > 0
    return True


@dataclasses.dataclass(frozen=True)
class DDIM(DiffusionSolver):
    r"""DDIM (Song et al. 2021) on any Gaussian path. NFE = ``steps``.

    Each step evaluates the field once at the left end ``t_i`` and moves to ``t_{i+1}``:

    .. math:: x_{i+1} = \alpha_{i+1} \hat z + \sqrt{\beta_{i+1}^2 - s_i^2}\,\hat\epsilon + s_i \xi_i,\qquad
              s_i = \eta\, \beta_{i+1} \sqrt{1 - e^{-2(\lambda_{i+1} - \lambda_i)}}

    (:func:`ddim_update`, :func:`ddim_noise_scale`). ``eta = 0`` is the deterministic sampler, a first-order solver
    of the probability-flow ODE (= DPM-Solver-1); ``eta = 1`` is ancestral sampling from the DDPM posterior (step
    ``i`` draws from ``fold_in(key, i)``). The last step lands exactly on ``t1``: at ``beta = 0`` (t=1 of linear,
    cosine, ...) it returns ``alpha_1 z_hat``, the denoised estimate.

    Args:
      eta: noise level in ``[0, 1]``.
      spacing: as :class:`DiffusionSolver`.
    """

    name: ClassVar[str] = "ddim"
    default_steps: ClassVar[int] = 50
    eta: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        _check_eta(self.eta)

    def needs_key(self) -> bool:
        return _check_eta(self.eta)

    def step_inputs(self, model, grid):
        alpha, beta = model.path.schedule.values(grid.times)
        lam = log_snr_from_coefficients(alpha, beta)
        return {"i": jnp.arange(grid.steps), "t": grid.times[:-1], "alpha_t": alpha[1:], "beta_t": beta[1:],
                "h": lam[1:] - lam[:-1]}  # +inf at an open end: then 1 - e^{-2h} = 1

    def step(self, model, x, inp, key):
        dt = x.dtype
        a_next, b_next, h = (inp[k].astype(dt) for k in ("alpha_t", "beta_t", "h"))
        z, e = model.denoise(x, inp["t"])
        if self.needs_key():
            eta = jnp.asarray(self.eta, dt)
            s = ddim_noise_scale(b_next, h, eta)
            xi = jax.random.normal(jax.random.fold_in(key, inp["i"]), x.shape, dt)
            x_next = _ddim_update(z, e, a_next, b_next, xi, s, eta * jnp.sqrt(-jnp.expm1(-2.0 * h)))
        else:
            x_next = ddim_update(z, e, a_next, b_next)
        return x_next, x_next


register(DDIM.name, DDIM)

__all__ = ["DDIM", "DiffusionSolver", "ddim_update", "ddim_noise_scale", "ddim_weight", "step_coefficients",
           "check_order"]
