"""Sample-quality metrics between two point sets.

All metrics take samples as arrays of shape ``(N, d)`` (one sample per row).
Inputs with ``ndim > 2`` are flattened to ``(N, prod(trailing dims))``.

Every function except :func:`wasserstein2_exact` is a pure ``jax.numpy``
function and can be wrapped in :func:`jax.jit` (``num_projections`` and
``bandwidths`` must then be static / closed over).

Pairwise-distance based metrics (:func:`mmd_rbf`, :func:`energy_distance`)
materialise ``(N, M)`` matrices, so they cost ``O(N M d)`` time and
``O(N M)`` memory.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from jaxgen._checks import check_finite, is_concrete

__all__ = [
    "sliced_wasserstein",
    "mmd_rbf",
    "energy_distance",
    "wasserstein2_exact",
]


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def _as_samples(x: ArrayLike, name: str) -> jax.Array:
    """Returns ``x`` as a floating ``(N, d)`` array, flattening trailing dims."""
    x = jnp.asarray(x)
    if x.ndim < 2:
        raise ValueError(
            f"`{name}` must have shape (num_samples, dim), got shape {x.shape}. "
            f"For 1-D data, pass `{name}[:, None]`."
        )
    if x.ndim > 2:
        x = x.reshape(x.shape[0], -1)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        x = x.astype(jnp.float32)
    return x


def _check_pair(
    x: ArrayLike, y: ArrayLike, *, same_size: bool, min_size: int = 1
) -> tuple[jax.Array, jax.Array]:
    """Validates and promotes a pair of sample sets."""
    x = _as_samples(x, "x")
    y = _as_samples(y, "y")
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            f"`x` and `y` must have the same feature dimension, got shapes "
            f"{x.shape} and {y.shape}. Make sure both sets live in the same space."
        )
    if x.shape[0] < min_size or y.shape[0] < min_size:
        raise ValueError(
            f"`x` and `y` need at least {min_size} samples each, got shapes "
            f"{x.shape} and {y.shape}."
        )
    if same_size and x.shape[0] != y.shape[0]:
        raise ValueError(
            f"`x` and `y` must have the same number of samples, got shapes "
            f"{x.shape} and {y.shape}. Subsample the larger set to "
            f"{min(x.shape[0], y.shape[0])} points."
        )
    check_finite(x, name="x", hint="A distance between sample sets with NaN/inf samples is undefined.")
    check_finite(y, name="y", hint="A distance between sample sets with NaN/inf samples is undefined.")
    dtype = jnp.result_type(x.dtype, y.dtype)
    return x.astype(dtype), y.astype(dtype)


def _sqdist(a: jax.Array, b: jax.Array) -> jax.Array:
    r"""Pairwise squared Euclidean distances, clamped at zero.

    .. math:: D_{ij} = \max(\|a_i\|^2 + \|b_j\|^2 - 2 a_i \cdot b_j,\ 0)

    Args:
      a: array of shape ``(N, d)``.
      b: array of shape ``(M, d)``.

    Returns:
      Array of shape ``(N, M)``. The clamp removes the small negative values
      produced by floating-point cancellation.
    """
    a2 = jnp.sum(a * a, axis=-1)
    b2 = jnp.sum(b * b, axis=-1)
    ab = jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)
    return jnp.maximum(a2[:, None] + b2[None, :] - 2.0 * ab, 0.0)


def _pairwise_norm(a: jax.Array, b: jax.Array) -> jax.Array:
    r"""Pairwise Euclidean distances :math:`\|a_i - b_j\|` from explicit differences.

    Unlike the Gram expansion in :func:`_sqdist`, differencing is exact for
    coincident points (the expansion leaves :math:`O(\sqrt{\epsilon}\,\|a\|)`
    errors after the square root). Rows of ``a`` are processed in blocks with
    :func:`jax.lax.map`, so peak memory is ``O(block * M * d)``. The square root
    has zero gradient at zero distance.
    """
    block = max(1, min(a.shape[0], (1 << 22) // max(1, b.shape[0] * b.shape[1])))

    def row(ai: jax.Array) -> jax.Array:
        return _safe_sqrt(jnp.sum(jnp.square(ai[None, :] - b), axis=-1))

    return jax.lax.map(row, a, batch_size=block)


def _safe_sqrt(s: jax.Array) -> jax.Array:
    """``sqrt(s)`` for ``s >= 0`` with a zero (not NaN/inf) gradient at 0."""
    positive = s > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, s, 1.0)), 0.0)


def _offdiag_mean(k: jax.Array) -> jax.Array:
    """Mean of the off-diagonal entries of a square ``(N, N)`` matrix."""
    n = k.shape[0]
    mask = 1.0 - jnp.eye(n, dtype=k.dtype)
    return jnp.sum(k * mask) / (n * (n - 1))


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------


def sliced_wasserstein(
    x: ArrayLike,
    y: ArrayLike,
    key: jax.Array,
    num_projections: int = 256,
    squared: bool = False,
) -> jax.Array:
    r"""Monte-Carlo sliced 2-Wasserstein distance between two equal-size sets.

    .. math::

        \mathrm{SW}_2(x, y) = \sqrt{\mathbb{E}_{\theta \sim U(S^{d-1})}
            \left[ W_2^2(\theta_\# x, \theta_\# y) \right]},
        \qquad
        W_2^2(\theta_\# x, \theta_\# y) = \frac{1}{N} \sum_{i=1}^N
            \left(\theta \cdot x_{(i)} - \theta \cdot y_{(i)}\right)^2,

    where :math:`x_{(i)}` denotes the point with the ``i``-th smallest
    projection. The expectation is estimated with ``num_projections`` random
    directions (normalised standard normals). For a shift ``y = x + m`` of a
    Gaussian, :math:`\mathrm{SW}_2^2 = \|m\|^2 / d`.

    Reference: Bonneel, Rabin, Peyré & Pfister, "Sliced and Radon Wasserstein
    barycenters of measures", JMIV 2015.

    Args:
      x: samples of shape ``(N, d)``.
      y: samples of shape ``(N, d)`` (same ``N``).
      key: PRNG key for the projection directions.
      num_projections: number of random directions (static under ``jit``).
      squared: if True, return :math:`\mathrm{SW}_2^2` instead.

    Returns:
      Scalar array.
    """
    x, y = _check_pair(x, y, same_size=True)
    if num_projections < 1:
        raise ValueError(f"`num_projections` must be >= 1, got {num_projections}.")
    theta = jax.random.normal(key, (num_projections, x.shape[1]), dtype=x.dtype)
    theta = theta / jnp.linalg.norm(theta, axis=-1, keepdims=True)
    hp = jax.lax.Precision.HIGHEST
    px = jnp.sort(jnp.matmul(x, theta.T, precision=hp), axis=0)  # (N, P)
    py = jnp.sort(jnp.matmul(y, theta.T, precision=hp), axis=0)
    sw2 = jnp.mean(jnp.mean(jnp.square(px - py), axis=0))
    return sw2 if squared else _safe_sqrt(sw2)


def mmd_rbf(
    x: ArrayLike,
    y: ArrayLike,
    bandwidths: Sequence[float] = (0.1, 0.5, 1.0, 2.0, 5.0),
) -> jax.Array:
    r"""Unbiased squared MMD with a sum-of-RBF kernel.

    .. math::

        k(a, b) = \sum_h \exp\!\left(-\frac{\|a - b\|^2}{2 h^2}\right),

        \widehat{\mathrm{MMD}}^2_u = \frac{1}{N(N-1)} \sum_{i \ne j} k(x_i, x_j)
            + \frac{1}{M(M-1)} \sum_{i \ne j} k(y_i, y_j)
            - \frac{2}{N M} \sum_{i, j} k(x_i, y_j).

    The estimator is unbiased, so it can be slightly negative when the two
    distributions are equal.

    Reference: Gretton, Borgwardt, Rasch, Schölkopf & Smola, "A kernel
    two-sample test", JMLR 2012 (Lemma 6).

    Args:
      x: samples of shape ``(N, d)``, ``N >= 2``.
      y: samples of shape ``(M, d)``, ``M >= 2``.
      bandwidths: kernel bandwidths ``h`` (static under ``jit``).

    Returns:
      Scalar array, the MMD^2 estimate.
    """
    x, y = _check_pair(x, y, same_size=False, min_size=2)
    h = jnp.asarray(bandwidths, dtype=x.dtype).reshape(-1)
    if h.shape[0] == 0:
        raise ValueError("`bandwidths` must contain at least one bandwidth.")
    if is_concrete(h) and not bool(jnp.all(jnp.isfinite(h) & (h > 0))):
        raise ValueError(f"`bandwidths` must be finite and > 0, got {list(np.asarray(h))}.")
    gamma = 1.0 / (2.0 * h * h)

    def kernel(a: jax.Array, b: jax.Array) -> jax.Array:
        # Accumulate over bandwidths to avoid materialising (H, N, M).
        d2 = _sqdist(a, b)
        return sum(jnp.exp(-gamma[i] * d2) for i in range(gamma.shape[0]))

    kxx = _offdiag_mean(kernel(x, x))
    kyy = _offdiag_mean(kernel(y, y))
    kxy = jnp.mean(kernel(x, y))
    return kxx + kyy - 2.0 * kxy


def energy_distance(x: ArrayLike, y: ArrayLike, unbiased: bool = True) -> jax.Array:
    r"""Energy distance between two sample sets.

    .. math::

        \mathcal{E}(X, Y) = 2\,\mathbb{E}\|X - Y\| - \mathbb{E}\|X - X'\|
            - \mathbb{E}\|Y - Y'\|.

    The cross term is always the mean over all ``N * M`` pairs. With
    ``unbiased=True`` (default) the within-set terms are U-statistics (mean over
    ``i != j``), giving an unbiased estimate of the population energy distance
    that may be slightly negative; note that then ``energy_distance(x, x)`` is
    ``-(2 / N) * mean_{i != j} |x_i - x_j|``, not 0. With ``unbiased=False``
    all terms are V-statistics (means including the zero diagonal): the result
    is the exact energy distance between the two empirical measures, which is
    ``>= 0`` and exactly 0 for identical sets.

    Distances are computed from explicit differences (exact at zero distance,
    blockwise to bound memory) with a safe square root, so gradients are finite
    at zero distance. Cost: ``O((N^2 + N M + M^2) d)`` time.

    Reference: Székely & Rizzo, "Energy statistics: A class of statistics based
    on distances", J. Stat. Plan. Inference 2013.

    Args:
      x: samples of shape ``(N, d)``.
      y: samples of shape ``(M, d)``.
      unbiased: U-statistics (True) or V-statistics (False) for within terms.

    Returns:
      Scalar array.
    """
    x, y = _check_pair(x, y, same_size=False, min_size=2 if unbiased else 1)
    dxy = jnp.mean(_pairwise_norm(x, y))
    dxx = _pairwise_norm(x, x)
    dyy = _pairwise_norm(y, y)
    if unbiased:
        dxx, dyy = _offdiag_mean(dxx), _offdiag_mean(dyy)
    else:
        dxx, dyy = jnp.mean(dxx), jnp.mean(dyy)
    return 2.0 * dxy - dxx - dyy


def wasserstein2_exact(x: ArrayLike, y: ArrayLike) -> float:
    r"""Exact 2-Wasserstein distance between two equal-size empirical measures.

    .. math::

        W_2(x, y) = \sqrt{\min_{\sigma \in S_N} \frac{1}{N}
            \sum_{i=1}^N \|x_i - y_{\sigma(i)}\|^2}.

    For uniform weights and equal sizes the optimal plan is a permutation
    (Birkhoff–von Neumann), found with the Hungarian-type solver
    :func:`scipy.optimize.linear_sum_assignment` on the squared-distance cost
    in float64.

    This runs on the host in NumPy: it is **not** jit-able or differentiable
    and costs ``O(N^3)`` time and ``O(N^2)`` memory, so it is meant for ``N``
    up to a few thousand.

    Args:
      x: samples of shape ``(N, d)``.
      y: samples of shape ``(N, d)``.

    Returns:
      Python float.
    """
    from scipy.optimize import linear_sum_assignment

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    for name, a in (("x", x), ("y", y)):
        if a.ndim < 2:
            raise ValueError(
                f"`{name}` must have shape (num_samples, dim), got shape "
                f"{a.shape}. For 1-D data, pass `{name}[:, None]`."
            )
    x = x.reshape(x.shape[0], -1)
    y = y.reshape(y.shape[0], -1)
    if x.shape[1] != y.shape[1]:
        raise ValueError(
            f"`x` and `y` must have the same feature dimension, got shapes "
            f"{x.shape} and {y.shape}."
        )
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"`x` and `y` must have the same number of samples, got shapes "
            f"{x.shape} and {y.shape}. Subsample the larger set."
        )
    if x.shape[0] == 0:
        raise ValueError(f"`x` and `y` must be non-empty, got shapes {x.shape}.")
    cost = (
        np.sum(x * x, axis=1)[:, None]
        + np.sum(y * y, axis=1)[None, :]
        - 2.0 * (x @ y.T)
    )
    cost = np.maximum(cost, 0.0)
    rows, cols = linear_sum_assignment(cost)
    return float(np.sqrt(np.mean(cost[rows, cols])))


