"""Fast diffusion samplers (DDIM, DPM-Solver, DPM-Solver++, EDM) against closed forms.

Gaussian data N(m, diag(v)): the probability-flow ODE of every Gaussian path is affine per coordinate, with the
exact flow map x_t = alpha_t m + std_t (x_s - alpha_s m) / std_s, std_t^2 = alpha_t^2 v + beta_t^2. Convergence
orders are measured against it; distributions are checked on a 2-component mixture (oracle fields).
"""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from _fast_oracle import counting

from jaxgen.fields import PREDICTIONS, from_data_and_noise
from jaxgen.oracle import GaussianMixture
from jaxgen.paths import GaussianPath, log_snr, sigmas_from_times, times_from_lambdas, times_from_sigmas
from jaxgen.samplers import DDIM, EDM, DPMSolver, DPMSolverPP, ddim_noise_scale, karras_sigmas, sample

M, V = jnp.array([1.0, -0.5]), jnp.array([0.25, 2.0])
GAUSS = GaussianMixture.diagonal(M[None], V[None])
LINEAR, VP = GaussianPath.from_name("linear"), GaussianPath.from_name("vp")
X = jax.random.normal(jax.random.key(0), (16, 2))
STEPS = (16, 32, 64)
VP_T1 = 1.0 - 1e-3  # finite log-SNR at both ends (lambda from -5.0 to 3.8): the papers' setting


def flow_map(path, x, t0, t1):
    """Exact probability-flow map of N(M, diag(V)) from t0 to t1."""
    c0, c1 = path.coefficients(jnp.float32(t0)), path.coefficients(jnp.float32(t1))
    s0, s1 = jnp.sqrt(c0.alpha**2 * V + c0.beta**2), jnp.sqrt(c1.alpha**2 * V + c1.beta**2)
    return c1.alpha * M + s1 * (x - c0.alpha * M) / s0


def vp_times_from_lambdas(lam, beta_min=0.1, beta_max=20.0):
    """Closed-form inverse of the VP log-SNR: alpha^2 = sigmoid(2 lambda) and
    log alpha = -(beta_max - beta_min) tau^2 / 4 - beta_min tau / 2 with tau = 1 - t (a quadratic in tau)."""
    log_alpha = -0.5 * np.log1p(np.exp(-2.0 * np.asarray(lam, np.float64)))
    a, b = 0.25 * (beta_max - beta_min), 0.5 * beta_min
    return 1.0 - (-b + np.sqrt(b * b - 4 * a * log_alpha)) / (2 * a)


def vp_logsnr_grid(n, t1=VP_T1):
    """n steps uniform in lambda on the VP path from t=0 to t1 (the DPM-Solver papers' spacing)."""
    with jax.ensure_compile_time_eval():  # a constant of the jitted sampler
        lam = np.asarray(log_snr(VP, jnp.array([0.0, t1])), np.float64)
    ts = vp_times_from_lambdas(np.linspace(lam[0], lam[1], n + 1))
    ts[0], ts[-1] = 0.0, t1
    return jnp.asarray(ts, jnp.float32)


def linear_karras_grid(n):
    """EDM's Karras grid (80 -> 0.002, then 0) as times of the linear path: sigma = (1 - t) / t."""
    with jax.ensure_compile_time_eval():
        return jnp.concatenate([1.0 / (1.0 + karras_sigmas(n)), jnp.ones((1,))])


def _ode_ref(path, t0, t1):
    return lambda x0, res: flow_map(path, x0, t0, t1)


def _edm_ref(x0, res):
    """EDM ends at sigma = 0 (t = 1): x = M + sqrt(V) (x_hat0 - M) / sqrt(V + sigma_0^2), x_hat0 = x0 / alpha_0."""
    s0 = sigmas_from_times(LINEAR, res.ts[0])
    a0 = LINEAR.coefficients(res.ts[0]).alpha
    return M + jnp.sqrt(V) * (x0 / a0 - M) / jnp.sqrt(V + s0**2)


