"""Rectified flow: straightness is exact on analytic curves, reflow pairs and losses are wired as stated, and
2-rectified flow / one-step distillation on the oracle's couplings are straighter and better in one step."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxgen.losses import regression_loss
from jaxgen.metrics import sliced_wasserstein
from jaxgen.models import MLPField
from jaxgen.oracle import GaussianMixture
from jaxgen.paths import GaussianPath
from jaxgen.couplings import pair_sampler, reflow_coupling, reflow_couplings
from jaxgen.losses import distillation_loss, reflow_loss
from jaxgen.metrics import straightness
from jaxgen.samplers import Euler, Heun, sample
from jaxgen.training import Trainer

LINEAR = GaussianPath.from_name("linear")
GM = GaussianMixture.eight_gaussians(radius=3.0, std=0.3)
V1 = GM.velocity_field(LINEAR)  # the exact marginal velocity: the 1-rectified flow of N(0, I) -> GM
SOURCE = lambda key, n: jax.random.normal(key, (n, 2))


# -- straightness ---------------------------------------------------------------------------

def _curve(ts, a, offsets):
    """x(t) = offset + (t, a sin(pi t)): x_1 - x_0 = (1, 0), dx/dt = (1, a pi cos(pi t)), S = a^2 pi^2 / 2."""
    return offsets[None] + jnp.stack([jnp.broadcast_to(ts[:, None], (ts.shape[0], offsets.shape[0])),
                                      a * jnp.sin(jnp.pi * ts)[:, None] * jnp.ones(offsets.shape[0])], -1)


@pytest.mark.slow
def test_straightness_is_zero_for_straight_lines():
    ts = jnp.sort(jnp.concatenate([jnp.array([0.0, 1.0]), jax.random.uniform(jax.random.key(0), (30,))]))
    x0, x1 = jax.random.normal(jax.random.key(1), (2, 16, 3))
    traj = x0[None] + ts[:, None, None] * (x1 - x0)[None]
    assert float(straightness(traj, ts)) < 1e-9
    field = lambda x, t: jnp.broadcast_to(x1 - x0, x.shape)  # the constant velocity of these lines
    assert float(straightness(traj, ts, field)) < 1e-9
    # the same points run at a non-constant speed are not straight in Liu et al.'s sense
    bent = x0[None] + (ts**2)[:, None, None] * (x1 - x0)[None]
    assert float(straightness(bent, ts)) > 0.1


@pytest.mark.slow
def test_straightness_of_a_sine_curve_matches_its_closed_form():
    a = 0.7
    ts = jnp.linspace(0.0, 1.0, 2001)
    traj = _curve(ts, a, jnp.array([[0.0, 0.0], [2.0, -1.0], [-3.0, 5.0]]))
    exact = a**2 * np.pi**2 / 2
    np.testing.assert_allclose(float(straightness(traj, ts)), exact, rtol=1e-3)
    field = lambda x, t: jnp.stack([jnp.ones_like(t), a * jnp.pi * jnp.cos(jnp.pi * t)], -1)
    np.testing.assert_allclose(float(straightness(traj, ts, field)), exact, rtol=1e-3)
    per = straightness(traj, ts, per_sample=True)
    assert per.shape == (3,)
    # reversed time (data -> noise) gives the same value
    np.testing.assert_allclose(float(straightness(traj[::-1], ts[::-1])), exact, rtol=1e-3)


def test_straightness_rejects_bad_grids():
    traj = jnp.zeros((5, 4, 2))
    with pytest.raises(ValueError, match="len\\(ts\\)"):
        straightness(traj, jnp.linspace(0, 1, 4))
    with pytest.raises(ValueError, match="monotone"):
        straightness(traj, jnp.array([0.0, 0.5, 0.5, 0.7, 1.0]))


# -- reflow plumbing ----------------------------------------------------------------------------

def _swirl(x, t, **_):
    """A cheap smooth velocity field (the plumbing tests need a flow, not a good one)."""
    return jnp.tanh(x[:, ::-1]) * jnp.array([1.0, -1.0]) + (1.0 + t)[:, None] * 0.3


@pytest.mark.slow
def test_reflow_couplings_loss_and_coupling_hook_agree():
    x0 = SOURCE(jax.random.key(0), 64)
    model = MLPField(2, width=16, hidden_layers=2, rngs=nnx.Rngs(0))
    key = jax.random.key(3)
    # regression_loss with the hook draws eps from split(key, 3)[1] and trains on (eps, ODE(eps)): the same loss
    # as reflow_loss on those pairs (same t draw), whatever data minibatch it is given.
    eps = jax.random.normal(jax.random.split(key, 3)[1], (64, 2))

    @jax.jit
    def run(model):
        pairs = reflow_couplings(_swirl, None, None, x0, solver="heun", steps=8)
        drawn = reflow_couplings(_swirl, jax.random.key(0), 64, SOURCE, solver="heun", steps=8)
        direct = sample(_swirl, x0, Heun(), steps=8).x
        hooked = regression_loss(LINEAR, coupling=reflow_coupling(_swirl, steps=8))(model, GM.sample(key, 64), key)
        fixed = reflow_loss(LINEAR)(model, reflow_couplings(_swirl, None, None, eps, steps=8), key)
        return pairs, drawn, direct, hooked, fixed

    pairs, drawn, direct, hooked, fixed = run(model)
    np.testing.assert_array_equal(pairs["x0"], x0)
    np.testing.assert_allclose(pairs["x1"], direct, rtol=1e-6)
    np.testing.assert_allclose(drawn["x1"], pairs["x1"], rtol=1e-6)
    assert float(jnp.min(jnp.linalg.norm(pairs["x1"] - x0, axis=-1))) > 0.1  # the flow moved the points
    np.testing.assert_allclose(float(hooked), float(fixed), rtol=1e-5)
    with pytest.raises(ValueError, match="n=10"):
        reflow_couplings(_swirl, None, 10, x0)
    with pytest.raises(ValueError, match="key and n"):
        reflow_couplings(_swirl, None, None, SOURCE)

    # on a straight coupling x1 = x0 + c the constant field c is exact: zero reflow and distillation losses
    c = jnp.array([1.5, -0.5])
    straight = {"x0": x0, "x1": x0 + c}
    const = lambda x, t: jnp.broadcast_to(c, x.shape)
    assert float(reflow_loss()(const, straight, key)) < 1e-10
    assert float(distillation_loss()(const, straight, key)) < 1e-10
    assert float(reflow_loss()(lambda x, t: 0 * x, straight, key)) > 1.0
    with pytest.raises(ValueError, match="x0"):
        reflow_loss()(const, {"x": x0}, key)
    data = pair_sampler(straight, 32)(jax.random.key(4))
    assert data["x0"].shape == (32, 2)
    np.testing.assert_allclose(data["x1"] - data["x0"], jnp.broadcast_to(c, (32, 2)), rtol=1e-6)


def test_labels_reach_the_field_and_the_pair_is_noise_at_t0_data_at_t1():
    """Conditioning is passed to the flow in reflow_couplings, reflow_loss, distillation_loss and straightness, and
    kept with its pairs by pair_sampler; reflow_loss regresses v(t x1 + (1 - t) x0, t) onto x1 - x0."""
    x0 = np.random.default_rng(0).standard_normal((64, 2)).astype(np.float32)
    y = (np.arange(64) % 4).astype(np.float32)
    key = jax.random.key(1)

    def field(x, t, y):  # a label-dependent flow (no default label: a missing y raises)
        return _swirl(x, t) + 0.5 * y[:, None]

    def run(x0, y):
        pairs = reflow_couplings(field, None, None, x0, steps=8, cond={"y": y})
        direct = sample(lambda x, t: field(x, t, y=y), x0, Heun(), steps=8).x
        unlabelled = {"x0": pairs["x0"], "x1": pairs["x1"]}
        bound = lambda x, t: field(x, t, y=y)
        losses = (reflow_loss()(field, pairs, key), reflow_loss()(bound, unlabelled, key),
                  distillation_loss()(field, pairs, key), distillation_loss()(bound, unlabelled, key))
        r = sample(bound, x0, Heun(), steps=8, save_trajectory=True)
        s = (straightness(r.trajectory, r.ts, field, cond={"y": y}), straightness(r.trajectory, r.ts, bound))
        seen = {}

        def recorder(x, t, y):
            seen["x"], seen["t"], seen["y"] = x, t, y
            return x

        reflow_loss()(recorder, pairs, key)
        return pairs, direct, losses, s, seen, pair_sampler(pairs, 16)(jax.random.key(2))

    pairs, direct, losses, s, seen, batch = jax.tree.map(np.asarray, jax.jit(run)(x0, y))
    np.testing.assert_array_equal(pairs["y"], y)
    np.testing.assert_allclose(pairs["x1"], direct, rtol=1e-6)
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)
    np.testing.assert_allclose(losses[2], losses[3], rtol=1e-6)
    np.testing.assert_allclose(s[0], s[1], rtol=1e-6)
    np.testing.assert_array_equal(seen["y"], y)
    t = seen["t"][:, None]
    np.testing.assert_allclose(seen["x"], t * pairs["x1"] + (1 - t) * pairs["x0"], rtol=1e-5, atol=1e-6)
    i = np.argmin(np.sum((batch["x0"][:, None] - x0[None]) ** 2, -1), -1)  # which pair each row is
    np.testing.assert_array_equal(batch["y"], y[i])
    np.testing.assert_array_equal(batch["x1"], pairs["x1"][i])


# -- 2-rectified flow and distillation on the oracle's couplings ------------------------------------

@pytest.mark.slow
def test_reflow_on_oracle_couplings_straightens_and_improves_one_step_samples():
    pairs = jax.jit(lambda k: reflow_couplings(V1, k, 2048, SOURCE, solver="heun", steps=32))(jax.random.key(0))
    data = pair_sampler(pairs, 256)
    rf = Trainer(MLPField(2, width=64, hidden_layers=3, rngs=nnx.Rngs(0)), reflow_loss(LINEAR), optax.adam(1e-3),
                 data=data)
    rf_state, rf_losses = rf.steps(rf.init(0), 600)
    dist = Trainer(MLPField(2, width=64, hidden_layers=3, rngs=nnx.Rngs(0)), distillation_loss(), optax.adam(1e-3),
                   data=data)
    dist_state, _ = dist.steps(dist.init(0), 600)
    v2, one_step = rf.model(rf_state), dist.model(dist_state)

    x0 = SOURCE(jax.random.key(5), 2000)
    ref = GM.sample(jax.random.key(6), 2000)
    sw_jit = jax.jit(lambda x: sliced_wasserstein(x, ref, jax.random.key(7)))
    sw = lambda x: float(sw_jit(x))

    @jax.jit
    def evaluate(v2, one_step):
        out = {}
        for name, v in (("1-RF", V1), ("2-RF", v2)):
            r = sample(v, x0, Heun(), steps=32, save_trajectory=True)
            out[name] = (straightness(r.trajectory, r.ts), sample(v, x0, Euler(), steps=1).x, r.x)
        return out, sample(one_step, x0, Euler(), steps=1).x

    out, distilled = evaluate(v2, one_step)
    s1, s2 = float(out["1-RF"][0]), float(out["2-RF"][0])
    sw1, sw2, sw_d = sw(out["1-RF"][1]), sw(out["2-RF"][1]), sw(distilled)
    sw_floor = sw(GM.sample(jax.random.key(9), 2000))
    print(f"reflow loss {np.mean(rf_losses[:50]):.3f} -> {np.mean(rf_losses[-50:]):.4f}; straightness 1-RF {s1:.3f}, "
          f"2-RF {s2:.4f}; sliced W2 of 1-step Euler: 1-RF {sw1:.3f}, 2-RF {sw2:.3f}, distilled {sw_d:.3f}; "
          f"32-step Heun: 1-RF {sw(out['1-RF'][2]):.3f}, 2-RF {sw(out['2-RF'][2]):.3f}; data vs data {sw_floor:.3f}")
    assert s2 < 0.1 * s1
    assert sw2 < 0.25 * sw1
    assert sw_d < 0.25 * sw1
