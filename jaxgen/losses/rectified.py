r"""Rectified-flow losses (Liu, Gong & Liu 2022, "Flow Straight and Fast", ICLR 2023).

:func:`reflow_loss` trains a flow on fixed pairs ``(x_0, x_1)`` (from :func:`jaxgen.couplings.reflow_couplings`)
with the straight interpolant ``x_t = t x_1 + (1 - t) x_0``:

.. math:: \min_\theta \int_0^1 \mathbb E \big\| (x_1 - x_0) - v_\theta(t x_1 + (1 - t) x_0, t) \big\|^2 dt
   \qquad (\text{Liu et al. eq. 1 on the coupling } (x_0, x_1) = (Z_0, Z_1^k)),

and :func:`distillation_loss` distils the coupling into a one-step map ``x_1 ~ x_0 + v_theta(x_0, 0)``.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxgen.couplings.reflow import _pairs
from jaxgen.losses.regression import regression_loss
from jaxgen.metrics.transport import _sq_norm
from jaxgen.paths.gaussian import GaussianPath, as_path

Array = jax.Array


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


def distillation_loss(*, t0: float = 0.0, t1: float = 1.0, distance: str = "l2") -> Callable:
    r"""One-step distillation of a (rectified) flow's coupling (Liu et al. 2022, "distillation").

    Regress the one-step Euler map onto the pairs: ``E || x_0 + (t1 - t0) v_theta(x_0, t0) - x_1 ||^2``
    (``"l2"``: squared error averaged over features, the paper's choice for 2-D; it uses LPIPS for images) or
    ``"norm"``: the Euclidean norm ``|| . ||`` (robust to outlying pairs). After training,
    ``sample(model, x0, Euler(), steps=1)`` is the one-step generator.

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


__all__ = ["reflow_loss", "distillation_loss"]
