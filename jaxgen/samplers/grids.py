r"""Time grids and noise levels of the diffusion samplers: log-SNR and EDM noise levels, their inverses, Karras grids.

On a Gaussian path ``x_t = alpha_t z + beta_t eps`` (t=0 noise, t=1 data) the half log signal-to-noise ratio
``lambda_t = log(alpha_t / beta_t)`` (:func:`jaxgen.paths.log_snr`) increases with ``t``; EDM's noise level is
``sigma_t = beta_t / alpha_t = e^{-lambda_t}``. The diffusion samplers step on a grid uniform in ``t`` or in
``lambda`` (:func:`diffusion_grid`); EDM steps on the Karras grid of noise levels (:func:`karras_sigmas`), mapped
to jaxgen times by :func:`times_from_sigmas`.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import jax
import jax.numpy as jnp

from jaxgen._checks import is_concrete
from jaxgen.paths.gaussian import GaussianPath, log_snr, sigmas_from_times, times_from_lambdas, times_from_sigmas
from jaxgen.samplers.base import Grid, concrete_float, explicit_grid, uniform_grid

Array = jax.Array

SPACINGS = ("time", "logsnr")


def check_sigma_range(sigma_min, sigma_max) -> None:
    if is_concrete(sigma_min) and is_concrete(sigma_max) and not 0 < float(sigma_min) < float(sigma_max) < math.inf:
        raise ValueError(f"need finite noise levels 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min}, "
                         f"sigma_max={sigma_max} (EDM uses 0.002 and 80).")


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
    check_sigma_range(sigma_min, sigma_max)
    if is_concrete(rho) and not float(rho) > 0:
        raise ValueError(f"rho must be positive (EDM uses 7), got {rho}.")
    ramp = jnp.linspace(0.0, 1.0, int(n), dtype=jnp.float32) if n > 1 else jnp.zeros((1,), jnp.float32)
    hi = jnp.asarray(sigma_max, jnp.float32) ** (1.0 / rho)
    lo = jnp.asarray(sigma_min, jnp.float32) ** (1.0 / rho)
    sig = (hi + ramp * (lo - hi)) ** rho
    if append_zero:
        sig = jnp.concatenate([sig, jnp.zeros((1,), jnp.float32)])
    return sig


def log_snr_now(path: GaussianPath, t: float) -> float:
    """``lambda_t`` of a Python float ``t``, evaluated at trace time (also inside ``jit``)."""
    with jax.ensure_compile_time_eval():
        return float(log_snr(path, jnp.float32(t)))


def open_ends(path: GaussianPath, grid: Grid) -> tuple[bool, bool]:
    """``(alpha(t_0) == 0, beta(t_N) == 0)``: whether the log-SNR is infinite at the grid's ends, as known at
    trace time (``False`` for an end traced under jit, which the samplers then check from its value)."""
    start = grid.first is not None and log_snr_now(path, grid.first) == -np.inf
    end = grid.last is not None and log_snr_now(path, grid.last) == np.inf
    return start, end


def diffusion_grid(path: GaussianPath, steps: int, t0, t1, ts, spacing: str = "time") -> Grid:
    """An increasing grid for the diffusion samplers: ``ts``, or ``steps`` steps from ``t0`` to ``t1`` (default the
    path's domain) uniform in ``t`` (``spacing='time'``) or in ``lambda`` (``spacing='logsnr'``, by bisection).

    A grid of concrete arguments (Python ``steps``, ``t0``, ``t1``) is computed once, as one small compiled
    program, and returned as a constant, also inside ``jit`` (evaluated op by op it costs ~1 s per new number of
    steps; :class:`~jaxgen.samplers.UniPC` computes its coefficients from it in float64 at trace time)."""
    if ts is None and is_concrete(t0) and is_concrete(t1) and not isinstance(steps, jax.core.Tracer):
        try:
            return _cached_grid(path, steps, None if t0 is None else float(t0), None if t1 is None else float(t1),
                                spacing)
        except TypeError:  # an unhashable path: build the grid inline
            pass
    return _diffusion_grid(path, steps, t0, t1, ts, spacing)


@functools.lru_cache(maxsize=64)
def _cached_grid(path: GaussianPath, steps, t0, t1, spacing: str) -> Grid:
    ends = {}

    def build():
        g = _diffusion_grid(path, steps, t0, t1, None, spacing)  # raises on bad input
        ends["first"], ends["last"] = g.first, g.last
        return g.times

    with jax.ensure_compile_time_eval():
        times = jax.jit(build)()
    return Grid(times, ends["first"], ends["last"])


def _diffusion_grid(path: GaussianPath, steps: int, t0, t1, ts, spacing: str) -> Grid:
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; use 'time' (uniform in t) or 'logsnr' (uniform in "
                         "lambda = log(alpha/beta), DPM-Solver's recommendation for low-resolution data).")
    if ts is not None:
        return explicit_grid(ts, direction="increasing")
    t0 = path.schedule.t_min if t0 is None else t0
    t1 = path.schedule.t_max if t1 is None else t1
    g = uniform_grid(steps, t0, t1)
    if g.first is not None and g.last is not None and not g.first < g.last:
        raise ValueError(f"need t0 < t1 (samplers run from noise at t0 to data at t1), got t0={t0}, t1={t1}.")
    if spacing == "time":
        return g
    for name, tv in (("t0", g.first), ("t1", g.last)):
        if tv is not None and not np.isfinite(log_snr_now(path, tv)):
            raise ValueError(
                f"spacing='logsnr' needs a finite log-SNR at both ends (alpha > 0 at t0 and beta > 0 at t1), but path "
                f"'{path.name}' has lambda = {log_snr_now(path, tv):g} at {name}={tv:g}; pass e.g. t0=1e-3, "
                "t1=1-1e-3, or use spacing='time'.")
    lam = log_snr(path, jnp.asarray([t0, t1], jnp.float32))
    grid = times_from_lambdas(path, jnp.linspace(lam[0], lam[1], g.steps + 1))
    return Grid(grid.at[0].set(t0).at[-1].set(t1), g.first, g.last)


def approx_time_of_sigma(path: GaussianPath, sigma) -> float | None:
    """Where ``beta/alpha = sigma``, to ~1e-3 (interpolated on a dense grid at trace time): input checks only."""
    if not is_concrete(sigma):
        return None
    with jax.ensure_compile_time_eval():
        t = jnp.linspace(path.schedule.t_min, path.schedule.t_max, 1025, dtype=jnp.float32)
        lam = np.asarray(log_snr(path, t), np.float64)
    lam = np.clip(lam, -1e30, 1e30)
    return float(np.interp(-np.log(max(float(sigma), 1e-30)), lam, np.asarray(t, np.float64)))


__all__ = ["sigmas_from_times", "times_from_lambdas", "times_from_sigmas", "karras_sigmas", "diffusion_grid",
           "open_ends", "SPACINGS", "concrete_float"]
