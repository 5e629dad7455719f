r"""Control images for conditional generation (ControlNet, Zhang, Rao & Agrawala 2023) and how well samples follow them.

Every function is pure JAX, batched over a leading axis and ``jit``-able. Images are channels-last ``(B, H, W, C)`` in
``[-1, 1]`` (jaxgen's convention); a multi-channel image is reduced to its channel mean where a single intensity is
needed.

* :func:`edge_map`: Sobel gradient magnitude, normalised to ``[0, 1]`` per image (optionally thresholded to ``{0, 1}``),
  the analogue of the paper's Canny-edge condition (sec. 4, "Canny Edge").
* :func:`low_resolution`: average pooling then nearest upsampling back to full size (a super-resolution / layout
  condition), still an image in ``[-1, 1]``.
* :func:`random_box_mask`, :func:`masked_image`: masks (1 = known pixel; half masks are
  :func:`jaxgen.inverse.half_mask`) and the masked image with its mask as an inpainting condition.
* :func:`edge_agreement`: the mean per-image Pearson correlation between the edge maps of samples and the requested
  edge maps (how well a controlled model follows its edge control).

**Range convention.** Edge maps and masks are in ``[0, 1]`` (0 = no edge / unknown pixel), the paper's convention for
condition images (its training data scales the control image to ``[0, 1]`` while the target image is in ``[-1, 1]``):
the mostly-zero background then contributes nothing to the hint encoder's first convolution but its bias.
``low_resolution`` and ``masked_image`` return images, in the images' ``[-1, 1]``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array

# Sobel's 3x3 derivative (Sobel & Feldman 1968): smoothing [1, 2, 1] across, central difference [-1, 0, 1] along.
_SOBEL_X = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))


def _check_images(images, owner: str) -> Array:
    images = jnp.asarray(images)
    if images.ndim != 4:
        hint = " Add a channel axis: images[..., None]." if images.ndim == 3 else ""
        raise ValueError(f"{owner} expects a batch of channels-last images (B, H, W, C), got shape "
                         f"{tuple(images.shape)}.{hint}")
    if not jnp.issubdtype(images.dtype, jnp.floating):
        images = images.astype(jnp.float32)
    return images


def _sobel_magnitude(gray: Array) -> Array:
    """``sqrt(G_x^2 + G_y^2)`` of ``(B, H, W)`` intensities with edge-replicating borders (so a flat region, also at
    the image's border, has zero gradient)."""
    h, w = gray.shape[1:]
    p = jnp.pad(gray, ((0, 0), (1, 1), (1, 1)), mode="edge")
    k = _SOBEL_X

    def tap(i, j):
        return p[:, i: i + h, j: j + w]

    gx = sum(k[i][j] * tap(i, j) for i in range(3) for j in range(3) if k[i][j])
    gy = sum(k[j][i] * tap(i, j) for i in range(3) for j in range(3) if k[j][i])
    return jnp.sqrt(gx * gx + gy * gy)


def edge_map(images: Array, *, threshold: float | None = None) -> Array:
    r"""Edge maps of images: the Sobel gradient magnitude, divided by its maximum over each image.

    ``E = sqrt(G_x^2 + G_y^2) / max_{ij} sqrt(G_x^2 + G_y^2)`` with the 3x3 Sobel derivatives ``G_x = S * I``,
    ``G_y = S^T * I`` of the channel-mean intensity ``I`` (Sobel & Feldman 1968; borders replicate the edge pixels, so
    a flat region has no edges, also at the border). Each map is in ``[0, 1]`` with its strongest edge at 1; a flat
    image's map is all zeros. With ``threshold`` the map is binarised, ``E > threshold`` as 0./1. (a Canny-like
    binary edge control, the paper's sec. 4 condition).

    Args:
      images: ``(B, H, W, C)`` images (any range; jaxgen's are in ``[-1, 1]``).
      threshold: ``None`` (soft map) or a value in ``[0, 1)``.

    Returns:
      ``(B, H, W, 1)`` float edge maps in ``[0, 1]``.
    """
    if threshold is not None and not 0.0 <= float(threshold) < 1.0:
        raise ValueError(f"edge_map's threshold must be in [0, 1) (the maps are normalised to [0, 1]) or None, got "
                         f"{threshold}.")
    images = _check_images(images, "edge_map")
    mag = _sobel_magnitude(jnp.mean(images, axis=-1))
    peak = jnp.max(mag, axis=(1, 2), keepdims=True)
    e = jnp.where(peak > 0, mag / jnp.where(peak > 0, peak, 1.0), 0.0)
    if threshold is not None:
        e = (e > threshold).astype(e.dtype)
    return e[..., None]


def low_resolution(images: Array, factor: int) -> Array:
    r"""The images at ``1 / factor`` of their resolution, shown at full size: ``A^+ A x`` with ``A`` the average pooling
    of :class:`jaxgen.inverse.DownsampleOperator` (the mean of each ``factor x factor`` block) and ``A^+`` its
    pseudo-inverse, nearest upsampling.

    It is a projection (``low_resolution(low_resolution(x, f), f) == low_resolution(x, f)``) and keeps every image's
    mean. Output: ``(B, H, W, C)`` in the images' range.
    """
    from jaxgen.inverse import DownsampleOperator

    images = _check_images(images, "low_resolution")
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"low_resolution's factor must be a positive int, got {factor!r}.")
    h, w = images.shape[1:3]
    if h % factor or w % factor:
        raise ValueError(f"low_resolution's factor {factor} must divide the image size {h}x{w}; pick a divisor "
                         f"(e.g. 2 or 4 for 8x8 digits).")
    op = DownsampleOperator(factor)
    return op.pinv(op(images))


