"""Score SDEs against score_sde's formulas, jaxgen's paths and the oracle; PC sampling reproduces a mixture."""

import math

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from jaxgen import fields, metrics
from jaxgen.paths import DDPMSchedule
from jaxgen.oracle import GaussianMixture
from jaxgen.fields import probability_flow_velocity, reverse_diffusion, reverse_drift
from jaxgen.paths import SDE, VESDE, VPSDE, SubVPSDE
from jaxgen.samplers import EulerMaruyama, PredictorCorrector, pc_nfe, sample


# jitted once: eagerly, its blockwise lax.map recompiles at every call
energy_distance = jax.jit(metrics.energy_distance)


def normal(seed, shape):
    """Standard normal test inputs from numpy (no per-shape compilation of JAX's sampler)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


GM = GaussianMixture.isotropic(jnp.array([[-1.0, 0.5], [1.5, -0.5], [0.0, 2.0]]), jnp.array([0.3, 0.5, 0.4]),
                               jnp.array([0.3, 0.3, 0.4]))
from _fast_oracle import fast_score  # noqa: E402  (tests/ is on sys.path under pytest)

SDES = {"vp": VPSDE(), "sub_vp": SubVPSDE(), "ve": VESDE()}
TAUS = np.array([0.0, 1e-3, 0.1, 0.37, 0.5, 0.9, 1.0])
N = 1000  # samples for the distribution checks




@pytest.fixture(scope="module")
def reference():
    """Mixture samples, and the largest energy distance between independent sets of the same size (the floor)."""
    ref = GM.sample(jax.random.key(7), N)
    floors = [abs(float(energy_distance(GM.sample(jax.random.key(100 + s), N),
                                                GM.sample(jax.random.key(200 + s), N)))) for s in range(3)]
    return ref, max(3 * max(floors), 3e-3)


# -- marginals, coefficients and discretisations against score_sde's formulas ---------------------

def _score_sde_marginal(name, tau):
    """score_sde's sde_lib.marginal_prob coefficients, in float64."""
    if name == "ve":
        return np.ones_like(tau), 0.01 * (50.0 / 0.01) ** tau
    log_m = -0.25 * tau**2 * (20.0 - 0.1) - 0.5 * tau * 0.1
    m = np.exp(log_m)
    return m, (np.sqrt(1 - np.exp(2 * log_m)) if name == "vp" else 1 - np.exp(2 * log_m))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vp", "sub_vp", "ve"])
