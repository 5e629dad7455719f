r"""DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) with a field of any parameterisation.

The chain, its coefficients and its Gaussian path are :class:`jaxgen.paths.DDPMSchedule`. For ``n = T, ..., 1``
(``steps`` of a respaced schedule): decode ``x0_hat`` from the field at ``(x_n, t_n)`` (one evaluation; optionally
clipped to ``[-clip_denoised, clip_denoised]``) and draw (eq. 7)

.. math:: x_{n-1} = \tilde\mu_n(x_n, \hat x_0) + \sigma_n z, \qquad z = 0 \text{ at } n = 1.

Without clipping this is Algorithm 2's ``x_{n-1} = (x_n - beta_n / sqrt(1 - abar_n) eps_hat) / sqrt(alpha_n) +
sigma_n z``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar

import numpy as np
import jax
import jax.numpy as jnp

from jaxgen.paths.ddpm import VARIANCES, DDPMSchedule
from jaxgen.samplers.base import Grid, Model, Segment, Solver, register

Array = jax.Array


def step_time_fn(schedule: DDPMSchedule, path_time: Callable | None) -> Callable:
    """``k -> t`` for steps ``k`` of ``schedule``: ``path_time(n_orig)`` or the default ``1 - n_orig / T_orig``."""
    if path_time is None:
        return schedule.time_of_step
    orig = jnp.asarray(schedule.timesteps, jnp.int32)
    return lambda k: jnp.asarray(path_time(orig[k - 1]), jnp.float32)


def predict_x0(model: Model, time_fn: Callable, x: Array, k, clip_denoised: float | None) -> tuple[Array, Array]:
    """``(x0_hat, eps_hat)`` at step ``k`` (scalar or ``(B,)``) from one evaluation, through the field algebra."""
    x0_hat, eps_hat = model.denoise(x, jnp.broadcast_to(time_fn(k), (x.shape[0],)))
    if clip_denoised is not None:
        x0_hat = jnp.clip(x0_hat, -clip_denoised, clip_denoised)
    return x0_hat, eps_hat


def check_schedule(schedule) -> DDPMSchedule:
    if not isinstance(schedule, DDPMSchedule):
        raise ValueError("schedule must be a DDPMSchedule (e.g. DDPMSchedule.linear()), "
                         f"got {type(schedule).__name__}.")
    return schedule


@dataclasses.dataclass(frozen=True)
class DDPMAncestral(Solver):
    r"""Ancestral sampling of a DDPM (module docstring). NFE = the number of steps.

    ``sample``'s ``steps`` respaces the schedule (:meth:`~jaxgen.paths.DDPMSchedule.respace`; default all ``T``
    steps); the grid is the steps' times ``t_n = 1 - n / T`` from ``x_T`` to ``x_0`` (not ``ts``/``t0``/``t1``).
    The field is decoded on the schedule's own path (:meth:`~jaxgen.paths.DDPMSchedule.path`: its ``alpha, beta`` at
    ``t_n`` are ``sqrt(abar_n), sqrt(1 - abar_n)``, as the decoding of a DDPM requires); a field trained on another
    path (``sample(..., path=...)``) is moved onto it (:func:`jaxgen.fields.change_path`), unless ``path_time`` maps
    the steps to the field's own times. Step ``n`` draws from ``fold_in(key, n)``.

    Args:
      schedule: the DDPM (default: Ho et al.'s linear betas, ``T = 1000``).
      variance: ``sigma_n^2 = beta_n`` (``"beta"``) or ``beta_tilde_n`` (``"posterior"``).
      clip_denoised: clip ``x0_hat`` to ``[-c, c]`` (e.g. 1 for images in ``[-1, 1]``).
      path_time: map from an original step ``n`` (int array) to the field's time; default ``1 - n / T``.
    """

    name: ClassVar[str] = "ddpm"
    decodes_data: ClassVar[bool] = False
    schedule: DDPMSchedule | None = None
    variance: str = "beta"
    clip_denoised: float | None = None
    path_time: Callable | None = None

    def __post_init__(self):
        if self.schedule is None:
            object.__setattr__(self, "schedule", DDPMSchedule.linear())
        check_schedule(self.schedule)
        if self.variance not in VARIANCES:
            raise ValueError(f"unknown variance {self.variance!r}; use 'beta' or 'posterior'.")

    def needs_key(self) -> bool:
        return True

    def process_path(self):
        return self.schedule.path() if self.path_time is None else None

    def default_path(self, field):
        return self.schedule.path()

    def _respaced(self, steps) -> DDPMSchedule:
        return self.schedule if steps is None else self.schedule.respace(steps)

    def grid(self, model, steps, t0, t1, ts):
        if ts is not None or t0 is not None or t1 is not None:
            raise ValueError("DDPM ancestral sampling runs on the schedule's own steps: pass steps (to respace it), "
                             "not ts, t0 or t1.")
        sched = self._respaced(steps)
        times = sched.time_of_step(jnp.arange(sched.T, -1, -1))
        return Grid(times, 1.0 - float(sched.timesteps[-1]) / sched.num_original_steps, 1.0)

    def segments(self, model, grid):
        sched = self._respaced(grid.steps)
        time_fn = step_time_fn(sched, self.path_time)
        c1, c2 = sched.posterior_mean_coef1, sched.posterior_mean_coef2  # float64 NumPy, cast to x's dtype
        sig = np.sqrt(sched.model_variance(self.variance))

        def step(model, x, k, key):
            x0_hat, _ = predict_x0(model, time_fn, x, k, self.clip_denoised)
            table = lambda v: jnp.asarray(v, x.dtype)[k - 1]
            mean = table(c1) * x0_hat + table(c2) * x
            z = jax.random.normal(jax.random.fold_in(key, k), x.shape, x.dtype)
            x_prev = mean + jnp.where(k > 1, table(sig), 0.0) * z
            return x_prev, x_prev

        return [Segment(step, jnp.arange(sched.T, 0, -1))]


register(DDPMAncestral.name, DDPMAncestral)

__all__ = ["DDPMAncestral", "predict_x0", "step_time_fn", "check_schedule"]
