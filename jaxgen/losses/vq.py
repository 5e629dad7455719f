r"""Vector quantisation (VQ-VAE): nearest-code assignment, the straight-through estimator, the EMA codebook update,
codebook-usage statistics and the VQ-VAE objective (van den Oord et al. 2017, "Neural Discrete Representation
Learning"; the EMA update of their appendix A.1 with the Laplace smoothing of Razavi et al. 2019, "Generating Diverse
High-Fidelity Images with VQ-VAE-2").

Pure functions of arrays (no Flax): the network that calls them is :class:`jaxgen.models.vqvae.VQVAE`, and
:func:`vqvae_loss` only calls the module it is given. Shapes: encoder outputs ``z`` of shape ``(..., D)``, a codebook
``e`` of shape ``(K, D)``, code indices of shape ``(...)`` with values in ``[0, K)``.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import jax
import jax.numpy as jnp

from jaxgen._checks import check_key, check_number
from jaxgen.losses.regression import split_batch

Array = jax.Array

_EPS = 1e-12


def _check_codebook(z: Array, codebook: Array, owner: str) -> None:
    if jnp.ndim(codebook) != 2:
        raise ValueError(f"{owner}: the codebook must have shape (K, D), got {tuple(jnp.shape(codebook))}.")
    if jnp.ndim(z) < 1 or jnp.shape(z)[-1] != jnp.shape(codebook)[1]:
        raise ValueError(f"{owner}: vectors of shape {tuple(jnp.shape(z))} do not match the codebook's code dimension "
                         f"D = {jnp.shape(codebook)[1]}; the last axis of z must be D.")


def squared_distances(z: Array, codebook: Array) -> Array:
    r"""``||z - e_k||^2`` for every code ``k``: shape ``(..., K)``, computed as ``||z||^2 - 2 z.e_k + ||e_k||^2`` (one
    matrix product) and floored at 0 against rounding."""
    _check_codebook(z, codebook, "squared_distances")
    d = (jnp.sum(z * z, -1, keepdims=True) - 2.0 * jnp.einsum("...d,kd->...k", z, codebook)
         + jnp.sum(codebook * codebook, -1))
    return jnp.maximum(d, 0.0)


def nearest_code(z: Array, codebook: Array) -> Array:
    r"""The index of the nearest code, ``k(z) = argmin_k ||z - e_k||_2`` (van den Oord et al. 2017, eq. 1), shape
    ``z.shape[:-1]``, int32 (ties go to the lowest index)."""
    return jnp.argmin(squared_distances(z, codebook), axis=-1).astype(jnp.int32)


def straight_through(z_e: Array, q: Array) -> Array:
    r"""The straight-through estimator ``z_q = z_e + sg(q - z_e)`` (van den Oord et al. 2017, sec. 3.2; Bengio et al.
    2013): its value is ``q`` (the quantised vector) and its gradient is copied to ``z_e`` unchanged, so for any ``f``,
    ``d f(z_q) / d z_e = f'(q)``."""
    if jnp.shape(z_e) != jnp.shape(q):
        raise ValueError(f"straight_through: z_e {tuple(jnp.shape(z_e))} and q {tuple(jnp.shape(q))} must have the "
                         "same shape.")
    return z_e + jax.lax.stop_gradient(q - z_e)


