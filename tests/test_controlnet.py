"""ControlNet (Zhang, Rao & Agrawala 2023): the controlled field starts as the base exactly, the copy starts as the
base's encoder, zero convolutions gate the control and the gradient, training with the filter leaves the base
bit-identical; control extraction (edge maps, low resolution, masks) and the edge-agreement score."""

import functools

import numpy as np
import optax
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

from jaxgen.data import load_digits
from jaxgen.data.controls import edge_agreement, edge_map, low_resolution, masked_image, random_box_mask
from jaxgen.inverse import half_mask
from jaxgen.losses import flow_matching_loss
from jaxgen.models import ControlledField, ControlNet, FlowMapUNet, UNetField
from jaxgen.training import Trainer, Update

B = 4


def _rbg(seed):
    return nnx.Rngs(jax.random.key(seed, impl="rbg"))  # cheaper initialisation on CPU than threefry


def _params(module) -> dict:
    """``{path: array}`` of a module's parameters."""
    flat = nnx.to_flat_state(nnx.state(module, nnx.Param))
    return {path: v[...] for path, v in flat}


def _perturb(module, seed: int, scale: float):
    """Add ``scale * N(0, 1)`` noise to every parameter (zero-initialised ones included): a trained-looking module.
    In NumPy, so that no program is compiled for it."""
    rng = np.random.default_rng(seed)
    for _, v in nnx.iter_graph(module):
        if not isinstance(v, nnx.Param):
            continue
        p = np.asarray(v[...])
        v.set_value(jnp.asarray(p + scale * rng.standard_normal(p.shape).astype(p.dtype)))


def _perturb_zero_convs(controlnet: ControlNet, seed: int, scale: float = 0.1):
    for i, part in enumerate([controlnet.hint.zero_out, controlnet.zero_middle, *controlnet.zero_skips]):
        _perturb(part, seed + i, scale)


@nnx.jit
def _controlled(model, x, t, c, y):
    return model(x, t, control=c, y=y)


@nnx.jit
def _plain(model, x, t, y):
    return model(x, t, y=y)


@pytest.fixture(scope="module")
def base():
    """A small class-conditional 8x8 U-Net with ADM's zero-initialised layers, then perturbed everywhere (so its output
    is not trivially zero and no layer is at its initial zero)."""
    model = nnx.jit(lambda: UNetField(1, channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(),
                                      num_heads=2, dropout=0.1, num_classes=10, image_size=8, num_groups=8,
                                      rngs=_rbg(0)))()
    assert float(jnp.abs(model.conv_out.kernel[...]).max()) == 0.0  # zero_init: the untrained output is zero
    _perturb(model, 7, 0.2)
    model.eval()
    return model


@pytest.fixture(scope="module")
def controlnet(base):
    return nnx.jit(lambda b: ControlNet(b, 1, rngs=_rbg(1)))(base)


@pytest.fixture(scope="module")
def inputs():
    k = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(k[0], (B, 8, 8, 1))
    t = jax.random.uniform(k[1], (B,))
    y = jnp.array([0, 3, 7, 10])  # 10 = the null class
    control = jax.random.uniform(k[2], (B, 8, 8, 1), minval=0.1, maxval=1.0)  # random, non-zero everywhere
    return x, t, y, control


@pytest.fixture(scope="module")
def base_out(base, inputs):
    x, t, y, _ = inputs
    return _plain(base, x, t, y)


# -- ControlNet / ControlledField -----------------------------------------------------------------------------------

