r"""Consistency models (Song, Dhariwal, Chen & Sutskever 2023, "Consistency Models", ICML).

A consistency function maps every point of a probability-flow ODE trajectory to the trajectory's
point at the data end. In jaxgen's time (t = 0 noise, t = 1 data) it is defined on
``[t_min, t_end]`` with the boundary condition ``f(x, t_end) = x`` (the paper's ``f(x, eps) = x``;
``t_end`` is the path's ``t_max``, i.e. 1 for linear/cosine, ``1 - 1e-5`` for VP), and one network
call ``f(x_{t_min}, t_min)`` turns noise into a sample.

Parameterisation: the paper's skip parameterisation (sec. 3 and Appendix C; EDM, Karras et al. 2022, Table 1),
``f_theta(x, t) = c_skip(t) x + c_out(t) F_theta(c_in(t) x, t)``, written in jaxgen time without any division by
``alpha_t`` (:func:`jaxgen.fields.consistency_coefficients`, whose docstring derives it). ``c_skip = 1`` and
``c_out = 0`` at ``t_end``, so the boundary condition holds exactly (also enforced with a ``where`` for schedules
whose coefficients are clamped). For the linear path (``alpha = t``, ``beta = 1 - t``, ``t_end = 1``) this is
``c_skip = t sd^2 / (t^2 sd^2 + (1-t)^2)``, ``c_out = (1-t) sd / sqrt(t^2 sd^2 + (1-t)^2)``: at t = 0
the output is ``sd * F`` (pure network), at t = 1 it is ``x``. ``parameterization="denoiser"`` instead
decodes a trained prediction field (``f = alpha_e z_hat + beta_e eps_hat``; see :class:`ConsistencyFunction`),
so a flow-matching teacher's network is a sensible initial student.

Training (the paper's Algorithms 2 and 3; :mod:`jaxgen.losses.consistency`) compares the online network with an
EMA target ``theta^-``: :class:`jaxgen.training.Trainer` keeps the EMA (``ema_decay`` is the paper's ``mu``, a float
or a schedule ``step -> mu``) and passes it to the loss as ``target``; without EMA the online network under
``stopgrad`` is the target (``mu = 0``, as the improved recipe of Song & Dhariwal 2023 recommends).

``parameterization="trigflow"`` is the TrigFlow consistency function of continuous-time consistency models (sCM, Lu &
Song 2025, sec. 3, mapped onto jaxgen's ``cosine`` path: :mod:`jaxgen.losses.scm`), trained by
:func:`jaxgen.losses.scm_loss`; :class:`LogVariance` is the optional learned adaptive weighting ``w_phi(t)`` of its
loss.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgen._checks import batch_time, expand_like
from jaxgen.fields import canonical_prediction, to_data_and_noise
from jaxgen.fields.algebra import check_data_identifiable
from jaxgen.fields.preconditioning import _end_time, consistency_coefficients
from jaxgen.paths.gaussian import GaussianPath, as_path

Array = jax.Array

PARAMETERIZATIONS = ("edm", "denoiser", "trigflow")


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
        ``"trigflow"``: the consistency function of sCM (Lu & Song 2025, sec. 3) on the ``cosine`` path (the only
        path it accepts; ``t_end = 1``), whose network is a velocity field ``u(x, t)`` of that path (see below).
      prediction: what the network predicts in the ``"denoiser"`` parameterisation (``velocity``, ``data``,
        ``eps``, ``score`` or ``v``); ignored by ``"edm"`` and ``"trigflow"`` (a velocity network).
      logvar: optional network ``logvar(t) -> (B,)`` of jaxgen time (e.g. :class:`LogVariance`): the learned
        log-variance ``w_phi(t)`` of sCM's adaptive loss weighting, trained jointly by
        :func:`jaxgen.losses.scm_loss` (which weighs uniformly without it). Not used by the consistency function itself.

    The ``"trigflow"`` parameterisation. TrigFlow (Lu & Song 2025, sec. 3) diffuses ``x_s = cos(s) x_0 + sin(s)
    sigma_d z`` for ``s in [0, pi/2]`` (``s = 0`` data); on the scaled state ``x = x_s / sigma_d`` this is jaxgen's
    ``cosine`` path ``x_t = sin(pi t/2) (x_0 / sigma_d) + cos(pi t/2) z`` at ``t = 1 - 2 s / pi``, so the model works on
    data divided by ``sigma_d`` (prior ``N(0, I)``; multiply its samples by ``sigma_d``). The paper's network ``F`` and
    its probability-flow ODE ``dx/ds = F(x, s)`` are, in jaxgen time, the velocity ``u(x, t) = -(pi/2) F``, and the
    paper's consistency function ``f = cos(s) x - sin(s) F`` (sec. 3, in scaled units) reads

    .. math:: f_\theta(x, t) = \sin(\tfrac{\pi t}{2})\, x + \tfrac{2}{\pi} \cos(\tfrac{\pi t}{2})\, u_\theta(x, t)
       = \alpha_t x + \tfrac{2}{\pi} \beta_t u_\theta(x, t),

    exactly ``x`` at ``t = 1`` (``beta_1 = 0``, also enforced with a ``where``). A consistency model is the
    jump-to-the-data-end special case of a flow map: ``(f(x, t) - x) / (1 - t)`` is the average velocity ``u(x, t, 1)``
    of the flow map from ``t`` to ``1`` (:mod:`jaxgen.losses.flow_map`), so ``f = x + (1 - t) u(x, t, 1)``. With the
    exact marginal velocity of the path as ``u`` (a flow-matching teacher) ``f = alpha_t x + beta_t (2/pi) u`` is the
    posterior mean ``E[z | x_t = x]`` (the ``"denoiser"`` parameterisation's output), not the ODE's jump: the network
    of a trained sCM is not the diffusion velocity, only initialised from it in the paper.

    Call it as ``f(x, t, **cond)`` with ``t`` of shape ``(B,)`` (or a scalar). The parameters are the
    network's, so :class:`jaxgen.training.Trainer` can train it.
    """

    def __init__(self, network: Callable, path: GaussianPath | str, *, sigma_data: float = 0.5,
                 t_end: float | None = None, scale_input: bool = True, parameterization: str = "edm",
                 prediction: str = "velocity", logvar: Callable | None = None):
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
                             "('edm': Song et al.'s skip parameterisation, 'denoiser': decode a prediction field, "
                             "'trigflow': sCM's TrigFlow consistency function on the cosine path).")
        if parameterization == "trigflow":
            _check_trigflow_path(self.path, self.t_end)
        self.parameterization = parameterization
        if logvar is not None and not callable(logvar):
            raise ValueError(f"logvar must be a network logvar(t) -> (B,) (e.g. LogVariance(rngs=...)) or None, got "
                             f"{type(logvar).__name__}.")
        self.logvar = logvar
        self.prediction = canonical_prediction(prediction)
        if parameterization == "denoiser" and self.prediction in ("eps", "score"):
            check_data_identifiable(self.path, self.prediction, self.t_min, what="the denoiser parameterization",
                                    where="t_min", min_alpha=0.0,
                                    fix="use a 'velocity', 'data' or 'v' network, or the 'edm' parameterization")

    def coefficients(self, t: Array) -> tuple[Array, Array, Array]:
        """``(c_skip, c_out, c_in)`` at ``t`` (see :func:`consistency_coefficients`)."""
        return consistency_coefficients(self.path, t, sigma_data=self.sigma_data, t_end=self.t_end)

    def __call__(self, x: Array, t: Array, **cond) -> Array:
        t = batch_time(t, x)
        if self.parameterization == "trigflow":  # f = alpha_t x + (2/pi) beta_t u(x, t) (class docstring)
            c = self.path.coefficients(t)
            a, b = (expand_like(v.astype(x.dtype), x) for v in (c.alpha, c.beta))
            f = a * x + (2.0 / math.pi) * b * self._network(x, t, cond)
            return jnp.where(expand_like(t >= self.t_end, x), x, f)
        if self.parameterization == "denoiser":
            out = self._network(x, t, cond)
            z_hat, eps_hat = to_data_and_noise(self.path, out, x, t, self.prediction)
            end = self.path.coefficients(jnp.asarray(self.t_end, t.dtype))
            f = end.alpha.astype(x.dtype) * z_hat + end.beta.astype(x.dtype) * eps_hat
            return jnp.where(expand_like(t >= self.t_end, x), x, f)
        c_skip, c_out, c_in = (expand_like(c.astype(x.dtype), x) for c in self.coefficients(t))
        out = self._network(c_in * x if self.scale_input else x, t, cond)
        return c_skip * x + c_out * out

    def velocity(self, x: Array, t: Array, **cond) -> Array:
        """The network's velocity ``u_theta(x, t)`` of the ``cosine`` path, ``-(pi/2)`` times the paper's TrigFlow
        network ``F_theta`` (``"trigflow"`` parameterisation only): what :func:`jaxgen.losses.scm_loss`
        differentiates."""
        if self.parameterization != "trigflow":
            raise ValueError(f"velocity() is the network of the 'trigflow' parameterization; this consistency function "
                             f"is {self.parameterization!r}. Build ConsistencyFunction(net, 'cosine', "
                             "parameterization='trigflow') for scm_loss.")
        return self._network(x, batch_time(t, x), cond)

    def _network(self, x: Array, t: Array, cond: dict) -> Array:
        out = self.network(x, t, **cond)
        if getattr(out, "shape", None) != x.shape:
            raise ValueError(f"the network returned shape {getattr(out, 'shape', None)} for x of shape "
                             f"{tuple(x.shape)}; a consistency network must return an array like x.")
        return out


