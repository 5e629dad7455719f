"""Trainer: one-step and fused steps agree, seeded runs reproduce, EMA is exact, the NaN guard stops cleanly."""

import chex
import numpy as np
import pytest
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxgen.data.toy2d import eight_gaussians, moons
from jaxgen.losses import flow_matching_loss
from jaxgen.models import MLPField
from jaxgen.training import Trainer, Update, adam_with_schedule, ema_update

LOSS = flow_matching_loss("linear", source=eight_gaussians)
DATA = lambda key: moons(key, 128)


def _trainer(seed=0, ema=0.9, **kw):
    model = MLPField(2, width=32, hidden_layers=2, rngs=nnx.Rngs(seed))
    return Trainer(model, LOSS, optax.adam(1e-3), data=DATA, ema_decay=ema, **kw)


@pytest.fixture(scope="module")
def trainer():
    return _trainer()


def test_single_steps_equal_fused_steps(trainer):
    s1 = trainer.init(0)
    losses1 = []
    for _ in range(5):
        s1, l = trainer.step(s1)
        losses1.append(float(l))
    s2, losses2 = trainer.steps(trainer.init(0), 5)
    np.testing.assert_allclose(losses1, losses2, rtol=1e-5)
    chex.assert_trees_all_close(s1.params, s2.params, rtol=1e-5, atol=1e-6)
    assert int(s1.step) == int(s2.step) == 5


@pytest.mark.slow
def test_same_seed_same_run_and_resume_continues_exactly(trainer):
    a, _ = trainer.steps(trainer.init(3), 20)
    b, _ = trainer.steps(trainer.init(3), 20)
    chex.assert_trees_all_equal((a.params, a.opt_state, a.ema_params), (b.params, b.opt_state, b.ema_params))
    # 20 steps = 12 steps, a host round trip of the whole state (as a checkpoint), then 8 more
    mid, _ = trainer.steps(trainer.init(3), 12)
    host = jax.tree.map(np.asarray, mid._replace(key=jax.random.key_data(mid.key)))
    restored = jax.tree.map(jnp.asarray, host)
    restored = restored._replace(key=jax.random.wrap_key_data(restored.key))
    c, _ = trainer.steps(restored, 8)
    chex.assert_trees_all_close(a.params, c.params, rtol=1e-6, atol=1e-7)
    d, _ = trainer.steps(trainer.init(4), 20)
    assert not np.allclose(jax.tree.leaves(a.params)[0], jax.tree.leaves(d.params)[0])


def test_training_reduces_the_loss(trainer):
    state, losses = trainer.fit(trainer.init(0), 600, chunk=300, progress=False)
    assert losses.shape == (600,)
    assert losses[-100:].mean() < 0.8 * losses[:50].mean()
    assert int(state.step) == 600


def test_ema_is_polyak_average():
    tr = _trainer(ema=0.5, ema_warmup=False)
    s0 = tr.init(0)
    s1, _ = tr.step(s0)
    want = ema_update(s0.params, s1.params, 0.5)
    chex.assert_trees_all_close(want, s1.ema_params, rtol=1e-6)
    m = tr.model(s1, ema=True)
    np.testing.assert_allclose(m.out.kernel[...], s1.ema_params["out"]["kernel"][...], rtol=1e-6)
    plain = _trainer(ema=None)
    with pytest.raises(ValueError, match="no EMA"):
        plain.model(plain.init(0), ema=True)


def test_nan_guard_stops_and_keeps_last_good_state():
    model = MLPField(2, width=8, hidden_layers=1, rngs=nnx.Rngs(0))

    def nan_after_start(m, batch, key):
        base = LOSS(m, batch, key)
        return jnp.where(jnp.abs(m.out.bias[...]).sum() > 0, jnp.nan, base)

    tr = Trainer(model, nan_after_start, optax.sgd(0.1), data=DATA)
    state = tr.init(0)
    with pytest.raises(FloatingPointError, match="loss became nan at step 1") as info:
        tr.fit(state, 20, chunk=10, progress=False)
    assert int(info.value.state.step) == 0


