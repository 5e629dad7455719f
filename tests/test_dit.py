"""DiTField and FlowMapDiT: parameter count, zero init, conditioning, patchify, 2-D RoPE, JVPs, errors, training."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx
from jax.flatten_util import ravel_pytree

from jaxgen.models import DiTField, FlowMapDiT
from jaxgen.models.dit import apply_rope, patchify, rope_angles, unpatchify

B = 4
TINY = dict(image_size=8, patch_size=2, hidden=32, depth=2, num_heads=2, num_classes=3, guidance_input=True)


def _n_params(model) -> int:
    return sum(v.size for v in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.fixture(scope="module")
def models():
    """The tiny field and flow map, initialised (zero adaLN and output layers) and randomised: every parameter a
    N(0, 0.1^2) draw, so that the output depends on every input. Built in one compiled program with an RBG key."""
    @nnx.jit
    def build():
        rngs = nnx.Rngs(jax.random.key(0, impl="rbg"))
        built = {"field": DiTField(1, **TINY, rngs=rngs), "map": FlowMapDiT(1, **TINY, rngs=rngs)}
        for name in ("field", "map"):
            randomised = nnx.clone(built[name])
            flat, unravel = ravel_pytree(nnx.state(randomised, nnx.Param))
            nnx.update(randomised, unravel(0.1 * jax.random.normal(rngs.params(), flat.shape)))
            built["random " + name] = randomised
        return built

    return build()


X = jnp.asarray(np.random.default_rng(1).standard_normal((B, 8, 8, 1)), jnp.float32)
R, T = jnp.array([0.1, 0.2, 0.0, 0.5]), jnp.array([0.3, 0.9, 0.6, 0.5])
Y, W = jnp.array([0, 1, 2, 3]), jnp.array([1.0, 2.0, 4.5, 1.0])  # 3 = the null class


@nnx.jit
def _variants(model, x, times, y, w):
    """The model on ``(x, times, y, w)`` and with each input changed in turn, stacked and run as one vmapped call;
    then, unmapped, the first call again, the call with ``y`` and ``w`` left out and the one with the null class and
    ``w = 1`` given."""
    variants = [(x, times, y, w), (x[::-1], times, y, w)]
    variants += [(x, tuple(s[::-1] if j == i else s for j, s in enumerate(times)), y, w) for i in range(len(times))]
    variants += [(x, times, (y + 1) % 4, w), (x, times, y, w + 1.5)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *variants)
    outs = jax.vmap(lambda x, ts, y, w: model(x, *ts, y=y, w=w))(*stacked)
    return (outs, model(x, *times, y=y, w=w), model(x, *times),
            model(x, *times, y=jnp.full(y.shape, 3), w=jnp.ones_like(w)))


@pytest.mark.parametrize("name, times", [("field", (T,)), ("map", (R, T))])
def test_zero_init_then_output_depends_on_every_input(models, name, times):
    outs, _, _, _ = _variants(models[name], X, times, Y, W)
    assert outs.shape == (len(times) + 4, B, 8, 8, 1)
    np.testing.assert_array_equal(outs, 0.0)  # adaLN-Zero and a zero output layer: the untrained field is 0
    outs, unmapped, default, null = _variants(models["random " + name], X, times, Y, W)
    base = outs[0]
    assert bool(jnp.all(jnp.isfinite(base))) and float(jnp.std(base)) > 0.05
    np.testing.assert_allclose(base, unmapped, rtol=1e-5, atol=1e-5)  # vmap over calls changes nothing
    for i, what in enumerate(["x"] + ["r", "t"][-len(times):] + ["y", "w"]):  # each input changed in turn
        assert float(jnp.max(jnp.abs(outs[1 + i] - base))) > 1e-3, f"the output does not depend on {what}"
    np.testing.assert_allclose(default, null, rtol=1e-6, atol=1e-6)  # y=None is the null class, w=None is w = 1


def test_parameter_count_of_the_documented_configuration():
    """The docstring's DiT (hidden 128, depth 4, 2x2 patches of 8x8x1 images, 10 classes), counted layer by layer."""
    model = nnx.eval_shape(lambda: DiTField(1, image_size=8, patch_size=2, hidden=128, depth=4, num_heads=4,
                                            num_classes=10, rngs=nnx.Rngs(0)))
    d, f, mlp = 128, 256, 344  # width, sinusoidal features, SwiGLU width int(2/3 * 4 * 128) = 341 -> 344
    block = (d * 3 * d + 3 * d) + (d * d + d) + (d * 2 * mlp + 2 * mlp) + (mlp * d + d) + (d * 6 * d + 6 * d)
    expected = (4 * d + d) + (f * d + d + d * d + d) + 11 * d + 4 * block + (d * 2 * d + 2 * d) + (d * 4 + 4)
    assert _n_params(model) == expected == 1_277_124
    flow_map = nnx.eval_shape(lambda: FlowMapDiT(1, image_size=8, patch_size=2, hidden=128, depth=4, num_heads=4,
                                                 num_classes=10, guidance_input=True, rngs=nnx.Rngs(0)))
    assert _n_params(flow_map) == expected + 2 * (f * d + d + d * d + d)  # the t - r and w embeddings


