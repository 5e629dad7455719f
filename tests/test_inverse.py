"""Training-free inverse problems (jaxgen.inverse): operators against their explicit matrices, guidance against
finite differences and the exact posterior of Gaussian data, replacement / RePaint inpainting against the exact
conditional mean, and inversion round trips at the solvers' orders.

The exact fields are the oracle's (GaussianMixture), written in closed form without its batched Cholesky
factorisation (checked equal to it once): jaxlib's batched LAPACK kernels (ParallelBatchMap) were seen to deadlock on
this 2-core machine when several of them run in one compiled sampling program.
"""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from jaxgen.fields import convert
from jaxgen.inverse import (DownsampleOperator, GrayscaleOperator, Inpaint, MaskOperator, ReversedDDIM, box_mask,
                            guidance_terms, half_mask, invert, operator_matrix, pigdm_variance,
                            posterior_guided_field, random_mask, renoise, round_trip_error,
                            score_to_velocity_coefficient)
from jaxgen.oracle import GaussianMixture
from jaxgen.paths import GaussianPath
from jaxgen.samplers import DDIM, RK4, DPMSolverPP, EDM, Diffrax, Euler, EulerMaruyama, Heun, sample

LINEAR = GaussianPath.from_name("linear")
H = W = 4
D = H * W


# ---------------------------------------------------------------------------------------------------------
# Exact fields.
# ---------------------------------------------------------------------------------------------------------


def gaussian_field(mu, cov, path=LINEAR, prediction="velocity"):
    """The exact field of N(mu, cov) data on ``path`` for images (B, H, W, 1), from the eigendecomposition of cov:
    E[z|x] = mu + U diag(a l / (a^2 l + b^2)) U^T (x - a mu), E[eps|x] = U diag(b / (a^2 l + b^2)) U^T (x - a mu)."""
    lam, U = np.linalg.eigh(np.asarray(cov, np.float64))
    U, lam, mu = (jnp.asarray(v, jnp.float32) for v in (U, lam, np.asarray(mu)))

    def f(x, t, **_):
        c = path.coefficients(t)
        a, b, da, db = (v[:, None] for v in c)
        r = (x.reshape(x.shape[0], -1) - a * mu) @ U
        var = a**2 * lam + b**2
        z = mu + (r * (a * lam / var)) @ U.T
        e = (r * (b / var)) @ U.T
        out = {"velocity": da * z + db * e, "eps": e, "data": z}[prediction]
        return out.reshape(x.shape)

    return f


def mixture_velocity(gm, path=LINEAR, prediction="velocity"):
    """The exact field of an isotropic mixture (covs s_k^2 I), flat (B, d)."""
    var_k = gm.covs[:, 0, 0]

    def f(x, t, **_):
        c = path.coefficients(t)
        a, b, da, db = (v[:, None] for v in c)
        var = a**2 * var_k[None] + b**2                                        # (B, K)
        r = x[:, None, :] - a[:, :, None] * gm.means[None]                     # (B, K, d)
        logits = jnp.log(gm.weights)[None] - 0.5 * jnp.sum(r**2, -1) / var - 0.5 * x.shape[1] * jnp.log(var)
        w = jax.nn.softmax(logits, -1)
        z = jnp.einsum("bk,bkd->bd", w, gm.means[None] + (a * var_k[None] / var)[..., None] * r)
        e = jnp.einsum("bk,bkd->bd", w, (b / var)[..., None] * r)
        return {"velocity": da * z + db * e, "eps": e}[prediction]

    return f


def correlated_cov():
    i, j = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
    pos = np.stack([i.ravel(), j.ravel()], -1)
    dist = np.sqrt(((pos[:, None] - pos[None]) ** 2).sum(-1))
    return np.exp(-dist / 1.5) + 0.05 * np.eye(D)


MU = np.linspace(-1.0, 1.0, D)
COV = correlated_cov()
MASK = half_mask((H, W), "left")  # the left half observed
OBS = np.asarray(MASK).ravel() > 0
X_TRUE = (MU + 2.0 * np.linalg.cholesky(COV) @ np.random.RandomState(0).randn(D)).reshape(1, H, W, 1)
Y = MaskOperator(MASK)(jnp.asarray(X_TRUE, jnp.float32))
# E[x_unknown | x_known = y]
COND_MEAN = MU[~OBS] + COV[np.ix_(~OBS, OBS)] @ np.linalg.solve(COV[np.ix_(OBS, OBS)], X_TRUE.ravel()[OBS] - MU[OBS])
FIELD = gaussian_field(MU, COV)
X0 = jax.random.normal(jax.random.key(1), (256, H, W, 1))


