r"""Variational bounds of latent-variable models: Gaussian KL terms, decoder log-likelihoods, the ELBO, the
importance-weighted bound (IWAE) and posterior-collapse diagnostics (KL per latent dimension, active units).

Conventions: a diagonal Gaussian posterior is given by its ``mean`` and ``logvar`` (``log sigma^2``; the encoder's
outputs in Kingma & Welling 2014), a Gaussian decoder by its ``mean`` and ``log_scale`` (``log sigma``). Terms
"per dimension" keep every axis of their inputs; log-likelihoods are summed over all non-batch axes (shape
``(B,)``, nats). Pure functions of arrays (jit/vmap-compatible); nothing here knows about networks.

:func:`gaussian_kl_diag` generalises :func:`jaxgen.likelihood.ddpm.gaussian_kl` (isotropic variances, summed) to
per-dimension variances given in log space, the form VAEs need; for isotropic variances their sums agree.
"""

from __future__ import annotations

import math

import numpy as np
import jax
import jax.numpy as jnp

from jaxgen._checks import check_key, is_concrete

Array = jax.Array

LOG_2PI = math.log(2.0 * math.pi)


def _check_same_shape(owner: str, **arrays) -> None:
    shapes = {k: tuple(jnp.shape(v)) for k, v in arrays.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"{owner}: the arguments must have one shape (broadcast them first), got "
                         + ", ".join(f"{k} {s}" for k, s in shapes.items()) + ".")


def _batch_sum(x: Array) -> Array:
    """Sum over every axis but the first: ``(B, ...) -> (B,)``."""
    if jnp.ndim(x) < 1:
        raise ValueError("log-likelihoods need a leading batch axis (B, ...), got a scalar.")
    return jnp.sum(jnp.reshape(x, (jnp.shape(x)[0], -1)), axis=-1)


def kl_standard_normal(mean: Array, logvar: Array) -> Array:
    r"""``KL(N(mean, exp(logvar)) || N(0, 1))`` per dimension (same shape as ``mean``), in nats.

    Kingma & Welling 2014 ("Auto-Encoding Variational Bayes"), appendix B:
    ``-KL = 1/2 (1 + log sigma^2 - mu^2 - sigma^2)``, so ``KL = 1/2 (sigma^2 + mu^2 - 1 - log sigma^2) >= 0``.
    Sum the last axis for the KL of a diagonal posterior from ``N(0, I)``.
    """
    _check_same_shape("kl_standard_normal", mean=mean, logvar=logvar)
    return 0.5 * (jnp.exp(logvar) + jnp.square(mean) - 1.0 - logvar)


def gaussian_kl_diag(mean_q: Array, logvar_q: Array, mean_p: Array, logvar_p: Array) -> Array:
    r"""``KL(N(mean_q, exp(logvar_q)) || N(mean_p, exp(logvar_p)))`` per dimension, in nats.

    The KL of two univariate Gaussians (Kingma & Welling 2014, appendix B, generalised to a Gaussian prior of any
    mean and variance, as the learned priors of hierarchical VAEs need; Sønderby et al. 2016):
    ``1/2 [log(s_p^2 / s_q^2) + (s_q^2 + (m_q - m_p)^2) / s_p^2 - 1]``, computed with
    ``exp(logvar_q - logvar_p)`` so no variance is divided by. For ``mean_p = 0, logvar_p = 0`` it is
    :func:`kl_standard_normal`. Arguments broadcast against each other.
    """
    ratio = jnp.exp(logvar_q - logvar_p)
    return 0.5 * (logvar_p - logvar_q + ratio + jnp.square(mean_q - mean_p) * jnp.exp(-logvar_p) - 1.0)


def gaussian_log_prob(x: Array, mean: Array, log_scale: Array) -> Array:
    r"""``log N(x; mean, diag(exp(2 log_scale)))`` summed over the non-batch axes, shape ``(B,)``, nats.

    Per dimension ``-1/2 log(2 pi) - log sigma - (x - mu)^2 / (2 sigma^2)``: the Gaussian decoder of Kingma &
    Welling 2014 (appendix C.2). ``mean`` and ``log_scale`` broadcast to ``x``'s shape (a per-pixel or global
    learned scale).
    """
    mean = jnp.broadcast_to(mean, jnp.shape(x))
    log_scale = jnp.broadcast_to(log_scale, jnp.shape(x))
    z = (x - mean) * jnp.exp(-log_scale)
    return _batch_sum(-0.5 * LOG_2PI - log_scale - 0.5 * jnp.square(z))


