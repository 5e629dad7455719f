"""UniPC (jaxgen.samplers.unipc) against closed forms, DDIM / DPM-Solver++ and the mixture oracle.

Gaussian data N(M, diag(V)): the probability-flow ODE of every Gaussian path is affine per coordinate, with the
exact flow map x_t = alpha_t m + std_t (x_s - alpha_s m) / std_s, std_t^2 = alpha_t^2 v + beta_t^2. Convergence
orders are the slopes of log(max error) against log(steps). Each group of runs is compiled as one program
(compilation, not running, dominates the cost of these tests).
"""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from _fast_oracle import counting

from jaxgen.fields import PREDICTIONS, from_data_and_noise
from jaxgen.oracle import GaussianMixture
from jaxgen.paths import GaussianPath, log_snr
from jaxgen.samplers import DDIM, DPMSolverPP, UniPC, sample
from jaxgen.samplers.unipc import unipc_psi, unipc_weights

M, V = jnp.array([1.0, -0.5]), jnp.array([0.25, 2.0])
LINEAR, VP = GaussianPath.from_name("linear"), GaussianPath.from_name("vp")
X = jax.random.normal(jax.random.key(0), (16, 2))
VP_T1 = 1.0 - 1e-3     # finite log-SNR at both ends (lambda from -5.0 to 3.8), the papers' setting
LIN_T = (1e-3, 1.0 - 1e-3)  # the same on the linear path (lambda from -6.9 to 6.9)
MIX = GaussianMixture(jnp.array([[1.5, -0.5], [-1.0, 1.0]]),
                      jnp.array([[[0.3, 0.1], [0.1, 0.2]], [[0.2, -0.05], [-0.05, 0.4]]]), jnp.array([0.4, 0.6]))


def flow_map(path, x, t0, t1):
    """Exact probability-flow map of N(M, diag(V)) from t0 to t1."""
    c0, c1 = path.coefficients(jnp.float32(t0)), path.coefficients(jnp.float32(t1))
    s0, s1 = jnp.sqrt(c0.alpha**2 * V + c0.beta**2), jnp.sqrt(c1.alpha**2 * V + c1.beta**2)
    return c1.alpha * M + s1 * (x - c0.alpha * M) / s0


def gaussian_field(path, prediction, mean=M):
    """The exact field of N(mean, diag(V)) in closed form (posterior means E[z|x], E[eps|x] per coordinate)."""
    def field(x, t):
        c = path.coefficients(t)
        a, b = c.alpha[:, None], c.beta[:, None]
        r = (x - a * mean) / (a**2 * V + b**2)
        return from_data_and_noise(path, mean + a * V * r, b * r, t, prediction)
    return field


def vp_logsnr_grid(n, t1=VP_T1):
    """n steps uniform in lambda on the VP path from t=0 to t1, by the closed-form inverse of the VP log-SNR
    (alpha^2 = sigmoid(2 lambda), log alpha = -(b1 - b0) tau^2 / 4 - b0 tau / 2 with tau = 1 - t)."""
    with jax.ensure_compile_time_eval():
        lam = np.asarray(log_snr(VP, jnp.array([0.0, t1])), np.float64)
    log_alpha = -0.5 * np.log1p(np.exp(-2.0 * np.linspace(lam[0], lam[1], n + 1)))
    a, b = 0.25 * (20.0 - 0.1), 0.5 * 0.1
    ts = 1.0 - (-b + np.sqrt(b * b - 4 * a * log_alpha)) / (2 * a)
    ts[0], ts[-1] = 0.0, t1
    return jnp.asarray(ts, jnp.float32)


def _slope(steps, errs):
    return -np.polyfit(np.log(steps), np.log(errs), 1)[0]


# -- 1. measured convergence order ------------------------------------------------------------------------------

def _vp(order, **options):
    f = gaussian_field(VP, "eps")
    return lambda x, n: sample(f, x, UniPC(order=order, **options), path=VP, prediction="eps", ts=vp_logsnr_grid(n)).x


def _linear(order, t0=None, t1=None, **options):
    f = gaussian_field(LINEAR, "velocity")
    return lambda x, n: sample(f, x, UniPC(order=order, **options), path=LINEAR, steps=n, t0=t0, t1=t1).x


