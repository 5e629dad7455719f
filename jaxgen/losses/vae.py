r"""VAE objectives: the negative ELBO of a Gaussian-latent VAE (Kingma & Welling 2014) with beta weighting (Higgins
et al. 2017), KL warm-up and free bits, the two-layer hierarchical VAE's, and the IWAE objective (Burda et al. 2016).

Each builder returns ``loss(model, batch, key, step=...) -> scalar`` for :class:`jaxgen.training.Trainer`; the loss
calls only the model's methods (:class:`jaxgen.models.vae.GaussianVAE`, :class:`~jaxgen.models.vae.HierarchicalVAE`:
``encode``, ``reconstruction_log_prob``, ...), and draws one reparameterised latent per sample. The batch is
``{"x": x}``; other keys (labels) are ignored, the models being unconditional.

Scale: with ``reduction="dim"`` (default) the value is in nats per data dimension, ``-ELBO(x) / D`` averaged over
the batch (comparable across 2-D points and images; multiply by ``D`` for nats per sample); ``"sample"`` gives nats
per sample.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import jax
import jax.numpy as jnp

from jaxgen._checks import check_key
from jaxgen.likelihood.variational import free_bits_kl, gaussian_kl_diag, kl_standard_normal, reparameterize
from jaxgen.losses.regression import split_batch

Array = jax.Array

REDUCTIONS = ("dim", "sample")


def _check_args(owner: str, beta=1.0, warmup_steps=0, free_bits=0.0, reduction="dim", dequantize=0.0) -> None:
    def number(v):
        return not isinstance(v, bool) and isinstance(v, (int, float, np.integer, np.floating)) and np.isfinite(v)

    if not number(beta) or beta < 0:
        raise ValueError(f"{owner}: beta must be a finite number >= 0 (1 = the ELBO; > 1 a beta-VAE), got {beta!r}.")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, (int, np.integer)) or warmup_steps < 0:
        raise ValueError(f"{owner}: warmup_steps must be an int >= 0 (0 = no KL warm-up), got {warmup_steps!r}.")
    if not number(free_bits) or free_bits < 0:
        raise ValueError(f"{owner}: free_bits must be a number >= 0 nats per latent dimension (0 = off), got "
                         f"{free_bits!r}.")
    if reduction not in REDUCTIONS:
        raise ValueError(f"{owner}: reduction must be one of {REDUCTIONS} (nats per data dimension or per sample), "
                         f"got {reduction!r}.")
    if not number(dequantize) or dequantize < 0:
        raise ValueError(f"{owner}: dequantize must be the data's bin width >= 0 (e.g. 1/8 for the digits' levels "
                         f"k/8 - 1; 0 = off), got {dequantize!r}.")


def kl_weight(beta: float, warmup_steps: int, step: Array | None) -> Array:
    r"""The KL weight at ``step``: ``beta * min(1, step / warmup_steps)`` (linear KL warm-up / cost annealing: Bowman et
    al. 2016, "Generating Sentences from a Continuous Space"; Sønderby et al. 2016), or ``beta`` without warm-up."""
    if warmup_steps == 0 or step is None:
        return jnp.asarray(beta, jnp.float32)
    return beta * jnp.clip(jnp.asarray(step, jnp.float32) / warmup_steps, 0.0, 1.0)


def _data(batch: Any, key: Array, dequantize: float, owner: str) -> tuple[Array, Array]:
    """The batch's data (dequantised to ``x + w u``, ``u ~ U[0, 1)``, when ``w = dequantize > 0``) and the rest key."""
    x, _ = split_batch(batch, owner=owner)
    check_key(key, owner=owner)
    k_deq, key = jax.random.split(key)
    if dequantize > 0:
        x = x + dequantize * jax.random.uniform(k_deq, x.shape, x.dtype)
    return x, key


def _reduce(neg_elbo_mean: Array, x: Array, reduction: str) -> Array:
    return neg_elbo_mean / math.prod(x.shape[1:]) if reduction == "dim" else neg_elbo_mean


