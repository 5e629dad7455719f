"""Consistency models: the boundary condition is exact, the coefficients are EDM's, the losses pair the
right times, the target is an EMA, and distillation / training from scratch give good 1-step samples."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxgen.consistency import (ConsistencyFunction, ConsistencyTrainer, consistency_coefficients,
                                consistency_distillation_loss, consistency_sample, consistency_times,
                                consistency_training_loss, ct_schedule, online_target)
from jaxgen.losses import flow_matching_loss
from jaxgen.metrics import sliced_wasserstein
from jaxgen.models import MLPField
from jaxgen.oracle import GaussianMixture
from jaxgen.paths import GaussianPath
from jaxgen.samplers import sample_ode
from jaxgen.train import Trainer

LINEAR = GaussianPath.from_name("linear")
GM = GaussianMixture.eight_gaussians(radius=3.0, std=0.3)
SIGMA_DATA = float(jnp.sqrt(jnp.mean(jnp.diag(GM.covariance()))))  # 2.14
TEACHER = GM.velocity_field(LINEAR)
DATA = lambda key: GM.sample(key, 256)
N_EVAL = 2000
X0 = jax.random.normal(jax.random.key(5), (N_EVAL, 2))
REF = GM.sample(jax.random.key(6), N_EVAL)
SW_KEY = jax.random.key(7)


def _net(seed=0, width=64):
    return MLPField(2, width=width, hidden_layers=3, rngs=nnx.Rngs(seed))


_SW = jax.jit(lambda x: sliced_wasserstein(x, REF, SW_KEY))  # one compilation for every (2000, 2) set


def _sw(x):
    return float(_SW(x))


def _flow_map(field, x, t, steps=200):
    """Exact consistency function of the teacher: Heun from per-sample times t to 1 (s = (tau - t)/(1 - t))."""
    def body(x, s):
        tau = t + s[0] * (1 - t)
        tau_next = t + s[1] * (1 - t)
        h = (tau_next - tau)[:, None]
        k1 = field(x, tau)
        k2 = field(x + h * k1, tau_next)
        return x + 0.5 * h * (k1 + k2), None
    grid = jnp.linspace(0.0, 1.0, steps + 1)
    return jax.lax.scan(body, x, jnp.stack([grid[:-1], grid[1:]], 1))[0]


@pytest.fixture(scope="module")
def exact_map_at_noise():
    return jax.jit(lambda x: _flow_map(TEACHER, x, jnp.zeros(x.shape[0])))(X0)


# -- the parameterisation ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["linear", "vp"])
def test_boundary_condition_is_exact(name):
    path = GaussianPath.from_name(name)
    f = ConsistencyFunction(_net(1), path, sigma_data=0.7)
    x = 3.0 * jax.random.normal(jax.random.key(0), (64, 2))
    t_end = path.schedule.t_max
    np.testing.assert_array_equal(f(x, jnp.full((64,), t_end)), x)
    ts = jnp.linspace(path.schedule.t_min, t_end, 101)
    at_end, mid, (c_skip, c_out, c_in) = jax.jit(lambda m, x: (
        m(x, t_end), m(x, jnp.full((64,), 0.5)), consistency_coefficients(path, ts, sigma_data=0.7)))(f, x)
    np.testing.assert_array_equal(at_end, x)  # compiled, scalar t
    assert float(c_skip[-1]) == 1.0 and float(c_out[-1]) == 0.0
    # away from the boundary the network contributes, and every coefficient is finite on the domain
    assert float(jnp.max(jnp.abs(mid - x))) > 1e-2
    assert all(bool(jnp.all(jnp.isfinite(c))) for c in (c_skip, c_out, c_in))


def test_coefficients_are_the_papers_edm_formulas():
    """EDM (alpha = 1): exactly Song et al.'s c_skip/c_out at sigma with boundary sigma_e; linear path: the same
    formulas at sigma = (1 - t)/t after rescaling x by 1/alpha_t (c_skip_ours * alpha_t = c_skip_EDM)."""
    sd = 0.5
    edm = GaussianPath.from_name("edm")
    t = jnp.linspace(0.0, 1.0, 51)  # includes the boundary t = 1 (sigma = sigma_e)
    sig, sig_e = edm.coefficients(t).beta, edm.coefficients(jnp.asarray(1.0)).beta
    c_skip, c_out, c_in = consistency_coefficients(edm, t, sigma_data=sd)
    np.testing.assert_allclose(c_skip, sd**2 / ((sig - sig_e) ** 2 + sd**2), rtol=1e-5)
    np.testing.assert_allclose(c_out, (sig - sig_e) * sd / jnp.sqrt(sig**2 + sd**2), rtol=1e-5)
    np.testing.assert_allclose(c_in, 1 / jnp.sqrt(sig**2 + sd**2), rtol=1e-5)
    assert float(c_skip[-1]) == 1.0 and float(c_out[-1]) == 0.0  # exact at the boundary sigma = sigma_e > 0

    t = jnp.linspace(0.05, 0.95, 19)
    sig = (1 - t) / t
    c_skip, c_out, c_in = consistency_coefficients(LINEAR, t, sigma_data=sd)
    np.testing.assert_allclose(c_skip * t, sd**2 / (sig**2 + sd**2), rtol=1e-5)
    np.testing.assert_allclose(c_out, sig * sd / jnp.sqrt(sig**2 + sd**2), rtol=1e-5)
    np.testing.assert_allclose(c_in * t, 1 / jnp.sqrt(sig**2 + sd**2), rtol=1e-5)
    # at the noise end (alpha_0 = 0) the output is the network alone, scaled by sigma_data
    c_skip0, c_out0, _ = consistency_coefficients(LINEAR, jnp.zeros(1), sigma_data=sd)
    assert float(c_skip0[0]) == 0.0 and float(c_out0[0]) == pytest.approx(sd)


def test_invalid_arguments_raise():
    with pytest.raises(ValueError, match="sigma_data"):
        ConsistencyFunction(_net(), LINEAR, sigma_data=0.0)
    with pytest.raises(ValueError, match="t_end"):
        ConsistencyFunction(_net(), LINEAR, t_end=1.5)
    with pytest.raises(ValueError, match="solver"):
        consistency_distillation_loss(LINEAR, TEACHER, solver="rk4")
    with pytest.raises(ValueError, match="distance"):
        consistency_training_loss(LINEAR, distance="lpips")
    with pytest.raises(ValueError, match="num_scales"):
        consistency_training_loss(LINEAR, num_scales=1)
    with pytest.raises(ValueError, match="target_decay"):
        ConsistencyTrainer(_net(), consistency_training_loss(LINEAR), optax.adam(1e-3), target_decay=1.0)


# -- discretisation, schedule, sampler -------------------------------------------------------

def test_grid_and_ct_schedule():
    ts = consistency_times(5, LINEAR)
    np.testing.assert_allclose(ts, [0.0, 0.25, 0.5, 0.75, 1.0], atol=1e-7)
    ts = consistency_times(11, LINEAR, rho=3.0)
    assert float(ts[0]) == 0.0 and float(ts[-1]) == 1.0 and bool(jnp.all(jnp.diff(jnp.diff(ts)) < 0))  # denser near data
    n_fn, mu_fn = ct_schedule(1000, s0=2, s1=150, mu0=0.9)
    ns = [int(n_fn(k)) for k in (0, 250, 500, 1000, 5000)]
    assert ns[0] == 2 and ns[3] == 151 and ns[4] == 151 and ns == sorted(ns)  # Song et al. App. C: N(0)=s0, N(K)=s1+1
    assert float(mu_fn(0)) == pytest.approx(0.9) and float(mu_fn(1000)) == pytest.approx(np.exp(2 * np.log(0.9) / 151))


@pytest.mark.parametrize("name", ["linear", "ve"])
def test_multistep_sampler_counts_calls_and_renoises_to_the_path(name):
    """Algorithm 1: after f returns c (a point-mass 'data' estimate), the next input is
    alpha_s/alpha_e c + sqrt(beta_s^2 - (alpha_s beta_e/alpha_e)^2) xi."""
    path = GaussianPath.from_name(name)
    calls = []
    c = jnp.asarray([2.0, -1.0])

    def f(x, t):
        calls.append((x, t))
        return jnp.broadcast_to(c, x.shape)

    x = jax.random.normal(jax.random.key(0), (20000, 2))
    res = consistency_sample(f, x, path=path, ts=(0.0, 0.3, 0.6), key=jax.random.key(1))
    assert res.nfe == len(calls) == 3
    np.testing.assert_allclose(res.ts, [0.0, 0.3, 0.6], atol=1e-7)
    end = path.coefficients(jnp.asarray(path.schedule.t_max))
    for (xs, t), s in zip(calls[1:], (0.3, 0.6)):
        assert float(t[0]) == pytest.approx(s)
        co = path.coefficients(jnp.asarray(s))
        scale = float(co.alpha / end.alpha)
        std = float(jnp.sqrt(co.beta**2 - (scale * end.beta) ** 2))
        np.testing.assert_allclose(jnp.mean(xs, 0), scale * c, atol=0.03 * max(std, 1.0))
        np.testing.assert_allclose(jnp.std(xs, 0), std, rtol=0.03)
    one = consistency_sample(f, x, path=path)
    assert one.nfe == 1
    with pytest.raises(ValueError, match="increasing"):
        consistency_sample(f, x, path=path, ts=(0.5, 0.2), key=jax.random.key(0))
    with pytest.raises(ValueError, match="key"):
        consistency_sample(f, x, path=path, ts=(0.0, 0.5))
    with pytest.raises(ValueError, match="t_end"):
        consistency_sample(f, x, path=path, ts=(0.0, path.schedule.t_max))


# -- losses and the EMA target --------------------------------------------------------------

def test_distillation_loss_vanishes_at_the_exact_flow_map():
    """The teacher step goes towards the data: the true consistency function (the oracle's ODE flow map to
    t = 1) has a near-zero CD loss, far below that of a one-Euler-step map; Heun beats Euler as the teacher."""
    exact = lambda x, t: _flow_map(TEACHER, x, t, steps=40)
    euler_map = lambda x, t: x + (1 - t)[:, None] * TEACHER(x, t)
    heun = consistency_distillation_loss(LINEAR, TEACHER, num_scales=18, solver="heun")
    euler = consistency_distillation_loss(LINEAR, TEACHER, num_scales=18, solver="euler")

    @jax.jit
    def losses(batch, key):
        return heun(exact, None, batch, key), euler(exact, None, batch, key), heun(euler_map, None, batch, key)

    l_exact_heun, l_exact_euler, l_euler_map = map(float, losses(GM.sample(jax.random.key(0), 512), jax.random.key(1)))
    print(f"CD loss: exact map {l_exact_heun:.2e} (Heun teacher), {l_exact_euler:.2e} (Euler teacher); "
          f"one-Euler-step map {l_euler_map:.2e}")
    assert l_exact_heun < 1e-3 * l_euler_map
    assert l_exact_heun < l_exact_euler


class _TinyNet(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x, t):
        return self.lin(jnp.concatenate([x, t[:, None]], -1))


def test_target_network_is_an_ema_of_the_online_weights():
    f = ConsistencyFunction(_TinyNet(nnx.Rngs(2)), LINEAR, sigma_data=SIGMA_DATA)
    loss = consistency_training_loss(LINEAR, num_scales=10)
    data = lambda key: 2.0 * jax.random.normal(key, (64, 2))
    tr = ConsistencyTrainer(f, loss, optax.sgd(1e-2), data=data, target_decay=0.5)
    s0 = tr.init(0)
    s1, _ = tr.steps(s0, 1)
    s2, _ = tr.steps(s1, 1)
    for e0, p1, p2, e2 in zip(*(jax.tree.leaves(v) for v in (s0.ema_params, s1.params, s2.params, s2.ema_params))):
        np.testing.assert_allclose(e2, 0.5 * (0.5 * e0 + 0.5 * p1) + 0.5 * p2, rtol=1e-5, atol=1e-7)
    # target=None (mu = 0) is the online network itself; online_target adapts the loss to the plain Trainer
    batch, key = data(jax.random.key(3)), jax.random.key(4)
    values = jax.jit(lambda m: (loss(m, None, batch, key), loss(m, m, batch, key), online_target(loss)(m, batch, key)))(f)
    assert float(values[0]) == float(values[1]) == float(values[2]) > 0


# -- end to end on a 2-D Gaussian mixture ----------------------------------------------------

def test_distillation_with_the_oracle_teacher_beats_one_step_euler(exact_map_at_noise):
    f = ConsistencyFunction(_net(0), LINEAR, sigma_data=SIGMA_DATA)
    loss = consistency_distillation_loss(LINEAR, TEACHER, num_scales=18, solver="heun")
    tr = ConsistencyTrainer(f, loss, optax.adam(1e-3), data=DATA, target_decay=0.95)
    state, losses = tr.steps(tr.init(0), 800)
    cd1, cd2, euler1 = jax.jit(lambda m: (consistency_sample(m, X0), consistency_sample(m, X0, ts=(0.0, 0.5),
                               key=jax.random.key(8)), sample_ode(TEACHER, X0, method="euler", steps=1)))(tr.model(state))
    sw_cd1, sw_cd2, sw_euler = _sw(cd1.x), _sw(cd2.x), _sw(euler1.x)
    sw_floor = _sw(GM.sample(jax.random.key(9), N_EVAL))
    err_cd = float(jnp.sqrt(jnp.mean(jnp.sum((cd1.x - exact_map_at_noise) ** 2, -1))))
    err_euler = float(jnp.sqrt(jnp.mean(jnp.sum((euler1.x - exact_map_at_noise) ** 2, -1))))
    print(f"CD loss {np.mean(losses[:50]):.4f} -> {np.mean(losses[-50:]):.4f}; sliced W2 to the data: "
          f"CD 1-step {sw_cd1:.3f}, CD 2-step {sw_cd2:.3f}, teacher 1-step Euler {sw_euler:.3f}, "
          f"data vs data {sw_floor:.3f}; RMSE to the exact ODE map: CD {err_cd:.3f}, Euler {err_euler:.3f}")
    assert cd1.nfe == 1 and cd2.nfe == 2 and euler1.nfe == 1
    assert np.mean(losses[-50:]) < 0.5 * np.mean(losses[:50])
    assert sw_cd1 < 0.25 * sw_euler
    assert err_cd < 0.5 * err_euler
    assert sw_cd2 < sw_cd1 + 0.1  # multistep is not worse beyond estimator noise


def test_consistency_training_from_scratch_beats_one_step_euler_of_flow_matching(exact_map_at_noise):
    """CT with the iCT recipe (pseudo-Huber, mu = 0, N growing 10 -> 41): no teacher, one network call."""
    steps = 1000
    n_fn, _ = ct_schedule(steps, s0=10, s1=40)
    f = ConsistencyFunction(_net(0), LINEAR, sigma_data=SIGMA_DATA)
    loss = consistency_training_loss(LINEAR, num_scales=n_fn, distance="pseudo_huber")
    tr = ConsistencyTrainer(f, loss, optax.adam(1e-3), data=DATA, target_decay=0.0)
    init = tr.init(0)
    state, losses = tr.steps(init, steps)
    fm = Trainer(_net(0), flow_matching_loss(LINEAR), optax.adam(1e-3), data=DATA)
    fm_state, _ = fm.steps(fm.init(0), steps)

    def err(model):  # distance to the true consistency function (the oracle's ODE map), at the noise end
        return jnp.sqrt(jnp.mean(jnp.sum((model(X0, jnp.zeros(N_EVAL)) - exact_map_at_noise) ** 2, -1)))

    @jax.jit
    def evaluate(ct0, ct, v):
        return (err(ct0), err(ct), consistency_sample(ct, X0).x, sample_ode(v, X0, method="euler", steps=1).x,
                sample_ode(v, X0, method="euler", steps=2).x)

    e_init, e_ct, ct1, fm1, fm2 = evaluate(tr.model(init), tr.model(state), fm.model(fm_state))
    e_init, e_ct = float(e_init), float(e_ct)
    sw_ct, sw_fm1, sw_fm2 = _sw(ct1), _sw(fm1), _sw(fm2)
    print(f"CT loss {np.mean(losses[:50]):.4f} -> {np.mean(losses[-50:]):.4f}; RMSE to the exact map "
          f"{e_init:.3f} -> {e_ct:.3f}; sliced W2: CT 1-step {sw_ct:.3f}, FM 1-step Euler {sw_fm1:.3f}, "
          f"FM 2-step Euler {sw_fm2:.3f}")
    assert np.mean(losses[-50:]) < 0.5 * np.mean(losses[:50])
    assert e_ct < 0.5 * e_init
    assert sw_ct < 0.5 * sw_fm1
