"""Tests for jaxgen.metrics."""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg
import scipy.stats

from jaxgen import metrics

# Compiled once per module and shared by the tests.
sw_jit = jax.jit(
    functools.partial(metrics.sliced_wasserstein, num_projections=512), static_argnames=("squared",)
)
mmd_jit = jax.jit(metrics.mmd_rbf, static_argnames=("bandwidths",))
ed_jit = jax.jit(metrics.energy_distance, static_argnames=("unbiased",))
fd_jit = jax.jit(metrics.frechet_distance)
moments_jit = jax.jit(metrics.gaussian_moments)
sw_small_jit = jax.jit(metrics.sliced_wasserstein, static_argnames=("num_projections", "squared"))
sqdist_jit = jax.jit(metrics.samples._sqdist)

N = 2048
SHIFT = np.array([2.0, 0.0], dtype=np.float32)


@pytest.fixture(scope="module")
def gaussians():
    """Three independent N(0, I_2) sets; the third is shifted by SHIFT."""
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k1, (N, 2))
    y = jax.random.normal(k2, (N, 2))
    z = jax.random.normal(k3, (N, 2)) + SHIFT
    return x, y, z


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


# ---------------------------------------------------------------------------
# _sqdist
# ---------------------------------------------------------------------------


def test_sqdist_matches_bruteforce_and_is_nonnegative():
    rng = _rng(1)
    a = rng.normal(size=(9, 3)).astype(np.float32) * 100.0
    b = rng.normal(size=(7, 3)).astype(np.float32)
    ref = ((a[:, None, :].astype(np.float64) - b[None]) ** 2).sum(-1)
    out = np.asarray(sqdist_jit(a, b))
    assert out.shape == (9, 7)
    np.testing.assert_allclose(out, ref, rtol=1e-5)
    # Self-distances suffer cancellation; the clamp keeps them >= 0.
    self_d = np.asarray(sqdist_jit(a, a))
    assert np.all(self_d >= 0.0)


# ---------------------------------------------------------------------------
# Sliced Wasserstein
# ---------------------------------------------------------------------------


def test_sliced_wasserstein_same_distribution_is_small(gaussians):
    x, y, _ = gaussians
    sw = float(sw_jit(x, y, jax.random.key(1)))
    assert 0.0 < sw < 0.1


def test_sliced_wasserstein_shift_matches_analytic(gaussians):
    # SW2^2 = E_theta[(theta . m)^2] = |m|^2 / d for a shift m. For a shifted
    # copy this holds up to the Monte-Carlo error over 512 directions (~1.6%).
    x, _, z = gaussians
    expected = np.linalg.norm(SHIFT) / math.sqrt(2)
    assert float(sw_jit(x, x + SHIFT, jax.random.key(2))) == pytest.approx(expected, rel=0.05)
    # Independent samples add O(N^-1/2) sampling error on top.
    assert float(sw_jit(x, z, jax.random.key(2))) == pytest.approx(expected, rel=0.1)


def test_sliced_wasserstein_zero_for_identical_and_permuted(gaussians):
    x, _, _ = gaussians
    x_perm = np.asarray(x)[_rng(3).permutation(N)]
    key = jax.random.key(4)
    assert float(sw_jit(x, x, key)) == 0.0
    assert float(sw_jit(x, x_perm, key)) == pytest.approx(0.0, abs=1e-6)


def test_sliced_wasserstein_1d_equals_exact_w2():
    # In 1-D every direction is +-1, so SW2 is the exact 1-D W2.
    rng = _rng(5)
    x = rng.normal(size=(300, 1)).astype(np.float32)
    y = (rng.normal(size=(300, 1)) * 2.0 + 0.5).astype(np.float32)
    sw = float(sw_small_jit(x, y, jax.random.key(0), num_projections=8))
    w2 = metrics.wasserstein2_exact(x, y)
    assert sw == pytest.approx(w2, rel=1e-4)
    sw2 = float(metrics.sliced_wasserstein(x, y, jax.random.key(0), num_projections=8, squared=True))
    assert sw2 == pytest.approx(w2**2, rel=1e-4)


def test_sliced_wasserstein_lower_bounds_exact_w2():
    rng = _rng(6)
    x = rng.normal(size=(200, 3))
    y = rng.standard_t(df=3, size=(200, 3)) + 0.3
    sw = float(sw_small_jit(x, y, jax.random.key(0)))
    w2 = metrics.wasserstein2_exact(x, y)
    assert 0.0 < sw <= w2 + 1e-5


def test_sliced_wasserstein_flattens_trailing_dims():
    rng = _rng(7)
    x = rng.normal(size=(16, 2, 3)).astype(np.float32)
    y = rng.normal(size=(16, 2, 3)).astype(np.float32)
    key = jax.random.key(0)
    a = metrics.sliced_wasserstein(x, y, key, num_projections=8)
    b = metrics.sliced_wasserstein(x.reshape(16, 6), y.reshape(16, 6), key, num_projections=8)
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_sliced_wasserstein_gradient_finite_at_identical_sets(gaussians):
    x, _, _ = gaussians
    g = jax.jit(jax.grad(lambda a: metrics.sliced_wasserstein(a, x[:64], jax.random.key(0))))(x[:64])
    assert np.all(np.isfinite(np.asarray(g)))


