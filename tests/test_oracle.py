"""The analytic oracle: its fields solve the continuity equation, and its ODE/SDE/Langevin samples reproduce the mixture."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from jaxgen import metrics
from jaxgen.losses import flow_matching_loss, marginal_regression_loss
from jaxgen.oracle import GaussianMixture
from jaxgen.paths import GaussianPath
from jaxgen.samplers import EulerMaruyama, Heun, Langevin, sample

GM = GaussianMixture.isotropic(jnp.array([[-1.0, 0.5], [1.5, -0.5], [0.0, 2.0]]), jnp.array([0.3, 0.5, 0.4]),
                               jnp.array([0.3, 0.3, 0.4]))
FULL = GaussianMixture(jnp.array([[0.0, 1.0], [2.0, -1.0]]),
                       jnp.array([[[0.5, 0.3], [0.3, 0.4]], [[0.2, -0.1], [-0.1, 0.3]]]), jnp.array([0.6, 0.4]))
PATHS = {n: GaussianPath.from_name(n) for n in ["linear", "cosine", "vp", "ve"]}
N = 2000


@pytest.fixture(scope="module")
def reference():
    """Fresh mixture samples, and the energy distance between two independent sets (the floor)."""
    ref = GM.sample(jax.random.key(7), N)
    floors = [abs(float(metrics.energy_distance(GM.sample(jax.random.key(100 + s), N),
                                                GM.sample(jax.random.key(200 + s), N)))) for s in range(3)]
    return ref, max(floors)


def _bound(floor):
    return max(3 * floor, 3e-3)


@pytest.mark.parametrize("gm", [GM, FULL], ids=["isotropic", "full_cov"])
@pytest.mark.parametrize("name", ["linear", "vp"])
def test_score_is_gradient_of_marginal_log_density(gm, name):
    path = PATHS[name]
    x = 2 * jax.random.normal(jax.random.key(0), (32, 2))
    t = jnp.linspace(0.0, path.schedule.t_max, 32)
    g = jax.jit(jax.grad(lambda xx: gm.marginal_log_prob(path, xx, t).sum()))(x)
    np.testing.assert_allclose(jax.jit(lambda xx: gm.marginal_score(path, xx, t))(x), g, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("gm", [GM, FULL], ids=["isotropic", "full_cov"])
@pytest.mark.parametrize("name", ["linear", "cosine", "vp", "ve"])
def test_marginal_field_solves_continuity_equation(gm, name):
    """d/dt log p_t(x) = -div u_t(x) - u_t(x) . grad log p_t(x): the marginal field generates the path (eq. 3.2.2)."""
    path = PATHS[name]
    x = gm.sample(jax.random.key(1), 16) + 0.5 * jax.random.normal(jax.random.key(2), (16, 2))
    t = jnp.linspace(0.1, 0.9, 16)

    @jax.jit
    def both_sides(gm, x, t):
        dlogp_dt = jax.jvp(lambda tt: gm.marginal_log_prob(path, x, tt), (t,), (jnp.ones_like(t),))[1]

        def u_single(xi, ti):
            return gm.marginal_velocity(path, xi[None], ti[None])[0]

        div = jax.vmap(lambda xi, ti: jnp.trace(jax.jacfwd(u_single)(xi, ti)))(x, t)
        u = gm.marginal_velocity(path, x, t)
        s = gm.marginal_score(path, x, t)
        return dlogp_dt, -div - jnp.sum(u * s, -1)

    dlogp_dt, rhs = both_sides(gm, x, t)
    np.testing.assert_allclose(dlogp_dt, rhs, rtol=2e-3, atol=2e-3 * float(jnp.abs(dlogp_dt).max()))


@pytest.mark.slow
def test_log_prob_at_data_end_is_mixture_density():
    path = PATHS["linear"]
    x = GM.sample(jax.random.key(3), 16)
    np.testing.assert_allclose(GM.marginal_log_prob(path, x, jnp.ones(16)), GM.log_prob(x), rtol=1e-5)
    # and at t = 0 it is the standard normal
    np.testing.assert_allclose(GM.marginal_log_prob(path, x, jnp.zeros(16)), path.prior_log_prob(x), rtol=1e-5)


@pytest.mark.slow
def test_sampling_moments():
    x = FULL.sample(jax.random.key(4), 200_000)
    np.testing.assert_allclose(x.mean(0), FULL.mean(), atol=0.01)
    np.testing.assert_allclose(jnp.cov(x.T), FULL.covariance(), atol=0.02)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["linear", "cosine", "vp", "ve"])
def test_oracle_ode_reproduces_mixture(name, reference):
    ref, floor = reference
    path = PATHS[name]
    x0 = path.sample_prior(jax.random.key(1), (N, 2))
    res = sample(GM.velocity_field(path), x0, Heun(), steps=50, t1=path.schedule.t_max)
    ed = float(metrics.energy_distance(res.x, ref))
    assert ed < _bound(floor), (name, ed, floor)
    # negative control: the prior itself is far from the data
    assert float(metrics.energy_distance(x0, ref)) > 10 * _bound(floor)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["linear", "vp", "ve"])
def test_oracle_sde_reproduces_mixture_for_any_sigma(name, reference):
    ref, floor = reference
    path = PATHS[name]
    x0 = path.sample_prior(jax.random.key(1), (N, 2))
    for sigma in (0.5, lambda t: 1.5 * (1.0 - t)):
        res = sample(GM.velocity_field(path), x0, EulerMaruyama(sigma), key=jax.random.key(3), path=path, steps=200,
                     t1=path.schedule.t_max)
        ed = float(metrics.energy_distance(res.x, ref))
        assert ed < _bound(floor), (name, sigma, ed, floor)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["linear", "vp"])
def test_annealed_langevin_on_oracle_score_reproduces_mixture(name, reference):
    ref, floor = reference
    path = PATHS[name]
    x0 = path.sample_prior(jax.random.key(1), (N, 2))
    levels = jnp.linspace(0.0, 0.999 * path.schedule.t_max, 100)  # the last grid time ends the sweep
    res = sample(GM.score_field(path), x0, Langevin(steps_per_level=10), prediction="score", key=jax.random.key(4),
                 ts=jnp.append(levels, path.schedule.t_max))
    assert res.nfe == 1000
    ed = float(metrics.energy_distance(res.x, ref))
    assert ed < 3 * _bound(floor), (name, ed, floor)


@pytest.mark.slow
def test_conditional_and_marginal_flow_matching_differ_by_a_constant():
    """L_FM(theta) = L_CFM(theta) + C with C independent of theta (notes sec. 4.1.2).

    Both losses are evaluated on the same (t, z, eps) draws (same key); the difference for two
    different fields must agree up to the Monte-Carlo error of the cross term, and C must equal
    -E||u_t(x|z) - u_t(x)||^2 < 0.
    """
    path = PATHS["linear"]
    n = 100_000
    batch = GM.sample(jax.random.key(5), n)
    key = jax.random.key(6)
    cfm = flow_matching_loss(path)
    fm = marginal_regression_loss(path, GM.velocity_field(path))
    fields = {
        "zero": lambda x, t: jnp.zeros_like(x),
        "linear": lambda x, t: 0.7 * x - 0.3 * t[:, None] + 0.2,
        "tanh": lambda x, t: jnp.tanh(x[:, ::-1]) * (1 + t[:, None]),
    }
    diffs = {k: float(fm(f, batch, key) - cfm(f, batch, key)) for k, f in fields.items()}
    # the same draws, by hand, for the expected constant and the cross-term standard error
    k_t, k_eps, _ = jax.random.split(key, 3)
    t = jax.random.uniform(k_t, (n,))
    eps = jax.random.normal(k_eps, batch.shape)
    xt = path.sample(batch, eps, t)
    u_marg = GM.marginal_velocity(path, xt, t)
    gap = path.conditional_velocity_from_noise(batch, eps, t) - u_marg
    const = -float(jnp.mean(jnp.mean(gap**2, -1)))
    assert const < -0.05
    for k, f in fields.items():
        # L_FM(f) - L_CFM(f) - C = 2 mean[(f - u_t(x)) . (u_t(x|z) - u_t(x))], zero in expectation
        cross = 2 * jnp.mean((f(xt, t) - u_marg) * gap, -1)
        se = float(jnp.std(cross)) / np.sqrt(n)
        assert abs(diffs[k] - const) < 4 * se + 1e-5, (k, diffs[k], const, se)


def test_mixture_validation():
    with pytest.raises(ValueError, match="positive definite"):
        GaussianMixture(jnp.zeros((1, 2)), jnp.zeros((1, 2, 2)), jnp.ones(1))
    with pytest.raises(ValueError, match="sum to 1"):
        GaussianMixture.isotropic(jnp.zeros((2, 2)), 1.0, jnp.array([0.5, 0.6]))
    with pytest.raises(ValueError, match=r"x must have shape \(B, 2\)"):
        GM.marginal_score(PATHS["linear"], jnp.zeros((4, 3)), 0.5)


@pytest.mark.slow
def test_oracle_is_a_pytree_and_jits():
    f = jax.jit(lambda gm, x, t: gm.marginal_velocity(PATHS["cosine"], x, t))
    out = f(GM, jnp.zeros((4, 2)), jnp.full((4,), 0.5))
    np.testing.assert_allclose(out, GM.marginal_velocity(PATHS["cosine"], jnp.zeros((4, 2)), 0.5), rtol=1e-6)


@pytest.mark.slow
def test_oracle_differentiates_with_respect_to_the_mixture():
    path = PATHS["linear"]
    x = jnp.array([[0.3, -0.2]])
    g = jax.grad(lambda s: GaussianMixture.isotropic(jnp.zeros((1, 2)), s).marginal_log_prob(path, x, 1.0)[0])(0.5)
    # d/ds log N(x; 0, s^2 I) = |x|^2 / s^3 - 2 / s
    np.testing.assert_allclose(g, 0.13 / 0.125 - 4.0, rtol=1e-5)
