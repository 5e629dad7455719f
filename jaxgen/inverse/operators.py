r"""Linear measurement operators ``y = A x`` of inverse problems, with their transpose and pseudo-inverse.

Every operator acts on a batch ``x`` of shape ``(B, ...)`` (images channels-last, ``(B, H, W, C)``) and has

* ``A(x)``: the measurement ``A x``;
* ``A.transpose(y)``: the adjoint ``A^T y`` (``<A x, y> = <x, A^T y>``);
* ``A.pinv(y)``: the Moore-Penrose pseudo-inverse ``A^+ y`` (Penrose 1955: ``A A^+ A = A``, ``A^+ A A^+ = A^+``,
  both products symmetric), exact, written in closed form;
* ``A.project(x)``: ``A^+ A x``, the orthogonal projection onto the row space (the part of ``x`` that is measured);
* ``A.gram_scale(shape)``: the number ``c`` with ``A A^T = c I`` on the measurement space, for inputs of ``shape``.

All three operators here have ``A A^T = c I`` (a mask on its observed entries, average pooling, a channel
average), so ``A^+ = A^T / c``; this is what makes pseudo-inverse guidance with measurement noise cheap
(:mod:`jaxgen.inverse.guidance`). :class:`MaskOperator` is a pytree (its mask a leaf, so it passes through
``jax.jit`` as an argument); the other two hold only Python numbers (hashable: close over them, or pass them as
static arguments).

The masks of the usual inpainting benchmarks (1 = observed): :func:`half_mask`, :func:`box_mask`,
:func:`random_mask`. :func:`operator_matrix` writes an operator as an explicit matrix (tests, small problems).
"""

from __future__ import annotations

import abc
import dataclasses
import math

import numpy as np
import jax
import jax.numpy as jnp

from jaxgen._checks import check_finite, is_concrete

Array = jax.Array


class LinearOperator(abc.ABC):
    """A linear measurement operator on batches ``(B, ...)``: ``__call__`` (``A x``), :meth:`transpose`
    (``A^T y``), :meth:`pinv` (``A^+ y``) and :meth:`gram_scale`; :meth:`project` follows."""

    @abc.abstractmethod
    def __call__(self, x: Array) -> Array:
        """The measurement ``A x``."""

    @abc.abstractmethod
    def transpose(self, y: Array) -> Array:
        """The adjoint ``A^T y``."""

    @abc.abstractmethod
    def pinv(self, y: Array) -> Array:
        """The Moore-Penrose pseudo-inverse ``A^+ y``."""

    @abc.abstractmethod
    def gram_scale(self, shape: tuple[int, ...]) -> float:
        """``c`` with ``A A^T = c I`` on the measurement space, for inputs ``x`` of ``shape``."""

    def project(self, x: Array) -> Array:
        """``A^+ A x``: the orthogonal projection of ``x`` onto the row space of ``A`` (what ``A`` measures)."""
        return self.pinv(self(x))


def broadcasts_to(shape, target) -> bool:
    """Whether an array of ``shape`` broadcasts to ``target`` (without enlarging it)."""
    try:
        return jnp.broadcast_shapes(tuple(shape), tuple(target)) == tuple(target)
    except ValueError:
        return False


def _check_batch(x: Array, owner: str, min_ndim: int = 1) -> None:
    if jnp.ndim(x) < min_ndim:
        raise ValueError(f"{owner} acts on a batch of shape (B, ...) with at least {min_ndim} axes, got shape "
                         f"{tuple(jnp.shape(x))}; add the batch axis, e.g. x[None].")


