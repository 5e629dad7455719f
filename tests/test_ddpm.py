"""Discrete DDPM: schedules against their formulas, sampling with the oracle, and the variational bound against
the exact NLL of Gaussian data (the gap has a closed form there, see ``analytic_gap``)."""

import math

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from scipy import special, stats

from jaxgen import fields, metrics
from jaxgen.likelihood import (ddpm_elbo, diffusion_kl_term, diffusion_kl_term_eps, diffusion_kl_term_snr,
                               discretized_gaussian_log_likelihood)
from jaxgen.paths import DDPMSchedule, cosine_betas, linear_betas
from jaxgen.samplers import DDPMAncestral, sample
from jaxgen.fields import to_data_and_noise
from jaxgen.oracle import GaussianMixture

from _fast_oracle import fast_score  # tests/ is on sys.path under pytest


# jitted once: eagerly, its blockwise lax.map recompiles at every call
energy_distance = jax.jit(metrics.energy_distance)


def normal(seed, shape):
    """Standard normal test inputs from numpy (no per-shape compilation of JAX's sampler)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


LINEAR = DDPMSchedule.linear()            # Ho et al.: T = 1000, beta 1e-4 .. 0.02
LINEAR100 = DDPMSchedule.linear(100, rescale=True)
COSINE = DDPMSchedule.cosine()

# 2-D Gaussian data with a full covariance: every quantity of the bound is analytic.
MU = np.array([0.3, -0.2])
COV = np.array([[0.3, 0.1], [0.1, 0.5]])
GAUSS = GaussianMixture(jnp.asarray(MU[None], jnp.float32), jnp.asarray(COV[None], jnp.float32), jnp.ones(1))
LAM, Q = np.linalg.eigh(COV)
MIX = GaussianMixture.isotropic(jnp.array([[-1.0, 0.5], [1.5, -0.5], [0.0, 2.0]]), jnp.array([0.3, 0.5, 0.4]),
                                jnp.array([0.3, 0.3, 0.4]))


def gauss_eps(path):
    """The oracle noise prediction E[eps | x_t] = beta C^{-1} (x - alpha mu), C = alpha^2 Sigma + beta^2 I, through the
    eigendecomposition of Sigma (no per-sample factorisation; checked equal to GaussianMixture.marginal_eps)."""
    mu, q, lam = (jnp.asarray(v, jnp.float32) for v in (MU, Q, LAM))

    def eps(x, t, **_):
        c = path.coefficients(t)
        a, b = c.alpha[:, None], c.beta[:, None]
        return b * (((x - a * mu) @ q) / (a**2 * lam + b**2)) @ q.T

    return eps


def mixture_eps(gm, path):
    """The oracle noise prediction of an isotropic mixture, E[eps | x] = -beta * score (checked equal to
    GaussianMixture.marginal_eps), from the cheap score shared with tests/test_score_sde.py."""
    score = fast_score(gm, path)

    def eps(x, t, **_):
        return -path.coefficients(t).beta[:, None] * score(x, t)

    return eps


def analytic_gap(sched, variance):
    r"""E_{x0 ~ N(mu, Sigma)}[-ELBO(x0) + log p(x0)] = KL(q(x_{0:T}) || p(x_{0:T})) for the oracle model.

    With the exact posterior mean the model's reverse mean is E[x_{n-1} | x_n], so only the variances differ. In an
    eigendirection of Sigma (eigenvalue lam), V_n = abar_n lam + 1 - abar_n and
    Var(x_{n-1} | x_n) = beta_n V_{n-1} / V_n
    (n = 1 is the decoder, V_0 = lam); each step adds 1/2 (r - 1 - log r), r = Var / sigma_n^2, and L_T adds
    KL(N(sqrt(abar_T) mu, abar_T Sigma + (1 - abar_T) I) || N(0, I)).
    """
    abar, abar_prev = sched.alphas_cumprod, sched.alphas_cumprod_prev
    v_n = abar[:, None] * LAM + 1 - abar[:, None]
    v_prev = abar_prev[:, None] * LAM + 1 - abar_prev[:, None]
    r = sched.betas[:, None] * v_prev / v_n / sched.model_variance(variance)[:, None]
    a_T = abar[-1]
    c = a_T * COV + (1 - a_T) * np.eye(2)
    prior = 0.5 * (np.trace(c) + a_T * MU @ MU - 2 - np.linalg.slogdet(c)[1])
    return 0.5 * np.sum(r - 1 - np.log(r)) + prior


# -- schedules ---------------------------------------------------------------------------------

def test_linear_schedule_values():
    betas = np.linspace(1e-4, 0.02, 1000)
    np.testing.assert_allclose(LINEAR.betas, betas, rtol=1e-12)
    np.testing.assert_allclose(LINEAR.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-12)
    np.testing.assert_allclose(LINEAR.alphas_cumprod[-1], 4.0358e-5, rtol=1e-4)  # the known abar_T of Ho et al.
    np.testing.assert_allclose(LINEAR.alphas_cumprod[0], 0.9999, rtol=1e-12)
    # improved DDPM's rescaling = score_sde's VP discretisation beta_i = beta_min/N + i (beta_max - beta_min)/(N(N-1))
    i = np.arange(100)
    np.testing.assert_allclose(LINEAR100.betas, 0.1 / 100 + i * (20 - 0.1) / (100 * 99), rtol=1e-12)
    np.testing.assert_allclose(linear_betas(1000, rescale=True), betas, rtol=1e-12)


def test_cosine_schedule_formula():
    T, s = 1000, 0.008
    f = lambda n: np.cos((n / T + s) / (1 + s) * np.pi / 2) ** 2  # noqa: E731
    n = np.arange(1, T)
    # below the clipping (beta <= 0.999, active only at n = T) abar_n = f(n) / f(0) (Nichol & Dhariwal eq. 17)
    np.testing.assert_allclose(COSINE.alphas_cumprod[:-1], f(n) / f(0), rtol=1e-9)
    np.testing.assert_allclose(COSINE.betas[-1], 0.999)
    np.testing.assert_allclose(COSINE.alphas_cumprod[-1], f(T - 1) / f(0) * (1 - 0.999), rtol=1e-9)  # the clipped step
    assert np.all(cosine_betas(T) <= 0.999) and np.all(np.diff(COSINE.betas) > 0)


@pytest.mark.parametrize("sched", [LINEAR, COSINE, LINEAR.respace(37)], ids=["linear", "cosine", "respaced"])
def test_q_posterior_is_gaussian_conditioning(sched):
    """q(x_{n-1} | x_n, x_0) from the joint Gaussian: Cov(x_{n-1}, x_n | x_0) = sqrt(alpha_n) (1 - abar_{n-1})."""
    n = np.array([1, 2, 3, sched.T // 2, sched.T])
    x0 = normal(0, (5, 3))
    xn = normal(1, (5, 3))
    mean, var = sched.q_posterior(x0, xn, jnp.asarray(n))
    ab, abp, al = sched.alphas_cumprod[n - 1], sched.alphas_cumprod_prev[n - 1], sched.alphas[n - 1]
    cov = np.sqrt(al) * (1 - abp)
    ref_mean = (np.sqrt(abp)[:, None] * np.asarray(x0)
                + (cov / (1 - ab))[:, None] * (np.asarray(xn) - np.sqrt(ab)[:, None] * np.asarray(x0)))
    ref_var = (1 - abp) - cov**2 / (1 - ab)
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var, ref_var, rtol=1e-4, atol=1e-9)


def test_q_sample_moments():
    n = 300
    x0 = jnp.tile(jnp.array([[1.5, -0.5]]), (40000, 1))
    xn = LINEAR.q_sample(x0, n, normal(2, x0.shape))
    a, s = math.sqrt(LINEAR.alphas_cumprod[n - 1]), math.sqrt(1 - LINEAR.alphas_cumprod[n - 1])
    se = s / math.sqrt(x0.shape[0])
    np.testing.assert_allclose(xn.mean(0), a * np.array([1.5, -0.5]), atol=4 * se)
    np.testing.assert_allclose(xn.std(0), s, rtol=0.02)
    np.testing.assert_allclose(LINEAR.q_sample(x0[:2], 0, jnp.ones((2, 2))), x0[:2])  # n = 0 is the data


@pytest.mark.slow
@pytest.mark.parametrize("sched", [LINEAR, COSINE], ids=["linear", "cosine"])
def test_path_goes_through_every_step(sched):
    """alpha_{t_n} = sqrt(abar_n), beta_{t_n} = sqrt(1 - abar_n) at t_n = 1 - n_orig / T_orig."""
    path = sched.path()
    k = np.arange(1, sched.T + 1)
    t = sched.time_of_step(jnp.asarray(k))
    np.testing.assert_allclose(t, 1 - sched.timesteps / sched.num_original_steps, rtol=1e-6, atol=1e-7)
    c = path.coefficients(t)
    np.testing.assert_allclose(c.alpha, np.sqrt(sched.alphas_cumprod), rtol=2e-5)
    np.testing.assert_allclose(c.beta, np.sqrt(1 - sched.alphas_cumprod), rtol=2e-5)
    assert path.schedule.t_min == 0.0 and path.schedule.t_max == 1 - sched.timesteps[0] / sched.num_original_steps


def test_respacing_keeps_alphas_cumprod():
    r = LINEAR.respace(100)
    assert r.T == 100 and r.timesteps[0] == 1 and r.timesteps[-1] == 1000
    np.testing.assert_allclose(r.alphas_cumprod, LINEAR.alphas_cumprod[r.timesteps - 1], rtol=1e-10)
    np.testing.assert_allclose(r.betas[0], LINEAR.betas[0])
    assert LINEAR.respace(1000) is LINEAR


def _space_timesteps(T, K):
    """improved-diffusion's respace.space_timesteps(T, [K]) for one section, written out: 0-based indices."""
    stride, cur, taken = (T - 1) / (K - 1), 0.0, []
    for _ in range(K):
        taken.append(round(cur))
        cur += stride
    return np.array(taken)


