"""Flow maps (MeanFlow): the identity and the loss against the exact flow map of Gaussian data on the CondOT path."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from jaxgen.losses.flow_map import adaptive_weight, meanflow_loss, meanflow_target, meanflow_times
from jaxgen.samplers import RK4, sample

MU = jnp.array([1.5, -0.5])
S = 0.3  # data ~ N(MU, S^2 I); on the linear path x_t = t z + (1 - t) eps ~ N(t MU, sigma_t^2 I)


def _sigma(t):
    return jnp.sqrt((1 - t) ** 2 + (t * S) ** 2)


def velocity(x, t):
    """The marginal velocity: mu + (sigma_t' / sigma_t) (x - t mu)."""
    t = jnp.reshape(t, (-1, 1))
    rate = (-(1 - t) + t * S**2) / _sigma(t) ** 2
    return MU + rate * (x - t * MU)


def flow_map(x, r, t):
    """The exact average velocity: (psi_{r->t}(x) - x) / (t - r), psi(x) = t mu + sigma_t / sigma_r (x - r mu); the
    velocity on the diagonal."""
    r, t = jnp.reshape(r, (-1, 1)), jnp.reshape(t, (-1, 1))
    h = t - r
    safe = jnp.where(jnp.abs(h) > 1e-4, h, 1.0)
    jump = (t * MU + _sigma(t) / _sigma(r) * (x - r * MU) - x) / safe
    return jnp.where(jnp.abs(h) > 1e-4, jump, velocity(x, t[:, 0]))


def _points(n, key=0):
    k1, k2, k3 = jax.random.split(jax.random.key(key), 3)
    t = jax.random.uniform(k1, (n,), minval=0.05, maxval=0.95)
    r = t * jax.random.uniform(k2, (n,))
    x = r[:, None] * MU + _sigma(r)[:, None] * jax.random.normal(k3, (n, 2))
    return x, r, t


def test_one_jump_of_the_exact_flow_map_equals_the_ode_solve_and_its_diagonal_is_the_velocity():
    x, r, t = _points(4)
    for i in range(4):
        ts = jnp.linspace(r[i], t[i], 201)
        solved = sample(velocity, x[i:i + 1], RK4(), ts=ts).x
        jumped = x[i:i + 1] + (t[i] - r[i]) * flow_map(x[i:i + 1], r[i:i + 1], t[i:i + 1])
        np.testing.assert_allclose(jumped, solved, atol=1e-5)
    np.testing.assert_allclose(flow_map(x, t, t), velocity(x, t), atol=1e-6)


def test_the_exact_flow_map_satisfies_the_meanflow_identity():
    """With the marginal velocity, u = v + (t - r) du/dr holds exactly (off and on the diagonal)."""
    x, r, t = _points(256)
    for rr in (r, t):  # r < t, and r = t where the target is the velocity itself
        u, target = jax.jit(lambda x, rr, t: meanflow_target(flow_map, x, rr, t, velocity(x, rr)))(x, rr, t)
        np.testing.assert_allclose(u, target, atol=2e-4, rtol=1e-4)
    # a wrong map (the velocity at the start, as if the ODE were straight) violates it
    wrong = lambda x, r, t: velocity(x, r)  # noqa: E731
    u, target = meanflow_target(wrong, x, r, t, velocity(x, r))
    assert float(jnp.max(jnp.abs(u - target))) > 0.1


def _bump(x, r, t):
    """A smooth perturbation direction of a flow map."""
    return jnp.stack([jnp.sin(x[:, 0]) * t, jnp.cos(x[:, 1]) * (1 + r)], -1)


def _gradients_at_and_off_the_exact_map(loss, data, key):
    """``d/da loss(u + a bump)`` at ``a = 0``, for ``u`` the exact flow map and for the map already moved by
    ``0.3 bump``: a minimiser has the first near zero, the second clearly not."""
    def grad_along(base):
        g = jax.grad(lambda a: loss(lambda x, r, t: base(x, r, t) + a * _bump(x, r, t), data, key))
        return float(jax.jit(g)(0.0))

    return grad_along(flow_map), grad_along(lambda x, r, t: flow_map(x, r, t) + 0.3 * _bump(x, r, t))


def test_the_meanflow_loss_is_stationary_at_the_exact_flow_map():
    """With conditional velocities the target is noisy, but its mean given (x_r, r, t) is the exact map, so the
    loss's gradient along any perturbation of the exact map vanishes (Monte Carlo; with p = 0, no adaptive weight),
    while the same perturbation of a wrong map has a clear gradient."""
    n = 200_000
    data = MU + S * jax.random.normal(jax.random.key(1), (n, 2))
    loss = meanflow_loss("linear", time_sampler=meanflow_times(equal_fraction=0.25), p=0.0)
    at_optimum, off = _gradients_at_and_off_the_exact_map(loss, data, jax.random.key(2))
    assert abs(at_optimum) < 0.05 * abs(off), (at_optimum, off)


def test_meanflow_times_and_adaptive_weight():
    r, t = meanflow_times(equal_fraction=0.75)(jax.random.key(0), 20_000)
    r, t = np.asarray(r), np.asarray(t)
    assert np.all((0 <= r) & (r <= t) & (t <= 1))
    assert abs(np.mean(r == t) - 0.75) < 0.02
    # the paper's lognorm(-0.4, 1) puts its mass towards its data end (0); in jaxgen's time that is towards 1
    assert np.median(t) > 0.5
    res = jnp.array([[3.0, 4.0], [0.0, 0.0]])
    np.testing.assert_allclose(adaptive_weight(res, p=1.0, c=1e-3), [1 / 25.001, 1 / 1e-3], rtol=1e-6)
    np.testing.assert_allclose(adaptive_weight(res, p=0.0), [1.0, 1.0])
    with pytest.raises(ValueError, match="equal_fraction"):
        meanflow_times(equal_fraction=1.5)
    with pytest.raises(ValueError, match="p"):
        meanflow_loss(p=-1.0)


def test_the_flow_map_sampler_jumps_exactly_with_the_exact_map_and_counts_one_evaluation_per_jump():
    from jaxgen.fields import flow_map_velocity
    from jaxgen.samplers import FlowMap, get_solver

    x0 = jax.random.normal(jax.random.key(3), (64, 2))
    exact = sample(velocity, x0, RK4(), steps=400).x
    for steps in (1, 3):
        res = sample(lambda x, r, t: flow_map(x, r, t), x0, FlowMap(), steps=steps)
        assert res.nfe == steps
        np.testing.assert_allclose(res.x, exact, atol=1e-5)
    res = sample(flow_map, x0, "flow_map", ts=jnp.array([0.0, 0.2, 0.7, 1.0]), save_trajectory=True)
    assert res.nfe == 3 and res.trajectory.shape == (4, 64, 2) and isinstance(get_solver("flow_map"), FlowMap)
    # the diagonal is a velocity field for every other sampler
    np.testing.assert_allclose(sample(flow_map_velocity(flow_map), x0, RK4(), steps=100).x, exact, atol=1e-5)
    with pytest.raises(ValueError, match="average velocity"):
        sample(flow_map, x0, FlowMap(), prediction="eps", path="linear")


def test_flow_map_mlp_takes_two_times_and_its_jvp_matches_finite_differences():
    from flax import nnx

    from jaxgen.models import FlowMapMLP

    model = FlowMapMLP(2, width=16, hidden_layers=2, activation="silu", rngs=nnx.Rngs(0))  # smooth: FD is exact to O(h^2)
    x, r, t = _points(8)
    out = model(x, r, t)
    assert out.shape == (8, 2)
    assert float(jnp.max(jnp.abs(model(x, 0.5 * r, t) - out))) > 0  # r matters
    v = jax.random.normal(jax.random.key(4), x.shape)
    _, tangent = jax.jvp(lambda a, b, c: model(a, b, c), (x, r, t), (v, jnp.ones_like(r), jnp.zeros_like(t)))
    h = 1e-3
    fd = (model(x + h * v, r + h, t) - model(x - h * v, r - h, t)) / (2 * h)
    np.testing.assert_allclose(tangent, fd, atol=2e-3, rtol=2e-2)
    with pytest.raises(ValueError, match="times of shape"):
        model(x, r[:3], t)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["meanflow", "shortcut"])