_LIN_FINITE = dict(t0=LIN_T[0], t1=LIN_T[1], spacing="logsnr", lower_order_final=False)
_VP_REF, _LIN_REF = flow_map(VP, X, 0.0, VP_T1), flow_map(LINEAR, X, *LIN_T)
STEPS = (16, 32, 64)
# name -> (sampler(x, n), reference, steps, (lowest, highest) accepted slope, largest accepted error at the most
# steps). Theory: UniP-p has order p and UniC-p raises it to p + 1; the warm-up step (UniP-1 + UniC-1, local
# error O(h^3)) caps UniPC-3 at 3 asymptotically (its constant is small when it starts at low SNR: measured ~3.3
# on VP); a DDIM step at an open end (alpha = 0 or beta = 0: the default [0, 1] of the linear path) caps every
# order at 2. Step counts are where each case is asymptotic and above float32 rounding (UniPC-3's error changes
# sign near 24-32 steps, which makes shorter ranges erratic).
CASES = {
    "unipc2_bh2_vp_eps": (_vp(2, lower_order_final=False), _VP_REF, STEPS, (2.6, 3.4), 2e-3),
    "unipc2_bh1_vp_eps": (_vp(2, variant="bh1", lower_order_final=False), _VP_REF, STEPS, (2.6, 3.4), 3e-3),
    "unipc3_bh2_vp_eps": (_vp(3, lower_order_final=False), _VP_REF, (32, 64, 128), (2.8, 4.2), 1e-5),
    "unip2_vp_eps": (_vp(2, corrector=False), _VP_REF, STEPS, (1.7, 2.3), 1e-2),  # predictor only = 2M
    "unipc2_bh2_linear_velocity": (_linear(2, **_LIN_FINITE), _LIN_REF, (32, 64, 128), (2.6, 3.4), 1e-3),
    "unipc3_bh2_linear_velocity": (_linear(3, t0=LIN_T[0], t1=LIN_T[1], lower_order_final=False), _LIN_REF,
                                   (40, 80, 160), (2.5, 3.4), 5e-3),  # uniform in t: long first steps in lambda
    "unipc2_bh2_linear_open_ends": (_linear(2), flow_map(LINEAR, X, 0.0, 1.0), (32, 64, 128), (1.7, 2.3), 1e-3),
}


@pytest.fixture(scope="module")
def convergence():
    ns = sorted({n for case in CASES.values() for n in case[2]})
    runs = {}
    for n in ns:  # one program per step count
        names = [name for name, case in CASES.items() if n in case[2]]
        outs = jax.jit(lambda x: [CASES[name][0](x, n) for name in names])(X)
        for name, out in zip(names, outs):
            runs[name, n] = float(jnp.max(jnp.abs(out - CASES[name][1])))
    result = {}
    for name, (_, _, steps, _, _) in CASES.items():
        errs = [runs[name, n] for n in steps]
        result[name] = (errs, _slope(steps, errs), dict(zip(steps, errs)))
        print(f"{name}: steps {steps} errors {['%.2e' % e for e in errs]} slope {result[name][1]:.2f}")
    return result


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_converges_at_its_order(convergence, name):
    errs, slope, _ = convergence[name]
    (lo, hi), largest = CASES[name][3:]
    assert lo <= slope <= hi, (name, errs, slope)
    assert errs[-1] < largest, (name, errs)


@pytest.mark.slow
def test_corrector_and_order_reduce_the_error(convergence):
    """At 64 steps on VP: UniPC-3 < UniPC-2 (bh2) < UniP-2 (no corrector: DPM-Solver++(2M)), by factors > 3."""
    e3, e2, p2 = (convergence[name][2][64] for name in ("unipc3_bh2_vp_eps", "unipc2_bh2_vp_eps", "unip2_vp_eps"))
    assert e3 * 3 < e2 and e2 * 3 < p2, (e3, e2, p2)


# -- coefficients -----------------------------------------------------------------------------------------------

def test_psi_matches_quadrature():
    """psi_n(h) = h^-n int_0^h e^-u (h - u)^n du on both branches (series below h = 1, recursion above)."""
    h = np.array([1e-4, 0.05, 0.5, 0.999, 1.0, 1.7, 6.0, 30.0])
    u = np.linspace(0.0, 1.0, 200001)[:, None] * h  # trapezoid rule in float64
    for n, got in enumerate(unipc_psi(jnp.asarray(h, jnp.float32), 3), start=1):
        integrand = np.exp(-u) * (h - u) ** n
        ref = np.sum((integrand[1:] + integrand[:-1]) / 2 * np.diff(u, axis=0), axis=0) / h**n
        np.testing.assert_allclose(got, ref, rtol=2e-6)


