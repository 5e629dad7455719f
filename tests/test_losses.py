"""Losses: the oracle minimises each objective, gradients flow through NNX modules, inputs are validated."""

import chex
import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

from jaxgen import losses
from jaxgen.data.toy2d import eight_gaussians
from jaxgen.fields import PREDICTIONS
from jaxgen.models import MLPField
from jaxgen.oracle import GaussianMixture
from jaxgen.paths import GaussianPath

GM = GaussianMixture.isotropic(jnp.array([[-1.0, 0.5], [1.5, -0.5]]), 0.4)
BATCH = GM.sample(jax.random.key(0), 4096)
KEY = jax.random.key(1)


@pytest.mark.parametrize("name", ["linear", "cosine", "vp"])
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_oracle_field_minimises_the_loss(name, prediction):
    """The conditional regression is minimised by the marginal (posterior-mean) field.

    For a shift ``f + d`` the loss is ``L(f) + d^2 w + 2 d b`` with ``b`` the mean weighted residual, so
    ``b = (L(f + d) - L(f - d)) / (4 d)``: it vanishes at the optimum (up to Monte-Carlo error) and not
    for a shifted field.
    """
    path = GaussianPath.from_name(name)
    kw = {"t_range": (0.02, 0.98)} if prediction in ("score", "eps", "data") else {}
    loss = losses.regression_loss(path, prediction, **kw)
    f = GM.field(path, prediction)
    shifted = jax.jit(lambda d: loss(lambda x, t: f(x, t) + d, BATCH, KEY))  # one compilation, d traced

    def bias(center, d=0.3):
        return float((shifted(center + d) - shifted(center - d)) / (4 * d))

    base = float(shifted(0.0))
    assert float(shifted(0.3)) > base and float(shifted(-0.3)) > base
    assert abs(bias(0.0)) < 0.03, bias(0.0)
    assert abs(bias(0.5)) > 0.1  # a shifted field is not optimal


def test_cfm_target_is_data_minus_noise_for_condot():
    """Notes Algorithm 1: x_t = t z + (1 - t) eps, target z - eps."""
    loss = losses.flow_matching_loss("linear")
    seen = {}

    def field(x, t):
        seen["x"], seen["t"] = x, t
        return jnp.zeros_like(x)

    val = loss(field, BATCH[:8], KEY)
    k_t, k_eps, _ = jax.random.split(KEY, 3)
    t = jax.random.uniform(k_t, (8,))
    eps = jax.random.normal(k_eps, (8, 2))
    np.testing.assert_allclose(seen["t"], t)
    np.testing.assert_allclose(seen["x"], t[:, None] * BATCH[:8] + (1 - t[:, None]) * eps, rtol=1e-6)
    np.testing.assert_allclose(val, jnp.mean((BATCH[:8] - eps) ** 2), rtol=1e-6)


def test_score_loss_weighting_is_finite_at_t_one():
    path = GaussianPath.from_name("linear")
    loss = losses.denoising_score_matching_loss(path, time_sampler=lambda k, n: jnp.ones((n,)))
    assert np.isfinite(float(loss(lambda x, t: -x, BATCH[:16], KEY)))


def test_custom_weighting_and_time_sampler():
    path = GaussianPath.from_name("linear")
    w_loss = losses.flow_matching_loss(path, weighting=lambda t: jnp.zeros_like(t))
    assert float(w_loss(lambda x, t: x, BATCH[:16], KEY)) == 0.0
    ln = losses.flow_matching_loss(path, time_sampler="logit_normal")
    assert np.isfinite(float(ln(lambda x, t: x, BATCH[:16], KEY)))


@pytest.mark.slow
def test_non_gaussian_source_and_validation():
    loss = losses.flow_matching_loss("linear", source=eight_gaussians)
    assert np.isfinite(float(loss(lambda x, t: jnp.zeros_like(x), BATCH[:32], KEY)))
    with pytest.raises(ValueError, match="score target"):
        losses.denoising_score_matching_loss("linear", source=eight_gaussians)
    with pytest.raises(ValueError, match="source returned shape"):
        losses.flow_matching_loss("linear", source=lambda k, n: jnp.zeros((n, 3)))(lambda x, t: x, BATCH[:4], KEY)
    with pytest.raises(ValueError, match="the field returned shape"):
        losses.flow_matching_loss("linear")(lambda x, t: x[:, :1], BATCH[:4], KEY)
    with pytest.raises(ValueError, match="unknown schedule"):
        losses.flow_matching_loss("nope")
    with pytest.raises(ValueError, match="t_range"):
        losses.flow_matching_loss("linear", t_range=(0.5, 0.2))


def test_conditioning_from_dict_batch():
    got = {}

    def field(x, t, y):
        got["y"] = y
        return jnp.zeros_like(x)

    losses.flow_matching_loss("linear")(field, {"x": BATCH[:4], "y": jnp.arange(4)}, KEY)
    np.testing.assert_array_equal(got["y"], np.arange(4))
    with pytest.raises(ValueError, match="key 'x'"):
        losses.flow_matching_loss("linear")(field, {"data": BATCH[:4]}, KEY)


@pytest.mark.slow
@pytest.mark.parametrize("prediction", ["velocity", "eps", "v"])
def test_gradients_through_nnx_module_and_params_adapter(prediction):
    model = MLPField(2, width=16, hidden_layers=2, rngs=nnx.Rngs(0))
    loss = losses.regression_loss("cosine", prediction)
    g = nnx.grad(loss)(model, BATCH[:64], KEY)
    leaves = jax.tree.leaves(g)
    assert leaves
    chex.assert_tree_all_finite(g)
    assert any(float(jnp.abs(l).sum()) > 0 for l in leaves)
    # pure (params, batch, key) form through with_params, equal to the module form
    graphdef, params = nnx.split(model)
    apply = lambda p, x, t: nnx.merge(graphdef, p)(x, t)
    pure = losses.with_params(apply)(loss)
    np.testing.assert_allclose(jax.jit(pure)(params, BATCH[:64], KEY), loss(model, BATCH[:64], KEY), rtol=1e-6)
    gp = jax.grad(pure)(params, BATCH[:64], KEY)
    assert jax.tree.structure(gp) == jax.tree.structure(params)


@pytest.mark.slow
def test_loss_vmaps_over_keys():
    loss = losses.flow_matching_loss("linear")
    vals = jax.vmap(lambda k: loss(lambda x, t: jnp.zeros_like(x), BATCH[:32], k))(jax.random.split(KEY, 4))
    assert vals.shape == (4,) and len(set(np.asarray(vals).tolist())) == 4
