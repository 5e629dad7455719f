"""Synthetic low-dimensional distributions as pure JAX samplers.

Every sampler has the signature ``sample(key, n, **params) -> Array`` and
returns a ``(n, 2)`` float32 array (``standard_normal`` and
``gaussian_mixture_samples`` return ``(n, dim)``). They are pure functions of
the key, so the same key always gives the same samples, and they can be
jit-compiled with ``n`` static::

    sample = jax.jit(toy2d.moons, static_argnums=1)
    x = sample(jax.random.key(0), 1024)

Conventions follow TorchCFM (Tong et al. 2023) and FFJORD (Grathwohl et al.
2019) where noted. Unless stated otherwise, ``noise`` is the standard
deviation of isotropic Gaussian noise added *before* the final affine
``x * scale (+ shift)``, as in scikit-learn's dataset generators.
"""

from __future__ import annotations

import functools
import inspect
import math
import operator
from typing import Any, Callable

import numpy as np
import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

__all__ = [
    "eight_gaussians",
    "moons",
    "circles",
    "checkerboard",
    "swiss_roll",
    "spirals",
    "gaussian_mixture_samples",
    "standard_normal",
    "DISTRIBUTIONS",
    "get_distribution",
]

Sampler = Callable[[jax.Array, int], jax.Array]

_DTYPE = jnp.float32


def _num_samples(n: Any) -> int:
    """Validates that ``n`` is a static non-negative Python integer."""
    try:
        n = operator.index(n)
    except TypeError as e:
        raise TypeError(
            f"`n` must be a static Python int, got {type(n).__name__}. Under "
            "`jax.jit`, mark it static: `jax.jit(sample, static_argnums=1)`."
        ) from e
    if n < 0:
        raise ValueError(f"`n` must be non-negative, got {n}.")
    return n


def _coin(key: jax.Array, n: int) -> jax.Array:
    """``n`` fair Bernoulli draws as a boolean array."""
    return jax.random.bernoulli(key, 0.5, (n,))


# ---------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------


def eight_gaussians(
    key: jax.Array, n: int, scale: float = 5.0, var: float = 0.1
) -> jax.Array:
    r"""Mixture of 8 equally weighted Gaussians on a circle (TorchCFM convention).

    Centres are ``scale * c`` for ``c`` in ``(1, 0), (-1, 0), (0, 1), (0, -1),
    (±1/√2, ±1/√2)``. Following TorchCFM's ``eight_normal_sample`` exactly,
    the noise is drawn from :math:`\mathcal{N}(0, \sqrt{\mathrm{var}}\, I)`:
    TorchCFM passes ``sqrt(var) * eye`` as the *covariance* matrix, so the
    per-coordinate standard deviation is ``var ** 0.25`` (≈ 0.562 for the
    default ``var=0.1``), not ``sqrt(var)``.

    Moments: mean 0 and per-coordinate variance
    :math:`\mathrm{scale}^2 / 2 + \sqrt{\mathrm{var}}` (12.816 by default).

    Args:
      key: PRNG key.
      n: number of samples (static).
      scale: radius of the circle of centres.
      var: TorchCFM's ``var`` parameter (see above).

    Returns:
      Array of shape ``(n, 2)``, float32.
    """
    n = _num_samples(n)
    s = 1.0 / math.sqrt(2.0)
    centers = jnp.array(
        [[1, 0], [-1, 0], [0, 1], [0, -1], [s, s], [s, -s], [-s, s], [-s, -s]],
        dtype=_DTYPE,
    )
    k_idx, k_noise = jax.random.split(key)
    idx = jax.random.randint(k_idx, (n,), 0, 8)
    std = var**0.25
    noise = std * jax.random.normal(k_noise, (n, 2), dtype=_DTYPE)
    return (scale * centers[idx] + noise).astype(_DTYPE)