@pytest.mark.parametrize("sched", [LINEAR, COSINE], ids=["linear", "cosine"])
def test_respacing_reproduces_improved_diffusion(sched):
    """The kept steps are improved-diffusion's (its running float sum keeps index 499, not round(499.5) = 500, for
    K = 21), and the new betas are 1 - abar_t / abar_t' over consecutive kept steps (Nichol & Dhariwal sec. 4)."""
    assert 500 in LINEAR.respace(21).timesteps
    abar = np.cumprod(1 - sched.betas)
    for K in (21, 37, 50, 250):
        r = sched.respace(K)
        idx = _space_timesteps(1000, K)
        np.testing.assert_array_equal(r.timesteps, idx + 1)
        prev = np.concatenate([[1.0], abar[idx][:-1]])
        np.testing.assert_allclose(r.betas, 1 - abar[idx] / prev, rtol=1e-10)
    assert list(LINEAR.respace(1).timesteps) == [1000]  # one step starts from noise


def test_step_of_time_gives_the_original_steps():
    """t_n = 1 - n/T and back; DDPM's code index is n - 1."""
    for sched in (LINEAR, LINEAR.respace(37)):
        k = jnp.arange(0, sched.T + 1)
        n = np.asarray(jax.jit(lambda k: sched.step_of_time(sched.time_of_step(k)))(k))
        np.testing.assert_array_equal(n, np.concatenate([[0], sched.timesteps]))
    np.testing.assert_array_equal(LINEAR.step_of_time(jnp.array([0.0, 0.5, 0.999, 1.0])), [1000, 500, 1, 0])
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        LINEAR.step_of_time(1.5)


