"""Tests for jaxgen.likelihood: exact log-likelihoods through the probability-flow ODE, bits/dim."""

import math

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from jaxgen import GaussianMixture, GaussianPath
from jaxgen.likelihood import (bits_per_dim, dequantize, divergence_exact, divergence_hutchinson,
                               image_bits_per_dim, log_likelihood, sample_probes)

LINEAR = GaussianPath.from_name("linear")
VP = GaussianPath.from_name("vp")

# Values exactly representable in float32, so the float64 oracle is the same mixture.
MIXTURE = GaussianMixture(
    jnp.array([[1.0, -0.5], [-1.5, 1.0]]),
    jnp.array([[[0.5, 0.25], [0.25, 0.375]], [[0.25, 0.0], [0.0, 0.5]]]),  # full covariances
    jnp.array([0.375, 0.625]),
)
DIAG_MIXTURE = GaussianMixture.diagonal([[1.0, 0.5], [-1.0, -1.0]], [[0.25, 0.5], [0.5, 0.125]], [0.5, 0.5])
# A single full-covariance Gaussian, written as two identical components so that it shares the
# compiled likelihood of MIXTURE (K = 2).
GAUSSIAN = GaussianMixture(jnp.array([[0.5, -1.0]] * 2), jnp.array([[[0.75, -0.25], [-0.25, 0.5]]] * 2),
                           jnp.array([0.5, 0.5]))


def _ll_jit(gm_field_fn, **kw):
    """jit a likelihood whose field is built from a mixture passed as an argument (one compile per K).
    Returns the result and the analytic log-density, both computed in the compiled program."""
    return jax.jit(lambda gm, x: (log_likelihood(gm_field_fn(gm), x, **kw), gm.log_prob(x)))


def _counting(field):
    """Wrap a field so that every (batched) evaluation at run time increments ``count[0]``."""
    count = [0]

    def f(x, t, **cond):
        jax.debug.callback(lambda: count.__setitem__(0, count[0] + 1))
        return field(x, t, **cond)

    return f, count


@pytest.fixture(scope="module")
def exact_f32():
    """Exact-divergence likelihood of 8 samples of the diagonal mixture, float32 defaults (tol 1e-5),
    with the number of evaluations of the field counted at run time."""
    x = DIAG_MIXTURE.sample(jax.random.key(3), 8)
    field, count = _counting(DIAG_MIXTURE.field(LINEAR, "velocity"))
    res, truth = jax.jit(lambda x: (log_likelihood(field, x, path=LINEAR), DIAG_MIXTURE.log_prob(x)))(x)
    jax.block_until_ready(res)
    jax.effects_barrier()
    return x, res, truth, count[0]


# -- exactness against the analytic density ---------------------------------------------------------

@pytest.mark.slow
def test_float32_diagonal_mixture_linear_velocity(exact_f32):
    x, res, truth, count = exact_f32
    err = np.abs(np.asarray(res.log_prob) - np.asarray(truth)) / 2  # nats per dimension
    assert res.log_prob.shape == (8,) and res.log_prob.dtype == jnp.float32
    assert err.max() < 1e-3, err.max()
    # log p = prior + delta, with the default prior N(0, I) = path.prior_log_prob at t = 0.
    np.testing.assert_allclose(res.log_prob, res.prior_log_prob + res.delta_log_prob, rtol=1e-6)
    x0 = np.asarray(res.x_noise, np.float64)
    np.testing.assert_allclose(res.prior_log_prob, -0.5 * np.sum(x0**2, -1) - np.log(2 * np.pi), rtol=1e-5)
    # NFE: one batched JVP pass per right-hand side (the callback fires once per pass), D = 2 JVPs each.
    assert count > 1 and int(res.rhs_evals) == count == 6 * int(res.num_steps) + 1
    assert int(res.nfe) == 2 * count


@pytest.mark.slow
def test_float64_linear_velocity_matches_analytic_log_prob():
    with jax.enable_x64(True):
        fn = _ll_jit(lambda g: g.field(LINEAR, "velocity"), path=LINEAR, rtol=1e-9, atol=1e-9)
        for gm in (GAUSSIAN, MIXTURE):
            x = gm.sample(jax.random.key(0), 16).astype(jnp.float64)
            res, truth = fn(gm, x)
            assert res.log_prob.dtype == jnp.float64 and res.x_noise.dtype == jnp.float64
            err = np.abs(np.asarray(res.log_prob) - np.asarray(truth)) / 2
            assert err.max() < 1e-6, err.max()  # measured ~2e-8; the brief's bar is 1e-3