def test_flow_map_recipes_train_sample_in_k_jumps_and_score_through_the_diagonal(family):
    from experiments.recipes import Context
    from experiments.recipes.registry import build
    from jaxgen.training import Trainer

    recipe = build(f"{family}:sample_steps=2", Context(shape=(2,), width=16, depth=2, steps=4, batch_size=16))
    trainer = Trainer(recipe.model, recipe.objective, recipe.optimizer, ema_decay=recipe.ema_decay,
                      data=lambda k: {"x": MU + S * jax.random.normal(k, (16, 2))})
    state, losses = trainer.steps(trainer.init(0), 4)
    assert np.all(np.isfinite(np.asarray(losses)))
    model = trainer.model(state, ema=True)
    x, nfe = recipe.generate(model, jax.random.key(1), 8, None)
    assert x.shape == (8, 2) and int(nfe) == 2
    lp = recipe.log_likelihood(model, x, jax.random.key(2))
    assert lp.shape == (8,) and np.all(np.isfinite(np.asarray(lp)))
    with pytest.raises(ValueError, match="vectors"):
        build(family, Context(shape=(8, 8, 1)))
    with pytest.raises(ValueError, match="no option"):
        build(f"{family}:beta=1", Context(shape=(2,)))


def test_the_exact_flow_map_minimises_the_shortcut_loss():
    """Self-consistency (two jumps of d = one of 2d) holds exactly for the exact map: the flow's semigroup property;
    with flow matching on the diagonal the full loss is stationary there (Monte Carlo), not at a perturbed map."""
    from jaxgen.losses import shortcut_loss

    data = MU + S * jax.random.normal(jax.random.key(1), (100_000, 2))
    consistency = shortcut_loss("linear", consistency_fraction=1.0)
    assert float(jax.jit(lambda d: consistency(flow_map, d, jax.random.key(2)))(data)) < 1e-8
    straight = lambda x, r, t: velocity(x, r)  # noqa: E731 (Euler's one-step map: not self-consistent)
    assert float(consistency(straight, data[:4096], jax.random.key(2))) > 1e-3

    at_optimum, off = _gradients_at_and_off_the_exact_map(shortcut_loss("linear"), data, jax.random.key(3))
    assert abs(at_optimum) < 0.05 * abs(off), (at_optimum, off)
    with pytest.raises(ValueError, match="max_doublings"):
        shortcut_loss(max_doublings=0)
    with pytest.raises(ValueError, match="consistency_fraction"):
        shortcut_loss(consistency_fraction=2.0)


