r"""Rectified flow (Liu, Gong & Liu 2022, "Flow Straight and Fast", ICLR 2023).

Given a flow ``dx/dt = v(x, t)`` from a source ``x_0`` (t = 0, noise) to data (t = 1), *reflow*
re-trains a flow on the flow's own couplings ``(x_0, x_1 = ODE(x_0))`` with the straight interpolant
``x_t = t x_1 + (1 - t) x_0`` (the linear path):

.. math:: \min_\theta \int_0^1 \mathbb E \big\| (x_1 - x_0) - v_\theta(t x_1 + (1 - t) x_0, t) \big\|^2 dt
   \qquad (\text{Liu et al. eq. 1 on the coupling } (x_0, x_1) = (Z_0, Z_1^k)).

The rectified flow keeps the marginals and does not increase convex transport costs, and repeated reflow
makes the paths straighter (Liu et al. sec. 3: ``min_{k <= K} S(Z^k) <= E||X_1 - X_0||^2 / K``), so a few
Euler steps (even one) integrate it well. This module gives

* :func:`straightness`: ``S(Z) = int_0^1 E || (Z_1 - Z_0) - dZ_t/dt ||^2 dt`` (Liu et al.'s straightness measure);
* :func:`reflow_couplings` (the pairs), :func:`reflow_loss` (train on fixed pairs, batch
  ``{"x0": ..., "x1": ...}``), :func:`pair_sampler` (draw minibatches of pairs inside a compiled
  :class:`jaxgen.train.Trainer` step) and :func:`reflow_coupling` (a ``coupling`` hook for
  :func:`jaxgen.losses.regression_loss` that solves the ODE on the fly instead);
* :func:`distillation_loss`: one-step distillation ``x_1 ~ x_0 + v_theta(x_0, 0)`` (Liu et al.'s
  distillation of the k-rectified flow's coupling into a one-step map).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxgen._checks import check_same_shape
from jaxgen.losses import regression_loss
from jaxgen.paths.gaussian import GaussianPath, as_path
from jaxgen.samplers.ode import sample_ode

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
        ``sample_ode(..., save_trajectory=True).trajectory``).
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


# ---------------------------------------------------------------------------------------------
# Reflow.
# ---------------------------------------------------------------------------------------------


def reflow_couplings(
    field: Callable,
    key: Array | None,
    n: int | None,
    source: Callable[[Array, int], Array] | Array,
    *,
    method: str = "heun",
    steps: int = 100,
    cond: dict | None = None,
    t0: float = 0.0,
    t1: float = 1.0,
) -> dict[str, Array]:
    r"""Couplings ``(x_0, x_1 = ODE_{t0 -> t1}(x_0))`` of a trained flow (Liu et al. Algorithm 1, "reflow").

    Args:
      field: the flow's velocity ``field(x, t, **cond)`` (the k-rectified flow; for k = 1 any trained
        flow-matching model, or the oracle's exact ``gm.velocity_field(path)``).
      key: PRNG key for ``source`` (unused when ``source`` is an array).
      n: number of pairs (``None`` when ``source`` is an array).
      source: a sampler ``source(key, n)`` of ``x_0`` (e.g. ``lambda k, n: jax.random.normal(k, (n, 2))``) or
        the array ``x_0`` itself.
      method, steps: the ODE solver of :func:`jaxgen.samplers.sample_ode` (e.g. ``"heun"``/``"tsit5"``).
      cond: conditioning keywords, e.g. ``{"y": labels}`` (one per source point); returned with the pairs.

    Returns:
      ``{"x0": x_0, "x1": x_1, **cond}``, the batch format of :func:`reflow_loss` and :func:`distillation_loss`
      (the conditioning is kept with its pairs).
    """
    if callable(source):
        if key is None or n is None:
            raise ValueError("a sampler source needs key and n: reflow_couplings(field, key, n, source).")
        x0 = source(key, int(n))
    else:
        x0 = jnp.asarray(source)
        if n is not None and int(n) != x0.shape[0]:
            raise ValueError(f"n={n} does not match the {x0.shape[0]} given source points; pass n=None.")
    x1 = sample_ode(field, x0, method=method, steps=steps, t0=t0, t1=t1, cond=cond).x
    return {"x0": x0, "x1": jax.lax.stop_gradient(x1), **(cond or {})}


def reflow_coupling(field: Callable, *, method: str = "heun", steps: int = 20
                    ) -> Callable[[Array, Array, Array], tuple[Array, Array]]:
    r"""A ``coupling`` hook for :func:`jaxgen.losses.regression_loss`: pair each drawn ``x_0`` with ``ODE(x_0)``.

    ``coupling(key, x0, z) -> (x0, ODE_{0 -> 1}(x0))`` ignores the data minibatch ``z``: the loss then
    trains on the flow's own coupling, drawn afresh each step (online reflow; costs one ODE solve of
    ``steps`` steps per training step). For a fixed set of pairs use :func:`reflow_loss`.

    The hook receives no conditioning (``regression_loss`` calls it as ``coupling(key, x_source, z)``), so
    ``field`` is integrated unconditionally: for a class-conditional flow use :func:`reflow_couplings` with ``cond=``.
    """

    def coupling(key, x0, z):
        del key, z
        return x0, jax.lax.stop_gradient(sample_ode(field, x0, method=method, steps=steps).x)

    return coupling


def _pairs(batch) -> tuple[Array, Array, dict]:
    if not isinstance(batch, dict) or "x0" not in batch or "x1" not in batch:
        got = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"a reflow batch is a dict {{'x0': source points, 'x1': their ODE images, **cond}} "
                         f"(see reflow_couplings), got {got}.")
    check_same_shape(x0=batch["x0"], x1=batch["x1"])
    cond = {k: v for k, v in batch.items() if k not in ("x0", "x1")}
    return batch["x0"], batch["x1"], cond


def reflow_loss(path: GaussianPath | str = "linear", prediction: str = "velocity", **kwargs) -> Callable:
    r"""Rectified-flow loss on fixed pairs (Liu et al. eq. 1): ``|| v_theta(x_t, t) - (x_1 - x_0) ||^2``.

    ``x_t = alpha_t x_1 + beta_t x_0`` with the pair's own ``x_0`` as the "noise", i.e.
    :func:`jaxgen.losses.regression_loss` with ``source`` = the batch's ``x0`` (so the same ``weighting``,
    ``time_sampler``, ``t_range``, ... keywords apply). The linear path is the rectified flow; other
    paths give the same reflow on their interpolant.

    Returns:
      ``loss(model, batch, key)`` with ``batch = {"x0": ..., "x1": ..., **cond}``.
    """
    path = as_path(path)
    regression_loss(path, prediction, source=lambda k, n: None, **kwargs)  # validate the options now

    def loss(field, batch, key):
        x0, x1, cond = _pairs(batch)
        inner = regression_loss(path, prediction, source=lambda k, n: x0, **kwargs)
        return inner(field, {"x": x1, **cond}, key)

    return loss


def pair_sampler(pairs: dict[str, Array], batch_size: int) -> Callable[[Array], dict[str, Array]]:
    """``data(key) -> minibatch`` of ``batch_size`` random pairs (with replacement), for ``Trainer(data=...)``."""
    x0, _, _ = _pairs(pairs)
    n = x0.shape[0]
    if not 1 <= int(batch_size):
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")

    def data(key):
        idx = jax.random.randint(key, (int(batch_size),), 0, n)
        return jax.tree.map(lambda a: a[idx], pairs)

    return data


def distillation_loss(*, t0: float = 0.0, t1: float = 1.0, distance: str = "l2") -> Callable:
    r"""One-step distillation of a (rectified) flow's coupling (Liu et al. 2022, "distillation").

    Regress the one-step Euler map onto the pairs: ``E || x_0 + (t1 - t0) v_theta(x_0, t0) - x_1 ||^2``
    (``"l2"``: squared error averaged over features, the paper's choice for 2-D; it uses LPIPS for images) or
    ``"norm"``: the Euclidean norm ``|| . ||`` (robust to outlying pairs). After training,
    ``sample_ode(model, x0, method="euler", steps=1)`` is the one-step generator.

    Returns:
      ``loss(model, batch, key)`` with ``batch = {"x0": ..., "x1": ..., **cond}`` (``key`` unused).
    """
    if not 0.0 <= t0 < t1 <= 1.0:
        raise ValueError(f"need 0 <= t0 < t1 <= 1, got t0={t0}, t1={t1}.")
    if distance not in ("l2", "norm"):
        raise ValueError(f"unknown distance {distance!r}; use 'l2' (squared error) or 'norm' (Euclidean norm).")

    def loss(field, batch, key):
        del key
        x0, x1, cond = _pairs(batch)
        t = jnp.full((x0.shape[0],), t0, x0.dtype)
        out = field(x0, t, **cond)
        if getattr(out, "shape", None) != x0.shape:
            raise ValueError(f"the field returned shape {getattr(out, 'shape', None)} for x of shape "
                             f"{tuple(x0.shape)}; a velocity field must return an array like x.")
        r = x0 + (t1 - t0) * out - x1
        if distance == "l2":
            return jnp.mean(jnp.mean(jnp.reshape(r**2, (r.shape[0], -1)), -1))
        return jnp.mean(jnp.sqrt(_sq_norm(r) + 1e-12))

    return loss
