r"""k-nearest-neighbour manifold metrics of generated samples: precision, recall, density and coverage.

FID folds fidelity and diversity into one number; these metrics separate them. Both sets are embedded in a feature
space (Inception pool features, or the digits classifier's, :mod:`jaxgen.evaluation`) and each point :math:`\phi` of a
set :math:`\Phi` gets the ball :math:`B(\phi, \mathrm{NND}_k(\phi))` whose radius is the distance to its k-th nearest
neighbour in :math:`\Phi` (itself excluded). With real features :math:`X_1..X_N` and fake features :math:`Y_1..Y_M`:

* **improved precision / recall** (Kynkäänniemi, Karras, Laine, Lehtinen & Aila, "Improved Precision and Recall Metric
  for Assessing Generative Models", NeurIPS 2019, eqs. 1-2): the manifold of a set is the union of its balls,
  :math:`f(\phi, \Phi) = 1` iff :math:`\|\phi - \phi'\| \le \mathrm{NND}_k(\phi')` for some :math:`\phi' \in \Phi`;
  precision :math:`= \frac1M \sum_j f(Y_j, X)` (how many samples are realistic), recall
  :math:`= \frac1N \sum_i f(X_i, Y)` (how much of the real manifold the samples reach);
* **density / coverage** (Naeem, Oh, Uh, Choi & Yoo, "Reliable Fidelity and Diversity Metrics for Generative Models",
  ICML 2020, eqs. 3-4), which use the real balls only and so are robust to outliers among the samples:
  density :math:`= \frac{1}{kM}\sum_j \sum_i [Y_j \in B(X_i, \mathrm{NND}_k(X_i))]` (unbounded, 1 on average when
  the two distributions agree), coverage :math:`= \frac1N \sum_i [\exists j: Y_j \in B(X_i, \mathrm{NND}_k(X_i))]`.

Memory: no ``(N, M)`` matrix is formed. Pairwise squared distances are computed block by block
(``block_size`` rows at a time under :func:`jax.lax.map`, as :math:`\|a\|^2 + \|b\|^2 - 2 a \cdot b` after centring both
sets on the real mean), so 10,000 x 10,000 points of 2,048 features need ``block_size x 10,000`` floats at a time.
Exact duplicates: a point's own distance is excluded by index (not by being zero), so a duplicated point counts as a
neighbour; squared distances below the round-off of the expansion (``8 eps (|a|^2 + |b|^2)``) are snapped to exactly 0,
so a sample equal to a real point lies inside its ball even when the ball has radius 0 (a point with k duplicates).
All comparisons are ``<=`` as in the papers. Pure JAX (jit-able with static ``k`` and ``block_size``).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxgen._checks import check_finite, is_concrete
from jaxgen.metrics.samples import _as_samples

Array = jax.Array

__all__ = ["knn_radii", "precision_recall", "density_coverage", "manifold_metrics"]

_HINT = "Manifold metrics of feature sets with NaN/inf features are undefined; check the feature extractor's input."


# ---------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------


def _check_k(k, block_size) -> tuple[int, int]:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k (the number of nearest neighbours) must be an integer >= 1, got {k!r}; the papers use "
                         "3-5.")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an integer >= 1, got {block_size!r}; 1024 suits most memories.")
    return k, block_size


def _check_set(x: ArrayLike, name: str, k: int) -> Array:
    x = _as_samples(x, name)
    if x.shape[0] < k + 1:
        raise ValueError(f"`{name}` has {x.shape[0]} points, but the k-th nearest neighbour of a point (itself "
                         f"excluded) needs at least k + 1 = {k + 1}; pass more points or a smaller k.")
    if x.shape[1] < 1:
        raise ValueError(f"`{name}` has no features (shape {x.shape}).")
    if is_concrete(x):
        check_finite(x, name=f"`{name}`", hint=_HINT)
    return x


def _check_pair(real: ArrayLike, fake: ArrayLike, k: int) -> tuple[Array, Array]:
    real, fake = _check_set(real, "real", k), _check_set(fake, "fake", k)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"`real` and `fake` must have the same feature dimension, got shapes {real.shape} and "
                         f"{fake.shape}; embed both sets with the same feature extractor.")
    dtype = jnp.result_type(real.dtype, fake.dtype)
    return real.astype(dtype), fake.astype(dtype)


# ---------------------------------------------------------------------------
# Blocked pairwise distances
# ---------------------------------------------------------------------------


def _sq_dists(a: Array, b: Array, a_sq: Array, b_sq: Array) -> Array:
    r"""``(n, m)`` squared distances :math:`\|a\|^2 + \|b\|^2 - 2 a\cdot b`, clamped at 0, with values below the
    expansion's round-off (``8 eps (|a|^2 + |b|^2)``) snapped to exactly 0 (so exact duplicates are at distance 0)."""
    scale = a_sq[:, None] + b_sq[None, :]
    d2 = scale - 2.0 * jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)
    tol = 8.0 * jnp.finfo(d2.dtype).eps
    return jnp.where(d2 <= tol * scale, jnp.zeros((), d2.dtype), d2)