def ema_codebook_update(cluster_size: Array, embed_sum: Array, z: Array, indices: Array, *, decay: float | Array,
                        eps: float = 1e-5) -> tuple[Array, Array, Array]:
    r"""One exponential-moving-average step of the codebook (van den Oord et al. 2017, appendix A.1):

    .. math::
        N_i \leftarrow \gamma N_i + (1 - \gamma) n_i, \quad
        m_i \leftarrow \gamma m_i + (1 - \gamma) \sum_{j: k(z_j) = i} z_j, \quad
        e_i = m_i / \tilde N_i,

    where ``n_i`` counts the vectors assigned to code ``i`` in this batch, and ``\tilde N_i = (N_i + \epsilon) /
    (n + K \epsilon) \, n`` with ``n = \sum_i N_i`` is the Laplace-smoothed cluster size (DeepMind Sonnet's
    ``VectorQuantizerEMA``, the update Razavi et al. 2019 use), which keeps a code nobody chose from a division by
    zero while leaving the total mass ``n`` unchanged. The stored ``N`` is the unsmoothed average. With ``decay = 0``
    one step is one Lloyd (k-means) iteration, and the k-means fixed point (every code at the mean of its cluster,
    ``N_i = n_i``) is a fixed point for every decay, both up to the smoothing's ``O(epsilon)`` shift.

    Args:
      cluster_size: ``N``, shape ``(K,)``.
      embed_sum: ``m``, shape ``(K, D)``.
      z: the encoder outputs, ``(..., D)`` (gradients are stopped).
      indices: their codes, ``z.shape[:-1]``.
      decay: ``gamma`` in ``[0, 1)``.
      eps: the Laplace smoothing ``epsilon > 0``.

    Returns:
      ``(N, m, e)``: the new cluster sizes, sums and codebook ``e = m / N~``.
    """
    if jnp.ndim(cluster_size) != 1 or jnp.shape(embed_sum) != (jnp.shape(cluster_size)[0], jnp.shape(z)[-1]):
        raise ValueError(f"ema_codebook_update: cluster_size {tuple(jnp.shape(cluster_size))} must be (K,) and "
                         f"embed_sum {tuple(jnp.shape(embed_sum))} must be (K, D) with D = z.shape[-1] = "
                         f"{jnp.shape(z)[-1]}.")
    if jnp.shape(indices) != jnp.shape(z)[:-1]:
        raise ValueError(f"ema_codebook_update: indices {tuple(jnp.shape(indices))} must have z's shape without its "
                         f"last axis, {tuple(jnp.shape(z)[:-1])}.")
    k, d = embed_sum.shape
    flat = jax.lax.stop_gradient(z).reshape(-1, d).astype(embed_sum.dtype)
    onehot = jax.nn.one_hot(jnp.reshape(indices, (-1,)), k, dtype=embed_sum.dtype)  # (M, K)
    counts, sums = jnp.sum(onehot, 0), onehot.T @ flat
    cluster_size = decay * cluster_size + (1.0 - decay) * counts
    embed_sum = decay * embed_sum + (1.0 - decay) * sums
    n = jnp.sum(cluster_size)
    smoothed = (cluster_size + eps) / (n + k * eps) * n
    return cluster_size, embed_sum, embed_sum / jnp.maximum(smoothed, _EPS)[:, None]


def code_histogram(indices: Array, num_codes: int) -> Array:
    r"""The empirical code frequencies ``p_k = #{j: index_j = k} / M`` over every index given, shape ``(K,)``
    (summing to 1)."""
    if isinstance(num_codes, bool) or not isinstance(num_codes, (int, np.integer)) or num_codes < 1:
        raise ValueError(f"code_histogram: num_codes must be a positive int, got {num_codes!r}.")
    if jnp.size(indices) == 0:
        raise ValueError("code_histogram: no indices given (an empty batch).")
    onehot = jax.nn.one_hot(jnp.reshape(indices, (-1,)), num_codes, dtype=jnp.float32)
    return jnp.mean(onehot, 0)


def _check_probs(probs: Array, owner: str) -> Array:
    probs = jnp.asarray(probs, jnp.float32)
    if probs.ndim < 1:
        raise ValueError(f"{owner}: expected code frequencies of shape (..., K), got a scalar; pass "
                         "code_histogram(indices, K).")
    return probs / jnp.maximum(jnp.sum(probs, -1, keepdims=True), _EPS)


def perplexity(probs: Array) -> Array:
    r"""The codebook perplexity ``exp(-sum_k p_k log p_k)`` (Sonnet's VQ-VAE; the exponentiated entropy): ``K`` for
    uniform usage of ``K`` codes, 1 when one code takes every vector. ``probs`` (frequencies or counts, normalised
    here) has shape ``(..., K)``; ``0 log 0 = 0``."""
    p = _check_probs(probs, "perplexity")
    return jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.maximum(p, _EPS)), 0.0), -1))