def errors(x):
    """(rms error of the known pixels against y, mean abs error of the unknown pixels' mean against the exact
    conditional mean)."""
    x = np.asarray(x).reshape(x.shape[0], -1)
    known = np.sqrt(np.mean((x[:, OBS] - X_TRUE.ravel()[OBS]) ** 2))
    return known, np.abs(x[:, ~OBS].mean(0) - COND_MEAN).mean()


UNCOND_MEAN_ERROR = np.abs(MU[~OBS] - COND_MEAN).mean()


@pytest.mark.slow
def test_closed_form_fields_equal_the_oracle():
    x = jax.random.normal(jax.random.key(2), (4, H, W, 1))
    t = jnp.array([0.0, 0.3, 0.8, 1.0])
    gm = GaussianMixture(jnp.asarray(MU[None], jnp.float32), jnp.asarray(COV[None], jnp.float32), jnp.ones(1))
    for pred in ("velocity", "eps", "data"):
        want = gm.field(LINEAR, pred)(x.reshape(4, D), t)
        got = gaussian_field(MU, COV, prediction=pred)(x, t).reshape(4, D)
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)
    mix = GaussianMixture.isotropic(np.random.RandomState(1).randn(3, 8), jnp.array([0.3, 0.5, 0.4]))
    xf = jax.random.normal(jax.random.key(3), (4, 8))
    np.testing.assert_allclose(mixture_velocity(mix)(xf, t), mix.velocity_field(LINEAR)(xf, t), atol=2e-5, rtol=1e-4)


# ---------------------------------------------------------------------------------------------------------
# Operators.
# ---------------------------------------------------------------------------------------------------------

OPERATORS = {
    "mask": (MaskOperator(half_mask((4, 4), "top")), (4, 4, 3)),
    "mask_per_channel": (MaskOperator(jnp.asarray(np.random.RandomState(0).rand(4, 4, 3) > 0.5)), (4, 4, 3)),
    "downsample": (DownsampleOperator(2), (4, 4, 3)),
    "downsample_1d": (DownsampleOperator(3, axes=(1,)), (6,)),
    "gray_mean": (GrayscaleOperator(3), (4, 4, 3)),
    "gray_luma": (GrayscaleOperator(weights=(0.299, 0.587, 0.114)), (4, 4, 3)),
}


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_operator_is_linear_with_exact_transpose_and_pseudo_inverse(name):
    op, shape = OPERATORS[name]
    kx, ky = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (3,) + shape)
    y = jax.random.normal(ky, op(x).shape)
    A = lambda v: op(v)
    # Penrose conditions
    np.testing.assert_allclose(A(op.pinv(A(x))), A(x), atol=1e-5)                   # A A^+ A = A
    np.testing.assert_allclose(op.pinv(A(op.pinv(y))), op.pinv(y), atol=1e-5)       # A^+ A A^+ = A^+
    # adjoint
    lhs = jnp.sum(A(x) * y, axis=tuple(range(1, y.ndim)))
    rhs = jnp.sum(x * op.transpose(y), axis=tuple(range(1, x.ndim)))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-5, atol=1e-5)
    # against the explicit matrix
    M = np.asarray(operator_matrix(op, shape), np.float64)
    np.testing.assert_allclose(np.asarray(op.pinv(y[:1])).reshape(-1), np.linalg.pinv(M) @ np.asarray(y[0]).ravel(),
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(op.transpose(y[:1])).reshape(-1), M.T @ np.asarray(y[0]).ravel(), atol=1e-6)
    # A A^T = c I on the measured entries (rows of M that are not identically zero)
    rows = np.abs(M).sum(1) > 0
    MMt = (M @ M.T)[np.ix_(rows, rows)]
    np.testing.assert_allclose(MMt, op.gram_scale((1,) + shape) * np.eye(rows.sum()), atol=1e-6)


def test_masks():
    left = np.asarray(half_mask((4, 6), "left"))[..., 0]
    assert left.shape == (4, 6) and left[:, :3].all() and not left[:, 3:].any()
    for side, sl in (("right", np.s_[:, 3:]), ("top", np.s_[:2, :]), ("bottom", np.s_[2:, :])):
        m = np.asarray(half_mask((1, 4, 6, 3), side))[..., 0]
        assert m.sum() == 12 and m[sl].all(), side
    box = np.asarray(box_mask((8, 8, 3)))[..., 0]
    assert box.shape == (8, 8) and not box[2:6, 2:6].any() and box.sum() == 64 - 16
    assert np.asarray(box_mask((8, 8), (2, 4)))[..., 0].sum() == 64 - 8
    r = np.asarray(random_mask(jax.random.key(0), (32, 32), 0.25))
    assert r.shape == (32, 32, 1) and set(np.unique(r)) <= {0.0, 1.0} and 0.15 < r.mean() < 0.35