def moons(
    key: jax.Array,
    n: int,
    noise: float = 0.2,
    scale: float = 3.0,
    shift: float = -1.0,
) -> jax.Array:
    r"""Two interleaving half circles (scikit-learn ``make_moons`` geometry).

    Outer moon: :math:`(\cos a, \sin a)`; inner moon:
    :math:`(1 - \cos a, 1 - \sin a - 1/2)`, with :math:`a \sim U[0, \pi]` and
    each point's moon chosen with probability 1/2 (scikit-learn uses evenly
    spaced angles and exact halves instead). Gaussian noise of std ``noise``
    is added, then the result is mapped to ``x * scale + shift``. The defaults
    give scikit-learn's ``make_moons(noise=0.2) * 3 - 1``, the placement of
    TorchCFM's ``sample_moons``, whose noise differs: it calls torchdyn's
    ``generate_moons``, which shifts each point along the diagonal by
    ``U[0, 0.2)`` instead of adding Gaussian noise.

    Before the affine map the mean is ``(1/2, 1/4)``, so by default the mean
    is ``(0.5, -0.25)``.

    Args:
      key: PRNG key.
      n: number of samples (static).
      noise: std of the Gaussian noise (before scaling).
      scale: multiplicative scale.
      shift: additive shift applied after scaling.

    Returns:
      Array of shape ``(n, 2)``, float32.
    """
    n = _num_samples(n)
    k_a, k_moon, k_noise = jax.random.split(key, 3)
    a = jax.random.uniform(k_a, (n,), dtype=_DTYPE, minval=0.0, maxval=jnp.pi)
    outer = jnp.stack([jnp.cos(a), jnp.sin(a)], axis=-1)
    inner = jnp.stack([1.0 - jnp.cos(a), 0.5 - jnp.sin(a)], axis=-1)
    x = jnp.where(_coin(k_moon, n)[:, None], outer, inner)
    x = x + noise * jax.random.normal(k_noise, (n, 2), dtype=_DTYPE)
    return (x * scale + shift).astype(_DTYPE)


def circles(
    key: jax.Array,
    n: int,
    factor: float = 0.5,
    noise: float = 0.05,
    scale: float = 3.0,
) -> jax.Array:
    r"""Two concentric circles (scikit-learn ``make_circles`` geometry).

    Outer circle of radius 1 and inner circle of radius ``factor``; angles
    :math:`a \sim U[0, 2\pi)` and each point's circle chosen with probability
    1/2. Gaussian noise of std ``noise`` is added and the result multiplied by
    ``scale`` (default radii 3 and 1.5).

    Moments: mean 0, per-coordinate variance
    :math:`\mathrm{scale}^2 \left((1 + \mathrm{factor}^2)/4 + \mathrm{noise}^2\right)`.

    Args:
      key: PRNG key.
      n: number of samples (static).
      factor: ratio of inner to outer radius, in ``(0, 1)``.
      noise: std of the Gaussian noise (before scaling).
      scale: multiplicative scale (outer radius).

    Returns:
      Array of shape ``(n, 2)``, float32.
    """
    n = _num_samples(n)
    k_a, k_c, k_noise = jax.random.split(key, 3)
    a = jax.random.uniform(k_a, (n,), dtype=_DTYPE, minval=0.0, maxval=2 * jnp.pi)
    r = jnp.where(_coin(k_c, n), 1.0, factor).astype(_DTYPE)
    x = r[:, None] * jnp.stack([jnp.cos(a), jnp.sin(a)], axis=-1)
    x = x + noise * jax.random.normal(k_noise, (n, 2), dtype=_DTYPE)
    return (x * scale).astype(_DTYPE)


