r"""Fast samplers for diffusion models: DDIM, DPM-Solver, DPM-Solver++ and EDM (Heun + churn).

All of them work for any Gaussian path ``x_t = alpha_t z + beta_t eps`` (jaxgen's convention: t=0 is
noise, t=1 is data) and any field parameterisation: every field output is decoded once into the pair
``(z_hat, eps_hat)`` = (posterior mean of the data, of the noise) by :func:`jaxgen.fields.to_data_and_noise`,
with ``x = alpha_t z_hat + beta_t eps_hat``, and the solvers are written in that pair.

The solvers integrate the probability-flow ODE in the half log signal-to-noise ratio

.. math:: \lambda_t = \log(\alpha_t / \beta_t) \quad (\text{increasing in } t;\ -\infty \text{ where } \alpha_t = 0,\
          +\infty \text{ where } \beta_t = 0),

whose exact solution from ``s`` to ``t`` (Lu et al. 2022, eq. 3.4; Lu et al. 2022b, eq. 8) is

.. math:: x_t = \frac{\alpha_t}{\alpha_s} x_s
          - \alpha_t \int_{\lambda_s}^{\lambda_t} e^{-\lambda} \hat\epsilon\, d\lambda
          = \frac{\beta_t}{\beta_s} x_s + \beta_t \int_{\lambda_s}^{\lambda_t} e^{\lambda} \hat z\, d\lambda .

Freezing ``eps_hat`` (or ``z_hat``) over a step gives DDIM, ``x_t = alpha_t z_hat + beta_t eps_hat``; the
higher-order solvers Taylor-expand the integrand in ``lambda``. EDM (Karras et al. 2022) integrates the
same ODE in ``sigma = beta / alpha = e^{-lambda}`` on the scaled state ``x / alpha``.

Time grids and the ends of the path
-----------------------------------
By default the grid runs from the path's ``t_min`` to its ``t_max`` (the data end: ``t = 1`` for linear,
cosine, polynomial, VE and EDM, ``1 - 1e-5`` for VP / sub-VP). Fields are evaluated at the left end of
every step and at interior points, never at the final time, so a data prediction is never decoded where
``beta = 0``. On paths with ``alpha_0 = 0`` (linear, cosine, polynomial) an eps or score prediction says
nothing about the data at t=0: these samplers then raise ``ValueError`` and ask for ``t0 > 0`` (e.g. 1e-3).

A step that starts where ``alpha = 0`` (``lambda = -inf``) or ends where ``beta = 0`` (``lambda = +inf``)
cannot be Taylor-expanded in ``lambda``: DPM-Solver and DPM-Solver++ take such a step with DDIM
(first order, exact formula ``x_t = alpha_t z_hat + beta_t eps_hat`` needing no division). Its local error
is ``O(h^2)`` for smooth data, so the solver is then at most second order (on Gaussian data, DPM-Solver-3
on ``[0, 1]`` of the linear path converges at slope ~2.1, DPM-Solver-2 approaches 2 from below). For the
full order use an interval with a finite log-SNR at both ends, as the papers do (e.g. ``t0=1e-3,
t1=1-1e-3`` on the linear path, or the VP path), best with ``spacing="logsnr"``: with steps uniform in ``t``
the steps next to an end stay long in ``lambda``, and convergence is slower before it is asymptotic. Open
ends are detected at trace time when the grid's ends are known then (Python floats ``t0``/``t1``, or a
concrete ``ts``), otherwise (a ``ts`` traced under ``jit`` or differentiated) from the grid's values inside the
program: the single-step solvers then select DDIM for a step with an infinite log-SNR at an end, but still
evaluate the field ``order`` times on it (``nfe`` counts those evaluations).

Gradients. The samplers can be differentiated (``jax.grad``) with respect to the field's parameters, ``x0``
and the time grid (a traced ``ts``), also where an end has ``alpha = 0`` or ``beta = 0``: the infinite
log-SNR there is a constant (derivative 0, not ``inf``, which gave ``0 * inf = NaN``), the interior points of
the single-step solvers move with the grid (:func:`times_from_lambdas` has the derivative of the inverse
function), and the terms that stay smooth at such an end (DDIM's ``beta_t`` and its noise coefficient,
DPM-Solver++(2M)'s ``e^{-h}``) are differentiated as functions of ``alpha`` and ``beta``. With respect to an
open end itself the gradient is that of the DDIM step taken there: the one-sided derivative for deterministic
DDIM and DPM-Solver-1 at both ends, and for stochastic DDIM and DPM-Solver++(2M) at ``beta = 0`` (tested
against differences in ``tests/test_fast_samplers.py``). The single-step solvers of order 2-3 switch to their
full step as soon as an open end moves inside the path, and the second step of 2M depends on ``1 / log(t_0)``:
there the samples are not differentiable in the end's time in the ordinary sense. (The field's own derivative
in ``t`` at an end is the field's business.)

The noise-prediction form (DPM-Solver) multiplies its eps estimates by up to ``alpha_t / alpha_s``: with
long first steps from ``alpha ~ 1e-3`` it amplifies float32 rounding (different parameterisations of the
same exact field then differ by ~1e-3 after 4 steps on ``[1e-3, 1]`` of the linear path, ~4e-6 on VP);
DPM-Solver++ (data prediction) does not, which is why Lu et al. (2022b) recommend it.

Each sampler returns a :class:`~jaxgen.samplers.SampleResult` whose ``nfe`` is the exact number of field
evaluations, each on the whole batch (a Python int; a 0-d array once returned from a jitted function).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np
import jax
import jax.numpy as jnp

from jaxgen._checks import check_time, is_concrete
from jaxgen.fields import canonical_prediction, to_data_and_noise
from jaxgen.paths.gaussian import GaussianPath, as_path
from jaxgen.samplers.ode import SampleResult, _bind

Array = jax.Array

__all__ = [
    "ddim", "dpm_solver", "dpm_solver_pp", "edm_sampler",
    "karras_sigmas", "times_from_sigmas", "times_from_lambdas", "sigmas_from_times", "log_snr",
    "ddim_update", "ddim_noise_scale", "dpm_solver_pp_2m_update",
]

# Below this alpha an eps/score prediction is not decoded into a data estimate (fields.py: the division by
# alpha amplifies a network's error by 1 / alpha). Same threshold as jaxgen.samplers.sample_sde.
_MIN_ALPHA_FOR_NOISE_PREDICTIONS = 1e-3
_BISECTION_ITERS = 48
_SPACINGS = ("time", "logsnr")


# ---------------------------------------------------------------------------------------------------------
# Noise levels and time grids.
# ---------------------------------------------------------------------------------------------------------


def log_snr(path: GaussianPath | str, t: Array) -> Array:
    r"""Half log signal-to-noise ratio ``lambda_t = log(alpha_t / beta_t)`` (Lu et al. 2022, sec. 3.1).

    Increasing in ``t`` for every valid schedule; ``-inf`` where ``alpha_t = 0`` and ``+inf`` where
    ``beta_t = 0`` (no NaN). ``t`` may have any shape.
    """
    alpha, beta = _alpha_beta(as_path(path), jnp.asarray(t, jnp.float32))
    return jnp.log(alpha) - jnp.log(beta)


def _alpha_beta(path: GaussianPath, t: Array) -> tuple[Array, Array]:
    """``(alpha_t, beta_t)``, the same values as ``path.coefficients(t)``, without the two ``jax.jvp`` that
    also give the derivatives (the log-SNR does not need them; ``Schedule`` has no method for the values
    alone, so this repeats ``Schedule.__call__`` on its ``alpha_fn``/``beta_fn``). Evaluated op by op outside
    ``jit``, where every operation is dispatched and compiled for each new shape, it takes half the time."""
    sched = path.schedule
    t = jnp.asarray(t)
    if not jnp.issubdtype(t.dtype, jnp.floating):
        t = t.astype(jnp.float32)
    tc = sched.clamp(t)
    alpha, beta = _nonneg(sched.alpha_fn(tc)), _nonneg(sched.beta_fn(tc))
    # a constant schedule (VE's alpha = 1) may return a broadcastable scalar
    return tuple(jnp.broadcast_to(v, tc.shape).astype(tc.dtype) for v in (alpha, beta))


@jax.custom_jvp
def _nonneg(v: Array) -> Array:
    """``jnp.maximum(v, 0)``, as ``Schedule.__call__`` keeps the coefficients non-negative (round-off can make
    ``cos(pi/2) = -4e-8``), but with derivative 1 (not ``jnp.maximum``'s 1/2) where ``v = 0``: the one-sided
    derivative at an open end of the path (``alpha_0 = 0``, ``beta_1 = 0``)."""
    return jnp.maximum(v, 0)


@_nonneg.defjvp
def _nonneg_jvp(primals, tangents):
    (v,), (v_dot,) = primals, tangents
    return jnp.maximum(v, 0), jnp.where(v < 0, jnp.zeros_like(v_dot), v_dot)


@jax.custom_jvp
def _log_safe(v: Array) -> Array:
    """``jnp.log(v)``, with derivative 0 instead of ``1 / 0 = inf`` where ``v = 0`` (``log v = -inf``, then a
    constant): a grid whose end has ``alpha = 0`` or ``beta = 0`` is differentiated without ``0 * inf = NaN``.

    The "double where" of ``jaxgen.samplers.unipc``'s guarded log-SNR, applied to the derivative only: the
    forward pass keeps exactly the operations of ``jnp.log`` (a select around it changes how XLA fuses the
    program, and the samples by an ulp). A formula that needs the derivative of ``e^{-h}`` at such an end
    computes it from ``alpha`` and ``beta`` (:func:`dpm_solver_pp_2m_update`)."""
    return jnp.log(v)


@_log_safe.defjvp
def _log_safe_jvp(primals, tangents):
    (v,), (v_dot,) = primals, tangents
    pos = v > 0  # double where: the division only sees v > 0
    return jnp.log(v), jnp.where(pos, v_dot / jnp.where(pos, v, 1.0), 0.0)


def _log_snr_safe(alpha: Array, beta: Array) -> Array:
    """``lambda = log(alpha) - log(beta)``, the same operations and values as :func:`log_snr` (``-inf`` where
    ``alpha = 0``, ``+inf`` where ``beta = 0``), with derivative 0 where it is infinite (:func:`_log_safe`), as
    ``jaxgen.samplers.unipc``'s guarded log-SNR: no ``0 * inf = NaN`` in gradients through an open end."""
    return _log_safe(alpha) - _log_safe(beta)


def sigmas_from_times(path: GaussianPath | str, t: Array) -> Array:
    r"""EDM noise level ``sigma_t = beta_t / alpha_t = e^{-lambda_t}`` (Karras et al. 2022, sec. 2 with
    ``s(t) = alpha_t``); ``+inf`` where ``alpha_t = 0`` and ``0`` where ``beta_t = 0``."""
    return jnp.exp(-log_snr(path, t))


def times_from_lambdas(path: GaussianPath | str, lambdas: Array, *, iters: int = _BISECTION_ITERS) -> Array:
    r"""Invert ``lambda_t = log(alpha_t / beta_t)`` on the path's domain ``[t_min, t_max]`` by bisection.

    Vectorised over ``lambdas`` (any shape) and jit-able: a fixed number of halvings (48 by default,
    below float32 resolution) of the bracket ``[t_min, t_max]``, valid because ``lambda`` is increasing
    (``alpha d_beta - beta d_alpha < 0``, checked when the schedule is built). Levels outside the path's
    range map to the nearest end: ``-inf`` (or below ``lambda(t_min)``) to ``t_min``, ``+inf`` to ``t_max``.

    Differentiable: the derivative is that of the inverse function, ``dt / dlambda = 1 / lambda'(t)``
    (implicit function theorem; the bisection's own derivative would be zero), and zero for levels mapped
    to an end.
    """
    path = as_path(path)
    sched = path.schedule
    iters = int(iters)
    t_min, t_max = float(sched.t_min), float(sched.t_max)
    lam_lo = log_snr(path, jnp.float32(t_min))
    lam_hi = log_snr(path, jnp.float32(t_max))

    def lam_at(t):  # = log_snr(path, t) without the derivatives that Schedule.__call__ also computes
        tc = sched.clamp(t)
        return jnp.log(jnp.maximum(sched.alpha_fn(tc), 0.0)) - jnp.log(jnp.maximum(sched.beta_fn(tc), 0.0))

    @jax.custom_jvp
    def bisect(lam):
        def halve(_, bracket):
            lo, hi = bracket
            mid = 0.5 * (lo + hi)
            below = lam_at(mid) < lam
            return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

        lo0 = jnp.full(lam.shape, t_min, jnp.float32)
        hi0 = jnp.full(lam.shape, t_max, jnp.float32)
        lo, hi = jax.lax.fori_loop(0, iters, halve, (lo0, hi0))
        t = 0.5 * (lo + hi)
        t = jnp.where(lam >= lam_hi, t_max, t)
        return jnp.where(lam <= lam_lo, t_min, t)

    @bisect.defjvp
    def bisect_jvp(primals, tangents):
        (lam,), (lam_dot,) = primals, tangents
        t = bisect(lam)
        c = path.coefficients(t)
        pos = (c.alpha > 0) & (c.beta > 0)
        dlam_dt = jnp.where(pos, c.d_alpha / jnp.where(pos, c.alpha, 1.0) - c.d_beta / jnp.where(pos, c.beta, 1.0),
                            0.0)
        inside = (lam > lam_lo) & (lam < lam_hi) & (dlam_dt > 0) & jnp.isfinite(dlam_dt)
        return t, jnp.where(inside, lam_dot / jnp.where(inside, dlam_dt, 1.0), 0.0)

    return bisect(jnp.asarray(lambdas, jnp.float32))


def times_from_sigmas(path: GaussianPath | str, sigmas: Array, *, iters: int = _BISECTION_ITERS) -> Array:
    r"""Times ``t`` with ``beta_t / alpha_t = sigma`` (EDM noise level -> jaxgen time), by bisection.

    ``sigma = 0`` maps to the data end ``t_max``; levels above ``sigma(t_min)`` map to ``t_min``. See
    :func:`times_from_lambdas` (``lambda = -log sigma``). For the ``edm`` path with the same
    ``(sigma_min, sigma_max, rho)`` the Karras grid maps to a uniform grid in ``t``.
    """
    sigmas = jnp.asarray(sigmas, jnp.float32)
    return times_from_lambdas(path, -jnp.log(sigmas), iters=iters)


def karras_sigmas(n: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, *,
                  append_zero: bool = False) -> Array:
    r"""EDM's noise levels (Karras et al. 2022, eq. 5), decreasing from ``sigma_max`` to ``sigma_min``:

    .. math:: \sigma_i = \Big(\sigma_{max}^{1/\rho}
              + \tfrac{i}{n-1}\big(\sigma_{min}^{1/\rho} - \sigma_{max}^{1/\rho}\big)\Big)^\rho,
              \quad i = 0, \dots, n-1,

    followed by ``sigma_n = 0`` when ``append_zero`` (the grid of EDM's sampler, Algorithm 1/2).
    """
    if not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1:
        raise ValueError(f"karras_sigmas needs a positive integer number of levels n, got {n!r}.")
    _check_sigma_range(sigma_min, sigma_max)
    if is_concrete(rho) and not float(rho) > 0:
        raise ValueError(f"rho must be positive (EDM uses 7), got {rho}.")
    ramp = jnp.linspace(0.0, 1.0, int(n), dtype=jnp.float32) if n > 1 else jnp.zeros((1,), jnp.float32)
    hi = jnp.asarray(sigma_max, jnp.float32) ** (1.0 / rho)
    lo = jnp.asarray(sigma_min, jnp.float32) ** (1.0 / rho)
    sig = (hi + ramp * (lo - hi)) ** rho
    if append_zero:
        sig = jnp.concatenate([sig, jnp.zeros((1,), jnp.float32)])
    return sig


def _check_sigma_range(sigma_min, sigma_max) -> None:
    if is_concrete(sigma_min) and is_concrete(sigma_max) and not 0 < float(sigma_min) < float(sigma_max) < math.inf:
        raise ValueError(f"need finite noise levels 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min}, "
                         f"sigma_max={sigma_max} (EDM uses 0.002 and 80).")


def _check_steps(steps) -> int:
    if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}.")
    return int(steps)