def test_operator_bad_inputs():
    with pytest.raises(ValueError, match="only 0"):
        MaskOperator(jnp.full((4, 4, 1), 0.5))
    with pytest.raises(ValueError, match="broadcast"):
        MaskOperator(jnp.ones((5, 4, 1)))(jnp.ones((2, 4, 4, 3)))
    with pytest.raises(ValueError, match="not divisible"):
        DownsampleOperator(3)(jnp.ones((1, 4, 4, 1)))
    with pytest.raises(ValueError, match="factor"):
        DownsampleOperator(0)
    with pytest.raises(ValueError, match="channel"):
        GrayscaleOperator(3)(jnp.ones((1, 4, 4, 4)))
    with pytest.raises(ValueError, match="side"):
        half_mask((4, 4), "middle")
    with pytest.raises(ValueError, match="fit"):
        box_mask((4, 4), 5)


# ---------------------------------------------------------------------------------------------------------
# Guidance.
# ---------------------------------------------------------------------------------------------------------


def small_field(prediction_scale):
    """A smooth nonlinear field on (B, 2, 2, 1) images (float64 in the finite-difference test)."""
    Wm = jnp.asarray(np.random.RandomState(3).randn(4, 4) * 0.5)

    def f(x, t, **_):
        h = x.reshape(x.shape[0], -1)
        return (prediction_scale * jnp.tanh(h @ Wm + t[:, None]) + 0.3 * h).reshape(x.shape)

    return f


@pytest.mark.parametrize("method", ["dps", "pigdm"])
@pytest.mark.parametrize("prediction", ["velocity", "data"])
def test_guidance_term_is_the_gradient_of_the_objective(method, prediction):
    with jax.enable_x64(True):
        field = small_field(1.0)
        op = MaskOperator(jnp.asarray([[1.0, 0.0], [1.0, 1.0]])[..., None])
        x = jax.random.normal(jax.random.key(0), (2, 2, 2, 1), jnp.float64)
        y = op(jax.random.normal(jax.random.key(1), (2, 2, 2, 1), jnp.float64))
        t = jnp.array([0.3, 0.6])
        scale, noise = 0.7, (0.2 if method == "pigdm" else 0.0)
        terms = guidance_terms(field, op, y, x, t, path=LINEAR, prediction=prediction, method=method, scale=scale,
                               noise_std=noise)
        a, b = LINEAR.schedule.values(t)
        r2 = b**2 / (a**2 + b**2)
        norms = jnp.sqrt(jnp.sum(terms.residual**2, axis=(1, 2, 3)))

        def objective(xx):  # the guidance term is its gradient (per sample; the DPS norm held constant)
            from jaxgen.fields import to_data_and_noise
            z, _ = to_data_and_noise(LINEAR, field(xx, t), xx, t, prediction)
            sq = jnp.sum((y - op(z)) ** 2, axis=(1, 2, 3))
            if method == "dps":
                return jnp.sum(-scale * sq / norms)
            return jnp.sum(-scale * sq / (2 * (r2 * op.gram_scale(x.shape) + noise**2)))

        eps = 1e-6
        fd = np.zeros(x.size)
        for k in range(x.size):
            e = jnp.zeros(x.size, jnp.float64).at[k].set(eps).reshape(x.shape)
            fd[k] = (objective(x + e) - objective(x - e)) / (2 * eps)
        np.testing.assert_allclose(np.asarray(terms.score_correction).ravel(), fd, rtol=1e-6, atol=1e-8)
        assert np.abs(fd).max() > 1e-2  # not vacuous


@pytest.mark.parametrize("method", ["dps", "pigdm"])
@pytest.mark.parametrize("prediction", ["velocity", "eps", "data"])
def test_velocity_correction_is_the_score_correction_through_the_path(method, prediction):
    field = gaussian_field(MU, COV, prediction=prediction)
    x = jax.random.normal(jax.random.key(4), (3, H, W, 1))
    t = jnp.array([0.2, 0.5, 0.9])
    terms = guidance_terms(field, MaskOperator(MASK), Y, x, t, path=LINEAR, prediction=prediction, method=method)
    score = convert(LINEAR, terms.base_velocity, x, t, source="velocity", target="score")
    want = convert(LINEAR, score + terms.score_correction, x, t, source="score", target="velocity")
    np.testing.assert_allclose(terms.velocity, want, rtol=2e-4, atol=2e-4)
    c = score_to_velocity_coefficient(LINEAR, t)
    np.testing.assert_allclose(c, (1 - t) / t, rtol=1e-6)
    np.testing.assert_allclose(pigdm_variance(LINEAR, t), (1 - t) ** 2 / (t**2 + (1 - t) ** 2), rtol=1e-6)
    assert float(jnp.abs(terms.velocity - terms.base_velocity).max()) > 0.1