def checkerboard(
    key: jax.Array, n: int, num_cells: int = 4, cell_size: float = 2.0
) -> jax.Array:
    r"""Uniform distribution on the dark squares of a checkerboard.

    The board has ``num_cells x num_cells`` square cells of side ``cell_size``
    centred at the origin, i.e. it covers
    :math:`[-L/2, L/2]^2` with :math:`L = \mathrm{num\_cells}\cdot
    \mathrm{cell\_size}`. Cell ``(i, j)`` (``i`` indexing x, ``j`` indexing y,
    from the bottom-left corner) is occupied iff ``i + j`` is even. The
    defaults give the usual FFJORD 4x4 board on :math:`[-4, 4]^2` with 8
    occupied cells.

    Moments: mean 0 and each marginal uniform on :math:`[-L/2, L/2]`, so the
    per-coordinate variance is :math:`L^2 / 12` (16/3 by default).

    Args:
      key: PRNG key.
      n: number of samples (static).
      num_cells: cells per side; must be a positive even integer.
      cell_size: side length of a cell.

    Returns:
      Array of shape ``(n, 2)``, float32.
    """
    n = _num_samples(n)
    num_cells = operator.index(num_cells)
    if num_cells < 2 or num_cells % 2:
        raise ValueError(f"`num_cells` must be a positive even integer, got {num_cells}.")
    k_i, k_j, k_u = jax.random.split(key, 3)
    i = jax.random.randint(k_i, (n,), 0, num_cells)
    j = 2 * jax.random.randint(k_j, (n,), 0, num_cells // 2) + i % 2
    u = jax.random.uniform(k_u, (n, 2), dtype=_DTYPE)
    cell = jnp.stack([i, j], axis=-1).astype(_DTYPE)
    x = (cell + u) * cell_size - 0.5 * num_cells * cell_size
    return x.astype(_DTYPE)


def swiss_roll(
    key: jax.Array, n: int, noise: float = 0.5, scale: float = 0.15
) -> jax.Array:
    r"""Two-dimensional swiss roll (scikit-learn ``make_swiss_roll``, x-z plane).

    .. math::

        t = \tfrac{3\pi}{2}(1 + 2u),\ u \sim U[0, 1], \qquad
        x = \mathrm{scale} \cdot \left((t \cos t,\ t \sin t) + \mathrm{noise}
            \cdot \varepsilon\right).

    The unscaled roll has per-coordinate std ≈ 6.6 and 7.0, so the default
    ``scale=0.15`` gives a per-coordinate std of about 1 (FFJORD uses
    ``scale=0.2`` with ``noise=1``). The distribution is not centred: its mean is
    about ``scale * (2.0, 0.2)``.

    Args:
      key: PRNG key.
      n: number of samples (static).
      noise: std of the Gaussian noise (before scaling).
      scale: multiplicative scale.

    Returns:
      Array of shape ``(n, 2)``, float32.
    """
    n = _num_samples(n)
    k_t, k_noise = jax.random.split(key)
    t = 1.5 * jnp.pi * (1.0 + 2.0 * jax.random.uniform(k_t, (n,), dtype=_DTYPE))
    x = jnp.stack([t * jnp.cos(t), t * jnp.sin(t)], axis=-1)
    x = x + noise * jax.random.normal(k_noise, (n, 2), dtype=_DTYPE)
    return (x * scale).astype(_DTYPE)


def spirals(
    key: jax.Array,
    n: int,
    turns: float = 1.5,
    noise: float = 0.3,
    scale: float = 1.0 / 3.0,
) -> jax.Array:
    r"""Two interleaved spirals, point-symmetric about the origin.

    With :math:`t = 2\pi \cdot \mathrm{turns} \cdot \sqrt{u}`,
    :math:`u \sim U[0, 1]` (the square root makes the density roughly uniform
    along the arc), one arm is :math:`(-t \cos t,\ t \sin t)` and the other its
    negation; each point's arm is chosen with probability 1/2. Gaussian noise
    of std ``noise`` is added and the result multiplied by ``scale``. The
    defaults follow FFJORD's ``2spirals`` (540 degrees, divided by 3, noise
    0.1 after scaling) without its additional uniform jitter; the default
    support is roughly :math:`[-3.5, 3.5]^2` and the mean is 0.

    Args:
      key: PRNG key.
      n: number of samples (static).
      turns: number of revolutions of each arm.
      noise: std of the Gaussian noise (before scaling).
      scale: multiplicative scale.

    Returns:
      Array of shape ``(n, 2)``, float32.
    """
    n = _num_samples(n)
    k_t, k_arm, k_noise = jax.random.split(key, 3)
    t = 2.0 * jnp.pi * turns * jnp.sqrt(jax.random.uniform(k_t, (n,), dtype=_DTYPE))
    arm = jnp.stack([-t * jnp.cos(t), t * jnp.sin(t)], axis=-1)
    sign = jnp.where(_coin(k_arm, n), 1.0, -1.0).astype(_DTYPE)
    x = sign[:, None] * arm
    x = x + noise * jax.random.normal(k_noise, (n, 2), dtype=_DTYPE)
    return (x * scale).astype(_DTYPE)


def gaussian_mixture_samples(
    key: jax.Array,
    n: int,
    means: ArrayLike,
    stds: ArrayLike,
    weights: ArrayLike | None = None,
) -> jax.Array:
    r"""Samples from a mixture of isotropic Gaussians.

    .. math::

        p(x) = \sum_{k=1}^K w_k\, \mathcal{N}(x;\ \mu_k,\ \sigma_k^2 I),

    with weights normalised to sum to one.

    Args:
      key: PRNG key.
      n: number of samples (static).
      means: component means, shape ``(K, d)``.
      stds: per-component standard deviations, shape ``(K,)`` or a scalar
        shared by all components.
      weights: non-negative component weights, shape ``(K,)``; uniform if None.

    Returns:
      Array of shape ``(n, d)``, float32.
    """
    n = _num_samples(n)
    means = jnp.asarray(means, dtype=_DTYPE)
    if means.ndim != 2:
        raise ValueError(
            f"`means` must have shape (num_components, dim), got {means.shape}."
        )
    num_components, dim = means.shape
    stds = jnp.asarray(stds, dtype=_DTYPE)
    if stds.ndim == 0:
        stds = jnp.full((num_components,), stds, dtype=_DTYPE)
    if stds.shape != (num_components,):
        raise ValueError(
            f"`stds` must be a scalar or have shape ({num_components},) to match "
            f"`means` of shape {means.shape}, got {stds.shape}."
        )
    if weights is None:
        logits = jnp.zeros((num_components,), dtype=_DTYPE)
    else:
        weights = jnp.asarray(weights, dtype=_DTYPE)
        if weights.shape != (num_components,):
            raise ValueError(
                f"`weights` must have shape ({num_components},) to match `means` "
                f"of shape {means.shape}, got {weights.shape}."
            )
        logits = jnp.log(weights)
    k_idx, k_noise = jax.random.split(key)
    idx = jax.random.categorical(k_idx, logits, shape=(n,))
    eps = jax.random.normal(k_noise, (n, dim), dtype=_DTYPE)
    return (means[idx] + stds[idx, None] * eps).astype(_DTYPE)


def standard_normal(key: jax.Array, n: int, dim: int = 2) -> jax.Array:
    r"""Samples from the standard normal :math:`\mathcal{N}(0, I_{\mathrm{dim}})`.

    Args:
      key: PRNG key.
      n: number of samples (static).
      dim: dimension (static).

    Returns:
      Array of shape ``(n, dim)``, float32.
    """
    n = _num_samples(n)
    return jax.random.normal(key, (n, operator.index(dim)), dtype=_DTYPE)


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------

DISTRIBUTIONS: dict[str, Callable[..., jax.Array]] = {
    "eight_gaussians": eight_gaussians,
    "moons": moons,
    "circles": circles,
    "checkerboard": checkerboard,
    "swiss_roll": swiss_roll,
    "spirals": spirals,
    "gaussian_mixture": gaussian_mixture_samples,
    "standard_normal": standard_normal,
}
"""Name -> sampler ``fn(key, n, **params)``."""

ALIASES: dict[str, str] = {
    "8gaussians": "eight_gaussians",
    "8_gaussians": "eight_gaussians",
    "two_moons": "moons",
    "swissroll": "swiss_roll",
    "2spirals": "spirals",
    "gaussian": "standard_normal",
    "normal": "standard_normal",
}
"""Alternative names (TorchCFM's ``8gaussians`` among them)."""


def get_distribution(name: str, **kwargs: Any) -> Sampler:
    """Returns the sampler ``sample(key, n)`` registered under ``name``.

    Keyword arguments are bound to the sampler's parameters, e.g.
    ``get_distribution("moons", noise=0.1)``. They are checked against the
    sampler's signature immediately.

    Raises:
      ValueError: if ``name`` is unknown (the message lists known names).
      TypeError: if ``kwargs`` do not match the sampler's parameters.
    """
    try:
        fn = DISTRIBUTIONS[ALIASES.get(name, name)]
    except (KeyError, TypeError):
        known = ", ".join(sorted(DISTRIBUTIONS) + sorted(ALIASES))
        raise ValueError(
            f"Unknown distribution {name!r}. Known distributions: {known}."
        ) from None
    reserved = {"key", "n"} & set(kwargs)
    if reserved:
        raise TypeError(
            f"Do not pass {sorted(reserved)} to get_distribution; they are the "
            "arguments of the returned sampler `sample(key, n)`."
        )
    try:
        inspect.signature(fn).bind_partial(**kwargs)
    except TypeError as e:
        raise TypeError(f"Invalid parameters for distribution {name!r}: {e}") from None
    for k, v in kwargs.items():
        arr = np.asarray(v)
        if arr.dtype.kind in "biufc" and not np.all(np.isfinite(arr)):
            raise ValueError(f"distribution {name!r}: parameter {k}={v!r} must be finite (no NaN or inf).")
        if k in ("noise", "var", "stds", "cell_size", "factor") and arr.dtype.kind in "iuf" and np.any(arr < 0):
            raise ValueError(f"distribution {name!r}: parameter {k}={v!r} must be >= 0.")
        if k in ("num_cells", "dim") and (arr.dtype.kind not in "iu" or np.any(arr < 1)):
            raise ValueError(f"distribution {name!r}: parameter {k}={v!r} must be a positive integer.")
    if not kwargs:
        return fn
    return functools.partial(fn, **kwargs)
