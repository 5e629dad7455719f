r"""Bits per dimension of discrete data under a continuous density: uniform dequantisation (Theis et al. 2016)
and the change of variables to the model's scaled space."""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import numpy as np
import jax
import jax.numpy as jnp

from jaxgen._checks import is_concrete
from jaxgen.likelihood.ode import LikelihoodResult, _check_batch, _flat_dim, log_likelihood
from jaxgen.paths.gaussian import GaussianPath

Array = jax.Array


def _check_range(data_range, num_bins) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in data_range)
    except (TypeError, ValueError):
        raise ValueError(f"data_range must be a pair (lo, hi) of floats, got {data_range!r}.") from None
    if not hi > lo:
        raise ValueError(f"data_range must have hi > lo, got {data_range!r}.")
    if not isinstance(num_bins, (int, np.integer)) or num_bins < 2:
        raise ValueError(f"num_bins must be an int >= 2 (256 for 8-bit images), got {num_bins!r}.")
    return lo, hi


def bits_per_dim(log_prob: Array, num_dims: int, *, data_range: tuple[float, float] = (-1.0, 1.0),
                 num_bins: int = 256) -> Array:
    r"""Bits per dimension of dequantised discrete data from its log-density in the model's scaled space.

    Let ``k in {0..num_bins-1}^D`` be the discrete data, ``y = k + u`` with ``u ~ U[0, 1)^D`` its uniform
    dequantisation on ``[0, num_bins)^D`` (Theis et al. 2016), and ``x = lo + (hi - lo) y / num_bins``
    the data the model sees (:func:`dequantize`; ``[0, 256) -> [-1, 1)`` by default). Change of variables:
    ``q(y) = p(x) |dx/dy|^D = p(x) ((hi - lo) / num_bins)^D``, so

    .. math:: \mathrm{bpd} = -\frac{\log_2 q(y)}{D}
              = -\frac{\log p(x)}{D \ln 2} + \log_2 \frac{\mathrm{num\_bins}}{hi - lo}.

    The offset is ``log2(256 / 2) = 7`` for 8-bit data on ``[-1, 1)`` (score_sde's
    ``log2(grad(inverse_scaler)(0)) + 8``) and 8 on ``[0, 1)``; the uniform density ``2^{-D}`` on
    ``[-1, 1)^D`` gives exactly 8 bits/dim. By Jensen, ``E_u[bpd]`` bounds the discrete model's
    ``-log2 P(k) / D``, with ``P(k) = int q(k + u) du``, from above.

    Args:
      log_prob: ``log p(x)`` in nats, any shape (e.g. ``(B,)``).
      num_dims: ``D``, the number of dimensions per sample (e.g. ``H * W * C``).
      data_range: the interval ``[lo, hi)`` that ``[0, num_bins)`` is mapped onto.
      num_bins: number of discrete levels (256 for 8-bit data).
    """
    lo, hi = _check_range(data_range, num_bins)
    if not isinstance(num_dims, (int, np.integer)) or num_dims < 1:
        raise ValueError(f"num_dims must be a positive int (e.g. H * W * C), got {num_dims!r}.")
    log_prob = jnp.asarray(log_prob)
    offset = math.log2(num_bins / (hi - lo))
    return -log_prob / (num_dims * math.log(2.0)) + offset


