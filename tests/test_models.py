"""NNX networks: field signature, conditioning, validation."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

from jaxgen.models import MLPField, sinusoidal_embedding


def test_mlp_matches_torchcfm_parameter_count():
    """TorchCFM MLP(dim=2, w=64, time_varying=True): 3 -> 64 -> 64 -> 64 -> 2 = 8,706 parameters."""
    m = MLPField(2, rngs=nnx.Rngs(0))
    n = sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))
    assert n == 3 * 64 + 64 + 2 * (64 * 64 + 64) + 64 * 2 + 2


def test_pytorch_initialisation_is_nn_linears_uniform_fan_in():
    """init="pytorch": every weight and bias of a layer with n inputs in U(-1/sqrt(n), 1/sqrt(n)) (variance 1/(3n));
    the default is Flax's: zero biases, weights of variance 1/n."""
    torch_like, flax_like = (MLPField(2, width=256, init=i, rngs=nnx.Rngs(0)) for i in ("pytorch", "lecun_normal"))
    for layer, ref in zip([*torch_like.layers, torch_like.out], [*flax_like.layers, flax_like.out]):
        n = layer.kernel.shape[0]
        for p in (layer.kernel[...], layer.bias[...]):
            assert 0 < np.abs(p).max() <= 1 / np.sqrt(n)
        np.testing.assert_allclose(np.var(layer.kernel[...]), 1 / (3 * n), rtol=0.2)
        assert np.all(ref.bias[...] == 0) and np.var(ref.kernel[...]) > 2 / (3 * n)
    with pytest.raises(ValueError, match="init must be one of"):
        MLPField(2, init="torch", rngs=nnx.Rngs(0))


def test_field_signature_shapes_and_time_dependence():
    m = MLPField(4, width=16, time_embedding="sinusoidal", rngs=nnx.Rngs(0))
    x = jnp.ones((5, 2, 2))  # trailing dims are flattened and restored
    a, b = m(x, jnp.zeros(5)), m(x, jnp.ones(5))
    assert a.shape == x.shape and not np.allclose(a, b)
    np.testing.assert_allclose(m(x, 0.0), a)  # a scalar t broadcasts


@pytest.mark.slow
def test_class_conditional_mlp():
    m = MLPField(2, width=16, num_classes=3, rngs=nnx.Rngs(0))
    x = jnp.ones((4, 2))
    out0, out1 = m(x, jnp.zeros(4), y=jnp.zeros(4, jnp.int32)), m(x, jnp.zeros(4), y=jnp.ones(4, jnp.int32))
    assert not np.allclose(out0, out1)
    m(x, jnp.zeros(4), y=jnp.full(4, 3))  # the null class
    with pytest.raises(ValueError, match=r"labels y must lie in \[0, 3\]"):
        m(x, jnp.zeros(4), y=jnp.array([0, 1, 2, -1]))
    with pytest.raises(ValueError, match="class-conditional"):
        m(x, jnp.zeros(4))
    with pytest.raises(ValueError, match="unconditional"):
        MLPField(2, width=8, rngs=nnx.Rngs(0))(x, jnp.zeros(4), y=jnp.zeros(4, jnp.int32))


def test_bad_model_config():
    with pytest.raises(ValueError, match="unknown activation"):
        MLPField(2, activation="nope", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="built for dim=2"):
        MLPField(2, rngs=nnx.Rngs(0))(jnp.ones((3, 5)), jnp.zeros(3))


def test_sinusoidal_embedding():
    e = sinusoidal_embedding(jnp.array([0.0, 0.5]), 8)
    assert e.shape == (2, 8)
    np.testing.assert_allclose(e[0], [1, 1, 1, 1, 0, 0, 0, 0], atol=1e-7)
    with pytest.raises(ValueError, match="even"):
        sinusoidal_embedding(jnp.zeros(2), 7)


def test_mlp_with_other_output_dimension():
    m = MLPField(2, width=8, out_dim=1, rngs=nnx.Rngs(0))
    assert m(jnp.ones((3, 2)), jnp.zeros(3)).shape == (3, 1)