class _Grid(NamedTuple):
    """A sampler's increasing time grid, with its ends as Python floats when known at trace time."""

    times: Array
    first: float | None
    last: float | None


def _concrete_float(v) -> float | None:
    return float(np.asarray(v)) if is_concrete(v) else None


def _time_grid(path: GaussianPath, steps: int, t0, t1, ts, spacing: str) -> _Grid:
    """The sampler's increasing time grid: ``ts``, or ``steps`` steps from ``t0`` to ``t1`` uniform in
    ``t`` (``spacing='time'``) or in ``lambda`` (``spacing='logsnr'``, by bisection inside the program)."""
    if spacing not in _SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; use 'time' (uniform in t) or 'logsnr' (uniform in "
                         "lambda = log(alpha/beta), DPM-Solver's recommendation for low-resolution data).")
    if ts is not None:
        ts = jnp.asarray(ts, jnp.float32)
        if ts.ndim != 1 or ts.shape[0] < 2:
            raise ValueError(f"ts must be a 1-D array of at least 2 times, got shape {tuple(ts.shape)}.")
        check_time(ts, name="ts")
        if not is_concrete(ts):
            return _Grid(ts, None, None)
        arr = np.asarray(ts)
        if not np.all(np.diff(arr) > 0):
            raise ValueError("ts must be strictly increasing: jaxgen samples from noise (t=0) to data (t=1); "
                             "if your grid comes from a diffusion code base (tau=0 is data), pass 1 - tau.")
        return _Grid(ts, float(arr[0]), float(arr[-1]))
    steps = _check_steps(steps)
    t0 = path.schedule.t_min if t0 is None else t0
    t1 = path.schedule.t_max if t1 is None else t1
    check_time(jnp.asarray([t0, t1]), name="(t0, t1)")
    first, last = _concrete_float(t0), _concrete_float(t1)
    if first is not None and last is not None and not first < last:
        raise ValueError(f"need t0 < t1 (samplers run from noise at t0 to data at t1), got t0={t0}, t1={t1}.")
    if spacing == "time":
        return _Grid(jnp.linspace(t0, t1, steps + 1, dtype=jnp.float32), first, last)
    for name, tv, end in (("t0", first, 0), ("t1", last, 1)):
        if tv is not None and not np.isfinite(_log_snr_now(path, tv)):
            raise ValueError(
                f"spacing='logsnr' needs a finite log-SNR at both ends (alpha > 0 at t0 and beta > 0 at t1), but path "
                f"'{path.name}' has lambda = {_log_snr_now(path, tv):g} at {name}={tv:g}; pass e.g. t0=1e-3, "
                "t1=1-1e-3, or use spacing='time'.")
    lam = log_snr(path, jnp.asarray([t0, t1], jnp.float32))
    grid = times_from_lambdas(path, jnp.linspace(lam[0], lam[1], steps + 1))
    return _Grid(grid.at[0].set(t0).at[-1].set(t1), first, last)


