"""Stochastic interpolants, Schrödinger-bridge CFM and target CFM: coefficients, marginal identities against the exact
oracle, the SDE that uses a velocity and a score, and how a coupling's index pairs reach the loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgen.fields import interpolant_drift
from jaxgen.losses import flow_matching_loss, regression_loss, velocity_and_score_loss
from jaxgen.models import MLPField, VelocityAndScore
from jaxgen.oracle import GaussianMixture
from jaxgen.paths import GaussianPath, StochasticInterpolant, get_schedule, schrodinger_bridge
from jaxgen.samplers import EulerMaruyama, sample

GM = GaussianMixture.isotropic(jnp.array([[2.0, 1.0], [-1.0, 2.5], [0.5, -2.0]]), jnp.array([0.4, 0.6, 0.3]))


def test_brownian_bridge_coefficients_and_finite_ends():
    sb = schrodinger_bridge(0.7)
    t = jnp.linspace(0.0, 1.0, 101)
    c = sb.coefficients(t)
    np.testing.assert_allclose(c.gamma, 0.7 * np.sqrt(np.asarray(t) * (1 - np.asarray(t))), atol=1e-6)
    assert bool(jnp.all(jnp.isfinite(jnp.stack(c))))
    assert float(c.gamma[0]) == 0.0 and float(c.gamma[-1]) == 0.0
    inner = jnp.linspace(0.05, 0.95, 19)
    h = 1e-3
    fd = (sb.coefficients(inner + h).gamma - sb.coefficients(inner - h).gamma) / (2 * h)
    np.testing.assert_allclose(sb.coefficients(inner).d_gamma, fd, rtol=2e-3, atol=1e-3)
    # a custom gamma: derivative by autodiff, endpoints checked
    q = StochasticInterpolant("linear", gamma=lambda s: 0.3 * jnp.sin(jnp.pi * s))
    np.testing.assert_allclose(q.coefficients(jnp.array([0.5])).d_gamma, [0.0], atol=1e-6)
    np.testing.assert_allclose(q.coefficients(jnp.array([0.0])).d_gamma, [0.3 * np.pi], rtol=1e-5)


def test_interpolant_bad_inputs():
    with pytest.raises(ValueError, match="vanish"):
        StochasticInterpolant("linear", gamma=lambda s: 0.5 + 0 * s)
    with pytest.raises(ValueError, match="sigma"):
        schrodinger_bridge(-1.0)
    with pytest.raises(ValueError, match="unknown gamma"):
        StochasticInterpolant("linear", gamma="brownian")
    with pytest.raises(ValueError, match="velocity and score"):
        regression_loss(schrodinger_bridge(0.5), "eps")
    with pytest.raises(ValueError, match="sigma_min"):
        get_schedule("linear", sigma_min=1.0)


def _residual_features(loss, field, n=8192, reps=4):
    """``d loss / d theta`` at ``theta = 0`` for the field ``field + theta . phi(x, t)``, ``phi = [1, x, t, t x]`` per
    coordinate: zero (up to Monte Carlo noise) iff the field's residual from the target is orthogonal to the features,
    as it is for the conditional expectation (the marginal field)."""

    def perturbed(theta):
        def f(x, t, **_):
            tt = t[:, None]
            feats = jnp.stack([jnp.ones_like(x), x, jnp.broadcast_to(tt, x.shape), tt * x], -1)  # (B, d, 4)
            return field(x, t) + jnp.einsum("bdk,dk->bd", feats, theta)
        return f

    grad = jax.jit(lambda th, k: jax.grad(lambda th: loss(perturbed(th), GM.sample(jax.random.fold_in(k, 7), n), k))(th))
    th0 = jnp.zeros((2, 4))
    return np.mean([np.asarray(grad(th0, jax.random.key(i))) for i in range(reps)], 0)


@pytest.mark.slow
def test_interpolant_velocity_and_score_targets_have_the_marginal_fields_as_minimisers():
    """A Gaussian source with the independent coupling: the interpolant's marginal velocity and score are those of its
    Gaussian path ``alpha z + sqrt(beta^2 + gamma^2) eps``; the plain linear path's are not."""
    sb = schrodinger_bridge(1.5)
    marginal = sb.gaussian_path()
    lin = GaussianPath.from_name("linear")
    tr = (0.05, 0.95)
    g_v = _residual_features(regression_loss(sb, "velocity", t_range=tr), GM.velocity_field(marginal))
    g_v_wrong = _residual_features(regression_loss(sb, "velocity", t_range=tr), GM.velocity_field(lin))
    assert np.max(np.abs(g_v)) < 0.03, g_v
    assert np.max(np.abs(g_v_wrong)) > 0.15, g_v_wrong  # seen: 0.012 and 0.29
    g_s = _residual_features(regression_loss(sb, "score", t_range=tr), GM.score_field(marginal))
    g_s_wrong = _residual_features(regression_loss(sb, "score", t_range=tr), GM.score_field(lin))
    assert np.max(np.abs(g_s)) < 0.02, g_s
    assert np.max(np.abs(g_s_wrong)) > 0.2, g_s_wrong  # seen: 0.003 and 0.61