# -- the reverse step and the KL terms ---------------------------------------------------------

def test_posterior_mean_is_algorithm_2():
    """mu_tilde_n(x_n, x0_hat(eps)) = (x_n - beta_n / sqrt(1 - abar_n) eps) / sqrt(alpha_n) (Ho et al. Alg. 2,
    eq. 11)."""
    path = LINEAR.path()
    n = jnp.array([2, 10, 400, 1000])
    xn = normal(3, (4, 2))
    eps = normal(4, (4, 2))

    @jax.jit
    def reverse_mean(xn, eps):
        x0_hat, _ = to_data_and_noise(path, eps, xn, LINEAR.time_of_step(n), "eps")
        return LINEAR.q_posterior(x0_hat, xn, n)[0]

    mean = reverse_mean(xn, eps)
    b, ab, al = (v[np.asarray(n) - 1][:, None] for v in (LINEAR.betas, LINEAR.alphas_cumprod, LINEAR.alphas))
    ref = (np.asarray(xn) - b / np.sqrt(1 - ab) * np.asarray(eps)) / np.sqrt(al)
    np.testing.assert_allclose(mean, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variance", ["beta", "posterior"])
@pytest.mark.parametrize("sched", [LINEAR, COSINE], ids=["linear", "cosine"])
def test_kl_term_eps_form_equals_data_and_snr_forms(sched, variance):
    """L_{n-1}: the closed-form Gaussian KL = C + beta^2/(2 sigma^2 alpha (1 - abar)) ||eps - eps_hat||^2 (eq. 12)
    = C + (beta_tilde/sigma^2) (SNR(n-1) - SNR(n))/2 ||x0 - x0_hat||^2 (Kingma et al. 2021)."""
    n = jnp.array([2, 3, 10, 100, 500, 900])
    x0 = normal(5, (6, 4))
    eps = normal(6, (6, 4))
    eps_hat = eps + 0.3 * normal(7, (6, 4))
    ab = jnp.asarray(sched.alphas_cumprod[np.asarray(n) - 1], jnp.float32)[:, None]
    xn = sched.q_sample(x0, n, eps)
    x0_hat = (xn - jnp.sqrt(1 - ab) * eps_hat) / jnp.sqrt(ab)
    full = diffusion_kl_term(sched, x0, xn, x0_hat, n, variance=variance)
    by_eps = diffusion_kl_term_eps(sched, eps, eps_hat, n, variance=variance)
    by_snr = diffusion_kl_term_snr(sched, x0, x0_hat, n, variance=variance)
    np.testing.assert_allclose(by_eps, full, rtol=2e-3)
    np.testing.assert_allclose(by_snr, full, rtol=2e-3)
    assert np.all(np.asarray(full) > 0)


# -- ancestral sampling with the oracle --------------------------------------------------------

def test_fast_oracle_fields_are_the_oracle():
    path = LINEAR.path()
    x = 2 * normal(8, (64, 2))
    t = jnp.linspace(0.0, path.schedule.t_max, 64)
    out = jax.jit(lambda x, t: (gauss_eps(path)(x, t), GAUSS.marginal_eps(path, x, t),
                                mixture_eps(MIX, path)(x, t), MIX.marginal_eps(path, x, t)))(x, t)
    np.testing.assert_allclose(out[0], out[1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out[2], out[3], rtol=1e-4, atol=1e-5)


def test_ancestral_sampling_reproduces_gaussian(variance="beta"):
    b = 8000
    run = jax.jit(lambda x_T, key: sample(gauss_eps(LINEAR.path()), x_T, DDPMAncestral(schedule=LINEAR, variance=variance),
                                          key=key, prediction="eps").x)
    x = run(normal(9, (b, 2)), jax.random.key(10))
    x = np.asarray(x, np.float64)
    se_mean = np.sqrt(np.diag(COV) / b)
    se_cov = np.sqrt((np.outer(np.diag(COV), np.diag(COV)) + COV**2) / b)
    assert np.all(np.abs(x.mean(0) - MU) < 4 * se_mean), (x.mean(0), MU, se_mean)
    assert np.all(np.abs(np.cov(x.T) - COV) < 4 * se_cov), (np.cov(x.T), COV, se_cov)


@pytest.fixture(scope="module")
def mixture_reference():
    """Mixture samples, and a bound: 3x the largest energy distance between independent sets of the same size."""
    n = 1000
    ref = MIX.sample(jax.random.key(11), n)
    floors = [abs(float(energy_distance(MIX.sample(jax.random.key(100 + s), n),
                                        MIX.sample(jax.random.key(200 + s), n)))) for s in range(3)]
    return ref, max(3 * max(floors), 3e-3)


@pytest.mark.slow
def test_respaced_ancestral_sampling_reproduces_mixture(mixture_reference, prediction="velocity", variance="posterior"):
    """50 of 1000 steps with a velocity field (the eps oracle converted by the field algebra, decoded back by the
    sampler); eps is tested on Gaussian data above, a data prediction in the discretised bound below."""
    ref, bound = mixture_reference
    x_T = normal(14, ref.shape)
    path = LINEAR.path()
    field = fields.as_field(path, mixture_eps(MIX, path), source="eps", target=prediction)  # the oracle's prediction
    run = jax.jit(lambda x_T, key: sample(field, x_T, DDPMAncestral(schedule=LINEAR, variance=variance), key=key,
                                          prediction=prediction, steps=50))
    res = run(x_T, jax.random.key(15))
    assert res.nfe == 50 and res.ts.shape == (51,)
    ed = float(energy_distance(res.x, ref))
    assert ed < bound, (prediction, ed, bound)
    assert float(energy_distance(x_T, ref)) > 30 * bound  # the start is far from the data


def _recording(field):
    """The field, recording the time of every call (one call per batch evaluation)."""
    seen = []

    def f(x, t):
        jax.debug.callback(lambda tt: seen.append(float(tt[0])), t)
        return field(x, t)

    return f, seen


def test_ancestral_nfe_path_time_and_clipping():
    """7 respaced steps of 100: exactly 7 evaluations, at path_time(n) of the kept original steps n, and the
    clipped x0 prediction bounds the output (x_0 = mu_tilde_1 = x0_hat)."""
    sched = LINEAR100
    f, seen = _recording(gauss_eps(sched.path()))
    path_time = lambda n: 0.999 * (100 - n) / 100  # noqa: E731  (any map from original steps to the field's time)
    res = sample(f, 3.0 * jnp.ones((4, 2)), DDPMAncestral(schedule=sched, path_time=path_time, clip_denoised=0.05),
                 key=jax.random.key(0), prediction="eps", steps=7, save_trajectory=True)
    jax.block_until_ready(res.x)
    jax.effects_barrier()
    kept = sched.respace(7).timesteps
    assert res.nfe == len(seen) == 7
    np.testing.assert_allclose(seen, path_time(kept[::-1]), rtol=1e-6)
    assert res.trajectory.shape == (8, 4, 2) and float(jnp.abs(res.x).max()) <= 0.05 + 1e-7
    np.testing.assert_allclose(res.ts, np.concatenate([1 - kept[::-1] / 100, [1.0]]), rtol=1e-6)


# -- the variational bound ---------------------------------------------------------------------

def test_elbo_prior_and_decoder_terms_by_hand():
    """L_T = KL(N(sqrt(abar_T) x0, 1 - abar_T) || N(0, 1)) and the discretised decoder of eq. 13 around a constant
    x0-prediction, computed with float64 normal CDFs; decoder_variance='clipped' uses beta_tilde_2 at n = 1 as Ho et
    al.'s diffusion_utils_2.py and improved-diffusion do (their 'fixedlarge' first log-variance)."""
    sched = LINEAR100
    x0 = np.array([[-1.0, -0.2], [0.0, 0.5], [1.0, 64 * 2 / 255 - 1]])
    c = np.array([-0.98, -0.19, 0.03, 0.47, 0.97, -0.47])
    field = lambda x, t: jnp.broadcast_to(jnp.asarray(c.reshape(3, 2), x.dtype), x.shape)  # noqa: E731
    b = np.linspace(1e-3, 0.2, 100)
    ab = np.cumprod(1 - b)
    beta_tilde_2 = (1 - ab[0]) / (1 - ab[1]) * b[1]
    prior = 0.5 * np.sum((1 - ab[-1]) + ab[-1] * x0**2 - 1 - np.log(1 - ab[-1]), -1)

    def decoder(var):
        sd, h = math.sqrt(var), 1 / 255
        x, m = x0.reshape(-1), c
        hi = np.where(x > 1 - h, np.inf, (x + h - m) / sd)
        lo = np.where(x < -1 + h, -np.inf, (x - h - m) / sd)
        return -np.log(stats.norm.cdf(hi) - stats.norm.cdf(lo)).reshape(3, 2).sum(-1)

    cases = ((None, b[0]), ("clipped", beta_tilde_2), (2e-3, 2e-3))
    run = jax.jit(lambda x0, key: [ddpm_elbo(field, x0, key, schedule=sched, prediction="data", num_terms=1,
                                             decoder="discretized", decoder_variance=dv) for dv, _ in cases])
    for bound, (_, var) in zip(run(jnp.asarray(x0, jnp.float32), jax.random.key(0)), cases):
        np.testing.assert_allclose(bound.prior, prior, rtol=1e-4)
        np.testing.assert_allclose(bound.decoder, decoder(var), rtol=1e-4)
    with pytest.raises(ValueError, match="decoder_variance"):
        ddpm_elbo(field, jnp.asarray(x0, jnp.float32), jax.random.key(0), schedule=sched, decoder_variance="large")

@pytest.fixture(scope="module")
def gauss_data():
    x0 = GAUSS.sample(jax.random.key(20), 4000)
    return x0, jax.jit(GAUSS.log_prob)(x0) * -1.0, {}


def _elbo(field, schedule, **kw):
    """ddpm_elbo as one compiled program (eagerly, its many small operations each compile)."""
    return jax.jit(lambda x0, key: ddpm_elbo(field, x0, key, schedule=schedule, **kw))


def _gap(sched, variance, gauss_data):
    """Mean and standard error of -ELBO(x0) + log p(x0) over the data (cached per schedule and variance)."""
    x0, nll, cache = gauss_data
    if (id(sched), variance) not in cache:
        bound = _elbo(gauss_eps(sched.path()), sched, variance=variance)(x0, jax.random.key(21))
        gap = np.asarray(bound.nelbo - nll, np.float64)
        cache[id(sched), variance] = gap.mean(), gap.std() / np.sqrt(gap.size), bound
    return cache[id(sched), variance]


@pytest.mark.slow
@pytest.mark.parametrize("variance", ["beta", "posterior"])
def test_elbo_bounds_the_exact_nll_and_matches_the_analytic_gap(gauss_data, variance):
    """E[-ELBO(x0)] >= E[-log p(x0)] for the oracle model with the continuous Gaussian decoder, and the measured
    gap equals its closed form (analytic_gap). The comparison is valid because the Gaussian decoder makes
    p(x_0 | x_1) a density on R^2, like the data's: -ELBO bounds -log p_theta(x0), and averaged over the data
    E[-log p_theta] >= E[-log p_data] (Gibbs), the exact NLL of N(mu, Sigma)."""
    mean, se, bound = _gap(LINEAR, variance, gauss_data)
    expected = analytic_gap(LINEAR, variance)
    assert abs(mean - expected) < 4 * se, (mean, se, expected)
    assert mean > -3 * se
    np.testing.assert_allclose(bound.bits_per_dim, bound.nelbo / (2 * math.log(2)), rtol=1e-6)
    assert np.all(np.asarray(bound.prior) >= 0) and np.all(np.asarray(bound.diffusion) > 0)


@pytest.mark.slow
def test_elbo_gap_shrinks_with_more_steps(gauss_data):
    """With sigma_n^2 = beta_tilde_n the gap is measurable: T = 100 -> 1000 (rescaled linear betas) it drops
    from 2.61 to 1.15 nats (closed form). With sigma_n^2 = beta_n it is 0.0124 -> 0.0012: below the Monte Carlo error
    of 4000 samples (about 0.03), so only its closed form is compared."""
    m100, se100, _ = _gap(LINEAR100, "posterior", gauss_data)
    m1000, se1000, _ = _gap(LINEAR, "posterior", gauss_data)
    assert m100 - m1000 > 4 * math.hypot(se100, se1000), (m100, se100, m1000, se1000)
    assert abs(m100 - analytic_gap(LINEAR100, "posterior")) < 4 * se100
    assert analytic_gap(LINEAR100, "beta") > 5 * analytic_gap(LINEAR, "beta") > 0


def test_sampled_terms_are_unbiased(gauss_data):
    x0 = gauss_data[0]
    full = np.asarray(_gap(LINEAR100, "posterior", gauss_data)[2].diffusion, np.float64)  # all 99 terms
    est = _elbo(gauss_eps(LINEAR100.path()), LINEAR100, variance="posterior", num_terms=8)(x0, jax.random.key(23))
    est = np.asarray(est.diffusion, np.float64)
    se = math.hypot(full.std(), est.std()) / math.sqrt(x0.shape[0])
    assert abs(full.mean() - est.mean()) < 4 * se, (full.mean(), est.mean(), se)
    assert est.std() > full.std()  # the price of 9 instead of 100 evaluations


def test_discretized_likelihood_is_a_distribution_over_bins():
    grid = jnp.linspace(-1.0, 1.0, 256)
    means = jnp.array([0.0, 0.37, -1.3, 0.999, 0.5])[:, None]
    stds = jnp.array([0.01, 0.3, 0.05, 2.0, 1e-3])[:, None]
    x = np.array([-1.0, -0.2, 0.0, 0.5, 1.0])
    loglik = jax.jit(discretized_gaussian_log_likelihood)
    total = jnp.exp(loglik(grid[None], means, stds)).sum(-1)
    np.testing.assert_allclose(total, 1.0, rtol=1e-4)
    # against float64 differences of normal CDFs, including a far tail (log P ~ -1250)
    mean, std, half = 0.0, 0.01, 1 / 255
    lo, hi = (x - half - mean) / std, (x + half - mean) / std
    with np.errstate(divide="ignore"):  # np.where evaluates the unused branch too
        ref = np.where(lo > 0, special.log_ndtr(-lo) + np.log1p(-np.exp(special.log_ndtr(-hi) - special.log_ndtr(-lo))),
                       special.log_ndtr(hi) + np.log1p(-np.exp(special.log_ndtr(lo) - special.log_ndtr(hi))))
    ref[0], ref[-1] = special.log_ndtr(hi[0]), special.log_ndtr(-lo[-1])  # the edge bins extend to -inf, +inf
    got = loglik(jnp.asarray(x, jnp.float32)[None], jnp.full((5, 1), mean), jnp.full((5, 1), std))[0]
    np.testing.assert_allclose(got, ref, rtol=1e-4)
    centre = np.log(stats.norm.cdf(half / std) - stats.norm.cdf(-half / std))
    np.testing.assert_allclose(float(got[2]), centre, rtol=1e-5)


@pytest.mark.slow
def test_discretized_elbo_bounds_the_entropy_of_discrete_data():
    """8-bit data on three levels: -ELBO with the decoder of eq. 13 is a bound on a discrete NLL, so averaged over
    the data it is >= the entropy of the levels (the oracle is a mixture of components much narrower than a bin)."""
    levels = jnp.array([64, 128, 200]) * 2 / 255 - 1
    w = jnp.array([0.2, 0.5, 0.3])
    data = GaussianMixture.isotropic(levels[:, None], 1e-4, w)
    x0 = levels[jax.random.categorical(jax.random.key(24), jnp.log(w), shape=(2000,))][:, None]
    path = LINEAR100.path()
    x0_field = fields.as_field(path, mixture_eps(data, path), source="eps", target="data")  # an x0-prediction model
    bound = _elbo(x0_field, LINEAR100, prediction="data", decoder="discretized")(x0, jax.random.key(25))
    entropy = float(-(w * jnp.log(w)).sum())
    nelbo = np.asarray(bound.nelbo, np.float64)
    assert nelbo.mean() > entropy - 3 * nelbo.std() / math.sqrt(nelbo.size), (nelbo.mean(), entropy)
    assert np.all(np.asarray(bound.decoder) > 0) and np.all(np.isfinite(nelbo))
    np.testing.assert_allclose(bound.bits_per_dim, bound.nelbo / math.log(2), rtol=1e-6)


# -- errors ------------------------------------------------------------------------------------

def test_bad_arguments_raise():
    f = gauss_eps(LINEAR100.path())
    x = jnp.zeros((4, 2))
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"every beta_n must lie in \(0, 1\)"):
        DDPMSchedule.from_betas([0.1, 1.2])
    with pytest.raises(ValueError, match="too far from a noise-to-data path"):
        DDPMSchedule.linear(10).path()  # Ho et al.'s betas with T = 10: abar_T = 0.9
    with pytest.raises(ValueError, match="steps must lie in"):
        LINEAR100.q_sample(x, 101, x)
    with pytest.raises(ValueError, match="respace"):
        LINEAR100.respace(0)
    with pytest.raises(ValueError, match="unknown variance"):
        DDPMAncestral(schedule=LINEAR100, variance="large")
    with pytest.raises(ValueError, match="unknown decoder"):
        ddpm_elbo(f, x, key, schedule=LINEAR100, decoder="bernoulli")
    with pytest.raises(ValueError, match=r"scaled to \[-1, 1\]"):
        ddpm_elbo(f, x + 3.0, key, schedule=LINEAR100, decoder="discretized")
    with pytest.raises(ValueError, match="must be a DDPMSchedule"):
        DDPMAncestral(schedule="linear")
    with pytest.raises(ValueError, match="num_terms"):
        ddpm_elbo(f, x, key, schedule=LINEAR100, num_terms=0)
    # L_0 is the decoder: the KL forms would be infinite at n = 1 (beta_tilde_1 = 0)
    one = jnp.ones((4,), jnp.int32)
    for kl in (lambda: diffusion_kl_term(LINEAR100, x, x, x, one), lambda: diffusion_kl_term_eps(LINEAR100, x, x, one),
               lambda: diffusion_kl_term_snr(LINEAR100, x, x, one)):
        with pytest.raises(ValueError, match="n >= 2"):
            kl()
