r"""EDM's Heun sampler with optional stochastic churn (Karras et al. 2022, Algorithms 1 and 2), on any Gaussian path.

The probability-flow ODE of any Gaussian path, written for the scaled state ``x_hat = x / alpha_t`` and the noise
level ``sigma_t = beta_t / alpha_t`` (so ``x_hat = z + sigma eps``), is (EDM eq. 4 with ``s = 1`` after scaling)

.. math:: \frac{d\hat x}{d\sigma} = \frac{\hat x - D(\hat x; \sigma)}{\sigma} = \hat\epsilon(\hat x; \sigma),

with ``D = z_hat`` decoded from the field at ``x = alpha_t x_hat``, ``t = t(sigma)``. On the Karras grid
``sigma_0 > ... > sigma_{N-1}`` (:func:`~jaxgen.samplers.grids.karras_sigmas`), ``sigma_N = 0``, each step ``i``:

1. churn (Algorithm 2): ``gamma_i = min(s_churn / N, sqrt(2) - 1)`` if ``s_tmin <= sigma_i <= s_tmax`` else 0;
   ``sigma_hat = sigma_i (1 + gamma_i)`` (capped at the path's largest level ``sigma(t_min)``);
   ``x_hat <- x_hat + sqrt(sigma_hat^2 - sigma_i^2) s_noise xi``;
2. Euler: ``x' = x_hat + (sigma_{i+1} - sigma_hat) d``, ``d = eps_hat(x_hat; sigma_hat)``;
3. Heun correction unless ``sigma_{i+1} = 0``: ``x' = x_hat + (sigma_{i+1} - sigma_hat)(d + d')/2``
   (:func:`jaxgen.samplers.ode.heun_step` in ``sigma``).

The final step is Euler to ``sigma = 0``: it returns the denoised ``D(x; sigma_{N-1})``, reported at the path's data
end ``t_max`` as ``alpha(t_max) x_hat`` (on VE/EDM paths, whose ``t_max`` has ``sigma > 0``,
``sigma_{N-1} = sigma(t_max)`` and the last two reported times coincide). NFE = ``2 N - 1`` with or without churn.
Noise levels are mapped to jaxgen times with :func:`~jaxgen.samplers.grids.times_from_sigmas` (bisection), and the
solver uses ``sigma(t)`` recomputed from those times so it integrates exactly the path's ODE.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import numpy as np
import jax
import jax.numpy as jnp

from jaxgen._checks import is_concrete
from jaxgen.samplers.base import Grid, Segment, Solver, check_steps, explicit_grid, register
from jaxgen.samplers.grids import (approx_time_of_sigma, check_sigma_range, karras_sigmas, open_ends,
                                   sigmas_from_times, times_from_sigmas)
from jaxgen.samplers.ode import euler_step, heun_step

Array = jax.Array


def _check_churn(s_churn, s_noise) -> bool:
    """Validate the churn parameters; return whether the sampler is stochastic."""
    if is_concrete(s_churn):
        if not np.isfinite(float(s_churn)) or float(s_churn) < 0:
            raise ValueError(f"s_churn must be a finite number >= 0 (0: deterministic Heun), got {s_churn!r}.")
        stochastic = float(s_churn) > 0
    else:
        stochastic = True
    if is_concrete(s_noise) and not float(s_noise) >= 0:
        raise ValueError(f"s_noise must be >= 0, got {s_noise!r}.")
    return stochastic


class KarrasGrid(Grid):
    """The times of a Karras grid of noise levels, whose last level is ``sigma = 0`` (EDM's Algorithm 1)."""


@dataclasses.dataclass(frozen=True)
class EDM(Solver):
    r"""EDM's Heun sampler with stochastic churn (module docstring). NFE = ``2 N - 1``.

    ``x0`` holds samples of the path at the first time ``t(sigma_max)`` in path coordinates, e.g.
    ``alpha * sigma_max * N(0, I)`` (for VE/EDM paths ``alpha = 1``; for VP ``~ N(0, I)``). ``steps`` is ``N``, the
    number of noise levels; ``ts`` an explicit increasing time grid instead of the Karras grid (the last step goes
    to ``ts[-1]`` with Euler, ``sigma_N = sigma(ts[-1])``; ``ts[0]`` needs ``alpha > 0``). Step ``i`` churns with
    ``fold_in(key, i)``.

    Args:
      rho, sigma_min, sigma_max: the Karras grid. By default EDM's 0.002 and 80, clipped to the path's range
        ``[sigma(t_max), sigma(t_min)]`` (e.g. VE's ``sigma_max = 50``); explicit values outside it raise.
      s_churn, s_tmin, s_tmax, s_noise: EDM's stochasticity parameters (``s_churn = 0``: deterministic).

    Few steps: a Heun step from ``sigma_i >> sigma_data`` to ``sigma_{i+1} << sigma_data`` averages ``eps_hat ~ eps``
    at its start with ``eps_hat ~ 0`` at its end, so it moves only about halfway, even with the exact field; with
    EDM's (0.002, 80) grid, ``steps = 2`` returns about ``x_hat_0 / 2``, noise of std ~40 (Gaussian data of std 0.5:
    sample std 41, 2.1, 2.2, 0.9, 0.7 for N = 2, 3, 4, 6, 8). Use ``N >= 8`` (EDM uses 18), or DDIM / DPM-Solver++
    for fewer than ~15 NFE.
    """

    name: ClassVar[str] = "edm"
    default_steps: ClassVar[int] = 18
    rho: float = 7.0
    sigma_min: float | None = None
    sigma_max: float | None = None
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = float("inf")
    s_noise: float = 1.0

    def __post_init__(self):
        _check_churn(self.s_churn, self.s_noise)

    def needs_key(self) -> bool:
        return _check_churn(self.s_churn, self.s_noise)

    def _path_range(self, path) -> tuple[float, float]:
        with jax.ensure_compile_time_eval():
            hi = float(sigmas_from_times(path, jnp.float32(path.schedule.t_min)))
            lo = float(sigmas_from_times(path, jnp.float32(path.schedule.t_max)))
        return lo, hi

    def _sigma_range(self, path) -> tuple[float, float]:
        """EDM's (0.002, 80) clipped to the path's noise range by default; explicit values must lie inside it."""
        sig_lo, sig_hi = self._path_range(path)
        tol = 1e-4
        sigma_min, sigma_max = self.sigma_min, self.sigma_max
        if sigma_max is None:
            sigma_max = min(80.0, sig_hi)
        elif is_concrete(sigma_max) and float(sigma_max) > sig_hi * (1 + tol):
            raise ValueError(f"sigma_max={float(sigma_max):g} exceeds the largest noise level beta/alpha = "
                             f"{sig_hi:g} of path '{path.name}' (at t_min); pass sigma_max <= {sig_hi:g}.")
        if sigma_min is None:
            sigma_min = max(0.002, sig_lo)
        elif is_concrete(sigma_min) and float(sigma_min) < sig_lo * (1 - tol):
            raise ValueError(f"sigma_min={float(sigma_min):g} is below the smallest noise level beta/alpha = "
                             f"{sig_lo:g} of path '{path.name}' (at t_max); pass sigma_min >= {sig_lo:g}.")
        check_sigma_range(sigma_min, sigma_max)
        return sigma_min, sigma_max

    def grid(self, model, steps, t0, t1, ts):
        path = model.path
        if path is None:
            raise ValueError("the edm sampler works on a Gaussian path: pass sample(..., path=...).")
        if t0 is not None or t1 is not None:
            raise ValueError("the edm sampler runs on the Karras grid of noise levels: pass steps (and sigma_min, "
                             "sigma_max, rho), or an explicit grid ts, not t0/t1.")
        if ts is None:
            n = check_steps(self.default_steps if steps is None else steps)
            sigma_min, sigma_max = self._sigma_range(path)
            levels = karras_sigmas(n, sigma_min, sigma_max, self.rho, append_zero=True)
            times = times_from_sigmas(path, levels).at[-1].set(path.schedule.t_max)
            first = approx_time_of_sigma(path, sigma_max) if model.prediction in ("eps", "score") else None
            return KarrasGrid(times, first, float(path.schedule.t_max))
        g = explicit_grid(ts, direction="increasing")
        if open_ends(path, g)[0]:
            raise ValueError(
                f"the edm sampler integrates x / alpha_t in sigma_t = beta_t / alpha_t, both infinite at ts[0]={g.first:g} "
                f"(alpha = 0 on path '{path.name}'): start ts at a finite noise level, e.g. ts[0]="
                f"{approx_time_of_sigma(path, 80.0):.4g} (sigma = 80), or leave ts=None for EDM's Karras grid.")
        return Grid(g.times, g.first, g.last)

    def init(self, model, x0, grid):
        return x0 / model.path.schedule.values(grid.times[0])[0].astype(x0.dtype)

    def segments(self, model, grid):
        path = model.path
        times = grid.times
        n = grid.steps
        stochastic = self.needs_key()
        _, sig_path_max = self._path_range(path)
        alpha = path.schedule.values(times)[0]
        sig = sigmas_from_times(path, times)
        if isinstance(grid, KarrasGrid):
            sig = sig.at[-1].set(0.0)  # EDM: the last Euler step goes to sigma = 0
        sig_i = sig[:-1]
        if stochastic:
            in_range = (sig_i >= self.s_tmin) & (sig_i <= self.s_tmax)
            gamma = jnp.where(in_range, jnp.minimum(jnp.asarray(self.s_churn, jnp.float32) / n, math.sqrt(2.0) - 1.0),
                              0.0)
            sig_hat_target = jnp.minimum(sig_i * (1.0 + gamma), sig_path_max)
            t_hat = jnp.where(gamma > 0, times_from_sigmas(path, sig_hat_target), times[:-1])
            sig_hat = jnp.where(gamma > 0, sigmas_from_times(path, t_hat), sig_i)
            alpha_hat = path.schedule.values(t_hat)[0]
        else:
            t_hat, sig_hat, alpha_hat = times[:-1], sig_i, alpha[:-1]
        churn_std = jnp.sqrt(jnp.maximum(sig_hat**2 - sig_i**2, 0.0)) * self.s_noise

        def eps_at(model, xh, t_a):
            t, a = t_a
            return model.denoise(a * xh, t)[1]

        def churn(xh, c, key):
            if not stochastic:
                return xh
            xi = jax.random.normal(jax.random.fold_in(key, c["i"]), xh.shape, xh.dtype)
            return xh + c["churn_std"] * xi

        def cast(c, dt):
            return {k: v if k in ("i", "t_hat", "t_next") else v.astype(dt) for k, v in c.items()}

        def heun(model, xh, c, key):
            c = cast(c, xh.dtype)
            xh = churn(xh, c, key)
            f = lambda y, t_a: eps_at(model, y, t_a)
            xh_next = heun_step(f, xh, (c["t_hat"], c["alpha_hat"]), (c["t_next"], c["alpha_next"]),
                                h=c["sig_next"] - c["sig_hat"])
            return xh_next, c["alpha_next"] * xh_next

        def final(model, xh, c, key):  # Euler (to sigma = 0 on the Karras grid: x_hat = D(x_hat; sigma_hat))
            c = cast(c, xh.dtype)
            xh = churn(xh, c, key)
            xh = euler_step(lambda y, t_a: eps_at(model, y, t_a), xh, (c["t_hat"], c["alpha_hat"]), None,
                            h=c["sig_next"] - c["sig_hat"])
            x = c["alpha_next"] * xh
            return x, x

        inp = {"i": jnp.arange(n), "t_hat": t_hat, "sig_hat": sig_hat, "alpha_hat": alpha_hat, "t_next": times[1:],
               "sig_next": sig[1:], "alpha_next": alpha[1:], "churn_std": churn_std}
        head = jax.tree.map(lambda a: a[:-1], inp)
        tail = jax.tree.map(lambda a: a[-1:], inp)
        return [Segment(heun, head), Segment(final, tail)]


register(EDM.name, EDM)

__all__ = ["EDM"]
