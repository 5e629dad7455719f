"""Checked mode: device-side checks of traced inputs (jaxgen.checked, Trainer(checked=True)) catch what the eager
checks cannot see under jit, name the problem, and leave the state as it was; unchecked programs are unchanged."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp
import optax
from flax import nnx

import jaxgen
from jaxgen import sample
from jaxgen.losses import flow_matching_loss
from jaxgen.models import MLPField
from jaxgen.training import Trainer


def _model():
    return MLPField(2, width=8, hidden_layers=1, num_classes=3, rngs=nnx.Rngs(0))


def _data(label=1, value=None):
    def data(key):
        x = jax.random.normal(key, (8, 2)) if value is None else jnp.full((8, 2), value)
        return {"x": x, "y": jnp.full((8,), label, jnp.int32)}
    return data


@pytest.mark.parametrize("fuse", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_checked_training_refuses_bad_batches_and_keeps_the_state(fuse):
    loss = flow_matching_loss("linear")
    good = Trainer(_model(), loss, optax.adam(1e-3), data=_data(), checked=True, fuse_steps=fuse)
    state = good.init(0)
    trained, losses = good.fit(state, 4, progress=False)
    plain = Trainer(_model(), loss, optax.adam(1e-3), data=_data(), fuse_steps=fuse)
    reference, ref_losses = plain.fit(plain.init(0), 4, progress=False)
    np.testing.assert_array_equal(losses, ref_losses)  # the checks change nothing when they pass
    for label, value, words in [(7, None, "labels y must lie in [0, 3]"), (1, jnp.nan, "the data must be finite")]:
        bad = Trainer(_model(), loss, optax.adam(1e-3), data=_data(label, value), checked=True, fuse_steps=fuse)
        start = bad.init(0)
        with pytest.raises(ValueError, match="checked mode") as info:
            bad.steps(start, 3)
        assert words in str(info.value) and "the state was not updated" in str(info.value), str(info.value)
    assert int(trained.step) == 4


def test_checked_sampling_names_bad_noise_and_labels_while_plain_jit_runs():
    model = _model()
    run = jaxgen.checked(lambda x0, y: sample(model, x0, "heun", steps=3, cond={"y": y}).x)
    x0, y = jnp.zeros((4, 2)), jnp.zeros(4, jnp.int32)
    assert run(x0, y).shape == (4, 2)
    with pytest.raises(ValueError, match="x0 must be finite"):
        run(x0.at[1, 0].set(jnp.inf), y)
    with pytest.raises(ValueError, match=r"must lie in \[0, 3\] \(3 = the null class\), got values in \[5, 5\]"):
        run(x0, jnp.full(4, 5))
    # the same function compiled without checked mode: no checks in the program (labels are clamped by the gather)
    plain = jax.jit(lambda x0, y: sample(model, x0, "heun", steps=3, cond={"y": y}).x)
    assert plain(x0, jnp.full(4, 5)).shape == (4, 2)


def test_a_bfloat16_state_stays_bfloat16_through_every_step():
    model = MLPField(2, width=8, hidden_layers=1, rngs=nnx.Rngs(0))
    x0 = jnp.linspace(-1, 1, 8).reshape(4, 2)
    for solver in ("euler", "heun", "rk4"):
        res = sample(model, x0.astype(jnp.bfloat16), solver, steps=4)
        ref = sample(model, x0, solver, steps=4)
        assert res.x.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(res.x, np.float32), ref.x, atol=0.05)
