r"""Variational autoencoders (Flax NNX): a Gaussian-latent VAE (Kingma & Welling 2014) with a Gaussian or Bernoulli
decoder, and a two-layer hierarchical VAE; MLPs for vector data, small convolutional networks for images.

Both models expose the same methods, which the losses (:mod:`jaxgen.losses.vae`) and the latent generative models
call: ``encode(x) -> (mean, logvar)`` (the top posterior), ``decode(z)`` (the decoder's parameters),
``reconstruction_log_prob(x, z)`` (``log p(x | z)``, shape ``(B,)``), ``sample(key, n)``,
``log_prob_iwae(x, key, num_samples)`` (Burda et al. 2016's bound, shape ``(B,)``), and the latent interface
``encode_latent(x)`` / ``decode_latent(z)`` with ``latent_shape`` (the VQ-VAE's too).

Decoders. ``"gaussian"``: ``p(x|z) = N(mu(z), diag sigma^2)`` with a learned per-dimension (per-pixel) log-scale,
softly floored at ``min_log_scale`` so that constant pixels cannot drive the density to infinity. ``"bernoulli"``:
for data in ``[-1, 1]`` the targets are the grey levels ``(x + 1) / 2`` in ``[0, 1]``, read as probabilities;
its "likelihood" is the cross-entropy of those targets, **not a density of x** (no bits/dim from it), and its
samples are the decoder's probabilities mapped back to ``[-1, 1]``.
"""

from __future__ import annotations

import math

import numpy as np
import jax
import jax.numpy as jnp
from flax import nnx

from jaxgen.likelihood.variational import (bernoulli_log_prob, gaussian_log_prob, gaussian_log_prob_logvar,
                                           iwae_bound, reparameterize)
from jaxgen.models.layers import Conv2d

Array = jax.Array

DECODERS = ("gaussian", "bernoulli")
LOGVAR_BOUND = 10.0  # encoder and prior log-variances are softly kept in (-10, 10): std in (0.0067, 148)


def _soft_clip(x: Array, bound: float) -> Array:
    """``bound * tanh(x / bound)``: the identity near 0, smoothly saturating at ``+-bound`` (gradients never vanish
    abruptly, unlike ``clip``)."""
    return bound * jnp.tanh(x / bound)


def _positive_int(value, name: str, owner: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}.")
    return int(value)