def codes_used(probs: Array, threshold: float = 0.0) -> Array:
    r"""The fraction of the ``K`` codes whose frequency exceeds ``threshold`` (default: codes used at least once)."""
    p = _check_probs(probs, "codes_used")
    return jnp.mean((p > threshold).astype(jnp.float32), -1)


def vqvae_loss(commitment: float = 0.25, *, codebook_loss: bool | None = None,
               update_codebook: bool = True) -> Callable[[Any, Any, Array], Array]:
    r"""The VQ-VAE objective (van den Oord et al. 2017, eq. 3):

    .. math::
        L = \| x - D(z_q(x)) \|^2 + \| sg[z_e(x)] - e \|^2 + \beta \| z_e(x) - sg[e] \|^2,

    each term a mean over elements (the reconstruction over pixels or coordinates, the codebook and commitment terms
    over latent components), with ``e`` the nearest codes and ``z_q`` the straight-through quantisation. The codebook
    term trains a codebook that is a parameter; with an EMA codebook (appendix A.1) it is dropped, because the
    codebook then moves by :func:`ema_codebook_update` during the forward pass (``update=True``; the trainer carries
    that non-parameter state).

    The model is any module called as ``model(x, update=bool)`` returning an object with ``reconstruction`` (the
    shape of ``x``), ``z_e`` and ``codes`` (the encoder outputs and their nearest codes, one shape), and with an
    attribute ``ema`` (bool): :class:`jaxgen.models.vqvae.VQVAE`.

    Args:
      commitment: ``beta >= 0`` (0.25 in the paper).
      codebook_loss: add the codebook term; ``None`` (default) adds it exactly when ``model.ema`` is False.
      update_codebook: call the model with ``update=True`` (the training forward pass: EMA codebook and code-usage
        statistics move). Use ``False`` to evaluate the loss without changing the model's state.

    Returns:
      ``loss(model, batch, key) -> scalar``; labels in the batch are ignored (the key is unused: the objective is
      deterministic).
    """
    check_number(commitment, lambda v: v >= 0, name="commitment", owner="vqvae_loss", what="a finite number >= 0 "
                 "(the paper's beta = 0.25)")
    if codebook_loss is not None and not isinstance(codebook_loss, bool):
        raise ValueError(f"vqvae_loss: codebook_loss must be True, False or None (follow model.ema), got "
                         f"{codebook_loss!r}.")

    def loss(model, batch, key: Array) -> Array:
        x, _ = split_batch(batch, owner="vqvae_loss")
        check_key(key, owner="vqvae_loss")
        with_codebook = codebook_loss
        if with_codebook is None:
            if not hasattr(model, "ema"):
                raise ValueError("vqvae_loss: the model has no attribute 'ema' to say whether its codebook is a "
                                 "parameter; pass vqvae_loss(codebook_loss=True/False) or use "
                                 "jaxgen.models.vqvae.VQVAE.")
            with_codebook = not bool(model.ema)
        out = model(x, update=update_codebook)
        for name in ("reconstruction", "z_e", "codes"):
            if not hasattr(out, name):
                raise ValueError(f"vqvae_loss: model(x, update=...) must return an object with a {name!r} field "
                                 f"(like jaxgen.models.vqvae.VQVAEOutput), got {type(out).__name__}.")
        if out.reconstruction.shape != x.shape:
            raise ValueError(f"vqvae_loss: the reconstruction has shape {tuple(out.reconstruction.shape)} but the data "
                             f"{tuple(x.shape)}.")
        value = jnp.mean((out.reconstruction - x) ** 2)
        value = value + commitment * jnp.mean((out.z_e - jax.lax.stop_gradient(out.codes)) ** 2)
        if with_codebook:
            value = value + jnp.mean((jax.lax.stop_gradient(out.z_e) - out.codes) ** 2)
        return value

    return loss


__all__ = ["squared_distances", "nearest_code", "straight_through", "ema_codebook_update", "code_histogram",
           "perplexity", "codes_used", "vqvae_loss"]
