"""UNetField: shapes, size vs TorchCFM, conditioning, dropout modes, gradients, jit, errors; Conv2d and Dropout."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

from jaxgen.losses import flow_matching_loss
from jaxgen.models.layers import Conv2d, Dropout, GroupNorm, _conv_matmul
from jaxgen.models.unet import AttentionBlock, UNetField, Upsample

# TorchCFM 1.0.7's UNetModelWrapper(dim=(1, 8, 8), num_channels=32, num_res_blocks=1, channel_mult=(1, 2),
# class_cond=True, num_classes=11, attention_resolutions="4", dropout=0.1), counted with
# sum(p.numel() for p in model.parameters()) with torchcfm 1.0.7 / torch 2.14.1 (the peers' venv,
# `from torchcfm.models.unet.unet import UNetModelWrapper`): 702,753 parameters.
TORCHCFM_8X8_PARAMS = 702_753

B = 4


def _n_params(model) -> int:
    return sum(v.size for v in jax.tree.leaves(nnx.state(model, nnx.Param)))


@nnx.jit
def _apply(model, x, t, y):
    return model(x, t, y=y)


@pytest.fixture(scope="module")
def model():
    """A small class-conditional 8x8 field (two heads, scale-shift), built under jit with an RBG key
    (both compile much faster on CPU than eager or threefry initialisation).

    ``zero_init=False`` so that the untrained output depends on ``t`` and ``y``.
    """
    return nnx.jit(lambda: UNetField(
        1, channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,), num_heads=2,
        dropout=0.1, num_classes=10, image_size=8, num_groups=8, use_scale_shift_norm=True, zero_init=False,
        rngs=nnx.Rngs(jax.random.key(0, impl="rbg")),
    ))()


@pytest.fixture(scope="module")
def batch():
    x = jax.random.normal(jax.random.key(1), (B, 8, 8, 1))
    return x, jnp.array([0.1, 0.4, 0.7, 0.9]), jnp.array([0, 3, 7, 10])  # 10 = the null class


def test_parameter_count_matches_torchcfm():
    abstract = nnx.eval_shape(lambda: UNetField(
        1, channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,), dropout=0.1,
        num_classes=10, image_size=8, rngs=nnx.Rngs(0),
    ))
    n = _n_params(abstract)
    assert abs(n - TORCHCFM_8X8_PARAMS) <= 0.1 * TORCHCFM_8X8_PARAMS
    assert n == TORCHCFM_8X8_PARAMS  # same layers as ADM/TorchCFM, so the count is exact


@pytest.mark.slow
def test_shape_jit_and_conditioning(model, batch):
    x, t, y = batch
    model.eval()
    out = _apply(model, x, t, y)
    assert out.shape == x.shape and bool(jnp.all(jnp.isfinite(out)))
    np.testing.assert_array_equal(_apply(model, x, t, y), out)  # eval mode is deterministic
    assert not np.allclose(_apply(model, x, t[::-1], y), out, atol=1e-5)  # depends on t
    assert not np.allclose(_apply(model, x, t, (y + 1) % 10), out, atol=1e-5)  # depends on y
    null = _apply(model, x, t, None)  # y=None is the null class
    np.testing.assert_allclose(null, _apply(model, x, t, jnp.full(B, 10)), atol=1e-6)


@pytest.mark.parametrize("image_size, in_channels, channel_mult, attention", [
    (32, 3, (1, 2), (16,)), (28, 1, (1, 2, 2), (7,)), (7, 3, (1, 2), (4,))])
def test_output_shapes_of_other_configurations(image_size, in_channels, channel_mult, attention):
    """Shapes only, traced abstractly (no compilation): 32x32 RGB, 28 -> 14 -> 7 and an odd size."""
    m = nnx.eval_shape(lambda: UNetField(
        in_channels, channels=8, channel_mult=channel_mult, attention_resolutions=attention, image_size=image_size,
        conv_resample=image_size != 28, rngs=nnx.Rngs(0)))  # 28x28: average pooling and plain nearest upsampling
    x = jax.ShapeDtypeStruct((2, image_size, image_size, in_channels), jnp.float32)
    out = nnx.eval_shape(lambda m, x: m(x, jnp.zeros(2)), m, x)
    assert out.shape == x.shape and out.dtype == x.dtype


@pytest.mark.slow
def test_train_mode_dropout_and_finite_flow_matching_gradients(model, batch):
    x, _, y = batch
    loss = flow_matching_loss("linear")

    @nnx.jit
    def value_and_grad(m, key):
        return nnx.value_and_grad(loss)(m, {"x": x, "y": y}, key)

    model.train()
    (v1, grads), (v2, _) = value_and_grad(model, jax.random.key(2)), value_and_grad(model, jax.random.key(2))
    model.eval()
    assert float(v1) != float(v2)  # same t and noise, new dropout masks: train mode is stochastic
    leaves = jax.tree.leaves(grads)
    assert np.isfinite(float(v1)) and len(leaves) == len(jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert sum(bool(jnp.any(g != 0)) for g in leaves) > 0.9 * len(leaves)


@pytest.mark.slow
def test_zero_init_and_group_norm():
    k = nnx.jit(lambda: UNetField(1, channels=8, channel_mult=(1,), attention_resolutions=(), image_size=4,
                                  rngs=nnx.Rngs(jax.random.key(0, impl="rbg"))).conv_out.kernel[...])()
    np.testing.assert_array_equal(k, 0.0)  # ADM: the untrained field is exactly zero

    x = jax.random.normal(jax.random.key(0), (2, 3, 3, 12)) * 3 + 1
    ours, ref = GroupNorm(12, 4), nnx.GroupNorm(12, num_groups=4, epsilon=1e-5, rngs=nnx.Rngs(0))
    a, b = nnx.jit(lambda o, r, x: (o(x), r(x)))(ours, ref, x)
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert GroupNorm(48, 32).num_groups == 24  # clamped to divide the channels


def test_errors(model, batch):
    x, t, y = batch
    with pytest.raises(ValueError, match=r"\(B, H, W, C\) = \(B, 8, 8, 1\)"):
        model(jnp.zeros((B, 8, 8)), t, y=y)
    with pytest.raises(ValueError, match="channels-first"):
        model(jnp.zeros((B, 1, 8, 8)), t, y=y)
    with pytest.raises(ValueError, match="t of shape"):
        model(x, jnp.zeros(B + 1), y=y)
    with pytest.raises(ValueError, match="labels y must have shape"):
        model(x, t, y=jnp.zeros((B, 2), jnp.int32))
    with pytest.raises(ValueError, match=r"labels y must lie in \[0, 10\].*\[0, 11\]"):
        model(x, t, y=jnp.array([0, 3, 7, 11]))  # 11 > the null class: the embedding would return NaN
    with pytest.raises(ValueError, match="labels y must be integers"):
        model(x, t, y=jnp.array([0.0, 3.0, 7.0, 1.0]))
    unconditional = nnx.eval_shape(lambda: UNetField(1, channels=8, image_size=8, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="unconditional"):
        unconditional(x, t, y=y)
    with pytest.raises(ValueError, match="not feature-map sizes"):
        UNetField(1, channels=8, attention_resolutions=(16,), image_size=8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="even channels"):
        UNetField(1, channels=7, image_size=8, rngs=nnx.Rngs(0))


def _lax_conv(x, k, stride):
    p = (k.shape[0] - 1) // 2
    return jax.lax.conv_general_dilated(x, k, (stride, stride), ((p, p), (p, p)), dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("size,cin,cout,ksize,stride", [
    (8, 3, 5, 3, 1), (7, 4, 6, 3, 2), (8, 4, 6, 3, 2), (5, 2, 3, 1, 1), (9, 2, 3, 5, 1), (9, 2, 3, 5, 2),
    (8, 12, 5, 3, 1), (7, 4, 3, 5, 1)])  # the last two: partial products summed over shifts (kh kw C > 72)
@pytest.mark.slow
def test_matmul_convolution_equals_xla_convolution_and_its_gradients(size, cin, cout, ksize, stride):
    """The matrix-product convolution is the same function as lax.conv ('same' padding), values and both gradients."""
    x = jax.random.normal(jax.random.key(size), (2, size, size, cin))
    k = jax.random.normal(jax.random.key(1), (ksize, ksize, cin, cout))
    ours, ref = _conv_matmul(x, k, stride), _lax_conv(x, k, stride)
    assert ours.shape == ref.shape == (2, -(-size // stride), -(-size // stride), cout)
    np.testing.assert_allclose(ours, ref, atol=2e-5)
    f = lambda conv: jax.grad(lambda x, k: jnp.sum(jnp.sin(conv(x, k, stride))), (0, 1))(x, k)
    for a, b in zip(f(_conv_matmul), f(_lax_conv)):
        np.testing.assert_allclose(a, b, atol=5e-5)


@pytest.mark.parametrize("low,size", [(4, 8), (3, 6), (4, 7)])
def test_upsample_convolution_in_sub_pixel_form_equals_upsampling_then_convolving(low, size):
    """The matmul Upsample (sub-pixel form at the low resolution; for odd sizes, upsample-crop-convolve) is the
    xla one (nearest upsampling then lax.conv), values and both gradients."""
    ups = {impl: Upsample(5, size, use_conv=True, conv_impl=impl, rngs=nnx.Rngs(4)) for impl in ("matmul", "xla")}
    x = jax.random.normal(jax.random.key(low), (2, low, low, 5))
    ours, ref = ups["matmul"](x), ups["xla"](x)
    assert ours.shape == ref.shape == (2, size, size, 5)
    np.testing.assert_allclose(ours, ref, atol=2e-5)

    def grads(up):
        graph, params = nnx.split(up)
        return jax.grad(lambda p, x: jnp.sum(jnp.sin(nnx.merge(graph, p)(x))), (0, 1))(params, x)

    for a, b in zip(jax.tree.leaves(grads(ups["matmul"])), jax.tree.leaves(grads(ups["xla"]))):
        np.testing.assert_allclose(a, b, atol=1e-4)


@pytest.mark.slow
def test_conv2d_impls_agree_and_match_nnx_conv_initialisation():
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
    convs = {impl: Conv2d(3, 4, 3, stride=2, impl=impl, rngs=nnx.Rngs(7)) for impl in ("auto", "xla", "matmul")}
    ref = nnx.Conv(3, 4, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), rngs=nnx.Rngs(7))
    np.testing.assert_array_equal(convs["xla"].kernel[...], ref.kernel[...])  # same initialiser and keys
    outs = {impl: c(x) for impl, c in convs.items()}
    for out in outs.values():
        np.testing.assert_allclose(out, ref(x), atol=2e-5)
    with pytest.raises(ValueError, match="odd kernel"):
        Conv2d(3, 4, 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="impl"):
        Conv2d(3, 4, 3, impl="cudnn", rngs=nnx.Rngs(0))


def test_dropout_masks_have_the_rate_are_unbiased_and_switch_off_in_eval():
    drop = Dropout(0.1, rngs=nnx.Rngs(0))
    x = jnp.ones((64, 8, 8, 33))  # odd element count: the last 32-bit word is half used
    a, b = drop(x), drop(x)
    kept = float(jnp.mean(a != 0))
    assert abs(kept - 0.9) < 4 * np.sqrt(0.09 / x.size)  # binomial standard errors
    q = round(65536 * 0.9) / 65536
    np.testing.assert_allclose(np.unique(np.asarray(a)), [0.0, 1 / q], rtol=1e-6)
    assert abs(float(jnp.mean(a)) - 1.0) < 4 * np.sqrt((1 / q - 1) / x.size)  # E[mask / q] = 1
    assert float(jnp.mean(a != b)) > 0.1  # the RNG stream advances between calls
    drop.eval()
    np.testing.assert_array_equal(drop(x), x)


@pytest.mark.parametrize("num_heads", [1, 2])
def test_attention_block_is_softmax_attention_per_head(num_heads):
    """x + W_o concat_h softmax(q_h k_h^T / sqrt(d)) v_h of the group-normed x, against float64 numpy, in float32
    and (loosely) in bfloat16."""
    c, b, hw = 8, 2, 3
    blk = AttentionBlock(c, num_heads=num_heads, num_groups=4, zero_init=False, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (b, hw, hw, c))
    h = np.asarray(blk.norm(x), np.float64).reshape(b, hw * hw, c)
    qkv = h @ np.asarray(blk.qkv.kernel.value, np.float64) + np.asarray(blk.qkv.bias.value, np.float64)
    d = c // num_heads
    heads = []
    for i in range(num_heads):
        q, k, v = (qkv[..., j * c + i * d: j * c + (i + 1) * d] for j in range(3))
        logits = q @ k.transpose(0, 2, 1) / np.sqrt(d)
        w = np.exp(logits - logits.max(-1, keepdims=True))
        heads.append((w / w.sum(-1, keepdims=True)) @ v)
    a = np.concatenate(heads, axis=-1)
    want = np.asarray(x, np.float64) + (a @ np.asarray(blk.proj.kernel.value, np.float64)
                                        + np.asarray(blk.proj.bias.value, np.float64)).reshape(x.shape)
    np.testing.assert_allclose(blk(x), want, rtol=1e-5, atol=1e-5)
    bf16 = nnx.clone(blk)
    nnx.update(bf16, jax.tree.map(lambda p: p.astype(jnp.bfloat16), nnx.state(bf16)))
    out = bf16(x.astype(jnp.bfloat16))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float64), want, atol=0.1)


@pytest.mark.slow  # the costliest compilations of their files: in the full suite, not the fast tier
def test_jvp_through_the_unet_with_attention_matches_finite_differences(model, batch):
    """The flow-map losses differentiate the network along (x, t) with jax.jvp inside the compiled step: through the
    attention, group norms and time embedding of the U-Net, the JVP equals central differences."""
    x, t, y = batch
    graphdef, state = nnx.split(model)

    def f(x, t):
        m = nnx.merge(graphdef, state)
        m.eval()  # no dropout: a deterministic function of (x, t)
        return m(x, t, y=y)

    # three compiled programs (the forward, the JVP and the VJP), each called with the directions as arguments
    forward = jax.jit(f)
    jvp = jax.jit(lambda x, t, vx, vt: jax.jvp(f, (x, t), (vx, vt))[1])
    vjp = jax.jit(lambda x, t, w: jax.vjp(f, x, t)[1](w))
    vx = jax.random.normal(jax.random.key(7), x.shape)
    # along x: central differences (the time embedding's high frequencies make differences in t inaccurate in
    # float32, so the t direction is checked against reverse mode below)
    tangent = jvp(x, t, vx, jnp.zeros_like(t))
    h = 1e-3
    fd = (forward(x + h * vx, t) - forward(x - h * vx, t)) / (2 * h)
    assert float(jnp.max(jnp.abs(tangent))) > 1e-2  # the output moves along the tangent
    np.testing.assert_allclose(np.asarray(tangent), np.asarray(fd), atol=5e-3, rtol=5e-2)
    # along (x, t): forward mode is the transpose of reverse mode, <J v, w> = <v, J^T w>
    vt = jnp.ones_like(t)
    jv = jvp(x, t, vx, vt)
    w = jax.random.normal(jax.random.key(8), jv.shape)
    wx, wt = vjp(x, t, w)
    np.testing.assert_allclose(float(jnp.vdot(jv, w)), float(jnp.vdot(vx, wx) + jnp.vdot(vt, wt)), rtol=1e-4)


def test_the_flow_map_unet_takes_two_times_and_a_guidance_scale():
    """FlowMapUNet(x, r, t, y, w): the interval t - r and the guidance scale w enter the conditioning (w = None is
    w = 1); a network without guidance input refuses w; the one-time U-Net's parameters are unchanged by the new
    options (the main job's 702,753)."""
    from jaxgen.models import FlowMapUNet

    net = nnx.jit(lambda: FlowMapUNet(1, channels=4, channel_mult=(1,), attention_resolutions=(), dropout=0.0,
                                      num_classes=10, image_size=4, num_groups=2, zero_init=False, guidance_input=True,
                                      rngs=nnx.Rngs(jax.random.key(0, impl="rbg"))))()
    x = jax.random.normal(jax.random.key(1), (3, 4, 4, 1))
    r, t, y = jnp.array([0.0, 0.2, 0.5]), jnp.array([1.0, 0.6, 0.5]), jnp.array([1, 2, 10])
    # one batch of four variants (w = 2; r halved; w = 3; w = 1) and the default w, in one compiled program
    rr = jnp.concatenate([r, 0.5 * r, r, r])
    ww = jnp.repeat(jnp.array([2.0, 2.0, 3.0, 1.0]), 3)
    out, default_w = nnx.jit(lambda m: (m(jnp.tile(x, (4, 1, 1, 1)), rr, jnp.tile(t, 4), y=jnp.tile(y, 4), w=ww),
                                        m(x, r, t, y=y)))(net)
    base, half_r, other_w, w1 = jnp.split(out, 4)
    assert base.shape == x.shape
    for other in (half_r, other_w):
        assert float(jnp.max(jnp.abs(other - base))) > 1e-4  # r and w matter
    np.testing.assert_allclose(default_w, w1, atol=1e-6)
    with pytest.raises(ValueError, match="guidance scale w must have shape"):
        net(x, r, t, y=y, w=jnp.ones(2))
    with pytest.raises(ValueError, match="times of shape"):
        net(x, jnp.ones(2), t, y=y)
    plain = nnx.eval_shape(lambda: UNetField(1, channels=4, image_size=4, num_groups=2, attention_resolutions=(),
                                             rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="guidance_input=True"):
        plain(x, t, w=2.0)