def dequantize(key: Array, images: Array, *, data_range: tuple[float, float] = (-1.0, 1.0), num_bins: int = 256,
               dtype=None) -> Array:
    r"""Uniformly dequantise discrete images and scale them: ``x = lo + (hi - lo) (k + u) / num_bins``.

    ``u ~ U[0, 1)`` per entry (Theis et al. 2016; score_sde's ``(k + u) / 256`` then ``2 w - 1``), so
    ``x in [lo, hi)``; pair the log-density of ``x`` with :func:`bits_per_dim` (same ``data_range``).

    ``images`` are either integers ``k in [0, num_bins - 1]`` (uint8) or floats on the clean grid
    ``lo + (hi - lo) k / (num_bins - 1)`` (jaxgen's image pipeline: ``k / 127.5 - 1``), from which ``k`` is
    recovered by rounding. The clean point ``k / 127.5 - 1`` lies in the bin of ``k``,
    ``[k / 128 - 1, (k + 1) / 128 - 1]``. ``dtype`` defaults to the default float (float64 under
    ``jax.enable_x64``). Out-of-range or off-grid values raise ``ValueError`` (checked eagerly).
    """
    lo, hi = _check_range(data_range, num_bins)
    images = jnp.asarray(images)
    dtype = jax.dtypes.canonicalize_dtype(jnp.float64) if dtype is None else dtype
    if jnp.issubdtype(images.dtype, jnp.integer):
        k = images
        if is_concrete(k) and k.size and (int(jnp.min(k)) < 0 or int(jnp.max(k)) > num_bins - 1):
            raise ValueError(f"integer images must lie in [0, {num_bins - 1}], got values in "
                             f"[{int(jnp.min(k))}, {int(jnp.max(k))}].")
        k = k.astype(dtype)
    elif jnp.issubdtype(images.dtype, jnp.floating):
        kf = (images.astype(dtype) - lo) / (hi - lo) * (num_bins - 1)
        k = jnp.round(kf)
        if is_concrete(kf) and kf.size:
            kf_np = np.asarray(kf, np.float64)
            if kf_np.min() < -1e-3 or kf_np.max() > num_bins - 1 + 1e-3 or np.max(np.abs(kf_np - np.round(kf_np))) > 1e-2:
                raise ValueError(
                    f"float images must be clean discrete values on the grid lo + (hi - lo) k / {num_bins - 1} of "
                    f"data_range={data_range} (e.g. uint8 / 127.5 - 1); these are off the grid or out of range "
                    "(already dequantised, or a different scaling?). Pass the uint8 images instead.")
    else:
        raise ValueError(f"images must be integer (uint8) or float, got dtype {images.dtype}.")
    u = jax.random.uniform(key, images.shape, dtype)
    x = lo + (hi - lo) * (k + u) / num_bins
    # Rounding (of k + u for k >= 128 in float32, and of the affine map) can put a u close to 1 on the upper edge
    # of the bin, i.e. in bin k + 1 (x = hi for k = num_bins - 1): keep every point strictly inside its own bin.
    upper = lo + (hi - lo) * (k + 1) / num_bins
    return jnp.minimum(x, jnp.nextafter(upper, jnp.asarray(lo, upper.dtype)))


class ImageLikelihood(NamedTuple):
    """Output of :func:`image_bits_per_dim`: ``bits_per_dim (B,)``, the :class:`LikelihoodResult` of the
    dequantised batch, and that batch ``x`` (in ``data_range``)."""

    bits_per_dim: Array
    likelihood: LikelihoodResult
    x: Array


def image_bits_per_dim(
    field: Callable,
    images: Array,
    key: Array,
    *,
    path: GaussianPath | str,
    prediction: str = "velocity",
    data_range: tuple[float, float] = (-1.0, 1.0),
    num_bins: int = 256,
    divergence: str = "hutchinson",
    dtype=None,
    **likelihood_kwargs,
) -> ImageLikelihood:
    r"""Bits/dim of discrete images under a field's probability-flow ODE (one dequantisation sample).

    Dequantises ``images`` (uint8 ``(B, H, W, C)``, or clean floats, see :func:`dequantize`) with uniform
    noise in ``[0, 1)`` on the ``0..num_bins - 1`` scale, maps them onto ``data_range``, computes
    :func:`log_likelihood` and converts with :func:`bits_per_dim`:
    ``bpd = -log p(x) / (D ln 2) + log2(num_bins / (hi - lo))`` (= ``+ 7`` for ``[-1, 1)``).
    ``key`` is split into the dequantisation key and the Hutchinson probe key. Averaged over a data set
    this is the (upper-bound) NLL reported by score_sde / FFJORD. Further keywords go to
    :func:`log_likelihood` (``rtol``, ``num_probes``, ``t_noise``, ``cond`` ...).
    """
    if "key" in likelihood_kwargs:
        raise ValueError("pass one key as the third argument; image_bits_per_dim splits it for dequantisation and probes.")
    _check_batch(images)
    k_deq, k_probe = jax.random.split(key)
    x = dequantize(k_deq, images, data_range=data_range, num_bins=num_bins, dtype=dtype)
    res = log_likelihood(field, x, path=path, prediction=prediction, divergence=divergence, key=k_probe,
                         **likelihood_kwargs)
    bpd = bits_per_dim(res.log_prob, _flat_dim(x), data_range=data_range, num_bins=num_bins)
    return ImageLikelihood(bpd, res, x)


__all__ = ["ImageLikelihood", "bits_per_dim", "dequantize", "image_bits_per_dim"]
