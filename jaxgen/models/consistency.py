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
"""

from __future__ import annotations

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

PARAMETERIZATIONS = ("edm", "denoiser")


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
    network's, so :class:`jaxgen.training.Trainer` can train it.
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
            check_data_identifiable(self.path, self.prediction, self.t_min, what="the denoiser parameterization",
                                    where="t_min", min_alpha=0.0,
                                    fix="use a 'velocity', 'data' or 'v' network, or the 'edm' parameterization")

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


def consistency_fn(network: Callable, path: GaussianPath | str, **kwargs) -> ConsistencyFunction:
    """Functional alias of :class:`ConsistencyFunction` (same arguments)."""
    return ConsistencyFunction(network, path, **kwargs)


__all__ = ["ConsistencyFunction", "consistency_fn", "PARAMETERIZATIONS"]