def _log_snr_now(path: GaussianPath, t: float) -> float:
    """``lambda_t`` of a Python float ``t``, evaluated at trace time (also inside ``jit``)."""
    with jax.ensure_compile_time_eval():
        return float(log_snr(path, jnp.float32(t)))


def _open_ends(path: GaussianPath, grid: _Grid) -> tuple[bool, bool]:
    """``(alpha(t_0) == 0, beta(t_N) == 0)``: whether the log-SNR is infinite at the grid's ends, as known at
    trace time (``False`` for an end traced under jit, which the samplers then check from its value)."""
    start = grid.first is not None and _log_snr_now(path, grid.first) == -np.inf
    end = grid.last is not None and _log_snr_now(path, grid.last) == np.inf
    return start, end


def _check_start(path: GaussianPath, prediction: str, t_first: float | None) -> None:
    """Refuse to decode an eps/score prediction into a data estimate where ``alpha ~ 0``."""
    if prediction not in ("eps", "score") or t_first is None:
        return
    with jax.ensure_compile_time_eval():
        alpha = float(_alpha_beta(path, jnp.float32(t_first))[0])
    if alpha < _MIN_ALPHA_FOR_NOISE_PREDICTIONS:
        raise ValueError(
            f"a {prediction} prediction carries no information about the data where alpha_t = 0, and these samplers "
            f"need the data estimate (alpha at the first time t={t_first:g} is {alpha:.3g} on path "
            f"'{path.name}'): start later, e.g. t0=1e-3 (or a smaller sigma_max for edm_sampler), or use a "
            "velocity, data or v parameterisation.")


def _denoiser(field: Callable, path: GaussianPath, prediction: str, cond: dict | None):
    """``(x, t) -> (z_hat, eps_hat)``: one field evaluation decoded by the field algebra."""
    f = _bind(field, cond)

    def zeps(x, t):
        out = f(x, t)
        return to_data_and_noise(path, out, x, jnp.broadcast_to(jnp.asarray(t, x.dtype), (x.shape[0],)), prediction)

    return zeps