def _check_trigflow_path(path: GaussianPath, t_end: float) -> None:
    """TrigFlow is the cosine path (``alpha = sin(pi t/2)``, ``beta = cos(pi t/2)``) on ``[0, 1]``, data end 1."""
    if not path.same_as(GaussianPath.from_name("cosine")):
        raise ValueError(f"the 'trigflow' parameterization is defined on the 'cosine' path (TrigFlow's x_s = cos(s) "
                         f"x_0 + sin(s) sigma_d z is the cosine path at t = 1 - 2s/pi on data / sigma_d); got the "
                         f"{path.name!r} path. Use ConsistencyFunction(net, 'cosine', parameterization='trigflow').")
    if t_end != 1.0:
        raise ValueError(f"the 'trigflow' parameterization jumps to the data end t = 1 (s = 0); got t_end={t_end}.")


class LogVariance(nnx.Module):
    r"""The adaptive weighting ``w_phi(t)`` of sCM (Lu & Song 2025, sec. 4 and Algorithm 1; EDM2's learned
    uncertainty, Karras et al. 2024): a linear layer on the Fourier features ``cos(k pi t), sin(k pi t)``,
    ``k = 1..harmonics``, of jaxgen time, initialised to zero (uniform weighting at the start). Call ``w(t)`` with ``t``
    of shape ``(B,)``; returns ``(B,)``. :func:`jaxgen.losses.scm_loss` minimises ``exp(-w) ||.||^2 / D + w`` over it,
    so ``w(t)`` learns the log of the expected per-dimension loss at ``t`` (the paper writes ``e^{w} ||.||^2 / D - w``:
    the same with ``w -> -w``)."""

    def __init__(self, harmonics: int = 8, *, rngs: nnx.Rngs):
        if isinstance(harmonics, bool) or not isinstance(harmonics, int) or harmonics < 1:
            raise ValueError(f"LogVariance harmonics must be a positive integer, got {harmonics!r}.")
        self.harmonics = harmonics
        self.linear = nnx.Linear(2 * harmonics, 1, kernel_init=nnx.initializers.zeros_init(), rngs=rngs)

    def __call__(self, t: Array) -> Array:
        t = jnp.reshape(jnp.asarray(t, jnp.float32), (-1,))
        k = math.pi * jnp.arange(1, self.harmonics + 1, dtype=jnp.float32)
        feats = jnp.concatenate([jnp.cos(t[:, None] * k), jnp.sin(t[:, None] * k)], axis=-1)
        return self.linear(feats)[:, 0]


def consistency_fn(network: Callable, path: GaussianPath | str, **kwargs) -> ConsistencyFunction:
    """Functional alias of :class:`ConsistencyFunction` (same arguments)."""
    return ConsistencyFunction(network, path, **kwargs)


__all__ = ["ConsistencyFunction", "consistency_fn", "LogVariance", "PARAMETERIZATIONS"]
