r"""Fréchet distances: between two Gaussians, and between two image sets in any feature space.

For image models the standard metric is the Fréchet Inception Distance (FID): embed real and generated
images with a fixed network :math:`\phi`, fit a Gaussian to each feature set and report

.. math::

    \mathrm{FD}_\phi = \|\mu_r - \mu_g\|^2
        + \operatorname{tr}\!\left(C_r + C_g - 2\left(C_r^{1/2} C_g C_r^{1/2}\right)^{1/2}\right)

(Heusel et al., NeurIPS 2017). The feature extractor is pluggable: :func:`frechet_distance_from_features`
takes any ``feature_fn(images) -> (B, F)``. Nothing is downloaded: for real FID on natural images pass an
Inception-v3 pool3 feature function where its weights can be obtained; for scikit-learn's digits,
:mod:`jaxgen.evaluation` trains a small classifier whose features it uses.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import numpy as np
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jaxgen.metrics.samples import _as_samples

Array = jax.Array


def _sqrtm_psd(c: jax.Array) -> jax.Array:
    """Symmetric PSD matrix square root via ``eigh``; clips negative eigenvalues."""
    c = 0.5 * (c + c.T)
    w, v = jnp.linalg.eigh(c)
    w = jnp.sqrt(jnp.maximum(w, 0.0))
    return (v * w[None, :]) @ v.T


def gaussian_moments(features: ArrayLike) -> tuple[jax.Array, jax.Array]:
    r"""Mean and unbiased covariance of a feature set.

    .. math::

        \mu = \frac{1}{N}\sum_i f_i, \qquad
        C = \frac{1}{N-1} \sum_i (f_i - \mu)(f_i - \mu)^\top,

    matching ``np.cov(features, rowvar=False)`` (as used for FID).

    Args:
      features: array of shape ``(N, d)``, ``N >= 2``.

    Returns:
      ``(mu, cov)`` of shapes ``(d,)`` and ``(d, d)``.
    """
    f = _as_samples(features, "features")
    n = f.shape[0]
    if n < 2:
        raise ValueError(
            f"`features` needs at least 2 samples to estimate a covariance, got "
            f"shape {f.shape}."
        )
    mu = jnp.mean(f, axis=0)
    fc = f - mu
    cov = jnp.matmul(fc.T, fc, precision=jax.lax.Precision.HIGHEST) / (n - 1)
    return mu, cov


def frechet_distance(
    mu1: ArrayLike, cov1: ArrayLike, mu2: ArrayLike, cov2: ArrayLike
) -> jax.Array:
    r"""Fréchet distance between two Gaussians given their moments.

    .. math::

        \mathrm{FD} = \|\mu_1 - \mu_2\|^2 + \operatorname{tr}\!\left(
            C_1 + C_2 - 2 \left(C_1^{1/2} C_2 C_1^{1/2}\right)^{1/2}\right).

    This is the squared 2-Wasserstein distance between
    :math:`\mathcal{N}(\mu_1, C_1)` and :math:`\mathcal{N}(\mu_2, C_2)` (the FID
    when the moments come from Inception features). Matrix square roots use
    a symmetric eigendecomposition (:func:`jax.numpy.linalg.eigh`), clipping
    tiny negative eigenvalues caused by round-off. Jit-able; note that
    gradients through ``eigh`` are undefined for repeated eigenvalues.

    Reference: Heusel, Ramsauer, Unterthiner, Nessler & Hochreiter, "GANs
    trained by a two time-scale update rule converge to a local Nash
    equilibrium", NeurIPS 2017; Dowson & Landau 1982.

    Args:
      mu1: mean of shape ``(d,)``.
      cov1: covariance of shape ``(d, d)``.
      mu2: mean of shape ``(d,)``.
      cov2: covariance of shape ``(d, d)``.

    Returns:
      Scalar array.
    """
    mu1, cov1, mu2, cov2 = (jnp.asarray(a) for a in (mu1, cov1, mu2, cov2))
    if mu1.ndim != 1 or mu2.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(
            f"`mu1` and `mu2` must be vectors of the same shape (d,), got "
            f"{mu1.shape} and {mu2.shape}."
        )
    d = mu1.shape[0]
    if cov1.shape != (d, d) or cov2.shape != (d, d):
        raise ValueError(
            f"`cov1` and `cov2` must have shape ({d}, {d}) to match the means, "
            f"got {cov1.shape} and {cov2.shape}."
        )
    dtype = jnp.result_type(mu1, cov1, mu2, cov2, jnp.float32)
    mu1, cov1, mu2, cov2 = (a.astype(dtype) for a in (mu1, cov1, mu2, cov2))
    hp = jax.lax.Precision.HIGHEST
    s1 = _sqrtm_psd(cov1)
    m = jnp.matmul(jnp.matmul(s1, cov2, precision=hp), s1, precision=hp)
    eig = jnp.linalg.eigvalsh(0.5 * (m + m.T))
    tr_covmean = jnp.sum(jnp.sqrt(jnp.maximum(eig, 0.0)))
    diff = mu1 - mu2
    return jnp.dot(diff, diff) + jnp.trace(cov1) + jnp.trace(cov2) - 2.0 * tr_covmean
def _batched(fn: Callable[[Array], Array], images: ArrayLike, batch_size: int) -> np.ndarray:
    """Apply ``fn`` in fixed-size batches (the last one padded, so ``fn`` compiles once)."""
    images = np.asarray(images)
    n = images.shape[0]
    if n == 0:
        raise ValueError("no images given.")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    bs = min(batch_size, n)
    outs = []
    for start in range(0, n, bs):
        chunk = images[start:start + bs]
        m = chunk.shape[0]
        if m < bs:
            chunk = np.concatenate([chunk, np.repeat(chunk[-1:], bs - m, axis=0)], axis=0)
        outs.append(np.asarray(fn(jnp.asarray(chunk)))[:m])
    return np.concatenate(outs, axis=0)


# ---------------------------------------------------------------------------
# Fréchet distance in any feature space
# ---------------------------------------------------------------------------


def _precision_context(float64: bool):
    """``jax.enable_x64(True)`` (thread-local) when asked for and available, else a no-op context."""
    enable = getattr(jax, "enable_x64", None)
    return enable(True) if (float64 and enable is not None) else contextlib.nullcontext()


def feature_moments(feature_fn: Callable[[Array], Array], images: ArrayLike, *, batch_size: int = 256,
                    jit: bool = True, float64: bool = True) -> tuple[np.ndarray, np.ndarray]:
    r"""Mean and unbiased covariance :math:`(\mu, C)` of ``feature_fn(images)`` (batched).

    Features are extracted in the network's precision; the moments are accumulated in float64 (unless
    ``float64=False``). Precompute them once for a fixed reference set (e.g. the real test images) and
    pass the tuple to :func:`frechet_distance_from_features` in place of the images.

    Returns:
      ``(mu, cov)`` as NumPy arrays of shapes ``(F,)`` and ``(F, F)``.
    """
    fn = jax.jit(feature_fn) if jit else feature_fn
    feats = _batched(fn, images, batch_size)
    feats = feats.reshape(feats.shape[0], -1).astype(np.float64 if float64 else np.float32)
    with _precision_context(float64):
        mu, cov = gaussian_moments(feats)
        return np.asarray(mu), np.asarray(cov)


def frechet_distance_from_features(
    feature_fn: Callable[[Array], Array],
    real: ArrayLike | tuple[ArrayLike, ArrayLike],
    fake: ArrayLike | tuple[ArrayLike, ArrayLike],
    batch_size: int = 256,
    *,
    jit: bool = True,
    float64: bool = True,
) -> float:
    r"""Fréchet distance between two image sets in the feature space of ``feature_fn``.

    .. math::

        \mathrm{FD}_\phi = \|\mu_r - \mu_g\|^2
            + \operatorname{tr}\!\left(C_r + C_g - 2\left(C_r^{1/2} C_g C_r^{1/2}\right)^{1/2}\right),

    where :math:`(\mu, C)` are the mean and unbiased covariance of :math:`\phi(x)` over each set
    (:func:`jaxgen.metrics.gaussian_moments`, :func:`jaxgen.metrics.frechet_distance`). With
    Inception-v3 pool3 features this is the FID of Heusel et al. (NeurIPS 2017). No weights are
    downloaded by jaxgen: pass your own Inception ``feature_fn`` where they are available; for
    scikit-learn's digits use :func:`classifier_feature_fn` of a :class:`DigitsClassifier`.

    The trace terms are large and nearly cancel, and the square roots amplify round-off in the small
    eigenvalues of rank-deficient covariances, so in float32 the result can be off by ~1% of itself;
    by default the moments and the distance are therefore computed in float64 (inside a thread-local
    ``jax.enable_x64`` context; the feature network itself runs in its own precision).

    The estimate is biased upwards for finite sample sizes (the bias grows with the feature dimension
    and shrinks like ``1/N``), so only compare values computed with the same numbers of samples.

    Args:
      feature_fn: ``feature_fn(images) -> (B, F)`` (trailing dims are flattened); jitted unless
        ``jit=False`` (e.g. for a non-JAX extractor), and called on batches of exactly ``batch_size``
        images (the last batch is padded), so it compiles once.
      real: images ``(N, ...)``, or precomputed moments ``(mu, cov)`` from :func:`feature_moments`.
      fake: images ``(M, ...)``, or precomputed moments ``(mu, cov)``.
      batch_size: images per call of ``feature_fn``.
      jit: wrap ``feature_fn`` in :func:`jax.jit`.
      float64: compute the moments and the distance in float64.

    Returns:
      The Fréchet distance as a Python float.
    """
    fn = jax.jit(feature_fn) if jit else feature_fn

    def moments(a):
        if isinstance(a, tuple):
            if len(a) != 2:
                raise ValueError("precomputed moments must be a (mu, cov) tuple.")
            return tuple(np.asarray(m, np.float64 if float64 else np.float32) for m in a)
        return feature_moments(fn, a, batch_size=batch_size, jit=False, float64=float64)

    mu1, c1 = moments(real)
    mu2, c2 = moments(fake)
    with _precision_context(float64):
        return float(frechet_distance(mu1, c1, mu2, c2))


__all__ = ["frechet_distance", "gaussian_moments", "feature_moments", "frechet_distance_from_features"]