def _finish(x, traj_steps, x0, grid, nfe, save_trajectory, head=(), tail=()):
    """Assemble a SampleResult from a scanned trajectory plus steps taken before/after the scan."""
    traj = None
    if save_trajectory:
        parts = [x0[None], *[h[None] for h in head]]
        if traj_steps is not None:
            parts.append(traj_steps)
        parts += [s[None] for s in tail]
        traj = jnp.concatenate(parts, axis=0)
    return SampleResult(x, int(nfe), grid, traj)


def _cast(x, *arrays):
    return tuple(jnp.asarray(a).astype(x.dtype) for a in arrays)


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


# ---------------------------------------------------------------------------------------------------------
# DDIM.
# ---------------------------------------------------------------------------------------------------------


def _check_eta(eta, key) -> bool:
    """Validate ``eta`` and ``key``; return whether noise is drawn."""
    if is_concrete(eta):
        e = np.asarray(eta)
        if e.ndim != 0 or not np.isfinite(e) or not 0.0 <= float(e) <= 1.0:
            raise ValueError(f"eta must be a number in [0, 1] (0: deterministic DDIM, 1: DDPM-like ancestral "
                             f"sampling), got {eta!r}.")
        stochastic = float(e) > 0
    else:
        stochastic = True
    if stochastic and key is None:
        raise ValueError("ddim with eta > 0 draws fresh noise at every step: pass key=jax.random.key(...).")
    return stochastic


def ddim(
    field: Callable,
    x0: Array,
    *,
    path: GaussianPath | str,
    prediction: str = "velocity",
    steps: int = 50,
    eta: float = 0.0,
    key: Array | None = None,
    t0: float | None = None,
    t1: float | None = None,
    ts: Array | None = None,
    spacing: str = "time",
    cond: dict | None = None,
    save_trajectory: bool = False,
) -> SampleResult:
    r"""DDIM (Song et al. 2021) on any Gaussian path, from noise ``x0`` at ``t0`` to data at ``t1``.

    Each step evaluates the field once at the left end ``t_i`` and moves to ``t_{i+1}``:

    .. math:: x_{i+1} = \alpha_{i+1} \hat z + \sqrt{\beta_{i+1}^2 - s_i^2}\,\hat\epsilon + s_i \xi_i,\qquad
              s_i = \eta\, \beta_{i+1} \sqrt{1 - e^{-2(\lambda_{i+1} - \lambda_i)}}

    (see :func:`ddim_update`, :func:`ddim_noise_scale`). ``eta = 0`` is the deterministic sampler, a
    first-order solver of the probability-flow ODE (= DPM-Solver-1); ``eta = 1`` is ancestral sampling
    from the DDPM posterior. The last step lands exactly on ``t1``: at ``beta = 0`` (t=1 of linear,
    cosine, ...) it returns ``alpha_1 z_hat``, the denoised estimate.

    Args:
      field: ``field(x, t, **cond)`` predicting ``prediction`` on ``path``.
      x0: samples of the path at ``t0`` (e.g. ``path.sample_prior(key, shape)``), shape ``(B, ...)``.
      path: a :class:`~jaxgen.paths.GaussianPath` or schedule name.
      prediction: ``velocity`` | ``score`` | ``eps`` | ``data`` | ``v`` (or an alias).
      steps: number of steps (ignored when ``ts`` is given). NFE = ``steps``.
      eta: noise level in ``[0, 1]``.
      key: PRNG key, required when ``eta > 0``; step ``i`` uses ``fold_in(key, i)``.
      t0, t1: the interval; default the path's domain ``[t_min, t_max]``.
      ts: an explicit increasing grid (overrides ``steps``, ``t0``, ``t1``, ``spacing``).
      spacing: ``"time"`` (uniform in ``t``) or ``"logsnr"`` (uniform in ``lambda``; needs finite ends).
      cond: conditioning keywords passed to the field.
      save_trajectory: also return the states at every grid time.
    """
    path = as_path(path)
    prediction = canonical_prediction(prediction)
    stochastic = _check_eta(eta, key)
    g = _time_grid(path, steps, t0, t1, ts, spacing)
    _check_start(path, prediction, g.first)
    zeps = _denoiser(field, path, prediction, cond)
    grid = g.times
    alpha32, beta32 = _alpha_beta(path, grid)
    alpha, beta = _cast(x0, alpha32, beta32)
    lam = _log_snr_safe(alpha32, beta32)
    h = (lam[1:] - lam[:-1]).astype(x0.dtype)  # +inf at an open end: then 1 - e^{-2h} = 1
    n = grid.shape[0] - 1

    def body(x, inp):
        i, t, a_next, b_next, h_i = inp
        z, e = zeps(x, t)
        if stochastic:
            eta_x = jnp.asarray(eta, x.dtype)
            s = ddim_noise_scale(b_next, h_i, eta_x)
            xi = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
            x_next = _ddim_update(z, e, a_next, b_next, xi, s, eta_x * jnp.sqrt(-jnp.expm1(-2.0 * h_i)))
        else:
            x_next = ddim_update(z, e, a_next, b_next)
        return x_next, (x_next if save_trajectory else None)

    x, traj = jax.lax.scan(body, x0, (jnp.arange(n), grid[:-1], alpha[1:], beta[1:], h))
    return _finish(x, traj, x0, grid, n, save_trajectory)


# ---------------------------------------------------------------------------------------------------------
# DPM-Solver (noise prediction, single-step) and DPM-Solver++ (data prediction).
# ---------------------------------------------------------------------------------------------------------


def _check_order(order, allowed, name) -> int:
    if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or int(order) not in allowed:
        raise ValueError(f"{name} order must be one of {allowed}, got {order!r}.")
    return int(order)


def _intermediate_times(path: GaussianPath, lam_s: Array, lam_t: Array, fractions: tuple[float, ...]) -> list[Array]:
    """Times at ``lambda_s + r h`` (``h = lambda_t - lambda_s``, float32) for each step ``[s, t]`` and each ``r``
    in ``fractions`` (one vectorised bisection for all of them)."""
    h = lam_t - lam_s
    r = jnp.asarray(fractions, jnp.float32)[:, None]
    times = times_from_lambdas(path, lam_s[None] + r * h[None])
    return [times[k] for k in range(len(fractions))]


def _step_coeffs(path: GaussianPath, t: Array, dtype):
    """``(alpha, beta, log alpha, lambda)`` at times ``t`` (float32 maths, cast to the state's dtype); the
    infinite logs (where ``alpha`` or ``beta`` is 0) are constants, so that gradients stay finite."""
    alpha, beta = _alpha_beta(path, t)
    log_a = _log_safe(alpha)
    lam = _log_snr_safe(alpha, beta)
    return tuple(v.astype(dtype) for v in (alpha, beta, log_a, lam))