def _row_blocks(x: Array, block: int) -> tuple[Array, Array, Array]:
    """``x`` padded to a multiple of ``block`` rows: ``(num_blocks, block, d)`` rows, their squared norms and their
    global row indices (padding rows get indices ``>= n``)."""
    n = x.shape[0]
    block = min(block, n)
    nb = -(-n // block)
    xp = jnp.pad(x, ((0, nb * block - n), (0, 0)))
    return (xp.reshape(nb, block, x.shape[1]), jnp.sum(xp * xp, axis=-1).reshape(nb, block),
            jnp.arange(nb * block).reshape(nb, block))


def _map_rows(fn, x: Array, block: int) -> Array:
    """``fn(rows, rows_sq, rows_index) -> (block,)`` over the row blocks of ``x``; returns ``(n,)``."""
    blocks = _row_blocks(x, block)
    return jax.lax.map(lambda args: fn(*args), blocks).reshape(-1)[: x.shape[0]]


def _knn_sq_radii(x: Array, k: int, block: int) -> Array:
    """Squared distance of each point of ``x`` to its k-th nearest neighbour in ``x``, itself (by index) excluded."""
    n = x.shape[0]
    x_sq = jnp.sum(x * x, axis=-1)
    cols = jnp.arange(n)

    def one(rows, rows_sq, idx):
        d2 = _sq_dists(rows, x, rows_sq, x_sq)
        d2 = jnp.where(idx[:, None] == cols[None, :], jnp.inf, d2)
        neg, _ = jax.lax.top_k(-d2, k)
        return -neg[:, k - 1]

    return _map_rows(one, x, block)


@functools.partial(jax.jit, static_argnames=("k", "block", "recall"))
def _manifold(real: Array, fake: Array, k: int, block: int, recall: bool = True) -> dict[str, Array]:
    """All four metrics from three blocked passes: the real and fake k-NN radii, then one pass over blocks of fake
    rows of the fake-to-real distances, carrying each real point's nearest sample and whether a fake ball holds it.
    ``recall=False`` skips the fake radii (and returns no recall)."""
    mu = jnp.mean(real, axis=0)  # distances are translation invariant; centring shrinks the expansion's round-off
    real, fake = real - mu, fake - mu
    n, m = real.shape[0], fake.shape[0]
    real_r2 = _knn_sq_radii(real, k, block)
    fake_r2 = _knn_sq_radii(fake, k, block) if recall else jnp.zeros((m,), real.dtype)
    rows, rows_sq, idx = _row_blocks(fake, block)
    rows_r2 = jnp.pad(fake_r2, (0, idx.size - m)).reshape(idx.shape)
    real_sq = jnp.sum(real * real, axis=-1)

    def body(carry, args):
        nearest, in_fake_manifold = carry
        f, f_sq, f_idx, f_r2 = args
        d2 = _sq_dists(f, real, f_sq, real_sq)                       # (block, N)
        d2 = jnp.where((f_idx < m)[:, None], d2, jnp.inf)            # padding rows are no samples
        counts = jnp.sum(d2 <= real_r2[None, :], axis=-1)            # real balls holding each sample
        nearest = jnp.minimum(nearest, jnp.min(d2, axis=0))          # each real point's nearest sample
        in_fake_manifold = in_fake_manifold | jnp.any(d2 <= f_r2[:, None], axis=0)
        return (nearest, in_fake_manifold), counts

    init = (jnp.full((n,), jnp.inf, real.dtype), jnp.zeros((n,), bool))
    (nearest, in_fake_manifold), counts = jax.lax.scan(body, init, (rows, rows_sq, idx, rows_r2))
    counts = counts.reshape(-1)[:m]
    out = {
        "precision": jnp.mean((counts > 0).astype(real.dtype)),
        "recall": jnp.mean(in_fake_manifold.astype(real.dtype)),
        "density": jnp.sum(counts).astype(real.dtype) / (k * m),
        "coverage": jnp.mean((nearest <= real_r2).astype(real.dtype)),
    }
    if not recall:
        del out["recall"]
    return out


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------


def knn_radii(features: ArrayLike, k: int = 5, *, block_size: int = 1024) -> Array:
    r"""Distance of each point to its k-th nearest neighbour in the same set, itself excluded.

    :math:`\mathrm{NND}_k(\phi) = \|\phi - \mathrm{NN}_k(\phi, \Phi)\|`, the radius of the balls that define the
    k-NN manifold of Kynkäänniemi et al. (NeurIPS 2019, eq. 1) and Naeem et al. (ICML 2020, eq. 3). The point itself
    is excluded by index, so an exact duplicate is a neighbour at distance 0.

    Args:
      features: ``(N, D)`` features (trailing dims flattened), ``N >= k + 1``.
      k: which neighbour.
      block_size: rows of the distance matrix computed at a time (memory ``block_size x N``).

    Returns:
      ``(N,)`` radii.
    """
    k, block_size = _check_k(k, block_size)
    x = _check_set(features, "features", k)
    return jnp.sqrt(_knn_sq_radii_jit(x - jnp.mean(x, axis=0), k, block_size))


_knn_sq_radii_jit = jax.jit(_knn_sq_radii, static_argnames=("k", "block"))


def precision_recall(real: ArrayLike, fake: ArrayLike, k: int = 5, *, block_size: int = 1024) -> tuple[Array, Array]:
    r"""Improved precision and recall on k-NN manifolds (Kynkäänniemi et al., NeurIPS 2019, eqs. 1-2).

    .. math::

        f(\phi, \Phi) = [\exists \phi' \in \Phi: \|\phi - \phi'\| \le \|\phi' - \mathrm{NN}_k(\phi', \Phi)\|],
        \quad \mathrm{precision} = \frac1M \sum_{j} f(Y_j, X), \quad \mathrm{recall} = \frac1N \sum_{i} f(X_i, Y).

    Both lie in ``[0, 1]``; identical sets give 1 and 1, far-apart sets 0 and 0, samples from half of the real modes
    precision ~1 and recall ~1/2. Use the same ``k`` (3 in the paper) and comparable set sizes when comparing models.

    Args:
      real: ``(N, D)`` features of real data, ``N >= k + 1``.
      fake: ``(M, D)`` features of generated samples, ``M >= k + 1``.
      k: neighbourhood size of the manifold estimate.
      block_size: rows of each distance block.

    Returns:
      ``(precision, recall)`` as scalar arrays.
    """
    k, block_size = _check_k(k, block_size)
    real, fake = _check_pair(real, fake, k)
    out = _manifold(real, fake, k, block_size)  # density and coverage come free from the same pass
    return out["precision"], out["recall"]


def density_coverage(real: ArrayLike, fake: ArrayLike, k: int = 5, *, block_size: int = 1024) -> tuple[Array, Array]:
    r"""Density and coverage (Naeem et al., ICML 2020, eqs. 3-4), from the real k-NN balls only.

    .. math::

        \mathrm{density} = \frac{1}{kM} \sum_{j=1}^M \sum_{i=1}^N [Y_j \in B(X_i, \mathrm{NND}_k(X_i))], \qquad
        \mathrm{coverage} = \frac1N \sum_{i=1}^N [\exists j: Y_j \in B(X_i, \mathrm{NND}_k(X_i))].

    Density is ``>= 0`` and unbounded (about 1 when the two distributions agree, more when samples crowd dense real
    regions); coverage lies in ``[0, 1]`` (1 for identical sets, 0 for far-apart ones).

    Args:
      real: ``(N, D)`` real features, ``N >= k + 1``.
      fake: ``(M, D)`` generated features, ``M >= k + 1``.
      k: neighbourhood size (5 in the paper).
      block_size: rows of each distance block.

    Returns:
      ``(density, coverage)`` as scalar arrays.
    """
    k, block_size = _check_k(k, block_size)
    real, fake = _check_pair(real, fake, k)
    out = _manifold(real, fake, k, block_size, recall=False)
    return out["density"], out["coverage"]


def manifold_metrics(real: ArrayLike, fake: ArrayLike, k: int = 5, *, block_size: int = 1024) -> dict[str, Array]:
    """Precision, recall (Kynkäänniemi et al. 2019, eqs. 1-2), density and coverage (Naeem et al. 2020, eqs. 3-4) in
    one pass that computes the real k-NN radii once; see :func:`precision_recall` and :func:`density_coverage`.

    Returns:
      ``{"precision", "recall", "density", "coverage"}`` as scalar arrays.
    """
    k, block_size = _check_k(k, block_size)
    real, fake = _check_pair(real, fake, k)
    out = _manifold(real, fake, k, block_size)
    return {name: out[name] for name in ("precision", "recall", "density", "coverage")}
