r"""Transport metrics of a flow's trajectories.

:func:`straightness` is Liu, Gong & Liu (2022)'s measure ``S(Z) = int_0^1 E || (Z_1 - Z_0) - dZ_t/dt ||^2 dt`` of
how far the trajectories of a flow are from straight lines run at constant speed (``S = 0``); reflow
(:mod:`jaxgen.couplings.reflow`, :mod:`jaxgen.losses.rectified`) decreases it.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

Array = jax.Array


def _sq_norm(v: Array) -> Array:
    """``||v||^2`` per sample over all but the leading axis."""
    return jnp.sum(jnp.reshape(v, (v.shape[0], -1)) ** 2, -1)


def straightness(trajectory: Array, ts: Array, field: Callable | None = None, *, cond: dict | None = None,
                 per_sample: bool = False) -> Array:
    r"""Straightness ``S = int_{t_0}^{t_K} E || (x_{t_K} - x_{t_0}) / (t_K - t_0) - dx_t/dt ||^2 dt``.

    Liu et al. 2022's straightness ``S(Z)`` (with ``[t_0, t_K] = [0, 1]`` the average velocity is
    ``x_1 - x_0``). ``S = 0`` exactly when every trajectory is a straight line run at constant speed.

    Args:
      trajectory: states on the time grid, shape ``(K + 1, B, ...)`` (e.g.
        ``sample(..., save_trajectory=True).trajectory``).
      ts: the strictly monotone grid, shape ``(K + 1,)`` (``SampleResult.ts``).
      field: optional velocity ``field(x, t, **cond)``. Without it ``dx/dt`` is the finite difference on
        each interval, ``S = sum_k |dt_k| || vbar - (x_{k+1} - x_k)/dt_k ||^2`` (an exact, non-negative identity
        for the piecewise-linear path through the states). With it ``dx/dt = field(x_k, t_k)`` at the grid
        points and the integral is the trapezoidal rule (``K + 1`` field evaluations).
      cond: conditioning keywords for ``field``.
      per_sample: return ``(B,)`` values instead of their mean.
    """
    traj = jnp.asarray(trajectory)
    ts = jnp.asarray(ts, traj.dtype if jnp.issubdtype(traj.dtype, jnp.floating) else jnp.float32)
    if ts.ndim != 1 or ts.shape[0] < 2:
        raise ValueError(f"ts must be a 1-D grid of at least 2 times, got shape {tuple(ts.shape)}.")
    if traj.ndim < 2 or traj.shape[0] != ts.shape[0]:
        raise ValueError(f"trajectory must have shape (len(ts), B, ...) = ({ts.shape[0]}, B, ...), got "
                         f"{tuple(traj.shape)}; pass SampleResult.trajectory with SampleResult.ts.")
    dt = jnp.diff(ts)
    if not isinstance(dt, jax.core.Tracer):
        if not (bool(jnp.all(dt > 0)) or bool(jnp.all(dt < 0))):
            raise ValueError("ts must be strictly monotone (no repeated times) to define dx/dt.")
    span = ts[-1] - ts[0]
    vbar = (traj[-1] - traj[0]) / span
    if field is None:
        vel = jnp.diff(traj, axis=0) / jnp.reshape(dt, (-1,) + (1,) * (traj.ndim - 1))
        per = jnp.sum(jnp.abs(dt)[:, None] * jax.vmap(lambda v: _sq_norm(vbar - v))(vel), 0)
    else:
        cond = cond or {}
        b = traj.shape[1]
        vel = jax.vmap(lambda x, t: field(x, jnp.full((b,), t, x.dtype), **cond))(traj, ts)
        g = jax.vmap(lambda v: _sq_norm(vbar - v))(vel)  # (K + 1, B)
        per = jnp.sum(0.5 * jnp.abs(dt)[:, None] * (g[1:] + g[:-1]), 0)
    return per if per_sample else jnp.mean(per)


__all__ = ["straightness"]