def test_uniform_small_steps_give_adams_bashforth_and_moulton():
    """On a uniform log-SNR grid with h -> 0 the UniP-3 weights tend to Adams-Bashforth-3 (23, -16, 5)/12 and
    the UniC-3 weights to Adams-Moulton-4 (9, 19, -5, 1)/24, in the form h [z_i + sum_k w_k (z_{i-k} - z_i)]."""
    h = 1e-3
    w = unipc_weights(np.arange(12) * h, order=3, lower_order_final=False)
    np.testing.assert_allclose(w["pred"][5] / h, [-16 / 12, 5 / 12], atol=2e-3)
    np.testing.assert_allclose(w["corr"][5] / h, [-5 / 24, 1 / 24], atol=2e-3)
    np.testing.assert_allclose(w["corr_new"][5] / h, 9 / 24, atol=2e-3)
    # warm-up and the final steps: orders 1, 2, 3, ..., 3, 2, 1 with lower_order_final
    w = unipc_weights(np.arange(8) * 0.1, order=3)
    used = np.asarray(w["pred"] != 0).sum(1) + 1
    np.testing.assert_array_equal(used, [1, 2, 3, 3, 3, 2, 1])  # 8 times, 7 steps
    assert float(w["corr_new"][-1]) == 0.0 and np.all(np.asarray(w["corr_new"][:-1]) > 0)


def test_traced_coefficients_match_the_float64_ones():
    """The in-program (float32 JAX) coefficients, used for a traced grid, equal the NumPy float64 ones, also
    with infinite log-SNR at both ends (step orders 1, 1, 2, 3, 3, 2, 1: no node at lambda = -inf)."""
    lam = np.r_[-np.inf, np.linspace(-4.0, 5.0, 6) ** 3 / 30.0, np.inf]
    ref = unipc_weights(lam, order=3)
    got = jax.jit(lambda l: unipc_weights(l, order=3))(jnp.asarray(lam, jnp.float32))
    for key in ref:
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-4, atol=1e-6, err_msg=key)
    np.testing.assert_array_equal(np.asarray(ref["pred"] != 0).sum(1) + 1, [1, 1, 2, 3, 3, 2, 1])


# -- 2. every parameterisation gives the same samples -----------------------------------------------------------

@pytest.mark.slow
def test_every_parameterisation_gives_the_same_samples():
    """UniPC-2 and -3 on the VP path's default grid (t from 0 to 1 - 1e-5), 10 steps, exact mixture fields."""
    x0 = jax.random.normal(jax.random.key(1), (32, 2))
    outs = jax.jit(lambda x0: [[sample(MIX.field(VP, p), x0, UniPC(order=o), path=VP, prediction=p, steps=10).x
                                for p in PREDICTIONS] for o in (2, 3)])(x0)
    for o, per_pred in zip((2, 3), outs):
        assert np.all(np.isfinite(np.asarray(per_pred[0])))
        assert float(jnp.abs(per_pred[0] - x0).max()) > 0.1
        for p, out in zip(PREDICTIONS[1:], per_pred[1:]):
            np.testing.assert_allclose(out, per_pred[0], atol=2e-5, err_msg=f"order {o}: {p} vs velocity")


# -- 3. exact NFE; UniP-1 is DDIM and UniP-2 (bh2) is DPM-Solver++(2M) -----------------------------------------



NFE_CASES = {  # name -> (sampler(field, x), steps)
    "order1": (lambda f, x: sample(f, x, UniPC(order=1), path=VP, steps=5, save_trajectory=True), 5),
    "order2_open_ends": (lambda f, x: sample(f, x, UniPC(), path=LINEAR, steps=6, save_trajectory=True), 6),
    "order3_no_lof": (lambda f, x: sample(f, x, UniPC(order=3, lower_order_final=False), path=VP, steps=7,
                                          save_trajectory=True), 7),
    "order3_one_step": (lambda f, x: sample(f, x, UniPC(order=3), path=LINEAR, steps=1, save_trajectory=True), 1),
    "order3_ts_bh1": (lambda f, x: sample(f, x, UniPC(order=3, variant="bh1"), path=LINEAR,
                                          ts=jnp.linspace(0.0, 1.0, 5)), 4),
}


