r"""Flow maps: the average velocity of the probability-flow ODE between two times (MeanFlow, Geng et al. 2025).

A flow-map model ``u(x, r, t)`` is the average velocity of the ODE ``dx/ds = v(x, s)`` from time ``r`` to time
``t``, evaluated at the starting point ``x = x_r``, so that one evaluation jumps along the ODE:

.. math:: x_t = x_r + (t - r)\, u(x_r, r, t), \qquad u(x_r, r, t) = \frac{1}{t - r} \int_r^t v(x_s, s)\, ds

(MeanFlow eq. 3, in jaxgen's time: ``t = 0`` noise, ``t = 1`` data, jumps forward ``r <= t``). On the diagonal
``u(x, t, t) = v(x, t)``, the instantaneous velocity. Differentiating ``x_t = x_r + (t - r) u(x_r, r, t)`` in ``r``
along a trajectory (``x_t`` fixed, ``dx_r/dr = v(x_r, r)``) gives the MeanFlow identity (eq. 6 with the roles of
the two times exchanged by the change of direction):

.. math:: u(x_r, r, t) = v(x_r, r) + (t - r)\, \frac{d}{dr} u(x_r, r, t), \qquad
   \frac{d}{dr} u = \partial_x u\; v(x_r, r) + \partial_r u,

the total derivative a Jacobian-vector product of ``u`` with the tangent ``(v, 1, 0)`` in ``(x, r, t)``
(:func:`meanflow_target`). With the conditional velocity ``v = d_alpha z + d_beta eps`` of a Gaussian path in place of
the marginal one, the target's conditional mean given ``x_r`` is still the identity's right-hand side (the total
derivative is linear in ``v``), so regressing on it learns the flow map (MeanFlow eq. 9).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxgen._checks import check_key, check_number, expand_like
from jaxgen.losses.regression import split_batch
from jaxgen.paths.gaussian import GaussianPath, as_path

Array = jax.Array


def meanflow_target(u: Callable, x: Array, r: Array, t: Array, v: Array, **cond: Any) -> tuple[Array, Array]:
    r"""``(u(x, r, t), v + (t - r) du/dr)``: the model's average velocity and the MeanFlow identity's right-hand
    side (module docstring; MeanFlow eq. 6 and 8), the total derivative ``du/dr = d_x u v + d_r u`` by one
    ``jax.jvp`` with tangent ``(v, 1, 0)``, which also returns ``u`` (one forward pass for both). ``r``, ``t`` have
    shape ``(B,)``; ``cond`` (labels, a guidance scale) is held fixed. The target is not stopped: the loss does that.
    """
    def f(x_, r_, t_):
        return u(x_, r_, t_, **cond)

    out, du_dr = jax.jvp(f, (x, r, t), (v, jnp.ones_like(r), jnp.zeros_like(t)))
    return out, v + expand_like(t - r, x) * du_dr


def meanflow_times(*, mean: float = -0.4, std: float = 1.0, equal_fraction: float = 0.75,
                   t_min: float = 0.0, t_max: float = 1.0) -> Callable[[Array, int], tuple[Array, Array]]:
    r"""MeanFlow's ``(r, t)`` distribution (Geng et al. 2025, sec. 4.3 and Table 1: logit-normal ``lognorm(-0.4,
    1.0)``, ``r != t`` for 25% of the samples): two logit-normal draws ``sigmoid(N(mean, std^2))`` sorted so that
    ``r <= t``; for a fraction ``equal_fraction`` of the samples ``r = t`` (plain flow matching on the diagonal).
    The paper's times run from data (0) to noise (1): in jaxgen's direction a draw ``tau`` becomes ``1 - tau`` and
    the pair is sorted again, so the paper's ``mean = -0.4`` (more samples near its data end) keeps its meaning.
    Returns ``sample(key, n) -> (r, t)`` in ``[t_min, t_max]``."""
    check_number(std, lambda v: v > 0, name="std", owner="meanflow_times", what="a number > 0")
    check_number(equal_fraction, lambda v: 0.0 <= v <= 1.0, name="equal_fraction", owner="meanflow_times",
                 what="a number in [0, 1]")
    if not 0.0 <= t_min < t_max <= 1.0:
        raise ValueError(f"meanflow_times needs 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}.")

    def sample(key: Array, n: int) -> tuple[Array, Array]:
        k_pair, k_eq = jax.random.split(key)
        tau = 1.0 - jax.nn.sigmoid(mean + std * jax.random.normal(k_pair, (2, n)))  # the paper's times, reversed
        tau = t_min + (t_max - t_min) * tau
        r, t = jnp.min(tau, axis=0), jnp.max(tau, axis=0)
        equal = jax.random.uniform(k_eq, (n,)) < equal_fraction
        return jnp.where(equal, t, r), t

    return sample


def adaptive_weight(residual: Array, *, p: float = 1.0, c: float = 1e-3) -> Array:
    r"""MeanFlow's adaptive loss weight ``w = 1 / (||Delta||^2 + c)^p`` per sample, held fixed (stop-gradient), so
    that ``w ||Delta||^2`` behaves like ``||Delta||^{2 - 2p}`` (Geng et al. 2025, sec. 4.3; ``p = 1``: a robust,
    Cauchy-like loss; ``p = 0``: plain squared error). ``residual`` has shape ``(B, ...)``."""
    sq = jnp.sum(jnp.reshape(residual, (residual.shape[0], -1)) ** 2, axis=-1)
    return jax.lax.stop_gradient(1.0 / (sq + c) ** p)


def meanflow_loss(path: GaussianPath | str = "linear", *, time_sampler: Callable | None = None, p: float = 1.0,
                  c: float = 1e-3) -> Callable:
    r"""The MeanFlow loss (Geng et al. 2025, eq. 9 and sec. 4.3) for a flow-map model ``model(x, r, t, **cond)``:

    .. math:: \mathcal L = \mathbb E\, w\, \big\| u_\theta(x_r, r, t) - \mathrm{sg}\big(v + (t - r)\,
       (\partial_x u_\theta\, v + \partial_r u_\theta)\big) \big\|^2

    with ``x_r = alpha_r z + beta_r eps`` on ``path``, its conditional velocity ``v = d_alpha_r z + d_beta_r eps``
    (CondOT: ``z - eps``), ``(r, t)`` from ``time_sampler(key, n)`` (default :func:`meanflow_times`), the adaptive
    weight ``w`` of :func:`adaptive_weight` with power ``p`` and the squared error summed over features (the paper's
    ``||.||^2``). Where ``r = t`` the target is ``v``: flow matching on the diagonal. One forward pass and one JVP
    (:func:`meanflow_target`).

    Returns:
      ``loss(model, batch, key) -> scalar``; ``batch`` is the data ``x`` or ``{"x": x, **cond}``.
    """
    path = as_path(path)
    check_number(p, lambda v: v >= 0, name="p", owner="meanflow_loss", what="a number >= 0 (1: the paper's)")
    check_number(c, lambda v: v > 0, name="c", owner="meanflow_loss", what="a number > 0 (1e-3: the paper's)")
    sampler = meanflow_times() if time_sampler is None else time_sampler

    def loss(model, batch, key: Array) -> Array:
        z, cond = split_batch(batch, owner="meanflow_loss")
        check_key(key, owner="meanflow_loss")
        k_t, k_eps = jax.random.split(key)
        n = z.shape[0]
        r, t = sampler(k_t, n)
        r, t = r.astype(z.dtype), t.astype(z.dtype)
        eps = jax.random.normal(k_eps, z.shape, z.dtype)
        co = path.coefficients(r)
        x = expand_like(co.alpha, z) * z + expand_like(co.beta, z) * eps
        v = expand_like(co.d_alpha, z) * z + expand_like(co.d_beta, z) * eps
        out, target = meanflow_target(model, x, r, t, v, **cond)
        residual = out - jax.lax.stop_gradient(target)
        w = adaptive_weight(residual, p=p, c=c)
        return jnp.mean(w * jnp.sum(jnp.reshape(residual, (n, -1)) ** 2, axis=-1))

    return loss


__all__ = ["meanflow_target", "meanflow_times", "adaptive_weight", "meanflow_loss"]