def gaussian_log_prob_logvar(x: Array, mean: Array, logvar: Array) -> Array:
    """:func:`gaussian_log_prob` with the variance given as ``logvar = 2 log_scale`` (an encoder's output)."""
    return gaussian_log_prob(x, mean, 0.5 * jnp.asarray(logvar))


def bernoulli_log_prob(x: Array, logits: Array) -> Array:
    r"""``sum x log sigmoid(l) + (1 - x) log(1 - sigmoid(l))`` over the non-batch axes, shape ``(B,)``, nats.

    The Bernoulli decoder of Kingma & Welling 2014 (appendix C.1), from logits in the numerically stable form
    ``x l - softplus(l)`` (``log sigmoid(l) = l - softplus(l)``, ``log(1 - sigmoid(l)) = -softplus(l)``): finite for
    any finite logits. ``x`` in ``[0, 1]``; for non-binary ``x`` this is the cross-entropy of the probabilities
    ``x``, not a normalised likelihood of ``x``.
    """
    _check_same_shape("bernoulli_log_prob", x=x, logits=logits)
    return _batch_sum(x * logits - jax.nn.softplus(logits))


def reparameterize(key: Array, mean: Array, logvar: Array, num_samples: int | None = None) -> Array:
    r"""``z = mean + exp(logvar / 2) * eps``, ``eps ~ N(0, I)``: the reparameterisation trick (Kingma & Welling
    2014, sec. 2.4), differentiable in ``mean`` and ``logvar``. With ``num_samples = K`` the result has a leading
    axis of ``K`` independent draws, shape ``(K, *mean.shape)``."""
    check_key(key, owner="reparameterize")
    _check_same_shape("reparameterize", mean=mean, logvar=logvar)
    if num_samples is not None and (isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer))
                                    or num_samples < 1):
        raise ValueError(f"reparameterize: num_samples must be a positive int (or None for one draw), got "
                         f"{num_samples!r}.")
    shape = tuple(jnp.shape(mean)) if num_samples is None else (int(num_samples),) + tuple(jnp.shape(mean))
    eps = jax.random.normal(key, shape, jnp.result_type(mean, jnp.float32))
    return mean + jnp.exp(0.5 * logvar) * eps


def elbo(log_likelihood: Array, kl: Array, beta: float | Array = 1.0) -> Array:
    r"""The evidence lower bound ``E_q[log p(x|z)] - beta KL(q(z|x) || p(z))`` (Kingma & Welling 2014, eq. 3/10;
    ``beta != 1`` is the beta-VAE objective of Higgins et al. 2017, eq. 4, a bound on ``log p(x)`` only for
    ``beta >= 1``). ``log_likelihood`` and ``kl`` have shape ``(B,)`` (sum ``kl`` over latents first)."""
    _check_same_shape("elbo", log_likelihood=log_likelihood, kl=kl)
    return log_likelihood - beta * kl


def iwae_bound(log_weights: Array, axis: int = 0) -> Array:
    r"""The importance-weighted bound ``L_K = log (1/K) sum_k w_k = logsumexp_k log w_k - log K`` (Burda et al.
    2016, "Importance Weighted Autoencoders", eq. 8), with ``log w_k = log p(x, z_k) - log q(z_k | x)`` and
    ``z_k ~ q(z|x)`` i.i.d. along ``axis`` (default 0: ``(K, B) -> (B,)``).

    ``L_1`` is the ELBO, ``E[L_K] <= E[L_{K+1}] <= log p(x)`` (their Theorem 1), and ``L_K -> log p(x)`` as
    ``K -> inf``. With the exact posterior as ``q`` every weight equals ``p(x)`` and ``L_K = log p(x)`` for every K.
    """
    log_weights = jnp.asarray(log_weights)
    if log_weights.ndim < 1:
        raise ValueError("iwae_bound needs the K importance samples on an axis, got a scalar.")
    k = log_weights.shape[axis]
    if k < 1:
        raise ValueError("iwae_bound needs at least one importance sample (K >= 1), got an empty axis.")
    return jax.scipy.special.logsumexp(log_weights, axis=axis) - math.log(k)


