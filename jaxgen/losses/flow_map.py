r"""Flow maps: the average velocity of the probability-flow ODE between two times (MeanFlow, Geng et al. 2025;
shortcut models, Frans et al. 2025).

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


def _check_guidance(owner: str, label_dropout: float, null_label: int | None,
                    guidance_scales: tuple[float, float] | None) -> None:
    check_number(label_dropout, lambda v: 0.0 <= v < 1.0, name="label_dropout", owner=owner,
                 what="a probability in [0, 1)")
    if (label_dropout > 0 or guidance_scales is not None) and null_label is None:
        raise ValueError(f"{owner}: label_dropout and guidance_scales need the null label: pass "
                         "null_label=num_classes (the extra class of a guidance-ready network).")
    if guidance_scales is not None:
        if len(tuple(guidance_scales)) != 2 or not 0.0 <= guidance_scales[0] <= guidance_scales[1]:
            raise ValueError(f"{owner}: guidance_scales must be a range (lo, hi) with 0 <= lo <= hi, e.g. "
                             f"(1.0, 4.0), got {guidance_scales!r}.")
        if not label_dropout > 0:
            raise ValueError(f"{owner}: guidance_scales needs label_dropout > 0 (e.g. 0.1), so that the network "
                             "learns the unconditional velocity the guided target is built from.")


def _guidance_inputs(cond: dict, n: int, key: Array, dtype, *, owner: str, label_dropout: float,
                     null_label: int | None, guidance_scales: tuple[float, float] | None, label_key: str,
                     guidance_key: str) -> dict:
    """The conditioning with each label replaced by ``null_label`` with probability ``label_dropout`` and, with
    ``guidance_scales = (lo, hi)``, a scale ``w ~ U[lo, hi]`` per kept label (``w = 1`` for dropped ones) under
    ``guidance_key``."""
    if not (label_dropout > 0 or guidance_scales is not None):
        return cond
    if label_key not in cond:
        raise ValueError(f"{owner}: label_dropout and guidance need labels in the batch under key {label_key!r}; got "
                         f"keys {sorted(['x', *cond])}.")
    k_drop, k_w = jax.random.split(key)
    labels = cond[label_key]
    drop = jax.random.bernoulli(k_drop, label_dropout, (n,))
    cond = {**cond, label_key: jnp.where(drop, jnp.full_like(labels, null_label), labels)}
    if guidance_scales is not None:
        lo, hi = guidance_scales
        cond[guidance_key] = jnp.where(drop, 1.0, jax.random.uniform(k_w, (n,), dtype, lo, hi)).astype(dtype)
    return cond


def _guided_velocity(model: Callable, x: Array, time: Array, v: Array, cond: dict, *, null_label: int,
                     label_key: str, guidance_key: str) -> Array:
    r"""``w v + (1 - w) sg(u(x, time, time | null, w = 1))``: the conditional velocity ``v`` turned into a sample of the
    classifier-free-guided velocity at the scale ``w = cond[guidance_key]`` (MeanFlow sec. 4.2, eq. 13), with the
    network's own unconditional diagonal (one forward pass, no gradient)."""
    w = cond[guidance_key]
    null = {**cond, label_key: jnp.full_like(cond[label_key], null_label), guidance_key: jnp.ones_like(w)}
    v_null = jax.lax.stop_gradient(model(x, time, time, **null))
    return expand_like(w, x) * v + expand_like(1.0 - w, x) * v_null


