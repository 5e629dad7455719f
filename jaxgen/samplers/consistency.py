r"""Consistency-model sampling (Song et al. 2023, Algorithm 1), in jaxgen time."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxgen.fields.preconditioning import _end_time
from jaxgen.paths.gaussian import GaussianPath, as_path
from jaxgen.samplers.ode import SampleResult

Array = jax.Array


# ---------------------------------------------------------------------------------------------
# Sampling.
# ---------------------------------------------------------------------------------------------


def consistency_sample(
    f: Callable,
    x_noise: Array,
    *,
    path: GaussianPath | str | None = None,
    ts: Any = None,
    key: Array | None = None,
    cond: dict | None = None,
    t_end: float | None = None,
    save_trajectory: bool = False,
) -> SampleResult:
    r"""One-step or multistep consistency sampling (Song et al. 2023, Algorithm 1), in jaxgen time.

    ``x = f(x_noise, ts[0])``; then for each later time ``s`` of ``ts`` re-noise the estimate of
    ``x_{t_end} = alpha_e z + beta_e eps`` to time ``s`` and denoise again:

    .. math:: \hat x_s = \frac{\alpha_s}{\alpha_e} x + \sqrt{\beta_s^2 - (\alpha_s \beta_e / \alpha_e)^2}\ \xi,
       \quad \xi \sim \mathcal N(0, I), \qquad x \leftarrow f(\hat x_s, s)

    (the paper's ``x + sqrt(tau^2 - eps^2) z`` for ``alpha = 1``; ``hat x_s = alpha_s x + beta_s xi`` on the
    linear path).

    Args:
      f: a consistency function ``f(x, t, **cond)`` (e.g. a trained :class:`ConsistencyFunction`).
      x_noise: samples of the path at ``ts[0]`` (``path.sample_prior(key, shape)`` for ``ts[0] = 0``).
      path: the Gaussian path; default ``f.path``.
      ts: increasing times in ``[t_min, t_end)``, one per network call; default ``(t_min,)`` (one step).
        E.g. ``(0.0, 0.5)`` for two steps on the linear path.
      key: PRNG key for the re-noising (needed when ``len(ts) > 1``).
      cond: conditioning keywords passed to ``f``.
      t_end: the data end; default ``f.t_end`` or the schedule's ``t_max``.
      save_trajectory: also return the output of every step, shape ``(len(ts),) + x_noise.shape``.

    Returns:
      :class:`~jaxgen.samplers.SampleResult` with ``nfe = len(ts)``.
    """
    if path is None:
        path = getattr(f, "path", None)
        if path is None:
            raise ValueError("consistency_sample needs the path for re-noising: pass path=... "
                             "(or a ConsistencyFunction, which carries it).")
    path = as_path(path)
    if t_end is None:
        t_end = getattr(f, "t_end", None)
    t_end = _end_time(path, t_end)
    if ts is None:
        ts = (getattr(f, "t_min", path.schedule.t_min),)
    ts_list = [float(s) for s in (ts.tolist() if hasattr(ts, "tolist") else ts)]
    if not ts_list:
        raise ValueError("ts must hold at least one time (ts[0] is the time of x_noise).")
    if any(not (path.schedule.t_min <= s < t_end) for s in ts_list):
        raise ValueError(f"every time in ts must lie in [t_min, t_end) = [{path.schedule.t_min:g}, {t_end:g}) "
                         f"(f at t_end is the identity); got {ts_list}.")
    if any(b <= a for a, b in zip(ts_list, ts_list[1:])):
        raise ValueError(f"ts must be strictly increasing (noise -> data, jaxgen time), got {ts_list}.")
    if len(ts_list) > 1 and key is None:
        raise ValueError("multistep sampling re-noises between steps: pass key=jax.random.key(...).")
    cond = cond or {}
    end = path.coefficients(jnp.asarray(t_end, jnp.float32))
    x = f(x_noise, jnp.full((x_noise.shape[0],), ts_list[0], x_noise.dtype), **cond)
    outs = [x]
    for i, s in enumerate(ts_list[1:]):
        c = path.coefficients(jnp.asarray(s, jnp.float32))
        scale = c.alpha / end.alpha
        std = jnp.sqrt(jnp.maximum(c.beta**2 - (scale * end.beta) ** 2, 0.0))
        xi = jax.random.normal(jax.random.fold_in(key, i), x.shape, x.dtype)
        x_s = scale.astype(x.dtype) * x + std.astype(x.dtype) * xi
        x = f(x_s, jnp.full((x.shape[0],), s, x.dtype), **cond)
        outs.append(x)
    traj = jnp.stack(outs) if save_trajectory else None
    return SampleResult(x, len(ts_list), jnp.asarray(ts_list, jnp.float32), traj)


__all__ = ["consistency_sample"]