def _dpm_solver_update(order: int, zeps: Callable, x: Array, zs_es: tuple[Array, Array],
                       coeffs: dict) -> tuple[Array, Array]:
    r"""One single-step DPM-Solver-``order`` step from ``s`` to ``t`` (formulas in :func:`dpm_solver`).

    The interior points' actual ``r_k = (lambda_{s_k} - lambda_s) / h`` (of the bisected times) are used, for
    which the formulas hold as well. ``zs_es`` is the decoded field at the start, ``zeps(x, t_s)``; ``coeffs``
    holds the step's path coefficients; returns ``(x_t, z_hat_s)``. Requires finite ``lambda_s`` and ``lambda_t``.
    """
    z_s, e_s = zs_es
    a_t, b_t = coeffs["alpha_t"], coeffs["beta_t"]
    if order == 1:
        return ddim_update(z_s, e_s, a_t, b_t), z_s
    lam_s, log_a_s = coeffs["lam_s"], coeffs["log_alpha_s"]
    h = coeffs["lam_t"] - lam_s
    ratio_t = jnp.exp(coeffs["log_alpha_t"] - log_a_s)
    phi_1 = jnp.expm1(h)
    a_1, b_1, log_a_1, lam_1 = coeffs["s1"]
    h_1 = lam_1 - lam_s
    r_1 = h_1 / h
    u_1 = jnp.exp(log_a_1 - log_a_s) * x - b_1 * jnp.expm1(h_1) * e_s
    _, e_1 = zeps(u_1, coeffs["t_s1"])
    if order == 2:
        x_t = ratio_t * x - b_t * phi_1 * e_s - b_t / (2.0 * r_1) * phi_1 * (e_1 - e_s)
        return x_t, z_s
    a_2, b_2, log_a_2, lam_2 = coeffs["s2"]
    h_2 = lam_2 - lam_s
    r_2 = h_2 / h
    phi_22 = jnp.expm1(h_2) / h_2 - 1.0
    u_2 = (jnp.exp(log_a_2 - log_a_s) * x - b_2 * jnp.expm1(h_2) * e_s
           - b_2 * (r_2 / r_1) * phi_22 * (e_1 - e_s))
    _, e_2 = zeps(u_2, coeffs["t_s2"])
    phi_2 = phi_1 / h - 1.0
    x_t = ratio_t * x - b_t * phi_1 * e_s - (b_t / r_2) * phi_2 * (e_2 - e_s)
    return x_t, z_s


def _dpm_solver_pp_2s_update(zeps: Callable, x: Array, zs_es: tuple[Array, Array], coeffs: dict) -> Array:
    r"""One DPM-Solver++(2S) step (Lu et al. 2022b, Algorithm 1, data-prediction form), ``r = 1/2``:

    .. math:: u = \frac{\beta_1}{\beta_s} x - \alpha_1 (e^{-r h} - 1) \hat z_s,\qquad
              x_t = \frac{\beta_t}{\beta_s} x
              - \alpha_t (e^{-h} - 1)\Big[\hat z_s + \frac{1}{2r}\big(\hat z(u, s_1) - \hat z_s\big)\Big]

    (``zs_es`` is the decoded field at the start, ``zeps(x, t_s)``).
    """
    z_s, _ = zs_es
    b_s, lam_s = coeffs["beta_s"], coeffs["lam_s"]
    a_t, b_t = coeffs["alpha_t"], coeffs["beta_t"]
    h = coeffs["lam_t"] - lam_s
    a_1, b_1, _, lam_1 = coeffs["s1"]
    h_1 = lam_1 - lam_s
    r_1 = h_1 / h
    u = (b_1 / b_s) * x - a_1 * jnp.expm1(-h_1) * z_s
    z_1, _ = zeps(u, coeffs["t_s1"])
    d = z_s + (z_1 - z_s) / (2.0 * r_1)
    return (b_t / b_s) * x - a_t * jnp.expm1(-h) * d


def dpm_solver_pp_2m_update(x: Array, z_cur: Array, z_prev: Array, beta_s: Array, alpha_t: Array, beta_t: Array,
                            h: Array, h_prev: Array, *, alpha_s: Array | None = None) -> Array:
    r"""One DPM-Solver++(2M) step (Lu et al. 2022b, Algorithm 2), ``r = h_{prev} / h``:

    .. math:: D = \Big(1 + \frac{1}{2r}\Big)\hat z_{i} - \frac{1}{2r}\hat z_{i-1},\qquad
              x_{i+1} = \frac{\beta_{i+1}}{\beta_i} x_i - \alpha_{i+1}(e^{-h} - 1) D .

    An infinite previous step (``h_prev = inf``: no history, or ``lambda = -inf`` at the start of the grid)
    gives ``1/r = 0``, and so does an infinite step (``lambda_{i+1} = +inf``, ``beta_{i+1} = 0``): the step is
    then first order, DDIM in data-prediction form ``x_{i+1} = (beta_{i+1}/beta_i) x_i + alpha_{i+1} (1 - e^{-h}) z_i``.

    Differentiable at infinite ``h`` or ``h_prev`` (no ``0 * inf = NaN``). An infinite ``h`` (``alpha_i = 0`` or
    ``beta_{i+1} = 0``) gives ``e^{-h} = 0`` with derivative 0; pass ``alpha_s`` (``alpha_i``) to differentiate
    it as ``e^{-h} = alpha_i beta_{i+1} / (beta_i alpha_{i+1})`` instead, which is exact there (a derivative
    with respect to the time of that end).
    """
    finite = jnp.isfinite(h_prev) & jnp.isfinite(h)
    inv_2r = jnp.where(finite, 0.5 * jnp.where(finite, h, 1.0) / jnp.where(finite, h_prev, 1.0), 0.0)
    d = z_cur + inv_2r * (z_cur - z_prev)
    if alpha_s is None:
        expm1_neg_h = jnp.expm1(-h)
    else:
        h_finite = jnp.isfinite(h)
        den = beta_s * alpha_t
        e_neg_h = alpha_s * beta_t / jnp.where(den > 0, den, 1.0)  # = e^{-h}: 0 where h is infinite
        expm1_neg_h = jnp.where(h_finite, jnp.expm1(-jnp.where(h_finite, h, 0.0)), e_neg_h - 1.0)
    return (beta_t / beta_s) * x - alpha_t * expm1_neg_h * d


