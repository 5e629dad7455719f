"""Samplers against closed forms: convergence orders, exact NFE, diffrax agreement, gradients, Langevin stationarity."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from jaxgen.oracle import GaussianMixture
from jaxgen.paths import GaussianPath
from jaxgen.samplers import Diffrax, Euler, EulerMaruyama, Heun, Langevin, RK4, get_solver, sample

# Gaussian data N(m, s^2 I): the marginal flow is affine and its exact endpoint is x1 = m + s x0.
M, S = jnp.array([1.0, -2.0]), 0.5
GAUSS = GaussianMixture.isotropic(M[None], S)
PATH = GaussianPath.from_name("cosine")
FIELD = GAUSS.velocity_field(PATH)
X0 = jax.random.normal(jax.random.key(0), (256, 2))
EXACT = M + S * X0


@pytest.fixture(scope="module")
def errors():
    run = jax.jit(lambda x0, method, steps: sample(FIELD, x0, method, steps=steps).x, static_argnums=(1, 2))
    return {m: [float(jnp.abs(run(X0, m, n) - EXACT).max()) for n in (8, 16, 32)] for m in ("euler", "midpoint", "heun")}


@pytest.mark.slow
def test_rk4_is_fourth_order():
    # in float64: in float32 RK4 reaches round-off (~1e-6) at 32 steps
    with jax.enable_x64(True):
        x0, exact = X0.astype(jnp.float64), EXACT.astype(jnp.float64)
        e = np.array([float(jnp.abs(sample(FIELD, x0, RK4(), steps=n).x - exact).max()) for n in (8, 16, 32)])
    slopes = np.log2(e[:-1] / e[1:])
    assert np.all(np.abs(slopes - 4) < 0.25), (e, slopes)


@pytest.mark.slow
@pytest.mark.parametrize("method,order", [("euler", 1), ("midpoint", 2), ("heun", 2)])
def test_fixed_step_convergence_order(errors, method, order):
    e = np.array(errors[method])
    slopes = np.log2(e[:-1] / e[1:])
    assert np.all(np.abs(slopes - order) < 0.25), (method, e, slopes)


@pytest.mark.parametrize("method", ["tsit5", "dopri5"])
def test_adaptive_solver_is_accurate(method):
    res = sample(FIELD, X0, get_solver(method, rtol=1e-6, atol=1e-6))
    np.testing.assert_allclose(res.x, EXACT, atol=2e-5)


def _counting(field):
    count = [0]

    def f(x, t):
        jax.debug.callback(lambda: count.__setitem__(0, count[0] + 1))
        return field(x, t)

    return f, count


@pytest.mark.parametrize("method,steps", [("euler", 7), ("midpoint", 5), ("heun", 6), ("rk4", 3), ("tsit5", None),
                                          pytest.param("bosh3", None, marks=pytest.mark.slow),  # adaptive: tsit5's
                                          pytest.param("dopri8", None, marks=pytest.mark.slow),  # counting, fast tier
                                          ("diffrax:solver=heun", None)])
def test_reported_nfe_equals_counted_evaluations(method, steps):
    f, count = _counting(FIELD)
    if steps:
        res = sample(f, X0, method, steps=steps)
    else:
        res = sample(f, X0, get_solver(method, rtol=1e-4, atol=1e-4))
    res = jax.block_until_ready(res)
    jax.effects_barrier()
    assert int(res.nfe) == count[0], (method, int(res.nfe), count[0])
    assert count[0] > 0


@pytest.mark.slow
@pytest.mark.parametrize("method", ["euler", "midpoint", "heun"])
def test_scan_and_diffrax_agree(method):
    ts = jnp.array([0.0, 0.1, 0.25, 0.5, 0.8, 1.0])  # non-uniform grid
    a = sample(FIELD, X0, method, ts=ts, save_trajectory=True)
    b = sample(FIELD, X0, Diffrax(solver=method, adaptive=False), ts=ts, save_trajectory=True)
    np.testing.assert_allclose(a.trajectory, b.trajectory, atol=1e-5)
    assert a.nfe == b.nfe == (5 if method == "euler" else 10)
    assert a.trajectory.shape == (6, 256, 2)


def test_backward_integration_inverts_the_flow():
    fwd = sample(FIELD, X0, Heun(), steps=64)
    back = sample(FIELD, fwd.x, Heun(), steps=64, t0=1.0, t1=0.0)
    np.testing.assert_allclose(back.x, X0, atol=2e-3)


def test_gradient_through_euler_matches_closed_form():
    n, x0 = 50, jnp.array([[1.0, 2.0]])
    g = jax.grad(lambda th: sample(lambda x, t: th * x, x0, Euler(), steps=n).x.sum())(0.7)
    h = 1.0 / n
    np.testing.assert_allclose(g, 3.0 * n * h * (1 + 0.7 * h) ** (n - 1), rtol=1e-5)


@pytest.mark.slow
def test_gradient_through_adaptive_solver_matches_exact_flow():
    x0 = jnp.array([[1.0, 2.0]])
    g = jax.grad(lambda th: sample(lambda x, t: th * x, x0, Diffrax(rtol=1e-7, atol=1e-7)).x.sum())(0.7)
    np.testing.assert_allclose(g, 3.0 * np.exp(0.7), rtol=1e-4)


def test_euler_maruyama_on_ornstein_uhlenbeck():
    """dX = -X dt + sqrt(2) dW from X0 = 3: mean 3 e^{-1}, variance 1 - e^{-2} at t = 1."""
    x0 = jnp.full((20000, 1), 3.0)
    res = sample(lambda x, t: -x, x0, EulerMaruyama(jnp.sqrt(2.0), drift="field"), key=jax.random.key(1), steps=200)
    assert res.nfe == 200
    assert abs(float(res.x.mean()) - 3 * np.exp(-1)) < 0.03
    assert abs(float(res.x.var()) - (1 - np.exp(-2))) < 0.03


@pytest.mark.slow
def test_sde_with_any_sigma_reaches_gaussian_target():
    for sigma in (0.0, 0.8, lambda t: 2.0 * (1.0 - t)):
        res = sample(FIELD, jax.random.normal(jax.random.key(2), (20000, 2)), EulerMaruyama(sigma), path=PATH,
                     key=jax.random.key(3), steps=200)
        np.testing.assert_allclose(res.x.mean(0), M, atol=0.03)
        np.testing.assert_allclose(res.x.std(0), S, atol=0.03)


@pytest.mark.slow
def test_sde_from_eps_parameterisation():
    path = GaussianPath.from_name("vp")
    res = sample(GAUSS.field(path, "eps"), jax.random.normal(jax.random.key(2), (20000, 2)), EulerMaruyama(0.5),
                 key=jax.random.key(3), path=path, prediction="noise", steps=200, t1=path.schedule.t_max)
    np.testing.assert_allclose(res.x.mean(0), M, atol=0.03)
    np.testing.assert_allclose(res.x.std(0), S, atol=0.03)


def test_langevin_stationary_variance():
    """ULA on N(0, 1) with step eta has stationary variance 1 / (1 - eta/2) (exact for the discretisation)."""
    eta = 0.4
    res = sample(lambda x, t: -x, jnp.zeros((20000, 1)), Langevin(step_size=eta, t=1.0), prediction="score",
                 key=jax.random.key(4), steps=100)
    assert res.nfe == 100
    assert abs(float(res.x.var()) - 1 / (1 - eta / 2)) < 0.04
    assert abs(float(res.x.mean())) < 0.03


def test_sampler_noise_is_deterministic_in_key():
    em = EulerMaruyama(1.0, drift="field")
    a = sample(lambda x, t: -x, X0, em, key=jax.random.key(5), steps=10).x
    b = sample(lambda x, t: -x, X0, em, key=jax.random.key(5), steps=10).x
    c = sample(lambda x, t: -x, X0, em, key=jax.random.key(6), steps=10).x
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)


def test_conditioning_is_passed_to_the_field():
    res = sample(lambda x, t, y: jnp.zeros_like(x) + y[:, None], jnp.zeros((3, 2)), Euler(), steps=4,
                 cond={"y": jnp.array([1.0, 2.0, 3.0])})
    np.testing.assert_allclose(res.x[:, 0], [1.0, 2.0, 3.0], rtol=1e-6)


def test_bad_sampler_input():
    with pytest.raises(ValueError, match="unknown sampler 'rk99'"):
        sample(FIELD, X0, "rk99")
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        sample(FIELD, X0, Euler(), t1=1.5)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        sample(FIELD, X0, Euler(), steps=0)
    with pytest.raises(ValueError, match="same shape as x"):
        sample(lambda x, t: x[:, :1], X0, Euler(), steps=2)
    with pytest.raises(ValueError, match="need t0 < t1"):
        sample(lambda x, t: x, X0, EulerMaruyama(1.0, drift="field"), key=jax.random.key(0), t0=1.0, t1=0.0)
    with pytest.raises(ValueError, match="pass key="):
        sample(lambda x, t: x, X0, EulerMaruyama(1.0, drift="field"))
    with pytest.raises(ValueError, match="bad options .* for sampler 'heun'"):
        get_solver("heun:order=3")
    with pytest.raises(ValueError, match="adaptive solver chooses its own steps"):
        sample(FIELD, X0, "tsit5", steps=10)
    with pytest.raises(ValueError, match="x0 holds NaN or inf"):
        sample(FIELD, X0.at[0, 0].set(jnp.nan), Euler(), steps=2)
    with pytest.raises(ValueError, match=r"x0 must be floating point.*astype"):
        sample(FIELD, jnp.zeros(X0.shape, jnp.int32), Euler(), steps=2)


@pytest.mark.slow
def test_final_euler_never_evaluates_at_t1():
    seen = []

    def f(x, t):
        jax.debug.callback(lambda tt: seen.append(float(tt[0])), t)
        return FIELD(x, t)

    res = jax.block_until_ready(sample(f, X0, Heun(final_euler=True), steps=32, save_trajectory=True))
    jax.effects_barrier()
    assert res.nfe == 63 == len(seen) and max(seen) < 1.0
    assert res.trajectory.shape == (33, 256, 2)
    np.testing.assert_allclose(res.x, EXACT, atol=0.02)


def test_sde_grid_must_increase_and_eps_fields_must_start_after_t0():
    with pytest.raises(ValueError, match="strictly increasing"):
        sample(lambda x, t: x, X0, EulerMaruyama(1.0, drift="field"), key=jax.random.key(0), ts=jnp.linspace(1.0, 0.0, 5))
    path = GaussianPath.from_name("linear")
    with pytest.raises(ValueError, match="start later, e.g. t0=1e-3"):
        sample(GAUSS.field(path, "eps"), X0, EulerMaruyama(0.5), key=jax.random.key(0), path=path, prediction="eps")
    res = sample(GAUSS.field(path, "eps"), X0, EulerMaruyama(0.5), key=jax.random.key(0), path="linear",
                 prediction="eps", t0=1e-3, steps=50)
    assert np.all(np.isfinite(np.asarray(res.x)))


def test_langevin_vmaps_over_step_size():
    out = jax.vmap(lambda eta: sample(lambda x, t: -x, jnp.zeros((64, 1)), Langevin(step_size=eta, t=1.0),
                                      prediction="score", key=jax.random.key(0), steps=5).x)(jnp.array([0.1, 0.2]))
    assert out.shape == (2, 64, 1)


@pytest.mark.slow
def test_solvers_of_one_process_sample_a_field_of_another_path():
    """DDPM ancestral sampling and score_sde's predictor-corrector sampler, given a velocity field of the linear path,
    move it onto their own path (log-SNR matching): the samples equal those of the exact field of their path."""
    from jaxgen.paths import DDPMSchedule
    from jaxgen.samplers import DDPMAncestral, PredictorCorrector

    linear = GaussianPath.from_name("linear")
    x = jax.random.normal(jax.random.key(0), (64, 2))
    for solver in (DDPMAncestral(schedule=DDPMSchedule.linear(100, rescale=True)), PredictorCorrector(sde="vp")):
        own = solver.process_path()
        run = jax.jit(lambda x: (sample(GAUSS.velocity_field(linear), x, solver, path=linear, steps=50,
                                        key=jax.random.key(1)).x,
                                 sample(GAUSS.field(own, "velocity"), x, solver, steps=50, key=jax.random.key(1)).x))
        moved, exact = run(x)
        np.testing.assert_allclose(moved, exact, atol=1e-3)
        assert float(jnp.abs(exact - x).max()) > 0.5  # the samplers moved the points