@pytest.mark.slow
def test_pigdm_is_the_exact_posterior_velocity_for_unit_gaussian_data():
    """For N(mu, I) data PiGDM's r_t^2 is the true posterior variance: with a noisy measurement the guided velocity is
    the exact velocity of the posterior N(m_post, S_post) (the oracle's), at every t > 0."""
    rs = np.random.RandomState(5)
    sigma = 0.1
    M = np.eye(D)[OBS]
    yk = M @ (MU + rs.randn(D)) + sigma * rs.randn(OBS.sum())
    S = np.linalg.inv(np.eye(D) + M.T @ M / sigma**2)
    m = S @ (MU + M.T @ yk / sigma**2)
    exact = gaussian_field(m, S)
    y = jnp.asarray(M.T @ yk, jnp.float32).reshape(1, H, W, 1)
    guided = posterior_guided_field(gaussian_field(MU, np.eye(D)), MaskOperator(MASK), y, path=LINEAR,
                                    method="pigdm", noise_std=sigma)
    x = jax.random.normal(jax.random.key(6), (6, H, W, 1))
    t = jnp.array([0.05, 0.2, 0.5, 0.8, 0.99, 1.0])
    np.testing.assert_allclose(guided(x, t), exact(x, t), atol=5e-5, rtol=1e-4)
    # finite at both ends, for both methods and noiseless measurements
    for method in ("dps", "pigdm"):
        g = posterior_guided_field(FIELD, MaskOperator(MASK), Y, path=LINEAR, method=method)
        assert bool(jnp.all(jnp.isfinite(g(x, jnp.array([0.0, 0.0, 1.0, 1.0, 0.5, 1e-7])))))


@pytest.fixture(scope="module")
def guided_runs():
    run = jax.jit(lambda x0, method, scale: sample(
        posterior_guided_field(FIELD, MaskOperator(MASK), Y, path=LINEAR, method=method, scale=scale), x0, Euler(),
        path=LINEAR, steps=20), static_argnums=(1, 2))
    out = {"unguided": errors(jax.jit(lambda x0: sample(FIELD, x0, Euler(), path=LINEAR, steps=20).x)(X0))}
    for method, scale in (("pigdm", 1.0), ("dps", 1.0)):
        res = run(X0, method, scale)
        assert int(res.nfe) == 20  # one evaluation (network + vjp) per step
        out[method] = errors(res.x)
    return out


def test_guided_samples_match_the_observation(guided_runs):
    known0, mean0 = guided_runs["unguided"]
    assert known0 > 2.0 and abs(mean0 - UNCOND_MEAN_ERROR) < 0.2  # the unguided samples ignore y
    known, _ = guided_runs["pigdm"]
    assert known < 1e-2 * known0, guided_runs  # measured 3e-4 vs 3.2
    known, mean = guided_runs["dps"]
    assert known < 0.6 * known0, guided_runs  # measured 1.48 vs 3.21
    assert mean < 0.4 * UNCOND_MEAN_ERROR, guided_runs  # measured 0.19 vs 1.0


def test_guidance_bad_inputs():
    with pytest.raises(ValueError, match="unknown guidance method"):
        posterior_guided_field(FIELD, MaskOperator(MASK), Y, path=LINEAR, method="ddrm")
    with pytest.raises(ValueError, match="path"):
        posterior_guided_field(FIELD, MaskOperator(MASK), Y, path=None)
    with pytest.raises(ValueError, match="noise_std"):
        posterior_guided_field(FIELD, MaskOperator(MASK), Y, path=LINEAR, noise_std=-1.0)
    with pytest.raises(ValueError, match="scale"):
        posterior_guided_field(FIELD, MaskOperator(MASK), Y, path=LINEAR, scale=float("nan"))
    with pytest.raises(TypeError, match="operator"):
        posterior_guided_field(FIELD, lambda x: x, Y, path=LINEAR)
    g = posterior_guided_field(FIELD, DownsampleOperator(2), Y, path=LINEAR)
    with pytest.raises(ValueError, match="does not match"):
        g(X0[:2], 0.5)


# ---------------------------------------------------------------------------------------------------------
# Replacement and RePaint.
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def inpaint_runs():
    run = jax.jit(lambda x0, key, solver: sample(FIELD, x0, solver, path=LINEAR, steps=20, key=key),
                  static_argnums=2)
    key = jax.random.key(3)
    return {(name, r): run(X0, key, Inpaint(Y, MASK, base, resample=r))
            for name, base, r in (("euler", Euler(), 1), ("euler", Euler(), 5), ("heun", Heun(final_euler=True), 2))}


