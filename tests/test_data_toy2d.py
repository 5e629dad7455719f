"""Tests for jaxgen.data.toy2d."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.data import toy2d

N = 4096
KEY = jax.random.key(0)
MIXTURE_KWARGS = dict(means=[[-3.0, 0.0], [3.0, 0.0]], stds=[0.5, 1.0], weights=[0.8, 0.2])


def _kwargs(name: str) -> dict:
    return MIXTURE_KWARGS if name == "gaussian_mixture" else {}


# One compiled sampler per registered distribution, shared across tests.
JITTED = {
    name: jax.jit(toy2d.get_distribution(name, **_kwargs(name)), static_argnums=1)
    for name in toy2d.DISTRIBUTIONS
}


@pytest.fixture(scope="module")
def samples():
    """Samples of size N from every registered distribution (jitted, KEY)."""
    return {name: np.asarray(fn(KEY, N)) for name, fn in JITTED.items()}


# ---------------------------------------------------------------------------
# Generic properties
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(toy2d.DISTRIBUTIONS))
def test_shape_dtype_finite(name, samples):
    x = samples[name]
    assert x.shape == (N, 2)
    assert x.dtype == np.float32
    assert np.all(np.isfinite(x))


def test_jit_matches_eager(samples):
    eager = np.asarray(toy2d.eight_gaussians(KEY, N))
    np.testing.assert_allclose(eager, samples["eight_gaussians"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(toy2d.DISTRIBUTIONS))
def test_deterministic_given_key(name, samples):
    np.testing.assert_array_equal(np.asarray(JITTED[name](KEY, N)), samples[name])
    other = np.asarray(JITTED[name](jax.random.key(1), N))
    assert not np.allclose(other, samples[name])


def test_samplers_respect_n():
    for name, fn in toy2d.DISTRIBUTIONS.items():
        for n in (0, 3):
            out = jax.eval_shape(lambda k: fn(k, n, **_kwargs(name)), KEY)
            assert out.shape == (n, 2) and out.dtype == jnp.float32
    assert jax.eval_shape(lambda k: toy2d.standard_normal(k, 5, dim=7), KEY).shape == (5, 7)


def test_traced_n_raises_helpful_error():
    with pytest.raises(TypeError, match="static_argnums"):
        jax.jit(toy2d.moons)(KEY, 8)
    with pytest.raises(ValueError, match="non-negative"):
        toy2d.moons(KEY, -1)


# ---------------------------------------------------------------------------
# Eight Gaussians
# ---------------------------------------------------------------------------


def test_eight_gaussians_moments(samples):
    x = samples["eight_gaussians"]
    np.testing.assert_allclose(x.mean(0), 0.0, atol=0.2)
    # Centres contribute scale^2 / 2 = 12.5, noise sqrt(var) = sqrt(0.1).
    expected_var = 12.5 + math.sqrt(0.1)
    np.testing.assert_allclose(x.var(0), expected_var, rtol=0.05)


def test_eight_gaussians_covariance_quirk(samples):
    # TorchCFM uses sqrt(var) as the covariance, so the per-coordinate noise
    # std is var ** 0.25 ~= 0.562 (not sqrt(var) ~= 0.316).
    x = samples["eight_gaussians"]
    s = 1 / math.sqrt(2)
    centers = 5.0 * np.array([[1, 0], [-1, 0], [0, 1], [0, -1], [s, s], [s, -s], [-s, s], [-s, -s]])
    idx = np.argmin(((x[:, None] - centers[None]) ** 2).sum(-1), axis=1)
    resid = x - centers[idx]
    assert resid.std() == pytest.approx(0.1**0.25, rel=0.05)
    counts = np.bincount(idx, minlength=8) / N
    np.testing.assert_allclose(counts, 1 / 8, atol=0.03)


# ---------------------------------------------------------------------------
# Moons / circles / checkerboard / swiss roll / spirals
# ---------------------------------------------------------------------------


def test_moons_moments_and_range(samples):
    x = samples["moons"]
    # Unscaled mean (1/2, 1/4); variances 3/4 and 9/16 - 1/pi, plus noise^2.
    np.testing.assert_allclose(x.mean(0), [0.5, -0.25], atol=0.1)
    expected_var = 9.0 * (np.array([0.75, 0.5625 - 1 / math.pi]) + 0.04)
    np.testing.assert_allclose(x.var(0), expected_var, rtol=0.07)
    assert x[:, 0].min() > -6.5 and x[:, 0].max() < 8.5
    assert x[:, 1].min() > -5.5 and x[:, 1].max() < 5.0


def test_moons_noiseless_geometry():
    fn = jax.jit(toy2d.get_distribution("moons", noise=0.0, scale=1.0, shift=0.0), static_argnums=1)
    p = np.asarray(fn(KEY, N), np.float64)
    on_outer = np.isclose(np.linalg.norm(p, axis=1), 1.0, atol=1e-5) & (p[:, 1] >= -1e-6)
    on_inner = np.isclose(np.linalg.norm(p - [1.0, 0.5], axis=1), 1.0, atol=1e-5) & (
        p[:, 1] <= 0.5 + 1e-6
    )
    assert np.all(on_outer | on_inner)
    assert 0.4 < on_outer.mean() < 0.6


def test_circles_radii_and_moments(samples):
    fn = jax.jit(toy2d.get_distribution("circles", factor=0.3, noise=0.0, scale=2.0), static_argnums=1)
    p = np.asarray(fn(KEY, N))
    r = np.linalg.norm(p, axis=1)
    assert np.all(np.isclose(r, 2.0, atol=1e-5) | np.isclose(r, 0.6, atol=1e-5))
    x = samples["circles"]
    np.testing.assert_allclose(x.mean(0), 0.0, atol=0.1)
    np.testing.assert_allclose(x.var(0), 9.0 * ((1 + 0.25) / 4 + 0.05**2), rtol=0.07)


def test_checkerboard_support_and_moments(samples):
    x = samples["checkerboard"]
    assert np.all(np.abs(x) <= 4.0)
    cells = np.floor((x + 4.0) / 2.0).astype(int)
    assert np.all((cells.sum(1) % 2) == 0)
    assert len({tuple(c) for c in cells}) == 8
    np.testing.assert_allclose(x.mean(0), 0.0, atol=0.15)
    np.testing.assert_allclose(x.var(0), 64.0 / 12.0, rtol=0.05)
    with pytest.raises(ValueError, match="even"):
        toy2d.checkerboard(KEY, 4, num_cells=3)


def test_swiss_roll_scale(samples):
    x = samples["swiss_roll"]
    assert np.all((x.std(0) > 0.8) & (x.std(0) < 1.25))
    fn = jax.jit(toy2d.get_distribution("swiss_roll", noise=0.0, scale=1.0), static_argnums=1)
    p = np.asarray(fn(KEY, N))
    r = np.linalg.norm(p, axis=1)
    assert r.min() >= 1.5 * np.pi - 1e-3 and r.max() <= 4.5 * np.pi + 1e-3


def test_spirals_symmetric(samples):
    x = samples["spirals"]
    np.testing.assert_allclose(x.mean(0), 0.0, atol=0.1)
    assert np.abs(x).max() < 4.5
    fn = jax.jit(toy2d.get_distribution("spirals", noise=0.0, scale=1.0), static_argnums=1)
    p = np.asarray(fn(KEY, N))
    assert np.linalg.norm(p, axis=1).max() <= 3 * np.pi + 1e-3


# ---------------------------------------------------------------------------
# Gaussian mixture / standard normal
# ---------------------------------------------------------------------------


def test_gaussian_mixture_weights_and_stds(samples):
    x = samples["gaussian_mixture"]
    left = x[:, 0] < 0
    assert left.mean() == pytest.approx(0.8, abs=0.03)
    np.testing.assert_allclose(x[left].mean(0), [-3.0, 0.0], atol=0.05)
    np.testing.assert_allclose(x[left].std(0), 0.5, rtol=0.06)
    np.testing.assert_allclose(x[~left].std(0), 1.0, rtol=0.1)


def test_gaussian_mixture_scalar_std_uniform_weights_and_dim():
    means = jnp.array([[0.0, 0.0, 0.0], [10.0, 10.0, 10.0]])
    fn = jax.jit(toy2d.gaussian_mixture_samples, static_argnums=1)
    x = np.asarray(fn(KEY, 2000, means, 0.1))
    assert x.shape == (2000, 3) and x.dtype == np.float32
    assert (x[:, 0] > 5).mean() == pytest.approx(0.5, abs=0.05)


def test_gaussian_mixture_validation():
    with pytest.raises(ValueError, match=r"`stds`.*\(2,\)"):
        toy2d.gaussian_mixture_samples(KEY, 4, jnp.zeros((2, 2)), jnp.ones(3))
    with pytest.raises(ValueError, match=r"`weights`.*\(2,\)"):
        toy2d.gaussian_mixture_samples(KEY, 4, jnp.zeros((2, 2)), 1.0, jnp.ones(3))
    with pytest.raises(ValueError, match="means"):
        toy2d.gaussian_mixture_samples(KEY, 4, jnp.zeros(2), 1.0)


def test_standard_normal_moments(samples):
    x = samples["standard_normal"]
    np.testing.assert_allclose(x.mean(0), 0.0, atol=0.06)
    np.testing.assert_allclose(np.cov(x, rowvar=False), np.eye(2), atol=0.06)


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------


def test_registry_unknown_name_lists_known():
    with pytest.raises(ValueError, match="Unknown distribution 'nope'") as err:
        toy2d.get_distribution("nope")
    for name in toy2d.DISTRIBUTIONS:
        assert name in str(err.value)


def test_registry_binds_kwargs():
    fn = toy2d.get_distribution("eight_gaussians", scale=2.0)
    np.testing.assert_array_equal(fn(KEY, N), toy2d.eight_gaussians(KEY, N, scale=2.0))
    assert toy2d.get_distribution("moons") is toy2d.moons
    with pytest.raises(TypeError, match="eight_gaussians"):
        toy2d.get_distribution("eight_gaussians", radius=2.0)
    with pytest.raises(TypeError, match="n"):
        toy2d.get_distribution("moons", n=3)


def test_aliases_resolve_to_the_same_sampler():
    from jaxgen.data.toy2d import get_distribution, eight_gaussians
    assert get_distribution("8gaussians") is eight_gaussians
