r"""Normalizing flows (Flax NNX): invertible layers with tractable log-determinants, and flows built from them.

A flow is a bijection ``f: x -> z`` from data to a latent with a standard normal base density; its density is the
change of variables (Dinh et al. 2017, "Density estimation using Real NVP", eq. 3)

.. math:: \log p_X(x) = \log p_Z(f(x)) + \log\left|\det \frac{\partial f(x)}{\partial x^T}\right| .

Every layer here is a :class:`Bijector` with ``forward(x) -> (z, logdet)`` (data -> latent; ``logdet`` of shape
``(B,)``) and ``inverse(z) -> x``; arrays are ``(B, d)`` vectors or ``(B, H, W, C)`` channels-last images, and every
layer acts per sample (no batch statistics after initialisation), so the Jacobian of a batch is block diagonal.

* :class:`AffineCoupling`: RealNVP's affine coupling with a binary mask (Dinh et al. 2017, eq. 7-9): alternating
  coordinates for vectors, checkerboard or channel masks for images; the log-scale goes through a soft clamp
  ``c tanh(s / c)`` for stability (their sec. 3.3 / appendix uses a tanh with a learned scale), and the conditioner's
  last layer is zero-initialised, so every coupling starts as the identity.
* :class:`ActNorm`: Glow's activation normalisation (Kingma & Dhariwal 2018, table 1), with data-dependent
  initialisation (see its docstring: on the first batch the flow sees, or an explicit :meth:`Flow.initialize`).
* :class:`InvertibleLinear`: Glow's invertible 1x1 convolution with the LU parameterisation (table 1 and sec. 3.2),
  acting on the last axis: a 1x1 convolution of images and an invertible linear layer of vectors, the same code.
* :class:`Squeeze` (space-to-depth) and :class:`Split` (multi-scale factoring-out with a learned conditional prior).
* :class:`Flow`: a stack of bijectors with multi-scale bookkeeping, ``log_prob`` and ``sample``; :class:`RealNVP`
  here and :class:`jaxgen.models.glow.Glow` build the two architectures.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import jax
import jax.numpy as jnp
from flax import nnx
from flax.errors import TraceContextError

from jaxgen._checks import is_concrete
from jaxgen.models.layers import Conv2d
from jaxgen.models.mlp import ACTIVATIONS

Array = jax.Array

_EPS = 1e-6
_LOG_2PI = math.log(2.0 * math.pi)


def _check_positive_int(value, name: str, owner: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive integer, got {value!r}.")
    return int(value)


def _check_shape(shape, owner: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(n) for n in shape)
    except TypeError:
        raise ValueError(f"{owner}: shape must be a tuple such as (2,) or (8, 8, 1), got {shape!r}.") from None
    if len(shape) not in (1, 3) or min(shape) < 1:
        raise ValueError(f"{owner}: shape must be (d,) for vectors or (H, W, C) for images, got {shape}.")
    return shape


def _sum_per_sample(a: Array) -> Array:
    """``(B, ...) -> (B,)``: the sum over every axis but the batch axis."""
    return jnp.sum(a.reshape(a.shape[0], -1), axis=1)


def _positions(x: Array) -> int:
    """Number of positions a per-channel layer is applied at: ``H W`` for images, 1 for vectors."""
    return int(np.prod(x.shape[1:-1], dtype=np.int64))


def standard_normal_log_prob(z: Array) -> Array:
    r"""``log N(z; 0, I) = -|z|^2 / 2 - D/2 log(2 pi)`` per sample, ``(B, ...) -> (B,)``."""
    d = int(np.prod(z.shape[1:], dtype=np.int64))
    return -0.5 * _sum_per_sample(z * z) - 0.5 * d * _LOG_2PI


def soft_clamp(s: Array, clamp: float) -> Array:
    r"""``c tanh(s / c)``: the identity near 0, bounded by ``+-c`` (keeps ``exp(s)`` in ``[e^{-c}, e^c]``)."""
    return clamp * jnp.tanh(s / clamp)


class Bijector(nnx.Module):
    """An invertible layer: ``forward(x) -> (z, logdet)`` (data -> latent, ``logdet = log|det dz/dx|`` of shape
    ``(B,)``), ``inverse(z) -> x``, and ``output_shape(shape)`` (the per-sample shape it maps ``shape`` to)."""

    def forward(self, x: Array) -> tuple[Array, Array]:
        raise NotImplementedError

    def inverse(self, z: Array) -> Array:
        raise NotImplementedError

    def output_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape


class FlowInit(nnx.Variable):
    """Non-trainable state of a data-dependent initialisation (carried by the trainer with the model's other
    non-parameter state)."""


class ActNorm(Bijector):
    r"""Activation normalisation: ``z = (x + b) * exp(s)`` per channel (last axis), ``logdet = P sum_c s_c`` with ``P``
    the number of positions (``H W``, or 1 for vectors) (Kingma & Dhariwal 2018, table 1).

    Data-dependent initialisation (Glow sec. 3.1): ``b`` and ``s`` are the sums of trainable offsets (``loc``,
    ``log_scale``, zero-initialised) and statistics ``-mean`` and ``-log std`` of a batch, per channel, stored as
    non-trainable :class:`FlowInit` state. They are taken from the first batch the layer sees while not yet
    initialised (``Flow.initialize(x)``, or the first training step: the trainer carries this state), so the first
    outputs have zero mean and unit variance per channel. Once initialised (the ``initialized`` flag), the layer is
    a fixed per-sample affine map. A batch with a single position and sample (one vector) cannot be normalised and
    leaves the layer uninitialised; an uninitialised layer traced inside a nested transformation (``vmap``,
    ``jacfwd``), where its state cannot be written, normalises with the batch's statistics without storing them.
    """

    def __init__(self, channels: int):
        channels = _check_positive_int(channels, "channels", "ActNorm")
        self.loc = nnx.Param(jnp.zeros((channels,), jnp.float32))
        self.log_scale = nnx.Param(jnp.zeros((channels,), jnp.float32))
        self.data_loc = FlowInit(jnp.zeros((channels,), jnp.float32))
        self.data_log_scale = FlowInit(jnp.zeros((channels,), jnp.float32))
        self.initialized = FlowInit(jnp.zeros((), jnp.float32))

    def _affine(self, x: Array | None = None) -> tuple[Array, Array]:
        """``(b, s)``; given a batch ``x`` and not yet initialised, the statistics of ``x`` (stored when the state
        can be written at this trace level: eagerly, or where the module was passed into the transformation)."""
        loc, log_scale = self.data_loc[...], self.data_log_scale[...]
        flag = self.initialized[...]
        concrete_done = is_concrete(flag) and bool(np.asarray(flag) > 0.5)
        if x is not None and not concrete_done and int(np.prod(x.shape[:-1], dtype=np.int64)) >= 2:
            axes = tuple(range(x.ndim - 1))
            xs = jax.lax.stop_gradient(x.astype(jnp.float32))
            done = flag > 0.5
            loc = jnp.where(done, loc, -jnp.mean(xs, axis=axes))
            log_scale = jnp.where(done, log_scale, -0.5 * jnp.log(jnp.var(xs, axis=axes) + _EPS))
            try:
                self.data_loc[...] = loc
                self.data_log_scale[...] = log_scale
                self.initialized[...] = jnp.ones_like(flag)
            except TraceContextError:
                pass  # inside a nested transformation (jacfwd, vmap) of a traced module: compute, store nothing
        return loc + self.loc[...], log_scale + self.log_scale[...]

    def forward(self, x: Array) -> tuple[Array, Array]:
        b, s = self._affine(x)
        z = (x + b) * jnp.exp(s)
        return z, jnp.full((x.shape[0],), _positions(x) * jnp.sum(s), x.dtype)

    def inverse(self, z: Array) -> Array:
        b, s = self._affine()
        return z * jnp.exp(-s) - b


class InvertibleLinear(Bijector):
    r"""An invertible linear map of the last axis with the LU parameterisation (Kingma & Dhariwal 2018, table 1):
    ``z = x W^T`` at every position, ``W = P L (U + diag(sign * exp(log_s)))`` with ``P`` a fixed permutation,
    ``L`` unit lower-triangular, ``U`` strictly upper-triangular and ``log_s`` trainable, so
    ``log|det dz/dx| = P_pos sum log_s`` (``P_pos = H W`` for a 1x1 convolution of images, 1 for vectors).

    Initialised from the LU decomposition of a random rotation (Glow's initialisation); ``P`` and the signs of the
    diagonal are static. The inverse is two triangular solves.
    """

    def __init__(self, channels: int, *, rngs: nnx.Rngs):
        import scipy.linalg

        channels = _check_positive_int(channels, "channels", "InvertibleLinear")
        # a random rotation and its LU decomposition, on the host (a one-off set-up; seeded by the params key)
        seed = np.asarray(jax.random.key_data(rngs.params()), np.uint32).ravel()
        w, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((channels, channels)))
        p, lower, upper = scipy.linalg.lu(w)  # w = p @ lower @ upper
        s = np.diag(upper)
        self.perm = tuple(int(i) for i in np.argmax(p, axis=1))  # P[i, perm[i]] = 1
        self.sign = tuple(1.0 if v >= 0 else -1.0 for v in s)
        self.lower = nnx.Param(jnp.asarray(np.tril(lower, -1), jnp.float32))
        self.upper = nnx.Param(jnp.asarray(np.triu(upper, 1), jnp.float32))
        self.log_s = nnx.Param(jnp.asarray(np.log(np.maximum(np.abs(s), _EPS)), jnp.float32))

    def _factors(self) -> tuple[Array, Array, Array]:
        c = len(self.perm)
        p = jnp.asarray(np.eye(c, dtype=np.float32)[list(self.perm)])
        lower = jnp.tril(self.lower[...], -1) + jnp.eye(c, dtype=jnp.float32)
        diag = jnp.asarray(self.sign, jnp.float32) * jnp.exp(self.log_s[...])
        upper = jnp.triu(self.upper[...], 1) + jnp.diag(diag)
        return p, lower, upper

    def weight(self) -> Array:
        """The matrix ``W = P L U`` (``C x C``)."""
        p, lower, upper = self._factors()
        return p @ lower @ upper

    def forward(self, x: Array) -> tuple[Array, Array]:
        z = x @ self.weight().T.astype(x.dtype)
        return z, jnp.full((x.shape[0],), _positions(x) * jnp.sum(self.log_s[...]), x.dtype)

    def inverse(self, z: Array) -> Array:
        p, lower, upper = self._factors()
        c = z.shape[-1]
        cols = z.reshape(-1, c).T  # x^T = U^{-1} L^{-1} P^T z^T
        y = p.T.astype(z.dtype) @ cols
        y = jax.scipy.linalg.solve_triangular(lower.astype(z.dtype), y, lower=True, unit_diagonal=True)
        y = jax.scipy.linalg.solve_triangular(upper.astype(z.dtype), y, lower=False)
        return y.T.reshape(z.shape)


MASKS = ("alternate", "checkerboard", "channel")


def coupling_mask(shape: tuple[int, ...], kind: str, parity: int) -> np.ndarray:
    """The binary mask (1 = passed through and conditioned on, 0 = transformed) of a coupling, of per-sample
    ``shape``: ``alternate`` (vectors: coordinate ``k`` kept when ``(k + parity)`` is even), ``checkerboard`` (images:
    pixel ``(i, j)`` kept when ``(i + j + parity)`` is even) or ``channel`` (images: the first ``C // 2`` channels
    kept, the last ``C - C // 2`` with ``parity`` 1)."""
    if kind == "alternate":
        return ((np.arange(shape[0]) + parity) % 2 == 0).astype(np.float32)
    if kind == "checkerboard":
        h, w, c = shape
        ij = np.add.outer(np.arange(h), np.arange(w))
        return np.broadcast_to(((ij + parity) % 2 == 0)[..., None], (h, w, c)).astype(np.float32)
    if kind == "channel":
        h, w, c = shape
        keep = np.arange(c) < c // 2 if parity == 0 else np.arange(c) >= c - c // 2
        return np.broadcast_to(keep, (h, w, c)).astype(np.float32)
    raise ValueError(f"unknown coupling mask {kind!r}; use one of {MASKS}.")


class _MLP(nnx.Module):
    """``d -> hidden (x depth) -> out``, the last layer zero-initialised."""

    def __init__(self, d: int, out: int, hidden: int, depth: int, activation: str, rngs: nnx.Rngs):
        sizes = [d] + [hidden] * depth
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
        self.out = nnx.Linear(sizes[-1], out, kernel_init=nnx.initializers.zeros_init(), rngs=rngs)
        self.activation = activation

    def __call__(self, x: Array) -> Array:
        act = ACTIVATIONS[self.activation]
        for layer in self.layers:
            x = act(layer(x))
        return self.out(x)


class _ConvNet(nnx.Module):
    """Glow's coupling network: 3x3 conv -> act -> (1x1 conv -> act) x (depth - 1) -> zero-initialised 3x3 conv,
    with :class:`jaxgen.models.layers.Conv2d` (matrix products on CPU)."""

    def __init__(self, c: int, out: int, hidden: int, depth: int, activation: str, rngs: nnx.Rngs):
        layers = [Conv2d(c, hidden, 3, rngs=rngs)] + [Conv2d(hidden, hidden, 1, rngs=rngs) for _ in range(depth - 1)]
        self.layers = nnx.List(layers)
        self.out = Conv2d(hidden, out, 3, zero=True, rngs=rngs)
        self.activation = activation

    def __call__(self, x: Array) -> Array:
        act = ACTIVATIONS[self.activation]
        for layer in self.layers:
            x = act(layer(x))
        return self.out(x)


def _conditioner(shape, out_channels: int, hidden: int, depth: int, activation: str, rngs: nnx.Rngs) -> nnx.Module:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; choose from {sorted(ACTIVATIONS)}.")
    if len(shape) == 1:
        return _MLP(shape[0], out_channels, hidden, depth, activation, rngs)
    return _ConvNet(shape[-1], out_channels, hidden, depth, activation, rngs)


class AffineCoupling(Bijector):
    r"""RealNVP's affine coupling layer with a binary mask ``m`` (Dinh et al. 2017, eq. 9):

    .. math:: z = m \odot x + (1 - m) \odot \left(x \odot e^{s(m \odot x)} + t(m \odot x)\right),\qquad
              \log|\det \partial z / \partial x| = \sum_j (1 - m_j)\, s_j(m \odot x),

    with ``s = c tanh(s_raw / c)`` (:func:`soft_clamp`, ``c = clamp``) and ``(s_raw, t)`` the output of a conditioner
    (an MLP for vectors, a small convolutional net for images) whose last layer is zero-initialised: the layer starts
    as the identity. Inverse: ``x = m z + (1 - m) (z - t(m z)) e^{-s(m z)}``.

    Args:
      shape: per-sample shape ``(d,)`` or ``(H, W, C)``.
      mask: ``"alternate"`` (vectors), ``"checkerboard"`` or ``"channel"`` (images); see :func:`coupling_mask`.
      parity: 0 or 1, which half is transformed.
      hidden, depth: the conditioner's width and number of hidden layers.
      clamp: bound of the log-scale.
      activation: a name of :data:`jaxgen.models.mlp.ACTIVATIONS`.
    """

    def __init__(self, shape: Sequence[int], mask: str, parity: int = 0, *, hidden: int = 64, depth: int = 2,
                 clamp: float = 2.0, activation: str = "relu", rngs: nnx.Rngs):
        shape = _check_shape(shape, "AffineCoupling")
        vector = len(shape) == 1
        if mask not in MASKS or (mask == "alternate") != vector:
            raise ValueError(f"AffineCoupling: mask {mask!r} does not fit shape {shape}; use 'alternate' for vectors "
                             "and 'checkerboard' or 'channel' for images (H, W, C).")
        if parity not in (0, 1):
            raise ValueError(f"AffineCoupling: parity must be 0 or 1, got {parity!r}.")
        if (vector and shape[0] < 2) or (mask == "channel" and shape[-1] < 2) or \
                (mask == "checkerboard" and shape[0] * shape[1] < 2):
            raise ValueError(f"AffineCoupling: a {mask} mask needs at least two coordinates to split, got shape "
                             f"{shape}.")
        if not (isinstance(clamp, (int, float)) and clamp > 0):
            raise ValueError(f"AffineCoupling: clamp must be a positive number, got {clamp!r}.")
        self.shape, self.mask_kind, self.parity, self.clamp = shape, mask, int(parity), float(clamp)
        self.net = _conditioner(shape, 2 * shape[-1], _check_positive_int(hidden, "hidden", "AffineCoupling"),
                                _check_positive_int(depth, "depth", "AffineCoupling"), activation, rngs)

    def _mask(self, dtype) -> Array:
        return jnp.asarray(coupling_mask(self.shape, self.mask_kind, self.parity), dtype)

    def _scale_shift(self, x_kept: Array, m: Array) -> tuple[Array, Array]:
        h = self.net(x_kept).astype(x_kept.dtype)
        s_raw, t = jnp.split(h, 2, axis=-1)
        return soft_clamp(s_raw, self.clamp) * (1 - m), t * (1 - m)

    def forward(self, x: Array) -> tuple[Array, Array]:
        m = self._mask(x.dtype)
        s, t = self._scale_shift(x * m, m)
        return x * jnp.exp(s) + t, _sum_per_sample(s)

    def inverse(self, z: Array) -> Array:
        m = self._mask(z.dtype)
        s, t = self._scale_shift(z * m, m)
        return (z - t) * jnp.exp(-s)


class Squeeze(Bijector):
    """Space-to-depth (Dinh et al. 2017, sec. 3.6; Glow's squeeze): ``(H, W, C) -> (H/2, W/2, 4C)``, each 2x2 block of
    pixels stacked on the channel axis (the 4 block positions major, channels minor). A permutation: ``logdet = 0``."""

    def output_shape(self, shape):
        h, w, c = shape
        if h % 2 or w % 2:
            raise ValueError(f"Squeeze needs an even height and width, got (H, W, C) = {tuple(shape)}.")
        return (h // 2, w // 2, 4 * c)

    def forward(self, x: Array) -> tuple[Array, Array]:
        b, h, w, c = x.shape
        self.output_shape((h, w, c))
        z = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h // 2, w // 2, 4 * c)
        return z, jnp.zeros((b,), x.dtype)

    def inverse(self, z: Array) -> Array:
        b, h, w, c4 = z.shape
        c = c4 // 4
        return z.reshape(b, h, w, 2, 2, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, c)


class Split(Bijector):
    r"""Multi-scale factoring-out (Dinh et al. 2017, sec. 3.6; Glow's split): the first ``keep`` channels ``z_1``
    continue through the flow, the other ``z_2`` go to the base distribution.

    With ``learned_prior=True`` (Glow's ``split2d`` prior) their density is a learned conditional Gaussian
    ``N(z_2; mu(z_1), diag(sigma(z_1))^2)`` (a zero-initialised 3x3 convolution of ``z_1`` for images, a linear map for
    vectors; ``log sigma`` soft-clamped to ``+-clamp``), written here as the bijection
    ``eps_2 = (z_2 - mu(z_1)) / sigma(z_1)`` with ``logdet = -sum log sigma``, so the flow's base is a standard normal
    on every factored-out part. With ``learned_prior=False`` the layer is the identity (``z_2 ~ N(0, I)``). The
    :class:`Flow` removes the factored channels after this layer and stores them in the latent.
    """

    def __init__(self, shape: Sequence[int], *, learned_prior: bool = True, clamp: float = 4.0, rngs: nnx.Rngs):
        shape = _check_shape(shape, "Split")
        c = shape[-1]
        if c < 2:
            raise ValueError(f"Split needs at least 2 channels to factor half of them out, got shape {shape}.")
        self.keep = c // 2
        self.clamp = float(clamp)
        out = 2 * (c - self.keep)
        if not learned_prior:
            self.net = None
        elif len(shape) == 1:
            self.net = nnx.Linear(self.keep, out, kernel_init=nnx.initializers.zeros_init(), rngs=rngs)
        else:
            self.net = Conv2d(self.keep, out, 3, zero=True, rngs=rngs)

    def _mean_log_std(self, z1: Array) -> tuple[Array, Array]:
        mu, log_std = jnp.split(self.net(z1).astype(z1.dtype), 2, axis=-1)
        return mu, soft_clamp(log_std, self.clamp)

    def forward(self, x: Array) -> tuple[Array, Array]:
        if self.net is None:
            return x, jnp.zeros((x.shape[0],), x.dtype)
        z1, z2 = x[..., :self.keep], x[..., self.keep:]
        mu, log_std = self._mean_log_std(z1)
        return jnp.concatenate([z1, (z2 - mu) * jnp.exp(-log_std)], axis=-1), -_sum_per_sample(log_std)

    def inverse(self, z: Array) -> Array:
        if self.net is None:
            return z
        z1, e2 = z[..., :self.keep], z[..., self.keep:]
        mu, log_std = self._mean_log_std(z1)
        return jnp.concatenate([z1, e2 * jnp.exp(log_std) + mu], axis=-1)


class Flow(nnx.Module):
    r"""A normalizing flow: bijectors applied in order (data -> latent) with a standard normal base.

    ``forward(x) -> (z, logdet)``, ``inverse(z) -> x``, ``log_prob(x)`` (Dinh et al. 2017, eq. 3),
    ``sample(key, n)``; ``z`` has the shape of ``x``: the flattened factored-out parts (in the order of the
    :class:`Split` layers) followed by the flattened final activations. A :class:`Split` layer's last
    ``C - keep`` channels leave the flow after it.
    """

    def __init__(self, shape: Sequence[int], layers: Sequence[Bijector]):
        self.shape = _check_shape(shape, type(self).__name__)
        self.layers = nnx.List(list(layers))
        s, pieces = self.shape, []
        for layer in self.layers:
            if not isinstance(layer, Bijector):
                raise ValueError(f"Flow layers must be Bijectors, got {type(layer).__name__}.")
            s = tuple(layer.output_shape(s))
            if isinstance(layer, Split):
                pieces.append(s[:-1] + (s[-1] - layer.keep,))
                s = s[:-1] + (layer.keep,)
        self.pieces = tuple(pieces)
        self.final_shape = s

    @property
    def dim(self) -> int:
        """``D``, the number of dimensions of one sample."""
        return int(np.prod(self.shape, dtype=np.int64))

    def _check(self, x: Array, name: str) -> None:
        if jnp.ndim(x) != len(self.shape) + 1 or tuple(jnp.shape(x)[1:]) != self.shape:
            raise ValueError(f"{type(self).__name__} was built for samples of shape {self.shape}; got {name} of shape "
                             f"{tuple(jnp.shape(x))} (expected (B,) + {self.shape}).")

    def forward(self, x: Array) -> tuple[Array, Array]:
        """``(z, log|det dz/dx|)`` of a batch ``x`` of shape ``(B,) + shape``."""
        self._check(x, "x")
        b = x.shape[0]
        h, logdet, out = x, jnp.zeros((b,), x.dtype), []
        for layer in self.layers:
            h, ld = layer.forward(h)
            logdet = logdet + ld
            if isinstance(layer, Split):
                out.append(h[..., layer.keep:])
                h = h[..., :layer.keep]
        if not out:
            return h, logdet
        z = jnp.concatenate([p.reshape(b, -1) for p in out + [h]], axis=1)
        return z.reshape(x.shape), logdet

    def inverse(self, z: Array) -> Array:
        """``x = f^{-1}(z)`` for a latent batch of shape ``(B,) + shape``."""
        self._check(z, "z")
        b = z.shape[0]
        flat = z.reshape(b, -1)
        sizes = [int(np.prod(p)) for p in self.pieces]
        offsets = np.cumsum([0] + sizes)
        pieces = [flat[:, o:o + n].reshape((b,) + p) for o, n, p in zip(offsets, sizes, self.pieces)]
        h = flat[:, offsets[-1]:].reshape((b,) + self.final_shape)
        for layer in reversed(self.layers):
            if isinstance(layer, Split):
                h = jnp.concatenate([h, pieces.pop()], axis=-1)
            h = layer.inverse(h)
        return h

    def log_prob(self, x: Array) -> Array:
        r"""``log p(x) = log N(f(x); 0, I) + log|det df/dx|`` in nats, shape ``(B,)`` (Dinh et al. 2017, eq. 3)."""
        z, logdet = self.forward(x)
        return standard_normal_log_prob(z) + logdet

    def sample(self, key: Array, n: int, *, temperature: float = 1.0) -> Array:
        """``n`` samples ``f^{-1}(T z)``, ``z ~ N(0, I)`` (``T = temperature``: Glow's reduced-temperature sampling,
        sec. 5; ``T = 1`` samples the model)."""
        n = _check_positive_int(n, "n", f"{type(self).__name__}.sample")
        return self.inverse(temperature * jax.random.normal(key, (n,) + self.shape, jnp.float32))

    def initialize(self, x: Array) -> Array:
        """Data-dependent initialisation of the :class:`ActNorm` layers from the batch ``x`` (call eagerly, before
        training, on a batch of data as the model will see it, e.g. dequantised); returns the latent of ``x``.
        Without it, the first training batch initialises them."""
        if not is_concrete(x):
            raise ValueError("Flow.initialize is a one-off set-up step: call it eagerly (outside jit) on a data batch.")
        self._check(x, "x")
        for layer in self.layers:
            if isinstance(layer, ActNorm):
                layer.initialized[...] = jnp.zeros((), jnp.float32)  # re-initialise from this batch
        # one compiled pass; nnx.jit writes the statistics the actnorm layers store back into this module
        return nnx.jit(lambda flow, x: flow.forward(x)[0])(self, x)


class RealNVP(Flow):
    r"""RealNVP (Dinh et al. 2017).

    Vectors ``(d,)``: ``num_layers`` affine couplings with alternating masks, each preceded by an :class:`ActNorm`
    (``actnorm``) and, with ``linear=True``, an LU :class:`InvertibleLinear` (Glow's 1x1 convolution on vectors).

    Images ``(H, W, C)``: the multi-scale architecture of their sec. 3.6 (actnorm in place of their batch
    normalisation, so the flow stays per-sample): at each of the first ``levels - 1`` scales ``num_layers``
    checkerboard couplings, a :class:`Squeeze`, ``num_layers`` channel couplings and a :class:`Split` that factors out
    half the channels; at the last scale ``num_layers + 1`` checkerboard couplings. For ``(8, 8, 1)`` and ``levels=2``:
    3 checkerboard couplings on 8x8x1, squeeze to 4x4x4, 3 channel couplings, split to 4x4x2, 4 checkerboard
    couplings.

    Args:
      shape: per-sample shape, ``(d,)`` or ``(H, W, C)``.
      num_layers: couplings (vectors), or couplings per block (images).
      levels: scales (images only; ``H`` and ``W`` divisible by ``2 ** (levels - 1)``).
      hidden, depth, activation: the conditioners' width, hidden layers and activation (default GELU for vectors,
        ReLU for images).
      actnorm, linear: an :class:`ActNorm` / an LU :class:`InvertibleLinear` before every coupling.
      learned_prior: the splits' conditional Gaussian prior (``False``: standard normal).
      clamp: bound of the couplings' log-scales.
    """

    def __init__(self, shape: Sequence[int], *, num_layers: int = 8, levels: int = 2, hidden: int = 64,
                 depth: int = 2, actnorm: bool = True, linear: bool = False, learned_prior: bool = True,
                 clamp: float = 2.0, activation: str | None = None, rngs: nnx.Rngs):
        shape = _check_shape(shape, "RealNVP")
        num_layers = _check_positive_int(num_layers, "num_layers", "RealNVP")
        levels = _check_positive_int(levels, "levels", "RealNVP")
        kw = dict(hidden=hidden, depth=depth, clamp=clamp, rngs=rngs,
                  activation=activation or ("gelu" if len(shape) == 1 else "relu"))
        layers: list[Bijector] = []

        def coupling(s, mask, parity):
            if actnorm:
                layers.append(ActNorm(s[-1]))
            if linear:
                layers.append(InvertibleLinear(s[-1], rngs=rngs))
            layers.append(AffineCoupling(s, mask, parity, **kw))

        if len(shape) == 1:
            for i in range(num_layers):
                coupling(shape, "alternate", i % 2)
        else:
            h, w, _ = shape
            if h % 2 ** (levels - 1) or w % 2 ** (levels - 1):
                raise ValueError(f"RealNVP: levels={levels} squeezes {levels - 1} times, which needs H and W "
                                 f"divisible by {2 ** (levels - 1)}; got shape {shape}. Use fewer levels.")
            s = shape
            for _ in range(levels - 1):
                for i in range(num_layers):
                    coupling(s, "checkerboard", i % 2)
                layers.append(Squeeze())
                s = layers[-1].output_shape(s)
                for i in range(num_layers):
                    coupling(s, "channel", i % 2)
                layers.append(Split(s, learned_prior=learned_prior, rngs=rngs))
                s = s[:-1] + (layers[-1].keep,)
            for i in range(num_layers + 1):
                coupling(s, "checkerboard", i % 2)
        super().__init__(shape, layers)


__all__ = ["Bijector", "FlowInit", "ActNorm", "InvertibleLinear", "AffineCoupling", "Squeeze", "Split", "Flow",
           "RealNVP", "MASKS", "coupling_mask", "soft_clamp", "standard_normal_log_prob"]