@pytest.mark.slow
def test_vp_eps_prediction_with_exact_endpoint_prior():
    """eps prediction on VP, integrated over [t_min, t_max] = [0, 1 - 1e-5]; the VP t=0 marginal is
    not exactly N(0, I) (alpha_0 = e^{-5.025}), so the exact marginal is passed as the prior."""
    x = MIXTURE.sample(jax.random.key(1), 16)
    t0 = VP.schedule.t_min

    def exact_prior(z):
        return MIXTURE.marginal_log_prob(VP, z, jnp.full((z.shape[0],), t0, z.dtype))

    @jax.jit
    def run(x):
        res = log_likelihood(MIXTURE.field(VP, "eps"), x, path=VP, prediction="eps", prior_log_prob=exact_prior)
        return res, MIXTURE.log_prob(x), VP.prior_log_prob(res.x_noise)

    res, truth, default_prior = run(x)
    err = np.abs(np.asarray(res.log_prob - truth)) / 2
    assert err.max() < 1e-3, err.max()  # measured ~7e-6 in float32
    # The default prior N(0, I) (= path.prior_log_prob) neglects alpha_0 * mean: an O(alpha_0) endpoint error.
    gap = np.abs(np.asarray(res.delta_log_prob + default_prior - truth)) / 2
    assert 5e-4 < gap.mean() < 5e-2, gap.mean()  # measured 1.8e-3


# -- Hutchinson -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_hutchinson_is_unbiased_over_probes(exact_f32):
    x, exact, _, _ = exact_f32
    keys = jax.random.split(jax.random.key(7), 48)
    field = DIAG_MIXTURE.field(LINEAR, "velocity")
    est = jax.jit(jax.vmap(lambda k: log_likelihood(field, x, path=LINEAR, divergence="hutchinson", key=k).log_prob))(keys)
    est = np.asarray(est, np.float64)  # (probes, B)
    mean, se = est.mean(0), est.std(0, ddof=1) / np.sqrt(est.shape[0])
    assert np.all(se > 1e-3)  # the estimator is random (non-diagonal Jacobians) ...
    z = (mean - np.asarray(exact.log_prob)) / se
    assert np.all(np.abs(z) < 4.5), z  # ... and its mean over probes is the exact result


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_divergence_estimators_against_jacobian_trace(probe):
    """Nonlinear, non-symmetric 3-D field with x of shape (B, 3, 1): exact trace = jacfwd trace; the
    Hutchinson mean over many probes is within a few standard errors of it."""
    w = jnp.array([[0.5, -1.0, 0.25], [1.5, 0.3, -0.7], [0.2, 0.8, -0.4]])

    def f(x, t):
        return jnp.tanh(jnp.einsum("ij,bjk->bik", w, x) * (1 + t[:, None, None])) + x**2

    x = jax.random.normal(jax.random.key(0), (4, 3, 1))
    t = jnp.full((4,), 0.3)

    @jax.jit
    def run(x, key):
        trace = jnp.trace(jax.vmap(jax.jacfwd(lambda z, tt: f(z[None], tt[None])[0].ravel()))(x, t).reshape(4, 3, 3),
                          axis1=1, axis2=2)
        probes = sample_probes(key, x.shape, 4000, probe)
        per_probe = jax.vmap(lambda v: divergence_hutchinson(f, x, t, v[None]))(probes)  # (K, B)
        return trace, divergence_exact(f, x, t), per_probe, divergence_hutchinson(f, x, t, probes)

    trace, exact, per_probe, pooled = run(x, jax.random.key(1))
    np.testing.assert_allclose(exact, trace, rtol=1e-5)
    se = per_probe.std(0) / np.sqrt(per_probe.shape[0])
    z = (per_probe.mean(0) - trace) / se
    assert np.all(np.abs(z) < 4.5), z
    np.testing.assert_allclose(pooled, per_probe.mean(0), rtol=1e-4, atol=1e-5)


# -- gradients --------------------------------------------------------------------------------------

def _linear_closed_form(params, x):
    """u = a x + b t: backwards x_0 = e^{-a} x - b (1 - e^{-a}(1 + a)) / a^2; log p = log N(x_0) - a D."""
    a, b = params["a"], params["b"]
    x0 = jnp.exp(-a) * x - b * (1 - jnp.exp(-a) * (1 + a)) / a**2
    d = x.shape[1]
    return jnp.mean(-0.5 * jnp.sum(x0**2, -1) - 0.5 * d * jnp.log(2 * jnp.pi) - a * d)