def test_inpaint_keeps_the_observation_and_counts_evaluations(inpaint_runs):
    for (name, r), res in inpaint_runs.items():
        x = np.asarray(res.x).reshape(X0.shape[0], -1)
        assert np.array_equal(x[:, OBS], np.broadcast_to(np.asarray(Y).ravel()[OBS], (X0.shape[0], OBS.sum())))
        per_step = {"euler": 1, "heun": 2}[name]
        assert int(res.nfe) == 20 * per_step * r - (1 if name == "heun" else 0) * r, (name, r, res.nfe)


def test_inpainted_pixels_approach_the_conditional_mean(inpaint_runs):
    err1 = errors(inpaint_runs[("euler", 1)].x)[1]
    err5 = errors(inpaint_runs[("euler", 5)].x)[1]
    err_heun = errors(inpaint_runs[("heun", 2)].x)[1]
    # measured: 0.62 (replacement), 0.11 (RePaint, 5 resamplings), vs 1.0 for the unconditional mean
    assert err1 < 0.8 * UNCOND_MEAN_ERROR
    assert err5 < 0.25 * UNCOND_MEAN_ERROR and err5 < 0.5 * err1, (err1, err5)
    assert err_heun < 0.8 * UNCOND_MEAN_ERROR


def test_resample_1_is_plain_replacement():
    x0, key, steps = X0[:8], jax.random.key(7), 5
    got = sample(FIELD, x0, Inpaint(Y, MASK, Euler()), path=LINEAR, steps=steps, key=key).x
    m = np.asarray(MASK) > 0
    ts = np.linspace(0.0, 1.0, steps + 1, dtype=np.float32)
    k_init, k_steps = jax.random.split(key)
    x = jnp.where(m, 0.0 * Y + 1.0 * jax.random.normal(k_init, x0.shape), x0)  # alpha_0 = 0, beta_0 = 1
    for i in range(steps):
        t, tn = ts[i], ts[i + 1]
        x = x + (tn - t) * FIELD(x, jnp.full((8,), t))
        _, k_obs, _ = jax.random.split(jax.random.fold_in(jax.random.fold_in(k_steps, i), 0), 3)
        x = jnp.where(m, tn * Y + (1 - tn) * jax.random.normal(k_obs, x0.shape), x)
    x = jnp.where(m, Y, x)
    np.testing.assert_allclose(got, x, atol=1e-5)


def test_renoise_keeps_the_marginals():
    a_from, b_from, a_to, b_to = 0.8, 0.2, 0.5, 0.5  # t' = 0.8 -> t = 0.5 on the linear path
    z = jnp.full((20000, 1), 2.0)
    k1, k2 = jax.random.split(jax.random.key(0))
    x_from = a_from * z + b_from * jax.random.normal(k1, z.shape)
    x_to = renoise(x_from, a_from, b_from, a_to, b_to, jax.random.normal(k2, z.shape))
    assert abs(float(x_to.mean()) - a_to * 2.0) < 0.02 and abs(float(x_to.std()) - b_to) < 0.01
    assert bool(jnp.all(jnp.isfinite(renoise(x_from, 0.0, 1.0, 0.0, 1.0, x_from))))  # alpha_t' = 0: finite


def test_inpaint_bad_inputs():
    for base in (DPMSolverPP(), EDM(), Diffrax()):
        with pytest.raises(ValueError, match="one-step solver"):
            Inpaint(Y, MASK, base)
    with pytest.raises(ValueError, match="resample"):
        Inpaint(Y, MASK, Euler(), resample=0)
    with pytest.raises(ValueError, match="only 0"):
        Inpaint(Y, jnp.full((H, W, 1), 0.5))
    with pytest.raises(ValueError, match="broadcast"):
        sample(FIELD, X0[:2], Inpaint(Y, jnp.ones((3, 3, 1))), path=LINEAR, steps=2, key=jax.random.key(0))
    with pytest.raises(ValueError, match="key"):
        sample(FIELD, X0[:2], Inpaint(Y, MASK), path=LINEAR, steps=2)
    with pytest.raises(ValueError, match="path"):
        sample(FIELD, X0[:2], Inpaint(Y, MASK), steps=2, key=jax.random.key(0))
    # a stochastic inner solver is fine
    res = sample(FIELD, X0[:2], Inpaint(Y, MASK, EulerMaruyama(), resample=2), path=LINEAR, steps=3, t1=0.999,
                 key=jax.random.key(0))
    assert res.nfe == 6 and bool(jnp.all(jnp.isfinite(res.x)))


# ---------------------------------------------------------------------------------------------------------
# Inversion.
# ---------------------------------------------------------------------------------------------------------

