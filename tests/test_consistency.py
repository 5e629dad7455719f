"""Consistency models: the boundary condition is exact, the coefficients are EDM's, the losses pair the
right times and pass labels to every network, the target is an EMA, and distillation / training from scratch
give good 1-step samples."""

import functools

import chex
import numpy as np
import pytest
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxgen.fields import consistency_coefficients
from jaxgen.losses import consistency_distillation_loss, consistency_times, consistency_training_loss, ct_schedule
from jaxgen.models import ConsistencyFunction
from jaxgen.samplers import ConsistencyMultistep, Euler, sample
from jaxgen.training import Trainer
from jaxgen.fields import as_field
from jaxgen.metrics import sliced_wasserstein
from jaxgen.models import MLPField
from jaxgen.oracle import GaussianMixture
from jaxgen.paths import GaussianPath

LINEAR = GaussianPath.from_name("linear")
GM = GaussianMixture.eight_gaussians(radius=3.0, std=0.3)
TEACHER = GM.velocity_field(LINEAR)
DATA = lambda key: GM.sample(key, 256)
N_EVAL = 2000
_gm_sample = jax.jit(GM.sample, static_argnums=1)  # compiled once per size (eager ops compile one by one)
X0, REF, _COV = jax.jit(lambda: (jax.random.normal(jax.random.key(5), (N_EVAL, 2)),
                                 GM.sample(jax.random.key(6), N_EVAL), GM.covariance()))()
SIGMA_DATA = float(np.sqrt(np.mean(np.diag(_COV))))  # 2.14
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
    net = _net(1)
    f = ConsistencyFunction(net, path, sigma_data=0.7)
    g = ConsistencyFunction(net, path, parameterization="denoiser", prediction="velocity")
    x = 3.0 * np.random.default_rng(0).standard_normal((64, 2)).astype(np.float32)
    t_end = path.schedule.t_max
    ts = np.linspace(path.schedule.t_min, t_end, 101)
    at_end, at_end_b, mid, g_end, g_mid, coeffs = jax.tree.map(np.asarray, jax.jit(lambda m, g, x, ts: (
        m(x, t_end), m(x, jnp.full((64,), t_end)), m(x, jnp.full((64,), 0.5)), g(x, t_end), g(x, 0.5),
        consistency_coefficients(path, ts, sigma_data=0.7)))(f, g, x, ts))
    for out in (at_end, at_end_b, g_end):  # scalar and (B,) t; skip and denoiser parameterisations
        np.testing.assert_array_equal(out, x)
    c_skip, c_out, c_in = coeffs
    assert c_skip[-1] == 1.0 and c_out[-1] == 0.0
    # away from the boundary the network contributes, and every coefficient is finite on the domain
    assert np.max(np.abs(mid - x)) > 1e-2 and np.max(np.abs(g_mid - x)) > 1e-2
    assert all(np.all(np.isfinite(c)) for c in coeffs)