@pytest.mark.slow
def test_gradient_through_the_solve_matches_finite_differences_and_closed_form():
    with jax.enable_x64(True):
        x = jnp.array([[0.3, -1.2], [1.1, 0.4], [-0.6, 0.9]], jnp.float64)
        params = {"a": jnp.asarray(0.7, jnp.float64), "b": jnp.array([0.5, -0.25], jnp.float64)}

        def mean_ll(p, x):
            field = lambda y, t: p["a"] * y + p["b"] * t[:, None]
            return jnp.mean(log_likelihood(field, x, path=LINEAR, rtol=1e-11, atol=1e-11).log_prob)

        vg = jax.jit(jax.value_and_grad(mean_ll))
        value, grad = vg(params, x)

        def f(p):
            return float(vg(p, x)[0])

        h = 1e-4
        fd_a = (f({**params, "a": params["a"] + h}) - f({**params, "a": params["a"] - h})) / (2 * h)
        fd_b = [(f({**params, "b": params["b"].at[i].add(h)}) - f({**params, "b": params["b"].at[i].add(-h)}))
                / (2 * h) for i in range(2)]
        closed_value, closed_grad = jax.jit(jax.value_and_grad(_linear_closed_form))(params, x)
        np.testing.assert_allclose(value, closed_value, rtol=1e-9)
        np.testing.assert_allclose(grad["a"], fd_a, rtol=1e-6)
        np.testing.assert_allclose(grad["b"], np.asarray(fd_b), rtol=1e-6)
        np.testing.assert_allclose(grad["a"], closed_grad["a"], rtol=1e-8)
        np.testing.assert_allclose(grad["b"], closed_grad["b"], rtol=1e-8)


# -- bits per dimension -----------------------------------------------------------------------------

def test_uniform_density_on_the_data_range_is_exactly_8_bits():
    d = 12
    np.testing.assert_allclose(bits_per_dim(jnp.full((3,), -d * math.log(2.0)), d), 8.0, rtol=1e-6)
    # On [0, 1) the uniform density is 1: also 8 bits; on [-1, 1) the offset alone is log2(256/2) = 7.
    np.testing.assert_allclose(bits_per_dim(jnp.zeros(()), d, data_range=(0.0, 1.0)), 8.0)
    np.testing.assert_allclose(bits_per_dim(jnp.zeros(()), d), 7.0)


@pytest.mark.slow
def test_histogram_density_gives_the_discrete_code_length():
    """If the model density is constant on each bin, q(y) = P(floor y), bits/dim of every dequantised
    point is exactly the discrete -log2 P(k) / D (Theis et al. 2016)."""
    rng = np.random.default_rng(0)
    logits = rng.normal(size=256)
    log_pk = logits - np.log(np.sum(np.exp(logits)))  # per-dimension categorical over 0..255
    k = rng.integers(0, 256, size=(5, 4, 4, 3)).astype(np.uint8)
    x = np.asarray(dequantize(jax.random.key(2), k), np.float64)
    assert x.min() >= -1.0 and x.max() < 1.0
    # p_x(x) = q(y) |dy/dx|^D with y = (x + 1) * 128 and q(y) = P(floor y)
    kk = np.floor((x + 1.0) * 128.0).astype(np.int64)
    np.testing.assert_array_equal(kk, k)  # every point lies in its own bin
    d = 4 * 4 * 3
    log_px = np.sum(log_pk[kk].reshape(5, -1), -1) + d * np.log(128.0)
    expected = -np.sum(log_pk[k].reshape(5, -1), -1) / (d * np.log(2.0))
    np.testing.assert_allclose(bits_per_dim(jnp.asarray(log_px, jnp.float32), d), expected, rtol=1e-5)


def test_dequantize_float_images_like_uint8():
    k = jnp.array([[[0, 17], [128, 255]]], jnp.uint8)
    key = jax.random.key(4)
    a = dequantize(key, k)
    b = dequantize(key, k.astype(jnp.float32) / 127.5 - 1.0)  # jaxgen's image scaling
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(jnp.floor((a + 1) * 128), k, atol=0)
    c = dequantize(key, k, data_range=(0.0, 1.0))
    np.testing.assert_allclose(c, (a + 1) / 2, atol=1e-6)