def posterior_mean_variance(posterior_means: Array) -> Array:
    r"""``Cov_x(E_q[z | x])`` per latent dimension: the variance over the data (axis 0) of the posterior means,
    shape ``(D,)`` for means of shape ``(N, D)`` (Burda et al. 2016, sec. 5.2)."""
    m = jnp.asarray(posterior_means)
    if m.ndim != 2 or m.shape[0] < 2:
        raise ValueError(f"posterior means must have shape (N, D) with N >= 2 data points, got {tuple(m.shape)}; "
                         "flatten the latent axes and pass a batch of several points.")
    return jnp.var(m, axis=0)


def active_unit_mask(posterior_means: Array, threshold: float = 0.01) -> Array:
    """Which latent dimensions are active: ``Cov_x(E_q[z_d | x]) > threshold`` (Burda et al. 2016, sec. 5.2),
    a boolean ``(D,)``."""
    if is_concrete(threshold) and not float(np.min(np.asarray(threshold))) >= 0:
        raise ValueError(f"active units: threshold must be a number >= 0 (Burda et al. use 0.01), got {threshold!r}.")
    return posterior_mean_variance(posterior_means) > threshold


def active_units(posterior_means: Array, threshold: float = 0.01) -> Array:
    r"""The number of active latent units ``A_u = #{d : Cov_x(E_{q(z|x)}[z_d]) > threshold}`` (Burda et al. 2016,
    sec. 5.2; 0.01 is their threshold), an int32 scalar, from posterior means of shape ``(N, D)``. A unit whose
    posterior mean does not depend on ``x`` carries no information about the data (posterior collapse)."""
    return jnp.sum(active_unit_mask(posterior_means, threshold).astype(jnp.int32))


def kl_per_dimension(kl: Array) -> Array:
    """The mean over the batch (axis 0) of per-dimension KL terms ``(B, ...) -> (D,)`` (latent axes flattened):
    the "KL per latent dimension" of a posterior-collapse diagnosis."""
    kl = jnp.asarray(kl)
    if kl.ndim < 2:
        raise ValueError(f"kl_per_dimension needs per-sample, per-dimension KL terms of shape (B, D), got "
                         f"{tuple(kl.shape)}.")
    return jnp.mean(jnp.reshape(kl, (kl.shape[0], -1)), axis=0)


def kl_summary(kl: Array, posterior_means: Array, *, threshold: float = 0.01) -> dict[str, Array]:
    r"""Posterior-collapse diagnostics of a batch: ``kl_per_dim`` (``(D,)``, nats, :func:`kl_per_dimension`),
    ``kl_total`` (the mean KL per sample, nats), ``kl_max_share`` (the largest dimension's share of the total),
    ``active_units`` (:func:`active_units`) and ``mean_variance`` (``(D,)``, :func:`posterior_mean_variance`).

    Args:
      kl: per-dimension KL terms ``(B, D)``, e.g. :func:`kl_standard_normal` of the encoder's outputs.
      posterior_means: the posterior means ``(B, D)`` of the same batch.
      threshold: the active-unit threshold.
    """
    per_dim = kl_per_dimension(kl)
    total = jnp.sum(per_dim)
    return {
        "kl_per_dim": per_dim,
        "kl_total": total,
        "kl_max_share": jnp.max(per_dim) / jnp.maximum(total, 1e-12),
        "active_units": active_units(posterior_means, threshold),
        "mean_variance": posterior_mean_variance(posterior_means),
    }


def free_bits_kl(kl: Array, free_bits: float) -> Array:
    r"""The "free bits" KL penalty ``sum_d max(lambda, E_batch[KL_d])`` (Kingma et al. 2016, "Improved Variational
    Inference with Inverse Autoregressive Flow", their "free bits", with one group per latent dimension), a scalar in
    nats per sample: a dimension's KL is not pushed below ``lambda = free_bits`` nats, which counters posterior
    collapse. ``free_bits = 0`` gives the plain mean KL. ``kl`` has shape ``(B, D)``."""
    if is_concrete(free_bits) and not float(np.min(np.asarray(free_bits))) >= 0:
        raise ValueError(f"free_bits must be >= 0 nats per latent dimension (0 turns it off), got {free_bits!r}.")
    return jnp.sum(jnp.maximum(free_bits, kl_per_dimension(kl)))


__all__ = [
    "kl_standard_normal", "gaussian_kl_diag", "gaussian_log_prob", "gaussian_log_prob_logvar", "bernoulli_log_prob",
    "reparameterize", "elbo", "iwae_bound", "posterior_mean_variance", "active_unit_mask", "active_units",
    "kl_per_dimension", "kl_summary", "free_bits_kl",
]
