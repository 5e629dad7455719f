r"""Consistency losses (Song, Dhariwal, Chen & Sutskever 2023, Algorithms 2 and 3), in jaxgen time.

Training compares the online network at the *noisier* of two neighbouring times ``tau_n < tau_{n+1}`` with a
target network (an EMA ``theta^-`` of the online weights, with ``stopgrad``) at the *less noisy* one, which is
closer to the boundary that anchors it:

.. math:: \mathcal L = \mathbb E\, \lambda\, d\big(f_\theta(x_{\tau_n}, \tau_n),\ f_{\theta^-}(\hat x_{\tau_{n+1}}, \tau_{n+1})\big).

* distillation (CD): ``x_{tau_n} = alpha z + beta eps`` from data, ``hat x_{tau_{n+1}}`` one
  teacher ODE step (Euler or Heun) towards the data end;
* training (CT): ``hat x_{tau_{n+1}} = alpha_{tau_{n+1}} z + beta_{tau_{n+1}} eps`` with the same
  ``eps`` (the exact solution of the conditional ODE: the paper's unbiased CT estimator, sec. 5).

The consistency function is :class:`jaxgen.models.ConsistencyFunction` (preconditioning in
:mod:`jaxgen.fields.preconditioning`).
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from jaxgen._checks import check_key, expand_like
from jaxgen.fields import as_field, canonical_prediction
from jaxgen.fields.algebra import check_data_identifiable
from jaxgen.fields.preconditioning import _end_time
from jaxgen.losses.regression import split_batch
from jaxgen.paths.gaussian import GaussianPath, as_path
from jaxgen.samplers.ode import heun_step

Array = jax.Array

SOLVERS = ("euler", "heun")
DISTANCES = ("l2", "l1", "pseudo_huber")


# ---------------------------------------------------------------------------------------------
# Discretisation and schedules.
# ---------------------------------------------------------------------------------------------


def _grid_time(i: Array, n: Array, t_min: float, t_end: float, rho: float) -> Array:
    r"""``tau_i = t_end - (t_end - t_min) (1 - i / (n - 1))^rho`` (``i``, ``n`` may be traced)."""
    u = 1.0 - i.astype(jnp.float32) / (jnp.asarray(n, jnp.float32) - 1.0)
    return t_end - (t_end - t_min) * jnp.maximum(u, 0.0) ** rho


def consistency_times(num_scales: int, path: GaussianPath | str = "linear", *, rho: float = 1.0,
                      t_min: float | None = None, t_end: float | None = None) -> Array:
    r"""The discretisation ``t_min = tau_0 < ... < tau_{N-1} = t_end`` (noise -> data).

    ``tau_i = t_end - (t_end - t_min) (1 - i/(N-1))^rho``: uniform for ``rho = 1``, denser near the data
    end for ``rho > 1`` (the role of EDM's ``rho = 7`` Karras grid, eq. 5 of Karras et al. 2022, which is
    exactly this grid in t on the ``edm`` schedule with ``rho = 1``).
    """
    path = as_path(path)
    t_min, t_end = _time_range(path, t_min, t_end)
    if int(num_scales) < 2:
        raise ValueError(f"num_scales must be >= 2 (at least one pair of neighbouring times), got {num_scales}.")
    i = jnp.arange(int(num_scales))
    return _grid_time(i, jnp.asarray(int(num_scales)), t_min, t_end, float(rho))


def _time_range(path: GaussianPath, t_min: float | None, t_end: float | None) -> tuple[float, float]:
    t_end = _end_time(path, t_end)
    t_min = path.schedule.t_min if t_min is None else float(t_min)
    if not path.schedule.t_min <= t_min < t_end:
        raise ValueError(f"need t_min in [{path.schedule.t_min:g}, t_end={t_end:g}), got t_min={t_min}.")
    return t_min, t_end


def ct_schedule(total_steps: int, *, s0: int = 2, s1: int = 150, mu0: float = 0.9
                ) -> tuple[Callable[[Array], Array], Callable[[Array], Array]]:
    r"""Consistency-training curriculum (Song et al. 2023, Appendix C, "adaptive" N and mu).

    .. math:: N(k) = \Big\lceil \sqrt{\tfrac{k}{K}\big((s_1 + 1)^2 - s_0^2\big) + s_0^2} - 1 \Big\rceil + 1, \qquad
       \mu(k) = \exp\big(s_0 \log \mu_0 / N(k)\big),

    so ``N`` grows from ``s0`` to ``s1 + 1`` over ``K = total_steps`` steps. Returns
    ``(num_scales(step), target_decay(step))``, to pass as ``num_scales=`` of the loss and
    ``ema_decay=`` of :class:`jaxgen.training.Trainer` (the EMA target's decay ``mu``).
    """
    if not (int(total_steps) >= 1 and 1 <= s0 <= s1 and 0.0 <= mu0 < 1.0):
        raise ValueError(f"ct_schedule needs total_steps >= 1, 1 <= s0 <= s1 and 0 <= mu0 < 1; got "
                         f"total_steps={total_steps}, s0={s0}, s1={s1}, mu0={mu0}.")
    K = float(total_steps)

    def num_scales(step):
        k = jnp.minimum(jnp.asarray(step, jnp.float32), K)
        n = jnp.ceil(jnp.sqrt(k / K * ((s1 + 1.0) ** 2 - s0**2) + s0**2) - 1.0) + 1.0
        return jnp.maximum(n, 2.0).astype(jnp.int32)

    def target_decay(step):
        return jnp.exp(s0 * math.log(mu0) / num_scales(step).astype(jnp.float32)) if mu0 > 0 else jnp.float32(0.0)

    return num_scales, target_decay


# ---------------------------------------------------------------------------------------------
# Losses.
# ---------------------------------------------------------------------------------------------


def _distance(name: str, huber_c: float | None) -> Callable[[Array, Array], Array]:
    if name == "l2":
        return lambda a, b: jnp.mean(jnp.reshape((a - b) ** 2, (a.shape[0], -1)), -1)
    if name == "l1":
        return lambda a, b: jnp.mean(jnp.reshape(jnp.abs(a - b), (a.shape[0], -1)), -1)
    if name == "pseudo_huber":
        def d(a, b):
            r2 = jnp.sum(jnp.reshape((a - b) ** 2, (a.shape[0], -1)), -1)
            c = huber_c if huber_c is not None else 0.00054 * math.sqrt(a[0].size)
            return jnp.sqrt(r2 + c * c) - c  # Song & Dhariwal 2023 (iCT), sec. 3.3
        return d
    raise ValueError(f"unknown distance {name!r}; use one of {DISTANCES}.")


def _num_scales_fn(num_scales):
    if callable(num_scales):
        return num_scales
    if int(num_scales) < 2:
        raise ValueError(f"num_scales must be >= 2 (or a function step -> N), got {num_scales}.")
    n = int(num_scales)
    return lambda step: jnp.asarray(n, jnp.int32)


def _consistency_loss(path, make_pair, *, num_scales, distance, huber_c, rho, t_min, t_end, weighting, target_eval):
    """The shared body: draw ``n``, ``eps``, form the pair, compare online and target."""
    t_min, t_end = _time_range(path, t_min, t_end)
    d = _distance(distance, huber_c)
    n_fn = _num_scales_fn(num_scales)
    rho = float(rho)
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho}.")

    def loss(model, batch, key, *, target=None, step=0):
        z, cond = split_batch(batch, owner="consistency loss")
        check_key(key, owner="the loss")
        b = z.shape[0]
        k_n, k_eps = jax.random.split(key)
        big_n = n_fn(step)
        n = jax.random.randint(k_n, (b,), 0, big_n - 1)  # n in {0, ..., N-2}
        t_n = _grid_time(n, big_n, t_min, t_end, rho).astype(z.dtype)
        t_next = _grid_time(n + 1, big_n, t_min, t_end, rho).astype(z.dtype)
        eps = jax.random.normal(k_eps, z.shape, z.dtype)
        x_n, x_next = make_pair(z, eps, t_n, t_next, cond)
        x_next = jax.lax.stop_gradient(x_next)
        if target is None:
            tgt_model = model
        else:
            tgt_model = target
            if target_eval:
                tgt_model.eval()  # no dropout in the target
        tgt = jax.lax.stop_gradient(tgt_model(x_next, t_next, **cond))
        out = model(x_n, t_n, **cond)
        per = d(out, tgt)
        if weighting is not None:
            per = weighting(t_n, t_next) * per
        return jnp.mean(per)

    return loss


def consistency_distillation_loss(
    path: GaussianPath | str,
    teacher_field: Callable,
    *,
    num_scales: int | Callable[[Array], Array] = 18,
    solver: str = "heun",
    distance: str = "l2",
    teacher_prediction: str = "velocity",
    rho: float = 1.0,
    t_min: float | None = None,
    t_end: float | None = None,
    weighting: Callable[[Array, Array], Array] | None = None,
    huber_c: float | None = None,
    target_eval: bool = False,
) -> Callable:
    r"""Consistency distillation (Song et al. 2023, Algorithm 2), in jaxgen time.

    Draw ``n ~ U{0..N-2}``, ``x_{tau_n} = alpha z + beta eps`` from data ``z``, and one teacher step of the
    probability-flow ODE ``dx/dt = u(x, t)`` from ``tau_n`` to ``tau_{n+1}`` (towards the data):
    Euler ``hat x = x + h u(x, tau_n)`` or Heun (explicit trapezoid ``hat x = x + h/2 (u(x, tau_n) +
    u(x + h u(x, tau_n), tau_{n+1}))``, the paper's choice). The loss is
    ``lambda(tau_n, tau_{n+1}) d(f_theta(x_{tau_n}, tau_n), stopgrad f_target(hat x_{tau_{n+1}}, tau_{n+1}))``.

    A ``data``-prediction teacher has no velocity at ``beta = 0`` (``u = d_alpha z + d_beta (x - alpha z) / beta``),
    so where ``beta(t_end) = 0`` (linear, cosine) the last interval ``tau_{n+1} = t_end`` takes the Euler
    step, as EDM's sampler (Karras et al. 2022, Algorithm 1) does when ``sigma_{i+1} = 0``; on the linear
    path that step is the denoiser's output ``D(x, tau_n)``. ``eps``/``score`` teachers need
    ``alpha(t_min) > 0`` (``z = (x - beta eps) / alpha``): pass ``t_min > 0`` on paths that start at ``alpha = 0``.

    Args:
      path: the Gaussian path of the teacher.
      teacher_field: the teacher ``field(x, t, **cond)``; a velocity unless ``teacher_prediction`` says
        otherwise (e.g. the oracle's ``gm.velocity_field(path)``, or a trained flow-matching model).
      num_scales: ``N`` (the paper uses 18 on CIFAR-10) or a function ``step -> N``.
      solver: ``"heun"`` (2 teacher NFE per step) or ``"euler"``.
      distance: ``"l2"`` (mean squared error per sample), ``"l1"`` or ``"pseudo_huber"``
        (``sqrt(||a - b||^2 + c^2) - c``, ``c = 0.00054 sqrt(d)`` unless ``huber_c``).
      rho: grid exponent of :func:`consistency_times`.
      t_min, t_end: the time range; default the schedule's domain.
      weighting: optional ``lambda(tau_n, tau_{n+1}) -> (B,)`` (default uniform, the paper's choice).
      target_eval: run the target in evaluation mode (``target.eval()``: no dropout). By default a network in
        training mode applies dropout in the target too, with the same masks as the online call (the trainer builds
        the target from the step's RNG state, as Song et al.'s reference code does by restoring the RNG state
        before the target call).

    Returns:
      ``loss(model, batch, key, *, target=None, step=0)``: :class:`jaxgen.training.Trainer` passes the EMA target
      ``theta^-`` (``ema_decay`` is the paper's ``mu``) and the step; ``target=None`` (no EMA: ``mu = 0``) uses
      ``stopgrad(model)``.
    """
    path = as_path(path)
    solver = str(solver).lower()
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; use one of {SOLVERS}.")
    if not callable(teacher_field):
        raise ValueError("teacher_field must be a field teacher(x, t, **cond) (e.g. gm.velocity_field(path)).")
    teacher_prediction = canonical_prediction(teacher_prediction)
    teacher = as_field(path, teacher_field, source=teacher_prediction, target="velocity")
    lo, hi = _time_range(path, t_min, t_end)
    if teacher_prediction in ("eps", "score"):
        check_data_identifiable(path, teacher_prediction, lo, what="the teacher", where="t_min", min_alpha=0.0,
                                fix="pass t_min > 0 (e.g. t_min=1e-3), or a 'velocity', 'data' or 'v' teacher")
    with jax.ensure_compile_time_eval():
        beta_end = float(path.coefficients(jnp.asarray(hi, jnp.float32)).beta)
    final_euler = teacher_prediction == "data" and not beta_end > 0

    def make_pair(z, eps, t_n, t_next, cond):
        x_n = path.sample(z, eps, t_n)
        h = expand_like(t_next - t_n, z)
        f = lambda x, t: teacher(x, t, **cond)
        k1 = f(x_n, t_n)
        x_euler = x_n + h * k1
        if solver == "euler":
            return x_n, x_euler
        x_heun = heun_step(f, x_n, t_n, t_next, h=h, k1=k1)
        if final_euler:  # the teacher's velocity is singular at t_end (beta = 0): Euler on the last interval
            x_heun = jnp.where(expand_like(t_next >= hi, z), x_euler, x_heun)
        return x_n, x_heun

    return _consistency_loss(path, make_pair, num_scales=num_scales, distance=distance, huber_c=huber_c,
                             rho=rho, t_min=t_min, t_end=t_end, weighting=weighting, target_eval=target_eval)


def consistency_training_loss(
    path: GaussianPath | str,
    *,
    num_scales: int | Callable[[Array], Array] = 18,
    distance: str = "l2",
    rho: float = 1.0,
    t_min: float | None = None,
    t_end: float | None = None,
    weighting: Callable[[Array, Array], Array] | None = None,
    huber_c: float | None = None,
    target_eval: bool = False,
) -> Callable:
    r"""Consistency training without a teacher (Song et al. 2023, Algorithm 3), in jaxgen time.

    Both points of the pair lie on the *conditional* path of the same ``(z, eps)``:
    ``x_{tau_n} = alpha_{tau_n} z + beta_{tau_n} eps`` and ``x_{tau_{n+1}} = alpha_{tau_{n+1}} z + beta_{tau_{n+1}} eps``.
    The second is the exact solution of the conditional ODE ``dx/dt = u_t(x | z)`` started at the first,
    which replaces the teacher step by the unbiased one-sample estimate of the marginal velocity
    (the paper's consistency-training estimator). Use ``num_scales=ct_schedule(K)[0]`` for the growing-``N`` curriculum.
    Other arguments as :func:`consistency_distillation_loss`.

    Returns:
      ``loss(model, batch, key, *, target=None, step=0)``: :class:`jaxgen.training.Trainer` passes the EMA target
      ``theta^-`` (``ema_decay`` is the paper's ``mu``) and the step; ``target=None`` (no EMA: ``mu = 0``) uses
      ``stopgrad(model)``.
    """
    path = as_path(path)

    def make_pair(z, eps, t_n, t_next, cond):
        return path.sample(z, eps, t_n), path.sample(z, eps, t_next)

    return _consistency_loss(path, make_pair, num_scales=num_scales, distance=distance, huber_c=huber_c,
                             rho=rho, t_min=t_min, t_end=t_end, weighting=weighting, target_eval=target_eval)


__all__ = ["consistency_times", "ct_schedule", "consistency_distillation_loss", "consistency_training_loss", "SOLVERS",
           "DISTANCES"]
