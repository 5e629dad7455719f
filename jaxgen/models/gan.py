r"""Generative adversarial networks (Flax NNX): a :class:`GAN` container of a generator and a critic, MLP players for
low-dimensional data, small DCGAN-style convolutional players for images, and spectral normalisation.

The container's attributes are named ``generator`` and ``critic``, so the trainer's parameter filters
``nnx.PathContains("generator")`` / ``nnx.PathContains("critic")`` select one player each; the objectives are in
:mod:`jaxgen.losses.gan` and the two players take turns as two :class:`jaxgen.training.Update` s.

Spectral normalisation (Miyato et al. 2018, "Spectral Normalization for Generative Adversarial Networks") divides a
layer's weight by an estimate of its largest singular value, kept by one power iteration per training forward pass;
its vector ``u`` is module state (:class:`PowerIterationVector`, not a parameter), which the trainer carries in
``rest``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import jax
import jax.numpy as jnp
from flax import nnx

from jaxgen.models.layers import Conv2d, _conv_matmul, _upsample_conv_matmul

Array = jax.Array


class PowerIterationVector(nnx.Variable):
    """The left singular vector estimate ``u`` of a spectrally normalised weight (module state, not a parameter:
    no gradient, no optimizer; it changes in the forward pass)."""


def _normalize(v: Array, eps: float) -> Array:
    """``v / max(||v||, eps)`` (Miyato et al. 2018, Algorithm 1's l2 normalisation, floored)."""
    return v / jnp.maximum(jnp.linalg.norm(v), eps)


def power_iteration(matrix: Array, u: Array, steps: int = 1, eps: float = 1e-12) -> tuple[Array, Array]:
    r"""``steps`` power iterations for the top singular pair of ``W = matrix^T`` (Miyato et al. 2018, Algorithm 1):
    ``v <- W^T u / ||W^T u||``, ``u <- W v / ||W v||``.

    Args:
      matrix: the kernel as a ``(n_in, n_out)`` matrix ``K = W^T`` (Flax's layout, a convolution's reshaped).
      u: the current estimate, shape ``(n_out,)``.
      steps: number of iterations (>= 1).
      eps: floor of the norms.

    Returns:
      ``(u, v)`` of shapes ``(n_out,)`` and ``(n_in,)``; ``sigma(W) ~ u^T W v = v^T K u`` (eq. 8's estimate).
    """
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"power_iteration steps must be a positive int, got {steps!r}.")
    for _ in range(steps):
        v = _normalize(matrix @ u, eps)
        u = _normalize(matrix.T @ v, eps)
    return u, v