def meanflow_loss(path: GaussianPath | str = "linear", *, time_sampler: Callable | None = None, p: float = 1.0,
                  c: float = 1e-3, label_dropout: float = 0.0, null_label: int | None = None,
                  guidance_scales: tuple[float, float] | None = None, label_key: str = "y",
                  guidance_key: str = "w") -> Callable:
    r"""The MeanFlow loss (Geng et al. 2025, eq. 9 and sec. 4.3) for a flow-map model ``model(x, r, t, **cond)``:

    .. math:: \mathcal L = \mathbb E\, w\, \big\| u_\theta(x_r, r, t) - \mathrm{sg}\big(v + (t - r)\,
       (\partial_x u_\theta\, v + \partial_r u_\theta)\big) \big\|^2

    with ``x_r = alpha_r z + beta_r eps`` on ``path``, its conditional velocity ``v = d_alpha_r z + d_beta_r eps``
    (CondOT: ``z - eps``), ``(r, t)`` from ``time_sampler(key, n)`` (default :func:`meanflow_times`), the adaptive
    weight ``w`` of :func:`adaptive_weight` with power ``p`` and the squared error summed over features (the paper's
    ``||.||^2``). Where ``r = t`` the target is ``v``: flow matching on the diagonal. One forward pass and one JVP
    (:func:`meanflow_target`).

    **Guidance built into training** (MeanFlow sec. 4.2, eq. 13-15; the scale as a conditioning input as in improved
    MeanFlow, Geng et al. 2025): with ``label_dropout`` each label ``batch[label_key]`` is replaced by ``null_label``
    with that probability (the network also learns the unconditional field), and with ``guidance_scales=(lo, hi)``
    each kept label gets a scale ``w ~ U[lo, hi]``, passed to the model as ``cond[guidance_key]``, and the
    instantaneous velocity of the identity becomes the guided one,

    .. math:: \tilde v = w\, v + (1 - w)\, \mathrm{sg}\big(u_\theta(x_r, r, r \mid \varnothing, w = 1)\big),

    whose conditional mean given ``x_r`` is the classifier-free-guided velocity ``w v(x|y) + (1 - w) v(x|null)``
    (jaxgen's convention, :func:`jaxgen.fields.guided_field`); ``tilde v`` is also the JVP's tangent, so the model
    learns the flow map of the guided ODE at every ``w``, and one jump samples it guided without a second network
    call. Dropped labels train with ``w = 1`` and target ``v``. Costs one more forward pass (the unconditional
    diagonal).

    Returns:
      ``loss(model, batch, key) -> scalar``; ``batch`` is the data ``x`` or ``{"x": x, **cond}``.
    """
    path = as_path(path)
    check_number(p, lambda v: v >= 0, name="p", owner="meanflow_loss", what="a number >= 0 (1: the paper's)")
    check_number(c, lambda v: v > 0, name="c", owner="meanflow_loss", what="a number > 0 (1e-3: the paper's)")
    sampler = meanflow_times() if time_sampler is None else time_sampler
    _check_guidance("meanflow_loss", label_dropout, null_label, guidance_scales)
    guide = dict(label_dropout=label_dropout, null_label=null_label, guidance_scales=guidance_scales,
                 label_key=label_key, guidance_key=guidance_key)

    def loss(model, batch, key: Array) -> Array:
        z, cond = split_batch(batch, owner="meanflow_loss")
        check_key(key, owner="meanflow_loss")
        k_t, k_eps, k_guide = jax.random.split(key, 3)
        n = z.shape[0]
        r, t = sampler(k_t, n)
        r, t = r.astype(z.dtype), t.astype(z.dtype)
        eps = jax.random.normal(k_eps, z.shape, z.dtype)
        co = path.coefficients(r)
        x = expand_like(co.alpha, z) * z + expand_like(co.beta, z) * eps
        v = expand_like(co.d_alpha, z) * z + expand_like(co.d_beta, z) * eps
        cond = _guidance_inputs(cond, n, k_guide, z.dtype, owner="meanflow_loss", **guide)
        if guidance_scales is not None:
            v = _guided_velocity(model, x, r, v, cond, null_label=null_label, label_key=label_key,
                                 guidance_key=guidance_key)
        out, target = meanflow_target(model, x, r, t, v, **cond)
        residual = out - jax.lax.stop_gradient(target)
        w = adaptive_weight(residual, p=p, c=c)
        return jnp.mean(w * jnp.sum(jnp.reshape(residual, (n, -1)) ** 2, axis=-1))

    return loss