# ---------------------------------------------------------------------------------------------------------
# Inpainting.
# ---------------------------------------------------------------------------------------------------------


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True, eq=False)
class MaskOperator(LinearOperator):
    r"""Inpainting: ``A x = m * x`` with a binary mask ``m`` (1 = observed pixel, 0 = missing), broadcastable to
    the images (e.g. ``(H, W, 1)`` for ``(B, H, W, C)``, or ``(B, H, W, 1)`` for one mask per image).

    ``A = diag(m)`` is an orthogonal projection, so ``A^T = A^+ = A`` and ``A A^T = A`` is the identity on the
    observed entries (``gram_scale = 1``). The measurement keeps the shape of ``x`` (zeros where missing), as in
    the DPS and PiGDM code bases.
    """

    mask: Array

    def __post_init__(self):
        m = self.mask
        if isinstance(m, jax.core.Tracer):
            return
        m = jnp.asarray(m)
        if m.dtype == jnp.bool_ or not jnp.issubdtype(m.dtype, jnp.floating):
            m = m.astype(jnp.float32)
        with jax.ensure_compile_time_eval():
            arr = np.asarray(m)
        if arr.size and not np.all((arr == 0) | (arr == 1)):
            raise ValueError("MaskOperator: the mask must hold only 0 (missing) and 1 (observed), got values in "
                             f"[{arr.min():.3g}, {arr.max():.3g}]; threshold it, e.g. (mask > 0.5).astype(float).")
        object.__setattr__(self, "mask", m)

    def tree_flatten(self):
        return (self.mask,), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        object.__setattr__(obj, "mask", children[0])
        return obj

    def _m(self, x: Array) -> Array:
        _check_batch(x, "MaskOperator")
        if not broadcasts_to(jnp.shape(self.mask), jnp.shape(x)):
            raise ValueError(f"MaskOperator: the mask of shape {tuple(jnp.shape(self.mask))} does not broadcast to the "
                             f"images of shape {tuple(jnp.shape(x))}; give it the image's trailing shape, e.g. "
                             "(H, W, 1) for (B, H, W, C).")
        return self.mask.astype(x.dtype)

    def __call__(self, x):
        return self._m(x) * x

    def transpose(self, y):
        return self._m(y) * y

    def pinv(self, y):
        return self._m(y) * y

    def gram_scale(self, shape):
        return 1.0