def test_copy_starts_as_the_base_encoder(base, controlnet):
    copy, ref = _params(controlnet.encoder), _params(base)
    encoder_parts = {"conv_in", "down", "mid", "mid2", "time_in", "time_out", "label_embed"}
    assert {p[0] for p in copy} == encoder_parts  # the decoder (up, norm_out, conv_out) is not copied
    for path, value in copy.items():
        assert value.shape == ref[path].shape and bool(jnp.all(value == ref[path])), path
    assert sum(v.size for v in copy.values()) > 0.4 * sum(v.size for v in ref.values())
    # a copy, not shared variables: the copy trains, the base does not
    assert controlnet.encoder.conv_in.kernel is not base.conv_in.kernel
    # the zero convolutions and the hint encoder's last convolution start at zero
    for conv in [controlnet.hint.zero_out, controlnet.zero_middle, *controlnet.zero_skips]:
        assert not bool(jnp.any(conv.kernel[...])) and not bool(jnp.any(conv.bias[...]))
    assert [z.kernel.shape[-1] for z in controlnet.zero_skips] == [16, 16, 16, 32]  # conv_in, res, down, res


def test_initial_controlled_field_equals_base_exactly(base, controlnet, inputs, base_out):
    x, t, y, control = inputs
    assert float(jnp.std(base_out)) > 0.1  # the perturbed base is not trivially zero
    field = ControlledField(base, controlnet)
    out = _controlled(field, x, t, control, y)
    assert bool(jnp.all(out == base_out))
    other = _controlled(field, x, t, 2.0 * control + 1.0, y)
    assert bool(jnp.all(other == base_out))
    skips, middle = nnx.jit(lambda m, *a: m(*a))(controlnet, x, t, control, y)
    assert all(not bool(jnp.any(s)) for s in skips) and not bool(jnp.any(middle))


def test_control_none_is_the_base(base, controlnet, inputs, base_out):
    x, t, y, _ = inputs
    assert bool(jnp.all(_plain(ControlledField(base, controlnet), x, t, y) == base_out))


@pytest.mark.slow
def test_perturbed_zero_convolutions_let_the_control_change_the_output(base, controlnet, inputs, base_out):
    x, t, y, control = inputs
    cn = nnx.clone(controlnet)
    _perturb_zero_convs(cn, 11)
    field = ControlledField(base, cn)
    out = _controlled(field, x, t, control, y)
    assert float(jnp.max(jnp.abs(out - base_out))) > 1e-3
    assert float(jnp.max(jnp.abs(_controlled(field, x, t, 1.0 - control, y) - out))) > 1e-3  # the control matters
    # the control scale: 0 switches the control off (exactly), per-sample scales act per sample
    off = ControlledField(base, cn, control_scale=0.0)
    assert bool(jnp.all(_controlled(off, x, t, control, y) == base_out))
    mixed = nnx.jit(lambda m, s: m(x, t, control=control, y=y, control_scale=s))(field, jnp.array([0.0, 1, 1, 1]))
    np.testing.assert_allclose(mixed[0], base_out[0], atol=1e-5)
    np.testing.assert_allclose(mixed[1:], out[1:], atol=1e-5)


@functools.partial(jax.jit, static_argnums=0)
def _energy_grad(graphdef, train, rest, x, t, control, y):
    """``grad_train sum(field(x, t, control, y)^2)``: plain ``jax.jit`` and ``jax.grad`` over the split field."""
    return jax.grad(lambda tr: jnp.sum(nnx.merge(graphdef, tr, rest)(x, t, control=control, y=y) ** 2))(train)


def _trainable_grads(field, x, t, control, y):
    graphdef, train, rest = nnx.split(field, ControlledField.trainable, ...)
    return {path: v[...] for path, v in nnx.to_flat_state(_energy_grad(graphdef, train, rest, x, t, control, y))}