def vae_loss(beta: float = 1.0, *, warmup_steps: int = 0, free_bits: float = 0.0, reduction: str = "dim",
             dequantize: float = 0.0) -> Callable:
    r"""The negative ELBO of a VAE with a ``N(0, I)`` prior, one reparameterised sample per data point:

    .. math:: \mathcal{L} = \mathbb{E}_x\big[-\log p(x \mid z) + \beta_t\,\mathrm{KL}(q(z|x) \,\|\, N(0, I))\big],
              \quad z = \mu(x) + \sigma(x) \odot \epsilon

    (Kingma & Welling 2014, eq. 10, the SGVB estimator with the KL in closed form, appendix B; ``beta != 1``:
    the beta-VAE objective of Higgins et al. 2017).

    Args:
      beta: the KL weight (1: the ELBO).
      warmup_steps: linear KL warm-up, ``beta_t = beta * min(1, step / warmup_steps)`` (:func:`kl_weight`); 0: off.
      free_bits: ``lambda`` nats per latent dimension: the KL term becomes ``sum_d max(lambda, E_batch KL_d)``
        (Kingma et al. 2016; :func:`jaxgen.likelihood.variational.free_bits_kl`); 0: the plain KL.
      reduction: ``"dim"`` (nats per data dimension) or ``"sample"`` (nats per sample); module docstring.
      dequantize: the data's quantisation bin width ``w``: train on ``x + w u``, ``u ~ U[0, 1)`` (the bin
        ``[x, x + w)``, as the experiments dequantise test data), so that a Gaussian decoder models a density of
        dequantised data (digits: ``w = 1/8``); 0: off.

    Returns:
      ``loss(model, batch, key, step=None) -> scalar`` for any model with ``encode`` and
      ``reconstruction_log_prob`` (:class:`jaxgen.models.vae.GaussianVAE`).
    """
    _check_args("vae_loss", beta, warmup_steps, free_bits, reduction, dequantize)

    def loss(model, batch, key: Array, step: Array | None = None) -> Array:
        x, key = _data(batch, key, dequantize, "vae_loss")
        mean, logvar = model.encode(x)
        z = reparameterize(key, mean, logvar)
        recon = -jnp.mean(model.reconstruction_log_prob(x, z))
        kl = free_bits_kl(kl_standard_normal(mean, logvar), free_bits)
        return _reduce(recon + kl_weight(beta, warmup_steps, step) * kl, x, reduction)

    return loss


def hvae_loss(beta: float = 1.0, *, warmup_steps: int = 0, free_bits: float = 0.0, reduction: str = "dim",
              dequantize: float = 0.0) -> Callable:
    r"""The negative ELBO of the two-layer :class:`jaxgen.models.vae.HierarchicalVAE`, one sample of
    ``z2 ~ q(z2|x)`` then ``z1 ~ q(z1|x, z2)`` per data point:

    .. math:: \mathcal{L} = \mathbb{E}_x\big[-\log p(x|z_1) + \beta_t\,(\mathrm{KL}(q(z_2|x) \,\|\, N(0, I))
              + \mathrm{KL}(q(z_1|x, z_2) \,\|\, p(z_1|z_2)))\big]

    (the ELBO of a two-layer hierarchical VAE, e.g. Sønderby et al. 2016, "Ladder Variational Autoencoders": both
    KLs of diagonal Gaussians in closed form, the
    second at the sampled ``z2``). ``beta``, ``warmup_steps``, ``free_bits`` (over the ``d1 + d2`` latent
    dimensions), ``reduction`` and ``dequantize`` as in :func:`vae_loss`.
    """
    _check_args("hvae_loss", beta, warmup_steps, free_bits, reduction, dequantize)

    def loss(model, batch, key: Array, step: Array | None = None) -> Array:
        x, key = _data(batch, key, dequantize, "hvae_loss")
        k2, k1 = jax.random.split(key)
        h = model.features(x)
        m2, lv2 = model.posterior_top(h)
        z2 = reparameterize(k2, m2, lv2)
        m1, lv1 = model.posterior_bottom(h, z2)
        z1 = reparameterize(k1, m1, lv1)
        pm1, plv1 = model.prior_bottom(z2)
        recon = -jnp.mean(model.reconstruction_log_prob(x, z1))
        kl_terms = jnp.concatenate([gaussian_kl_diag(m1, lv1, pm1, plv1), kl_standard_normal(m2, lv2)], axis=-1)
        kl = free_bits_kl(kl_terms, free_bits)
        return _reduce(recon + kl_weight(beta, warmup_steps, step) * kl, x, reduction)

    return loss


def iwae_loss(num_samples: int = 8, *, reduction: str = "dim", dequantize: float = 0.0) -> Callable:
    r"""The IWAE objective ``-E_x L_K(x)`` (Burda et al. 2016, eq. 8 and sec. 3: its reparameterised gradient
    weights each sample's by its normalised importance weight), for any model with ``log_prob_iwae``; ``K = 1`` is
    :func:`vae_loss` with ``beta = 1`` in expectation (with a Monte Carlo KL). ``reduction`` and ``dequantize`` as
    in :func:`vae_loss`."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise ValueError(f"iwae_loss: num_samples must be a positive int (K importance samples), got {num_samples!r}.")
    _check_args("iwae_loss", reduction=reduction, dequantize=dequantize)

    def loss(model, batch, key: Array) -> Array:
        x, key = _data(batch, key, dequantize, "iwae_loss")
        return _reduce(-jnp.mean(model.log_prob_iwae(x, key, int(num_samples))), x, reduction)

    return loss


__all__ = ["vae_loss", "hvae_loss", "iwae_loss", "kl_weight", "REDUCTIONS"]
