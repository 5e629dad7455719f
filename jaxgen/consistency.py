r"""Consistency models (Song, Dhariwal, Chen & Sutskever 2023, "Consistency Models", ICML).

A consistency function maps every point of a probability-flow ODE trajectory to the trajectory's
point at the data end. In jaxgen's time (t = 0 noise, t = 1 data) it is defined on
``[t_min, t_end]`` with the boundary condition ``f(x, t_end) = x`` (the paper's ``f(x, eps) = x``;
``t_end`` is the path's ``t_max``, i.e. 1 for linear/cosine, ``1 - 1e-5`` for VP), and one network
call ``f(x_{t_min}, t_min)`` turns noise into a sample.

Parameterisation (the paper's skip parameterisation, sec. 3 and Appendix C; EDM, Karras et al. 2022, Table 1): with
``x_t = alpha_t z + beta_t eps`` the rescaled ``x_t / alpha_t = z + sigma_t eps`` is an EDM variable
of noise level ``sigma_t = beta_t / alpha_t``. Writing the paper's

.. math:: f = c_{skip}(\sigma) \frac{x}{\alpha_t} + c_{out}(\sigma) F_\theta, \quad
   c_{skip} = \frac{\sigma_d^2}{(\sigma - \sigma_e)^2 + \sigma_d^2}, \quad
   c_{out} = \frac{(\sigma - \sigma_e)\sigma_d}{\sqrt{\sigma^2 + \sigma_d^2}}, \quad
   c_{in} = \frac{1}{\sqrt{\sigma^2 + \sigma_d^2}}

in ``x`` units at the data end (times ``alpha_e``) and multiplying through by ``alpha_t`` gives
formulas without any division by ``alpha_t`` (zero at t = 0), with
``b_t = (beta_t alpha_e - alpha_t beta_e) / alpha_e = alpha_t (sigma_t - sigma_e)``:

.. math:: f_\theta(x, t) = c_{skip}(t)\, x + c_{out}(t)\, F_\theta(c_{in}(t)\, x, t), \qquad
   c_{skip} = \frac{\alpha_e \alpha_t \sigma_d^2}{\alpha_t^2 \sigma_d^2 + b_t^2}, \quad
   c_{out} = \frac{\alpha_e b_t \sigma_d}{\sqrt{\alpha_t^2 \sigma_d^2 + \beta_t^2}}, \quad
   c_{in} = \frac{1}{\sqrt{\alpha_t^2 \sigma_d^2 + \beta_t^2}}.

``b_t = 0`` at ``t_end``, so ``c_skip = 1`` and ``c_out = 0`` there: the boundary condition holds
exactly (also enforced with a ``where`` for schedules whose coefficients are clamped). For the
linear path (``alpha = t``, ``beta = 1 - t``, ``t_end = 1``) this is
``c_skip = t sd^2 / (t^2 sd^2 + (1-t)^2)``, ``c_out = (1-t) sd / sqrt(t^2 sd^2 + (1-t)^2)``: at t = 0
the output is ``sd * F`` (pure network), at t = 1 it is ``x``. ``parameterization="denoiser"`` instead
decodes a trained prediction field (``f = alpha_e z_hat + beta_e eps_hat``; see :class:`ConsistencyFunction`),
so a flow-matching teacher's network is a sensible initial student.

Training (the paper's Algorithms 2 and 3) compares the online network at the *noisier* of two
neighbouring times ``tau_n < tau_{n+1}`` with a target network (an EMA ``theta^-`` of the online
weights, with ``stopgrad``) at the *less noisy* one, which is closer to the boundary that anchors it:

.. math:: \mathcal L = \mathbb E\, \lambda\, d\big(f_\theta(x_{\tau_n}, \tau_n),\ f_{\theta^-}(\hat x_{\tau_{n+1}}, \tau_{n+1})\big).

* distillation (CD): ``x_{tau_n} = alpha z + beta eps`` from data, ``hat x_{tau_{n+1}}`` one
  teacher ODE step (Euler or Heun) towards the data end;
* training (CT): ``hat x_{tau_{n+1}} = alpha_{tau_{n+1}} z + beta_{tau_{n+1}} eps`` with the same
  ``eps`` (the exact solution of the conditional ODE: the paper's unbiased CT estimator, sec. 5).

The EMA target does not fit jaxgen's ``loss(model, batch, key)``: consistency losses here have the
signature ``loss(model, target, batch, key, step=0)`` and :class:`ConsistencyTrainer` (a
:class:`jaxgen.train.Trainer` whose ``TrainState.ema_params`` *is* ``theta^-``) trains them. With
``target=None`` the online network under ``stopgrad`` is the target (``mu = 0``, as the improved
recipe of Song & Dhariwal 2023 recommends); :func:`online_target` then makes a plain
``loss(model, batch, key)`` for the ordinary :class:`~jaxgen.train.Trainer`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxgen._checks import batch_time, expand_like, safe_divide
from jaxgen.fields import as_field, canonical_prediction, to_data_and_noise
from jaxgen.losses import split_batch
from jaxgen.paths.gaussian import GaussianPath, as_path
from jaxgen.samplers.ode import SampleResult
from jaxgen.train import Trainer, TrainState, ema_update

Array = jax.Array

SOLVERS = ("euler", "heun")
DISTANCES = ("l2", "l1", "pseudo_huber")
PARAMETERIZATIONS = ("edm", "denoiser")


# ---------------------------------------------------------------------------------------------
# The parameterisation.
# ---------------------------------------------------------------------------------------------


def _end_time(path: GaussianPath, t_end: float | None) -> float:
    s = path.schedule
    t_end = s.t_max if t_end is None else float(t_end)
    if not s.t_min < t_end <= s.t_max:
        raise ValueError(f"t_end must lie in (t_min, t_max] = ({s.t_min:g}, {s.t_max:g}] of the '{path.name}' "
                         f"schedule (the data end of the consistency function), got {t_end}.")
    with jax.ensure_compile_time_eval():
        a_e = float(path.coefficients(jnp.asarray(t_end, jnp.float32)).alpha)
    if not a_e > 0:
        raise ValueError(f"alpha at t_end={t_end} is {a_e}; the data end of a consistency function needs alpha > 0.")
    return t_end


def consistency_coefficients(path: GaussianPath | str, t: Array, *, sigma_data: float = 0.5,
                             t_end: float | None = None) -> tuple[Array, Array, Array]:
    r"""``(c_skip, c_out, c_in)`` at times ``t`` (Song et al. 2023, Appendix C, mapped to jaxgen time).

    See the module docstring: ``c_skip = alpha_e alpha_t sd^2 / (alpha_t^2 sd^2 + b_t^2)``,
    ``c_out = alpha_e b_t sd / sqrt(alpha_t^2 sd^2 + beta_t^2)``, ``c_in = 1 / sqrt(alpha_t^2 sd^2 + beta_t^2)``
    with ``b_t = (beta_t alpha_e - alpha_t beta_e) / alpha_e``. ``c_skip(t_end) = 1`` and ``c_out(t_end) = 0``
    exactly, and nothing divides by ``alpha_t`` or ``beta_t``.
    """
    path = as_path(path)
    if not sigma_data > 0:
        raise ValueError(f"sigma_data (the data's standard deviation per coordinate) must be > 0, got {sigma_data}.")
    t_end = _end_time(path, t_end)
    t = jnp.asarray(t)
    t = t.astype(t.dtype if jnp.issubdtype(t.dtype, jnp.floating) else jnp.float32)
    a, b, _, _ = path.coefficients(t)
    end = path.coefficients(jnp.asarray(t_end, t.dtype))
    a_e, b_e = end.alpha, end.beta
    sd2 = jnp.asarray(sigma_data**2, t.dtype)
    bt = (b * a_e - a * b_e) / a_e
    var = a * a * sd2 + b * b  # alpha_t^2 sd^2 + beta_t^2 > 0 for a valid schedule
    c_skip = safe_divide(a_e * (a * sd2), a * (a * sd2) + bt * bt, floor=1e-20)
    c_out = a_e * bt * sigma_data * jax.lax.rsqrt(jnp.maximum(var, 1e-20))
    c_in = jax.lax.rsqrt(jnp.maximum(var, 1e-20))
    at_end = t >= t_end
    return jnp.where(at_end, 1.0, c_skip), jnp.where(at_end, 0.0, c_out), c_in


class ConsistencyFunction(nnx.Module):
    r"""``f_theta(x, t) = c_skip(t) x + c_out(t) F_theta(c_in(t) x, t)`` around any NNX network.

    Args:
      network: an ``nnx.Module`` (or callable) ``network(x, t, **cond)`` returning an array like ``x``
        (e.g. :class:`jaxgen.models.MLPField`); it receives jaxgen's time ``t`` in ``[0, 1]``.
      path: the Gaussian path (or schedule name) whose probability-flow ODE the model is consistent with.
      sigma_data: standard deviation of the data per coordinate (EDM's ``sigma_d``; 0.5 for images in [-1, 1]).
      t_end: the data end, where ``f(x, t_end) = x`` exactly; default the schedule's ``t_max``.
      scale_input: feed ``c_in(t) x`` (unit variance at every ``t``) to the network instead of ``x``
        (``"edm"`` parameterisation only).
      parameterization: ``"edm"`` (default): the skip parameterisation above. ``"denoiser"``: the network
        is a ``prediction``-type field of the path (e.g. a trained flow-matching teacher) fed the raw ``x``,
        decoded into ``(z_hat, eps_hat)`` with ``x = alpha_t z_hat + beta_t eps_hat``
        (:func:`jaxgen.fields.to_data_and_noise`) and re-encoded at the data end,
        ``f(x, t) = alpha_e z_hat + beta_e eps_hat`` (``= z_hat``, the posterior-mean estimate, when
        ``beta_e = 0``; on the linear path with a velocity network ``f = x + (1 - t) u(x, t)``, the
        network's one-step Euler jump). ``f(x, t_end) = x`` is enforced exactly with a ``where``.
      prediction: what the network predicts in the ``"denoiser"`` parameterisation (``velocity``, ``data``,
        ``eps``, ``score`` or ``v``); ignored by ``"edm"``.

    Call it as ``f(x, t, **cond)`` with ``t`` of shape ``(B,)`` (or a scalar). The parameters are the
    network's, so :class:`ConsistencyTrainer` and :class:`jaxgen.train.Trainer` can train it.
    """

    def __init__(self, network: Callable, path: GaussianPath | str, *, sigma_data: float = 0.5,
                 t_end: float | None = None, scale_input: bool = True, parameterization: str = "edm",
                 prediction: str = "velocity"):
        self.network = network
        self.path = as_path(path)
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}.")
        self.sigma_data = float(sigma_data)
        self.t_end = _end_time(self.path, t_end)
        self.t_min = float(self.path.schedule.t_min)
        self.scale_input = bool(scale_input)
        parameterization = str(parameterization).lower()
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"unknown parameterization {parameterization!r}; use one of {PARAMETERIZATIONS} "
                             "('edm': Song et al.'s skip parameterisation, 'denoiser': decode a prediction field).")
        self.parameterization = parameterization
        self.prediction = canonical_prediction(prediction)
        if parameterization == "denoiser" and self.prediction in ("eps", "score"):
            _check_data_recoverable(self.path, self.t_min, self.prediction, "the denoiser parameterization",
                                    "use a 'velocity', 'data' or 'v' network, or the 'edm' parameterization")

    def coefficients(self, t: Array) -> tuple[Array, Array, Array]:
        """``(c_skip, c_out, c_in)`` at ``t`` (see :func:`consistency_coefficients`)."""
        return consistency_coefficients(self.path, t, sigma_data=self.sigma_data, t_end=self.t_end)

    def __call__(self, x: Array, t: Array, **cond) -> Array:
        t = batch_time(t, x)
        if self.parameterization == "denoiser":
            out = self._network(x, t, cond)
            z_hat, eps_hat = to_data_and_noise(self.path, out, x, t, self.prediction)
            end = self.path.coefficients(jnp.asarray(self.t_end, t.dtype))
            f = end.alpha.astype(x.dtype) * z_hat + end.beta.astype(x.dtype) * eps_hat
            return jnp.where(expand_like(t >= self.t_end, x), x, f)
        c_skip, c_out, c_in = (expand_like(c.astype(x.dtype), x) for c in self.coefficients(t))
        out = self._network(c_in * x if self.scale_input else x, t, cond)
        return c_skip * x + c_out * out

    def _network(self, x: Array, t: Array, cond: dict) -> Array:
        out = self.network(x, t, **cond)
        if getattr(out, "shape", None) != x.shape:
            raise ValueError(f"the network returned shape {getattr(out, 'shape', None)} for x of shape "
                             f"{tuple(x.shape)}; a consistency network must return an array like x.")
        return out


def _check_data_recoverable(path: GaussianPath, t_min: float, prediction: str, what: str, fix: str) -> None:
    """Refuse ``alpha(t_min) = 0`` for an ``eps``/``score`` prediction (``z = (x - beta_t eps) / alpha_t``)."""
    with jax.ensure_compile_time_eval():
        a0 = float(path.coefficients(jnp.asarray(t_min, jnp.float32)).alpha)
    if not a0 > 0:
        raise ValueError(f"{what} decodes an {prediction!r} prediction through (x - beta_t eps) / alpha_t, but "
                         f"alpha = 0 at t_min={t_min:g} on the '{path.name}' path (a division by zero): {fix}.")


def consistency_fn(network: Callable, path: GaussianPath | str, **kwargs) -> ConsistencyFunction:
    """Functional alias of :class:`ConsistencyFunction` (same arguments)."""
    return ConsistencyFunction(network, path, **kwargs)


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
    ``target_decay=`` of :class:`ConsistencyTrainer`.
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


def _consistency_loss(path, make_pair, *, num_scales, distance, huber_c, rho, t_min, t_end, weighting):
    """The shared body: draw ``n``, ``eps``, form the pair, compare online and target."""
    t_min, t_end = _time_range(path, t_min, t_end)
    d = _distance(distance, huber_c)
    n_fn = _num_scales_fn(num_scales)
    rho = float(rho)
    if not rho > 0:
        raise ValueError(f"rho must be > 0, got {rho}.")

    def loss(model, target, batch, key, step=0):
        z, cond = split_batch(batch)
        b = z.shape[0]
        k_n, k_eps = jax.random.split(key)
        big_n = n_fn(step)
        n = jax.random.randint(k_n, (b,), 0, big_n - 1)  # n in {0, ..., N-2}
        t_n = _grid_time(n, big_n, t_min, t_end, rho).astype(z.dtype)
        t_next = _grid_time(n + 1, big_n, t_min, t_end, rho).astype(z.dtype)
        eps = jax.random.normal(k_eps, z.shape, z.dtype)
        x_n, x_next = make_pair(z, eps, t_n, t_next, cond)
        x_next = jax.lax.stop_gradient(x_next)
        tgt_model = model if target is None else target
        tgt = jax.lax.stop_gradient(tgt_model(x_next, t_next, **cond))
        out = model(x_n, t_n, **cond)
        per = d(out, tgt)
        if weighting is not None:
            per = weighting(t_n, t_next) * per
        return jnp.mean(per)

    loss.step_dependent = callable(num_scales)  # read by online_target
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

    Returns:
      ``loss(model, target, batch, key, step=0)``; ``target=None`` uses ``stopgrad(model)``.
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
        _check_data_recoverable(path, lo, teacher_prediction, "the teacher",
                                "pass t_min > 0 (e.g. t_min=1e-3), or a 'velocity', 'data' or 'v' teacher")
    with jax.ensure_compile_time_eval():
        beta_end = float(path.coefficients(jnp.asarray(hi, jnp.float32)).beta)
    final_euler = teacher_prediction == "data" and not beta_end > 0

    def make_pair(z, eps, t_n, t_next, cond):
        x_n = path.sample(z, eps, t_n)
        h = expand_like(t_next - t_n, z)
        k1 = teacher(x_n, t_n, **cond)
        x_euler = x_n + h * k1
        if solver == "euler":
            return x_n, x_euler
        x_heun = x_n + 0.5 * h * (k1 + teacher(x_euler, t_next, **cond))
        if final_euler:  # the teacher's velocity is singular at t_end (beta = 0): Euler on the last interval
            x_heun = jnp.where(expand_like(t_next >= hi, z), x_euler, x_heun)
        return x_n, x_heun

    return _consistency_loss(path, make_pair, num_scales=num_scales, distance=distance, huber_c=huber_c,
                             rho=rho, t_min=t_min, t_end=t_end, weighting=weighting)


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
) -> Callable:
    r"""Consistency training without a teacher (Song et al. 2023, Algorithm 3), in jaxgen time.

    Both points of the pair lie on the *conditional* path of the same ``(z, eps)``:
    ``x_{tau_n} = alpha_{tau_n} z + beta_{tau_n} eps`` and ``x_{tau_{n+1}} = alpha_{tau_{n+1}} z + beta_{tau_{n+1}} eps``.
    The second is the exact solution of the conditional ODE ``dx/dt = u_t(x | z)`` started at the first,
    which replaces the teacher step by the unbiased one-sample estimate of the marginal velocity
    (the paper's consistency-training estimator). Use ``num_scales=ct_schedule(K)[0]`` for the growing-``N`` curriculum.

    Returns:
      ``loss(model, target, batch, key, step=0)``; ``target=None`` uses ``stopgrad(model)``.
    """
    path = as_path(path)

    def make_pair(z, eps, t_n, t_next, cond):
        return path.sample(z, eps, t_n), path.sample(z, eps, t_next)

    return _consistency_loss(path, make_pair, num_scales=num_scales, distance=distance, huber_c=huber_c,
                             rho=rho, t_min=t_min, t_end=t_end, weighting=weighting)


def online_target(loss: Callable) -> Callable[[Any, Any, Array], Array]:
    """``loss(model, batch, key)`` with the target ``stopgrad(model)`` (``mu = 0``), for :class:`jaxgen.train.Trainer`.

    A fixed ``num_scales`` is required: the plain trainer does not pass the step (a schedule such as
    ``ct_schedule(K)[0]`` would stay at ``N(0)``; use :class:`ConsistencyTrainer` with ``target_decay=0.0``).
    """
    if getattr(loss, "step_dependent", False):
        raise ValueError("online_target needs a loss with a fixed num_scales: the plain Trainer does not pass the "
                         "training step, so a schedule num_scales=f(step) would stay at f(0). Train it with "
                         "ConsistencyTrainer(model, loss, optimizer, target_decay=0.0) instead.")
    return lambda model, batch, key: loss(model, None, batch, key)


# ---------------------------------------------------------------------------------------------
# Training with an EMA target.
# ---------------------------------------------------------------------------------------------


class ConsistencyTrainer(Trainer):
    r"""A :class:`jaxgen.train.Trainer` for consistency losses with an EMA target network ``theta^-``.

    ``TrainState.ema_params`` holds ``theta^-``; each step evaluates
    ``loss_fn(online_model, target_model, batch, key, step=state.step)``, takes the optimizer step on
    the online parameters, then sets ``theta^- <- mu theta^- + (1 - mu) theta`` with the *new* online
    parameters (paper Algorithms 2-3). ``fit``, ``steps`` (fused ``lax.scan``), the NaN guard and
    ``model(state)`` / ``model(state, ema=True)`` (online / target) are the base class's.

    Args:
      model: the :class:`ConsistencyFunction` (or any NNX field) to train.
      loss_fn: a consistency loss ``loss(model, target, batch, key, step=0)``.
      optimizer: an optax transformation.
      data: ``data(key) -> batch`` sampled inside the compiled step.
      target_decay: ``mu``, a float in ``[0, 1)`` or a function ``step -> mu`` (e.g. from :func:`ct_schedule`).
        ``mu = 0`` makes the target the current online weights.
      fuse_steps: as for :class:`~jaxgen.train.Trainer`.
      target_eval: run the target in evaluation mode (``target.eval()``: no dropout). By default a network
        in training mode applies dropout in the target too, with the same masks as the online call (both
        start from the step's RNG state, as Song et al.'s reference code, openai/consistency_models, does
        by restoring the RNG state before the target call).
    """

    def __init__(self, model: nnx.Module, loss_fn: Callable, optimizer: optax.GradientTransformation, *,
                 data: Callable[[Array], Any] | None = None,
                 target_decay: float | Callable[[Array], Array] = 0.95, fuse_steps: bool = True,
                 target_eval: bool = False):
        if not callable(target_decay) and not 0.0 <= float(target_decay) < 1.0:
            raise ValueError(f"target_decay must be in [0, 1) or a function step -> decay, got {target_decay}.")
        self.target_decay = target_decay
        self.target_eval = bool(target_eval)
        super().__init__(model, loss_fn, optimizer, data=data,
                         ema_decay=0.0 if callable(target_decay) else float(target_decay),
                         ema_warmup=False, fuse_steps=fuse_steps)

    def _step(self, state: TrainState, batch: Any = None) -> tuple[TrainState, Array]:
        batch, k_loss = self._batch_and_loss_key(state, batch)
        ema_params = jax.lax.stop_gradient(state.ema_params)

        def loss(params, rest):
            model = nnx.merge(self.graphdef, params, rest)
            # Built at this trace level (not outside the grad): a stateful network (dropout RNG counters)
            # may only be mutated where it was traced. Its own copy of `rest`: the online call's masks.
            target = nnx.merge(self.graphdef, ema_params, jax.tree.map(lambda v: v, rest))
            if self.target_eval:
                target.eval()
            value = self.loss_fn(model, target, batch, k_loss, step=state.step).astype(jnp.float32)
            return value, nnx.split(model, nnx.Param, ...)[2]

        (value, rest), (grads, _) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True, allow_int=True)(
            state.params, state.rest)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        mu = self.target_decay(state.step) if callable(self.target_decay) else self.target_decay
        ema = ema_update(state.ema_params, params, mu)
        return TrainState(state.step + 1, params, rest, opt_state, ema, state.key), value

    def target_model(self, state: TrainState) -> nnx.Module:
        """The target network ``theta^-`` (the same as ``model(state, ema=True)``)."""
        return self.model(state, ema=True)


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