def test_dequantized_points_stay_inside_their_bins():
    """A uniform u close to 1 must not round x onto the upper edge of its bin (in float32, k + u rounds up to k + 1
    for ~2^-17 of the entries with k >= 128, and the affine map can round up for any k; for k = 255 that is
    x = hi): every point lies in [lo + (hi - lo) k / 256, lo + (hi - lo) (k + 1) / 256)."""
    k = jnp.tile(jnp.array([0, 1, 127, 128, 200, 255], jnp.uint8), (1, 2**17))
    for lo, hi in ((-1.0, 1.0), (0.0, 1.0)):
        x = dequantize(jax.random.key(0), k, data_range=(lo, hi))
        assert x.dtype == jnp.float32
        x = np.asarray(x, np.float64)
        np.testing.assert_array_equal(np.floor((x - lo) / (hi - lo) * 256), k)
        assert x.min() >= lo and x.max() < hi


@pytest.mark.slow
def test_image_bits_per_dim_on_gaussian_data_field():
    """Images 8x8x1; the field is the exact linear-path velocity of data N(0, s^2 I),
    u_t(x) = (t s^2 - (1 - t)) / (t^2 s^2 + (1 - t)^2) x, so log p_1 = log N(x; 0, s^2 I)."""
    s2 = 0.25

    def field(x, t):
        t = t[:, None, None, None]
        return (t * s2 - (1 - t)) / (t**2 * s2 + (1 - t) ** 2) * x

    counted, count = _counting(field)
    images = jax.random.randint(jax.random.key(0), (4, 8, 8, 1), 0, 256).astype(jnp.uint8)
    out = jax.jit(lambda im, k: image_bits_per_dim(counted, im, k, path=LINEAR, num_probes=2))(images, jax.random.key(1))
    jax.block_until_ready(out)
    jax.effects_barrier()
    d = 64
    log_n = jnp.sum(-0.5 * out.x.reshape(4, -1) ** 2 / s2 - 0.5 * jnp.log(2 * jnp.pi * s2), -1)
    expected = -log_n / (d * math.log(2.0)) + 7.0  # offset log2(256 / 2) for data on [-1, 1)
    assert out.bits_per_dim.shape == (4,) and np.all(np.isfinite(out.bits_per_dim))
    # Rademacher probes are exact for an isotropic linear field (v^T c I v = c D).
    np.testing.assert_allclose(out.bits_per_dim, expected, atol=1e-4)
    assert np.all((out.x >= -1) & (out.x < 1))
    assert count[0] > 1 and int(out.likelihood.rhs_evals) == count[0]
    assert int(out.likelihood.nfe) == 2 * count[0]  # one JVP per probe and right-hand side


# -- errors -----------------------------------------------------------------------------------------

def _field(x, t):
    return -x


@pytest.mark.parametrize("kwargs,match", [
    ({"divergence": "trace"}, "unknown divergence"),
    ({"divergence": "hutchinson"}, "needs a PRNG key"),
    ({"divergence": "hutchinson", "key": jax.random.key(0), "probe": "sphere"}, "unknown probe"),
    ({"divergence": "hutchinson", "key": jax.random.key(0), "num_probes": 0}, "num_probes"),
    ({"method": "euler"}, "adaptive method"),
    ({"t_noise": 0.5, "t_data": 0.5}, "t_noise < t_data"),
    ({"t_data": 1.5}, "must lie in"),
])
def test_bad_options_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        log_likelihood(_field, jnp.ones((2, 2)), path=LINEAR, **kwargs)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="leading batch axis"):
        log_likelihood(_field, jnp.ones((3,)), path=LINEAR)
    with pytest.raises(ValueError, match="floating point"):
        log_likelihood(_field, jnp.ones((2, 3), jnp.uint8), path=LINEAR)
    with pytest.raises(ValueError, match="same shape as x"):
        log_likelihood(lambda x, t: x[:, :1], jnp.ones((2, 3)), path=LINEAR)
    with pytest.raises(ValueError, match="domain|defined on"):
        log_likelihood(_field, jnp.ones((2, 3)), path=VP, t_data=1.0)
    with pytest.raises(ValueError, match="does not determine the velocity"):
        log_likelihood(_field, jnp.ones((2, 3)), path=LINEAR, prediction="eps")
    with pytest.raises(ValueError, match="one value per sample"):
        log_likelihood(_field, jnp.ones((2, 3)), path=LINEAR, prior_log_prob=lambda z: jnp.zeros(()))
    with pytest.raises(ValueError, match=r"probes must have shape"):
        divergence_hutchinson(_field, jnp.ones((2, 3)), jnp.zeros(2), jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="num_dims"):
        bits_per_dim(jnp.zeros(2), 0)
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        dequantize(jax.random.key(0), jnp.array([[300]]))
    with pytest.raises(ValueError, match="off the grid"):
        dequantize(jax.random.key(0), jnp.array([[0.0123]]))