@pytest.mark.slow
def test_reported_nfe_equals_steps_and_counted_evaluations():
    fields = {name: counting(lambda x, t: -0.5 * x) for name in NFE_CASES}
    x0 = jnp.ones((3, 2))
    results = jax.block_until_ready(jax.jit(
        lambda x: {name: NFE_CASES[name][0](fields[name][0], x) for name in NFE_CASES})(x0))
    jax.effects_barrier()
    for name, (_, steps) in NFE_CASES.items():
        res, count = results[name], fields[name][1][0]
        assert int(res.nfe) == count == steps, (name, res.nfe, count)
        assert res.ts.shape == (steps + 1,) and np.all(np.diff(np.asarray(res.ts)) > 0)
        assert np.all(np.isfinite(np.asarray(res.x)))
        if res.trajectory is not None:
            assert res.trajectory.shape == (steps + 1, 3, 2)
            np.testing.assert_array_equal(res.trajectory[0], x0)
            np.testing.assert_array_equal(res.trajectory[-1], res.x)


@pytest.mark.slow
def test_predictor_alone_is_ddim_and_dpm_solver_pp_2m():
    """Without the corrector, UniP-1 is DDIM and UniP-2 with B(h) = e^h - 1 is DPM-Solver++(2M) (same nodes and
    a_1 = 1/2), also across open ends; bh1 is a different method, and the corrector changes the result."""
    fl, fv = gaussian_field(LINEAR, "v"), gaussian_field(VP, "eps")

    @jax.jit
    def run(x):
        lin = dict(path=LINEAR, prediction="v", steps=6)
        vp = dict(path=VP, prediction="eps", steps=7)
        no_lof = dict(lower_order_final=False)
        return [(sample(fl, x, DDIM(), **lin).x, sample(fl, x, UniPC(order=1, corrector=False), **lin).x),
                (sample(fl, x, DPMSolverPP(), **lin).x, sample(fl, x, UniPC(corrector=False), **lin).x),
                (sample(fv, x, DPMSolverPP(**no_lof), **vp).x, sample(fv, x, UniPC(corrector=False, **no_lof), **vp).x),
                (sample(fv, x, DPMSolverPP(**no_lof), **vp).x,
                 sample(fv, x, UniPC(corrector=False, variant="bh1", **no_lof), **vp).x),
                (sample(fv, x, DPMSolverPP(**no_lof), **vp).x, sample(fv, x, UniPC(**no_lof), **vp).x)]

    (ddim_x, u1), (pp_lin, u2_lin), (pp_vp, u2_vp), (_, u2_bh1), (_, uc2) = run(X)
    np.testing.assert_allclose(u1, ddim_x, atol=1e-5)
    np.testing.assert_allclose(u2_lin, pp_lin, atol=1e-5)
    np.testing.assert_allclose(u2_vp, pp_vp, atol=1e-5)
    assert float(jnp.abs(u2_bh1 - pp_vp).max()) > 1e-2
    assert float(jnp.abs(uc2 - pp_vp).max()) > 1e-2


def test_open_ends_traced_grid_and_every_safe_prediction():
    """Open ends are detected from the grid's values: a ts traced under jit gives the same samples as a
    concrete one; data (x0) predictions are never decoded at beta = 0 (t = 1), velocity/v not at alpha = 0."""
    ts = jnp.linspace(0.0, 1.0, 9)

    @jax.jit
    def run(x, ts_traced):
        f = gaussian_field(LINEAR, "velocity")
        outs = [sample(f, x, UniPC(order=3), path=LINEAR, ts=ts).x,
                sample(f, x, UniPC(order=3), path=LINEAR, ts=ts_traced).x]
        outs += [sample(gaussian_field(LINEAR, p), x, UniPC(order=3), path=LINEAR, prediction=p, ts=ts).x
                 for p in ("data", "v")]
        return outs

    concrete, traced, data, v = run(X, ts)
    np.testing.assert_allclose(traced, concrete, atol=1e-6)
    for out in (data, v):
        np.testing.assert_allclose(out, concrete, atol=2e-5)
    assert float(jnp.abs(concrete - flow_map(LINEAR, X, 0.0, 1.0)).max()) < 0.05


