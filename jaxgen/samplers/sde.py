r"""SDE samplers and Langevin dynamics (notes sections 2.2, 3.3.2 and 3.3.4).

* :func:`euler_maruyama` integrates ``dX_t = f_t(X_t) dt + sigma_t dW_t`` with
  ``X_{t+h} = X_t + h f_t(X_t) + sigma_t sqrt(h) xi`` (notes eq. 2.2.4).
* :func:`sample_sde` samples a trained model with any noise level ``sigma_t`` through the SDE
  extension trick (notes eq. 3.3.2): drift ``u_t + sigma_t^2 / 2 * score_t``, both decoded from one
  network evaluation by the field algebra. ``sigma = 0`` is the probability-flow ODE.
* :func:`langevin` runs unadjusted Langevin dynamics ``dX = sigma^2/2 grad log p(X) dt + sigma dW``
  (notes eq. 3.3.4) at a fixed time; :func:`annealed_langevin` sweeps it over the path's times.

Noise is drawn inside the loop with ``jax.random.fold_in(key, step)``: nothing of size
``steps x batch`` is allocated, and results are a pure function of ``key``.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxgen._checks import check_time, expand_like, is_concrete
from jaxgen.fields import canonical_prediction, sde_drift_field
from jaxgen.paths.gaussian import GaussianPath, as_path
from jaxgen.samplers.ode import SampleResult, _bind, _resolve_grid

Array = jax.Array


def _sigma_at(sigma, t: Array, x: Array) -> Array:
    s = sigma(jnp.broadcast_to(t, (x.shape[0],))) if callable(sigma) else sigma
    s = jnp.broadcast_to(jnp.asarray(s, x.dtype), (x.shape[0],))
    return expand_like(s, x)


def euler_maruyama(
    drift: Callable,
    diffusion: Callable | float,
    x0: Array,
    key: Array,
    *,
    steps: int = 100,
    t0: float = 0.0,
    t1: float = 1.0,
    ts: Array | None = None,
    cond: dict | None = None,
    save_trajectory: bool = False,
) -> SampleResult:
    r"""Euler-Maruyama for ``dX = drift(X, t) dt + diffusion(t) dW`` on a forward grid (notes eq. 2.2.4).

    ``diffusion`` is a constant or a function of ``t`` (shape ``(B,)``) returning ``sigma_t``. The
    drift is evaluated at the left end of each step, never at ``t1``: NFE = ``steps``.
    """
    grid = _resolve_grid(steps, t0, t1, ts)
    if is_concrete(grid) and not bool(jnp.all(jnp.diff(grid) > 0)):
        raise ValueError("Euler-Maruyama runs forward in time (noise -> data): the time grid must be strictly "
                         f"increasing, got t0={float(grid[0])}, t1={float(grid[-1])}.")
    f = _bind(drift, cond)
    n_steps = grid.shape[0] - 1

    def body(x, inp):
        i, t, t_next = inp
        h = (t_next - t).astype(x.dtype)
        xi = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
        x_next = x + h * f(x, t) + _sigma_at(diffusion, t, x) * jnp.sqrt(h) * xi
        return x_next, (x_next if save_trajectory else None)

    x, traj = jax.lax.scan(body, x0, (jnp.arange(n_steps), grid[:-1], grid[1:]))
    if save_trajectory:
        traj = jnp.concatenate([x0[None], traj], axis=0)
    return SampleResult(x, n_steps, grid, traj)


def sample_sde(
    field: Callable,
    x0: Array,
    key: Array,
    *,
    path: GaussianPath,
    sigma: Callable | float,
    prediction: str = "velocity",
    steps: int = 100,
    t0: float = 0.0,
    t1: float = 1.0,
    ts: Array | None = None,
    cond: dict | None = None,
    save_trajectory: bool = False,
) -> SampleResult:
    r"""Sample ``dX = [u_t + sigma_t^2/2 grad log p_t] dt + sigma_t dW`` from any field (notes eq. 3.3.2).

    ``field`` predicts ``prediction`` (velocity, score, eps, data or v) on ``path``; velocity and score
    are decoded from the same output, so NFE = ``steps``. For schedules whose score diverges at t=1
    (``beta_1 = 0``) keep ``sigma_t`` bounded: the drift is only evaluated at ``t < t1``.
    """
    path = as_path(path)
    prediction = canonical_prediction(prediction)
    start = float(ts[0]) if ts is not None and is_concrete(ts) else t0
    if prediction in ("eps", "score") and is_concrete(jnp.asarray(start)):
        alpha0 = float(path.coefficients(jnp.asarray(start, jnp.float32)).alpha)
        if alpha0 < 1e-3:
            raise ValueError(
                f"a {prediction} prediction carries no information about the data where alpha_t = 0, and the drift "
                f"needs it (alpha at t0={start:g} is {alpha0:.3g}): start the SDE at t0 > 0, e.g. t0=1e-3, or use a "
                "velocity, data or v parameterisation.")
    drift = sde_drift_field(path, field, sigma, prediction=prediction)
    return euler_maruyama(drift, sigma, x0, key, steps=steps, t0=t0, t1=t1, ts=ts, cond=cond,
                          save_trajectory=save_trajectory)


def langevin(
    score: Callable,
    x0: Array,
    key: Array,
    *,
    step_size: float,
    steps: int,
    t: float = 1.0,
    cond: dict | None = None,
    save_trajectory: bool = False,
) -> SampleResult:
    r"""Unadjusted Langevin dynamics at fixed time ``t`` (notes eq. 3.3.4):

    .. math:: x_{k+1} = x_k + \eta \nabla \log p_t(x_k) + \sqrt{2 \eta}\, \xi_k ,

    the Euler-Maruyama discretisation of ``dX = sigma^2/2 grad log p dt + sigma dW`` with
    ``eta = h sigma^2 / 2``. Its stationary law approaches ``p_t`` as ``eta -> 0`` (for a Gaussian
    ``N(m, s^2)`` it is exactly ``N(m, s^2 / (1 - eta / (2 s^2)))``). NFE = ``steps``.
    """
    if is_concrete(step_size) and not float(step_size) > 0:
        raise ValueError(f"step_size must be positive, got {step_size}.")
    check_time(jnp.asarray(t))
    f = _bind(score, cond)
    eta = jnp.asarray(step_size, x0.dtype)

    def body(x, i):
        xi = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
        x_next = x + eta * f(x, t) + jnp.sqrt(2 * eta) * xi
        return x_next, (x_next if save_trajectory else None)

    x, traj = jax.lax.scan(body, x0, jnp.arange(int(steps)))
    if save_trajectory:
        traj = jnp.concatenate([x0[None], traj], axis=0)
    return SampleResult(x, int(steps), jnp.full((int(steps) + 1,), t, jnp.float32), traj)


def annealed_langevin(
    score: Callable,
    x0: Array,
    key: Array,
    *,
    ts: Array,
    steps_per_level: int = 10,
    snr: float = 0.16,
    cond: dict | None = None,
) -> SampleResult:
    r"""Annealed Langevin dynamics over the path's times ``ts`` (Song & Ermon 2019, Alg. 1).

    At each level ``t_i`` (increasing from noise to data) run ``steps_per_level`` Langevin steps on
    ``p_{t_i}``. The step size follows score_sde's Langevin corrector (Song et al. 2021, Alg. 4):
    ``eta = 2 (snr * mean ||xi|| / mean ||score||)^2`` (norms averaged over the batch), so it adapts to
    the scale of each level.
    NFE = ``len(ts) * steps_per_level``.
    """
    ts = jnp.asarray(ts, jnp.float32)
    if ts.ndim != 1:
        raise ValueError(f"ts must be a 1-D array of levels, got shape {tuple(ts.shape)}.")
    check_time(ts, name="ts")
    f = _bind(score, cond)
    n_levels, k = ts.shape[0], int(steps_per_level)
    flat = lambda a: jnp.sqrt(jnp.sum(jnp.reshape(a, (a.shape[0], -1)) ** 2, -1))

    def inner(x, inp):
        idx, t = inp
        s = f(x, t)
        xi = jax.random.normal(jax.random.fold_in(key, idx), x.shape, x.dtype)
        # Batch-averaged norms, as score_sde: per-sample norms are too noisy in low dimension (a sample
        # sitting on a mode has score ~ 0 and would take a huge step).
        eta = 2.0 * (snr * jnp.mean(flat(xi)) / jnp.maximum(jnp.mean(flat(s)), 1e-12)) ** 2
        return x + eta * s + jnp.sqrt(2.0 * eta) * xi, None

    idx = jnp.arange(n_levels * k)
    level_t = jnp.repeat(ts, k)
    x, _ = jax.lax.scan(inner, x0, (idx, level_t))
    return SampleResult(x, n_levels * k, ts, None)
