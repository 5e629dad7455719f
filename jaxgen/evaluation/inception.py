r"""The Inception-v3 network of FID and the Inception Score, in Flax NNX: ``FIDInceptionV3``, FID, IS and features.

The network is the "pt_inception-2015-12-05" Inception-v3 that the TensorFlow FID code of Heusel et al. (NeurIPS 2017)
and pytorch-fid (``mseitzer/pytorch-fid``, whose weights file this module reads through
:mod:`jaxgen.evaluation.inception_weights`) use: Szegedy et al., "Rethinking the Inception Architecture for Computer
Vision" (CVPR 2016), with that graph's quirks: 3x3 average pools in the A, C and first E blocks that divide by the
number of *valid* pixels (TensorFlow's ``SAME`` pooling; ``count_include_pad=False``), a 3x3 *max* pool in the last E
block (``Mixed_7c``), batch normalisation with ``eps = 1e-3``, and a 1008-way classifier. Its outputs:

* the 2048-d global-average-pooled features (``pool_3``) that FID is computed from;
* the 1008 logits of the ``fc`` layer; the Inception Score (Salimans et al., "Improved Techniques for Training GANs",
  NeurIPS 2016) is computed, as in OpenAI's original code and torch-fidelity, from the logits without the bias
  (``unbiased=True``, TF's ``softmax/logits/MatMul``) over all 1008 classes.

Input: channels-last images ``(B, H, W, C)`` with ``C`` = 3 (RGB) or 1 (grey, replicated), values in ``input_range``
(default ``(-1, 1)``, jaxgen's image convention), resized bilinearly to ``299 x 299`` (half-pixel centres, no
antialiasing: ``F.interpolate(..., mode="bilinear", align_corners=False)`` as pytorch-fid) and mapped linearly to
``[-1, 1]``. ``width`` scales every layer's channels (``max(1, floor(c * width + 1/2))``; 1 is the real network) and
``resize_to`` the input size (at least 75), so tests can run a tiny random network of the same structure.

Convolutions call ``lax.conv_general_dilated`` directly: the network needs valid-padded, strided and ``1x7`` /
``7x1`` convolutions, which :class:`jaxgen.models.layers.Conv2d` (odd square kernels, "same" padding) does not cover,
and it only runs forward, where XLA's native convolutions are the fast path on GPUs and TPUs.

Example::

    from jaxgen.evaluation.inception_weights import load_inception
    net = load_inception("pt_inception-2015-12-05-6726825d.pth")        # or JAXGEN_INCEPTION_WEIGHTS
    fid = inception_fid(samples, real_images, network=net)              # images (N, H, W, 3) in [-1, 1]
    is_mean, is_std = inception_score(samples, network=net)
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import numpy as np
import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import ArrayLike

from jaxgen.metrics.frechet import _batched, feature_moments, frechet_distance_from_features

Array = jax.Array

__all__ = [
    "FIDInceptionV3",
    "inception_preprocess",
    "inception_feature_fn",
    "inception_outputs",
    "inception_fid",
    "inception_reference_moments",
    "inception_score",
    "inception_score_from_logits",
    "scaled_channels",
]


def scaled_channels(c: int, width: float) -> int:
    """Channels of a layer with ``c`` channels in the real network, at width multiplier ``width``."""
    return max(1, int(math.floor(c * width + 0.5)))


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class Conv(nnx.Module):
    """A bias-free 2-D convolution of channels-last images, ``kernel`` HWIO (``lax.conv_general_dilated``)."""

    def __init__(self, cin: int, cout: int, kernel, *, stride: int = 1, padding=0, precision=None):
        kh, kw = _pair(kernel)
        ph, pw = _pair(padding)
        self.kernel = nnx.Param(np.zeros((kh, kw, cin, cout), np.float32))  # filled by the initialiser or the weights
        self.stride, self.padding, self.precision = int(stride), ((ph, ph), (pw, pw)), precision

    def __call__(self, x: Array) -> Array:
        return jax.lax.conv_general_dilated(x, self.kernel[...], (self.stride, self.stride), self.padding,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=self.precision)


class BatchNorm(nnx.Module):
    r"""Inference batch normalisation :math:`(x - \mu) \gamma / \sqrt{\sigma^2 + \epsilon} + \beta` with the running
    statistics (``mean``, ``var``: ``nnx.BatchStat``) and ``eps = 1e-3`` of the FID graph (Ioffe & Szegedy 2015)."""

    def __init__(self, channels: int, epsilon: float = 1e-3):
        self.scale = nnx.Param(np.ones((channels,), np.float32))
        self.bias = nnx.Param(np.zeros((channels,), np.float32))
        self.mean = nnx.BatchStat(np.zeros((channels,), np.float32))
        self.var = nnx.BatchStat(np.ones((channels,), np.float32))
        self.epsilon = float(epsilon)

    def __call__(self, x: Array) -> Array:
        a = self.scale[...] * jax.lax.rsqrt(self.var[...] + self.epsilon)
        return x * a + (self.bias[...] - self.mean[...] * a)


class Linear(nnx.Module):
    """``x @ kernel + bias`` with ``kernel`` of shape ``(in, out)``."""

    def __init__(self, cin: int, cout: int, *, precision=None):
        self.kernel = nnx.Param(np.zeros((cin, cout), np.float32))
        self.bias = nnx.Param(np.zeros((cout,), np.float32))
        self.precision = precision

    def __call__(self, x: Array) -> Array:
        return jnp.matmul(x, self.kernel[...], precision=self.precision) + self.bias[...]


class BasicConv2d(nnx.Module):
    """``conv (no bias) -> batch norm (running statistics, eps 1e-3) -> relu``: torchvision's ``BasicConv2d``, with
    parameters ``conv.kernel`` (HWIO) and ``bn.scale / bias / mean / var``."""

    def __init__(self, cin: int, cout: int, kernel, *, stride: int = 1, padding=0, precision=None):
        self.conv = Conv(cin, cout, kernel, stride=stride, padding=padding, precision=precision)
        self.bn = BatchNorm(cout)

    def __call__(self, x: Array) -> Array:
        return jax.nn.relu(self.bn(self.conv(x)))


def _lecun_normal_init(network: nnx.Module, key: Array) -> None:
    """Every ``kernel`` ~ N(0, 1 / fan_in) (LeCun et al. 1998), from one draw (one small compiled program, rather than
    one per kernel shape)."""
    layers = [m for _, m in nnx.iter_graph(network) if isinstance(m, (Conv, Linear))]
    sizes = [int(np.prod(m.kernel.get_value().shape)) for m in layers]
    z = np.asarray(jax.random.normal(key, (sum(sizes),), jnp.float32))
    start = 0
    for m, n in zip(layers, sizes):
        shape = m.kernel.get_value().shape
        m.kernel.set_value((z[start:start + n].reshape(shape) / np.sqrt(np.prod(shape[:-1]))).astype(np.float32))
        start += n


def _max_pool(x: Array, stride: int, pad: int = 0) -> Array:
    """3x3 max pool (padding with -inf, as ``F.max_pool2d``)."""
    p = ((0, 0), (pad, pad), (pad, pad), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, stride, stride, 1), p)


def _avg_pool_valid(x: Array) -> Array:
    """3x3 stride-1 average pool that divides by the number of in-image pixels (``count_include_pad=False``)."""
    p = ((0, 0), (1, 1), (1, 1), (0, 0))
    total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), p)
    ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
    count = jax.lax.reduce_window(ones, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), p)
    return total / count


class FIDInceptionA(nnx.Module):
    """Mixed_5b/c/d: 1x1 | 1x1 -> 5x5 | 1x1 -> 3x3 -> 3x3 | valid-pixel 3x3 avg pool -> 1x1."""

    def __init__(self, cin: int, pool_features: int, width: float, precision):
        c = functools.partial(scaled_channels, width=width)
        conv = functools.partial(BasicConv2d, precision=precision)
        self.branch1x1 = conv(cin, c(64), 1)
        self.branch5x5_1 = conv(cin, c(48), 1)
        self.branch5x5_2 = conv(c(48), c(64), 5, padding=2)
        self.branch3x3dbl_1 = conv(cin, c(64), 1)
        self.branch3x3dbl_2 = conv(c(64), c(96), 3, padding=1)
        self.branch3x3dbl_3 = conv(c(96), c(96), 3, padding=1)
        self.branch_pool = conv(cin, c(pool_features), 1)
        self.out_channels = c(64) + c(64) + c(96) + c(pool_features)

    def __call__(self, x: Array) -> Array:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([self.branch1x1(x), b5, b3, self.branch_pool(_avg_pool_valid(x))], axis=-1)


class InceptionB(nnx.Module):
    """Mixed_6a (grid reduction 35 -> 17): 3x3/2 | 1x1 -> 3x3 -> 3x3/2 | 3x3/2 max pool."""

    def __init__(self, cin: int, width: float, precision):
        c = functools.partial(scaled_channels, width=width)
        conv = functools.partial(BasicConv2d, precision=precision)
        self.branch3x3 = conv(cin, c(384), 3, stride=2)
        self.branch3x3dbl_1 = conv(cin, c(64), 1)
        self.branch3x3dbl_2 = conv(c(64), c(96), 3, padding=1)
        self.branch3x3dbl_3 = conv(c(96), c(96), 3, stride=2)
        self.out_channels = c(384) + c(96) + cin

    def __call__(self, x: Array) -> Array:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return jnp.concatenate([self.branch3x3(x), b3, _max_pool(x, 2)], axis=-1)


class FIDInceptionC(nnx.Module):
    """Mixed_6b-e (factorised 7x7): 1x1 | 1x1 -> 1x7 -> 7x1 | 1x1 -> 7x1 -> 1x7 -> 7x1 -> 1x7 | avg pool -> 1x1."""

    def __init__(self, cin: int, channels_7x7: int, width: float, precision):
        c = functools.partial(scaled_channels, width=width)
        conv = functools.partial(BasicConv2d, precision=precision)
        c7 = c(channels_7x7)
        self.branch1x1 = conv(cin, c(192), 1)
        self.branch7x7_1 = conv(cin, c7, 1)
        self.branch7x7_2 = conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = conv(c7, c(192), (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = conv(cin, c7, 1)
        self.branch7x7dbl_2 = conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = conv(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = conv(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = conv(c7, c(192), (1, 7), padding=(0, 3))
        self.branch_pool = conv(cin, c(192), 1)
        self.out_channels = 4 * c(192)

    def __call__(self, x: Array) -> Array:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            d = layer(d)
        return jnp.concatenate([self.branch1x1(x), b7, d, self.branch_pool(_avg_pool_valid(x))], axis=-1)


class InceptionD(nnx.Module):
    """Mixed_7a (grid reduction 17 -> 8): 1x1 -> 3x3/2 | 1x1 -> 1x7 -> 7x1 -> 3x3/2 | 3x3/2 max pool."""

    def __init__(self, cin: int, width: float, precision):
        c = functools.partial(scaled_channels, width=width)
        conv = functools.partial(BasicConv2d, precision=precision)
        self.branch3x3_1 = conv(cin, c(192), 1)
        self.branch3x3_2 = conv(c(192), c(320), 3, stride=2)
        self.branch7x7x3_1 = conv(cin, c(192), 1)
        self.branch7x7x3_2 = conv(c(192), c(192), (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = conv(c(192), c(192), (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = conv(c(192), c(192), 3, stride=2)
        self.out_channels = c(320) + c(192) + cin

    def __call__(self, x: Array) -> Array:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return jnp.concatenate([b3, b7, _max_pool(x, 2)], axis=-1)


class FIDInceptionE(nnx.Module):
    """Mixed_7b/c (expanded filter banks): 1x1 | 1x1 -> (1x3, 3x1) | 1x1 -> 3x3 -> (1x3, 3x1) | pool -> 1x1. The pool
    is the valid-pixel 3x3 average in Mixed_7b and a 3x3 max pool in Mixed_7c (``max_pool=True``), as in the FID
    graph."""

    def __init__(self, cin: int, width: float, precision, *, max_pool: bool):
        c = functools.partial(scaled_channels, width=width)
        conv = functools.partial(BasicConv2d, precision=precision)
        self.max_pool = max_pool
        self.branch1x1 = conv(cin, c(320), 1)
        self.branch3x3_1 = conv(cin, c(384), 1)
        self.branch3x3_2a = conv(c(384), c(384), (1, 3), padding=(0, 1))
        self.branch3x3_2b = conv(c(384), c(384), (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = conv(cin, c(448), 1)
        self.branch3x3dbl_2 = conv(c(448), c(384), 3, padding=1)
        self.branch3x3dbl_3a = conv(c(384), c(384), (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = conv(c(384), c(384), (3, 1), padding=(1, 0))
        self.branch_pool = conv(cin, c(192), 1)
        self.out_channels = c(320) + 4 * c(384) + c(192)

    def __call__(self, x: Array) -> Array:
        b3 = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = _max_pool(x, 1, 1) if self.max_pool else _avg_pool_valid(x)
        return jnp.concatenate([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                                self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(pool)], axis=-1)


class FIDInceptionV3(nnx.Module):
    r"""The FID Inception-v3 (pytorch-fid's ``fid_inception_v3`` / TF's ``inception-2015-12-05``) in Flax NNX.

    Submodule and parameter names follow the PyTorch state dict (``Mixed_5b.branch1x1.conv`` ...), so the weights
    converter maps each key to one path (:mod:`jaxgen.evaluation.inception_weights`). Built with zero kernels (to be
    filled with the real weights: :func:`jaxgen.evaluation.inception_weights.load_inception`), or, given ``rngs``,
    LeCun-normal kernels (a random network of the same structure).

    Args:
      width: channel multiplier (1 = the real network, 2048 features; tests use a tiny one).
      num_classes: outputs of the ``fc`` layer (1008 in the real network).
      resize_to: side of the square input the images are bilinearly resized to (299; at least 75), or ``None`` to
        feed them at their own size (then they must be at least 75 x 75).
      input_range: ``(lo, hi)`` of the input values, mapped linearly to the network's ``[-1, 1]``.
      precision: ``lax`` precision of the convolutions and the ``fc`` layer (``None``: the backend's default, which
        on recent GPUs may be TF32, as PyTorch's cuDNN default; ``"highest"`` for full float32).
      rngs: keys of a random initialisation; ``None`` (default) leaves zero kernels for loaded weights.
    """

    def __init__(self, *, width: float = 1.0, num_classes: int = 1008, resize_to: int | None = 299,
                 input_range: tuple[float, float] = (-1.0, 1.0), precision=None, rngs: nnx.Rngs | None = None):
        if not width > 0:
            raise ValueError(f"width must be > 0 (1 is the real network), got {width}.")
        if resize_to is not None and int(resize_to) < 75:
            raise ValueError(f"resize_to must be at least 75 (the smallest input Inception-v3 reduces to 1x1), "
                             f"got {resize_to}.")
        lo, hi = (float(v) for v in input_range)
        if not hi > lo:
            raise ValueError(f"input_range must be (lo, hi) with hi > lo, e.g. (-1, 1) or (0, 1), got {input_range}.")
        self.width, self.num_classes = float(width), int(num_classes)
        self.resize_to = None if resize_to is None else int(resize_to)
        self.input_range = (lo, hi)
        c = functools.partial(scaled_channels, width=width)
        conv = functools.partial(BasicConv2d, precision=precision)
        args = dict(width=width, precision=precision)
        self.Conv2d_1a_3x3 = conv(3, c(32), 3, stride=2)
        self.Conv2d_2a_3x3 = conv(c(32), c(32), 3)
        self.Conv2d_2b_3x3 = conv(c(32), c(64), 3, padding=1)
        self.Conv2d_3b_1x1 = conv(c(64), c(80), 1)
        self.Conv2d_4a_3x3 = conv(c(80), c(192), 3)
        self.Mixed_5b = FIDInceptionA(c(192), 32, **args)
        self.Mixed_5c = FIDInceptionA(self.Mixed_5b.out_channels, 64, **args)
        self.Mixed_5d = FIDInceptionA(self.Mixed_5c.out_channels, 64, **args)
        self.Mixed_6a = InceptionB(self.Mixed_5d.out_channels, **args)
        self.Mixed_6b = FIDInceptionC(self.Mixed_6a.out_channels, 128, **args)
        self.Mixed_6c = FIDInceptionC(self.Mixed_6b.out_channels, 160, **args)
        self.Mixed_6d = FIDInceptionC(self.Mixed_6c.out_channels, 160, **args)
        self.Mixed_6e = FIDInceptionC(self.Mixed_6d.out_channels, 192, **args)
        self.Mixed_7a = InceptionD(self.Mixed_6e.out_channels, **args)
        self.Mixed_7b = FIDInceptionE(self.Mixed_7a.out_channels, **args, max_pool=False)
        self.Mixed_7c = FIDInceptionE(self.Mixed_7b.out_channels, **args, max_pool=True)
        self.num_features = self.Mixed_7c.out_channels
        self.fc = Linear(self.num_features, self.num_classes, precision=precision)
        if rngs is not None:
            _lecun_normal_init(self, rngs.params())

    def preprocess(self, images: Array) -> Array:
        """:func:`inception_preprocess` with this network's ``resize_to`` and ``input_range``."""
        return inception_preprocess(images, resize_to=self.resize_to, input_range=self.input_range)

    def pool_features(self, x: Array) -> Array:
        """The global-average-pooled features ``(B, num_features)`` (FID's ``pool_3``) of preprocessed images."""
        for layer in (self.Conv2d_1a_3x3, self.Conv2d_2a_3x3, self.Conv2d_2b_3x3):
            x = layer(x)
        x = _max_pool(x, 2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = _max_pool(x, 2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return jnp.mean(x, axis=(1, 2))

    def logits(self, features: Array, *, unbiased: bool = False) -> Array:
        """The ``fc`` logits ``features @ W (+ b)`` of pool features; ``unbiased=True`` leaves out the bias (the logits
        of the original Inception Score code)."""
        if unbiased:
            return jnp.matmul(features, self.fc.kernel[...], precision=self.fc.precision)
        return self.fc(features)

    def __call__(self, images: Array, *, unbiased: bool = False) -> tuple[Array, Array]:
        """``(features, logits)`` of raw images ``(B, H, W, C)`` in ``input_range``."""
        f = self.pool_features(self.preprocess(images))
        return f, self.logits(f, unbiased=unbiased)


def inception_preprocess(images: ArrayLike, *, resize_to: int | None = 299,
                         input_range: tuple[float, float] = (-1.0, 1.0)) -> Array:
    r"""Images ``(B, H, W, C)`` (``C`` in {1, 3}; grey is replicated to RGB) -> the network's ``(B, S, S, 3)`` input.

    Bilinear resize to ``S = resize_to`` with half-pixel centres and no antialiasing (PyTorch's
    ``F.interpolate(mode="bilinear", align_corners=False)``, as pytorch-fid), then the affine map of ``input_range``
    onto ``[-1, 1]``: :math:`x \mapsto 2 (x - lo) / (hi - lo) - 1` (both linear, so their order does not matter).
    """
    x = jnp.asarray(images)
    if x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"Inception expects channels-last images (B, H, W, 3) or (B, H, W, 1), got shape {x.shape}; "
                         "transpose channels-first (B, C, H, W) images with x.transpose(0, 2, 3, 1).")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    if resize_to is not None:
        if x.shape[1:3] != (resize_to, resize_to):
            x = jax.image.resize(x, (x.shape[0], resize_to, resize_to, 3), "linear", antialias=False)
    elif min(x.shape[1:3]) < 75:
        raise ValueError(f"without resizing, Inception needs images of at least 75 x 75 pixels, got {x.shape[1:3]}; "
                         "pass resize_to=299.")
    lo, hi = input_range
    if (lo, hi) != (-1.0, 1.0):
        x = (x - lo) * (2.0 / (hi - lo)) - 1.0
    return x


# ---------------------------------------------------------------------------
# Batched evaluation
# ---------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _forward(graphdef, state, x):
    return nnx.merge(graphdef, state)(x)


def _network(network: FIDInceptionV3 | None, weights) -> FIDInceptionV3:
    if network is not None:
        if weights is not None:
            raise ValueError("pass either network= or weights=, not both.")
        if not isinstance(network, FIDInceptionV3):
            raise ValueError(f"network must be a FIDInceptionV3, got {type(network).__name__}.")
        return network
    from jaxgen.evaluation.inception_weights import load_inception

    return load_inception(weights)


def inception_feature_fn(network: FIDInceptionV3) -> Callable[[Array], Array]:
    """The jitted feature extractor ``images -> (B, num_features)`` pool features (for
    :func:`jaxgen.metrics.frechet_distance_from_features` and :func:`jaxgen.metrics.manifold.manifold_metrics`)."""
    graphdef, state = nnx.split(network)
    return lambda x: _forward(graphdef, state, x)[0]


def inception_outputs(images: ArrayLike, *, network: FIDInceptionV3 | None = None, weights=None,
                      batch_size: int = 50, unbiased: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Pool features ``(N, num_features)`` and logits ``(N, num_classes)`` of ``images`` in one batched, jitted pass
    (fixed-size batches, the last padded, so the network compiles once).

    Args:
      images: ``(N, H, W, C)`` images in the network's ``input_range``.
      network: a :class:`FIDInceptionV3`; if ``None``, loaded from ``weights`` or ``JAXGEN_INCEPTION_WEIGHTS``
        (:func:`jaxgen.evaluation.inception_weights.load_inception`).
      weights: path of the weights (``.pth`` or ``.npz``) when ``network`` is not given.
      batch_size: images per forward pass.
      unbiased: logits without the ``fc`` bias.
    """
    net = _network(network, weights)
    images = np.asarray(images)
    if images.size and not np.all(np.isfinite(images)):
        raise ValueError("images hold NaN or inf; Inception features of such images are meaningless (check the "
                         "sampler).")
    graphdef, state = nnx.split(net)
    both = _batched(lambda x: jnp.concatenate(_forward(graphdef, state, x), axis=-1), images, batch_size)
    features, logits = both[:, : net.num_features], both[:, net.num_features:]
    if unbiased:  # on the host: one compiled network serves both
        logits = logits - np.asarray(net.fc.bias[...])
    return features, logits


def inception_score_from_logits(logits: ArrayLike, splits: int = 1) -> tuple[Array, Array]:
    r"""Inception Score of class logits (Salimans et al., "Improved Techniques for Training GANs", NeurIPS 2016):

    .. math:: \mathrm{IS} = \exp\Big(\mathbb{E}_x\, \mathrm{KL}\big(p(y \mid x) \,\|\, p(y)\big)\Big),
              \qquad p(y) = \mathbb{E}_x\, p(y \mid x),

    computed on each of ``splits`` equal consecutive parts (the remainder left out, as the original code) and
    reported as the mean and standard deviation over the splits. ``1 <= IS <= K`` for ``K`` classes: 1 when every
    sample gets the same prediction, ``K`` when predictions are confident and uniformly spread. Log-probabilities are
    taken from ``log_softmax`` (no ``log 0``). Pure JAX (``splits`` static).

    Args:
      logits: ``(N, K)`` logits (e.g. :func:`inception_outputs` with ``unbiased=True``, or a digits classifier's).
      splits: number of parts (10 in the paper's protocol, on 50,000 samples).

    Returns:
      ``(mean, std)`` of the per-split scores, scalar arrays.
    """
    logits = jnp.asarray(logits)
    if logits.ndim != 2 or logits.shape[1] < 1:
        raise ValueError(f"logits must have shape (num_samples, num_classes), got {logits.shape}.")
    if isinstance(splits, bool) or not isinstance(splits, int) or not 1 <= splits <= logits.shape[0]:
        raise ValueError(f"splits must be an integer in [1, num_samples = {logits.shape[0]}], got {splits!r}.")
    return _inception_score(logits, splits)


@functools.partial(jax.jit, static_argnames=("splits",))
def _inception_score(logits: Array, splits: int) -> tuple[Array, Array]:
    n = logits.shape[0] // splits
    logp = jax.nn.log_softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
    logp = logp[: n * splits].reshape(splits, n, -1)
    p = jnp.exp(logp)
    log_marginal = jnp.log(jnp.maximum(jnp.mean(p, axis=1, keepdims=True), jnp.finfo(p.dtype).tiny))
    kl = jnp.sum(p * (logp - log_marginal), axis=-1)  # (splits, n)
    scores = jnp.exp(jnp.mean(kl, axis=1))
    return jnp.mean(scores), jnp.std(scores)


def inception_score(samples: ArrayLike, *, network: FIDInceptionV3 | None = None, weights=None, splits: int = 10,
                    batch_size: int = 50, unbiased: bool = True) -> tuple[float, float]:
    """Inception Score (Salimans et al. 2016) of images with the FID Inception network: ``(mean, std)`` over
    ``splits`` parts (:func:`inception_score_from_logits`). By default from the logits without the ``fc`` bias over all
    1008 classes, as OpenAI's original code (and torch-fidelity's default); the paper's protocol is 50,000 samples,
    10 splits. Arguments as :func:`inception_outputs`."""
    _, logits = inception_outputs(samples, network=network, weights=weights, batch_size=batch_size, unbiased=unbiased)
    mean, std = inception_score_from_logits(logits, splits)
    return float(mean), float(std)


def inception_fid(samples: ArrayLike, reference: ArrayLike | tuple[ArrayLike, ArrayLike], *,
                  network: FIDInceptionV3 | None = None, weights=None, batch_size: int = 50) -> float:
    r"""Fréchet Inception Distance (Heusel et al., NeurIPS 2017) between ``samples`` and ``reference``:

    .. math:: \mathrm{FID} = \|\mu_r - \mu_g\|^2
              + \operatorname{tr}\big(C_r + C_g - 2 (C_r^{1/2} C_g C_r^{1/2})^{1/2}\big)

    of the 2048-d pool features (:func:`jaxgen.metrics.frechet_distance_from_features`, moments in float64). FID is
    biased upwards at small sample sizes: compare values computed with equal numbers of samples (50,000 is the usual
    protocol).

    Args:
      samples: generated images ``(M, H, W, C)`` in the network's ``input_range``.
      reference: real images ``(N, H, W, C)``, or their precomputed ``(mu, cov)`` (:func:`inception_reference_moments`).
      network, weights, batch_size: as :func:`inception_outputs`.

    Returns:
      The FID as a Python float.
    """
    net = _network(network, weights)
    return frechet_distance_from_features(inception_feature_fn(net), reference, samples, batch_size, jit=False)


def inception_reference_moments(images: ArrayLike, *, network: FIDInceptionV3 | None = None, weights=None,
                                batch_size: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of the pool features of a reference set (float64), to pass to :func:`inception_fid` as
    ``reference`` (compute once per data set)."""
    net = _network(network, weights)
    return feature_moments(inception_feature_fn(net), images, batch_size=batch_size, jit=False)

