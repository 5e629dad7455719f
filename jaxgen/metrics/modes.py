r"""Mode collapse on a Gaussian-mixture target (pure JAX): modes covered, high-quality samples, and the mode
histogram's divergence from uniform.

The measure of VEEGAN (Srivastava et al. 2017, sec. 5, the synthetic mixtures; also Metz et al. 2017, "Unrolled
GANs"): each sample is assigned to its nearest mixture centre and counts as *high quality* when it lies within ``k``
standard deviations of it (``k = 3``); a mode is *covered* when it holds at least a minimum number of high-quality
samples (PacGAN's rule, Lin et al. 2018: 20 of 2,500 samples, the default fraction ``0.008``). The KL divergence of
the high-quality samples' mode histogram from the uniform one (the mixture's weights) says how evenly the covered
modes are filled.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

Array = jax.Array


class ModeCoverage(NamedTuple):
    """What :func:`mode_coverage` measures.

    Attributes:
      modes_covered: the number of centres with at least the minimum count of high-quality samples (int32 scalar).
      high_quality: the fraction of samples within ``k`` standard deviations of their nearest centre.
      kl_from_uniform: ``KL(p || uniform)`` of the high-quality samples' mode histogram ``p``, in nats: 0 for
        evenly filled modes, ``log K`` when every high-quality sample is in one mode (and, by convention, when there
        is no high-quality sample).
      counts: high-quality samples per centre, shape ``(K,)`` (int32).
    """

    modes_covered: Array
    high_quality: Array
    kl_from_uniform: Array
    counts: Array


def eight_gaussians_modes(scale: float = 5.0, var: float = 0.1) -> tuple[Array, float]:
    r"""The centres ``(8, 2)`` and per-coordinate standard deviation of :func:`jaxgen.data.toy2d.eight_gaussians`:
    ``scale`` times the unit vectors at multiples of 45 degrees, std ``var ** 0.25`` (TorchCFM's convention, 0.562
    for ``var = 0.1``), in the data module's order."""
    s = 1.0 / math.sqrt(2.0)
    unit = jnp.array([[1, 0], [-1, 0], [0, 1], [0, -1], [s, s], [s, -s], [-s, s], [-s, -s]], jnp.float32)
    return scale * unit, float(var) ** 0.25


def mode_coverage(
    samples: ArrayLike,
    centres: ArrayLike,
    std: float | ArrayLike,
    *,
    k: float = 3.0,
    min_count: int | None = None,
    min_fraction: float = 0.008,
) -> ModeCoverage:
    r"""Mode coverage of ``samples`` on a mixture of isotropic Gaussians with ``centres`` (VEEGAN's measure,
    Srivastava et al. 2017, sec. 5).

    A sample ``x`` goes to its nearest centre ``c``; it is high quality when ``||x - c|| <= k std`` (``std`` the
    per-coordinate standard deviation, one for all modes or one per mode). A centre is covered when its high-quality
    count reaches ``min_count``, or ``min_fraction * N`` (N samples) when ``min_count`` is None (PacGAN, Lin et al.
    2018: 20 of 2,500). ``KL(p || u) = sum_j p_j log(K p_j)`` for the high-quality histogram ``p`` and the uniform
    ``u`` (the mixture's equal weights; empty bins contribute 0).

    Args:
      samples: ``(N, d)``.
      centres: ``(K, d)``, e.g. from :func:`eight_gaussians_modes`.
      std: the mixture's per-coordinate standard deviation, a scalar or ``(K,)``.
      k: the quality radius in standard deviations.
      min_count, min_fraction: the covering rule (above).

    Returns:
      A :class:`ModeCoverage`. Jit-compatible with the options static.
    """
    x, c = jnp.asarray(samples), jnp.asarray(centres)
    if x.ndim != 2 or c.ndim != 2 or x.shape[1] != c.shape[1]:
        raise ValueError(f"mode_coverage needs samples (N, d) and centres (K, d) of one dimension d, got "
                         f"{x.shape} and {c.shape}.")
    if x.shape[0] == 0 or c.shape[0] == 0:
        raise ValueError(f"mode_coverage needs at least one sample and one centre, got {x.shape} and {c.shape}.")
    if not (isinstance(k, (int, float, np.number)) and k > 0):
        raise ValueError(f"mode_coverage: k (the quality radius in standard deviations) must be > 0, got {k!r}.")
    if min_count is not None and (isinstance(min_count, bool) or not isinstance(min_count, (int, np.integer))
                                  or min_count < 1):
        raise ValueError(f"mode_coverage: min_count must be a positive int or None (use min_fraction), got "
                         f"{min_count!r}.")
    if min_count is None and not (isinstance(min_fraction, (int, float, np.number)) and 0 < min_fraction <= 1):
        raise ValueError(f"mode_coverage: min_fraction must be in (0, 1], got {min_fraction!r}.")
    std = jnp.asarray(std, jnp.float32)
    if std.ndim not in (0, 1) or (std.ndim == 1 and std.shape[0] != c.shape[0]):
        raise ValueError(f"mode_coverage: std must be a scalar or one per centre ({c.shape[0]},), got {std.shape}.")
    x = x.astype(jnp.float32)
    c = c.astype(jnp.float32)
    n, num_modes = x.shape[0], c.shape[0]
    d2 = jnp.sum(jnp.square(x[:, None, :] - c[None, :, :]), axis=-1)  # (N, K)
    nearest = jnp.argmin(d2, axis=-1)
    dist = jnp.sqrt(jnp.take_along_axis(d2, nearest[:, None], axis=-1)[:, 0])
    radius = k * (std if std.ndim == 0 else std[nearest])
    good = dist <= radius
    counts = jnp.zeros(num_modes, jnp.int32).at[nearest].add(good.astype(jnp.int32))
    threshold = min_count if min_count is not None else max(1, math.ceil(min_fraction * n))
    total = jnp.sum(counts)
    p = counts / jnp.maximum(total, 1)
    kl = jnp.sum(jax.scipy.special.xlogy(p, p * num_modes))
    kl = jnp.where(total > 0, kl, math.log(num_modes))
    return ModeCoverage(jnp.sum(counts >= threshold).astype(jnp.int32), jnp.mean(good.astype(jnp.float32)), kl,
                        counts)


__all__ = ["ModeCoverage", "mode_coverage", "eight_gaussians_modes"]