@pytest.mark.slow
def test_gradients_through_zero_convolutions(base, controlnet, inputs):
    """Paper sec. 3.1: at zero initialisation only the zero convolutions get a gradient (the copy and the hint encoder
    get exactly zero, since the zero convolutions' outputs do not depend on their inputs); once those are non-zero
    the gradient reaches the hint encoder's first layer and the copy."""
    x, t, y, control = inputs
    g = _trainable_grads(ControlledField(base, controlnet), x, t, control, y)
    assert all(p[0] == "controlnet" for p in g)  # the filter selects the ControlNet only
    zero_convs = [p for p in g if p[1] in ("zero_skips", "zero_middle") and p[-1] == "kernel"]
    assert len(zero_convs) == 5 and all(float(jnp.abs(g[p]).max()) > 0 for p in zero_convs)
    assert all(not bool(jnp.any(v)) for p, v in g.items() if p[1] in ("hint", "encoder"))

    cn = nnx.clone(controlnet)
    _perturb_zero_convs(cn, 12)
    g = _trainable_grads(ControlledField(base, cn), x, t, control, y)
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in g.values())
    assert float(jnp.abs(g[("controlnet", "hint", "convs", 0, "kernel")]).max()) > 0
    assert float(jnp.abs(g[("controlnet", "encoder", "conv_in", "kernel")]).max()) > 0
    assert float(jnp.abs(g[("controlnet", "encoder", "time_in", "kernel")]).max()) > 0


@pytest.mark.slow
def test_trainer_with_the_filter_trains_only_the_controlnet(base, controlnet):
    """One Trainer step with ``Update(loss, params=ControlledField.trainable)``: the base's parameters stay identical,
    the zero convolutions moved (and, with Adam and exactly zero gradients, nothing else yet); after three steps the
    hint encoder's first convolution and the copy have moved too."""
    data = load_digits("train")
    x, y = jnp.asarray(data.images[:16]), jnp.asarray(data.labels[:16])
    batch = {"x": x, "y": y, "control": edge_map(x)}
    field = ControlledField(nnx.clone(base), nnx.clone(controlnet))
    field.train()  # dropout on, as in real training
    trainer = Trainer(field, [Update(flow_matching_loss("linear"), params=ControlledField.trainable)],
                      optax.adam(1e-3), data=lambda key: batch, fuse_steps=False)
    before = _params(field)
    state = trainer.init(0)
    n_trainable = len([p for p in before if p[0] == "controlnet"])
    assert len(jax.tree.leaves(state.opt_state)) == 2 * n_trainable + 1  # Adam's moments of the ControlNet only
    state, _ = trainer.steps(state, 1)
    after = _params(trainer.model(state))
    changed = {p for p in before if not bool(jnp.all(before[p] == after[p]))}
    assert all(p[0] == "controlnet" for p in changed)  # the base is bit-identical
    assert {p[1] for p in changed} == {"zero_skips", "zero_middle"}
    state, losses = trainer.steps(state, 2)
    assert bool(jnp.all(jnp.isfinite(losses)))
    final = _params(trainer.model(state))
    assert all(bool(jnp.all(before[p] == final[p])) for p in before if p[0] == "base")
    for p in [("controlnet", "hint", "convs", 0, "kernel"), ("controlnet", "hint", "zero_out", "kernel"),
              ("controlnet", "encoder", "conv_in", "kernel")]:
        assert not bool(jnp.all(before[p] == final[p])), p


@pytest.mark.slow
def test_cross_attention_context_reaches_base_and_copy():
    """With a caption U-Net (``context_dim``) the context goes to the base and to the copy: at initialisation the
    controlled field is the base for the same context, and the copy's residuals depend on the context."""
    base = nnx.jit(lambda: UNetField(1, channels=8, channel_mult=(1,), attention_resolutions=(), num_heads=1,
                                     dropout=0.0, num_classes=None, image_size=8, num_groups=4, context_dim=4,
                                     rngs=_rbg(5)))()
    _perturb(base, 5, 0.2)
    cn = ControlNet(base, 1, hint_channels=(8,), rngs=_rbg(6))
    field = ControlledField(base, cn)
    k = jax.random.split(jax.random.key(9), 4)
    x, t = jax.random.normal(k[0], (2, 8, 8, 1)), jnp.array([0.3, 0.8])
    ctx, control = jax.random.normal(k[1], (2, 3, 4)), jax.random.uniform(k[2], (2, 8, 8, 1))
    mask = jnp.array([[True, True, False], [True, False, False]])
    run = nnx.jit(lambda m, c, cm, ctl: m(x, t, control=ctl, context=c, context_mask=cm))
    ref = nnx.jit(lambda m, c, cm: m(x, t, context=c, context_mask=cm))(base, ctx, mask)
    assert bool(jnp.all(run(field, ctx, mask, control) == ref))
    _perturb_zero_convs(cn, 13)
    assert float(jnp.max(jnp.abs(run(field, ctx, mask, control) - run(field, 2.0 * ctx, mask, control)))) > 1e-4
    with pytest.raises(ValueError, match="context"):
        field(x, t, control=control, context=ctx[..., :3])


