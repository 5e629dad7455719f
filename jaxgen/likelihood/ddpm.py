r"""The variational bound of a DDPM (Ho et al. 2020, eq. 5) in nats and bits per dimension.

The chain is :class:`jaxgen.paths.ddpm.DDPMSchedule`; the model's predictions are decoded with the field
algebra as in ancestral sampling (:mod:`jaxgen.samplers.ddpm`).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np
import jax
import jax.numpy as jnp

from jaxgen._checks import is_concrete
from jaxgen.paths.ddpm import VARIANCES, DDPMSchedule
from jaxgen.paths.gaussian import GaussianPath
from jaxgen.fields.algebra import canonical_prediction
from jaxgen.samplers.base import Model
from jaxgen.samplers.ddpm import check_schedule, predict_x0, step_time_fn

Array = jax.Array

DECODERS = ("gaussian", "discretized")


# ---------------------------------------------------------------------------------------------
# the variational bound
# ---------------------------------------------------------------------------------------------

def gaussian_kl(mean1: Array, var1: Array, mean2: Array, var2: Array) -> Array:
    r"""``KL(N(mean1, var1 I) || N(mean2, var2 I))`` summed over the non-batch axes, shape ``(B,)``:
    ``1/2 sum [log(var2/var1) + var1/var2 + (mean1 - mean2)^2 / var2 - 1]``."""
    d = math.prod(mean1.shape[1:])
    var1 = jnp.reshape(var1, (-1,))
    var2 = jnp.reshape(var2, (-1,))
    sq = jnp.sum(jnp.reshape(mean1 - mean2, (mean1.shape[0], -1)) ** 2, -1)
    return 0.5 * (d * (jnp.log(var2) - jnp.log(var1) + var1 / var2 - 1.0) + sq / var2)


def _check_kl_step(schedule: DDPMSchedule, n) -> None:
    """``L_{n-1}`` is a KL term only for ``n >= 2`` (``beta_tilde_1 = 0``: it would be infinite at ``n = 1``)."""
    n = jnp.asarray(n)
    if is_concrete(n) and n.size and jnp.issubdtype(n.dtype, jnp.integer) and np.asarray(n).min() < 2:
        raise ValueError(f"the KL term L_(n-1) needs steps n >= 2, got n = {np.asarray(n).min()}: at n = 1 the posterior "
                         "variance beta_tilde_1 is 0, and that step is the decoder L_0 = -log p(x_0 | x_1) "
                         "(ddpm_elbo's `decoder` term).")


def diffusion_kl_term(schedule: DDPMSchedule, x0: Array, x_n: Array, x0_hat: Array, n, *,
                      variance: str = "beta") -> Array:
    r"""``L_{n-1} = KL(q(x_{n-1} | x_n, x_0) || p(x_{n-1} | x_n))`` for ``n >= 2`` in closed form (Ho et al. eq. 5),
    with the model mean ``mu_tilde_n(x_n, x0_hat)`` and variance ``sigma_n^2``. Shape ``(B,)``, nats."""
    _check_kl_step(schedule, n)
    mean_q, var_q = schedule.q_posterior(x0, x_n, n)
    mean_p, _ = schedule.q_posterior(x0_hat, x_n, n)
    var_p = jnp.reshape(schedule._at(schedule.model_variance(variance), n, x0), (-1,))
    return gaussian_kl(mean_q, var_q, mean_p, var_p)


def _variance_mismatch(schedule, n, x, variance):
    """``d/2 (r - 1 - log r)``, ``r = beta_tilde_n / sigma_n^2``: the part of ``L_{n-1}`` that the model mean
    does not affect."""
    d = math.prod(x.shape[1:])
    r = schedule._at(schedule.posterior_variance / schedule.model_variance(variance), n, x)
    r = jnp.reshape(r, (-1,))
    return 0.5 * d * (r - 1.0 - jnp.log(r))


def eps_kl_weight(schedule: DDPMSchedule, n, x: Array, *, variance: str = "beta") -> Array:
    r"""Ho et al. eq. 12: ``beta_n^2 / (2 sigma_n^2 alpha_n (1 - abar_n))``, the weight of ``||eps - eps_hat||^2``
    in ``L_{n-1}``. Shape ``(B,)``."""
    sigma2 = schedule.model_variance(variance)
    w = schedule.betas**2 / (2.0 * sigma2 * schedule.alphas * (1.0 - schedule.alphas_cumprod))
    return jnp.reshape(schedule._at(w, n, x), (-1,))


def snr_kl_weight(schedule: DDPMSchedule, n, x: Array, *, variance: str = "beta") -> Array:
    r"""``(beta_tilde_n / sigma_n^2) (SNR(n-1) - SNR(n)) / 2``, the weight of ``||x_0 - x0_hat||^2`` in ``L_{n-1}``
    (Kingma et al. 2021, eq. 13 in discrete time, for ``sigma_n^2 = beta_tilde_n``). Shape ``(B,)``; ``n >= 2``."""
    _check_kl_step(schedule, n)
    snr = schedule.snr
    snr_prev = np.concatenate([[np.inf], snr[:-1]])
    with np.errstate(invalid="ignore"):
        w = 0.5 * (schedule.posterior_variance / schedule.model_variance(variance)) * (snr_prev - snr)
    w[0] = np.nan  # L_0 is the decoder, not a KL term
    return jnp.reshape(schedule._at(w, n, x), (-1,))


def diffusion_kl_term_eps(schedule: DDPMSchedule, eps: Array, eps_hat: Array, n, *, variance: str = "beta") -> Array:
    r"""``L_{n-1}`` in noise form (Ho et al. eq. 12), ``n >= 2``:
    ``C_n + beta_n^2 / (2 sigma_n^2 alpha_n (1 - abar_n)) ||eps - eps_hat||^2``, ``C_n`` the variance mismatch. Equals :func:`diffusion_kl_term` when ``x0_hat`` is decoded from ``eps_hat``."""
    _check_kl_step(schedule, n)
    sq = jnp.sum(jnp.reshape(eps - eps_hat, (eps.shape[0], -1)) ** 2, -1)
    return _variance_mismatch(schedule, n, eps, variance) + eps_kl_weight(schedule, n, eps, variance=variance) * sq


def diffusion_kl_term_snr(schedule: DDPMSchedule, x0: Array, x0_hat: Array, n, *, variance: str = "beta") -> Array:
    r"""``L_{n-1}`` in data (SNR) form, ``n >= 2``: ``C_n + (beta_tilde_n/sigma_n^2) (SNR(n-1) - SNR(n))/2 ||x_0 - x0_hat||^2``.

    Since ``x_0 - x0_hat = (eps_hat - eps) / sqrt(SNR(n))``, the eps weight of eq. 12 is this weight over ``SNR(n)``.
    """
    _check_kl_step(schedule, n)
    sq = jnp.sum(jnp.reshape(x0 - x0_hat, (x0.shape[0], -1)) ** 2, -1)
    return _variance_mismatch(schedule, n, x0, variance) + snr_kl_weight(schedule, n, x0, variance=variance) * sq


def _log1mexp(a: Array) -> Array:
    """``log(1 - exp(a))`` for ``a <= 0``, accurate for every ``a`` (Maechler 2012)."""
    a = jnp.minimum(a, -1e-30)
    return jnp.where(a > -math.log(2.0), jnp.log(-jnp.expm1(a)), jnp.log1p(-jnp.exp(a)))


def discretized_gaussian_log_likelihood(x: Array, mean: Array, std: Array, *, num_bins: int = 256) -> Array:
    r"""``log P(x)`` per element of the discretised Gaussian of Ho et al. eq. 13 on ``num_bins`` levels in ``[-1, 1]``.

    Each value owns the interval ``[x - 1/(num_bins - 1), x + 1/(num_bins - 1)]``, the outer two extended to
    ``-inf`` and ``+inf``; the probability is the Gaussian mass of that interval, computed from ``log Phi``
    on the tail where it is accurate. (Ho et al.'s and improved-diffusion's code use a tanh approximation of
    ``Phi`` and clamp probabilities at ``1e-12``; on 8-bit data that moves a mean by a few ``1e-5`` bits/dim.)
    """
    half = 1.0 / (num_bins - 1)
    lo = (x - mean - half) / std
    hi = (x - mean + half) / std
    log_cdf_hi = jax.scipy.special.log_ndtr(hi)      # log P(X < upper)
    log_sf_lo = jax.scipy.special.log_ndtr(-lo)      # log P(X > lower)
    # mass = Phi(hi) - Phi(lo) = Phi(-lo) - Phi(-hi); use the smaller tail for accuracy.
    upper_tail = lo > 0
    mid = jnp.where(upper_tail,
                    log_sf_lo + _log1mexp(jax.scipy.special.log_ndtr(-hi) - log_sf_lo),
                    log_cdf_hi + _log1mexp(jax.scipy.special.log_ndtr(lo) - log_cdf_hi))
    return jnp.where(x < -1.0 + half, log_cdf_hi, jnp.where(x > 1.0 - half, log_sf_lo, mid))


class DDPMBound(NamedTuple):
    """Terms of the negative ELBO per sample (nats), shape ``(B,)`` each.

    Attributes:
      nelbo: ``prior + diffusion + decoder``.
      bits_per_dim: ``nelbo / (D log 2)``.
      prior: ``L_T = KL(q(x_T | x_0) || N(0, I))``.
      diffusion: ``sum_{n=2}^T L_{n-1}`` (or its unbiased estimate).
      decoder: ``L_0 = -log p(x_0 | x_1)``.
    """

    nelbo: Array
    bits_per_dim: Array
    prior: Array
    diffusion: Array
    decoder: Array


def _decoder_variance(sched: DDPMSchedule, variance: str, decoder_variance) -> float:
    """``sigma_1^2`` of the decoder ``p(x_0 | x_1)`` (see :func:`ddpm_elbo`)."""
    if decoder_variance is None:
        return float(sched.model_variance(variance)[0])
    if isinstance(decoder_variance, str):
        if decoder_variance != "clipped":
            raise ValueError(f"unknown decoder_variance {decoder_variance!r}; use None (sigma_1^2 of `variance`), "
                             "'clipped' (beta_tilde_2, as Ho et al.'s and improved-diffusion's code) or a positive float.")
        return float(sched.model_variance("posterior")[0])
    v = float(decoder_variance)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"decoder_variance must be a positive finite float (or None / 'clipped'), got {decoder_variance!r}.")
    return v


def ddpm_elbo(
    field: Callable,
    x0: Array,
    key: Array,
    *,
    schedule: DDPMSchedule,
    prediction: str = "eps",
    variance: str = "beta",
    decoder: str = "gaussian",
    num_bins: int = 256,
    num_terms: int | None = None,
    steps: int | None = None,
    path: GaussianPath | None = None,
    path_time: Callable | None = None,
    clip_denoised: float | None = None,
    cond: dict | None = None,
    decoder_variance: str | float | None = None,
) -> DDPMBound:
    r"""Negative variational bound of a DDPM per sample (Ho et al. 2020, eq. 5):

    .. math:: -\mathrm{ELBO}(x_0) = \underbrace{KL(q(x_T|x_0) \| N(0,I))}_{L_T}
              + \sum_{n=2}^{T} \mathbb E_{q(x_n|x_0)} \underbrace{KL(q(x_{n-1}|x_n,x_0) \| p(x_{n-1}|x_n))}_{L_{n-1}}
              + \mathbb E_{q(x_1|x_0)} \underbrace{[-\log p(x_0|x_1)]}_{L_0} \;\ge\; -\log p_\theta(x_0).

    Each ``L_{n-1}`` is the exact Gaussian KL (:func:`diffusion_kl_term`) at one draw ``x_n ~ q(x_n|x_0)`` per term.
    ``num_terms=None`` sums all ``T - 1`` terms (``T`` field evaluations in all); ``num_terms=k`` draws ``k``
    steps uniformly from ``{2..T}`` per sample and returns the unbiased ``(T - 1)/k`` -weighted sum (``k + 1``
    evaluations). The decoder ``p(x_0|x_1)`` has mean ``mu_tilde_1(x_1, x0_hat) = x0_hat`` and variance ``sigma_1^2``
    (:meth:`DDPMSchedule.model_variance`): ``"gaussian"`` is the continuous density (then the bound is on a
    density of ``x_0`` and is comparable with a continuous NLL); ``"discretized"`` is eq. 13 for data on
    ``num_bins`` levels in ``[-1, 1]`` (a probability: the bound is on a discrete NLL).

    ``decoder_variance`` replaces the decoder's ``sigma_1^2``: ``None`` keeps ``model_variance(variance)[0]``
    (``beta_1`` for ``"beta"``, as eq. 13 with ``sigma_t^2 = beta_t``), ``"clipped"`` uses ``beta_tilde_2``, which
    Ho et al.'s ``diffusion_utils_2.py`` and improved-diffusion use at the first step for *both* fixed variances
    (their ``fixedlarge`` log-variance is ``log(append(beta_tilde_2, betas[1:]))``), a float uses that variance.
    Their bits/dim are ``variance="beta"`` or ``"posterior"``, ``decoder="discretized"``,
    ``decoder_variance="clipped"``, ``clip_denoised=1.0`` (their ``calc_bpd_loop`` default).

    Returns:
      :class:`DDPMBound` (nats; ``bits_per_dim`` divides by ``D log 2``, ``D`` the data dimension).
    """
    check_schedule(schedule)
    sched = schedule if steps is None else schedule.respace(steps)
    model = Model(field, schedule.path() if path is None else path, canonical_prediction(prediction), cond)
    time_fn = step_time_fn(sched, path_time)
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; use 'beta' or 'posterior'.")
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; use 'gaussian' (continuous) or 'discretized' "
                         "(Ho et al. eq. 13).")
    if decoder == "discretized":
        if not isinstance(num_bins, (int, np.integer)) or num_bins < 2:
            raise ValueError(f"num_bins must be an int >= 2, got {num_bins!r}.")
        arr = np.asarray(x0) if is_concrete(x0) else None
        if arr is not None and (arr.min() < -1.0 - 1e-6 or arr.max() > 1.0 + 1e-6):
            raise ValueError("the discretized decoder needs data scaled to [-1, 1] (e.g. 2 * uint8 / 255 - 1), "
                             f"got values in [{arr.min():.4g}, {arr.max():.4g}].")
    if num_terms is not None and (not isinstance(num_terms, (int, np.integer)) or num_terms < 1):
        raise ValueError(f"num_terms must be a positive int (or None for all T - 1 terms), got {num_terms!r}.")
    var1 = _decoder_variance(sched, variance, decoder_variance)
    K, B = sched.T, x0.shape[0]
    d = math.prod(x0.shape[1:])
    dtype = x0.dtype

    def x0_hat_at(x, k):
        return predict_x0(model, time_fn, x, k, clip_denoised)[0]

    # L_T: KL(N(sqrt(abar_T) x0, 1 - abar_T) || N(0, 1)) per dimension, summed.
    abar_T = float(sched.alphas_cumprod[-1])
    prior = 0.5 * jnp.sum(jnp.reshape(abar_T * x0**2, (B, -1)), -1) + 0.5 * d * (-abar_T - math.log1p(-abar_T))

    # sum_{n=2}^{K} L_{n-1}
    def term(k, subkey):
        eps = jax.random.normal(subkey, x0.shape, dtype)
        x_n = sched.q_sample(x0, k, eps)
        return diffusion_kl_term(sched, x0, x_n, x0_hat_at(x_n, k), k, variance=variance)

    if K < 2:
        diffusion = jnp.zeros((B,), dtype)
    elif num_terms is None:
        def body(acc, k):
            return acc + term(jnp.broadcast_to(k, (B,)), jax.random.fold_in(key, k)), None
        diffusion, _ = jax.lax.scan(body, jnp.zeros((B,), dtype), jnp.arange(2, K + 1))
    else:
        def body(acc, j):
            kj = jax.random.fold_in(jax.random.fold_in(key, K + 1), j)
            k = jax.random.randint(kj, (B,), 2, K + 1)
            return acc + term(k, jax.random.fold_in(kj, 1)), None
        total, _ = jax.lax.scan(body, jnp.zeros((B,), dtype), jnp.arange(num_terms))
        diffusion = total * ((K - 1) / num_terms)

    # L_0 = -log p(x0 | x1)
    one = jnp.ones((B,), jnp.int32)
    x1 = sched.q_sample(x0, one, jax.random.normal(jax.random.fold_in(key, 1), x0.shape, dtype))
    mean = x0_hat_at(x1, one)  # mu_tilde_1(x1, x0_hat) = x0_hat: coef1 = 1, coef2 = 0 at n = 1
    if decoder == "gaussian":
        sq = jnp.sum(jnp.reshape((x0 - mean) ** 2, (B, -1)), -1)
        dec = 0.5 * sq / var1 + 0.5 * d * math.log(2.0 * math.pi * var1)
    else:
        ll = discretized_gaussian_log_likelihood(x0, mean, jnp.asarray(math.sqrt(var1), dtype), num_bins=num_bins)
        dec = -jnp.sum(jnp.reshape(ll, (B, -1)), -1)

    nelbo = prior + diffusion + dec
    return DDPMBound(nelbo, nelbo / (d * math.log(2.0)), prior, diffusion, dec)


__all__ = [
    "ddpm_elbo", "DDPMBound", "gaussian_kl", "diffusion_kl_term", "diffusion_kl_term_eps", "diffusion_kl_term_snr", "eps_kl_weight",
    "snr_kl_weight", "discretized_gaussian_log_likelihood", "DECODERS",
]