def _check_shape(shape, owner: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise ValueError(f"{owner}: shape must be a tuple such as (2,) or (8, 8, 1), got {shape!r}.") from None
    if len(shape) not in (1, 3) or min(shape) < 1:
        raise ValueError(f"{owner}: shape must be (D,) for vectors or (H, W, C) for images, got {shape}.")
    if len(shape) == 3 and (shape[0] % 4 or shape[1] % 4):
        raise ValueError(f"{owner}: the convolutional networks halve the image twice, so H and W must be multiples "
                         f"of 4; got shape {shape}. Pad the images or flatten them to a vector shape (H*W*C,).")
    return shape


class _MLP(nnx.Module):
    """``depth`` hidden Linear + SiLU layers of width ``width``, then a linear output."""

    def __init__(self, n_in: int, n_out: int, width: int, depth: int, *, rngs: nnx.Rngs):
        sizes = [n_in] + [width] * depth
        self.hidden = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
        self.out = nnx.Linear(sizes[-1], n_out, rngs=rngs)

    def __call__(self, h: Array) -> Array:
        for layer in self.hidden:
            h = nnx.silu(layer(h))
        return self.out(h)


class Encoder(nnx.Module):
    """``x (B, *shape) -> (B, n_out)``: an MLP on flattened vectors; for images ``(H, W, C)`` three 3x3 convolutions
    (channels ``c, 2c, 2c``; the last two with stride 2, so ``H/4 x W/4``) then an MLP head."""

    def __init__(self, shape, n_out: int, *, width: int, depth: int, channels: int, rngs: nnx.Rngs):
        self.shape = tuple(shape)
        if len(self.shape) == 3:
            h, w, c = self.shape
            self.convs = nnx.List([Conv2d(c, channels, 3, rngs=rngs),
                                   Conv2d(channels, 2 * channels, 3, stride=2, rngs=rngs),
                                   Conv2d(2 * channels, 2 * channels, 3, stride=2, rngs=rngs)])
            self.head = _MLP((h // 4) * (w // 4) * 2 * channels, n_out, width, max(depth - 2, 1), rngs=rngs)
        else:
            self.convs = None
            self.head = _MLP(self.shape[0], n_out, width, depth, rngs=rngs)

    def __call__(self, x: Array) -> Array:
        h = x
        if self.convs is not None:
            for conv in self.convs:
                h = nnx.silu(conv(h))
        return self.head(h.reshape(h.shape[0], -1))


def _upsample(x: Array) -> Array:
    """Nearest-neighbour 2x upsampling of ``(B, H, W, C)``."""
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class Decoder(nnx.Module):
    """``z (B, n_in) -> (B, *shape)``: an MLP for vectors; for images an MLP to a ``H/4 x W/4 x 2c`` map, then twice
    nearest-neighbour upsampling + 3x3 convolution, and a 3x3 output convolution to ``C`` channels."""

    def __init__(self, shape, n_in: int, *, width: int, depth: int, channels: int, rngs: nnx.Rngs):
        self.shape = tuple(shape)
        if len(self.shape) == 3:
            h, w, c = self.shape
            self.base = ((h // 4), (w // 4), 2 * channels)
            self.head = _MLP(n_in, math.prod(self.base), width, max(depth - 2, 1), rngs=rngs)
            self.convs = nnx.List([Conv2d(2 * channels, 2 * channels, 3, rngs=rngs),
                                   Conv2d(2 * channels, channels, 3, rngs=rngs)])
            self.out = Conv2d(channels, c, 3, rngs=rngs)
        else:
            self.head = _MLP(n_in, self.shape[0], width, depth, rngs=rngs)
            self.convs = None

    def __call__(self, z: Array) -> Array:
        h = self.head(z)
        if self.convs is None:
            return h
        h = nnx.silu(h).reshape((z.shape[0],) + self.base)
        for conv in self.convs:
            h = nnx.silu(conv(_upsample(h)))
        return self.out(h)


class _VAEBase(nnx.Module):
    """The observation model shared by the VAEs: the decoder network and its likelihood."""

    def _init_decoder(self, shape, n_latent, decoder, width, depth, channels, log_scale_init, min_log_scale,
                      learn_scale, rngs):
        owner = type(self).__name__
        if decoder not in DECODERS:
            raise ValueError(f"{owner}: decoder must be one of {DECODERS}, got {decoder!r}.")
        if not (np.isfinite(log_scale_init) and np.isfinite(min_log_scale) and log_scale_init > min_log_scale):
            raise ValueError(f"{owner}: need finite log_scale_init > min_log_scale (the decoder's log-scale floor), "
                             f"got log_scale_init={log_scale_init}, min_log_scale={min_log_scale}.")
        self.shape = shape
        self.decoder_kind = decoder
        self.min_log_scale = float(min_log_scale)
        self.decoder = Decoder(shape, n_latent, width=width, depth=depth, channels=channels, rngs=rngs)
        # log_scale = floor + softplus(raw - floor): raw = the initial value gives log_scale ~ log_scale_init
        gap = float(log_scale_init) - float(min_log_scale)
        raw = float(min_log_scale) + math.log(math.expm1(gap)) if gap < 30 else float(log_scale_init)
        raw = jnp.full(shape, raw, jnp.float32)
        if decoder == "bernoulli":  # no scale to learn
            self.log_scale_raw = None
        else:
            self.log_scale_raw = nnx.Param(raw) if learn_scale else nnx.Variable(raw)

    def _check_x(self, x: Array) -> None:
        if tuple(jnp.shape(x)[1:]) != self.shape or jnp.ndim(x) != len(self.shape) + 1:
            raise ValueError(f"{type(self).__name__} was built for samples of shape {self.shape}; got x of shape "
                             f"{tuple(jnp.shape(x))}. Pass a batch (B, {', '.join(map(str, self.shape))}).")

    def _check_z(self, z: Array, dim: int, what: str) -> None:
        if jnp.ndim(z) != 2 or jnp.shape(z)[1] != dim:
            raise ValueError(f"{type(self).__name__}: {what} must have shape (B, {dim}), got {tuple(jnp.shape(z))}.")

    def log_scale(self) -> Array:
        """The Gaussian decoder's log-scale, shape ``shape``: ``floor + softplus(raw - floor)``."""
        if self.log_scale_raw is None:
            raise ValueError(f"{type(self).__name__}: the Bernoulli decoder has no scale; log_scale() is the "
                             "Gaussian decoder's.")
        m = self.min_log_scale
        return m + jax.nn.softplus(self.log_scale_raw[...] - m)

    def decode(self, z: Array):
        """The decoder's parameters at latents ``z``: ``(mean, log_scale)`` (both ``(B, *shape)``) for the Gaussian
        decoder, the logits ``(B, *shape)`` for the Bernoulli one."""
        out = self.decoder(z)
        if self.decoder_kind == "bernoulli":
            return out
        return out, jnp.broadcast_to(self.log_scale(), out.shape)

    def reconstruction_log_prob(self, x: Array, z: Array) -> Array:
        """``log p(x | z)`` summed over the data dimensions, shape ``(B,)``, nats (Bernoulli: of the targets
        ``(x + 1) / 2``, clipped to ``[0, 1]``; see the module docstring)."""
        self._check_x(x)
        params = self.decode(z)
        if self.decoder_kind == "bernoulli":
            return bernoulli_log_prob(jnp.clip((x + 1.0) / 2.0, 0.0, 1.0), params)
        return gaussian_log_prob(x, *params)

    def decoder_mean(self, z: Array) -> Array:
        """The decoder's mean in data space: ``mu(z)``, or ``2 sigmoid(logits) - 1`` for the Bernoulli decoder."""
        params = self.decode(z)
        return 2.0 * jax.nn.sigmoid(params) - 1.0 if self.decoder_kind == "bernoulli" else params[0]

    def _decoder_sample(self, key: Array, z: Array, noise: bool) -> Array:
        if not noise:
            return self.decoder_mean(z)
        params = self.decode(z)
        if self.decoder_kind == "bernoulli":
            return 2.0 * jax.random.bernoulli(key, jax.nn.sigmoid(params)).astype(params.dtype) - 1.0
        mean, log_scale = params
        return mean + jnp.exp(log_scale) * jax.random.normal(key, mean.shape, mean.dtype)

    def _iwae(self, x: Array, key: Array, num_samples: int, chunk: int, log_weight) -> Array:
        self._check_x(x)
        k = _positive_int(num_samples, "num_samples", f"{type(self).__name__}.log_prob_iwae")
        chunk = _positive_int(chunk, "chunk", f"{type(self).__name__}.log_prob_iwae")
        log_w = jax.lax.map(log_weight, jax.random.split(key, k), batch_size=min(chunk, k))  # (K, B)
        return iwae_bound(log_w, axis=0)


class GaussianVAE(_VAEBase):
    r"""A VAE with a diagonal Gaussian posterior ``q(z|x) = N(m(x), diag exp(logvar(x)))``, prior ``N(0, I)`` and a
    Gaussian or Bernoulli decoder (Kingma & Welling 2014; with ``beta != 1`` in the loss, the beta-VAE of Higgins et
    al. 2017).

    Args:
      shape: one sample's shape: ``(D,)`` (MLP encoder/decoder) or ``(H, W, C)`` with ``H, W`` multiples of 4
        (convolutional encoder/decoder, :class:`jaxgen.models.layers.Conv2d`).
      latent_dim: the latent size.
      decoder: ``"gaussian"`` (learned per-dimension log-scale) or ``"bernoulli"`` (data in ``[-1, 1]``; module
        docstring).
      width, depth: the MLPs' hidden width and number of hidden layers (images: the heads use ``depth - 2``, at
        least one).
      channels: base channel count of the convolutional networks (default ``max(8, width // 2)``).
      log_scale_init, min_log_scale: the Gaussian decoder's initial log-scale and its soft floor.
      learn_scale: learn the decoder's log-scale (else it stays at ``log_scale_init``).
      rngs: the parameters' random streams.
    """

    def __init__(self, shape, latent_dim: int, *, decoder: str = "gaussian", width: int = 64, depth: int = 2,
                 channels: int | None = None, log_scale_init: float = 0.0, min_log_scale: float = -6.0,
                 learn_scale: bool = True, rngs: nnx.Rngs):
        owner = "GaussianVAE"
        shape = _check_shape(shape, owner)
        self.latent_dim = _positive_int(latent_dim, "latent_dim", owner)
        width, depth = _positive_int(width, "width", owner), _positive_int(depth, "depth", owner)
        channels = _positive_int(max(8, width // 2) if channels is None else channels, "channels", owner)
        self.encoder = Encoder(shape, 2 * self.latent_dim, width=width, depth=depth, channels=channels, rngs=rngs)
        self._init_decoder(shape, self.latent_dim, decoder, width, depth, channels, log_scale_init, min_log_scale,
                           learn_scale, rngs)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """The shape of one sample's latent from :meth:`encode_latent`: ``(latent_dim,)``."""
        return (self.latent_dim,)

    def encode(self, x: Array) -> tuple[Array, Array]:
        """The posterior ``q(z|x)``: ``(mean, logvar)``, each ``(B, latent_dim)``."""
        self._check_x(x)
        mean, logvar = jnp.split(self.encoder(x), 2, axis=-1)
        return mean, _soft_clip(logvar, LOGVAR_BOUND)

    def encode_latent(self, x: Array) -> Array:
        """The deterministic latent of ``x`` for a latent generative model: the posterior mean, ``(B, latent_dim)``."""
        return self.encode(x)[0]

    def decode_latent(self, z: Array, *, key: Array | None = None) -> Array:
        """Latents ``(B, latent_dim)`` to data space: the decoder's mean (:meth:`decoder_mean`), or with a ``key`` a
        draw from ``p(x|z)``."""
        self._check_z(z, self.latent_dim, "z")
        return self.decoder_mean(z) if key is None else self._decoder_sample(key, z, True)

    def sample(self, key: Array, n: int, *, noise: bool = False) -> Array:
        """``n`` samples: ``z ~ N(0, I)``, then the decoder's mean (``noise=True``: a draw from ``p(x|z)``)."""
        n = _positive_int(n, "n", "GaussianVAE.sample")
        k_z, k_x = jax.random.split(key)
        z = jax.random.normal(k_z, (n, self.latent_dim), jnp.float32)
        return self._decoder_sample(k_x, z, noise)

    def log_prob_iwae(self, x: Array, key: Array, num_samples: int = 64, *, chunk: int = 16) -> Array:
        r"""The importance-weighted bound ``L_K(x) <= log p(x)`` per sample, shape ``(B,)``, nats (Burda et al.
        2016, eq. 8): ``log w_k = log p(x|z_k) + log N(z_k; 0, I) - log q(z_k|x)``, ``z_k ~ q(z|x)``. ``K = 1`` is an
        unbiased estimate of the ELBO. The ``K`` draws are evaluated ``chunk`` at a time (memory)."""
        mean, logvar = self.encode(x)

        def log_weight(k):
            z = reparameterize(k, mean, logvar)
            return (self.reconstruction_log_prob(x, z) + gaussian_log_prob(z, 0.0, 0.0)
                    - gaussian_log_prob_logvar(z, mean, logvar))

        return self._iwae(x, key, num_samples, chunk, log_weight)


class HierarchicalVAE(_VAEBase):
    r"""A VAE with two stochastic layers: ``z1`` near the data, ``z2`` on top.

    Generative model: ``p(z2) = N(0, I)``, ``p(z1 | z2) = N(mu_p(z2), diag exp(logvar_p(z2)))`` (learned),
    ``p(x | z1)`` (Gaussian or Bernoulli decoder). Inference runs top-down, in the generative order:
    ``q(z2 | x) q(z1 | x, z2)``, both diagonal Gaussians computed from one deterministic encoding ``h(x)``
    (``q(z1|x, z2)`` reads ``[h(x), z2]``; the top-down inference of Sønderby et al. 2016 without their
    precision-weighted merge). The ELBO (:func:`jaxgen.losses.vae.hvae_loss`) is
    ``E_q[log p(x|z1)] - KL(q(z2|x) || p(z2)) - E_{q(z2|x)} KL(q(z1|x,z2) || p(z1|z2))``, both KLs in closed form.

    Args:
      shape, decoder, width, depth, channels, log_scale_init, min_log_scale, learn_scale, rngs: as
        :class:`GaussianVAE`.
      latent_dims: ``(d1, d2)``, the sizes of ``z1`` and ``z2``.
    """

    def __init__(self, shape, latent_dims: tuple[int, int] = (8, 4), *, decoder: str = "gaussian", width: int = 64,
                 depth: int = 2, channels: int | None = None, log_scale_init: float = 0.0,
                 min_log_scale: float = -6.0, learn_scale: bool = True, rngs: nnx.Rngs):
        owner = "HierarchicalVAE"
        shape = _check_shape(shape, owner)
        try:
            d1, d2 = latent_dims
        except (TypeError, ValueError):
            raise ValueError(f"{owner}: latent_dims must be a pair (d1, d2) (z1 near the data, z2 on top), got "
                             f"{latent_dims!r}.") from None
        self.latent_dims = (_positive_int(d1, "latent_dims[0]", owner), _positive_int(d2, "latent_dims[1]", owner))
        width, depth = _positive_int(width, "width", owner), _positive_int(depth, "depth", owner)
        channels = _positive_int(max(8, width // 2) if channels is None else channels, "channels", owner)
        self.encoder = Encoder(shape, width, width=width, depth=depth, channels=channels, rngs=rngs)
        self.q_top = _MLP(width, 2 * d2, width, 1, rngs=rngs)
        self.q_bottom = _MLP(width + d2, 2 * d1, width, 1, rngs=rngs)
        self.p_bottom = _MLP(d2, 2 * d1, width, 1, rngs=rngs)
        self._init_decoder(shape, d1, decoder, width, depth, channels, log_scale_init, min_log_scale, learn_scale,
                           rngs)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """The shape of one sample's latent from :meth:`encode_latent` (the top latent ``z2``): ``(d2,)``."""
        return (self.latent_dims[1],)

    @staticmethod
    def _gaussian(out: Array) -> tuple[Array, Array]:
        mean, logvar = jnp.split(out, 2, axis=-1)
        return mean, _soft_clip(logvar, LOGVAR_BOUND)

    def features(self, x: Array) -> Array:
        """The deterministic encoding ``h(x)``, ``(B, width)``, shared by both posteriors."""
        self._check_x(x)
        return nnx.silu(self.encoder(x))

    def posterior_top(self, h: Array) -> tuple[Array, Array]:
        """``q(z2 | x)`` from ``h = features(x)``: ``(mean, logvar)``, each ``(B, d2)``."""
        return self._gaussian(self.q_top(h))

    def posterior_bottom(self, h: Array, z2: Array) -> tuple[Array, Array]:
        """``q(z1 | x, z2)`` from ``h = features(x)`` and ``z2``: ``(mean, logvar)``, each ``(B, d1)``."""
        self._check_z(z2, self.latent_dims[1], "z2")
        return self._gaussian(self.q_bottom(jnp.concatenate([h, z2], axis=-1)))

    def prior_bottom(self, z2: Array) -> tuple[Array, Array]:
        """The learned prior ``p(z1 | z2)``: ``(mean, logvar)``, each ``(B, d1)``."""
        self._check_z(z2, self.latent_dims[1], "z2")
        return self._gaussian(self.p_bottom(z2))

    def encode(self, x: Array) -> tuple[Array, Array]:
        """The top posterior ``q(z2 | x)``: ``(mean, logvar)``, each ``(B, d2)``."""
        return self.posterior_top(self.features(x))

    def encode_latent(self, x: Array) -> Array:
        """The deterministic latent of ``x`` for a latent generative model: the mean of ``q(z2|x)``, ``(B, d2)``."""
        return self.encode(x)[0]

    def decode_latent(self, z2: Array, *, key: Array | None = None) -> Array:
        """Top latents ``(B, d2)`` to data space: ``z1`` = the mean of ``p(z1|z2)``, then the decoder's mean; with a
        ``key``, ancestral draws ``z1 ~ p(z1|z2)``, ``x ~ p(x|z1)`` instead."""
        if key is None:
            return self.decoder_mean(self.prior_bottom(z2)[0])
        k1, kx = jax.random.split(key)
        return self._decoder_sample(kx, reparameterize(k1, *self.prior_bottom(z2)), True)

    def sample(self, key: Array, n: int, *, noise: bool = False) -> Array:
        """Ancestral sampling: ``z2 ~ N(0, I)``, ``z1 ~ p(z1|z2)``, then the decoder's mean (``noise=True``: a draw
        from ``p(x|z1)``)."""
        n = _positive_int(n, "n", "HierarchicalVAE.sample")
        k2, k1, kx = jax.random.split(key, 3)
        z2 = jax.random.normal(k2, (n, self.latent_dims[1]), jnp.float32)
        z1 = reparameterize(k1, *self.prior_bottom(z2))
        return self._decoder_sample(kx, z1, noise)

    def log_prob_iwae(self, x: Array, key: Array, num_samples: int = 64, *, chunk: int = 16) -> Array:
        r"""The importance-weighted bound per sample, shape ``(B,)``, nats (Burda et al. 2016, eq. 8, with their
        two-layer proposal): ``log w = log p(x|z1) + log p(z1|z2) + log p(z2) - log q(z2|x) - log q(z1|x, z2)``."""
        h = self.features(x)
        m2, lv2 = self.posterior_top(h)

        def log_weight(k):
            k2, k1 = jax.random.split(k)
            z2 = reparameterize(k2, m2, lv2)
            m1, lv1 = self.posterior_bottom(h, z2)
            z1 = reparameterize(k1, m1, lv1)
            pm1, plv1 = self.prior_bottom(z2)
            return (self.reconstruction_log_prob(x, z1) + gaussian_log_prob_logvar(z1, pm1, plv1)
                    + gaussian_log_prob(z2, 0.0, 0.0) - gaussian_log_prob_logvar(z2, m2, lv2)
                    - gaussian_log_prob_logvar(z1, m1, lv1))

        return self._iwae(x, key, num_samples, chunk, log_weight)


__all__ = ["GaussianVAE", "HierarchicalVAE", "Encoder", "Decoder", "DECODERS"]
