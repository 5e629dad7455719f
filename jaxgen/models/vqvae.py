r"""VQ-VAE networks (Flax NNX): a vector quantiser with an EMA or a trained codebook, and VQ-VAEs for 2-D data (MLPs)
and small images (convolutions), after van den Oord et al. 2017, "Neural Discrete Representation Learning".

The mathematics (nearest code, straight-through estimator, EMA update, usage statistics, the loss) is in
:mod:`jaxgen.losses.vq`; this module holds the state. With ``ema=True`` the codebook is an :class:`EMACodebook`, a
non-parameter ``nnx.Variable`` that the *training* forward pass (``update=True``) moves by exponential moving averages
(appendix A.1); :class:`jaxgen.training.Trainer` carries it, with the other running statistics (:class:`CodebookStats`),
in its ``rest`` state. With ``ema=False`` the codebook is an ``nnx.Param`` trained by the loss's codebook term.
Either way the training pass keeps EMAs of the code frequencies, overall and per latent position: the unigram prior
that :meth:`VQVAE.sample` draws codes from (independently per position; a real prior over the code grid is a
separate model, e.g. flow matching on :meth:`VQVAE.encode_latent`).

Dead codes (never chosen) are not restarted: with an EMA codebook a code no vector picks keeps its place until its
cluster size ``N_i`` decays to the smoothing ``epsilon`` (about ``log(epsilon) / log(decay)`` updates, 1,150 at the
defaults), then shrinks towards the origin, where it may be picked again. :meth:`VQVAE.sample` never draws them.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import jax
import jax.numpy as jnp
from flax import nnx

from jaxgen.losses.vq import ema_codebook_update, nearest_code, straight_through
from jaxgen.models.layers import Conv2d
from jaxgen.models.mlp import ACTIVATIONS

Array = jax.Array


class EMACodebook(nnx.Variable):
    """A codebook moved by exponential moving averages in the training forward pass, not by gradients (so not an
    ``nnx.Param``: optimizers leave it alone, and the trainer carries it as non-parameter state)."""


class CodebookStats(nnx.Variable):
    """Running statistics of a codebook, updated in the training forward pass: EMA cluster sizes and sums, and the
    EMA code frequencies (overall and per latent position) that serve as a unigram prior."""


class Quantized(NamedTuple):
    """A quantiser's output: ``z_q`` the straight-through quantisation (value ``codes``, gradient to ``z_e``),
    ``codes`` the nearest code vectors (their gradient reaches a trained codebook), ``indices`` their indices."""

    z_q: Array
    codes: Array
    indices: Array


class VQVAEOutput(NamedTuple):
    """A VQ-VAE forward pass: the reconstruction ``D(z_q)``, the encoder output ``z_e``, its straight-through
    quantisation ``z_q``, the nearest codes and their indices."""

    reconstruction: Array
    z_e: Array
    z_q: Array
    codes: Array
    indices: Array


def _positive_int(value, name: str, owner: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}.")
    return int(value)


def _check_decay_eps(decay, eps, owner: str) -> None:
    if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= decay < 1.0:
        raise ValueError(f"{owner}: decay must be a number in [0, 1) (0.99 in the paper), got {decay!r}.")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"{owner}: eps (Laplace smoothing) must be a number > 0 such as 1e-5, got {eps!r}.")


def _depth_to_space(h: Array) -> Array:
    """``(B, H, W, 4 C) -> (B, 2 H, 2 W, C)``: channel ``(a, b, c)`` goes to pixel ``(2 i + a, 2 j + b)`` (the
    sub-pixel convolution's shuffle; Shi et al. 2016)."""
    b, hh, ww, c4 = h.shape
    c = c4 // 4
    return h.reshape(b, hh, ww, 2, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * hh, 2 * ww, c)


class VectorQuantizer(nnx.Module):
    r"""Nearest-neighbour vector quantisation with a straight-through gradient (van den Oord et al. 2017, sec. 3.1).

    ``quantizer(z_e, update=False)`` maps each vector of ``z_e`` (shape ``(..., D)``) to its nearest code
    ``e_k``, ``k = argmin_k ||z_e - e_k||`` (eq. 1), and returns :class:`Quantized` with
    ``z_q = z_e + sg(e_k - z_e)``. With ``update=True`` (a Python bool: the training pass only) it also updates the
    running statistics, and with ``ema=True`` the codebook, by :func:`jaxgen.losses.vq.ema_codebook_update`
    (appendix A.1, Laplace-smoothed), from the codes assigned with the codebook as it was before the update.

    The codebook starts as ``N(0, 1/D)`` vectors (norm about 1). The EMA state starts as if each code had been
    chosen once at its initial place (``N_i = 1``, ``m_i = e_i``), so the first update has no empty cluster to divide
    by and the data's counts (``B`` times the latent positions per step) soon dominate.

    Args:
      num_codes: ``K``.
      code_dim: ``D``.
      ema: EMA codebook (non-parameter :class:`EMACodebook`) if True, else a trained ``nnx.Param``.
      decay: ``gamma`` of the EMAs (codebook and code frequencies).
      eps: Laplace smoothing of the EMA cluster sizes.
    """

    def __init__(self, num_codes: int, code_dim: int, *, ema: bool = True, decay: float = 0.99, eps: float = 1e-5,
                 rngs: nnx.Rngs):
        owner = "VectorQuantizer"
        self.num_codes = _positive_int(num_codes, "num_codes", owner)
        self.code_dim = _positive_int(code_dim, "code_dim", owner)
        if not isinstance(ema, bool):
            raise ValueError(f"{owner}: ema must be True or False, got {ema!r}.")
        _check_decay_eps(decay, eps, owner)
        self.ema, self.decay, self.eps = ema, float(decay), float(eps)
        init = jax.random.normal(rngs.params(), (self.num_codes, self.code_dim), jnp.float32) / math.sqrt(code_dim)
        self.codebook = EMACodebook(init) if ema else nnx.Param(init)
        self.embed_sum = CodebookStats(jnp.array(init)) if ema else None
        self.cluster_size = CodebookStats(jnp.ones((self.num_codes,), jnp.float32))

    @property
    def embeddings(self) -> Array:
        """The codebook, ``(K, D)``."""
        return self.codebook[...]

    def lookup(self, indices: Array) -> Array:
        """The code vectors ``e_k`` of ``indices`` (any shape), shape ``indices.shape + (D,)``."""
        return jnp.take(self.codebook[...], indices, axis=0)

    def usage(self) -> Array:
        """The EMA code frequencies ``N_i / sum_j N_j`` (shape ``(K,)``), the unigram prior over codes."""
        n = self.cluster_size[...]
        return n / jnp.maximum(jnp.sum(n), 1e-12)

    def __call__(self, z_e: Array, *, update: bool = False) -> Quantized:
        if not isinstance(update, bool):
            raise ValueError(f"VectorQuantizer: update must be a Python bool (True only in the training pass), got "
                             f"{type(update).__name__}.")
        if jnp.shape(z_e)[-1:] != (self.code_dim,):
            raise ValueError(f"VectorQuantizer: z_e must have last axis code_dim = {self.code_dim}, got shape "
                             f"{tuple(jnp.shape(z_e))}.")
        e = self.codebook[...]
        indices = nearest_code(jax.lax.stop_gradient(z_e), jax.lax.stop_gradient(e))
        codes = jnp.take(e, indices, axis=0)
        if update:
            self.update(z_e, indices)
        return Quantized(straight_through(z_e, codes), codes, indices)

    def update(self, z_e: Array, indices: Array) -> None:
        """The training-time state update: EMA cluster sizes (always) and, with ``ema=True``, sums and codebook."""
        if self.ema:
            n, m, e = ema_codebook_update(self.cluster_size[...], self.embed_sum[...], z_e, indices,
                                          decay=self.decay, eps=self.eps)
            self.cluster_size[...], self.embed_sum[...], self.codebook[...] = n, m, e
        else:
            counts = jnp.sum(jax.nn.one_hot(jnp.reshape(indices, (-1,)), self.num_codes, dtype=jnp.float32), 0)
            self.cluster_size[...] = self.decay * self.cluster_size[...] + (1.0 - self.decay) * counts


class VQVAE(nnx.Module):
    r"""A VQ-VAE (van den Oord et al. 2017): encoder ``z_e(x)``, :class:`VectorQuantizer`, decoder ``D(z_q)``.

    * 2-D (vector) data, ``shape = (d,)``: MLP encoder and decoder (``depth`` hidden layers of ``width``); the latent is
      ``latents`` code vectors, shape ``(latents, code_dim)``.
    * Images, ``shape = (H, W, C)``: a convolutional encoder (3x3 convolutions, ``downsample`` stride-2 stages, the
      first on the image itself, then ``depth - 1`` convolutions and a 1x1 projection) to a
      ``(H / 2^downsample, W / 2^downsample, code_dim)`` grid of code vectors, and a decoder mirroring it (3x3
      convolutions, nearest upsampling, and a last sub-pixel convolution: ``4 C`` channels at half resolution shuffled
      into ``2x2`` pixels), all with :class:`jaxgen.models.layers.Conv2d` (matrix products on the CPU). No convolution
      runs at full resolution with ``width`` outputs, which keeps the digits model cheap. The digits ``(8, 8, 1)``
      become a 4x4 grid (``downsample=1``) or a 2x2 grid (``downsample=2``).

    The decoder's output is linear (no squashing). Calls take batches ``(B, *shape)``. ``model(x, update=True)`` is
    the training pass (it moves the EMA codebook and the code-frequency statistics; see
    :func:`jaxgen.losses.vq.vqvae_loss`); every other method leaves the state alone.

    Interface for a prior over the latent (e.g. latent flow matching): :meth:`encode_latent` gives the quantised code
    vectors, a float array of shape ``(B, *latent_shape)``, and :meth:`decode_latent` snaps any such array to the
    nearest codes and decodes it.
    """

    def __init__(self, shape: tuple[int, ...], *, num_codes: int = 64, code_dim: int = 8, width: int = 64,
                 depth: int = 2, latents: int = 2, downsample: int = 1, ema: bool = True, decay: float = 0.99,
                 eps: float = 1e-5, activation: str = "silu", rngs: nnx.Rngs):
        owner = "VQVAE"
        shape = tuple(int(s) for s in shape)
        if len(shape) not in (1, 3) or min(shape, default=0) < 1:
            raise ValueError(f"{owner}: shape must be (d,) for vectors or (H, W, C) for images, got {shape}.")
        width = _positive_int(width, "width", owner)
        depth = _positive_int(depth, "depth", owner)
        if activation not in ACTIVATIONS:
            raise ValueError(f"{owner}: unknown activation {activation!r}; choose from {sorted(ACTIVATIONS)}.")
        if len(shape) == 1:
            latents = _positive_int(latents, "latents", owner)
        else:
            downsample = _positive_int(downsample, "downsample", owner)
            if shape[0] % 2 ** downsample or shape[1] % 2 ** downsample:
                raise ValueError(f"{owner}: downsample={downsample} halves the image {downsample} times, so H and W "
                                 f"must be divisible by {2 ** downsample}; got shape {shape}. Use a smaller "
                                 "downsample.")
        self.shape, self.activation, self.ema = shape, activation, bool(ema)
        self.quantizer = VectorQuantizer(num_codes, code_dim, ema=ema, decay=decay, eps=eps, rngs=rngs)
        d = self.quantizer.code_dim
        if len(shape) == 1:
            self.latent_shape = (latents, d)
            enc = [shape[0]] + [width] * depth
            dec = [latents * d] + [width] * depth
            self.encoder = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(enc[:-1], enc[1:])]
                                    + [nnx.Linear(width, latents * d, rngs=rngs)])
            self.decoder = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(dec[:-1], dec[1:])]
                                    + [nnx.Linear(width, shape[0], rngs=rngs)])
        else:
            h, w, c = shape
            f = 2 ** downsample
            self.latent_shape = (h // f, w // f, d)
            self.encoder = nnx.List([Conv2d(c, width, 3, stride=2, rngs=rngs)]
                                    + [Conv2d(width, width, 3, stride=2, rngs=rngs) for _ in range(downsample - 1)]
                                    + [Conv2d(width, width, 3, rngs=rngs) for _ in range(depth - 1)]
                                    + [Conv2d(width, d, 1, rngs=rngs)])
            self.decoder = nnx.List([Conv2d(d, width, 3, rngs=rngs)]
                                    + [Conv2d(width, width, 3, rngs=rngs) for _ in range(depth - 1)]
                                    + [Conv2d(width, width, 3, rngs=rngs) for _ in range(downsample - 1)]
                                    + [Conv2d(width, 4 * c, 3, rngs=rngs)])
        self.downsample = downsample if len(shape) == 3 else 0
        # EMA of the per-position code frequencies: the unigram prior of `sample`
        positions = self.latent_shape[:-1]
        self.position_usage = CodebookStats(jnp.full(positions + (self.num_codes,), 1.0 / self.num_codes, jnp.float32))

    # -- sizes ---------------------------------------------------------------------------------------------
    @property
    def num_codes(self) -> int:
        return self.quantizer.num_codes

    @property
    def code_dim(self) -> int:
        return self.quantizer.code_dim

    # -- the three parts -----------------------------------------------------------------------------------
    def _check_x(self, x: Array) -> None:
        if jnp.ndim(x) != len(self.shape) + 1 or tuple(jnp.shape(x)[1:]) != self.shape:
            raise ValueError(f"VQVAE was built for samples of shape {self.shape}; got x of shape "
                             f"{tuple(jnp.shape(x))} (expected (B, {', '.join(map(str, self.shape))})).")

    def _check_latent(self, z: Array, what: str) -> None:
        if jnp.ndim(z) != len(self.latent_shape) + 1 or tuple(jnp.shape(z)[1:]) != self.latent_shape:
            raise ValueError(f"VQVAE: {what} must have shape (B, {', '.join(map(str, self.latent_shape))}) (the "
                             f"latent shape), got {tuple(jnp.shape(z))}.")

    def encode(self, x: Array) -> Array:
        """The encoder output ``z_e(x)``, shape ``(B, *latent_shape)``."""
        self._check_x(x)
        act = ACTIVATIONS[self.activation]
        h = x
        for layer in self.encoder[:-1]:
            h = act(layer(h))
        z = self.encoder[-1](h)
        return z.reshape((x.shape[0],) + self.latent_shape)

    def quantize(self, z_e: Array, *, update: bool = False) -> Quantized:
        """Nearest codes of ``z_e`` (:class:`VectorQuantizer`); ``update=True`` only in training."""
        self._check_latent(z_e, "z_e")
        q = self.quantizer(z_e, update=update)
        if update:
            onehot = jax.nn.one_hot(q.indices, self.num_codes, dtype=jnp.float32)
            decay = self.quantizer.decay
            self.position_usage[...] = decay * self.position_usage[...] + (1.0 - decay) * jnp.mean(onehot, 0)
        return q

    def decode(self, z_q: Array) -> Array:
        """The decoder ``D(z_q)``, shape ``(B, *shape)``."""
        self._check_latent(z_q, "the decoder's input")
        act = ACTIVATIONS[self.activation]
        b = z_q.shape[0]
        if len(self.shape) == 1:
            h = z_q.reshape(b, -1)
            for layer in self.decoder[:-1]:
                h = act(layer(h))
            return self.decoder[-1](h)
        up_from = len(self.decoder) - self.downsample  # the layers after a nearest upsampling
        h = z_q
        for i, layer in enumerate(self.decoder[:-1]):
            if i >= up_from:
                h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
            h = act(layer(h))
        return _depth_to_space(self.decoder[-1](h))

    def __call__(self, x: Array, *, update: bool = False) -> VQVAEOutput:
        z_e = self.encode(x)
        q = self.quantize(z_e, update=update)
        return VQVAEOutput(self.decode(q.z_q), z_e, q.z_q, q.codes, q.indices)

    # -- latents and codes -------------------------------------------------------------------------------
    def encode_latent(self, x: Array) -> Array:
        """The quantised code vectors of ``x`` (no state update), a float array ``(B, *latent_shape)`` on which a
        prior model can be trained."""
        return self.quantize(self.encode(x)).codes

    def decode_latent(self, z: Array) -> Array:
        """Snap ``z`` (``(B, *latent_shape)``, e.g. a prior model's sample) to the nearest codes and decode them."""
        self._check_latent(z, "z")
        return self.decode(self.quantizer.lookup(nearest_code(z, self.quantizer.embeddings)))

    def code_indices(self, x: Array) -> Array:
        """The code indices of ``x``, int32 of shape ``(B, *latent_shape[:-1])``."""
        return self.quantize(self.encode(x)).indices

    def decode_indices(self, indices: Array) -> Array:
        """Decode a grid of code indices ``(B, *latent_shape[:-1])``."""
        if tuple(jnp.shape(indices)[1:]) != self.latent_shape[:-1]:
            raise ValueError(f"VQVAE: indices must have shape (B, {', '.join(map(str, self.latent_shape[:-1]))}), "
                             f"got {tuple(jnp.shape(indices))}.")
        return self.decode(self.quantizer.lookup(indices))

    # -- the unigram prior -------------------------------------------------------------------------------
    def code_prior(self, *, per_position: bool = True) -> Array:
        """The EMA code frequencies learnt in training: per latent position, shape ``(*latent_shape[:-1], K)``, or
        overall (the quantiser's cluster sizes), shape ``(K,)``. Each sums to 1."""
        if per_position:
            p = self.position_usage[...]
            return p / jnp.maximum(jnp.sum(p, -1, keepdims=True), 1e-12)
        return self.quantizer.usage()

    def sample_indices(self, key: Array, num: int, *, per_position: bool = True) -> Array:
        """``num`` code grids with every position drawn independently from :meth:`code_prior` (a unigram prior)."""
        num = _positive_int(num, "num", "VQVAE.sample_indices")
        p = self.code_prior(per_position=per_position)
        logits = jnp.where(p > 0, jnp.log(jnp.maximum(p, 1e-30)), -jnp.inf)
        logits = jnp.broadcast_to(logits, (num,) + self.latent_shape[:-1] + (self.num_codes,))
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)

    def sample(self, key: Array, num: int, *, per_position: bool = True) -> Array:
        """Decoded samples of independent codes from the unigram prior, shape ``(num, *shape)``."""
        return self.decode_indices(self.sample_indices(key, num, per_position=per_position))


__all__ = ["VQVAE", "VectorQuantizer", "EMACodebook", "CodebookStats", "Quantized", "VQVAEOutput"]
