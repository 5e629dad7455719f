"""Samplers against closed forms: convergence orders, exact NFE, diffrax agreement, gradients, Langevin stationarity."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from jaxgen.oracle import GaussianMixture
from jaxgen.paths import GaussianPath
from jaxgen.samplers import euler_maruyama, langevin, sample_ode, sample_sde

# Gaussian data N(m, s^2 I): the marginal flow is affine and its exact endpoint is x1 = m + s x0.
M, S = jnp.array([1.0, -2.0]), 0.5
GAUSS = GaussianMixture.isotropic(M[None], S)
PATH = GaussianPath.from_name("cosine")
FIELD = GAUSS.velocity_field(PATH)
X0 = jax.random.normal(jax.random.key(0), (256, 2))
EXACT = M + S * X0


@pytest.fixture(scope="module")
def errors():
    run = jax.jit(lambda x0, method, steps: sample_ode(FIELD, x0, method=method, steps=steps).x, static_argnums=(1, 2))
    return {m: [float(jnp.abs(run(X0, m, n) - EXACT).max()) for n in (8, 16, 32)] for m in ("euler", "midpoint", "heun")}


@pytest.mark.parametrize("method,order", [("euler", 1), ("midpoint", 2), ("heun", 2)])
def test_fixed_step_convergence_order(errors, method, order):
    e = np.array(errors[method])
    slopes = np.log2(e[:-1] / e[1:])
    assert np.all(np.abs(slopes - order) < 0.25), (method, e, slopes)


@pytest.mark.parametrize("method", ["tsit5", "dopri5"])
def test_adaptive_solver_is_accurate(method):
    res = sample_ode(FIELD, X0, method=method, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(res.x, EXACT, atol=2e-5)


def _counting(field):
    count = [0]

    def f(x, t):
        jax.debug.callback(lambda: count.__setitem__(0, count[0] + 1))
        return field(x, t)

    return f, count


@pytest.mark.parametrize("method,steps", [("euler", 7), ("midpoint", 5), ("heun", 6), ("tsit5", None), ("bosh3", None)])
def test_reported_nfe_equals_counted_evaluations(method, steps):
    f, count = _counting(FIELD)
    kw = {"steps": steps} if steps else {"rtol": 1e-4, "atol": 1e-4}
    res = jax.block_until_ready(sample_ode(f, X0, method=method, **kw))
    jax.effects_barrier()
    assert int(res.nfe) == count[0], (method, int(res.nfe), count[0])
    assert count[0] > 0


@pytest.mark.parametrize("method", ["euler", "midpoint", "heun"])
def test_scan_and_diffrax_agree(method):
    ts = jnp.array([0.0, 0.1, 0.25, 0.5, 0.8, 1.0])  # non-uniform grid
    a = sample_ode(FIELD, X0, method=method, ts=ts, save_trajectory=True)
    b = sample_ode(FIELD, X0, method=method, ts=ts, save_trajectory=True, backend="diffrax")
    np.testing.assert_allclose(a.trajectory, b.trajectory, atol=1e-5)
    assert a.nfe == b.nfe == (5 if method == "euler" else 10)
    assert a.trajectory.shape == (6, 256, 2)


def test_backward_integration_inverts_the_flow():
    fwd = sample_ode(FIELD, X0, method="heun", steps=64)
    back = sample_ode(FIELD, fwd.x, method="heun", steps=64, t0=1.0, t1=0.0)
    np.testing.assert_allclose(back.x, X0, atol=2e-3)


def test_gradient_through_euler_matches_closed_form():
    n, x0 = 50, jnp.array([[1.0, 2.0]])
    g = jax.grad(lambda th: sample_ode(lambda x, t: th * x, x0, steps=n).x.sum())(0.7)
    h = 1.0 / n
    np.testing.assert_allclose(g, 3.0 * n * h * (1 + 0.7 * h) ** (n - 1), rtol=1e-5)


def test_gradient_through_adaptive_solver_matches_exact_flow():
    x0 = jnp.array([[1.0, 2.0]])
    g = jax.grad(lambda th: sample_ode(lambda x, t: th * x, x0, method="tsit5", rtol=1e-7, atol=1e-7).x.sum())(0.7)
    np.testing.assert_allclose(g, 3.0 * np.exp(0.7), rtol=1e-4)


def test_euler_maruyama_on_ornstein_uhlenbeck():
    """dX = -X dt + sqrt(2) dW from X0 = 3: mean 3 e^{-1}, variance 1 - e^{-2} at t = 1."""
    x0 = jnp.full((20000, 1), 3.0)
    res = euler_maruyama(lambda x, t: -x, jnp.sqrt(2.0), x0, jax.random.key(1), steps=200)
    assert res.nfe == 200
    assert abs(float(res.x.mean()) - 3 * np.exp(-1)) < 0.03
    assert abs(float(res.x.var()) - (1 - np.exp(-2))) < 0.03


def test_sde_with_any_sigma_reaches_gaussian_target():
    for sigma in (0.0, 0.8, lambda t: 2.0 * (1.0 - t)):
        res = sample_sde(FIELD, jax.random.normal(jax.random.key(2), (20000, 2)), jax.random.key(3), path=PATH,
                         sigma=sigma, steps=200)
        np.testing.assert_allclose(res.x.mean(0), M, atol=0.03)
        np.testing.assert_allclose(res.x.std(0), S, atol=0.03)


def test_sde_from_eps_parameterisation():
    path = GaussianPath.from_name("vp")
    res = sample_sde(GAUSS.field(path, "eps"), jax.random.normal(jax.random.key(2), (20000, 2)), jax.random.key(3),
                     path=path, sigma=0.5, prediction="noise", steps=200, t1=path.schedule.t_max)
    np.testing.assert_allclose(res.x.mean(0), M, atol=0.03)
    np.testing.assert_allclose(res.x.std(0), S, atol=0.03)


def test_langevin_stationary_variance():
    """ULA on N(0, 1) with step eta has stationary variance 1 / (1 - eta/2) (exact for the discretisation)."""
    eta = 0.4
    res = langevin(lambda x, t: -x, jnp.zeros((20000, 1)), jax.random.key(4), step_size=eta, steps=100)
    assert res.nfe == 100
    assert abs(float(res.x.var()) - 1 / (1 - eta / 2)) < 0.04
    assert abs(float(res.x.mean())) < 0.03


def test_sampler_noise_is_deterministic_in_key():
    a = euler_maruyama(lambda x, t: -x, 1.0, X0, jax.random.key(5), steps=10).x
    b = euler_maruyama(lambda x, t: -x, 1.0, X0, jax.random.key(5), steps=10).x
    c = euler_maruyama(lambda x, t: -x, 1.0, X0, jax.random.key(6), steps=10).x
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_conditioning_is_passed_to_the_field():
    res = sample_ode(lambda x, t, y: jnp.zeros_like(x) + y[:, None], jnp.zeros((3, 2)), steps=4,
                     cond={"y": jnp.array([1.0, 2.0, 3.0])})
    np.testing.assert_allclose(res.x[:, 0], [1.0, 2.0, 3.0], rtol=1e-6)


def test_bad_sampler_input():
    with pytest.raises(ValueError, match="unknown ODE method 'rk99'"):
        sample_ode(FIELD, X0, method="rk99")
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        sample_ode(FIELD, X0, t1=1.5)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        sample_ode(FIELD, X0, steps=0)
    with pytest.raises(ValueError, match="same shape as x"):
        sample_ode(lambda x, t: x[:, :1], X0, steps=2)
    with pytest.raises(ValueError, match="forward in time"):
        euler_maruyama(lambda x, t: x, 1.0, X0, jax.random.key(0), t0=1.0, t1=0.0)


def test_final_euler_never_evaluates_at_t1():
    seen = []

    def f(x, t):
        jax.debug.callback(lambda tt: seen.append(float(tt[0])), t)
        return FIELD(x, t)

    res = jax.block_until_ready(sample_ode(f, X0, method="heun", steps=32, final_euler=True, save_trajectory=True))
    jax.effects_barrier()
    assert res.nfe == 63 == len(seen) and max(seen) < 1.0
    assert res.trajectory.shape == (33, 256, 2)
    np.testing.assert_allclose(res.x, EXACT, atol=0.02)


def test_sde_grid_must_increase_and_eps_fields_must_start_after_t0():
    with pytest.raises(ValueError, match="strictly increasing"):
        euler_maruyama(lambda x, t: x, 1.0, X0, jax.random.key(0), ts=jnp.linspace(1.0, 0.0, 5))
    path = GaussianPath.from_name("linear")
    with pytest.raises(ValueError, match="start the SDE at t0 > 0"):
        sample_sde(GAUSS.field(path, "eps"), X0, jax.random.key(0), path=path, sigma=0.5, prediction="eps")
    res = sample_sde(GAUSS.field(path, "eps"), X0, jax.random.key(0), path="linear", sigma=0.5, prediction="eps",
                     t0=1e-3, steps=50)
    assert np.all(np.isfinite(np.asarray(res.x)))


def test_langevin_vmaps_over_step_size():
    out = jax.vmap(lambda eta: langevin(lambda x, t: -x, jnp.zeros((64, 1)), jax.random.key(0), step_size=eta,
                                        steps=5).x)(jnp.array([0.1, 0.2]))
    assert out.shape == (2, 64, 1)