def _singlestep_sampler(update: Callable, order: int, fractions: tuple[float, ...], zeps: Callable, x0: Array,
                        path: GaussianPath, g: _Grid, save_trajectory: bool) -> SampleResult:
    """Shared driver of the single-step solvers: DDIM at open ends, ``update`` (``order`` NFE) elsewhere.

    ``update(x, zeps(x, t_s), c)`` takes a step from the decoded field at its start and the step's coefficients
    ``c``. An end of the grid that is known at trace time gets its DDIM step outside the scan (1 NFE). With an
    end traced under ``jit`` (e.g. ``ts`` a jitted or differentiated argument) every step of order > 1 is
    checked inside the program: where its log-SNR is infinite at an end, the DDIM step (from the same first
    evaluation) is selected, and ``update`` runs on finite stand-in coefficients so that neither branch has
    ``inf`` or NaN in its derivative; such a step still costs ``order`` evaluations (counted in ``nfe``)."""
    grid = g.times
    n = grid.shape[0] - 1
    open_start, open_end = _open_ends(path, g)
    first = 1 if open_start else 0
    last = n - 1 if (open_end and n - 1 >= first) else n  # regular steps are [first, last)
    dt = x0.dtype
    alpha, beta, log_a, lam = _step_coeffs(path, grid, dt)

    def ddim_step(x, i):
        z, e = zeps(x, grid[i])
        return ddim_update(z, e, alpha[i + 1], beta[i + 1])

    head, tail = [], []
    x = x0
    if first == 1:
        x = ddim_step(x, 0)
        head.append(x)
    traj = None
    if last > first:
        sl = slice(first, last)
        steps_in = {
            "t_s": grid[sl], "alpha_s": alpha[sl], "beta_s": beta[sl], "log_alpha_s": log_a[sl], "lam_s": lam[sl],
            "alpha_t": alpha[first + 1:last + 1], "beta_t": beta[first + 1:last + 1],
            "log_alpha_t": log_a[first + 1:last + 1], "lam_t": lam[first + 1:last + 1],
        }
        checked = order > 1 and (g.first is None or g.last is None)
        if order > 1:
            lam32 = _log_snr_safe(*_alpha_beta(path, grid[first:last + 1]))
            lam_s, lam_t = lam32[:-1], lam32[1:]
            if checked:  # finite stand-ins (a step of 1 in lambda next to the finite end) where lambda is infinite
                fin_s, fin_t = jnp.isfinite(lam_s), jnp.isfinite(lam_t)
                steps_in["ok"] = fin_s & fin_t
                lam_s = jnp.where(fin_s, lam_s, jnp.where(fin_t, lam_t - 1.0, 0.0))
                lam_t = jnp.where(fin_t, lam_t, lam_s + 1.0)
                steps_in["lam_s"], steps_in["lam_t"] = lam_s.astype(dt), lam_t.astype(dt)
                for k in ("log_alpha_s", "log_alpha_t"):
                    steps_in[k] = jnp.where(jnp.isfinite(steps_in[k]), steps_in[k], 0.0)
            for k, tk in enumerate(_intermediate_times(path, lam_s, lam_t, fractions), start=1):
                steps_in[f"t_s{k}"] = tk
                steps_in[f"s{k}"] = _step_coeffs(path, tk, dt)

        def body(x, c):
            zs_es = zeps(x, c["t_s"])
            x_next = update(x, zs_es, c)
            if checked:
                x_next = jnp.where(c["ok"], x_next, ddim_update(*zs_es, c["alpha_t"], c["beta_t"]))
            return x_next, (x_next if save_trajectory else None)

        x, traj = jax.lax.scan(body, x, steps_in)
    if last < n:
        x = ddim_step(x, n - 1)
        tail.append(x)
    nfe = (last - first) * order + first + (n - last)
    return _finish(x, traj, x0, grid, nfe, save_trajectory, head, tail)


_DPM_FRACTIONS = {1: (), 2: (0.5,), 3: (1.0 / 3.0, 2.0 / 3.0)}


def dpm_solver(
    field: Callable,
    x0: Array,
    *,
    path: GaussianPath | str,
    prediction: str = "velocity",
    steps: int = 10,
    order: int = 3,
    t0: float | None = None,
    t1: float | None = None,
    ts: Array | None = None,
    spacing: str = "time",
    cond: dict | None = None,
    save_trajectory: bool = False,
) -> SampleResult:
    r"""Single-step DPM-Solver-1/2/3 (Lu et al. 2022), noise-prediction form, on any Gaussian path.

    ``steps`` steps of order ``order`` on the grid (uniform in ``t`` or in ``lambda``, or ``ts``); each step
    ``[s, t]`` evaluates the field at ``s`` and at ``order - 1`` interior points placed at the log-SNR
    fractions ``r_1 = 1/2`` (order 2) or ``r_1 = 1/3, r_2 = 2/3`` (order 3) of the step, found by
    bisection (:func:`times_from_lambdas`). With ``h = lambda_t - lambda_s``, ``r_k = (lambda_{s_k} -
    lambda_s) / h`` and ``eps_s = eps_hat(x_s, s)`` (Lu et al. 2022, Algorithms 4-5):

    * order 1: ``x_t = (alpha_t/alpha_s) x_s - beta_t (e^h - 1) eps_s``, i.e. DDIM;
    * order 2: ``u = (alpha_{s_1}/alpha_s) x_s - beta_{s_1} (e^{r_1 h} - 1) eps_s`` and
      ``x_t = (alpha_t/alpha_s) x_s - beta_t (e^h - 1) eps_s - beta_t/(2 r_1) (e^h - 1) (eps_hat(u, s_1) - eps_s)``;
    * order 3: ``u_1`` as ``u``, ``D_1 = eps_hat(u_1, s_1) - eps_s``,
      ``u_2 = (alpha_{s_2}/alpha_s) x_s - beta_{s_2} (e^{r_2 h} - 1) eps_s
      - beta_{s_2} (r_2/r_1) ((e^{r_2 h} - 1)/(r_2 h) - 1) D_1``,
      ``x_t = (alpha_t/alpha_s) x_s - beta_t (e^h - 1) eps_s
      - (beta_t/r_2) ((e^h - 1)/h - 1) (eps_hat(u_2, s_2) - eps_s)``.

    The global error is ``O(h^{order})``.

    NFE = ``order * steps``, except that a step starting where ``alpha = 0`` or ending where ``beta = 0``
    (infinite log-SNR; e.g. the default interval ``[0, 1]`` of the linear path) is taken with DDIM and
    costs 1 when that end is known at trace time (``order`` for a ``ts`` traced under ``jit``; see the module
    docstring); ``result.nfe`` is exact in every case. The paper's "NFE budget"
    variant (mixing orders to hit a budget) is not implemented: choose ``steps`` and ``order``.
    Other arguments as in :func:`ddim`.
    """
    path = as_path(path)
    prediction = canonical_prediction(prediction)
    order = _check_order(order, (1, 2, 3), "dpm_solver")
    g = _time_grid(path, steps, t0, t1, ts, spacing)
    _check_start(path, prediction, g.first)
    zeps = _denoiser(field, path, prediction, cond)

    def update(x, zs_es, c):
        return _dpm_solver_update(order, zeps, x, zs_es, c)[0]

    return _singlestep_sampler(update, order, _DPM_FRACTIONS[order], zeps, x0, path, g, save_trajectory)