def test_coefficients_are_the_papers_edm_formulas():
    """EDM (alpha = 1): exactly Song et al.'s c_skip/c_out at sigma with boundary sigma_e; linear path: the same
    formulas at sigma = (1 - t)/t after rescaling x by 1/alpha_t (c_skip_ours * alpha_t = c_skip_EDM)."""
    sd = 0.5
    edm = GaussianPath.from_name("edm")
    t = np.linspace(0.0, 1.0, 51)  # includes the boundary t = 1 (sigma = sigma_e)
    t_lin = np.linspace(0.05, 0.95, 19)
    sig, sig_e, (c_skip, c_out, c_in), lin, lin0 = jax.tree.map(np.asarray, jax.jit(lambda t, t_lin: (
        edm.coefficients(t).beta, edm.coefficients(jnp.float32(1.0)).beta,
        consistency_coefficients(edm, t, sigma_data=sd), consistency_coefficients(LINEAR, t_lin, sigma_data=sd),
        consistency_coefficients(LINEAR, jnp.zeros(1), sigma_data=sd)))(t, t_lin))
    np.testing.assert_allclose(c_skip, sd**2 / ((sig - sig_e) ** 2 + sd**2), rtol=1e-5)
    np.testing.assert_allclose(c_out, (sig - sig_e) * sd / np.sqrt(sig**2 + sd**2), rtol=1e-5)
    np.testing.assert_allclose(c_in, 1 / np.sqrt(sig**2 + sd**2), rtol=1e-5)
    assert c_skip[-1] == 1.0 and c_out[-1] == 0.0  # exact at the boundary sigma = sigma_e > 0
    # the same against the paper's numbers, independent of the schedule code: Karras sigma(t) and sigma_min = 0.002
    karras = (80 ** (1 / 7) + t * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    np.testing.assert_allclose(c_skip, sd**2 / ((karras - 0.002) ** 2 + sd**2), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(c_out, (karras - 0.002) * sd / np.sqrt(karras**2 + sd**2), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(c_in, 1 / np.sqrt(karras**2 + sd**2), rtol=1e-5)

    sig = (1 - t_lin) / t_lin
    c_skip, c_out, c_in = lin
    np.testing.assert_allclose(c_skip * t_lin, sd**2 / (sig**2 + sd**2), rtol=1e-5)
    np.testing.assert_allclose(c_out, sig * sd / np.sqrt(sig**2 + sd**2), rtol=1e-5)
    np.testing.assert_allclose(c_in * t_lin, 1 / np.sqrt(sig**2 + sd**2), rtol=1e-5)
    # at the noise end (alpha_0 = 0) the output is the network alone, scaled by sigma_data
    c_skip0, c_out0, _ = lin0
    assert c_skip0[0] == 0.0 and c_out0[0] == pytest.approx(sd)


def test_denoiser_parameterization_decodes_the_network_and_passes_cond():
    """f = alpha_e z_hat + beta_e eps_hat: x + (1 - t) u on the linear path for a velocity network, the network itself
    for a data network, D + sigma_min (x - D) / sigma on edm (beta_e = 0.002); labels reach the network."""
    def net(x, t, y):  # a label-dependent stand-in network
        return jnp.sin(x + y[:, None]) * (1.0 + t[:, None])

    x = np.random.default_rng(0).standard_normal((32, 2)).astype(np.float32)
    y0, y1 = np.zeros(32, np.float32), (np.arange(32) % 3 + 1.0).astype(np.float32)
    t = np.linspace(0.0, 0.9, 32)
    ref = np.sin(x + y1[:, None]) * (1.0 + t[:, None])  # net(x, t, y1)
    vel = ConsistencyFunction(net, LINEAR, parameterization="denoiser", prediction="velocity")
    data = ConsistencyFunction(net, LINEAR, parameterization="denoiser", prediction="x0")
    data_edm = ConsistencyFunction(net, "edm", parameterization="denoiser", prediction="data")
    skip = ConsistencyFunction(net, LINEAR, sigma_data=0.7)
    out = [np.asarray(o) for o in jax.jit(lambda x, t: (
        vel(x, t, y=y1), data(x, t, y=y1), data_edm(x, t, y=y1), skip(x, t, y=y0), skip(x, t, y=y1)))(x, t)]
    np.testing.assert_allclose(out[0], x + (1 - t)[:, None] * ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[1], ref, rtol=1e-5, atol=1e-6)
    sigma = ((80 ** (1 / 7) + t * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7)[:, None]
    np.testing.assert_allclose(out[2], ref + 0.002 * (x - ref) / sigma, rtol=1e-5, atol=1e-6)
    assert np.max(np.abs(out[3] - out[4])) > 1e-2  # the skip parameterisation passes the labels too
    with pytest.raises(ValueError, match="parameterization"):
        ConsistencyFunction(net, LINEAR, parameterization="skip")
    with pytest.raises(ValueError, match="alpha = 0"):  # eps cannot be decoded at t = 0 of the linear path
        ConsistencyFunction(net, LINEAR, parameterization="denoiser", prediction="eps")


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
    with pytest.raises(ValueError, match="ema_decay"):
        Trainer(_net(), consistency_training_loss(LINEAR), optax.adam(1e-3), ema_decay=1.0)
    with pytest.raises(ValueError, match="t_min"):  # an eps teacher has no velocity at alpha = 0
        consistency_distillation_loss(LINEAR, TEACHER, teacher_prediction="eps")
    consistency_distillation_loss(LINEAR, TEACHER, teacher_prediction="eps", t_min=1e-3)


# -- discretisation, schedule, sampler -------------------------------------------------------

def test_grid_and_ct_schedule():
    ts = consistency_times(5, LINEAR)
    np.testing.assert_allclose(ts, [0.0, 0.25, 0.5, 0.75, 1.0], atol=1e-7)
    ts = np.asarray(consistency_times(11, LINEAR, rho=3.0))
    assert ts[0] == 0.0 and ts[-1] == 1.0 and np.all(np.diff(np.diff(ts)) < 0)  # denser near data
    n_fn, mu_fn = ct_schedule(1000, s0=2, s1=150, mu0=0.9)
    k = np.append(np.arange(0, 1001), 5000)  # every step against Song et al.'s formula in float64, and past K
    n_got, mu_got = jax.jit(jax.vmap(lambda k: (n_fn(k), mu_fn(k))))(k)
    n_ref = np.ceil(np.sqrt(np.minimum(k, 1000) / 1000 * (151**2 - 2**2) + 2**2) - 1) + 1
    np.testing.assert_array_equal(n_got, n_ref)
    assert n_got[0] == 2 and n_got[1000] == 151 and n_got[-1] == 151  # App. C: N(0) = s0, N(K) = s1 + 1
    np.testing.assert_allclose(mu_got, np.exp(2 * np.log(0.9) / n_ref), rtol=1e-6)
    assert mu_got[0] == pytest.approx(0.9) and mu_got[1000] == pytest.approx(np.exp(2 * np.log(0.9) / 151))


@pytest.mark.parametrize("name", ["linear", "ve"])
def test_multistep_sampler_counts_calls_and_renoises_to_the_path(name):
    """Algorithm 1: after f returns c (a point-mass 'data' estimate), the next input is
    alpha_s/alpha_e c + sqrt(beta_s^2 - (alpha_s beta_e/alpha_e)^2) xi."""
    path = GaussianPath.from_name(name, **({"sigma_min": 0.04} if name == "ve" else {}))  # beta_e visible at s ~ 1
    calls = []
    c = np.asarray([2.0, -1.0], np.float32)

    def f(x, t, **cond):
        calls.append((x, t))
        assert set(cond) == {"y"} and cond["y"] is y  # the labels reach every call
        return jnp.broadcast_to(c, x.shape)

    x = np.random.default_rng(0).standard_normal((20000, 2)).astype(np.float32)
    y = np.arange(20000) % 10
    end = path.schedule.t_max
    res = sample(f, x, ConsistencyMultistep(), prediction="data", path=path, ts=(0.0, 0.3, 0.95, end),
                 key=jax.random.key(1), cond={"y": y})
    assert res.nfe == len(calls) == 3
    np.testing.assert_allclose(res.ts, [0.0, 0.3, 0.95], atol=1e-7)
    for (xs, t), s in zip(calls[1:], (0.3, 0.95)):
        xs = np.asarray(xs)
        assert float(t[0]) == pytest.approx(s)
        # closed forms: linear alpha_s = s, beta_s = 1 - s, alpha_e = 1, beta_e = 0; VE alpha = 1,
        # beta_s = 0.04 * 1250^(1 - s), beta_e = sigma_min = 0.04
        scale, std = (s, 1 - s) if name == "linear" else (1.0, np.sqrt((0.04 * 1250 ** (1 - s)) ** 2 - 0.04**2))
        np.testing.assert_allclose(np.mean(xs, 0), scale * c, atol=0.03 * max(std, 1.0))
        np.testing.assert_allclose(np.std(xs, 0), std, rtol=0.03)
    one = sample(f, x, ConsistencyMultistep(), prediction="data", path=path, cond={"y": y})
    assert one.nfe == 1
    with pytest.raises(ValueError, match="increasing"):
        sample(f, x, ConsistencyMultistep(), prediction="data", path=path, ts=(0.5, 0.2, end), key=jax.random.key(0))
    with pytest.raises(ValueError, match="key"):
        sample(f, x, ConsistencyMultistep(), prediction="data", path=path, ts=(0.0, 0.5, end))
    with pytest.raises(ValueError, match="t_end"):
        sample(f, x, ConsistencyMultistep(), prediction="data", path=path, ts=(0.0, 0.5))


# -- losses and the EMA target --------------------------------------------------------------

@pytest.mark.slow
def test_distillation_loss_vanishes_at_the_exact_flow_map():
    """The teacher step goes towards the data: the true consistency function (the oracle's ODE flow map to
    t = 1) has a near-zero CD loss, far below that of a one-Euler-step map; Heun beats Euler as the teacher."""
    exact = lambda x, t: _flow_map(TEACHER, x, t, steps=40)
    euler_map = lambda x, t: x + (1 - t)[:, None] * TEACHER(x, t)
    heun = consistency_distillation_loss(LINEAR, TEACHER, num_scales=18, solver="heun")
    euler = consistency_distillation_loss(LINEAR, TEACHER, num_scales=18, solver="euler")

    @jax.jit
    def losses(batch, key):
        return heun(exact, batch, key), euler(exact, batch, key), heun(euler_map, batch, key)

    l_exact_heun, l_exact_euler, l_euler_map = map(float, losses(_gm_sample(jax.random.key(0), 512), jax.random.key(1)))
    print(f"CD loss: exact map {l_exact_heun:.2e} (Heun teacher), {l_exact_euler:.2e} (Euler teacher); "
          f"one-Euler-step map {l_euler_map:.2e}")
    assert l_exact_heun < 1e-3 * l_euler_map
    assert l_exact_heun < l_exact_euler


def _recorder(log, name, fn):
    """A field that records (x, t, labels) of each call in log[name] and returns fn(x, t)."""
    def f(x, t, **cond):
        log.setdefault(name, []).append((x, t, cond["y"]))
        return fn(x, t)
    return f


def _pairs(make_loss, batch, key):
    """The (x, t, y) every network of a consistency loss was called with (a compiled run, records returned)."""
    def run(batch, key):
        log = {}
        make_loss(lambda f: _recorder(log, "teacher", f))(
            _recorder(log, "online", lambda x, t: x), batch, key, target=_recorder(log, "target", lambda x, t: x))
        return log
    return jax.tree.map(np.asarray, jax.jit(run)(batch, key))


@functools.partial(jax.jit, static_argnums=0)
def _teacher_steps(u, x, t0, t1):
    """The Heun step of a velocity field u from t0 to t1 (per sample), computed independently of the losses."""
    h = (t1 - t0)[:, None]
    k1 = u(x, t0)
    return x + 0.5 * h * (k1 + u(x + h * k1, t1))


@pytest.mark.slow
def test_losses_compare_the_online_net_at_the_noisier_time_with_the_target_at_the_next():
    """Algorithms 2-3 in jaxgen time: the online f_theta sees x_{tau_n} = alpha z + beta eps at tau_n, the target
    the teacher's Heun step (CD) or the same eps (CT) at tau_{n+1} > tau_n; labels reach every network; the
    target is under stopgrad."""
    n_scales = 5
    grid = np.linspace(0.0, 1.0, n_scales)
    z = np.asarray(REF[:256])
    y = np.arange(256) % 8
    key = jax.random.key(1)
    cd = _pairs(lambda rec: consistency_distillation_loss(LINEAR, rec(TEACHER), num_scales=n_scales, solver="heun"),
                {"x": z, "y": y}, key)
    ct = _pairs(lambda rec: consistency_training_loss(LINEAR, num_scales=n_scales), {"x": z, "y": y}, key)
    for log, calls in ((cd, {"online": 1, "target": 1, "teacher": 2}), (ct, {"online": 1, "target": 1})):
        assert {k: len(v) for k, v in log.items()} == calls
        for _, _, labels in sum(log.values(), []):
            np.testing.assert_array_equal(labels, y)
        (x_on, t_on, _), (x_tg, t_tg, _) = log["online"][0], log["target"][0]
        idx = np.rint(t_on * (n_scales - 1)).astype(int)
        np.testing.assert_allclose(t_on, grid[idx], atol=1e-6)
        np.testing.assert_allclose(t_tg, grid[idx + 1], atol=1e-6)  # the next, less noisy, time
        assert set(idx.tolist()) == set(range(n_scales - 1))
    (x_on, t_on, _), (x_tg, t_tg, _) = cd["online"][0], cd["target"][0]
    np.testing.assert_allclose(x_tg, _teacher_steps(TEACHER, x_on, t_on, t_tg), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cd["teacher"][1][1], t_tg)  # Heun's second stage at tau_{n+1}
    (x_on, t_on, _), (x_tg, t_tg, _) = ct["online"][0], ct["target"][0]
    eps = (x_on - t_on[:, None] * z) / (1 - t_on)[:, None]  # x_{tau_n} = tau_n z + (1 - tau_n) eps
    np.testing.assert_allclose(x_tg, t_tg[:, None] * z + (1 - t_tg)[:, None] * eps, rtol=1e-5, atol=1e-5)
    assert 0.8 < np.std(eps) < 1.2
    # the target is under stopgrad: target=None differentiates only the online branch
    loss = consistency_training_loss(LINEAR, num_scales=n_scales)
    model = lambda w: (lambda x, t: w * x + t[:, None])
    g_none, g_frozen = jax.jit(lambda w: (jax.grad(lambda w: loss(model(w), z, key))(w),
                                          jax.grad(lambda w: loss(model(w), z, key, target=model(2.0)))(w)))(2.0)
    g_none, g_frozen = float(g_none), float(g_frozen)
    assert g_none == pytest.approx(g_frozen, rel=1e-6) and abs(g_none) > 1e-3


@pytest.mark.slow
def test_a_denoiser_teacher_takes_an_euler_step_into_the_data_end():
    """A data-prediction teacher has no velocity at t = 1 (beta = 0): the last interval is an Euler step (EDM's
    Algorithm 1 at sigma = 0), which on the linear path lands on the denoiser's output; the others are Heun."""
    denoiser = GM.field(LINEAR, "data")
    teacher = lambda x, t: denoiser(x, t) + 0.05 * jnp.tanh(x)  # an imperfect denoiser: D(x, 1) != x
    log = _pairs(lambda rec: consistency_distillation_loss(LINEAR, rec(teacher), num_scales=4, solver="heun",
                                                           teacher_prediction="data"),
                 {"x": REF[:256], "y": np.zeros(256, np.int32)}, jax.random.key(1))
    (x_on, t_on, _), (x_tg, t_tg, _) = log["online"][0], log["target"][0]
    last = t_tg == 1.0
    assert 0 < last.sum() < 256
    velocity = as_field(LINEAR, teacher, source="data", target="velocity")
    heun, denoised = jax.jit(lambda x, t0, t1: (_teacher_steps(velocity, x, t0, t1), teacher(x, t0)))(x_on, t_on, t_tg)
    np.testing.assert_allclose(x_tg[last], denoised[last], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x_tg[~last], heun[~last], rtol=1e-5, atol=1e-5)


class _TinyNet(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x, t):
        return self.lin(jnp.concatenate([x, t[:, None]], -1))


def test_target_network_is_an_ema_of_the_online_weights():
    """theta^- <- mu theta^- + (1 - mu) theta with the *new* online weights; the loss gets theta^- and the step."""
    f = ConsistencyFunction(_TinyNet(nnx.Rngs(2)), LINEAR, sigma_data=SIGMA_DATA)
    data = lambda key: 2.0 * jax.random.normal(key, (64, 2))
    kernel = lambda m: m.network.lin.kernel[...]
    # a probe loss: moves the weights (sum), sees the target (gap) and the step (1000 step)
    probe = lambda m, batch, key, *, target, step: (jnp.sum((kernel(m) - kernel(target)) ** 2) + jnp.sum(kernel(m))
                                                    + 1000.0 * step)
    tr = Trainer(f, probe, optax.sgd(1e-2), data=data, ema_decay=0.5, ema_warmup=False)
    s0 = tr.init(0)
    s1, _ = tr.step(s0)
    s2, value = tr.step(s1)
    want = jax.tree.map(lambda e0, p1, p2: 0.5 * (0.5 * e0 + 0.5 * p1) + 0.5 * p2, s0.ema_params, s1.params, s2.params)
    chex.assert_trees_all_close(s2.ema_params, want, rtol=1e-5, atol=1e-7)
    online, target = np.asarray(kernel(tr.model(s1))), np.asarray(kernel(tr.model(s1, ema=True)))
    assert np.sum((online - target) ** 2) > 1e-6 and np.max(np.abs(online - np.asarray(kernel(f)))) > 1e-3
    assert float(value) == pytest.approx(np.sum((online - target) ** 2) + np.sum(online) + 1000.0, rel=1e-6)
    # target=None (no EMA: mu = 0) is the online network itself
    loss = consistency_training_loss(LINEAR, num_scales=10)
    batch, key = data(jax.random.key(3)), jax.random.key(4)
    values = jax.jit(lambda m: (loss(m, batch, key), loss(m, batch, key, target=m)))(f)
    assert float(values[0]) == float(values[1]) > 0
    # without EMA the trainer passes target=None, and a schedule num_scales=f(step) sees the step
    seen = []
    steps_probe = lambda m, batch, key, *, target, step: (seen.append(target), jnp.sum(kernel(m)) * 0 + step)[1]
    plain = Trainer(f, steps_probe, optax.sgd(1e-2), data=data)
    assert float(plain.step(plain.step(plain.init(0))[0])[1]) == 1.0 and seen[0] is None


class _DropoutNet(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(3, 2, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x, t):
        return self.drop(self.lin(jnp.concatenate([x, t[:, None]], -1)))


def test_trainer_runs_a_dropout_network_with_the_online_masks_in_the_target():
    """A network in training mode (dropout RNG counters) trains with an EMA target; the target applies the online
    call's dropout masks (the reference implementation restores the RNG state), or none in eval mode (the consistency
    losses' target_eval)."""
    f = ConsistencyFunction(_DropoutNet(nnx.Rngs(0, dropout=1)), LINEAR)
    x, t = jnp.ones((64, 2)), jnp.full((64,), 0.3)
    for target_eval in (False, True):
        def gap(m, batch, key, *, target, target_eval=target_eval):
            if target_eval:
                target.eval()
            return jnp.sum((m.network(x, t) - target.network(x, t)) ** 2)

        tr = Trainer(f, gap, optax.sgd(1e-2), data=lambda key: jnp.zeros((8, 2)), ema_decay=0.0, ema_warmup=False)
        state, value = tr.step(tr.init(0))
        state, value2 = tr.step(state)  # the RNG state has advanced: new masks, still shared
        if target_eval:  # dropout in the online call only
            assert float(value) > 1e-3 and float(value2) > 1e-3
        else:  # the same masks in the target as in the online call (and mu = 0: the same weights)
            assert float(value) == 0.0 and float(value2) == 0.0


# -- end to end on a 2-D Gaussian mixture ----------------------------------------------------

@pytest.mark.slow
def test_distillation_with_the_oracle_teacher_beats_one_step_euler(exact_map_at_noise):
    f = ConsistencyFunction(_net(0), LINEAR, sigma_data=SIGMA_DATA)
    loss = consistency_distillation_loss(LINEAR, TEACHER, num_scales=18, solver="heun")
    tr = Trainer(f, loss, optax.adam(1e-3), data=DATA, ema_decay=0.95, ema_warmup=False)
    state, losses = tr.steps(tr.init(0), 800)
    cm = ConsistencyMultistep()
    cd1, cd2, euler1 = jax.jit(lambda m: (sample(m, X0, cm, prediction="data"),
                                          sample(m, X0, cm, prediction="data", ts=(0.0, 0.5, 1.0), key=jax.random.key(8)),
                                          sample(TEACHER, X0, Euler(), steps=1)))(tr.model(state))
    sw_cd1, sw_cd2, sw_euler = _sw(cd1.x), _sw(cd2.x), _sw(euler1.x)
    sw_floor = _sw(_gm_sample(jax.random.key(9), N_EVAL))
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


@pytest.mark.slow
def test_consistency_training_from_scratch_beats_one_step_euler_of_the_exact_flow(exact_map_at_noise):
    """CT with the iCT recipe (pseudo-Huber, mu = 0, N growing 10 -> 41): no teacher, one network call, and closer
    to the data than one Euler step of the exact marginal velocity (the flow-matching optimum)."""
    steps = 1000
    n_fn, _ = ct_schedule(steps, s0=10, s1=40)
    f = ConsistencyFunction(_net(0), LINEAR, sigma_data=SIGMA_DATA)
    loss = consistency_training_loss(LINEAR, num_scales=n_fn, distance="pseudo_huber")
    tr = Trainer(f, loss, optax.adam(1e-3), data=DATA, ema_decay=0.0, ema_warmup=False)
    init = tr.init(0)
    state, losses = tr.steps(init, steps)

    def err(model):  # distance to the true consistency function (the oracle's ODE map), at the noise end
        return jnp.sqrt(jnp.mean(jnp.sum((model(X0, jnp.zeros(N_EVAL)) - exact_map_at_noise) ** 2, -1)))

    @jax.jit
    def evaluate(ct0, ct):
        return (err(ct0), err(ct), sample(ct, X0, ConsistencyMultistep(), prediction="data").x,
                sample(TEACHER, X0, Euler(), steps=1).x,
                sample(TEACHER, X0, Euler(), steps=2).x)

    e_init, e_ct, ct1, euler1, euler2 = evaluate(tr.model(init), tr.model(state))
    e_init, e_ct = float(e_init), float(e_ct)
    sw_ct, sw_euler1, sw_euler2 = _sw(ct1), _sw(euler1), _sw(euler2)
    print(f"CT loss {np.mean(losses[:50]):.4f} -> {np.mean(losses[-50:]):.4f}; RMSE to the exact map "
          f"{e_init:.3f} -> {e_ct:.3f}; sliced W2: CT 1-step {sw_ct:.3f}, exact flow 1-step Euler {sw_euler1:.3f}, "
          f"2-step Euler {sw_euler2:.3f}")
    assert np.mean(losses[-50:]) < 0.5 * np.mean(losses[:50])
    assert e_ct < 0.5 * e_init
    assert sw_ct < 0.45 * sw_euler1


@pytest.mark.slow
def test_consistency_training_with_microbatches_and_bfloat16():
    """The one trainer runs consistency training with gradient accumulation and mixed precision: the online network,
    the EMA target and the batch are cast to bfloat16 in the loss, the master weights, the EMA and the loss stay
    float32, and training makes progress."""
    seen = []
    loss = consistency_training_loss(LINEAR, num_scales=10)

    def probe(m, batch, key, *, target, step):
        seen.append((m.network.layers[0].kernel.dtype, target.network.layers[0].kernel.dtype, batch.dtype))
        return loss(m, batch, key, target=target, step=step)

    f = ConsistencyFunction(_net(0), LINEAR, sigma_data=SIGMA_DATA)
    tr = Trainer(f, probe, optax.adam(1e-3), data=DATA, ema_decay=0.9, ema_warmup=False, microbatches=2,
                 compute_dtype=jnp.bfloat16)
    state, losses = tr.steps(tr.init(0), 200)
    assert {tuple(str(d) for d in s) for s in seen} == {("bfloat16", "bfloat16", "bfloat16")}
    assert all(v.dtype == jnp.float32 for v in jax.tree.leaves((state.params, state.ema_params)))
    losses = np.asarray(losses)
    assert losses.dtype == np.float32 and np.all(np.isfinite(losses))
    assert losses[-50:].mean() < losses[:50].mean()