def test_donated_state_gives_the_same_run_and_frees_the_old_buffers():
    """donate=True: the same losses and parameters as without donation; the state passed in is deleted (its buffers
    hold the new state); the NaN guard still names the step, with no last good state to hand back."""
    plain, donating = _trainer(), _trainer(donate=True)
    a, la = plain.steps(plain.init(0), 5)
    start = donating.init(0)
    b, lb = donating.steps(start, 5)
    np.testing.assert_array_equal(la, lb)
    chex.assert_trees_all_equal((a.params, a.opt_state, a.ema_params), (b.params, b.opt_state, b.ema_params))
    assert all(x.is_deleted() for x in jax.tree.leaves(start.params))
    b, _ = donating.step(b)  # the single step donates too, and training goes on from what it returns
    assert int(b.step) == 6

    def nan_after_start(m, batch, key):
        return jnp.where(jnp.abs(m.out.bias[...]).sum() > 0, jnp.nan, LOSS(m, batch, key))

    tr = Trainer(MLPField(2, width=8, hidden_layers=1, rngs=nnx.Rngs(0)), nan_after_start, optax.sgd(0.1), data=DATA,
                 donate=True)
    with pytest.raises(FloatingPointError, match="loss became non-finite at step 1.*donated.*last checkpoint") as info:
        tr.fit(tr.init(0), 20, chunk=10, progress=False)
    assert info.value.state is None
    with pytest.raises(ValueError, match="use one or the other"):
        _trainer(donate=True, checked=True)


def test_nan_guard_checks_the_state_not_only_the_loss(tmp_path):
    """A finite loss with a NaN gradient at step 7 (0 * sqrt(0)) poisons the parameters in the middle of a chunk:
    the guard names step 7 and a parameter, keeps the step-0 state and saves nothing non-finite."""
    from jaxgen.training import Checkpointer, Checkpointing

    model = MLPField(2, width=8, hidden_layers=1, rngs=nnx.Rngs(0))

    def poisoned_at_7(m, batch, key, step):
        z = jnp.where(step == 7, 0.0, 1.0) * (1.0 + jnp.sum(m.out.bias[...] ** 2))
        return LOSS(m, batch, key) + 0.0 * jnp.sqrt(z)

    tr = Trainer(model, poisoned_at_7, optax.sgd(0.1), data=DATA)
    state = tr.init(0)
    with Checkpointer(tmp_path) as ckpt:
        with pytest.raises(FloatingPointError, match=r"update of step 7 made the training state non-finite") as info:
            tr.fit(state, 20, chunk=10, callbacks=[Checkpointing(ckpt, every=10)], progress=False)
        assert ckpt.all_steps() == []  # the chunk that went bad was never saved
    msg = str(info.value)
    assert "params" in msg and "last good state (step 0)" in msg
    assert int(info.value.state.step) == 0
    chex.assert_tree_all_finite(info.value.state.params)
    good, losses = tr.fit(state, 7, progress=False)  # the steps before 7 are fine
    assert int(good.step) == 7 and np.all(np.isfinite(losses))


def test_step_with_external_batch_and_missing_data():
    model = MLPField(2, width=8, hidden_layers=1, rngs=nnx.Rngs(0))
    tr = Trainer(model, LOSS, optax.adam(1e-3))
    state, loss = tr.step(tr.init(0), moons(jax.random.key(0), 64))
    assert np.isfinite(float(loss)) and int(state.step) == 1
    with pytest.raises(ValueError, match="no batch given"):
        tr.step(tr.init(0))


@pytest.mark.slow
def test_adam_with_schedule_warms_up_and_decays():
    opt = adam_with_schedule(1e-2, total_steps=100, warmup_steps=10, clip_norm=1.0)
    params = {"w": jnp.ones(3)}
    st = opt.init(params)
    upd, st = opt.update({"w": jnp.full(3, 100.0)}, st, params)
    assert float(jnp.abs(upd["w"]).max()) == 0.0  # lr is 0 at step 0 of the warm-up
    with pytest.raises(ValueError, match="ema_decay"):
        _trainer(ema=1.5)


def test_mixed_precision_keeps_float32_master_weights():
    model = MLPField(2, width=16, hidden_layers=1, rngs=nnx.Rngs(0))
    tr = Trainer(model, LOSS, optax.adam(1e-3), data=DATA, compute_dtype=jnp.bfloat16)
    state, losses = tr.steps(tr.init(0), 3)
    assert all(l.dtype == jnp.float32 for l in jax.tree.leaves(state.params))
    assert losses.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(losses)))