def dpm_solver_pp(
    field: Callable,
    x0: Array,
    *,
    path: GaussianPath | str,
    prediction: str = "velocity",
    steps: int = 20,
    order: int = 2,
    method: str = "multistep",
    lower_order_final: bool = True,
    t0: float | None = None,
    t1: float | None = None,
    ts: Array | None = None,
    spacing: str = "time",
    cond: dict | None = None,
    save_trajectory: bool = False,
) -> SampleResult:
    r"""DPM-Solver++ (Lu et al. 2022b), data-prediction form, on any Gaussian path.

    * ``method="multistep"`` (2M, Algorithm 2): one field evaluation per step; step ``i >= 1`` extrapolates
      the data prediction linearly in ``lambda`` from the current and previous points
      (:func:`dpm_solver_pp_2m_update`). The first step is first order (no history), and with
      ``lower_order_final`` (default) so is the last one, whatever the number of steps (the reference
      implementations only do it for fewer than 10-15 steps; its local error ``O(h^2)`` keeps the global
      order 2, and it keeps few-step sampling stable); the last step is always first order when it ends
      where ``beta = 0`` (``lambda = +inf``). NFE = ``steps``. Global error ``O(h^2)``.
    * ``method="singlestep"`` (2S, Algorithm 1): each step evaluates at its start and at the log-SNR
      midpoint ``s_1`` (``r = 1/2``): ``u = (beta_{s_1}/beta_s) x - alpha_{s_1} (e^{-r h} - 1) z_s``,
      ``x_t = (beta_t/beta_s) x - alpha_t (e^{-h} - 1) [z_s + (z_hat(u, s_1) - z_s) / (2r)]``;
      NFE = ``2 * steps`` (minus one per open end, as
      :func:`dpm_solver`).

    ``order=1`` is DDIM for both methods. Other arguments as in :func:`ddim`.
    """
    path = as_path(path)
    prediction = canonical_prediction(prediction)
    order = _check_order(order, (1, 2), "dpm_solver_pp")
    if method not in ("multistep", "singlestep"):
        raise ValueError(f"dpm_solver_pp method must be 'multistep' (2M) or 'singlestep' (2S), got {method!r}.")
    g = _time_grid(path, steps, t0, t1, ts, spacing)
    _check_start(path, prediction, g.first)
    zeps = _denoiser(field, path, prediction, cond)
    if method == "singlestep" or order == 1:
        def update(x, zs_es, c):
            if order == 1:
                return ddim_update(*zs_es, c["alpha_t"], c["beta_t"])
            return _dpm_solver_pp_2s_update(zeps, x, zs_es, c)

        return _singlestep_sampler(update, order, _DPM_FRACTIONS[order], zeps, x0, path, g, save_trajectory)
    return _multistep_2m(zeps, x0, path, g, lower_order_final, save_trajectory)


def _multistep_2m(zeps, x0, path, g, lower_order_final, save_trajectory) -> SampleResult:
    """All steps in one scan (one copy of the field in the program): a step is first order where its
    ``h_prev`` is set to ``inf`` (the first step; the last one with ``lower_order_final`` or an open end)."""
    grid = g.times
    n = grid.shape[0] - 1
    _, open_end = _open_ends(path, g)
    alpha, beta, _, lam = _step_coeffs(path, grid, x0.dtype)
    h = lam[1:] - lam[:-1]
    inf = jnp.full((1,), jnp.inf, h.dtype)
    h_prev = jnp.concatenate([inf, h[:-1]])
    if lower_order_final or open_end:
        h_prev = h_prev.at[-1].set(jnp.inf)

    def body(carry, c):
        x, z_prev = carry
        z, _ = zeps(x, c["t"])
        x_next = dpm_solver_pp_2m_update(x, z, z_prev, c["beta_s"], c["alpha_t"], c["beta_t"], c["h"], c["h_prev"],
                                         alpha_s=c["alpha_s"])
        return (x_next, z), (x_next if save_trajectory else None)

    inp = {"t": grid[:-1], "alpha_s": alpha[:-1], "beta_s": beta[:-1], "alpha_t": alpha[1:], "beta_t": beta[1:],
           "h": h, "h_prev": h_prev}
    (x, _), traj = jax.lax.scan(body, (x0, jnp.zeros_like(x0)), inp)
    return _finish(x, traj, x0, grid, n, save_trajectory)


# ---------------------------------------------------------------------------------------------------------
# EDM (Karras et al. 2022), Algorithms 1 and 2.
# ---------------------------------------------------------------------------------------------------------