def test_interpolant_sde_with_velocity_and_score_samples_the_target():
    sb = schrodinger_bridge(0.6)
    marginal = sb.gaussian_path()
    sigma = 0.6
    drift = interpolant_drift(GM.velocity_field(marginal), GM.score_field(marginal), sigma)
    x0 = jax.random.normal(jax.random.key(0), (4000, 2))
    run = jax.jit(lambda x, k: sample(drift, x, EulerMaruyama(sigma=sigma, drift="field"), steps=200, key=k))
    res = run(x0, jax.random.key(1))
    assert int(res.nfe) == 200
    np.testing.assert_allclose(np.mean(res.x, 0), GM.mean(), atol=0.08)
    np.testing.assert_allclose(np.cov(np.asarray(res.x).T), GM.covariance(), atol=0.25)


class _ReverseCoupling:
    """A coupling of index pairs (the jaxgen.couplings protocol) that pairs data j with a shuffled order."""

    label_key = None

    def indices(self, key, x0, x1, labels=None):
        n = x1.shape[0]
        return jnp.arange(n)[::-1], jax.random.permutation(key, n)


def test_index_coupling_gathers_the_conditioning_with_the_data():
    n = 64
    z = jax.random.normal(jax.random.key(0), (n, 2))
    batch = {"x": z, "y": jnp.arange(n)}
    table = z  # label k belongs to data point k: field(y) = z[y] is the exact target when the source is 0
    loss = flow_matching_loss("linear", source=lambda k, m: jnp.zeros((m, 2)), coupling=_ReverseCoupling())
    field = lambda x, t, y: table[y]
    assert float(loss(field, batch, jax.random.key(3))) < 1e-12
    unpaired = flow_matching_loss("linear", source=lambda k, m: jnp.zeros((m, 2)),
                                  coupling=lambda k, x0, x1: (x0, x1[jax.random.permutation(k, n)]))
    assert float(unpaired(field, batch, jax.random.key(3))) > 0.1


def test_target_cfm_path_and_joint_velocity_score_loss():
    tc = GaussianPath(get_schedule("linear", sigma_min=0.05))
    z, eps, t = jnp.ones((3, 2)), jnp.full((3, 2), 2.0), jnp.array([0.0, 0.5, 1.0])
    # Lipman et al. eq. 20-21 / TorchCFM's target CFM: x_t = t z + (1 - (1 - s) t) eps, u_t = z - (1 - s) eps
    np.testing.assert_allclose(tc.sample(z, eps, t)[:, 0], [2.0, 0.5 + 0.525 * 2, 1.0 + 0.05 * 2], rtol=1e-6)
    np.testing.assert_allclose(tc.conditional_velocity_from_noise(z, eps, t), z - 0.95 * eps, rtol=1e-6)
    sb = schrodinger_bridge(0.5)
    model = VelocityAndScore(MLPField(2, width=16, rngs=nnx.Rngs(0)), MLPField(2, width=16, rngs=nnx.Rngs(1)))
    data = GM.sample(jax.random.key(0), 128)
    key = jax.random.key(5)
    both = jax.jit(lambda m: (velocity_and_score_loss(sb, score_weight=0.5)(m, data, key),
                              regression_loss(sb, "velocity")(m.velocity, data, key)
                              + 0.5 * regression_loss(sb, "score")(m.score, data, key)))
    joint, parts = both(model)
    np.testing.assert_allclose(joint, parts, rtol=1e-6)
    np.testing.assert_allclose(model(data, jnp.zeros(128)), model.velocity(data, jnp.zeros(128)))


@pytest.mark.slow
def test_data_to_data_likelihood_through_the_ode():
    """A flow from a Gaussian-mixture source (not noise) that translates by c: ``p_1(x) = p_source(x - c)``, and the
    probability-flow likelihood with the source's density as the prior returns it, for an interpolant's field too."""
    from jaxgen.likelihood import log_likelihood

    c = jnp.array([1.5, -0.5])
    x = GM.sample(jax.random.key(2), 64) + c
    for path in ("linear", schrodinger_bridge(0.5)):
        ll = log_likelihood(lambda y, t: jnp.broadcast_to(c, y.shape), x, path=path, prior_log_prob=GM.log_prob)
        np.testing.assert_allclose(ll.log_prob, GM.log_prob(x - c), rtol=1e-4, atol=1e-4)
