r"""DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) with a field of any parameterisation.

The chain, its coefficients and its Gaussian path are in :mod:`jaxgen.paths.ddpm`.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import jax
import jax.numpy as jnp

from jaxgen.fields import canonical_prediction, to_data_and_noise
from jaxgen.paths.ddpm import VARIANCES, DDPMSchedule
from jaxgen.paths.gaussian import GaussianPath
from jaxgen.samplers.ode import SampleResult, _bind

Array = jax.Array


# ---------------------------------------------------------------------------------------------
# model predictions
# ---------------------------------------------------------------------------------------------

def _as_time_fn(schedule: DDPMSchedule, path_time: Callable | None) -> Callable:
    """``k -> t`` for steps ``k`` of ``schedule``: ``path_time(n_orig)`` or the default ``1 - n_orig / T_orig``."""
    if path_time is None:
        return schedule.time_of_step
    orig = jnp.asarray(schedule.timesteps, jnp.int32)
    return lambda k: jnp.asarray(path_time(orig[k - 1]), jnp.float32)


def _predict_x0(field, schedule, path, prediction, time_fn, x, k, clip_denoised):
    """``(x0_hat, eps_hat)`` at step ``k`` (B,) from one field evaluation, through the field algebra."""
    t = jnp.broadcast_to(time_fn(k), (x.shape[0],))
    out = field(x, t)
    x0_hat, eps_hat = to_data_and_noise(path, out, x, t, prediction)
    if clip_denoised is not None:
        x0_hat = jnp.clip(x0_hat, -clip_denoised, clip_denoised)
    return x0_hat, eps_hat


def _setup(schedule, steps, path, path_time, prediction, field, cond):
    if not isinstance(schedule, DDPMSchedule):
        raise ValueError("schedule must be a DDPMSchedule (e.g. DDPMSchedule.linear()), "
                         f"got {type(schedule).__name__}.")
    sched = schedule if steps is None else schedule.respace(steps)
    path = schedule.path() if path is None else path
    return sched, path, canonical_prediction(prediction), _as_time_fn(sched, path_time), _bind(field, cond)


def ddpm_ancestral_sample(
    field: Callable,
    x_T: Array,
    key: Array,
    *,
    schedule: DDPMSchedule,
    prediction: str = "eps",
    variance: str = "beta",
    steps: int | None = None,
    path: GaussianPath | None = None,
    path_time: Callable | None = None,
    clip_denoised: float | None = None,
    cond: dict | None = None,
    save_trajectory: bool = False,
) -> SampleResult:
    r"""Ancestral sampling (Ho et al. 2020, Algorithm 2) with a field of any parameterisation.

    For ``n = T, ..., 1``: decode ``x0_hat`` from ``field(x_n, t_n)`` (one evaluation; optionally clipped to
    ``[-clip_denoised, clip_denoised]``) and draw ``x_{n-1} = mu_tilde_n(x_n, x0_hat) + sigma_n z`` (eq. 7), with
    ``z = 0`` at ``n = 1``. Without clipping this is Algorithm 2's
    ``x_{n-1} = (x_n - beta_n / sqrt(1 - abar_n) eps_hat) / sqrt(alpha_n) + sigma_n z``.

    Args:
      field: ``field(x, t, **cond)`` predicting ``prediction`` (eps, data, score, v or velocity) on ``path``.
      x_T: start, shape ``(B, ...)``, e.g. ``jax.random.normal(key, shape)``.
      schedule: the DDPM.
      variance: ``sigma_n^2 = beta_n`` (``"beta"``) or ``beta_tilde_n`` (``"posterior"``).
      steps: sample with ``steps < T`` steps of the respaced schedule (:meth:`DDPMSchedule.respace`).
      path: the path the field was trained on; default ``schedule.path()`` (its ``alpha, beta`` at ``t_n`` must be
        ``sqrt(abar_n), sqrt(1 - abar_n)`` for the decoding to be the DDPM's).
      path_time: map from an original step ``n`` (int array) to the field's time; default ``1 - n / T``.

    Returns:
      ``SampleResult`` with ``nfe`` = the number of steps, ``ts`` the jaxgen times of ``x_T, ..., x_0`` and,
      with ``save_trajectory``, those states.
    """
    sched, path, prediction, time_fn, f = _setup(schedule, steps, path, path_time, prediction, field, cond)
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; use 'beta' or 'posterior'.")
    K = sched.T
    c1 = jnp.asarray(sched.posterior_mean_coef1, x_T.dtype)
    c2 = jnp.asarray(sched.posterior_mean_coef2, x_T.dtype)
    sig = jnp.asarray(np.sqrt(sched.model_variance(variance)), x_T.dtype)

    def body(x, k):
        x0_hat, _ = _predict_x0(f, sched, path, prediction, time_fn, x, k, clip_denoised)
        mean = c1[k - 1] * x0_hat + c2[k - 1] * x
        z = jax.random.normal(jax.random.fold_in(key, k), x.shape, x.dtype)
        x_prev = mean + jnp.where(k > 1, sig[k - 1], 0.0) * z
        return x_prev, (x_prev if save_trajectory else None)

    ks = jnp.arange(K, 0, -1)
    x, traj = jax.lax.scan(body, x_T, ks)
    if save_trajectory:
        traj = jnp.concatenate([x_T[None], traj], axis=0)
    ts = sched.time_of_step(jnp.arange(K, -1, -1))
    return SampleResult(x, K, ts, traj)