def test_bad_control_is_rejected_before_any_work(base, controlnet, inputs):
    x, t, y, control = inputs
    field = ControlledField(base, controlnet)
    with pytest.raises(ValueError, match="channels-first"):
        field(x, t, control=control.transpose(0, 3, 1, 2), y=y)
    with pytest.raises(ValueError, match=r"control\[\.\.\., None\]"):
        field(x, t, control=control[..., 0], y=y)
    with pytest.raises(ValueError, match="control_channels=1"):
        field(x, t, control=jnp.concatenate([control, control], -1), y=y)
    with pytest.raises(ValueError, match=r"\(4, 8, 8, 1\)"):
        field(x, t, control=control[:2], y=y)
    with pytest.raises(ValueError, match="control_scale"):
        field(x, t, control=control, y=y, control_scale=jnp.ones(3))
    other = nnx.eval_shape(lambda: UNetField(1, channels=32, num_groups=8, num_classes=10, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="the UNetField the ControlNet was built from"):
        ControlledField(other, controlnet)
    with pytest.raises(ValueError, match="control_channels must be a positive int"):
        ControlNet(base, 0, rngs=_rbg(0))
    with pytest.raises(ValueError, match="power of two"):
        ControlNet(base, 1, hint_downsample=3, rngs=_rbg(0))
    with pytest.raises(ValueError, match="at least 3 widths"):
        ControlNet(base, 1, hint_downsample=4, rngs=_rbg(0))
    with pytest.raises(ValueError, match="UNetField"):
        ControlNet(object(), 1, rngs=_rbg(0))
    flow_map = nnx.eval_shape(lambda: FlowMapUNet(1, channels=16, num_groups=8, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="2 times"):
        ControlNet(flow_map, 1, rngs=_rbg(0))


def test_hint_downsample_encodes_larger_controls(base):
    cn = ControlNet(base, 2, hint_channels=(8, 16), hint_downsample=2, rngs=_rbg(4))
    big = jnp.ones((B, 16, 16, 2))
    cn.check_control(big, (B, 8, 8, 1))
    assert cn.hint(big).shape == (B, 8, 8, 16)  # the input convolution's output shape
    with pytest.raises(ValueError, match=r"\(4, 16, 16, 2\)"):
        cn.check_control(jnp.ones((B, 8, 8, 2)), (B, 8, 8, 1))


# -- controls ---------------------------------------------------------------------------------------------------------

def _bar():
    """A flat -1 image with a +1 vertical bar in columns 2-5."""
    img = -np.ones((1, 8, 8, 1), np.float32)
    img[:, :, 2:6] = 1.0
    return jnp.asarray(img)


def test_edge_map_of_a_vertical_bar():
    e = np.asarray(jax.jit(edge_map)(_bar()))[0, :, :, 0]
    assert e.shape == (8, 8) and e.min() >= 0.0 and e.max() == 1.0
    np.testing.assert_array_equal(e[:, [1, 2, 5, 6]], 1.0)  # both sides of each of the bar's edges
    np.testing.assert_array_equal(e[:, [0, 3, 4, 7]], 0.0)  # flat background and the bar's flat inside, borders too
    flat = edge_map(jnp.full((2, 8, 8, 3), 0.3))
    assert bool(jnp.all(flat == 0.0))  # a flat image has no edges (and no NaN)
    rgb = jnp.concatenate([_bar()] * 3, axis=-1)  # channels are averaged
    np.testing.assert_array_equal(edge_map(rgb), edge_map(_bar()))
    digits = jnp.asarray(load_digits("test").images[:32])
    soft, binary = edge_map(digits), edge_map(digits, threshold=0.5)
    assert bool(jnp.all((soft >= 0) & (soft <= 1))) and set(np.unique(binary)) <= {0.0, 1.0}
    np.testing.assert_array_equal(binary, (soft > 0.5).astype(np.float32))
    with pytest.raises(ValueError, match="channel axis"):
        edge_map(jnp.zeros((2, 8, 8)))
    with pytest.raises(ValueError, match="threshold"):
        edge_map(digits, threshold=1.5)


def test_low_resolution_is_an_idempotent_mean_preserving_projection():
    x = jax.random.uniform(jax.random.key(0), (3, 8, 8, 2), minval=-1, maxval=1)
    low = jax.jit(low_resolution, static_argnums=1)(x, 4)
    np.testing.assert_allclose(low_resolution(low, 4), low, atol=1e-6)
    np.testing.assert_allclose(low.mean(axis=(1, 2)), x.mean(axis=(1, 2)), atol=1e-6)
    assert bool(jnp.all(low[:, :4, :4] == low[:, :1, :1]))  # constant blocks
    np.testing.assert_array_equal(low_resolution(x, 1), x)
    with pytest.raises(ValueError, match="divide"):
        low_resolution(x, 3)


def test_masks():
    shape = (64, 8, 8, 1)
    m = np.asarray(jax.jit(lambda k: random_box_mask(k, shape, min_fraction=0.25, max_fraction=0.5))(
        jax.random.key(0)))
    assert m.shape == shape and set(np.unique(m)) <= {0.0, 1.0}
    for mask in m[..., 0]:
        rows, cols = np.nonzero(mask == 0)
        h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
        assert 2 <= h <= 4 and 2 <= w <= 4 and len(rows) == h * w  # one filled rectangle of the allowed sizes
    assert len({m[i].tobytes() for i in range(64)}) > 10
    x = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    keep_right = half_mask(x.shape, "right")  # 1 = known: the right half
    c = masked_image(x, keep_right)
    assert c.shape == (2, 8, 8, 2) and bool(jnp.all(c[:, :, :4, 0] == 0))
    assert bool(jnp.all(c[:, :, 4:, 0] == x[:, :, 4:, 0]))
    assert bool(jnp.all(c[..., 1:] == keep_right))
    with pytest.raises(ValueError, match="mask of shape"):
        masked_image(x, jnp.ones((2, 8, 8)))


def test_edge_agreement_own_versus_other_digits():
    """Real digits against their own edge maps score 1; against other digits' maps of the same class about 0.61, of
    any class about 0.40 (the reference values in the docstring)."""
    data = load_digits("all")
    x, y = jnp.asarray(data.images), np.asarray(data.labels)
    e = edge_map(x)
    assert float(edge_agreement(x, e)) == pytest.approx(1.0, abs=1e-5)
    rng = np.random.default_rng(0)
    same = np.arange(len(y))
    for c in range(10):  # a derangement within each class: every digit gets another digit of its class
        idx = rng.permutation(np.flatnonzero(y == c))
        same[idx] = np.roll(idx, 1)
    assert np.all(same != np.arange(len(y))) and np.all(y[same] == y)
    other = rng.permutation(len(y))
    own, same_class, any_class = (float(edge_agreement(x, e[p])) for p in (np.arange(len(y)), same, other))
    assert own > same_class > any_class
    assert 0.5 < same_class < 0.7 and 0.3 < any_class < 0.5
    per = edge_agreement(x[:8], e[:8][::-1], per_sample=True)
    assert per.shape == (8,) and bool(jnp.all(per < 1))
    assert float(edge_agreement(jnp.zeros((2, 8, 8, 1)), e[:2])) == 0.0  # a flat sample has no edges: 0, not NaN
    with pytest.raises(ValueError, match="control_edges"):
        edge_agreement(x[:4], e[:4, ..., 0])