def shortcut_loss(path: GaussianPath | str = "linear", *, max_doublings: int = 7,
                  consistency_fraction: float = 0.25, label_dropout: float = 0.0, null_label: int | None = None,
                  guidance_scales: tuple[float, float] | None = None, label_key: str = "y",
                  guidance_key: str = "w") -> Callable:
    r"""The shortcut-model loss (Frans et al. 2025, eq. 5 and sec. 3) for a flow-map model ``model(x, r, t, **cond)``:
    a shortcut ``s(x_t, t, d)`` is the flow map ``u(x_t, t, t + d)``.

    * Flow matching at the smallest step (``d = 0``, the diagonal ``r = t``) on ``1 - consistency_fraction`` of the
      batch: ``|| u(x_t, t, t) - v ||^2`` with the path's conditional velocity ``v``.
    * Self-consistency on the rest: two jumps of ``d`` make one of ``2 d``,

      .. math:: u(x_t, t, t + 2d) \approx \mathrm{sg}\big(\tfrac12 [u(x_t, t, t + d) + u(x', t + d, t + 2d)]\big),
         \qquad x' = x_t + d\, u(x_t, t, t + d),

      with ``d = 2^{j - max_doublings}``, ``j`` uniform in ``0 .. max_doublings - 1`` (steps ``1/128 .. 1/2`` for the
      paper's 7), and ``t`` uniform on the multiples of ``d`` with ``t + 2d <= 1`` (the paper's discrete grid).

    The squared errors are summed over features and averaged over the batch; the split is static (the first
    ``round(consistency_fraction * B)`` samples). The exact flow map is a minimiser: it satisfies the
    self-consistency exactly (the flow's semigroup property) and its diagonal is the marginal velocity.

    Guidance is built in as in :func:`meanflow_loss` (``label_dropout``, ``null_label``, ``guidance_scales``): the
    diagonal's target becomes the guided velocity ``w v + (1 - w) sg(u(x_t, t, t | null))`` and every jump is
    conditioned on the sample's ``(y, w)``, so the model learns the shortcuts of the guided ODE at every ``w``.

    Returns:
      ``loss(model, batch, key) -> scalar``; ``batch`` is the data ``x`` or ``{"x": x, **cond}``.
    """
    path = as_path(path)
    if isinstance(max_doublings, bool) or not isinstance(max_doublings, int) or max_doublings < 1:
        raise ValueError(f"shortcut_loss: max_doublings must be an integer >= 1 (7 in the paper: steps down to "
                         f"1/128), got {max_doublings!r}.")
    check_number(consistency_fraction, lambda v: 0.0 <= v <= 1.0, name="consistency_fraction",
                 owner="shortcut_loss", what="a number in [0, 1] (0.25 in the paper)")
    _check_guidance("shortcut_loss", label_dropout, null_label, guidance_scales)
    guide = dict(label_dropout=label_dropout, null_label=null_label, guidance_scales=guidance_scales,
                 label_key=label_key, guidance_key=guidance_key)

    def loss(model, batch, key: Array) -> Array:
        z, cond = split_batch(batch, owner="shortcut_loss")
        check_key(key, owner="shortcut_loss")
        n = z.shape[0]
        k = int(round(consistency_fraction * n))
        k_t, k_j, k_eps, k_u, k_guide = jax.random.split(key, 5)
        cond = _guidance_inputs(cond, n, k_guide, z.dtype, owner="shortcut_loss", **guide)
        j = jax.random.randint(k_j, (n,), 0, max_doublings)
        d = (2.0 ** (j - max_doublings)).astype(z.dtype)
        slots = jnp.round(1.0 / d).astype(jnp.int32) - 1  # t in {0, d, ..., 1 - 2d}: 1/d - 1 slots
        t_grid = jnp.floor(jax.random.uniform(k_u, (n,)) * slots).astype(z.dtype) * d
        t_fm = jax.random.uniform(k_t, (n,), dtype=z.dtype)
        is_sc = jnp.arange(n) < k
        t = jnp.where(is_sc, t_grid, t_fm)
        eps = jax.random.normal(k_eps, z.shape, z.dtype)
        co = path.coefficients(t)
        x = expand_like(co.alpha, z) * z + expand_like(co.beta, z) * eps
        v = expand_like(co.d_alpha, z) * z + expand_like(co.d_beta, z) * eps
        end = jnp.where(is_sc, t + 2 * d, t)
        out = model(x, t, end, **cond)
        if guidance_scales is not None:
            v = _guided_velocity(model, x, t, v, cond, null_label=null_label, label_key=label_key,
                                 guidance_key=guidance_key)
        target = v
        if k > 0:
            def half_jumps(x):
                u1 = model(x, t, t + d, **cond)
                x_mid = x + expand_like(d, x) * u1
                u2 = model(x_mid, t + d, t + 2 * d, **cond)
                return 0.5 * (u1 + u2)
            target = jnp.where(expand_like(is_sc, z), jax.lax.stop_gradient(half_jumps(x)), v)
        return jnp.mean(jnp.sum(jnp.reshape(out - target, (n, -1)) ** 2, axis=-1))

    return loss


__all__ = ["meanflow_target", "meanflow_times", "adaptive_weight", "meanflow_loss", "shortcut_loss"]