_VP_REF = _ode_ref(VP, 0.0, VP_T1)
# name -> (order, path, prediction, sampler(field, x0, steps), reference(x0, result)). Each DPM-Solver gets the
# exact field in another parameterisation, on the VP path with steps uniform in lambda.
CASES = {
    # DDIM from alpha = 0 to beta = 0 on the linear path, uniform in t.
    "ddim": (1, LINEAR, "velocity", lambda f, x, n: sample(f, x, DDIM(), path=LINEAR, steps=n),
             _ode_ref(LINEAR, 0.0, 1.0)),
    "dpm_solver_2": (2, VP, "data", lambda f, x, n: sample(f, x, DPMSolver(order=2), path=VP, prediction="data",
                                                           ts=vp_logsnr_grid(n)), _VP_REF),
    "dpm_solver_3": (3, VP, "eps", lambda f, x, n: sample(f, x, DPMSolver(order=3), path=VP, prediction="eps",
                                                          ts=vp_logsnr_grid(n)), _VP_REF),
    "dpm_solver_pp_2m": (2, VP, "score", lambda f, x, n: sample(f, x, DPMSolverPP(), path=VP, prediction="score",
                                                                ts=vp_logsnr_grid(n)), _VP_REF),
    "dpm_solver_pp_2s": (2, VP, "v", lambda f, x, n: sample(f, x, DPMSolverPP(method="singlestep"), path=VP,
                                                            prediction="v", ts=vp_logsnr_grid(n)), _VP_REF),
    # DPM-Solver++(3M) without the first-order final step (which caps the global order at 2); a third-order method
    # that converges at order 4 on this problem (measured 3.99, 4.06; the formula of the reference implementations,
    # whose weight of the second difference is half the one its order conditions need, measured 2.5, 2.2 here)
    "dpm_solver_pp_3m": (4, VP, "eps", lambda f, x, n: sample(f, x, DPMSolverPP(order=3, lower_order_final=False),
                                                              path=VP, prediction="eps", ts=vp_logsnr_grid(n)),
                         _VP_REF),
    # EDM Heun on the Karras grid (sigma 80 -> 0.002 -> 0), linear path.
    "edm_heun": (2, LINEAR, "velocity", lambda f, x, n: sample(f, x, EDM(), path=LINEAR, ts=linear_karras_grid(n)),
                 _edm_ref),
}


def gaussian_field(path, prediction):
    """The exact field of N(M, diag(V)) in closed form (posterior means E[z|x], E[eps|x] per coordinate):
    the oracle's, but cheaper to compile; checked against the oracle below."""
    def field(x, t):
        c = path.coefficients(t)
        a, b = c.alpha[:, None], c.beta[:, None]
        r = (x - a * M) / (a**2 * V + b**2)
        return from_data_and_noise(path, M + a * V * r, b * r, t, prediction)
    return field


def test_closed_form_field_is_the_oracles():
    """On the (path, prediction) pairs of the convergence cases."""
    t = jnp.linspace(0.0, 0.99, 16)
    pairs = {(case[1], case[2]) for case in CASES.values()}
    both = jax.jit(lambda x, t: [(gaussian_field(path, p)(x, t), GAUSS.field(path, p)(x, t)) for path, p in pairs])
    for closed, oracle in both(X, t):
        np.testing.assert_allclose(closed, oracle, rtol=1e-4, atol=1e-4)




@pytest.fixture(scope="module")
def convergence():
    out = {}
    for name, (order, path, prediction, sampler, reference) in CASES.items():
        errs, nfes = [], []
        for n in STEPS:
            field, count = counting(gaussian_field(path, prediction))
            res = jax.block_until_ready(jax.jit(lambda x: sampler(field, x, n))(X))
            jax.effects_barrier()
            errs.append(float(jnp.max(jnp.abs(res.x - reference(X, res)))))
            nfes.append((int(res.nfe), count[0]))
        slope = -np.polyfit(np.log(STEPS), np.log(errs), 1)[0]
        print(f"{name}: errors {['%.2e' % e for e in errs]} slope {slope:.2f} (order {order}), (nfe, counted) {nfes}")
        out[name] = (order, errs, slope, nfes)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_converges_at_its_order(convergence, name):
    order, errs, slope, _ = convergence[name]
    assert abs(slope - order) < 0.3, (name, errs, slope)
    assert errs[-1] < 0.1


NFE_PER_STEP = {"ddim": 1, "dpm_solver_2": 2, "dpm_solver_3": 3, "dpm_solver_pp_2m": 1, "dpm_solver_pp_2s": 2,
                "dpm_solver_pp_3m": 1}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_reported_nfe_is_exact(convergence, name):
    """NFE = steps * order for the single-step solvers, steps for DDIM and 2M, 2 N - 1 for EDM (Heun + final
    Euler); each equals the number of field calls counted during the run."""
    _, _, _, nfes = convergence[name]
    expected = [2 * n - 1 if name == "edm_heun" else NFE_PER_STEP[name] * n for n in STEPS]
    assert [reported for reported, _ in nfes] == [counted for _, counted in nfes] == expected, nfes