class SpectralNorm(nnx.Module):
    r"""Spectral normalisation of a dense (``nnx.Linear``) or convolutional (:class:`jaxgen.models.layers.Conv2d`)
    layer: the layer computes with ``W_SN = W / sigma(W)`` (Miyato et al. 2018, eq. 8), ``sigma`` estimated as
    ``u^T W v`` by power iteration (Algorithm 1). A convolution's kernel ``(k, k, C_in, C_out)`` is normalised as the
    ``(k k C_in, C_out)`` matrix (the paper's reshaping).

    In training mode (the default; ``model.train()``) every forward pass runs ``n_power_iterations`` power
    iterations from the stored ``u`` (gradient-free, as in the paper: ``u`` and ``v`` are constants for
    backpropagation, so ``d sigma / d W = u v^T``) and stores the new ``u``; the trainer carries it from step to step.
    In evaluation mode (``model.eval()``) nothing is stored: ``v = W^T u / ||W^T u||`` and ``sigma = u^T W v =
    ||W^T u||`` from the stored ``u``. A forward pass traced inside a transform of its own (e.g. the input gradient of
    a gradient penalty) cannot write module state and also uses the stored ``u``.

    Args:
      layer: the ``nnx.Linear`` or ``Conv2d`` to normalise (its ``kernel`` parameter stays the trained one).
      n_power_iterations: power iterations per training forward pass (1 in the paper).
      eps: floor of the norms and of ``sigma``.
      rngs: for ``u``'s random initialisation (a uniformly random unit vector).
    """

    def __init__(self, layer: nnx.Module, *, n_power_iterations: int = 1, eps: float = 1e-12, rngs: nnx.Rngs):
        if not isinstance(layer, (nnx.Linear, Conv2d)):
            raise ValueError(f"SpectralNorm wraps an nnx.Linear or a jaxgen Conv2d, got {type(layer).__name__}; "
                             "normalise the dense or convolutional layers of a network one by one.")
        if isinstance(n_power_iterations, bool) or not isinstance(n_power_iterations, (int, np.integer)) \
                or n_power_iterations < 1:
            raise ValueError(f"SpectralNorm n_power_iterations must be a positive int, got {n_power_iterations!r}.")
        self.layer = layer
        self.n_power_iterations = int(n_power_iterations)
        self.eps = float(eps)
        self.deterministic = False
        n_out = layer.kernel.shape[-1]
        self.u = PowerIterationVector(_normalize(jax.random.normal(rngs.params(), (n_out,), jnp.float32), eps))

    def _matrix(self) -> Array:
        k = self.layer.kernel[...]
        return k.reshape(-1, k.shape[-1])

    def sigma(self, *, update: bool = False) -> Array:
        r"""The estimate ``sigma(W) = u^T W v`` (differentiable in ``W``); with ``update`` one training step of the
        power iteration first, storing the new ``u``."""
        k = self._matrix()
        u = jax.lax.stop_gradient(self.u[...])
        if update:
            u, v = power_iteration(jax.lax.stop_gradient(k), u, self.n_power_iterations, self.eps)
            self.u[...] = u
        else:
            v = _normalize(jax.lax.stop_gradient(k) @ u, self.eps)
        return jnp.maximum(v @ (k @ u), self.eps)

    def normalized_kernel(self, *, update: bool = False) -> Array:
        """``W / sigma(W)`` in the kernel's shape."""
        return self.layer.kernel[...] / self.sigma(update=update)

    def _updates(self) -> bool:
        # In training mode, and only where this module's state may be written (not inside a nested transform).
        return not self.deterministic and getattr(self.u, "_can_update", True)

    def __call__(self, x: Array) -> Array:
        kernel = self.normalized_kernel(update=self._updates())
        layer = self.layer
        if isinstance(layer, nnx.Linear):
            y = x @ kernel.astype(x.dtype)
            return y + layer.bias[...].astype(y.dtype) if layer.bias is not None else y
        dtype = jnp.result_type(x.dtype, kernel.dtype)
        x, kernel = x.astype(dtype), kernel.astype(dtype)
        if layer.resolved_impl() == "matmul":
            y = _conv_matmul(x, kernel, layer.stride)
        else:
            pad = (kernel.shape[0] - 1) // 2
            y = jax.lax.conv_general_dilated(x, kernel, (layer.stride, layer.stride), ((pad, pad), (pad, pad)),
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + layer.bias[...].astype(dtype)


def _maybe_sn(layer: nnx.Module, spectral_norm: bool, rngs: nnx.Rngs) -> nnx.Module:
    return SpectralNorm(layer, rngs=rngs) if spectral_norm else layer


def _positive_int(value: Any, name: str, owner: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{owner} {name} must be a positive integer, got {value!r}.")
    return int(value)


class MLPGenerator(nnx.Module):
    """``G(z)``: an MLP from ``latent_dim`` noise to ``dim``-dimensional samples (``depth`` ReLU layers of width
    ``width``, linear output), for low-dimensional data."""

    def __init__(self, latent_dim: int, dim: int, *, width: int = 128, depth: int = 3, rngs: nnx.Rngs):
        for name, v in (("latent_dim", latent_dim), ("dim", dim), ("width", width), ("depth", depth)):
            _positive_int(v, name, "MLPGenerator")
        sizes = [latent_dim] + [width] * depth
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
        self.out = nnx.Linear(width, dim, rngs=rngs)
        self.latent_dim = latent_dim

    def __call__(self, z: Array) -> Array:
        h = z
        for layer in self.layers:
            h = nnx.relu(layer(h))
        return self.out(h)


class MLPCritic(nnx.Module):
    """``D(x)``: an MLP from ``dim``-dimensional samples to one score per sample, shape ``(B,)`` (``depth`` leaky-ReLU
    layers, slope 0.2, linear output; a logit for the minimax objectives, a critic value for the Wasserstein ones).
    No normalisation across the batch, so per-sample input gradients (WGAN-GP) are exact. ``spectral_norm``
    normalises every layer (SN-GAN)."""

    def __init__(self, dim: int, *, width: int = 128, depth: int = 3, spectral_norm: bool = False, rngs: nnx.Rngs):
        for name, v in (("dim", dim), ("width", width), ("depth", depth)):
            _positive_int(v, name, "MLPCritic")
        sizes = [dim] + [width] * depth
        self.layers = nnx.List([_maybe_sn(nnx.Linear(a, b, rngs=rngs), spectral_norm, rngs)
                                for a, b in zip(sizes[:-1], sizes[1:])])
        self.out = _maybe_sn(nnx.Linear(width, 1, rngs=rngs), spectral_norm, rngs)

    def __call__(self, x: Array) -> Array:
        h = x.reshape(x.shape[0], -1)
        for layer in self.layers:
            h = nnx.leaky_relu(layer(h), 0.2)
        return self.out(h)[:, 0]


def _upsample_conv(conv: Conv2d, x: Array) -> Array:
    """``conv(nearest_upsample_2x(x))`` for a stride-1 3x3 ``conv``; on CPU at the input's resolution (the sub-pixel
    form of :func:`jaxgen.models.layers._upsample_conv_matmul`, 16 instead of 36 multiply-adds per pixel)."""
    if conv.resolved_impl() == "matmul" and conv.kernel.shape[:2] == (3, 3) and conv.stride == 1:
        dtype = jnp.result_type(x.dtype, conv.kernel.dtype)
        return _upsample_conv_matmul(x.astype(dtype), conv.kernel[...].astype(dtype)) + conv.bias[...].astype(dtype)
    return conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class ConvGenerator(nnx.Module):
    r"""``G(z)``: a small DCGAN-style image generator (Radford et al. 2016) for ``(H, W, C)`` images with ``H, W``
    divisible by 4: a dense layer to ``(H/4, W/4, 2 ch)`` and ReLU, then nearest 2x upsampling, a 3x3 convolution
    (``2 ch -> ch``) and ReLU, then 2x upsampling, a 3x3 convolution to ``C`` channels and ``tanh`` (images in
    ``[-1, 1]``). Upsampling then convolving replaces DCGAN's transposed convolutions (no checkerboard artefacts,
    Odena et al. 2016); no batch norm (a sample does not depend on the batch it is drawn in)."""

    def __init__(self, latent_dim: int, shape: tuple[int, int, int], *, channels: int = 32, rngs: nnx.Rngs):
        _positive_int(latent_dim, "latent_dim", "ConvGenerator")
        _positive_int(channels, "channels", "ConvGenerator")
        if len(shape) != 3 or shape[0] % 4 or shape[1] % 4:
            raise ValueError(f"ConvGenerator needs an image shape (H, W, C) with H and W divisible by 4, got {shape}.")
        self.shape = tuple(int(s) for s in shape)
        self.latent_dim = latent_dim
        h, w, c = self.shape
        self.base = (h // 4, w // 4, 2 * channels)
        self.dense = nnx.Linear(latent_dim, math.prod(self.base), rngs=rngs)
        self.conv = Conv2d(2 * channels, channels, 3, rngs=rngs)
        self.out = Conv2d(channels, c, 3, rngs=rngs)

    def __call__(self, z: Array) -> Array:
        h = nnx.relu(self.dense(z)).reshape((z.shape[0],) + self.base)
        h = nnx.relu(_upsample_conv(self.conv, h))
        return jnp.tanh(_upsample_conv(self.out, h))


class ConvCritic(nnx.Module):
    r"""``D(x)``: a small DCGAN-style image critic: two stride-2 3x3 convolutions (``C -> ch -> 2 ch``, halving the
    resolution each, no pooling) with leaky ReLU (0.2) and a dense output, one score per image, shape ``(B,)``. No
    batch norm (WGAN-GP's penalty needs per-sample gradients, Gulrajani et al. 2017 sec. 4); ``spectral_norm``
    normalises every layer (SN-GAN)."""

    def __init__(self, shape: tuple[int, int, int], *, channels: int = 32, spectral_norm: bool = False,
                 rngs: nnx.Rngs):
        _positive_int(channels, "channels", "ConvCritic")
        if len(shape) != 3:
            raise ValueError(f"ConvCritic needs an image shape (H, W, C), got {shape}.")
        h, w, c = (int(s) for s in shape)
        self.conv0 = _maybe_sn(Conv2d(c, channels, 3, stride=2, rngs=rngs), spectral_norm, rngs)
        self.conv1 = _maybe_sn(Conv2d(channels, 2 * channels, 3, stride=2, rngs=rngs), spectral_norm, rngs)
        flat = math.ceil(math.ceil(h / 2) / 2) * math.ceil(math.ceil(w / 2) / 2) * 2 * channels
        self.out = _maybe_sn(nnx.Linear(flat, 1, rngs=rngs), spectral_norm, rngs)

    def __call__(self, x: Array) -> Array:
        h = nnx.leaky_relu(self.conv0(x), 0.2)
        h = nnx.leaky_relu(self.conv1(h), 0.2)
        return self.out(h.reshape(h.shape[0], -1))[:, 0]


class GAN(nnx.Module):
    """A generator and a critic (discriminator) in one module, the object the trainer trains.

    Attributes:
      generator: ``G(z)``, ``z`` of shape ``(B, latent_dim)`` to samples ``(B, *shape)``.
      critic: ``D(x)``, samples to scores ``(B,)`` (logits or critic values, by the objective).
      latent_dim: the noise size; ``z ~ N(0, I)``.
    """

    def __init__(self, generator: nnx.Module, critic: nnx.Module, latent_dim: int):
        self.generator = generator
        self.critic = critic
        self.latent_dim = _positive_int(latent_dim, "latent_dim", "GAN")

    def sample_latent(self, key: Array, num: int) -> Array:
        """``z ~ N(0, I)`` of shape ``(num, latent_dim)``."""
        return jax.random.normal(key, (num, self.latent_dim))

    def sample(self, key: Array, num: int) -> Array:
        """``num`` samples ``G(z)``, one generator pass."""
        return self.generator(self.sample_latent(key, num))


def make_gan(shape: tuple[int, ...], *, latent_dim: int = 8, width: int = 128, depth: int = 3,
             spectral_norm: bool = False, rngs: nnx.Rngs) -> GAN:
    """A :class:`GAN` for samples of ``shape``: MLP players for vectors ``(d,)``, convolutional ones (``width`` base
    channels) for images ``(H, W, C)``; ``spectral_norm`` normalises every critic layer."""
    shape = tuple(int(s) for s in shape)
    if len(shape) == 1:
        gen = MLPGenerator(latent_dim, shape[0], width=width, depth=depth, rngs=rngs)
        critic = MLPCritic(shape[0], width=width, depth=depth, spectral_norm=spectral_norm, rngs=rngs)
    elif len(shape) == 3:
        gen = ConvGenerator(latent_dim, shape, channels=width, rngs=rngs)
        critic = ConvCritic(shape, channels=width, spectral_norm=spectral_norm, rngs=rngs)
    else:
        raise ValueError(f"make_gan builds MLP players for vectors (d,) and convolutional ones for images (H, W, C); "
                         f"got shape {shape}.")
    return GAN(gen, critic, latent_dim)


__all__ = ["GAN", "SpectralNorm", "PowerIterationVector", "power_iteration", "MLPGenerator", "MLPCritic",
           "ConvGenerator", "ConvCritic", "make_gan"]