def _check_mask_shape(shape, owner: str) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in shape)
    if len(shape) not in (3, 4) or min(shape) < 1:
        raise ValueError(f"{owner} expects the images' shape (B, H, W[, C]) with positive sizes, got {shape}.")
    return shape[:3]


def random_box_mask(key: Array, shape, *, min_fraction: float = 0.25, max_fraction: float = 0.75) -> Array:
    r"""One random axis-aligned box per image, as a mask that is 1 *outside* the box (known pixels) and 0 inside it
    (the region to generate), shape ``(B, H, W, 1)``.

    Each box side is a uniform integer in ``[ceil(min_fraction * size), floor(max_fraction * size)]`` (at least 1)
    and its position is uniform among the positions that fit. Use with :func:`masked_image` as an inpainting control.
    """
    if not 0.0 < min_fraction <= max_fraction <= 1.0:
        raise ValueError(f"random_box_mask needs 0 < min_fraction <= max_fraction <= 1, got {min_fraction} and "
                         f"{max_fraction}.")
    b, h, w = _check_mask_shape(shape, "random_box_mask")
    ks = jax.random.split(key, 4)

    def interval(k_size, k_pos, n):
        lo = max(1, math.ceil(min_fraction * n - 1e-9))  # ceil, without float slop at exact multiples
        hi = max(lo, int(max_fraction * n))
        size = jax.random.randint(k_size, (b,), lo, hi + 1)
        start = jax.random.randint(k_pos, (b,), 0, n - size + 1)  # maxval is per-sample
        idx = jnp.arange(n)
        return (idx >= start[:, None]) & (idx < (start + size)[:, None])  # (B, n)

    rows, cols = interval(ks[0], ks[1], h), interval(ks[2], ks[3], w)
    inside = rows[:, :, None] & cols[:, None, :]
    return (~inside).astype(jnp.float32)[..., None]


def masked_image(images: Array, mask: Array) -> Array:
    """The inpainting control ``concat([mask * images, mask])``: the known pixels (hidden ones set to 0, mid-grey in
    ``[-1, 1]``) and the mask itself (so hidden pixels are distinguishable from grey ones), ``(B, H, W, C + 1)``."""
    images = _check_images(images, "masked_image")
    mask = jnp.asarray(mask, images.dtype)
    want = images.shape[:3] + (1,)
    if mask.ndim not in (3, 4) or mask.shape[-1] != 1 or mask.shape[-3:-1] != want[1:3] \
            or (mask.ndim == 4 and mask.shape[0] not in (1, want[0])):
        raise ValueError(f"masked_image expects a mask of shape (B, H, W, 1) = {want} or (H, W, 1) for images of "
                         f"shape {tuple(images.shape)}, got {tuple(mask.shape)}.")
    mask = jnp.broadcast_to(mask, want)
    return jnp.concatenate([images * mask, mask], axis=-1)


def edge_agreement(samples: Array, control_edges: Array, *, threshold: float | None = None,
                   per_sample: bool = False) -> Array:
    r"""How well samples follow their edge controls: the Pearson correlation between the edge map of each sample
    (:func:`edge_map` with ``threshold``; use the one the controls were made with) and its requested edge map,
    averaged over the batch.

    ``rho_i = cov(E(x_i), e_i) / (std(E(x_i)) std(e_i))`` over the ``H W`` pixels (Pearson's correlation); a map with
    no variation (a flat sample or an empty control) scores 0. ``rho = 1`` when the sample's edges are exactly (an
    affine function of) the requested ones.

    **Reference values** (scikit-learn's 1,797 real 8x8 digits, soft maps): a digit against its own edge map scores
    1; against the edge map of another digit of the *same class* (a random pairing within each class) 0.61, and of
    a random digit of any class 0.40 (0.37 when the classes differ): the digits share a centred, stroke-like layout.
    With binary maps (``threshold=0.5`` for both) the pairings score 0.45 (same class) and 0.27 (any class). A
    controlled model follows its control when its samples score clearly above the same-class pairing, which is what
    a class-conditional model that ignores the control would reach (``tests/test_controlnet.py`` checks the order).

    Args:
      samples: ``(B, H, W, C)`` images.
      control_edges: ``(B, H, W, 1)`` requested edge maps.
      threshold: passed to :func:`edge_map` for the samples' maps.
      per_sample: return the ``(B,)`` correlations instead of their mean.
    """
    samples = _check_images(samples, "edge_agreement")
    control_edges = jnp.asarray(control_edges, samples.dtype)
    want = samples.shape[:3] + (1,)
    if control_edges.shape != want:
        raise ValueError(f"edge_agreement expects control_edges of shape (B, H, W, 1) = {want} (edge_map of the "
                         f"requested images) for samples of shape {tuple(samples.shape)}, got "
                         f"{tuple(control_edges.shape)}.")
    a = edge_map(samples, threshold=threshold).reshape(samples.shape[0], -1)
    c = control_edges.reshape(samples.shape[0], -1)
    a = a - a.mean(axis=1, keepdims=True)
    c = c - c.mean(axis=1, keepdims=True)
    den = jnp.sqrt(jnp.sum(a * a, axis=1) * jnp.sum(c * c, axis=1))
    rho = jnp.where(den > 0, jnp.sum(a * c, axis=1) / jnp.where(den > 0, den, 1.0), 0.0)
    return rho if per_sample else jnp.mean(rho)


__all__ = ["edge_map", "low_resolution", "random_box_mask", "masked_image", "edge_agreement"]
