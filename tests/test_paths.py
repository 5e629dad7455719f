"""Schedules and Gaussian conditional paths against closed forms, finite differences and literature numbers."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from jaxgen.paths import GaussianPath, Schedule, custom, get_schedule

NAMES = ["linear", "cosine", "polynomial", "vp", "sub_vp", "ve", "edm"]
PATHS = {n: GaussianPath.from_name(n) for n in NAMES}
T_GRID = jnp.linspace(0.0, 1.0, 101)


@pytest.mark.parametrize("name", NAMES)
def test_autodiff_derivatives_match_finite_differences(name):
    s = PATHS[name].schedule
    t = jnp.linspace(max(s.t_min, 0.02), min(s.t_max, 0.98), 25)
    h = 1e-3
    c = s(t)
    cp, cm = s(t + h), s(t - h)
    fd_alpha = (np.asarray(cp.alpha, np.float64) - np.asarray(cm.alpha, np.float64)) / (2 * h)
    fd_beta = (np.asarray(cp.beta, np.float64) - np.asarray(cm.beta, np.float64)) / (2 * h)
    scale = 1 + np.abs(np.asarray(c.d_beta))
    np.testing.assert_allclose(np.asarray(c.d_alpha), fd_alpha, atol=2e-3 * scale.max(), rtol=2e-3)
    np.testing.assert_allclose(np.asarray(c.d_beta), fd_beta, atol=2e-3, rtol=5e-3)


def test_closed_form_derivatives():
    t = jnp.linspace(0, 1, 11)
    c = PATHS["linear"].coefficients(t)
    np.testing.assert_allclose(c.d_alpha, 1.0)
    np.testing.assert_allclose(c.d_beta, -1.0)
    c = PATHS["cosine"].coefficients(t)
    np.testing.assert_allclose(c.d_alpha, 0.5 * np.pi * np.cos(0.5 * np.pi * t), atol=1e-6)
    np.testing.assert_allclose(c.d_beta, -0.5 * np.pi * np.sin(0.5 * np.pi * t), atol=1e-6)
    c = PATHS["polynomial"].coefficients(t)  # n = 2
    np.testing.assert_allclose(c.d_alpha, 2 * t, atol=1e-6)


@pytest.mark.parametrize("name", ["linear", "cosine", "polynomial"])
def test_exact_boundary_conditions(name):
    c = PATHS[name].coefficients(jnp.array([0.0, 1.0]))
    np.testing.assert_allclose(c.alpha, [0.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(c.beta, [1.0, 0.0], atol=1e-6)


def test_vp_reproduces_score_sde_numbers():
    """score_sde's VPSDE.marginal_prob: log_mean_coeff = -1/4 tau^2 (b1 - b0) - 1/2 tau b0, std = sqrt(1 - e^{2 lmc})."""
    b0, b1 = 0.1, 20.0
    tau = np.array([1e-3, 0.1, 0.25, 0.5, 0.75, 1.0])
    lmc = -0.25 * tau**2 * (b1 - b0) - 0.5 * tau * b0
    c = PATHS["vp"].coefficients(jnp.asarray(1.0 - tau, jnp.float32))
    np.testing.assert_allclose(c.alpha, np.exp(lmc), rtol=1e-5)
    np.testing.assert_allclose(c.beta, np.sqrt(1 - np.exp(2 * lmc)), rtol=1e-4)
    # sub-VP std = 1 - exp(2 lmc); VE std = sigma_min (sigma_max / sigma_min)^tau.
    c = PATHS["sub_vp"].coefficients(jnp.asarray(1.0 - tau, jnp.float32))
    np.testing.assert_allclose(c.beta, 1 - np.exp(2 * lmc), rtol=1e-4)
    c = PATHS["ve"].coefficients(jnp.asarray(1.0 - tau, jnp.float32))
    np.testing.assert_allclose(c.beta, 0.01 * (50 / 0.01) ** tau, rtol=1e-5)
    np.testing.assert_allclose(c.alpha, 1.0)


def test_vp_matches_ddpm_discrete_chain():
    """DDPM (N=1000, betas linspace(1e-4, 0.02)): alphas_cumprod_i ~ alpha(tau = i/N)^2 (Song et al. 2021, App. B)."""
    n = 1000
    betas = np.linspace(1e-4, 0.02, n)
    abar = np.cumprod(1 - betas)
    i = np.array([10, 100, 300, 500, 700])
    c = PATHS["vp"].coefficients(jnp.asarray(1.0 - (i + 1) / n, jnp.float32))
    # Equal to first order in beta_i: compare log alphas_cumprod (the O(beta^2) terms sum to < 1%).
    np.testing.assert_allclose(2 * np.log(np.asarray(c.alpha, np.float64)), np.log(abar[i]), rtol=1e-2, atol=2e-4)