def test_sliced_wasserstein_validation():
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"same number of samples.*\(4, 2\).*\(5, 2\)"):
        metrics.sliced_wasserstein(jnp.zeros((4, 2)), jnp.zeros((5, 2)), key)
    with pytest.raises(ValueError, match=r"feature dimension.*\(4, 2\).*\(4, 3\)"):
        metrics.sliced_wasserstein(jnp.zeros((4, 2)), jnp.zeros((4, 3)), key)
    with pytest.raises(ValueError, match=r"\(num_samples, dim\).*\(4,\)"):
        metrics.sliced_wasserstein(jnp.zeros(4), jnp.zeros(4), key)
    with pytest.raises(ValueError, match="num_projections"):
        metrics.sliced_wasserstein(jnp.zeros((4, 2)), jnp.zeros((4, 2)), key, 0)


# ---------------------------------------------------------------------------
# MMD
# ---------------------------------------------------------------------------


def _mmd_reference(x, y, bandwidths):
    def k(a, b):
        d2 = float(np.sum((a - b) ** 2))
        return sum(math.exp(-d2 / (2 * h * h)) for h in bandwidths)

    n, m = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kxy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return kxx + kyy - 2 * kxy


def test_mmd_matches_reference_with_unequal_sizes():
    rng = _rng(8)
    x = rng.normal(size=(7, 3))
    y = rng.normal(size=(5, 3)) + 0.5
    bw = (0.5, 1.0, 3.0)
    out = float(mmd_jit(x.astype(np.float32), y.astype(np.float32), bw))
    assert out == pytest.approx(_mmd_reference(x, y, bw), abs=1e-5)


def test_mmd_same_distribution_near_zero_and_shift_positive(gaussians):
    x, y, z = gaussians
    same = float(mmd_jit(x, y))
    shifted = float(mmd_jit(x, z))
    assert abs(same) < 5e-3
    assert shifted > 0.5
    assert shifted > 100 * abs(same)


def test_mmd_validation():
    with pytest.raises(ValueError, match=r"at least 2 samples.*\(1, 2\)"):
        metrics.mmd_rbf(jnp.zeros((1, 2)), jnp.zeros((3, 2)))
    with pytest.raises(ValueError, match="feature dimension"):
        metrics.mmd_rbf(jnp.zeros((3, 2)), jnp.zeros((3, 4)))


# ---------------------------------------------------------------------------
# Energy distance
# ---------------------------------------------------------------------------


def _energy_reference(x, y, unbiased):
    def mean_dist(a, b, skip_diag):
        vals = [
            float(np.linalg.norm(a[i] - b[j]))
            for i in range(len(a))
            for j in range(len(b))
            if not (skip_diag and i == j)
        ]
        return sum(vals) / len(vals)

    return 2 * mean_dist(x, y, False) - mean_dist(x, x, unbiased) - mean_dist(y, y, unbiased)


@pytest.mark.parametrize("unbiased", [True, False])
def test_energy_distance_matches_reference(unbiased):
    rng = _rng(9)
    x = rng.normal(size=(6, 2))
    y = rng.normal(size=(9, 2)) * 1.5
    out = float(ed_jit(x.astype(np.float32), y.astype(np.float32), unbiased=unbiased))
    assert out == pytest.approx(_energy_reference(x, y, unbiased), abs=1e-5)


def test_energy_distance_identical_sets(gaussians):
    x, _, _ = gaussians
    assert float(ed_jit(x, x, unbiased=False)) == pytest.approx(0.0, abs=1e-6)
    # U-statistic within terms: E(x, x) = -(2 / N) * mean_{i != j} |x_i - x_j|.
    d = np.linalg.norm(np.asarray(x)[:, None] - np.asarray(x)[None], axis=-1)
    expected = -(2.0 / N) * d.sum() / (N * (N - 1))
    assert float(ed_jit(x, x)) == pytest.approx(expected, rel=1e-3)


def test_energy_distance_1d_shift_matches_analytic():
    # X ~ N(0,1), Y ~ N(mu,1): X - Y ~ N(-mu, 2), X - X' ~ N(0, 2), and
    # E|Z| for Z ~ N(m, s^2) is s*sqrt(2/pi)*exp(-m^2/(2 s^2)) + m*(1 - 2 Phi(-m/s)).
    mu, s = 1.0, math.sqrt(2.0)
    e_xy = s * math.sqrt(2 / math.pi) * math.exp(-(mu**2) / (2 * s * s)) + mu * (
        1 - 2 * scipy.stats.norm.cdf(-mu / s)
    )
    expected = 2 * e_xy - 2 * s * math.sqrt(2 / math.pi)
    k1, k2 = jax.random.split(jax.random.key(10))
    x = jax.random.normal(k1, (N, 1))
    y = jax.random.normal(k2, (N, 1)) + mu
    assert float(ed_jit(x, y)) == pytest.approx(expected, abs=0.05)