# ---------------------------------------------------------------------------------------------------------
# Super-resolution.
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DownsampleOperator(LinearOperator):
    r"""Super-resolution: average pooling by an integer ``factor`` along ``axes`` (default ``(1, 2)``, the spatial
    axes of ``(B, H, W, C)``; ``(1,)`` for signals ``(B, D)``), e.g. 8x8 -> 4x4 for ``factor=2``.

    With ``k = len(axes)`` and ``n = factor^k`` pixels per block, ``A = S / n`` where ``S`` sums each block, and
    ``S S^T = n I``, so ``A A^T = I / n`` (``gram_scale = 1 / n``), ``A^T y = U(y) / n`` with ``U`` the nearest
    (block-replicating) upsampling, and ``A^+ = A^T (A A^T)^{-1} = U``: the pseudo-inverse is nearest upsampling.
    """

    factor: int
    axes: tuple[int, ...] = (1, 2)

    def __post_init__(self):
        f = self.factor
        if isinstance(f, bool) or not isinstance(f, (int, np.integer)) or f < 1:
            raise ValueError(f"DownsampleOperator: factor must be a positive integer (2 maps 8x8 to 4x4), got {f!r}.")
        axes = (self.axes,) if isinstance(self.axes, (int, np.integer)) else tuple(self.axes)
        if not axes or any(isinstance(a, bool) or not isinstance(a, (int, np.integer)) or a < 1 for a in axes) \
                or len(set(axes)) != len(axes):
            raise ValueError(f"DownsampleOperator: axes must be distinct positive axis numbers (axis 0 is the batch), "
                             f"e.g. (1, 2) for (B, H, W, C) or (1,) for (B, D); got {self.axes!r}.")
        object.__setattr__(self, "factor", int(f))
        object.__setattr__(self, "axes", tuple(int(a) for a in axes))

    def _check(self, x: Array, pooled: bool) -> None:
        shape = tuple(jnp.shape(x))
        _check_batch(x, "DownsampleOperator", max(self.axes) + 1)
        if not pooled:
            bad = [(a, shape[a]) for a in self.axes if shape[a] % self.factor]
            if bad:
                raise ValueError(f"DownsampleOperator: the sizes {[s for _, s in bad]} of axes {[a for a, _ in bad]} of "
                                 f"x (shape {shape}) are not divisible by factor={self.factor}; crop or pad the images "
                                 "to a multiple of the factor.")

    def __call__(self, x):
        self._check(x, pooled=False)
        shape, new, pool = x.shape, [], []
        for ax, n in enumerate(shape):
            if ax in self.axes:
                new += [n // self.factor, self.factor]
                pool.append(len(new) - 1)
            else:
                new.append(n)
        return jnp.mean(x.reshape(new), axis=tuple(pool))

    def _upsample(self, y: Array) -> Array:
        self._check(y, pooled=True)
        for ax in self.axes:
            y = jnp.repeat(y, self.factor, axis=ax)
        return y

    def transpose(self, y):
        return self._upsample(y) / (self.factor ** len(self.axes))

    def pinv(self, y):
        return self._upsample(y)

    def gram_scale(self, shape):
        return 1.0 / self.factor ** len(self.axes)


# ---------------------------------------------------------------------------------------------------------
# Colourisation.
# ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GrayscaleOperator(LinearOperator):
    r"""Colourisation: ``A x = sum_c w_c x_c`` over the channel ``axis`` (default last) of images with ``channels``
    channels, kept as a channel of size 1.

    ``weights=None`` is the channel mean ``w_c = 1 / C`` (as in DDRM and PiGDM); pass e.g. ``(0.299, 0.587, 0.114)``
    for luma (``channels`` then follows). Per pixel ``A = w^T``, so ``A A^T = ||w||^2`` (``gram_scale``),
    ``A^T y = w y`` and ``A^+ y = w y / ||w||^2``: for the mean, ``A^+`` replicates the gray value into every channel.
    """

    channels: int = 3
    weights: tuple[float, ...] | None = None
    axis: int = -1

    def __post_init__(self):
        if self.weights is not None:
            w = np.asarray(self.weights, np.float64)
            if w.ndim != 1 or w.size == 0 or not np.all(np.isfinite(w)) or not np.any(w != 0):
                raise ValueError(f"GrayscaleOperator: weights must be a non-empty 1-D sequence of finite numbers, not all "
                                 f"zero (one per channel), got {self.weights!r}.")
            object.__setattr__(self, "weights", tuple(float(v) for v in w))
            object.__setattr__(self, "channels", len(w))
        c = self.channels
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 1:
            raise ValueError(f"GrayscaleOperator: channels must be a positive integer (3 for RGB), got {c!r}.")
        if isinstance(self.axis, bool) or not isinstance(self.axis, (int, np.integer)) or self.axis == 0:
            raise ValueError(f"GrayscaleOperator: axis must be the channel axis (an integer other than 0, the batch), "
                             f"got {self.axis!r}.")

    def _checked(self, x: Array, size: int) -> Array:
        """``x``, whose channel axis must have ``size`` entries (``ValueError`` otherwise)."""
        _check_batch(x, "GrayscaleOperator", 2)
        ax = self.axis % x.ndim
        if ax == 0 or x.shape[ax] != size:
            raise ValueError(f"GrayscaleOperator: expected {size} channel(s) on axis {self.axis} of shape "
                             f"{tuple(x.shape)} (the operator maps {self.channels} channels to 1); set channels= or "
                             "axis= to match the images.")
        return x

    def _weights_like(self, x: Array) -> Array:
        """The weights ``w``, shaped to broadcast along the channel axis of ``x``."""
        c = self.channels
        w = jnp.full((c,), 1.0 / c, x.dtype) if self.weights is None else jnp.asarray(self.weights, x.dtype)
        shape = [1] * x.ndim
        shape[self.axis % x.ndim] = c
        return w.reshape(shape)

    def __call__(self, x):
        x = self._checked(x, self.channels)
        return jnp.sum(self._weights_like(x) * x, axis=self.axis, keepdims=True)

    def transpose(self, y):
        y = self._checked(y, 1)
        return self._weights_like(y) * y

    def pinv(self, y):
        return self.transpose(y) / self.gram_scale(())

    def gram_scale(self, shape):
        if self.weights is None:
            return 1.0 / self.channels
        return float(sum(v * v for v in self.weights))


# ---------------------------------------------------------------------------------------------------------
# Masks and matrices.
# ---------------------------------------------------------------------------------------------------------


def _spatial(shape, owner: str) -> tuple[int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) == 2:
        h, w = shape
    elif len(shape) in (3, 4):
        h, w = shape[-3], shape[-2]
    else:
        raise ValueError(f"{owner}: shape must be (H, W), or an image shape (H, W, C) / (B, H, W, C) (channels-last), "
                         f"got {shape}.")
    if h < 1 or w < 1:
        raise ValueError(f"{owner}: the image must have positive height and width, got {shape}.")
    return h, w


SIDES = ("left", "right", "top", "bottom")


def half_mask(shape, side: str = "left") -> Array:
    """A mask that observes one half of the image: ``side`` in ``left | right | top | bottom`` is the OBSERVED half
    (1), the other half is to be inpainted (0). ``shape`` is ``(H, W)`` or an image shape ``(H, W, C)`` /
    ``(B, H, W, C)``; the mask has shape ``(H, W, 1)`` (broadcasts over batch and channels). An odd size gives the
    observed half the smaller part (``H // 2`` rows)."""
    h, w = _spatial(shape, "half_mask")
    if side not in SIDES:
        raise ValueError(f"half_mask: side must be one of {SIDES} (the observed half), got {side!r}.")
    rows, cols = np.arange(h)[:, None], np.arange(w)[None, :]
    keep = {"left": cols < w // 2, "right": cols >= w - w // 2, "top": rows < h // 2,
            "bottom": rows >= h - h // 2}[side]
    return jnp.asarray(np.broadcast_to(keep, (h, w))[..., None], jnp.float32)


def box_mask(shape, size=None) -> Array:
    """A mask with a missing box (0) in the centre of the image and the rest observed (1), as in the box-inpainting
    benchmarks (DPS: a 128x128 box in 256x256 images). ``size`` = ``(h, w)`` of the box or one number for a square
    (default: half the height and width). Returns shape ``(H, W, 1)``."""
    h, w = _spatial(shape, "box_mask")
    if size is None:
        size = (h // 2, w // 2)
    bh, bw = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    if not (0 <= bh <= h and 0 <= bw <= w):
        raise ValueError(f"box_mask: the box {(bh, bw)} must fit in the image {(h, w)}.")
    top, left = (h - bh) // 2, (w - bw) // 2
    m = np.ones((h, w, 1), np.float32)
    m[top:top + bh, left:left + bw] = 0.0
    return jnp.asarray(m)


def random_mask(key: Array, shape, observed: float = 0.5) -> Array:
    """A mask observing each pixel independently with probability ``observed`` (random-pixel inpainting), shape
    ``(H, W, 1)``."""
    h, w = _spatial(shape, "random_mask")
    if isinstance(observed, bool) or not isinstance(observed, (int, float, np.floating)) or not 0 <= observed <= 1:
        raise ValueError(f"random_mask: observed must be a fraction in [0, 1], got {observed!r}.")
    return jax.random.bernoulli(key, observed, (h, w, 1)).astype(jnp.float32)


def operator_matrix(operator, shape) -> Array:
    """The explicit matrix of a linear ``operator`` on one input of ``shape`` (without the batch axis): shape
    ``(m, n)`` with ``n = prod(shape)`` and ``m`` the size of one measurement (``A x`` flattened, row-major)."""
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    basis = jnp.eye(n, dtype=jnp.float32).reshape((n,) + shape)
    cols = operator(basis).reshape(n, -1)  # row j: A e_j
    return cols.T


def check_operator(operator, owner: str) -> None:
    """``TypeError`` unless ``operator`` is a linear operator with ``__call__``, ``transpose`` and ``pinv``."""
    missing = [m for m in ("transpose", "pinv") if not callable(getattr(operator, m, None))]
    if not callable(operator) or missing:
        raise TypeError(f"{owner} needs a linear measurement operator with __call__ (A x), transpose (A^T y) and pinv "
                        f"(A^+ y), e.g. MaskOperator(mask); got {type(operator).__name__}"
                        + (f" without {', '.join(missing)}" if missing else "") + ".")


def check_observation(y, owner: str) -> Array:
    """The observation as a floating array, checked finite when concrete."""
    y = jnp.asarray(y)
    if not jnp.issubdtype(y.dtype, jnp.floating):
        raise ValueError(f"{owner}: the observation y must be floating point, got dtype {y.dtype}; pass "
                         "y.astype(jnp.float32).")
    if is_concrete(y):
        check_finite(y, name="the observation y", hint="Measure a finite image (e.g. y = operator(x)).")
    return y


__all__ = ["LinearOperator", "MaskOperator", "DownsampleOperator", "GrayscaleOperator", "half_mask", "box_mask",
           "random_mask", "operator_matrix", "SIDES"]