def test_patchify_cuts_row_major_patches_and_unpatchify_inverts_it():
    x = jax.random.normal(jax.random.key(0), (2, 6, 4, 3))
    tokens = patchify(x, 2)
    assert tokens.shape == (2, 6, 12)
    np.testing.assert_array_equal(tokens[:, 1].reshape(2, 2, 2, 3), x[:, 0:2, 2:4])  # row 0, column 1
    np.testing.assert_array_equal(tokens[:, 4].reshape(2, 2, 2, 3), x[:, 4:6, 0:2])  # row 2, column 0
    np.testing.assert_array_equal(unpatchify(tokens, 2, 6, 4), x)
    np.testing.assert_array_equal(patchify(unpatchify(tokens, 2, 6, 4), 2), tokens)


def test_2d_rope_keeps_norms_and_makes_scores_depend_on_the_offset_only():
    d = 16
    q, k = jax.random.normal(jax.random.key(0), (2, d))

    def rotated(v, pos):
        return apply_rope(v[None, None, None, :], rope_angles(jnp.array([pos]), d))[0, 0, 0]

    def score(p, p2):
        return float(jnp.dot(rotated(q, p), rotated(k, p2)))

    np.testing.assert_allclose(float(jnp.linalg.norm(rotated(q, (3, 5)))), float(jnp.linalg.norm(q)), rtol=1e-6)
    s = score((1, 2), (3, 0))  # offset (-2, 2)
    np.testing.assert_allclose(score((4, 7), (6, 5)), s, rtol=1e-5, atol=1e-5)  # both shifted by (3, 5)
    np.testing.assert_allclose(score((0, 0), (2, -2)), s, rtol=1e-5, atol=1e-5)
    for other in [((1, 2), (3, 1)), ((1, 2), (2, 0)), ((2, 1), (0, 3))]:  # other offsets, rows and columns apart
        assert abs(score(*other) - s) > 1e-3
    np.testing.assert_array_equal(rotated(q, (0, 0)), q)
    angles = rope_angles(jnp.array([[2.0, 5.0]]), d)
    np.testing.assert_allclose(angles[0, : d // 4], 2.0 * 10_000.0 ** (-np.arange(4) / 4), rtol=1e-6)  # rows
    np.testing.assert_allclose(angles[0, d // 4:], 5.0 * 10_000.0 ** (-np.arange(4) / 4), rtol=1e-6)  # columns


@nnx.jit
def _jvp_and_differences(model, x, r, t, tangents, h):
    def f(x, r, t):
        return model(x, r, t, y=Y, w=W)

    out, tangent = jax.jvp(f, (x, r, t), tangents)
    plus = f(*(p + h * v for p, v in zip((x, r, t), tangents)))
    minus = f(*(p - h * v for p, v in zip((x, r, t), tangents)))
    return out, tangent, (plus - minus) / (2 * h)


@pytest.mark.parametrize("direction, h", [("x", 1e-3), ("r, t", 1e-4)])
def test_jvp_of_the_flow_map_matches_central_differences(models, direction, h):
    """Forward mode through attention, RoPE, RMSNorm and the time embeddings, against float32 central differences.
    The time direction is the MeanFlow tangent (v, 1, 0) plus a move of t; h is small there because the sinusoidal
    embedding's fastest feature turns up to 1000 radians per unit of time (10 for FlowMapDiT)."""
    model = models["random map"]
    vx = jax.random.normal(jax.random.key(7), X.shape)
    tangents = (vx, jnp.zeros(B), jnp.zeros(B)) if direction == "x" else (0.1 * vx, jnp.ones(B), 0.5 * jnp.ones(B))
    _, tangent, fd = _jvp_and_differences(model, X, R, T, tangents, h)
    scale = float(jnp.max(jnp.abs(tangent)))
    assert scale > 0.1  # the output moves along the tangent
    np.testing.assert_allclose(np.asarray(tangent), np.asarray(fd), atol=2e-2 * scale, rtol=2e-2)
    assert float(jnp.linalg.norm(tangent - fd) / jnp.linalg.norm(tangent)) < 1e-2


@pytest.mark.slow  # the costliest compilations of their files: in the full suite, not the fast tier
def test_jvp_inside_jit_equals_the_eager_jvp(models):
    model = models["random map"]
    tangents = (jax.random.normal(jax.random.key(8), X.shape), jnp.ones(B), jnp.zeros(B))
    out, tangent, _ = _jvp_and_differences(model, X, R, T, tangents, 1e-3)
    eager_out, eager_tangent = jax.jvp(lambda x, r, t: model(x, r, t, y=Y, w=W), (X, R, T), tangents)
    np.testing.assert_allclose(eager_out, out, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(eager_tangent, tangent, rtol=1e-4, atol=1e-4 * float(jnp.max(jnp.abs(tangent))))


def test_errors_name_the_problem():
    model = nnx.eval_shape(lambda: FlowMapDiT(1, **TINY, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match=r"\(B, H, W, C\) = \(B, 8, 8, 1\)"):
        model(jnp.zeros((B, 16, 16, 1)), R, T)
    with pytest.raises(ValueError, match="channels-first"):
        model(jnp.zeros((B, 1, 8, 8)), R, T)
    with pytest.raises(ValueError, match=r"batch axis"):
        model(jnp.zeros((8, 8, 1)), R, T)
    with pytest.raises(ValueError, match=r"r of shape \(B,\) = \(4,\)"):
        model(X, jnp.zeros(B + 1), T)
    with pytest.raises(ValueError, match=r"labels y must have shape"):
        model(X, R, T, y=jnp.zeros((B, 2), jnp.int32))
    with pytest.raises(ValueError, match=r"labels y must lie in \[0, 3\]"):
        model(X, R, T, y=jnp.array([0, 1, 2, 4]))
    with pytest.raises(ValueError, match="labels y must be integers"):
        model(X, R, T, y=jnp.array([0.0, 1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="guidance scale w of shape"):
        model(X, R, T, w=jnp.ones(B + 1))
    with pytest.raises(ValueError, match="w must be finite"):
        model(X, R, T, w=jnp.array([1.0, jnp.nan, 1.0, 1.0]))
    plain = nnx.eval_shape(lambda: DiTField(1, image_size=8, hidden=32, depth=1, num_heads=2, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="unconditional"):
        plain(X, T, y=Y)
    with pytest.raises(ValueError, match="guidance_input=True"):
        plain(X, T, w=W)
    with pytest.raises(ValueError, match="not divisible by patch_size=3"):
        DiTField(1, image_size=8, patch_size=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="multiple of 4"):
        DiTField(1, image_size=8, hidden=24, num_heads=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_classes must be a positive integer"):
        DiTField(1, image_size=8, num_classes=0, rngs=nnx.Rngs(0))


@pytest.mark.slow
def test_meanflow_training_step_and_adam_reduce_the_loss(models):
    """One compiled MeanFlow step on the zero-initialised flow map: a finite loss whose gradient reaches only the
    output layer (adaLN-Zero: every block is the identity and the output layer is zero); after a few Adam steps on a
    fixed batch and key the loss has fallen and every parameter gets a gradient."""
    import optax

    from jaxgen.losses import meanflow_loss

    model = models["map"]
    batch = {"x": X, "y": jnp.array([0, 1, 2, 0])}
    key = jax.random.key(3)
    graphdef, params = nnx.split(model, nnx.Param)
    tx = optax.adam(1e-3)

    def objective(loss):
        return jax.value_and_grad(lambda p: loss(nnx.merge(graphdef, p), batch, key))

    step_value_and_grad = jax.jit(objective(meanflow_loss("linear")))
    value, grads = step_value_and_grad(params)
    assert np.isfinite(float(value)) and float(value) > 0
    flat = {jax.tree_util.keystr(k): g for k, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in flat.values())
    moving = sorted(k for k, g in flat.items() if bool(jnp.any(g != 0)))
    assert moving and all(k.startswith("['out']") for k in moving), moving  # only the output layer moves at first

    # Adam on the plain squared error (p=0): the adaptive weight (p=1) keeps the loss's value near 1 while it is large
    squared_error = objective(meanflow_loss("linear", p=0.0))

    @jax.jit
    def train(params):
        def step(carry, _):
            params, opt_state = carry
            value, grads = squared_error(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), value
        (params, _), values = jax.lax.scan(step, (params, tx.init(params)), None, length=20)
        return params, values

    params, values = train(params)
    assert float(values[-1]) < 0.9 * float(values[0]), values
    _, grads = step_value_and_grad(params)
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert all(bool(jnp.any(g != 0)) for g in leaves)  # through the adaLN gates, every layer now learns