def test_first_order_solvers_are_ddim():
    """DPM-Solver-1 and DPM-Solver++(1) are DDIM (Lu et al. 2022, 2022b), also on a grid with open ends."""
    f = gaussian_field(LINEAR, "v")
    outs = jax.jit(lambda x: [sample(f, x, solver, path=LINEAR, prediction="v", steps=6).x
                              for solver in (DDIM(), DPMSolver(order=1), DPMSolverPP(order=1))])(X)
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-5)
    np.testing.assert_allclose(outs[2], outs[0], atol=1e-5)


@pytest.mark.slow
def test_edm_sampler_depends_on_the_path_only_through_sigma():
    """On the scaled state x / alpha the EDM ODE only sees sigma = beta / alpha: the linear path (bisected
    Karras times) and the EDM path (whose uniform times are the Karras levels) give the same samples."""
    edm = GaussianPath.from_name("edm")
    x_hat0 = M + jnp.sqrt(V + 80.0**2) * X

    @jax.jit
    def run(x_hat0):
        out = []
        for path in (LINEAR, edm):
            a0 = path.coefficients(times_from_sigmas(path, jnp.float32(80.0))).alpha
            out.append(sample(gaussian_field(path, "eps"), a0 * x_hat0, EDM(), path=path, prediction="eps", steps=8))
        return out

    lin, ref = run(x_hat0)
    # 8 levels at uniform times, then sigma = 0, which the EDM path (sigma(1) = 0.002) reports at its end t = 1
    np.testing.assert_allclose(ref.ts, np.r_[np.linspace(0.0, 1.0, 8), 1.0], atol=1e-6)
    np.testing.assert_allclose(lin.x, ref.x, atol=1e-4)


# -- every parameterisation gives the same samples ------------------------------------------------------------

MIX = GaussianMixture(jnp.array([[1.5, -0.5], [-1.0, 1.0]]),
                      jnp.array([[[0.3, 0.1], [0.1, 0.2]], [[0.2, -0.05], [-0.05, 0.4]]]), jnp.array([0.4, 0.6]))