def test_energy_distance_same_small_shift_large(gaussians):
    x, y, z = gaussians
    assert abs(float(ed_jit(x, y))) < 0.02
    assert float(ed_jit(x, z)) > 1.0


@pytest.mark.parametrize("unbiased", [True, False])
def test_energy_distance_gradient_finite_at_zero_distance(unbiased):
    x = jnp.array([[0.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    g = jax.jit(jax.grad(lambda a: metrics.energy_distance(a, x, unbiased)))(x)
    assert np.all(np.isfinite(np.asarray(g)))


# ---------------------------------------------------------------------------
# Exact W2
# ---------------------------------------------------------------------------


def test_wasserstein2_exact_shift_and_permutation():
    rng = _rng(11)
    x = rng.normal(size=(300, 3))
    m = np.array([0.3, -1.2, 2.0])
    assert metrics.wasserstein2_exact(x, x + m) == pytest.approx(np.linalg.norm(m), rel=1e-9)
    assert metrics.wasserstein2_exact(x, x[rng.permutation(300)]) == pytest.approx(0.0, abs=1e-6)


def test_wasserstein2_exact_matches_bruteforce():
    rng = _rng(12)
    x = rng.normal(size=(6, 2))
    y = rng.uniform(size=(6, 2))
    best = min(
        np.mean(np.sum((x - y[list(p)]) ** 2, axis=1)) for p in itertools.permutations(range(6))
    )
    out = metrics.wasserstein2_exact(jnp.asarray(x, jnp.float32), y)
    assert isinstance(out, float)
    assert out == pytest.approx(math.sqrt(best), rel=1e-5)


def test_wasserstein2_exact_validation():
    with pytest.raises(ValueError, match=r"same number of samples.*\(3, 2\).*\(4, 2\)"):
        metrics.wasserstein2_exact(np.zeros((3, 2)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match="feature dimension"):
        metrics.wasserstein2_exact(np.zeros((3, 2)), np.zeros((3, 1)))
    with pytest.raises(ValueError, match=r"\(num_samples, dim\)"):
        metrics.wasserstein2_exact(np.zeros(3), np.zeros(3))


# ---------------------------------------------------------------------------
# Frechet distance
# ---------------------------------------------------------------------------


def _random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_unit_shift_is_three():
    eye = jnp.eye(3)
    out = float(fd_jit(jnp.zeros(3), eye, jnp.ones(3), eye))
    assert out == pytest.approx(3.0, abs=1e-5)


def test_frechet_distance_equal_moments_is_zero():
    rng = _rng(13)
    mu, cov = rng.normal(size=5), _random_spd(rng, 5)
    out = float(fd_jit(mu, cov, mu, cov))
    assert out == pytest.approx(0.0, abs=1e-4 * np.trace(cov))


def test_frechet_distance_diagonal_analytic():
    # Commuting covariances: FD = |dmu|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    a = np.array([1.0, 4.0, 0.25])
    b = np.array([9.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    out = float(fd_jit(mu1, np.diag(a), mu2, np.diag(b)))
    assert out == pytest.approx(expected, rel=1e-5)


def test_frechet_distance_matches_scipy_sqrtm():
    rng = _rng(14)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    c1, c2 = _random_spd(rng, d), _random_spd(rng, d)
    covmean = scipy.linalg.sqrtm(c1 @ c2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(c1 + c2 - 2 * covmean)
    out = float(fd_jit(mu1, c1, mu2, c2))
    assert out == pytest.approx(expected, rel=1e-4)
    # Symmetric in its two arguments.
    assert float(fd_jit(mu2, c2, mu1, c1)) == pytest.approx(out, rel=1e-4)


def test_frechet_distance_from_samples(gaussians):
    x, y, z = gaussians
    assert float(fd_jit(*moments_jit(x), *moments_jit(y))) < 0.02
    # Shift only: FD ~ |m|^2 = 4.
    assert float(fd_jit(*moments_jit(x), *moments_jit(z))) == pytest.approx(4.0, rel=0.05)


def test_frechet_distance_validation():
    with pytest.raises(ValueError, match=r"\(3,\).*\(2,\)"):
        metrics.frechet_distance(jnp.zeros(3), jnp.eye(3), jnp.zeros(2), jnp.eye(2))
    with pytest.raises(ValueError, match=r"\(3, 3\).*\(2, 2\)"):
        metrics.frechet_distance(jnp.zeros(3), jnp.eye(2), jnp.zeros(3), jnp.eye(3))


def test_gaussian_moments_match_numpy():
    rng = _rng(15)
    f = rng.normal(size=(50, 4)) @ rng.normal(size=(4, 4)) + 3.0
    mu, cov = moments_jit(f.astype(np.float32))
    assert mu.shape == (4,) and cov.shape == (4, 4)
    np.testing.assert_allclose(mu, f.mean(0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cov, np.cov(f, rowvar=False), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="at least 2 samples"):
        metrics.gaussian_moments(jnp.zeros((1, 4)))