def test_marginal_prob_reproduces_score_sde_and_jaxgen_path(name):
    sde = SDES[name]
    x0 = normal(0, (TAUS.size, 3))
    mean, std = sde.marginal_prob(x0, jnp.asarray(TAUS, jnp.float32))
    m_ref, s_ref = _score_sde_marginal(name, TAUS)
    np.testing.assert_allclose(mean, m_ref[:, None] * np.asarray(x0), rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(std, s_ref, rtol=2e-5, atol=1e-7)
    # the matching jaxgen path, at t = 1 - tau (inside its domain t <= 1 - 1e-5)
    t = np.minimum(1.0 - TAUS, sde.path.schedule.t_max).astype(np.float32)
    c = sde.path.coefficients(jnp.asarray(t))
    m_t, s_t = _score_sde_marginal(name, 1.0 - t.astype(np.float64))  # the float32 times actually used
    np.testing.assert_allclose(c.alpha, m_t, rtol=2e-5)
    np.testing.assert_allclose(c.beta, s_t, rtol=2e-5, atol=1e-7)


def test_known_numbers():
    """VP at tau=1: mean coefficient exp(-1/4 19.9 - 1/2 0.1) = e^{-5.025}; VE at tau=0.5: sqrt(0.01 * 50)."""
    m, s = SDES["vp"].marginal_coeffs(jnp.array(1.0))
    np.testing.assert_allclose(m, math.exp(-5.025), rtol=1e-6)
    np.testing.assert_allclose(s, math.sqrt(1 - math.exp(-10.05)), rtol=1e-6)
    np.testing.assert_allclose(SDES["ve"].marginal_coeffs(jnp.array(0.5))[1], math.sqrt(0.5), rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vp", "sub_vp", "ve"])
def test_drift_and_diffusion_generate_the_marginals(name):
    """For dx = c x d tau + g dW the kernel N(m x0, v) has dm/dtau = c m and dv/dtau = 2 c v + g^2 (the moment
    equations of a linear SDE)."""
    sde = SDES[name]
    tau = jnp.linspace(0.05, 0.95, 10)
    (m, s), (dm, ds) = jax.jvp(sde.marginal_coeffs, (tau,), (jnp.ones_like(tau),))
    c, g = sde.drift_coeff(tau), sde.diffusion(tau)
    np.testing.assert_allclose(dm, c * m, rtol=1e-4, atol=1e-7)
    # float32: sub-VP's variance derivative cancels terms (measured 3.7e-6 off at tau=0.85 on jax 0.12)
    np.testing.assert_allclose(2 * s * ds, 2 * c * s**2 + g**2, rtol=1e-4, atol=1e-5)
    # sde() returns f = c x and g
    x = normal(1, (10, 2))
    f, gg = sde.sde(x, tau)
    np.testing.assert_allclose(f, c[:, None] * x, rtol=1e-6)
    np.testing.assert_allclose(gg, g, rtol=1e-6)


def test_vp_discretisation_is_ddpm():
    sde = VPSDE()
    np.testing.assert_allclose(sde.discrete_betas, DDPMSchedule.linear(1000).betas, rtol=1e-12)
    np.testing.assert_allclose(sde.discrete_betas, np.linspace(1e-4, 0.02, 1000), rtol=1e-12)
    # Song et al.'s DDPM betas beta_i = beta_min/N + i (beta_max - beta_min)/(N(N-1)), i = 0..N-1, and score_sde's
    # alphas_cumprod (its discretely trained models' std is sqrt(1 - alphas_cumprod[int(tau (N - 1))]))
    for n_steps in (1000, 50):
        i = np.arange(n_steps)
        betas = 0.1 / n_steps + i * (20 - 0.1) / (n_steps * (n_steps - 1))
        np.testing.assert_allclose(VPSDE(N=n_steps).discrete_betas, betas, rtol=1e-12)
        np.testing.assert_allclose(VPSDE(N=n_steps).alphas_cumprod, np.cumprod(1 - betas), rtol=1e-12)
    x = normal(2, (4, 3))
    tau = jnp.array([0.0, 0.25, 0.5, 1.0])
    f, G = sde.discretize(x, tau)
    i = np.array([0, 249, 499, 999])  # int(tau * 999)
    beta = np.linspace(1e-4, 0.02, 1000)[i]
    np.testing.assert_allclose(f, (np.sqrt(1 - beta) - 1)[:, None] * np.asarray(x), rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(G, np.sqrt(beta), rtol=1e-6)
    # N steps of the DDPM chain x <- x + f + G z reproduce abar of the linear schedule: prod(1 - beta) = 4.036e-5
    np.testing.assert_allclose(np.prod(1 - sde.discrete_betas), 4.0358e-5, rtol=1e-4)


def test_ve_and_sub_vp_discretisations():
    sde = VESDE()
    sig = np.exp(np.linspace(np.log(0.01), np.log(50.0), 1000))
    np.testing.assert_allclose(sde.discrete_sigmas, sig, rtol=1e-12)
    x = jnp.ones((3, 2))
    f, G = sde.discretize(x, jnp.array([0.0, 0.5, 1.0]))
    assert float(jnp.abs(f).max()) == 0.0
    expected = [sig[0], np.sqrt(sig[499] ** 2 - sig[498] ** 2), np.sqrt(sig[999] ** 2 - sig[998] ** 2)]
    np.testing.assert_allclose(G, expected, rtol=1e-5)
    # sub-VP: score_sde's default Euler-Maruyama discretisation f dt, g sqrt(dt)
    sub = SubVPSDE()
    tau = jnp.array([0.1, 0.5, 0.9])
    f, G = sub.discretize(x, tau)
    f_ref, g_ref = sub.sde(x, tau)
    np.testing.assert_allclose(f, f_ref / 1000, rtol=1e-6)
    np.testing.assert_allclose(G, g_ref / math.sqrt(1000), rtol=1e-6)


@pytest.mark.parametrize("name", ["vp", "ve"])
def test_prior(name):
    sde = SDES[name]
    z = sde.prior_sampling(jax.random.key(3), (20000, 2))
    sd = 1.0 if name == "vp" else 50.0
    np.testing.assert_allclose(np.std(np.asarray(z)), sd, rtol=0.02)
    zz = jnp.array([[0.3, -1.2], [2.0, 0.0]])
    ref = -np.log(2 * np.pi * sd**2) - 0.5 * np.sum(np.asarray(zz) ** 2, -1) / sd**2
    np.testing.assert_allclose(sde.prior_logp(zz), ref, rtol=1e-6)
    # the same density as the path's prior
    # (the VP path's beta_0 = sqrt(1 - e^{-10.05}) differs from score_sde's unit prior std by 2e-5)
    np.testing.assert_allclose(sde.prior_logp(zz), sde.path.prior_log_prob(zz), rtol=1e-4)


# -- reverse SDE and probability-flow ODE in jaxgen time ------------------------------------------

@pytest.mark.parametrize("name", ["vp", "ve"])  # (sub-VP: its reverse SDE is sampled below)
def test_reverse_time_drifts_are_jaxgen_fields(name):
    """In jaxgen time t = 1 - tau, with the oracle score s of the matching path:

    * the PF-ODE velocity -[f - g^2/2 s] equals fields.convert(path, s, source='score', target='velocity') and the
      oracle's marginal velocity, for a score or an eps parameterisation;
    * the reverse-SDE drift -[f - g^2 s] equals u + g^2/2 s, jaxgen's SDE extension with sigma_t = g(1 - t)
      (notes eq. 3.3.2), i.e. sample_sde's drift;
    * (test helper) fast_score equals the oracle's score.
    """
    sde = SDES[name]
    path = sde.path
    x = 2.0 * normal(4, (64, 2))
    t = jnp.linspace(0.02, 0.98, 64)

    @jax.jit
    def drifts(x, t):
        s = GM.marginal_score(path, x, t)
        return (probability_flow_velocity(sde, GM.score_field(path))(x, t),
                fields.convert(path, s, x, t, source="score", target="velocity"),
                GM.marginal_velocity(path, x, t),
                probability_flow_velocity(sde, GM.field(path, "eps"), prediction="eps")(x, t),
                reverse_drift(sde, GM.score_field(path))(x, t),
                fields.sde_drift_field(path, GM.score_field(path), reverse_diffusion(sde), prediction="score")(x, t),
                s, fast_score(GM, path)(x, t))

    u_pf, u_conv, u_oracle, u_eps, d_rev, d_ext, s, s_fast = drifts(x, t)
    scale = float(jnp.abs(u_conv).max())
    np.testing.assert_allclose(u_pf, u_conv, rtol=2e-4, atol=2e-4 * scale)
    np.testing.assert_allclose(u_pf, u_oracle, rtol=2e-4, atol=2e-4 * scale)
    np.testing.assert_allclose(u_eps, u_pf, rtol=1e-3, atol=1e-3 * scale)
    np.testing.assert_allclose(d_rev, d_ext, rtol=2e-4, atol=2e-4 * float(jnp.abs(d_rev).max()))
    assert float(jnp.abs(d_rev - u_pf).max()) > 0.1 * scale  # the reverse SDE is not the ODE
    np.testing.assert_allclose(s_fast, s, rtol=1e-4, atol=1e-4 * float(jnp.abs(s).max()))
    np.testing.assert_allclose(reverse_diffusion(sde)(t), sde.diffusion(1.0 - t), rtol=1e-6)
    assert float(jnp.abs(reverse_diffusion(sde, probability_flow=True)(t)).max()) == 0.0


def test_reverse_sde_euler_maruyama_reproduces_mixture(reference):
    """The sub-VP reverse SDE, integrated with jaxgen's Euler-Maruyama in t on [0, 1 - 1e-3] (1000 steps)."""
    ref, bound = reference
    sde = SDES["sub_vp"]
    x0 = sde.prior_sampling(jax.random.key(1), (N, 2))
    ts = jnp.linspace(0.0, 1.0 - 1e-3, 1001)
    res = sample(reverse_drift(sde, fast_score(GM, sde.path)), x0, EulerMaruyama(reverse_diffusion(sde), drift="field"),
                 key=jax.random.key(2), ts=ts)
    assert res.nfe == 1000
    ed = float(energy_distance(res.x, ref))
    assert ed < bound, (ed, bound)


# -- predictor-corrector sampling -----------------------------------------------------------------

def _score_sde_update(name, predictor, corrector, x, z, tau, n_steps, snr):
    """One step of score_sde's sampling.py, written out in float64 for the score s(x) = -1.7 x: the Langevin corrector
    (step 2 alpha_i (snr mean||z|| / mean||s||)^2, alpha_i = 1 - beta_i for VP / sub-VP, i = int(tau (N - 1))), or
    the reverse-diffusion predictor (x - f + G^2 s + G z from the DDPM / SMLD discretisation), or Euler-Maruyama."""
    s = -1.7 * x
    i = int(np.float32(tau) * np.float32(n_steps - 1))
    beta_i = 0.1 / n_steps + i * (20 - 0.1) / (n_steps * (n_steps - 1))
    if corrector == "langevin":
        alpha = 1.0 if name == "ve" else 1.0 - beta_i
        e = 2 * alpha * (snr * np.linalg.norm(z, axis=1).mean() / np.linalg.norm(s, axis=1).mean()) ** 2
        return x + e * s + np.sqrt(2 * e) * z
    if predictor == "reverse_diffusion" and name == "vp":
        f, G = (np.sqrt(1 - beta_i) - 1) * x, np.sqrt(beta_i)
    elif predictor == "reverse_diffusion" and name == "ve":
        sig = np.exp(np.linspace(np.log(0.01), np.log(50.0), n_steps))
        f, G = 0 * x, np.sqrt(sig[i] ** 2 - (sig[i - 1] ** 2 if i > 0 else 0.0))
    else:  # Euler-Maruyama with dt = 1/N (sub-VP: discount 1 - exp(-2 int_0^tau beta))
        tau = float(np.float32(tau))
        if name == "ve":
            c, g = 0.0, 0.01 * (50 / 0.01) ** tau * np.sqrt(2 * np.log(50 / 0.01))
        else:
            b = 0.1 + tau * (20 - 0.1)
            c, g = -0.5 * b, np.sqrt(b * (1 - np.exp(-2 * 0.1 * tau - (20 - 0.1) * tau**2)))
        f, G = c * x / n_steps, g / np.sqrt(n_steps)
    return x - f + G**2 * s + G * z


@pytest.mark.parametrize("name,predictor,corrector", [("vp", "reverse_diffusion", "none"), ("ve", "reverse_diffusion", "none"),
                                                      ("vp", "none", "langevin"), ("sub_vp", "none", "langevin"),
                                                      ("ve", "none", "langevin"), ("sub_vp", "euler_maruyama", "none")])
@pytest.mark.slow
def test_pc_steps_are_score_sde_updates(name, predictor, corrector):
    """Every transition of a 25-step pc_sample equals score_sde's update at tau_i = linspace(1, 1e-3, 25)[i], with the
    documented noise fold_in(fold_in(key, i), 1) (corrector) / fold_in(fold_in(key, i), 0) (predictor)."""
    sde, n_steps, snr = SDES[name], 25, 0.16
    key = jax.random.key(42)
    x0 = 2.0 * normal(9, (6, 3))
    pc = PredictorCorrector(sde=sde, predictor=predictor, corrector=corrector, snr=snr, denoise=False)
    res = sample(lambda x, t: -1.7 * x, x0, pc, key=key, prediction="score", steps=n_steps, save_trajectory=True)
    traj = np.asarray(res.trajectory, np.float64)
    assert np.all(np.isfinite(traj)) and res.nfe == n_steps
    taus = np.linspace(1.0, 1e-3, n_steps)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(key, i), int(corrector == "langevin")))(
        jnp.arange(n_steps))
    zs = np.asarray(jax.vmap(lambda k: jax.random.normal(k, x0.shape, jnp.float32))(keys), np.float64)
    for i in range(n_steps):
        ref = _score_sde_update(name, predictor, corrector, traj[i], zs[i], taus[i], n_steps, snr)
        np.testing.assert_allclose(traj[i + 1], ref, rtol=2e-5, atol=2e-5 * (1 + np.abs(ref).max()))


PC_CASES = [
    pytest.param("vp", "reverse_diffusion", "langevin", 1, False, marks=pytest.mark.slow),  # ve's below: fast tier
    ("vp", "euler_maruyama", "none", 1, False),
    ("ve", "reverse_diffusion", "langevin", 1, False),
    ("ve", "reverse_diffusion", "none", 1, True),     # probability-flow predictor
]


def _pc_run(name, predictor, corrector, k, pf):
    sde = SDES[name]

    @jax.jit
    def run(gm, key):
        x0 = sde.prior_sampling(jax.random.key(1), (N, 2))
        pc = PredictorCorrector(sde=sde, predictor=predictor, corrector=corrector, corrector_steps=k, probability_flow=pf)
        return sample(fast_score(gm, sde.path), x0, pc, key=key, prediction="score").x

    return run, pc_nfe(sde.N, predictor, corrector, k)


@pytest.mark.parametrize("name,predictor,corrector,k,pf", PC_CASES)
def test_pc_sampling_reproduces_mixture(reference, name, predictor, corrector, k, pf):
    ref, bound = reference
    run, nfe = _pc_run(name, predictor, corrector, k, pf)
    assert nfe == 1000 * ((predictor != "none") + k * (corrector != "none"))
    ed = float(energy_distance(run(GM, jax.random.key(3)), ref))
    assert ed < bound, (name, predictor, corrector, ed, bound)
    if (name, corrector) == ("ve", "langevin") and predictor != "none":
        # negative control: the same sampler with the score of the mixture shifted by 0.25 lands measurably off
        shifted = GaussianMixture(GM.means + 0.25, GM.covs, GM.weights)
        ed_bad = float(energy_distance(run(shifted, jax.random.key(3)), ref))
        assert ed_bad > 3 * bound, (ed_bad, bound)


def _counting(field):
    count = [0]

    def f(x, t):
        jax.debug.callback(lambda: count.__setitem__(0, count[0] + 1))
        return field(x, t)

    return f, count


@pytest.mark.parametrize("name,predictor,corrector,k", [("vp", "euler_maruyama", "none", 1), ("ve", "none", "langevin", 2)])
def test_pc_nfe_equals_counted_evaluations(name, predictor, corrector, k):
    sde = SDES[name]
    f, count = _counting(fast_score(GM, sde.path))
    pc = PredictorCorrector(sde=sde, predictor=predictor, corrector=corrector, corrector_steps=k)
    res = sample(f, jnp.ones((4, 2)), pc, key=jax.random.key(0), prediction="score", steps=7, save_trajectory=True)
    jax.block_until_ready(res.x)
    jax.effects_barrier()
    assert bool(jnp.all(jnp.isfinite(res.trajectory)))
    assert res.nfe == count[0] == pc_nfe(7, predictor, corrector, k) > 0
    assert res.trajectory.shape == (8, 4, 2) and res.ts.shape == (8,)
    np.testing.assert_allclose(np.asarray(res.ts)[[0, -1]], [0.0, 1.0])
    # score_sde reports N (n_steps + 1) whatever the predictor/corrector: 14 and 21 here, not 7 and 14
    assert 7 * (k + 1) != count[0]


def test_pc_denoise_returns_the_noise_free_last_update():
    """Denoising = the last predictor step without noise: the result differs from the noisy state by G_last z only."""
    sde = SDES["vp"]
    x0 = sde.prior_sampling(jax.random.key(1), (256, 2))
    kw = dict(sde=sde, corrector="none", predictor="reverse_diffusion")
    run = lambda x0, key, denoise: sample(fast_score(GM, sde.path), x0, PredictorCorrector(denoise=denoise, **kw),
                                          key=key, prediction="score", steps=50).x
    a, b = jax.jit(lambda x0, key: (run(x0, key, True), run(x0, key, False)))(x0, jax.random.key(3))
    # last step at tau = 1e-3: index int(1e-3 * 49) = 0, G = sqrt(beta_0) with beta_0 = 0.1 / 50
    sd = float(jnp.std(b - a))
    np.testing.assert_allclose(sd, math.sqrt(0.1 / 50), rtol=0.1)


def test_bad_arguments_raise():
    f = GM.score_field(SDES["vp"].path)
    x = jnp.ones((4, 2))
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="unknown predictor"):
        sample(f, x, PredictorCorrector(sde=SDES["vp"], predictor="ancestral"), key=key, prediction="score")
    with pytest.raises(ValueError, match="unknown corrector"):
        sample(f, x, PredictorCorrector(sde=SDES["vp"], corrector="ald"), key=key, prediction="score")
    with pytest.raises(ValueError, match="unchanged"):
        PredictorCorrector(sde=SDES["vp"], predictor="none", corrector="none")
    with pytest.raises(ValueError, match="t_eps"):
        sample(f, x, PredictorCorrector(sde=SDES["vp"], t_eps=0.0), key=key, prediction="score")
    with pytest.raises(ValueError, match="steps"):
        sample(f, x, PredictorCorrector(sde=SDES["vp"]), key=key, prediction="score", steps=0)
    with pytest.raises(ValueError, match="must be a jaxgen.paths.SDE"):
        PredictorCorrector(sde="vq")
    with pytest.raises(ValueError, match="score_sde's grid"):
        sample(f, x, PredictorCorrector(sde="vp"), key=key, prediction="score", t0=0.1)
    with pytest.raises(ValueError, match="tau must lie in"):
        SDES["vp"].marginal_prob(x, 1.5)
    with pytest.raises(ValueError, match="sigma_min < sigma_max"):
        VESDE(sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="beta_min < beta_max"):
        VPSDE(beta_min=1.0, beta_max=0.5)
    with pytest.raises(ValueError, match="positive int"):
        VPSDE(N=0)
    # 7 DDPM steps of beta(tau) up to 20 would need beta_i = 20/7 > 1: NaN samples, so a clear error instead
    for sde, kw in ((SDES["vp"], dict(predictor="reverse_diffusion", corrector="none")),
                    (SDES["sub_vp"], dict(predictor="none", corrector="langevin"))):
        with pytest.raises(ValueError, match="beta_max/N"):
            sample(f, x, PredictorCorrector(sde=sde, **kw), key=key, prediction="score", steps=7)
    assert isinstance(SDES["vp"], SDE)