# -- 4. few steps on a Gaussian mixture: UniPC-2 against DPM-Solver++(2M) at the same NFE -----------------------

FEW_STEPS = (5, 6, 7, 8, 9, 10)
FEW_SETTINGS = {  # name -> (path, prediction, grid keywords, spacing)
    "linear_velocity_time": (LINEAR, "velocity", {}, "time"),
    "vp_eps_logsnr": (VP, "eps", dict(t0=0.0, t1=VP_T1), "logsnr"),
}


@pytest.fixture(scope="module")
def few_step_errors():
    """RMS distance to a 1000-step DPM-Solver++(2M) solution (itself within ~2e-5 of UniPC-3 with 1000 steps)."""
    x0 = jax.random.normal(jax.random.key(7), (64, 2))
    out = {}
    for name, (path, pred, kw, spacing) in FEW_SETTINGS.items():
        f = MIX.field(path, pred)

        @jax.jit
        def errors(x):
            ref = sample(f, x, DPMSolverPP(spacing=spacing), path=path, prediction=pred, steps=1000, **kw).x
            rms = lambda y: jnp.sqrt(jnp.mean(jnp.sum((y - ref) ** 2, -1)))
            return {(s, n): rms(sample(f, x, solver, path=path, prediction=pred, steps=n, **kw).x)
                    for n in FEW_STEPS
                    for s, solver in (("dpm++2m", DPMSolverPP(spacing=spacing)), ("unipc2", UniPC(spacing=spacing)))}

        e = errors(x0)
        out[name] = {k: float(v) for k, v in e.items()}
        for s in ("dpm++2m", "unipc2"):
            print(f"{name} {s}: " + " ".join(f"{n}:{out[name][s, n]:.3e}" for n in FEW_STEPS))
    return out


@pytest.mark.slow
def test_unipc_beats_dpm_solver_pp_on_the_linear_path(few_step_errors):
    """Flow-matching default (linear path, velocity field, uniform times): UniPC-2 (bh2), which is
    DPM-Solver++(2M) plus the corrector, has a smaller error at every step count from 5 to 10 (measured: by
    15 % at 5 steps, 13 % at 6, 50 % at 10)."""
    e = few_step_errors["linear_velocity_time"]
    for n in FEW_STEPS:
        assert e["unipc2", n] < 0.95 * e["dpm++2m", n], (n, e["unipc2", n], e["dpm++2m", n])
    assert e["unipc2", 10] < 0.6 * e["dpm++2m", 10]


@pytest.mark.slow
def test_unipc_is_not_uniformly_better_on_vp_logsnr(few_step_errors):
    """VP with an eps field on a log-SNR grid (lambda from -5 to 3.8, steps of h = 1.8 to 0.9): UniPC-2 is
    better at 5, 8, 9, 10 steps (by 8 %, 4 %, 13 %, 22 %) but worse at 6 and 7 (by 5 % and 3 %): within 10 %
    everywhere, better by more than 15 % at 10 steps."""
    e = few_step_errors["vp_eps_logsnr"]
    for n in FEW_STEPS:
        assert e["unipc2", n] < 1.1 * e["dpm++2m", n], (n, e["unipc2", n], e["dpm++2m", n])
    assert e["unipc2", 10] < 0.85 * e["dpm++2m", 10]


# -- 5. gradients and bad input -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_gradient_through_the_sampler_matches_finite_differences():
    """d/ds of a loss of the samples, s shifting the mixture's means: UniPC-3 on VP (eps) and UniPC-2 across the
    open ends of the linear path (velocity)."""
    x0 = jax.random.normal(jax.random.key(3), (8, 2))

    def loss(s):
        gm = GaussianMixture(MIX.means + s * jnp.array([1.0, -0.5]), MIX.covs, MIX.weights)
        a = sample(gm.field(VP, "eps"), x0, UniPC(order=3), path=VP, prediction="eps", steps=8).x
        b = sample(gm.field(LINEAR), x0, UniPC(), path=LINEAR, steps=8).x
        return jnp.sum(a**2) + jnp.sum(jnp.sin(b))

    value_and_grad = jax.jit(jax.value_and_grad(loss))
    _, g = value_and_grad(0.1)
    eps = 1e-2
    fd = (value_and_grad(0.1 + eps)[0] - value_and_grad(0.1 - eps)[0]) / (2 * eps)
    assert np.isfinite(float(g)) and abs(float(g)) > 1.0
    np.testing.assert_allclose(float(g), float(fd), rtol=2e-3)