MIX = GaussianMixture.isotropic(np.random.RandomState(0).randn(4, 64), 0.3)  # "8x8 digits": 4 modes in 64-d
MIX_FIELD = mixture_velocity(MIX)
MIX_X1 = MIX.sample(jax.random.key(0), 8)


@pytest.fixture(scope="module")
def round_trips():
    run = jax.jit(lambda x1, solver, steps: round_trip_error(MIX_FIELD, x1, solver, steps, path=LINEAR),
                  static_argnums=(1, 2))
    table = {("euler", 100): run(MIX_X1, Euler(), 100)}
    for name, solver, steps in (("heun", Heun(), (10, 20, 40, 100)), ("rk4", RK4(), (5, 10, 100))):
        for n in steps:
            table[(name, n)] = run(MIX_X1, solver, n)
    return {k: float(v) for k, v in table.items()}


def test_round_trip_error_is_small_at_100_steps(round_trips):
    # measured: Euler 1.0e-2, Heun 3.2e-6, RK4 1.0e-7 (float32 round-off)
    assert round_trips[("heun", 100)] < 1e-4
    assert round_trips[("rk4", 100)] < 1e-4
    assert 1e-3 < round_trips[("euler", 100)] < 5e-2


def test_round_trip_error_decreases_at_the_solvers_order(round_trips):
    e = np.array([round_trips[("heun", n)] for n in (10, 20, 40, 100)])
    slopes = -np.diff(np.log(e)) / np.diff(np.log([10, 20, 40, 100]))
    assert np.all(slopes > 1.7), (e, slopes)  # measured 2.5, 2.9, 3.0
    e = np.array([round_trips[("rk4", n)] for n in (5, 10)])
    assert np.log2(e[0] / e[1]) > 3.0, e  # measured 1.2e-3 -> 9.8e-5 (3.6); 1.6e-6 at 20 steps, then round-off


def test_invert_reaches_the_exact_noise():
    """Gaussian data: the PF-ODE of N(mu, s^2 I) on the linear path maps x1 to x0 = (x1 - mu) / s exactly."""
    mu, s = jnp.asarray(MU, jnp.float32), 0.5
    field = gaussian_field(MU, s**2 * np.eye(D))
    x1 = (mu + s * jax.random.normal(jax.random.key(0), (4, D))).reshape(4, H, W, 1)
    exact = ((x1.reshape(4, D) - mu) / s).reshape(x1.shape)
    for solver, tol in (("heun", 5e-3), (RK4(), 1e-5)):  # measured 2.9e-3, 6e-7
        x0 = invert(field, x1, solver, steps=20, path=LINEAR)
        np.testing.assert_allclose(x0, exact, atol=tol)
    # deterministic DDIM is Euler on the linear path (both first order: 0.156 at 20 steps, 0.040 at 80)
    np.testing.assert_allclose(invert(field, x1, DDIM(), steps=20, path=LINEAR),
                               invert(field, x1, Euler(), steps=20, path=LINEAR), atol=1e-5)


@pytest.mark.slow
def test_ddim_inversion_and_eps_fields():
    eps_field = mixture_velocity(MIX, prediction="eps")
    e_ddim = float(round_trip_error(eps_field, MIX_X1, DDIM(), 50, path=LINEAR, prediction="eps", t0=1e-3))
    e_heun = float(round_trip_error(eps_field, MIX_X1, Heun(), 50, path=LINEAR, prediction="eps", t0=1e-3))
    assert e_ddim < 0.05 and e_heun < 1e-2, (e_ddim, e_heun)  # measured 0.020, 6.3e-4
    with pytest.raises(ValueError, match="t0=1e-3"):
        invert(eps_field, MIX_X1, "heun", steps=4, path=LINEAR, prediction="eps")
    with pytest.raises(ValueError, match="cannot run backwards"):
        invert(MIX_FIELD, MIX_X1, EulerMaruyama(), steps=4, path=LINEAR)
    with pytest.raises(ValueError, match="deterministic"):
        invert(MIX_FIELD, MIX_X1, DDIM(eta=1.0), steps=4, path=LINEAR)
    with pytest.raises(ValueError, match="eta must be 0"):
        ReversedDDIM(eta=0.5)