SAMPLERS = {  # default grids of the VP path (t from 0 to 1 - 1e-5)
    "ddim": lambda f, x, p: sample(f, x, DDIM(), path=VP, prediction=p, steps=10),
    "dpm_solver_pp_2m": lambda f, x, p: sample(f, x, DPMSolverPP(), path=VP, prediction=p, steps=10),
    "dpm_solver_pp_3m": lambda f, x, p: sample(f, x, DPMSolverPP(order=3), path=VP, prediction=p, steps=10),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_parameterisation_gives_the_same_samples(name):
    x0 = jax.random.normal(jax.random.key(1), (32, 2))
    outs = jax.jit(lambda x0: [SAMPLERS[name](MIX.field(VP, p), x0, p).x for p in PREDICTIONS])(x0)
    assert np.all(np.isfinite(np.asarray(outs[0])))
    assert float(jnp.abs(outs[0] - x0).max()) > 0.1  # the samplers moved the points
    for p, out in zip(PREDICTIONS[1:], outs[1:]):
        np.testing.assert_allclose(out, outs[0], atol=2e-5, err_msg=f"{name}: {p} vs velocity")


# -- gradients with respect to the time grid ------------------------------------------------------------------

GRID_01 = np.linspace(0.0, 1.0, 7, dtype=np.float32)  # linear path: alpha = 0 at t=0, beta = 0 at t=1
GRAD_SAMPLERS = {
    "ddim": lambda f, x, ts: sample(f, x, DDIM(), path=LINEAR, ts=ts),
    "ddim_eta": lambda f, x, ts: sample(f, x, DDIM(eta=0.5), path=LINEAR, ts=ts, key=jax.random.key(0)),
    "dpm_solver_1": lambda f, x, ts: sample(f, x, DPMSolver(order=1), path=LINEAR, ts=ts),
    "dpm_solver_2": lambda f, x, ts: sample(f, x, DPMSolver(order=2), path=LINEAR, ts=ts),
    "dpm_solver_3": lambda f, x, ts: sample(f, x, DPMSolver(order=3), path=LINEAR, ts=ts),
    "dpm_solver_pp_2m": lambda f, x, ts: sample(f, x, DPMSolverPP(), path=LINEAR, ts=ts),
    "dpm_solver_pp_3m": lambda f, x, ts: sample(f, x, DPMSolverPP(order=3), path=LINEAR, ts=ts),
    "dpm_solver_pp_2s": lambda f, x, ts: sample(f, x, DPMSolverPP(method="singlestep"), path=LINEAR, ts=ts),
}
# samplers whose last (DDIM) step stays first order when the data end t=1 moves inside the path: their samples
# are differentiable in that end from the left (the others switch to their full-order step there)
SMOOTH_AT_THE_DATA_END = ("ddim", "ddim_eta", "dpm_solver_1", "dpm_solver_pp_2m", "dpm_solver_pp_3m")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(GRAD_SAMPLERS))
def test_gradient_with_respect_to_a_grid_with_open_ends(name):
    """jax.grad of the samples with respect to a traced grid ts = linspace(0, 1, 7) of the linear path, whose ends
    have lambda = -inf (alpha = 0) and +inf (beta = 0): finite at every time (no 0 * inf = NaN from the log-SNR,
    the square root of DDIM's noise coefficient or the bisected interior points), and along random directions of
    the interior times (the ends stay at 0 and 1) equal to central differences, to 1 % of |grad| |direction| (the
    float32 differences are accurate to ~0.1 % of it). Where the samples are smooth in the data end, the gradient
    there is the one-sided difference. The traced grid gives the samples of the same grid known at trace time (a
    DDIM step at each open end)."""
    sampler, field = GRAD_SAMPLERS[name], gaussian_field(LINEAR, "velocity")
    directions = jax.random.normal(jax.random.key(8), (4,) + GRID_01.shape).at[:, 0].set(0.0).at[:, -1].set(0.0)
    eps = 1e-3

    def loss(ts):
        return jnp.sum(sampler(field, X, ts).x)

    @jax.jit
    def run(ts):
        grids = jnp.concatenate([ts + eps * directions, ts - eps * directions, ts[None], ts.at[-1].add(-eps)[None]])
        losses = jax.vmap(loss)(grids)
        central = (losses[:4] - losses[4:8]) / (2 * eps)
        return jax.grad(loss)(ts), central, (losses[8] - losses[9]) / eps, sampler(field, X, ts).x, \
            sampler(field, X, GRID_01).x

    grad, central, one_sided, traced, known = map(np.asarray, run(jnp.asarray(GRID_01)))
    assert np.all(np.isfinite(grad)), grad
    scale = np.linalg.norm(grad[1:-1]) * np.linalg.norm(np.asarray(directions), axis=1)
    assert np.all(np.abs(np.asarray(directions) @ grad - central) < 1e-2 * scale), (directions @ grad, central)
    if name in SMOOTH_AT_THE_DATA_END:
        np.testing.assert_allclose(grad[-1], one_sided, rtol=1e-2)
    np.testing.assert_allclose(traced, known, atol=1e-5)


# -- stochastic samplers reproduce the target distribution ----------------------------------------------------

def _assert_moments(x, gm, n_se=4.0):
    """Mean and covariance within n_se standard errors (Gaussian approximation of the sampling error)."""
    n = x.shape[0]
    m, c = np.asarray(gm.mean()), np.asarray(gm.covariance())
    xm, xc = np.asarray(x.mean(0)), np.cov(np.asarray(x).T)
    se_m = np.sqrt(np.diag(c) / n)
    se_c = np.sqrt((np.outer(np.diag(c), np.diag(c)) + c**2) / n)
    assert np.all(np.abs(xm - m) < n_se * se_m), (xm, m, se_m)
    assert np.all(np.abs(xc - c) < n_se * se_c), (xc, c, se_c)


N_SAMPLES = 4000


@pytest.mark.slow
def test_ddim_eta_one_samples_the_target():
    """Ancestral sampling (DDPM posterior noise) with the exact eps prediction, linear path from t0 = 1e-3."""
    x0 = LINEAR.sample_prior(jax.random.key(2), (N_SAMPLES, 2))
    run = jax.jit(lambda x, k: sample(MIX.field(LINEAR, "eps"), x, DDIM(eta=1.0), path=LINEAR, prediction="eps",
                                      steps=200, key=k, t0=1e-3).x)
    _assert_moments(run(x0, jax.random.key(3)), MIX)


