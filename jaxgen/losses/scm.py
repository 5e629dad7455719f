r"""Continuous-time consistency models (sCM: Lu & Song 2025, "Simplifying, Stabilizing and Scaling Continuous-Time
Consistency Models", ICLR), with the TrigFlow parameterisation mapped onto jaxgen's ``cosine`` path.

**TrigFlow in jaxgen's time** (the paper's sec. 3). TrigFlow diffuses ``x_s = cos(s) x_0 + sin(s) sigma_d z`` for
``s in [0, pi/2]`` (``s = 0`` data, ``z ~ N(0, I)``, ``sigma_d`` the data's standard deviation). Divided by
``sigma_d`` it is jaxgen's cosine path on the scaled data ``x_0 / sigma_d`` at the time ``t = 1 - 2 s / pi``
(:func:`from_trigflow_time`):

.. math:: \frac{x_s}{\sigma_d} = \sin(\tfrac{\pi t}{2}) \frac{x_0}{\sigma_d} + \cos(\tfrac{\pi t}{2})\, z
   = \alpha_t \frac{x_0}{\sigma_d} + \beta_t z, \qquad \cos s = \alpha_t,\ \sin s = \beta_t,

so every model here works on the scaled state ``x = x_s / sigma_d`` (prior ``N(0, I)``; samples are multiplied by
``sigma_d``). The paper's network ``F(x, s)`` and probability-flow ODE ``dx/ds = F`` are the jaxgen velocity
``u(x, t) = dx/dt = -(pi/2) F`` (``ds/dt = -pi/2``), and its consistency function ``f = cos(s) x - sin(s) F`` is
``f = alpha_t x + (2/pi) beta_t u(x, t)`` (:class:`jaxgen.models.ConsistencyFunction`, ``parameterization="trigflow"``).

**The sCM loss** (sec. 4 and Algorithm 1). With ``theta^- = stopgrad(theta)`` (no EMA target) and the time
derivative ``dx/ds`` of the sample (sCT: ``cos(s) z - sin(s) x_0 / sigma_d`` from the data; sCD: ``F_teacher``):

.. math:: g = -\cos^2 s\, (F^- - \tfrac{dx}{ds}) - r \cos s \sin s\, (x + \tfrac{dF^-}{ds}), \qquad
   \mathcal L = \mathbb E\Big[ e^{-w_\phi(t)} \tfrac1D \big\| F_\theta - F^- - \tfrac{\sigma_d g}{\|\sigma_d g\| + c}
   \big\|^2 + w_\phi(t) \Big]

(Algorithm 1's "JVP rearrangement", "tangent normalization" and "adaptive weighting" lines; in the scaled units
``g`` is the paper's tangent divided by ``sigma_d``, so ``sigma_d g`` is the paper's). The total derivative
``cos s sin s dF^-/ds`` is one ``jax.jvp`` of ``F^-`` with the tangent ``(cos s sin s dx/ds, cos s sin s)`` in
``(x, s)`` (:func:`trigflow_jvp`, sec. 4: multiplying the tangent by ``cos s sin s`` keeps it bounded). At ``r = 1``
``g = cos(s) df^-/ds`` along ``dx/ds``, the derivative of the target consistency function along the ODE (sec. 4), in
jaxgen time ``g = -(2/pi) alpha_t df^-/dt``: zero for the exact consistency function and the exact teacher, and
linear in ``dx/ds``, so with sCT's conditional ``dx/ds`` its conditional mean is the sCD tangent of the marginal ODE.
The loss's value is the normalised tangent's size (``F_theta - F^- = 0``); its gradient ``-2 g_n^T dF_theta / D`` is
the paper's continuous-time consistency gradient. ``r = min(1, step / warmup_steps)`` is the tangent warm-up (sec. 4).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxgen._checks import check_key, check_number, expand_like
from jaxgen.fields import as_field, canonical_prediction
from jaxgen.losses.regression import split_batch
from jaxgen.paths.gaussian import GaussianPath, as_path

Array = jax.Array

_HALF_PI = 0.5 * math.pi


def to_trigflow_time(t: Array) -> Array:
    r"""TrigFlow's ``s = (pi/2)(1 - t)`` of jaxgen's time ``t`` (``t = 1`` data is ``s = 0``; module docstring)."""
    return _HALF_PI * (1.0 - jnp.asarray(t))


def from_trigflow_time(s: Array) -> Array:
    r"""jaxgen's ``t = 1 - 2 s / pi`` of TrigFlow's time ``s in [0, pi/2]`` (module docstring)."""
    return 1.0 - jnp.asarray(s) / _HALF_PI


def scm_times(*, p_mean: float = -1.0, p_std: float = 1.4, sigma_data: float = 0.5
              ) -> Callable[[Array, int], Array]:
    r"""sCM's time distribution in jaxgen time (Lu & Song 2025, Algorithm 1): ``tan(s) = e^tau / sigma_d`` with
    ``tau ~ N(p_mean, p_std^2)`` (EDM's log-normal noise level ``sigma = e^tau`` in data units), i.e.

    .. math:: t = 1 - \tfrac{2}{\pi} \arctan(e^\tau / \sigma_d) = \tfrac{2}{\pi} \arctan(\sigma_d e^{-\tau}) \in [0, 1],

    written with the second form (no ``pi/2 - arctan`` cancellation near ``t = 0``, and ``e^{-tau} = inf`` gives
    ``t = 1``). The paper's -1.0 / 1.4 are its CIFAR-10 values. Returns ``sample(key, n) -> t`` of shape ``(n,)``."""
    check_number(p_std, lambda v: v > 0, name="p_std", owner="scm_times", what="a number > 0 (1.4: the paper's)")
    check_number(p_mean, lambda v: True, name="p_mean", owner="scm_times", what="a finite number (-1.0: the paper's)")
    check_number(sigma_data, lambda v: v > 0, name="sigma_data", owner="scm_times", what="a number > 0")

    def sample(key: Array, n: int) -> Array:
        tau = p_mean + p_std * jax.random.normal(key, (n,))
        return jnp.clip(jnp.arctan(sigma_data * jnp.exp(-tau)) / _HALF_PI, 0.0, 1.0)

    return sample


def trigflow_jvp(u: Callable, x: Array, t: Array, v: Array, **cond: Any) -> tuple[Array, Array]:
    r"""``(F, cos s sin s dF/ds)`` of the TrigFlow network ``F(x, s) = -(2/pi) u(x, 1 - 2s/pi)`` of a jaxgen velocity
    ``u(x, t, **cond)`` on the cosine path, along ``dx/ds = -(2/pi) v`` (``v = dx/dt`` in jaxgen time): one ``jax.jvp``
    in ``(x, s)`` with the tangent ``(cos s sin s dx/ds, cos s sin s)`` (Lu & Song 2025, sec. 4 and Algorithm 1; the
    total derivative ``dF/ds = d_x F dx/ds + d_s F`` times ``cos s sin s``), which also returns ``F`` (one forward pass
    for both). The network is differentiated in its own time ``t``: the tangent of ``s`` is that of ``t`` times
    ``ds/dt``, ``-(2/pi) cos s sin s``, so it sees exactly the ``t`` it is called with. ``x``, ``v`` have shape
    ``(B, ...)`` in the scaled units, ``t`` shape ``(B,)``; ``cos s = alpha_t``, ``sin s = beta_t``. Nothing is stopped
    here: the loss does that."""
    s = to_trigflow_time(t)
    cs = jnp.cos(s) * jnp.sin(s)

    def trigflow_net(x_, t_):
        return -(1.0 / _HALF_PI) * u(x_, t_, **cond)

    dx_ds = -(1.0 / _HALF_PI) * v
    return jax.jvp(trigflow_net, (x, t), (expand_like(cs, x) * dx_ds, -(1.0 / _HALF_PI) * cs))


def scm_tangent(u: Callable, x: Array, t: Array, v: Array, *, r: float | Array = 1.0, **cond: Any
                ) -> tuple[Array, Array]:
    r"""``(F, g)``: the TrigFlow network ``F = -(2/pi) u(x, t)`` and sCM's tangent (Lu & Song 2025, Algorithm 1, "JVP
    rearrangement"), in the scaled units (the paper's ``g`` divided by ``sigma_d``):

    .. math:: g = -\cos^2 s\, \big(F - \tfrac{dx}{ds}\big)
       - r \big(\cos s \sin s\, x + \cos s \sin s\, \tfrac{dF}{ds}\big),
       \qquad s = \tfrac{\pi}{2}(1 - t),\ \tfrac{dx}{ds} = -\tfrac{2}{\pi} v,

    the last term from :func:`trigflow_jvp` along ``v = dx/dt`` (the sample's jaxgen velocity: conditional for sCT, a
    teacher's for sCD). At ``r = 1`` this is ``cos(s) df/ds = -(2/pi) alpha_t df/dt`` for the consistency function
    ``f = alpha_t x + (2/pi) beta_t u`` moving along ``v``. Shapes as :func:`trigflow_jvp`; no division anywhere (finite
    at ``t = 0`` and ``t = 1``, where ``cos s sin s = 0``)."""
    s = to_trigflow_time(t)
    cos_s, sin_s = expand_like(jnp.cos(s), x), expand_like(jnp.sin(s), x)
    f_net, cs_df = trigflow_jvp(u, x, t, v, **cond)
    dx_ds = -(1.0 / _HALF_PI) * v
    g = -cos_s**2 * (f_net - dx_ds) - r * (cos_s * sin_s * x + cs_df)
    return f_net, g


def _velocity_of(model: Callable) -> Callable:
    """The network velocity of a ``trigflow`` :class:`~jaxgen.models.ConsistencyFunction` (its ``velocity`` method), or
    the model itself when it is a plain velocity field ``u(x, t, **cond)``."""
    velocity = getattr(model, "velocity", None)
    return velocity if callable(velocity) else model


def scm_loss(path: GaussianPath | str = "cosine", *, teacher: Callable | None = None,
             teacher_prediction: str = "velocity", sigma_data: float = 0.5, p_mean: float = -1.0, p_std: float = 1.4,
             tangent_c: float | None = 0.1, warmup_steps: int = 10_000,
             time_sampler: Callable[[Array, int], Array] | None = None) -> Callable:
    r"""The sCM loss (Lu & Song 2025, Algorithm 1; module docstring): sCT from the data when ``teacher`` is ``None``,
    sCD from a teacher's probability-flow ODE otherwise.

    Each sample draws ``t`` from ``time_sampler`` (default :func:`scm_times`), scales the data ``x_0 = z / sigma_data``,
    forms ``x = alpha_t x_0 + beta_t eps`` on the cosine path and the sample's velocity ``v`` (sCT: the conditional
    ``d_alpha_t x_0 + d_beta_t eps``, i.e. ``dx/ds = cos(s) eps - sin(s) x_0``; sCD: the teacher's at ``(x, t)``),
    the tangent ``g`` of :func:`scm_tangent` under ``stopgrad`` with the warm-up ``r = min(1, step / warmup_steps)``,
    normalised as the paper's ``sigma_d g / (||sigma_d g|| + tangent_c)`` (the norm over all of a sample's
    coordinates), and regresses ``F_theta - stopgrad(F_theta)`` on it; with the model's ``logvar`` network ``w(t)`` the
    per-sample mean square over the ``D`` coordinates is weighted as ``exp(-w) mse + w``, else uniformly.

    Args:
      path: the cosine path (TrigFlow is defined on it; any other path is refused).
      teacher: ``None`` for sCT; for sCD a field ``teacher(x, t, **cond)`` of the cosine path **on the scaled data**
        ``z / sigma_data`` (e.g. a flow-matching model trained with ``flow_matching_loss("cosine")`` on batches divided
        by ``sigma_data``, or the oracle's ``velocity_field``), predicting ``teacher_prediction``.
      teacher_prediction: ``velocity`` (default), ``data``, ``eps``, ``score`` or ``v``; converted to a velocity.
      sigma_data: the data's standard deviation per coordinate (the paper's ``sigma_d``; 0.5 for images in [-1, 1],
        1 for standardised data). The batch is divided by it.
      p_mean, p_std: the log-normal time distribution of :func:`scm_times` (the paper's -1.0, 1.4).
      tangent_c: the normalisation constant ``c`` (0.1: the paper's); ``None`` turns the normalisation off (then
        ``sigma_d g`` itself is the regression target, the paper's ablation).
      warmup_steps: tangent warm-up length ``H``; 0 for ``r = 1`` from the start.
      time_sampler: ``sample(key, n) -> t`` in jaxgen time, replacing :func:`scm_times`.

    Returns:
      ``loss(model, batch, key, *, step=0) -> scalar``; ``batch`` is the data ``z`` or ``{"x": z, **cond}`` (labels
      ``y`` reach the network and the teacher). ``model`` is a :class:`~jaxgen.models.ConsistencyFunction` with
      ``parameterization="trigflow"`` (its network's velocity is trained, its optional ``logvar`` network is the
      adaptive weight) or any velocity field ``u(x, t, **cond)`` of the cosine path on the scaled data.
      :class:`jaxgen.training.Trainer` passes ``step``; the target is always ``stopgrad(model)`` (the paper's; an EMA
      kept by the trainer is only for sampling).
    """
    path = as_path(path)
    if not path.same_as(GaussianPath.from_name("cosine")):
        raise ValueError(f"scm_loss: sCM's TrigFlow is the 'cosine' path (x_s / sigma_d at t = 1 - 2s/pi); got the "
                         f"{path.name!r} path.")
    check_number(sigma_data, lambda v: v > 0, name="sigma_data", owner="scm_loss",
                 what="a number > 0 (the data's standard deviation per coordinate)")
    if tangent_c is not None:
        check_number(tangent_c, lambda v: v > 0, name="tangent_c", owner="scm_loss",
                     what="a number > 0 (0.1: the paper's) or None (no tangent normalisation)")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"scm_loss: warmup_steps must be an integer >= 0 (0: r = 1 from the start), got "
                         f"{warmup_steps!r}.")
    sampler = scm_times(p_mean=p_mean, p_std=p_std, sigma_data=sigma_data) if time_sampler is None else time_sampler
    teacher_field = None
    if teacher is not None:
        if not callable(teacher):
            raise ValueError("scm_loss: teacher must be a field teacher(x, t, **cond) of the cosine path on the scaled "
                             "data, or None for consistency training.")
        teacher_field = as_field(path, teacher, source=canonical_prediction(teacher_prediction), target="velocity")
    sd = float(sigma_data)

    def loss(model, batch, key: Array, *, step: Array | int = 0) -> Array:
        z, cond = split_batch(batch, owner="scm_loss")
        check_key(key, owner="scm_loss")
        n = z.shape[0]
        k_t, k_eps = jax.random.split(key)
        t = sampler(k_t, n).astype(z.dtype)
        x0 = z / sd
        eps = jax.random.normal(k_eps, z.shape, z.dtype)
        co = path.coefficients(t)
        x = expand_like(co.alpha, z) * x0 + expand_like(co.beta, z) * eps
        if teacher_field is None:
            v = expand_like(co.d_alpha, z) * x0 + expand_like(co.d_beta, z) * eps
        else:
            v = jax.lax.stop_gradient(teacher_field(x, t, **cond))
        r = 1.0 if warmup_steps == 0 else jnp.minimum(1.0, jnp.asarray(step, jnp.float32) / warmup_steps)
        f_net, g = scm_tangent(_velocity_of(model), x, t, v, r=r, **cond)
        g = sd * jax.lax.stop_gradient(g)  # the paper's units
        if tangent_c is not None:
            norm = jnp.sqrt(jnp.sum(jnp.reshape(g, (n, -1)) ** 2, axis=-1))
            g = g / expand_like(norm + tangent_c, g)
        residual = f_net - jax.lax.stop_gradient(f_net) - g
        mse = jnp.mean(jnp.reshape(residual, (n, -1)) ** 2, axis=-1)
        logvar = getattr(model, "logvar", None)
        if logvar is not None:
            w = jnp.reshape(logvar(t), (n,)).astype(mse.dtype)
            mse = jnp.exp(-w) * mse + w
        return jnp.mean(mse)

    return loss


__all__ = ["scm_loss", "scm_tangent", "scm_times", "trigflow_jvp", "to_trigflow_time", "from_trigflow_time"]