class _DropoutField(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(3, 2, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)

    def __call__(self, x, t):
        return self.drop(self.lin(jnp.concatenate([x, t[:, None]], -1)))


@pytest.mark.slow
def test_stateful_dropout_module_trains_and_its_rng_state_advances():
    tr = Trainer(_DropoutField(nnx.Rngs(0)), LOSS, optax.adam(1e-3), data=DATA)
    s0 = tr.init(0)
    s1, l1 = tr.step(s0)
    s2, losses = tr.steps(s1, 3)
    assert np.all(np.isfinite(np.asarray(losses)))
    ints = lambda st: [np.asarray(v) for v in jax.tree.leaves(st.rest)
                       if not jax.dtypes.issubdtype(v.dtype, jax.dtypes.prng_key) and v.dtype.kind in "iu"]
    counts, counts0 = ints(s2), ints(s0)
    assert counts and any((a != b).any() for a, b in zip(counts, counts0))  # dropout masks change per step


@pytest.mark.slow
def test_unfused_steps_equal_fused_steps(trainer):
    unfused = _trainer(fuse_steps=False)
    a, la = trainer.steps(trainer.init(5), 4)
    b, lb = unfused.steps(unfused.init(5), 4)
    np.testing.assert_allclose(la, lb, rtol=1e-5)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_microbatches_accumulate_the_full_batch_gradient():
    """With a loss whose randomness does not matter (a fixed target), k microbatches give the full-batch update."""
    def loss(model, batch, key):
        return jnp.mean(jnp.square(model(batch, jnp.full(batch.shape[0], 0.5)) - batch[:, ::-1]))

    def run(k):
        tr = Trainer(MLPField(2, width=8, hidden_layers=1, rngs=nnx.Rngs(0)), loss, optax.adam(1e-2),
                     data=DATA, microbatches=k)
        return tr.steps(tr.init(3), 2)

    (a, la), (b, lb) = run(1), run(4)
    np.testing.assert_allclose(la, lb, rtol=1e-5)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    odd = Trainer(MLPField(2, width=8, rngs=nnx.Rngs(0)), loss, optax.adam(1e-2), data=DATA, microbatches=3)
    with pytest.raises(ValueError, match="divisible by 3"):  # batch 128
        odd.step(odd.init(0))
    with pytest.raises(ValueError, match="microbatches must be"):
        Trainer(MLPField(2, width=8, rngs=nnx.Rngs(0)), loss, optax.adam(1e-2), microbatches=0)


# -- one loop for every objective ------------------------------------------------------------------------------

class _Players(nnx.Module):
    """Two scalar "networks": a generator offset g and a critic weight c."""

    def __init__(self):
        self.generator = nnx.Linear(1, 1, use_bias=False, rngs=nnx.Rngs(0))
        self.critic = nnx.Linear(1, 1, use_bias=False, rngs=nnx.Rngs(1))


def test_two_players_take_turns_with_their_own_optimizers():
    """A two-player objective (a GAN's critic and generator) in one step: each Update differentiates its own loss with
    respect to its own parameters only, with its own optimizer state, in order, repeats times; the losses of both
    come back per step. Checked against the same updates written out by hand."""
    g = lambda m: m.generator.kernel[0, 0]
    c = lambda m: m.critic.kernel[0, 0]
    critic_loss = lambda m, batch, key: (c(m) - g(m)) ** 2 + 0.0 * jnp.sum(batch)   # the critic tracks g
    generator_loss = lambda m, batch, key: (g(m) - 2.0) ** 2 + c(m) * g(m)           # ... and g moves
    updates = [Update(critic_loss, nnx.PathContains("critic"), "critic", repeats=3),
               Update(generator_loss, nnx.PathContains("generator"), "generator")]
    tr = Trainer(_Players(), updates, {"critic": optax.sgd(0.1), "generator": optax.adam(0.05)},
                 data=lambda key: jnp.zeros(3))
    s0 = tr.init(0)
    s2, losses = tr.steps(s0, 2)
    assert losses.shape == (2, 2)
    assert set(s0.opt_state) == {"critic", "generator"}
    # by hand: 3 SGD steps of the critic, then one Adam step of the generator, twice
    gv, cv = float(g(tr.model(s0))), float(c(tr.model(s0)))
    adam = optax.adam(0.05)
    opt = adam.init(jnp.float32(gv))
    for _ in range(2):
        for _ in range(3):
            cv = cv - 0.1 * 2 * (cv - gv)
        grad = 2 * (gv - 2.0) + cv
        upd, opt = adam.update(jnp.float32(grad), opt)
        gv = gv + float(upd)
    m = tr.model(s2)
    np.testing.assert_allclose([float(g(m)), float(c(m))], [gv, cv], rtol=1e-5)
    with pytest.raises(ValueError, match="own optimizer"):
        Trainer(_Players(), [Update(critic_loss), Update(generator_loss)], optax.sgd(0.1))
    with pytest.raises(ValueError, match="uses the optimizer 'critic'"):
        Trainer(_Players(), [Update(critic_loss, optimizer="critic")], optax.sgd(0.1))


def test_one_update_of_a_parameter_subset_with_a_plain_optimizer():
    """Fine-tuning part of a model (a ControlNet on a frozen base): one Update with a parameter filter and a plain
    optax optimizer trains those parameters only, with optimizer moments for them alone."""
    loss = lambda m, batch, key: (m.critic.kernel[0, 0] * m.generator.kernel[0, 0] - 1.0) ** 2 + 0.0 * jnp.sum(batch)
    tr = Trainer(_Players(), [Update(loss, nnx.PathContains("critic"))], optax.sgd(0.1), data=lambda key: jnp.zeros(3))
    s0 = tr.init(0)
    s1, _ = tr.steps(s0, 3)
    np.testing.assert_array_equal(tr.model(s1).generator.kernel[...], tr.model(s0).generator.kernel[...])
    assert float(jnp.abs(tr.model(s1).critic.kernel[...] - tr.model(s0).critic.kernel[...]).max()) > 1e-4


@pytest.mark.slow
def test_objective_state_is_carried_through_the_compiled_steps():
    """An objective with its own state (an EBM's replay buffer of sampler outputs): init_state builds it, the loss
    reads and replaces it, it lives in TrainState.aux through fused steps and microbatches."""
    def loss(model, batch, key, *, state):
        x = model(batch, jnp.full(batch.shape[0], 0.5))
        new_state = {"buffer": jnp.roll(state["buffer"], 1, axis=0).at[0].set(x[0]), "count": state["count"] + 1}
        return jnp.mean(x**2), new_state

    loss.init_state = lambda key: {"buffer": jnp.zeros((4, 2)), "count": jnp.zeros((), jnp.int32)}
    for k in (1, 2):
        tr = Trainer(MLPField(2, width=8, hidden_layers=1, rngs=nnx.Rngs(0)), loss, optax.adam(1e-3), data=DATA,
                     microbatches=k)
        state, losses = tr.steps(tr.init(0), 5)
        assert int(state.aux["count"]) == 5 * k  # once per microbatch
        assert np.count_nonzero(np.abs(np.asarray(state.aux["buffer"])).sum(-1)) == 4
    with pytest.raises(ValueError, match="init_state"):
        Trainer(MLPField(2, width=8, rngs=nnx.Rngs(0)), lambda m, b, k, *, state: (0.0, state), optax.sgd(0.1)).init(0)


@pytest.mark.slow
def test_fit_until_a_step_with_callbacks_at_their_intervals():
    """fit(until_step=...) trains to that step (a finished run trains nothing); chunks end at the multiples of
    chunk and of every callback's `every`; callbacks see those steps; bad arguments raise before any work."""
    from jaxgen.training import Callback, Every

    tr = _trainer()
    seen, every_seen, events = [], [], []

    class Recorder(Callback):
        def on_start(self, trainer, state):
            events.append(("start", int(state.step)))

        def on_end(self, trainer, state):
            events.append(("end", int(state.step)))

        def close(self):
            events.append(("close",))

    state, losses = tr.fit(tr.init(0), until_step=25, chunk=10, progress=False,
                           callbacks=[lambda st, l: seen.append((int(st.step), len(l))),
                                      Every(4, lambda st: every_seen.append(int(st.step))), Recorder()])
    assert int(state.step) == 25 and losses.shape == (25,)
    assert seen == [(4, 4), (8, 4), (10, 2), (12, 2), (16, 4), (20, 4), (24, 4), (25, 1)]
    assert every_seen == [4, 8, 12, 16, 20, 24, 25]
    assert events == [("start", 0), ("end", 25), ("close",)]
    again, none = tr.fit(state, until_step=25, progress=False)
    assert int(again.step) == 25 and none.shape == (0,)
    more, some = tr.fit(state, 5, progress=False)
    assert int(more.step) == 30 and some.shape == (5,)
    for kwargs, match in ((dict(num_steps=-5), "num_steps must be >= 0"), (dict(), "either num_steps"),
                          (dict(num_steps=3, until_step=3), "either num_steps"), (dict(num_steps=2.5), "int")):
        with pytest.raises(ValueError, match=match):
            tr.fit(state, progress=False, **kwargs)


def test_ema_decay_may_follow_a_schedule():
    """ema_decay as a function of the step (a consistency model's target schedule mu(k))."""
    tr = _trainer(ema=lambda step: jnp.where(step < 1, 0.0, 0.5))
    s0 = tr.init(0)
    s1, _ = tr.step(s0)
    s2, _ = tr.step(s1)
    for p1, p2, e2 in zip(*(jax.tree.leaves(v) for v in (s1.params, s2.params, s2.ema_params))):
        np.testing.assert_allclose(e2, 0.5 * p1 + 0.5 * p2, rtol=1e-5, atol=1e-7)