@pytest.mark.slow
def test_edm_churn_samples_the_target():
    steps = 64
    # x0 drawn exactly from p_t at the first noise level sigma_max = 80 of the VP path
    t0 = float(vp_times_from_lambdas(-np.log(80.0)))
    c0 = VP.coefficients(jnp.float32(t0))
    z = MIX.sample(jax.random.key(4), N_SAMPLES)
    x0 = c0.alpha * z + c0.beta * jax.random.normal(jax.random.key(5), z.shape)
    run = jax.jit(lambda x, k: sample(MIX.field(VP, "data"), x, EDM(s_churn=10.0, s_tmin=0.05, s_tmax=50.0), path=VP,
                                      prediction="data", steps=steps, key=k))
    res = run(x0, jax.random.key(6))
    assert res.nfe == 2 * steps - 1
    _assert_moments(res.x, MIX)


def test_ddim_noise_scale_is_the_papers_sigma_for_vp():
    """Song et al. 2021 eq. 16: sigma(eta) = eta sqrt((1 - a_prev) / (1 - a)) sqrt(1 - a / a_prev), a = alpha^2."""
    t = jnp.array([0.0, 0.3, 0.6, 0.9]), jnp.array([0.2, 0.5, 0.8, 0.99])
    c_s, c_t = VP.coefficients(t[0]), VP.coefficients(t[1])
    h = log_snr(VP, t[1]) - log_snr(VP, t[0])
    a, a_prev = c_s.alpha**2, c_t.alpha**2
    for eta in (0.3, 1.0):
        paper = eta * jnp.sqrt((1 - a_prev) / (1 - a)) * jnp.sqrt(1 - a / a_prev)
        np.testing.assert_allclose(ddim_noise_scale(c_t.beta, h, eta), paper, rtol=1e-5)


# -- exact NFE ------------------------------------------------------------------------------------------------

NFE_CASES = {  # default grids and the stochastic variants (the deterministic ones are counted above)
    "ddim_eta": (lambda f, x: sample(f, x, DDIM(eta=0.5), path=LINEAR, steps=5, key=jax.random.key(0),
                                     save_trajectory=True), 5),
    # open ends on [0, 1] of the linear path: the first and last steps are DDIM (1 NFE each)
    "dpm_solver_3_open_ends": (lambda f, x: sample(f, x, DPMSolver(order=3), path=LINEAR, steps=4,
                                                   save_trajectory=True), 8),
    "dpm_solver_pp_2m": (lambda f, x: sample(f, x, DPMSolverPP(lower_order_final=False), path=VP, steps=5,
                                             save_trajectory=True), 5),
    "dpm_solver_pp_3m": (lambda f, x: sample(f, x, DPMSolverPP(order=3), path=VP, steps=5, save_trajectory=True), 5),
    "edm_churn": (lambda f, x: sample(f, x, EDM(s_churn=5.0), path=LINEAR, steps=5, key=jax.random.key(0),
                                      save_trajectory=True), 9),
}


@pytest.mark.parametrize("name", list(NFE_CASES))
def test_reported_nfe_equals_counted_evaluations(name):
    sampler, expected = NFE_CASES[name]
    f, count = counting(lambda x, t: -0.5 * x)
    x0 = jnp.ones((3, 2))
    res = jax.block_until_ready(jax.jit(lambda x: sampler(f, x))(x0))
    jax.effects_barrier()
    assert res.nfe == count[0] == expected, (name, res.nfe, count[0])
    assert np.all(np.diff(np.asarray(res.ts)) > 0)
    if res.trajectory is not None:
        assert res.trajectory.shape == (res.ts.shape[0], 3, 2)
        np.testing.assert_array_equal(res.trajectory[0], x0)
        np.testing.assert_array_equal(res.trajectory[-1], res.x)


# -- noise levels and times ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["linear", "vp", "ve"])
def test_times_from_sigmas_inverts_the_path(name):
    path = GaussianPath.from_name(name)
    t = jnp.linspace(path.schedule.t_min, path.schedule.t_max, 41)[1:-1]

    @jax.jit
    def round_trips(t):
        ends = times_from_sigmas(path, jnp.array([0.0, jnp.inf]))
        return times_from_sigmas(path, sigmas_from_times(path, t)), times_from_lambdas(path, log_snr(path, t)), ends

    from_sigma, from_lambda, ends = round_trips(t)
    np.testing.assert_allclose(from_sigma, t, atol=1e-6)
    np.testing.assert_allclose(from_lambda, t, atol=1e-6)
    # the ends: sigma = 0 is the data end, sigma = inf the noise end
    np.testing.assert_array_equal(ends, np.float32([path.schedule.t_max, path.schedule.t_min]))


