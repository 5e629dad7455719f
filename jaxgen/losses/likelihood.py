r"""Maximum-likelihood objectives: normalizing flows (exact change of variables) and continuous normalizing flows
(FFJORD, through jaxgen's probability-flow ODE likelihood).

Both return ``loss(model, batch, key) -> scalar``: the mean negative log-likelihood **per dimension**, in nats,
``-(1/(B D)) sum_i log p(x_i)`` with ``D = prod(x.shape[1:])``. Divide by ``ln 2`` for bits per dimension of the
continuous data (:func:`jaxgen.likelihood.bits_per_dim` adds the offset of a discrete data set).

Dequantisation (Theis et al. 2016, "A note on the evaluation of generative models", sec. 3.1): discrete data on a
grid of spacing ``w`` (``dequant_width``; the digits' grey levels ``k / 8 - 1`` have ``w = 1/8``) is trained on as
``x + w u``, ``u ~ U[0, 1)^D``: each grid value spread uniformly over the bin ``[x, x + w)`` above it (the convention
of :func:`jaxgen.likelihood.dequantize` and of the ``generative`` experiment's test digits). The continuous density
``p`` of the dequantised data bounds the discrete model's probability, ``E_u[log p(x + w u)] + D log w <= log P(x)``
(Jensen), which is what :func:`jaxgen.likelihood.bits_per_dim` reports with ``data_range = (lo, hi + w)`` and
``num_bins`` the number of grid levels (digits: ``(-1, 9/8)`` and 17, an offset of ``log2(8) = 3`` bits).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import jax
import jax.numpy as jnp

from jaxgen._checks import check_key, check_number, check_tolerances
from jaxgen.likelihood.ode import DIVERGENCES, PROBES, log_likelihood
from jaxgen.losses.regression import split_batch
from jaxgen.paths.gaussian import GaussianPath, as_path

Array = jax.Array


def _check_width(dequant_width, owner: str) -> float | None:
    if dequant_width is None:
        return None
    check_number(dequant_width, lambda v: v > 0, name="dequant_width", owner=owner,
                 what="None (no dequantisation) or the data's grid spacing > 0 (digits: 1/8, 8-bit on [-1, 1]: 2/255)")
    return float(dequant_width)


def dequantize_uniform(key: Array, x: Array, width: float | None) -> Array:
    r"""``x + w u``, ``u ~ U[0, 1)`` per entry: uniform dequantisation of grid values over the bins ``[x, x + w)``
    (Theis et al. 2016, sec. 3.1); ``x`` unchanged for ``width=None``."""
    if width is None:
        return x
    return x + width * jax.random.uniform(key, x.shape, x.dtype)


def _per_dim(x: Array) -> int:
    return int(np.prod(x.shape[1:], dtype=np.int64))


def maximum_likelihood_loss(*, dequant_width: float | None = None) -> Callable:
    r"""Negative log-likelihood per dimension of a density model with ``model.log_prob(x, **cond) -> (B,)`` (a
    :class:`jaxgen.models.flows.Flow`): ``-mean_i log p(x_i) / D`` in nats (Dinh et al. 2017, eq. 3 inside ``log_prob``).

    Args:
      dequant_width: ``None`` for continuous data, or the grid spacing ``w`` of discrete data: each batch is
        dequantised as ``x + w u`` (module docstring).

    Returns:
      ``loss(model, batch, key) -> scalar``; ``batch`` is ``{"x": x}`` (further keys are passed to ``log_prob`` as
      conditioning) or an array; ``key`` draws the dequantisation noise.
    """
    width = _check_width(dequant_width, "maximum_likelihood_loss")

    def loss(model: Any, batch: Any, key: Array) -> Array:
        if not callable(getattr(model, "log_prob", None)):
            raise ValueError(f"maximum_likelihood_loss needs a density model with a log_prob(x) method (a "
                             f"jaxgen.models.flows.Flow), got {type(model).__name__}.")
        x, cond = split_batch(batch, owner="maximum_likelihood_loss")
        if width is not None:
            check_key(key, owner="maximum_likelihood_loss")
        x = dequantize_uniform(key, x, width)
        log_prob = model.log_prob(x, **cond)
        if jnp.shape(log_prob) != (x.shape[0],):
            raise ValueError(f"model.log_prob must return one value per sample, shape ({x.shape[0]},), got "
                             f"{jnp.shape(log_prob)}.")
        return -jnp.mean(log_prob) / _per_dim(x)

    return loss


def cnf_loss(path: GaussianPath | str = "linear", *, method: str = "tsit5", rtol: float = 1e-3, atol: float = 1e-3,
             divergence: str = "hutchinson", num_probes: int = 1, probe: str = "rademacher", max_steps: int = 256,
             adjoint: Any = None, dequant_width: float | None = None, prediction: str = "velocity") -> Callable:
    r"""FFJORD's maximum-likelihood objective (Grathwohl et al. 2019, eq. 4-5; Chen et al. 2018, thm. 1): the negative
    log-likelihood per dimension of the data under the continuous flow ``dx/dt = field(x, t)`` that carries the
    path's prior ``p_0`` (t=0) to the data (t=1),

    .. math:: \log p_1(x) = \log p_0(x_0) - \int_0^1 \nabla\!\cdot u_t(x_t)\, dt ,

    computed by :func:`jaxgen.likelihood.log_likelihood` (one diffrax solve from data to noise for the whole batch,
    the divergence exact or by Hutchinson's estimator with probes drawn from ``key`` and fixed over the solve; the
    estimate of ``log p`` is unbiased, so is the loss). For the ``"linear"`` path ``p_0 = N(0, I)``
    (``path.prior_log_prob`` at ``t_noise = 0``, exact there since ``alpha_0 = 0``). The gradient with respect to the
    field's parameters is backpropagated through the solver: by default diffrax's
    ``RecursiveCheckpointAdjoint(checkpoints=max_steps)``, exact gradients of the numerical solution with every step
    stored (memory ``O(max_steps B D)``, no recomputation: 15% faster per training step than diffrax's default
    online checkpointing on the 2-D MLP, measured); the loose default tolerances (``1e-3``) make a training step cost a
    handful of Runge-Kutta steps. A solve that needs more than ``max_steps`` steps raises: loosen the tolerances or
    raise it.

    Args:
      path: the path whose prior is the base density (``"linear"``: N(0, I)), or its name.
      method, rtol, atol, max_steps: the adaptive solve (``tsit5``, ``dopri5``, ``dopri8``, ``bosh3``).
      adjoint: a diffrax adjoint for the gradient (default above); ``diffrax.BacksolveAdjoint`` is not supported (the
        field's parameters are closed over, not passed as the solve's ``args``).
      divergence: ``"exact"`` (``D`` JVPs per evaluation: small ``D``) or ``"hutchinson"`` (``num_probes`` JVPs).
      num_probes, probe: Hutchinson probes (``"rademacher"`` or ``"gaussian"``).
      dequant_width: grid spacing of discrete data to dequantise (see the module docstring), or ``None``.
      prediction: what the field predicts (``"velocity"`` for FFJORD).

    Returns:
      ``loss(field, batch, key) -> scalar`` (further batch keys are passed to the field as conditioning); ``key`` is
      split into the dequantisation and probe keys.
    """
    path = as_path(path)
    width = _check_width(dequant_width, "cnf_loss")
    if divergence not in DIVERGENCES:
        raise ValueError(f"cnf_loss: unknown divergence {divergence!r}; use one of {DIVERGENCES}.")
    if probe not in PROBES:
        raise ValueError(f"cnf_loss: unknown probe {probe!r}; use one of {PROBES}.")
    if isinstance(num_probes, bool) or not isinstance(num_probes, (int, np.integer)) or num_probes < 1:
        raise ValueError(f"cnf_loss: num_probes must be a positive int, got {num_probes!r}.")
    check_tolerances(rtol, atol, max_steps, owner="cnf_loss")
    if adjoint is None:
        import diffrax

        adjoint = diffrax.RecursiveCheckpointAdjoint(checkpoints=int(max_steps))

    def loss(field: Callable, batch: Any, key: Array) -> Array:
        x, cond = split_batch(batch, owner="cnf_loss")
        check_key(key, owner="cnf_loss")
        k_deq, k_probe = jax.random.split(key)
        x = dequantize_uniform(k_deq, x, width)
        res = log_likelihood(field, x, path=path, prediction=prediction, method=method, rtol=rtol, atol=atol,
                             divergence=divergence, num_probes=int(num_probes), probe=probe, key=k_probe,
                             cond=cond or None, max_steps=int(max_steps), adjoint=adjoint)
        return -jnp.mean(res.log_prob) / _per_dim(x)

    return loss


__all__ = ["maximum_likelihood_loss", "cnf_loss", "dequantize_uniform"]