@pytest.mark.slow
@pytest.mark.optimised
def test_meanflow_from_scratch_samples_moons_in_one_step():
    """The issue's bar: MeanFlow trained from scratch on N(0, I) -> moons reaches a 1-NFE sliced W2 of at most 0.15
    (measured 0.106, and 0.091 at 2 NFE, after 7,000 steps; two independent 4,000-point target sets are 0.058 apart)."""
    from experiments.recipes import Context
    from experiments.recipes.registry import build
    from jaxgen.data.toy2d import get_distribution
    from jaxgen.metrics import sliced_wasserstein
    from jaxgen.samplers import FlowMap
    from jaxgen.training import Trainer

    moons = get_distribution("moons")
    recipe = build("meanflow", Context(shape=(2,), width=128, depth=3, steps=7000, batch_size=256))
    trainer = Trainer(recipe.model, recipe.objective, recipe.optimizer, ema_decay=recipe.ema_decay,
                      data=lambda k: {"x": moons(k, 256)})
    state, _ = trainer.steps(trainer.init(0), 7000)
    model = trainer.model(state, ema=True)
    true = moons(jax.random.key(2), 4000)
    x0 = jax.random.normal(jax.random.key(1), (4000, 2))
    sw = {n: float(sliced_wasserstein(sample(model, x0, FlowMap(), steps=n).x, true, jax.random.key(3)))
          for n in (1, 2)}
    assert sw[1] <= 0.15 and sw[2] <= 0.15, sw


MU_Y = jnp.array([[1.5, -0.5], [-1.0, 1.0], [0.0, 0.0]])  # class means; row 2 is the null label's (unused)
M0 = jnp.array([0.2, 0.3])


def _guided_exact_map(a, null=2):
    """The exact flow map of the guided field for class data N(MU_Y[y], S^2 I) and a null branch N(M0, S^2 I) (see
    the test below), plus ``a`` times a bump on the conditional branch only."""
    def model(x, r, t, y, w):
        w = w[:, None]
        mean = jnp.where((y == null)[:, None], M0, w * MU_Y[y] + (1 - w) * M0)
        r_, t_ = jnp.reshape(r, (-1, 1)), jnp.reshape(t, (-1, 1))
        h = t_ - r_
        safe = jnp.where(jnp.abs(h) > 1e-4, h, 1.0)
        rate = (-(1 - t_) + t_ * S**2) / _sigma(t_) ** 2
        jump = (t_ * mean + _sigma(t_) / _sigma(r_) * (x - r_ * mean) - x) / safe
        exact = jnp.where(jnp.abs(h) > 1e-4, jump, mean + rate * (x - t_ * mean))
        return exact + a * _bump(x, r, t) * (y != null)[:, None]
    return model