def test_bad_input_raises_clear_errors():
    f = gaussian_field(LINEAR, "velocity")
    with pytest.raises(ValueError, match="unknown UniPC variant 'bh3'; use 'bh1'"):
        sample(f, X, UniPC(variant="bh3"), path=LINEAR)
    for order in (0, 4, True, 2.0):
        with pytest.raises(ValueError, match=r"unipc order must be one of \(1, 2, 3\)"):
            sample(f, X, UniPC(order=order), path=LINEAR)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        sample(f, X, UniPC(), path=LINEAR, steps=0)
    with pytest.raises(ValueError, match="corrector must be True or False"):
        sample(f, X, UniPC(corrector="yes"), path=LINEAR)
    with pytest.raises(ValueError, match="lower_order_final must be True or False"):
        sample(f, X, UniPC(lower_order_final=None), path=LINEAR)
    with pytest.raises(ValueError, match="start later, e.g. t0=1e-3"):
        sample(gaussian_field(LINEAR, "eps"), X, UniPC(), path=LINEAR, prediction="eps")
    with pytest.raises(ValueError, match="spacing='logsnr' needs a finite log-SNR"):
        sample(f, X, UniPC(spacing="logsnr"), path=LINEAR)
    with pytest.raises(ValueError, match="strictly increasing"):
        sample(f, X, UniPC(), path=LINEAR, ts=jnp.array([1.0, 0.5, 0.0]))
    with pytest.raises(ValueError, match="unknown prediction type"):
        sample(f, X, UniPC(), path=LINEAR, prediction="velocityy")



GRID_01 = np.linspace(0.0, 1.0, 7, dtype=np.float32)  # linear path: alpha = 0 at t=0, beta = 0 at t=1


@pytest.mark.slow
def test_gradient_with_respect_to_a_grid_with_open_ends():
    """jax.grad of UniPC-2's samples with respect to a traced grid ts = linspace(0, 1, 7) of the linear path, whose
    ends have lambda = -inf (alpha = 0) and +inf (beta = 0): finite at every time; along random directions of the
    interior times (the ends stay at 0 and 1) equal to central differences, to 1 % of |grad| |direction| (the
    float32 differences are accurate to ~0.1 % of it); and with respect to the data end, where the last step is
    DDIM on either side (lower_order_final), equal to the one-sided difference: its weight 1 - e^{-h} is
    differentiated as 1 - alpha_s beta_t / (beta_s alpha_t) and beta_t = max(1 - t, 0) with slope -1 at t = 1
    (measured -19.2 against +11.3 before; 11.2596 against 11.2591 now). (The traced grid's samples are those of
    the grid known at trace time: test_open_ends_traced_grid_and_every_safe_prediction.)"""
    field = gaussian_field(LINEAR, "velocity")
    directions = jax.random.normal(jax.random.key(8), (3,) + GRID_01.shape).at[:, 0].set(0.0).at[:, -1].set(0.0)
    eps = 1e-3

    def loss(ts):
        return jnp.sum(sample(field, X, UniPC(), path=LINEAR, ts=ts).x)

    @jax.jit
    def run(ts):
        grids = jnp.concatenate([ts + eps * directions, ts - eps * directions, ts[None], ts.at[-1].add(-eps)[None]])
        losses = jax.vmap(loss)(grids)
        return jax.grad(loss)(ts), (losses[:3] - losses[3:6]) / (2 * eps), (losses[6] - losses[7]) / eps

    grad, central, one_sided = map(np.asarray, run(jnp.asarray(GRID_01)))
    assert np.all(np.isfinite(grad)), grad
    scale = np.linalg.norm(grad[1:-1]) * np.linalg.norm(np.asarray(directions), axis=1)
    assert np.all(np.abs(np.asarray(directions) @ grad - central) < 1e-2 * scale), (directions @ grad, central)
    np.testing.assert_allclose(grad[-1], one_sided, rtol=1e-2)