def test_edm_uniform_grid_is_karras_sigmas():
    n, smin, smax, rho = 18, 0.002, 80.0, 7.0
    i = np.arange(n)
    karras = (smax ** (1 / rho) + i / (n - 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
    c = PATHS["edm"].coefficients(jnp.asarray(i / (n - 1), jnp.float32))
    np.testing.assert_allclose(c.beta, karras, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_everything_finite_on_closed_interval(name):
    path = PATHS[name]
    key = jax.random.key(0)
    z = jax.random.normal(key, (T_GRID.shape[0], 3))
    eps = jax.random.normal(jax.random.key(1), z.shape)
    x = path.sample(z, eps, T_GRID)
    for v in (*path.coefficients(T_GRID), x, path.conditional_velocity(x, z, T_GRID),
              path.conditional_score(x, z, T_GRID), path.conditional_log_prob(x, z, T_GRID)):
        assert np.all(np.isfinite(np.asarray(v)))


@pytest.mark.parametrize("name", NAMES)
def test_conditional_velocity_is_time_derivative_of_path(name):
    """u_t(x_t|z) = d/dt (alpha_t z + beta_t eps) along the path (eq. 3.2.1)."""
    path = PATHS[name]
    s = path.schedule
    t = jnp.linspace(max(s.t_min, 0.05), min(s.t_max, 0.95), 16)
    z = jax.random.normal(jax.random.key(2), (16, 2))
    eps = jax.random.normal(jax.random.key(3), (16, 2))
    xt, dxt = jax.jvp(lambda tt: path.sample(z, eps, tt), (t,), (jnp.ones_like(t),))
    u = path.conditional_velocity(xt, z, t)
    np.testing.assert_allclose(u, dxt, rtol=1e-4, atol=1e-4 * float(jnp.abs(dxt).max()))
    np.testing.assert_allclose(path.conditional_velocity_from_noise(z, eps, t), dxt, rtol=1e-5, atol=1e-5 * float(jnp.abs(dxt).max()))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["linear", "vp", "ve"])
def test_conditional_score_is_gradient_of_log_density(name):
    path = PATHS[name]
    t = jnp.linspace(0.1, 0.9, 8)
    z = jax.random.normal(jax.random.key(4), (8, 2))
    x = jax.random.normal(jax.random.key(5), (8, 2))
    g = jax.grad(lambda xx: path.conditional_log_prob(xx, z, t).sum())(x)
    np.testing.assert_allclose(path.conditional_score(x, z, t), g, rtol=1e-4, atol=1e-5)


def test_conditional_velocity_at_data_end_is_exact_limit():
    path = PATHS["linear"]
    z = jnp.array([[1.0, -2.0]])
    np.testing.assert_allclose(path.conditional_velocity(z, z, jnp.array([1.0])), [[1.0, -2.0]])


def test_prior_scales_with_beta0():
    x = PATHS["ve"].sample_prior(jax.random.key(0), (20000, 2))
    assert abs(float(x.std()) - 50.0) < 1.0
    x = PATHS["linear"].sample_prior(jax.random.key(0), (20000, 2))
    assert abs(float(x.std()) - 1.0) < 0.03


def test_vp_times_are_clamped_to_its_domain():
    c1 = PATHS["vp"].coefficients(jnp.array([1.0]))
    c2 = PATHS["vp"].coefficients(jnp.array([1.0 - 1e-5]))
    np.testing.assert_allclose(c1.beta, c2.beta)
    assert np.isfinite(float(c1.d_beta[0])) and float(c1.d_beta[0]) < 0


# -- bad input -------------------------------------------------------------------------------

def test_unknown_schedule_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown schedule 'foo'.*known schedules"):
        get_schedule("foo")


def test_schedule_violating_boundary_conditions_is_rejected():
    with pytest.raises(ValueError, match="violates its boundary conditions: alpha_0=0.1"):
        custom(lambda t: 0.1 + 0.9 * t, lambda t: 1.0 - t)
    with pytest.raises(ValueError, match="beta_1"):
        Schedule(lambda t: t, lambda t: 1.0 - 0.5 * t)


def test_schedule_with_infinite_derivative_is_rejected():
    with pytest.raises(ValueError, match="not finite"):
        custom(lambda t: t, lambda t: jnp.sqrt(1.0 - t))


def test_custom_schedule_works_like_builtin():
    s = custom(lambda t: t**3, lambda t: 1 - t**3, name="cubic")
    c = s(jnp.array([0.5]))
    np.testing.assert_allclose(c.d_alpha, [0.75], rtol=1e-6)


def test_time_outside_unit_interval_raises():
    z = jnp.ones((2, 2))
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        PATHS["linear"].sample(z, z, jnp.array([0.5, 1.5]))
    with pytest.raises(ValueError, match="NaN"):
        PATHS["linear"].sample(z, z, jnp.array([0.5, jnp.nan]))


def test_mismatched_shapes_raise():
    with pytest.raises(ValueError, match="shape mismatch"):
        PATHS["linear"].sample(jnp.ones((2, 2)), jnp.ones((2, 3)), 0.5)
    with pytest.raises(ValueError, match=r"shape \(B,\) = \(2,\)"):
        PATHS["linear"].sample(jnp.ones((2, 2)), jnp.ones((2, 2)), jnp.ones(3) * 0.5)


def test_path_methods_jit_and_vmap():
    path = PATHS["cosine"]
    f = jax.jit(lambda z, e, t: path.conditional_velocity(path.sample(z, e, t), z, t))
    z = jnp.ones((4, 2))
    out = f(z, z, jnp.full((4,), 0.3))
    assert out.shape == (4, 2)
    per = jax.vmap(lambda zz, tt: path.sample(zz[None], zz[None], tt[None])[0])(z, jnp.full((4,), 0.3))
    np.testing.assert_allclose(per, path.sample(z, z, 0.3), rtol=1e-6)


def test_polynomial_with_small_exponent():
    s = get_schedule("polynomial", n=0.25)
    c = s(jnp.array([0.0, 0.5, 1.0]))
    assert np.all(np.isfinite(np.asarray(c.d_alpha))) and float(c.alpha[0]) <= 0.02