def edm_sampler(
    field: Callable,
    x0: Array,
    *,
    path: GaussianPath | str,
    prediction: str = "velocity",
    steps: int = 18,
    rho: float = 7.0,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = float("inf"),
    s_noise: float = 1.0,
    key: Array | None = None,
    ts: Array | None = None,
    cond: dict | None = None,
    save_trajectory: bool = False,
) -> SampleResult:
    r"""EDM's Heun sampler with optional stochastic churn (Karras et al. 2022, Algorithms 1 and 2).

    The probability-flow ODE of any Gaussian path, written for the scaled state ``x_hat = x / alpha_t``
    and the noise level ``sigma_t = beta_t / alpha_t`` (so ``x_hat = z + sigma eps``), is (EDM eq. 4 with
    ``s = 1`` after scaling)

    .. math:: \frac{d\hat x}{d\sigma} = \frac{\hat x - D(\hat x; \sigma)}{\sigma} = \hat\epsilon(\hat x; \sigma),

    with ``D = z_hat`` decoded from the field at ``x = alpha_t x_hat``, ``t = t(sigma)``. On the Karras grid
    ``sigma_0 > ... > sigma_{N-1}`` (:func:`karras_sigmas`), ``sigma_N = 0``, each step ``i``:

    1. churn (Algorithm 2): ``gamma_i = min(s_churn / N, sqrt(2) - 1)`` if ``s_tmin <= sigma_i <= s_tmax``
       else 0; ``sigma_hat = sigma_i (1 + gamma_i)`` (capped at the path's largest level ``sigma(t_min)``);
       ``x_hat <- x_hat + sqrt(sigma_hat^2 - sigma_i^2) s_noise xi``;
    2. Euler: ``x' = x_hat + (sigma_{i+1} - sigma_hat) d``, ``d = eps_hat(x_hat; sigma_hat)``;
    3. Heun correction unless ``sigma_{i+1} = 0``: ``x' = x_hat + (sigma_{i+1} - sigma_hat)(d + d')/2``.

    The final step is Euler to ``sigma = 0``: it returns the denoised ``D(x; sigma_{N-1})``, reported at
    the path's data end ``t_max`` as ``alpha(t_max) x_hat`` (on VE/EDM paths, whose ``t_max`` has
    ``sigma > 0``, ``sigma_{N-1} = sigma(t_max)`` and the last two reported times coincide).
    NFE = ``2 N - 1`` with or without churn.

    Noise levels are mapped to jaxgen times with :func:`times_from_sigmas` (bisection), and the solver
    uses ``sigma(t)`` recomputed from those times so it integrates exactly the path's ODE.

    Args:
      x0: samples of the path at the first time ``t(sigma_max)`` in path coordinates, e.g.
        ``alpha * sigma_max * N(0, I)`` (for VE/EDM paths ``alpha = 1``; for VP ``~ N(0, I)``).
      steps: ``N``, the number of noise levels (= steps). Ignored when ``ts`` is given.
      rho, sigma_min, sigma_max: the Karras grid. By default EDM's 0.002 and 80, clipped to the path's
        range ``[sigma(t_max), sigma(t_min)]`` (e.g. VE's ``sigma_max = 50``); explicit values outside that
        range raise ``ValueError``.
      s_churn, s_tmin, s_tmax, s_noise: EDM's stochasticity parameters (``s_churn = 0``: deterministic).
      key: PRNG key, required when ``s_churn > 0``; step ``i`` uses ``fold_in(key, i)``.
      ts: an explicit increasing time grid instead of the Karras grid; the last step goes to ``ts[-1]``
        (Euler), and ``sigma_N = sigma(ts[-1])``. ``ts[0]`` needs ``alpha > 0`` (finite ``sigma``; checked
        unless ``ts`` is traced under ``jit``).

    Notes:
      Few steps: a Heun step from ``sigma_i >> sigma_data`` to ``sigma_{i+1} << sigma_data`` averages
      ``eps_hat ~ eps`` at its start with ``eps_hat ~ 0`` at its end, so it moves only about halfway, even
      with the exact field; with EDM's (0.002, 80) grid, ``steps = 2`` returns about ``x_hat_0 / 2``, noise of
      std ~40 (Gaussian data of std 0.5: sample std 41, 2.1, 2.2, 0.9, 0.7 for N = 2, 3, 4, 6, 8). Use
      ``N >= 8`` (EDM uses 18), or DDIM / DPM-Solver++ for fewer than ~15 NFE.
    """
    path = as_path(path)
    prediction = canonical_prediction(prediction)
    stochastic = _check_churn(s_churn, s_noise, key)
    with jax.ensure_compile_time_eval():
        sig_path_max = float(sigmas_from_times(path, jnp.float32(path.schedule.t_min)))
        sig_path_min = float(sigmas_from_times(path, jnp.float32(path.schedule.t_max)))
    if ts is None:
        steps = _check_steps(steps)
        sigma_min, sigma_max = _resolve_sigma_range(path, sigma_min, sigma_max, sig_path_min, sig_path_max)
        levels = karras_sigmas(steps, sigma_min, sigma_max, rho, append_zero=True)
        grid = times_from_sigmas(path, levels).at[-1].set(path.schedule.t_max)
        first = _approx_time_of_sigma(path, sigma_max) if prediction in ("eps", "score") else None
    else:
        g = _time_grid(path, 1, None, None, ts, "time")
        grid, first = g.times, g.first
        steps = grid.shape[0] - 1
        if _open_ends(path, g)[0]:
            raise ValueError(
                f"edm_sampler integrates x / alpha_t in sigma_t = beta_t / alpha_t, both infinite at ts[0]={first:g} "
                f"(alpha = 0 on path '{path.name}'): start ts at a finite noise level, e.g. ts[0]="
                f"{_approx_time_of_sigma(path, 80.0):.4g} (sigma = 80), or leave ts=None for EDM's Karras grid.")
    _check_start(path, prediction, first)
    zeps = _denoiser(field, path, prediction, cond)
    n = steps
    dt = x0.dtype

    c = path.coefficients(grid)
    sig = sigmas_from_times(path, grid)
    if ts is None:
        sig = sig.at[-1].set(0.0)  # EDM: the last Euler step goes to sigma = 0
    sig_i = sig[:-1]
    if stochastic:
        in_range = (sig_i >= s_tmin) & (sig_i <= s_tmax)
        gamma = jnp.where(in_range, jnp.minimum(jnp.asarray(s_churn, jnp.float32) / n, math.sqrt(2.0) - 1.0), 0.0)
        sig_hat_target = jnp.minimum(sig_i * (1.0 + gamma), sig_path_max)
        t_hat = jnp.where(gamma > 0, times_from_sigmas(path, sig_hat_target), grid[:-1])
        sig_hat = jnp.where(gamma > 0, sigmas_from_times(path, t_hat), sig_i)
        alpha_hat = path.coefficients(t_hat).alpha
    else:
        t_hat, sig_hat, alpha_hat = grid[:-1], sig_i, c.alpha[:-1]
    alpha_grid = c.alpha.astype(dt)
    churn_std = (jnp.sqrt(jnp.maximum(sig_hat**2 - sig_i**2, 0.0)) * s_noise).astype(dt)
    sig, sig_hat, alpha_hat = (v.astype(dt) for v in (sig, sig_hat, alpha_hat))

    def eps_at(xh, t, a):
        return zeps(a * xh, t)[1]

    def churn(xh, i):
        if not stochastic:
            return xh
        xi = jax.random.normal(jax.random.fold_in(key, i), xh.shape, xh.dtype)
        return xh + churn_std[i] * xi

    def heun(xh, inp):
        i, t_h, s_h, a_h, t_next, s_next, a_next = inp
        xh = churn(xh, i)
        d = eps_at(xh, t_h, a_h)
        x_eul = xh + (s_next - s_h) * d
        d2 = eps_at(x_eul, t_next, a_next)
        xh_next = xh + (s_next - s_h) * 0.5 * (d + d2)
        return xh_next, (a_next * xh_next if save_trajectory else None)

    xh = x0 / alpha_grid[0]
    traj = None
    if n > 1:
        idx = jnp.arange(n - 1)
        inp = (idx, t_hat[:-1], sig_hat[:-1], alpha_hat[:-1], grid[1:n], sig[1:n], alpha_grid[1:n])
        xh, traj = jax.lax.scan(heun, xh, inp)
    # Final step: Euler (to sigma = 0 on the Karras grid: x_hat = D(x_hat; sigma_hat)).
    xh = churn(xh, n - 1)
    d = eps_at(xh, t_hat[-1], alpha_hat[-1])
    xh = xh + (sig[-1] - sig_hat[-1]) * d
    x = alpha_grid[-1] * xh
    return _finish(x, traj, x0, grid, 2 * n - 1, save_trajectory, (), (x,))


def _approx_time_of_sigma(path: GaussianPath, sigma) -> float | None:
    """Where ``beta/alpha = sigma``, to ~1e-3 (interpolated on a dense grid at trace time): input checks only."""
    if not is_concrete(sigma):
        return None
    with jax.ensure_compile_time_eval():
        t = jnp.linspace(path.schedule.t_min, path.schedule.t_max, 1025, dtype=jnp.float32)
        lam = np.asarray(log_snr(path, t), np.float64)
    lam = np.clip(lam, -1e30, 1e30)
    return float(np.interp(-np.log(max(float(sigma), 1e-30)), lam, np.asarray(t, np.float64)))


def _check_churn(s_churn, s_noise, key) -> bool:
    if is_concrete(s_churn):
        if not np.isfinite(float(s_churn)) or float(s_churn) < 0:
            raise ValueError(f"s_churn must be a finite number >= 0 (0: deterministic Heun), got {s_churn!r}.")
        stochastic = float(s_churn) > 0
    else:
        stochastic = True
    if is_concrete(s_noise) and not float(s_noise) >= 0:
        raise ValueError(f"s_noise must be >= 0, got {s_noise!r}.")
    if stochastic and key is None:
        raise ValueError("edm_sampler with s_churn > 0 adds fresh noise at every step: pass key=jax.random.key(...).")
    return stochastic


def _resolve_sigma_range(path, sigma_min, sigma_max, sig_path_min, sig_path_max):
    """EDM's (0.002, 80) clipped to the path's noise range by default; explicit values must lie inside it."""
    tol = 1e-4
    if sigma_max is None:
        sigma_max = min(80.0, sig_path_max)
    elif is_concrete(sigma_max) and float(sigma_max) > sig_path_max * (1 + tol):
        raise ValueError(f"sigma_max={float(sigma_max):g} exceeds the largest noise level beta/alpha = "
                         f"{sig_path_max:g} of path '{path.name}' (at t_min); pass sigma_max <= {sig_path_max:g}.")
    if sigma_min is None:
        sigma_min = max(0.002, sig_path_min)
    elif is_concrete(sigma_min) and float(sigma_min) < sig_path_min * (1 - tol):
        raise ValueError(f"sigma_min={float(sigma_min):g} is below the smallest noise level beta/alpha = "
                         f"{sig_path_min:g} of path '{path.name}' (at t_max); pass sigma_min >= {sig_path_min:g}.")
    _check_sigma_range(sigma_min, sigma_max)
    return sigma_min, sigma_max
