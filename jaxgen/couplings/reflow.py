r"""Reflow couplings of rectified flow (Liu, Gong & Liu 2022, "Flow Straight and Fast", ICLR 2023).

Given a flow ``dx/dt = v(x, t)`` from a source ``x_0`` (t = 0, noise) to data (t = 1), *reflow* re-trains a flow on
the flow's own couplings ``(x_0, x_1 = ODE(x_0))`` (Liu et al. Algorithm 1): :func:`reflow_couplings` draws a fixed
set of pairs, :func:`pair_sampler` draws minibatches of them inside a compiled training step, and
:func:`reflow_coupling` is a ``coupling`` hook for :func:`jaxgen.losses.regression_loss` that solves the ODE on the
fly. The loss on the pairs is :func:`jaxgen.losses.reflow_loss`.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxgen._checks import check_data, check_same_shape
from jaxgen.samplers.base import Solver, sample

Array = jax.Array


def _pairs(batch) -> tuple[Array, Array, dict]:
    if not isinstance(batch, dict) or "x0" not in batch or "x1" not in batch:
        got = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(f"a reflow batch is a dict {{'x0': source points, 'x1': their ODE images, **cond}} "
                         f"(see reflow_couplings), got {got}.")
    check_same_shape(x0=batch["x0"], x1=batch["x1"])
    check_data(batch["x0"], owner="reflow pairs", name="x0")
    check_data(batch["x1"], owner="reflow pairs", name="x1")
    cond = {k: v for k, v in batch.items() if k not in ("x0", "x1")}
    return batch["x0"], batch["x1"], cond


def reflow_couplings(
    field: Callable,
    key: Array | None,
    n: int | None,
    source: Callable[[Array, int], Array] | Array,
    *,
    solver: Solver | str = "heun",
    steps: int | None = 100,
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
      solver, steps: the ODE solver (a :class:`jaxgen.samplers.Solver` or its name, e.g. ``"heun"``, ``"tsit5"``)
        and its number of steps (``None`` for an adaptive one).
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
    x1 = sample(field, x0, solver, steps=steps, t0=t0, t1=t1, cond=cond).x
    return {"x0": x0, "x1": jax.lax.stop_gradient(x1), **(cond or {})}


def reflow_coupling(field: Callable, *, solver: Solver | str = "heun", steps: int | None = 20
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
        return x0, jax.lax.stop_gradient(sample(field, x0, solver, steps=steps).x)

    return coupling


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


__all__ = ["reflow_couplings", "reflow_coupling", "pair_sampler"]