def test_times_from_lambdas_matches_the_closed_form_vp_inverse():
    lam = jnp.linspace(-5.0, 6.0, 23)
    np.testing.assert_allclose(jax.jit(lambda l: times_from_lambdas(VP, l))(lam), vp_times_from_lambdas(lam),
                               atol=2e-7)


def test_karras_sigmas_are_the_edm_paths_uniform_grid():
    sig = karras_sigmas(9, 0.002, 80.0, 7.0, append_zero=True)
    assert sig.shape == (10,) and float(sig[-1]) == 0.0
    np.testing.assert_allclose([sig[0], sig[-2]], [80.0, 0.002], rtol=1e-5)
    assert np.all(np.diff(np.asarray(sig)) < 0)
    edm = GaussianPath.from_name("edm")
    np.testing.assert_allclose(jax.jit(lambda s: times_from_sigmas(edm, s))(sig[:-1]), jnp.linspace(0, 1, 9), atol=1e-6)


# -- bad input ------------------------------------------------------------------------------------------------

def test_bad_input_raises_clear_errors():
    f = GAUSS.field(LINEAR, "velocity")
    with pytest.raises(ValueError, match=r"order must be one of \(1, 2, 3\)"):
        DPMSolver(order=4)
    with pytest.raises(ValueError, match=r"order must be one of \(1, 2, 3\)"):
        DPMSolverPP(order=4)
    with pytest.raises(ValueError, match=r"order must be one of \(1, 2\)"):
        DPMSolverPP(order=3, method="singlestep")
    with pytest.raises(ValueError, match="'multistep' \\(2M, 3M\\) or 'singlestep'"):
        DPMSolverPP(method="3m")
    for eta in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"eta must be a number in \[0, 1\]"):
            DDIM(eta=eta)
    with pytest.raises(ValueError, match="pass key="):
        sample(f, X, DDIM(eta=0.5), path=LINEAR)
    with pytest.raises(ValueError, match="pass key="):
        sample(f, X, EDM(s_churn=1.0), path=LINEAR)
    with pytest.raises(ValueError, match="s_churn must be"):
        EDM(s_churn=-1.0)
    with pytest.raises(ValueError, match="start later, e.g. t0=1e-3"):
        sample(GAUSS.field(LINEAR, "eps"), X, DPMSolver(), path=LINEAR, prediction="eps")
    with pytest.raises(ValueError, match="start later"):
        sample(GAUSS.field(LINEAR, "score"), X, EDM(sigma_max=5000.0), path=LINEAR, prediction="score")
    with pytest.raises(ValueError, match="spacing='logsnr' needs a finite log-SNR"):
        sample(f, X, DDIM(spacing="logsnr"), path=LINEAR)
    with pytest.raises(ValueError, match="unknown spacing"):
        DDIM(spacing="karras")
    with pytest.raises(ValueError, match="strictly increasing"):
        sample(f, X, DPMSolverPP(), path=LINEAR, ts=jnp.array([1.0, 0.5, 0.0]))
    with pytest.raises(ValueError, match="need t0 < t1"):
        sample(f, X, DDIM(), path=LINEAR, t0=0.8, t1=0.2)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        sample(f, X, DDIM(), path=LINEAR, steps=0)
    with pytest.raises(ValueError, match="sigma_max=80 exceeds the largest noise level"):
        sample(f, X, EDM(sigma_max=80.0), path="ve")
    with pytest.raises(ValueError, match="works on a Gaussian path: pass sample"):
        sample(f, X, DDIM())
    with pytest.raises(ValueError, match="0 < sigma_min < sigma_max"):
        karras_sigmas(5, sigma_min=1.0, sigma_max=0.5)


def test_edm_rejects_infinite_noise_levels():
    """x / alpha and sigma = beta / alpha are infinite where alpha = 0 (t = 0 of the linear path), and a Karras grid
    needs finite levels: both raise a clear error instead of returning NaN (or samples of size ~1e9)."""
    f = GAUSS.field(LINEAR, "velocity")
    with pytest.raises(ValueError, match=r"ts\[0\]=0 .*alpha = 0"):
        sample(f, X, EDM(), path=LINEAR, ts=jnp.linspace(0.0, 1.0, 6))
    with pytest.raises(ValueError, match="finite"):
        sample(f, X, EDM(sigma_max=float("inf")), path=LINEAR)
    with pytest.raises(ValueError, match="finite"):
        karras_sigmas(4, sigma_max=float("inf"))
    with pytest.raises(ValueError, match="positive integer number of levels"):
        karras_sigmas(True)