@pytest.mark.parametrize("objective", ["meanflow", "shortcut"])
def test_guided_flow_map_losses_are_stationary_at_the_flow_map_of_the_guided_field(objective):
    """Guidance built into training: the target's mean is ``w v(x|y) + (1 - w) u(x, r, r | null)``. For class data
    N(mu_y, S^2 I) and a null branch whose diagonal is the velocity of N(m0, S^2 I), the guided velocity is affine with
    the velocity of N(w mu_y + (1 - w) m0, S^2 I), so the exact flow map of that Gaussian, chosen per sample by the
    (y, w) the model is given, is the loss's stationary point (perturbing the conditional branch only): MeanFlow's
    identity and the shortcut model's diagonal and self-consistency alike."""
    from jaxgen.losses import shortcut_loss

    n, null = 200_000, 2
    k1, k2 = jax.random.split(jax.random.key(5))
    y = jax.random.randint(k1, (n,), 0, 2)
    data = {"x": MU_Y[y] + S * jax.random.normal(k2, (n, 2)), "y": y}
    guide = dict(label_dropout=0.2, null_label=null, guidance_scales=(1.0, 3.0))
    loss = (meanflow_loss("linear", time_sampler=meanflow_times(equal_fraction=0.25), p=0.0, **guide)
            if objective == "meanflow" else shortcut_loss("linear", consistency_fraction=0.5, **guide))
    grad = jax.jit(jax.grad(lambda a, offset: loss(_guided_exact_map(a + offset), data, jax.random.key(6))))
    at_optimum, off = float(grad(0.0, 0.0)), float(grad(0.0, 0.3))
    assert abs(at_optimum) < 0.05 * abs(off), (at_optimum, off)
    # (checked: with the target w v alone, dropping the unconditional term, this assertion fails for both)
    for make in (meanflow_loss, shortcut_loss):
        with pytest.raises(ValueError, match="label_dropout"):
            make(null_label=null, guidance_scales=(1.0, 3.0))
        with pytest.raises(ValueError, match="null label"):
            make(label_dropout=0.1)
        with pytest.raises(ValueError, match="range"):
            make(label_dropout=0.1, null_label=null, guidance_scales=(3.0, 1.0))


def test_a_consistency_model_is_the_flow_map_pinned_at_the_data_end():
    """flow_map_to_data(u)(x, t) = x + (1 - t) u(x, t, 1) is the consistency function: for the exact map it is the
    ODE's endpoint from every (x_t, t), the identity at t = 1, and the consistency sampler's one step equals the
    flow-map sampler's one jump; multistep consistency sampling (jump, re-noise, jump) samples N(MU, S^2 I)."""
    from jaxgen.fields import flow_map_to_data
    from jaxgen.samplers import ConsistencyMultistep, FlowMap

    f = flow_map_to_data(flow_map)
    x, r, _ = _points(64)
    end = x + (1 - r)[:, None] * flow_map(x, r, jnp.ones_like(r))
    np.testing.assert_allclose(f(x, r), end, atol=1e-6)
    np.testing.assert_allclose(f(x, jnp.ones_like(r)), x, atol=1e-7)
    i = 3
    solved = sample(velocity, x[i:i + 1], RK4(), ts=jnp.linspace(r[i], 1.0, 401)).x
    np.testing.assert_allclose(f(x[i:i + 1], r[i:i + 1]), solved, atol=1e-5)
    x0 = jax.random.normal(jax.random.key(9), (4096, 2))
    one = sample(f, x0, ConsistencyMultistep(), prediction="data", path="linear")
    assert one.nfe == 1
    np.testing.assert_allclose(one.x, sample(flow_map, x0, FlowMap()).x, atol=1e-5)
    two = sample(f, x0, ConsistencyMultistep(), prediction="data", path="linear", ts=(0.0, 0.5, 1.0),
                 key=jax.random.key(10))
    assert two.nfe == 2
    np.testing.assert_allclose(np.mean(two.x, 0), MU, atol=0.03)
    np.testing.assert_allclose(np.std(two.x, 0), [S, S], rtol=0.05)