def test_infer_labels_picks_the_class_that_explains_the_measurement():
    """A class-conditional field of two Gaussian classes N(+-m, s^2 I) (exact, in closed form): the observed half of
    an image of class k is best denoised under class k, whatever the unobserved half of the completion holds, so the
    inferred labels are the true ones; with the classes' means equal on the observed half (an ambiguous
    measurement) the inference has nothing to go on."""
    from jaxgen.inverse import infer_labels, label_errors

    s = 0.3

    def class_field(means):
        def field(x, t, y):
            c = LINEAR.coefficients(t)
            a, b = (v[:, None, None, None] for v in c[:2])
            mu = means[y]
            return mu + a * s * s * (x - a * mu) / (a * a * s * s + b * b)  # E[x1 | x_t, y] ("data" prediction)
        return field

    m = jnp.concatenate([jnp.ones((H, W // 2, 1)), -jnp.ones((H, W // 2, 1))], axis=1)  # left +1, right -1
    means = jnp.stack([m, -m])
    key = jax.random.key(0)
    y_true = jax.random.bernoulli(key, 0.5, (64,)).astype(jnp.int32)
    x = means[y_true] + s * jax.random.normal(jax.random.key(1), (64, H, W, 1))
    op = MaskOperator(half_mask((H, W), "left"))
    completion = x * op.mask  # the unobserved half zero: only the measurement tells the class
    got = infer_labels(class_field(means), completion, op, op(x), path=LINEAR, prediction="data", num_classes=2,
                       key=jax.random.key(2))
    np.testing.assert_array_equal(got, y_true)
    errors = label_errors(class_field(means), completion, op, op(x), path=LINEAR, prediction="data", num_classes=2,
                          times=jnp.array([0.5, 0.9]), key=jax.random.key(2))
    assert errors.shape == (2, 64) and bool(jnp.all(errors[y_true, jnp.arange(64)] < errors[1 - y_true, jnp.arange(64)]))
    same_left = jnp.stack([m, m * jnp.concatenate([jnp.ones((H, W // 2, 1)), -jnp.ones((H, W // 2, 1))], 1)])
    flat = label_errors(class_field(same_left), completion, op, op(x), path=LINEAR, prediction="data", num_classes=2,
                        times=jnp.array([0.5, 0.9]), key=jax.random.key(2))
    np.testing.assert_allclose(flat[0], flat[1], rtol=1e-5)
    with pytest.raises(ValueError, match="num_classes"):
        infer_labels(class_field(means), completion, op, op(x), path=LINEAR, prediction="data", num_classes=1,
                     key=key)


def test_the_kernel_width_is_chosen_by_leave_one_out_classification_of_the_pool(monkeypatch):
    """The leave-one-out scores of kernel_width_by_cross_validation are a direct evaluation's (each sample scored
    against the other samples of each class: the mean log-probability of its own label), also when the samples are
    scored a few rows at a time, the width of best score is chosen, the default candidates scale with the
    measurements' spread, infer_labels_by_evidence(sigma="auto") uses the choice, and bad input is refused."""
    from scipy.special import logsumexp

    from jaxgen.inverse import infer_labels_by_evidence, kernel_width_by_cross_validation
    from jaxgen.inverse import labels as labels_module
    from jaxgen.inverse.labels import WIDTH_FACTORS

    op = MaskOperator(half_mask((H, W), "left"))
    labs = np.repeat(np.arange(3), 5)
    xs = (np.asarray(jax.random.normal(jax.random.key(0), (15, H, W, 1))) + 0.8 * labs[:, None, None, None]).astype(
        np.float32)
    widths = np.array([0.3, 1.0, 3.0])
    w, cand, score = kernel_width_by_cross_validation(xs, labs, op, num_classes=3, widths=widths)
    a = np.asarray(op(jnp.asarray(xs))).reshape(15, -1)
    want = []
    for s in widths:
        total = 0.0
        for j in range(15):
            others = [[i for i in range(15) if i != j and labs[i] == k] for k in range(3)]
            scores = [logsumexp([-np.sum((a[j] - a[i]) ** 2) / (2 * s * s) for i in o]) - np.log(len(o))
                      for o in others]
            total += scores[labs[j]] - logsumexp(scores)
        want.append(total / 15)
    np.testing.assert_allclose(score, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(cand, widths)
    assert w == widths[int(np.argmax(want))] and len(set(np.round(want, 3))) == 3  # distinct scores: a real choice
    monkeypatch.setattr(labels_module, "LOO_ROWS", 4)  # 15 rows in 4 blocks, the last one padded
    np.testing.assert_allclose(labels_module._loo_log_probabilities.__wrapped__(
        jnp.asarray(a), jnp.asarray(labs), jnp.asarray(widths, jnp.float32), 3), want, rtol=1e-4, atol=1e-5)
    w_default, cand_default, _ = kernel_width_by_cross_validation(xs, labs, op, num_classes=3)
    np.testing.assert_allclose(cand_default, np.asarray(WIDTH_FACTORS) * np.sqrt(np.mean(np.var(a, axis=0))), rtol=1e-4)
    y = op(jnp.asarray(xs[:4]))
    np.testing.assert_array_equal(infer_labels_by_evidence(xs, labs, op, y, num_classes=3, sigma="auto"),
                                  infer_labels_by_evidence(xs, labs, op, y, num_classes=3, sigma=w_default))
    for kwargs, match in ((dict(labels=np.array([0] * 14 + [1])), "at least 2 samples of every class"),
                          (dict(widths=[0.5, -1.0]), "positive widths"), (dict(labels=labs[:-1]), "one label per")):
        with pytest.raises(ValueError, match=match):
            kernel_width_by_cross_validation(xs, kwargs.get("labels", labs), op, num_classes=3,
                                             widths=kwargs.get("widths"))
    with pytest.raises(ValueError, match="outside jax.jit"):
        jax.jit(lambda x: kernel_width_by_cross_validation(x, labs, op, num_classes=3))(xs)
    with pytest.raises(ValueError, match="positive number or 'auto'"):
        infer_labels_by_evidence(xs, labs, op, y, num_classes=3, sigma="best")


def test_evidence_scores_are_the_monte_carlo_marginal_likelihood_of_the_measurement():
    """(a) The formula, against a direct evaluation: ``log (1/M_k) sum_{j in k} exp(-||y - A x_j||^2 / 2 sigma^2)``.
    (b) Two Gaussian classes N(+-m, s^2 I): the measurement's exact evidence is N(y; A mu_k, (s^2 + sigma^2) I), and
    the Monte Carlo estimate from 4,000 samples per class reproduces its log-ratio between the classes; the labels
    it infers are the true ones, and a prior can overrule it."""
    from scipy.special import logsumexp

    from jaxgen.inverse import evidence_scores, infer_labels_by_evidence

    op = MaskOperator(half_mask((H, W), "left"))
    xs = jax.random.normal(jax.random.key(0), (12, H, W, 1))
    labs = jnp.arange(12) % 3
    y = op(jax.random.normal(jax.random.key(1), (5, H, W, 1)))
    got = evidence_scores(xs, labs, op, y, num_classes=3, sigma=0.7)
    a, b = np.asarray(op(xs)).reshape(12, -1), np.asarray(y).reshape(5, -1)
    want = np.array([[logsumexp([-np.sum((b[i] - a[j]) ** 2) / (2 * 0.49) for j in range(12) if j % 3 == k])
                      - np.log(4) for i in range(5)] for k in range(3)])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)

    s, sigma, n = 0.3, 1.0, 4000
    m = jnp.concatenate([jnp.ones((H, W // 2, 1)), -jnp.ones((H, W // 2, 1))], axis=1)
    means = jnp.stack([0.5 * m, -0.5 * m])
    pool_labels = jnp.repeat(jnp.arange(2), n)
    pool = means[pool_labels] + s * jax.random.normal(jax.random.key(2), (2 * n, H, W, 1))
    y_true = jax.random.bernoulli(jax.random.key(3), 0.5, (32,)).astype(jnp.int32)
    x = means[y_true] + s * jax.random.normal(jax.random.key(4), (32, H, W, 1))
    scores = evidence_scores(pool, pool_labels, op, op(x), num_classes=2, sigma=sigma)
    d2 = [jnp.sum(jnp.reshape(op(x) - op(jnp.broadcast_to(mu, x.shape)), (32, -1)) ** 2, -1) for mu in means]
    exact = (d2[1] - d2[0]) / (2 * (s * s + sigma * sigma))  # log N(y; A mu_0, v) - log N(y; A mu_1, v)
    np.testing.assert_allclose(scores[0] - scores[1], exact, rtol=0.03, atol=0.3)
    np.testing.assert_array_equal(infer_labels_by_evidence(pool, pool_labels, op, op(x), num_classes=2, sigma=sigma),
                                  y_true)
    one = infer_labels_by_evidence(pool, pool_labels, op, op(x), num_classes=2, sigma=sigma,
                                   log_prior=jnp.array([-1e4, 0.0]))
    np.testing.assert_array_equal(one, np.ones(32))
    for kwargs, match in ((dict(sigma=0.0), "sigma > 0"), (dict(num_classes=4), "every class"),
                          (dict(labels=labs[:-1]), "one label per sample")):
        with pytest.raises(ValueError, match=match):
            evidence_scores(xs, kwargs.get("labels", labs), op, y, num_classes=kwargs.get("num_classes", 3),
                            sigma=kwargs.get("sigma", 0.7))
    with pytest.raises(ValueError, match="num_classes"):
        evidence_scores(xs, labs, op, y, num_classes=1, sigma=0.7)
    with pytest.raises(ValueError, match="log_prior"):
        infer_labels_by_evidence(xs, labs, op, y, num_classes=3, sigma=0.7, log_prior=jnp.zeros(2))
