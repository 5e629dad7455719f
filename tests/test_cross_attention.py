"""Cross-attention (caption) conditioning of UNetField and DiTField; TokenEncoder; TextConditionedField.

The networks are small and shared (module-scoped), and each is applied through one jitted function, so that the
tests compile a handful of programs. ``zero_init=False`` for the U-Net (its untrained output is then not zero, so the
context's effect is visible) and the cross-attention output projections are perturbed where a test needs the
context to matter (they start at zero)."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

from jaxgen.fields import guided_field
from jaxgen.models import DiTField, TextConditionedField, TokenEncoder, UNetField
from jaxgen.models.text import PAD, CrossAttention

B, L, D = 3, 4, 16
VOCAB = 12


def _n_params(model) -> int:
    return sum(v.size for v in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _perturb_cross_attention(model, seed: int = 0, scale: float = 0.3):
    """Give every cross-attention output projection random weights (they start at zero); returns the model."""
    key = jax.random.key(seed)
    for _, module in nnx.iter_graph(model):
        if isinstance(module, CrossAttention):
            key, sub = jax.random.split(key)
            module.proj.kernel[...] = scale * jax.random.normal(sub, module.proj.kernel.shape)
    return model


def _small_unet(context_dim=D):
    return UNetField(1, channels=8, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,), num_heads=2,
                     dropout=0.0, num_classes=10, image_size=8, num_groups=4, zero_init=False,
                     context_dim=context_dim, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))


def _dit(context_dim=D):
    return DiTField(1, image_size=8, patch_size=2, hidden=32, depth=2, num_heads=2, num_classes=10,
                    context_dim=context_dim, rngs=nnx.Rngs(1))


def _small_dit(context_dim=D):
    """A small DiT whose adaLN and output layers are random: DiT zero-initialises them (its untrained output is
    exactly zero); the cross-attention output projections stay zero."""
    return _randomise_zero_layers(_dit(context_dim))


def _randomise_zero_layers(model):
    keep = {id(m.proj) for _, m in nnx.iter_graph(model) if isinstance(m, CrossAttention)}
    key = jax.random.key(7)
    for _, module in nnx.iter_graph(model):
        if isinstance(module, nnx.Linear) and id(module) not in keep and not np.any(np.asarray(module.kernel[...])):
            key, sub = jax.random.split(key)
            module.kernel[...] = 0.1 * jax.random.normal(sub, module.kernel.shape)
    return model


@nnx.jit
def _apply(model, x, t, context, mask):
    return model(x, t, context=context, context_mask=mask)


@nnx.jit
def _apply_plain(model, x, t):
    return model(x, t)


@pytest.fixture(scope="module")
def inputs():
    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k[0], (B, 8, 8, 1))
    t = jax.random.uniform(k[1], (B,))
    context = jax.random.normal(k[2], (B, L, D))
    mask = jnp.array([[True, True, True, False], [True, False, False, False], [True, True, True, True]])
    return x, t, context, mask


@pytest.fixture(scope="module")
def unet():
    return _small_unet()


@pytest.fixture(scope="module")
def unet_perturbed(unet):
    return _perturb_cross_attention(nnx.clone(unet))


@pytest.fixture(scope="module")
def dit():
    return _small_dit()


@pytest.fixture(scope="module")
def dit_perturbed(dit):
    return _perturb_cross_attention(nnx.clone(dit))


# ---------------------------------------------------------------------------------------------------------------
# Parameter counts: context_dim=None is the caption-free network
# ---------------------------------------------------------------------------------------------------------------


def test_context_dim_none_keeps_the_parameter_count_and_cross_attention_sits_where_self_attention_does():
    config = dict(channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,), dropout=0.1,
                  num_classes=10, image_size=8)
    plain = nnx.eval_shape(lambda: UNetField(1, **config, rngs=nnx.Rngs(0)))
    assert _n_params(plain) == 702_753  # the UNetField docstring's (TorchCFM's) count
    with_context = nnx.eval_shape(lambda: UNetField(1, **config, context_dim=D, rngs=nnx.Rngs(0)))
    # a cross-attention block per self-attention block: the 4x4 down stage, the middle, the two 4x4 up stages (64
    # channels each): GroupNorm 2c, W_q c^2 + c, W_kv 2cD + 2c, null k/v 2c, W_o c^2 + c
    c = 64
    per_block = 2 * c + (c * c + c) + (2 * c * D + 2 * c) + 2 * c + (c * c + c)
    assert _n_params(with_context) == 702_753 + 4 * per_block

    dit = dict(image_size=8, patch_size=2, hidden=128, depth=4, num_heads=4, num_classes=10)
    assert _n_params(nnx.eval_shape(lambda: DiTField(1, **dit, rngs=nnx.Rngs(0)))) == 1_277_124  # its docstring
    h = 128
    per_block = (h * h + h) + (2 * h * D + 2 * h) + 2 * h + (h * h + h)  # W_q, W_kv, null k/v, W_o (RMSNorm: none)
    assert _n_params(nnx.eval_shape(lambda: DiTField(1, **dit, context_dim=D, rngs=nnx.Rngs(0)))) == \
        1_277_124 + 4 * per_block


# ---------------------------------------------------------------------------------------------------------------
# Zero initialisation, padding, the null token
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("name", ["unet", "dit"])
def test_zero_initialised_cross_attention_leaves_the_function_unchanged_until_its_projection_moves(name, unet, dit,
                                                                                                   inputs):
    model = unet if name == "unet" else dit
    x, t, context, mask = inputs
    base = np.asarray(_apply_plain(model, x, t))
    assert np.abs(base).max() > 1e-3  # a non-trivial function (zero_init=False; the DiT's zero layers randomised)
    np.testing.assert_array_equal(np.asarray(_apply(model, x, t, context, mask)), base)
    perturbed = _perturb_cross_attention(nnx.clone(model))
    out = np.asarray(_apply(perturbed, x, t, context, mask))
    other = np.asarray(_apply(perturbed, x, t, -context, mask))
    assert np.abs(out - base).max() > 1e-2  # the context now changes the output ...
    assert np.abs(out - other).max() > 1e-2  # ... and different contexts give different outputs


@pytest.mark.parametrize("name", [pytest.param("unet", marks=pytest.mark.slow), "dit"])  # one cross-attention block
def test_masked_padding_tokens_do_not_change_the_output(name, unet_perturbed, dit_perturbed, inputs):
    model = unet_perturbed if name == "unet" else dit_perturbed
    x, t, context, mask = inputs
    out = _apply(model, x, t, context, mask)
    extra = jax.random.normal(jax.random.key(5), (B, 3, D)) * 10.0  # garbage behind a False mask
    padded = _apply(model, x, t, jnp.concatenate([context, extra], 1),
                    jnp.concatenate([mask, jnp.zeros((B, 3), bool)], 1))
    np.testing.assert_allclose(np.asarray(padded), np.asarray(out), atol=1e-5, rtol=1e-5)
    # the masked positions of the original context are ignored too
    scrambled = jnp.where(mask[..., None], context, 100.0)
    np.testing.assert_allclose(np.asarray(_apply(model, x, t, scrambled, mask)), np.asarray(out), atol=1e-5,
                               rtol=1e-5)
    # and the mask matters: unmasking the padding changes the output
    full = _apply(model, x, t, context, jnp.ones_like(mask))
    assert np.abs(np.asarray(full) - np.asarray(out))[:2].max() > 1e-3


@pytest.mark.parametrize("name", [pytest.param("unet", marks=pytest.mark.slow), "dit"])
def test_an_all_masked_context_is_finite_and_equals_no_context(name, unet_perturbed, dit_perturbed, inputs):
    model = unet_perturbed if name == "unet" else dit_perturbed
    x, t, context, _ = inputs
    none = np.asarray(_apply_plain(model, x, t))
    masked = np.asarray(_apply(model, x, t, context * 1e3, jnp.zeros((B, L), bool)))
    assert np.isfinite(masked).all()
    np.testing.assert_allclose(masked, none, atol=1e-5, rtol=1e-5)  # only the learned null token is attended to
    assert np.abs(np.asarray(_apply(model, x, t, context, jnp.ones((B, L), bool))) - none).max() > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# jit and gradients
# ---------------------------------------------------------------------------------------------------------------


def _loss(model, x, t, context, mask):
    return jnp.mean((model(x, t, context=context, context_mask=mask) - x) ** 2)


_grads = nnx.jit(nnx.grad(_loss, argnums=(0, 3)))  # one program: gradients in the parameters and in the context


@pytest.mark.parametrize("name", [pytest.param("unet", marks=pytest.mark.slow), "dit"])  # U-Net: ~10 s compiling
def test_gradients_are_finite_and_reach_the_zero_initialised_projection(name, unet, dit, inputs):
    model = unet if name == "unet" else dit
    x, t, context, mask = inputs
    grads, _ = _grads(model, x, t, context, mask)
    leaves = jax.tree.leaves(grads)
    assert all(np.isfinite(np.asarray(g)).all() for g in leaves)
    proj = [np.abs(np.asarray(v[...])).max() for path, v in nnx.to_flat_state(grads)
            if path[-2:] == ("proj", "kernel") and ("xattn" in path or "cross" in path)]
    assert len(proj) == (4 if name == "unet" else 2)  # U-Net: the 4x4 down and two up stages and the middle; DiT: 2
    assert min(proj) > 0  # W_o = 0 at init, but its gradient is not: training can start
    # the context itself gets a gradient once the projections have moved
    perturbed = _perturb_cross_attention(nnx.clone(model))
    _, g_context = _grads(perturbed, x, t, context, mask)
    assert np.abs(np.asarray(g_context)[mask]).max() > 0
    np.testing.assert_array_equal(np.asarray(g_context)[~mask], 0.0)  # padding gets none


def test_flow_map_networks_take_a_context():
    from jaxgen.models import FlowMapDiT

    model = FlowMapDiT(1, image_size=8, hidden=32, depth=1, num_heads=2, context_dim=D, rngs=nnx.Rngs(0))
    model = _perturb_cross_attention(_randomise_zero_layers(model))
    x = jnp.ones((2, 8, 8, 1))
    c = jnp.ones((2, 3, D))
    out, plain = nnx.jit(lambda m, x, c: (m(x, 0.2, 0.7, context=c), m(x, 0.2, 0.7)))(model, x, c)
    assert out.shape == x.shape and np.isfinite(np.asarray(out)).all()
    assert np.abs(np.asarray(out - plain)).max() > 1e-4


@pytest.mark.slow
def test_encode_and_decode_carry_the_context(unet_perturbed, inputs):
    """ControlNet runs the U-Net as embed -> encode -> decode: the context must flow through those keywords."""
    model = unet_perturbed
    x, t, context, mask = inputs

    @nnx.jit
    def split(model, x, t, context, mask):
        emb = nnx.silu(model.embed(t, jnp.full(t.shape, 10), x.dtype))  # y=None: the null class 10
        h, hs = model.encode(x, emb, context=context, context_mask=mask)
        return model.decode(h, hs, emb, context=context, context_mask=mask)

    np.testing.assert_allclose(np.asarray(split(model, x, t, context, mask)),
                               np.asarray(_apply(model, x, t, context, mask)), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------------


def test_bad_contexts_are_rejected_before_any_work(unet, inputs):
    x, t, context, mask = inputs
    plain = nnx.eval_shape(lambda: _small_unet(None))
    with pytest.raises(ValueError, match="context_dim=None"):
        plain(x, t, context=context)
    for model in (unet, nnx.eval_shape(_dit)):
        with pytest.raises(ValueError, match=r"\(3, L, 16\)"):
            model(x, t, context=context[..., :5])
        with pytest.raises(ValueError, match=r"\(3, L, 16\)"):
            model(x, t, context=context[:2])
        with pytest.raises(ValueError, match="without a context"):
            model(x, t, context_mask=mask)
        with pytest.raises(ValueError, match="context_mask of shape"):
            model(x, t, context=context, context_mask=mask[:, :2])
        with pytest.raises(ValueError, match="boolean"):
            model(x, t, context=context, context_mask=mask.astype(jnp.float32))
        with pytest.raises(ValueError, match="finite"):
            model(x, t, context=context.at[0, 0, 0].set(jnp.nan))
    with pytest.raises(ValueError, match="context_dim must be a positive int"):
        UNetField(1, context_dim=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="context_dim must be a positive integer"):
        DiTField(1, context_dim=-3, rngs=nnx.Rngs(0))


# ---------------------------------------------------------------------------------------------------------------
# TokenEncoder and TextConditionedField
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_model(dit_perturbed):
    field = nnx.clone(dit_perturbed)
    return TextConditionedField(field, TokenEncoder(VOCAB, D, depth=2, heads=2, max_len=10, rngs=nnx.Rngs(2)))


TOKENS = jnp.array([[3, 1, 5, 0, 0, 0], [7, 0, 0, 0, 0, 0], [2, 4, 6, 8, 9, 1]], jnp.int32)


def test_token_encoder_masks_padding():
    enc = TokenEncoder(VOCAB, D, depth=2, heads=2, max_len=10, rngs=nnx.Rngs(2))
    encode = nnx.jit(lambda enc, tokens: enc(tokens))
    context, mask = encode(enc, TOKENS)
    assert context.shape == (B, 6, D)
    np.testing.assert_array_equal(np.asarray(mask), np.asarray(TOKENS != PAD))
    np.testing.assert_array_equal(np.asarray(context)[~np.asarray(mask)], 0.0)
    longer, longer_mask = encode(enc, jnp.pad(TOKENS, ((0, 0), (0, 4))))  # appended PAD: the real tokens' outputs unchanged
    np.testing.assert_allclose(np.asarray(longer[:, :6]), np.asarray(context), atol=1e-5, rtol=1e-5)
    empty, empty_mask = encode(enc, jnp.zeros((2, 5), jnp.int32))
    assert np.isfinite(np.asarray(empty)).all() and not np.asarray(empty_mask).any()
    with pytest.raises(ValueError, match="max_len=10"):
        enc(jnp.ones((1, 11), jnp.int32))
    with pytest.raises(ValueError, match=r"\[0, 11\]"):
        enc(jnp.full((1, 3), VOCAB, jnp.int32))
    with pytest.raises(ValueError, match="integer token ids"):
        enc(jnp.ones((1, 3)))
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        enc(jnp.ones((3,), jnp.int32))


@pytest.mark.slow
def test_text_conditioned_field_padding_null_caption_and_precomputed_context(text_model, inputs):
    x, t, _, _ = inputs

    @nnx.jit  # one program for all the variants
    def outputs(model, x, t):
        context, mask = model.encoder(TOKENS)
        guided = guided_field(model, 0.0, null_label=PAD, label_key="tokens")  # w = 0: the null caption's field
        return {"tokens": model(x, t, tokens=TOKENS), "padded": model(x, t, tokens=jnp.pad(TOKENS, ((0, 0), (0, 3)))),
                "all_pad": model(x, t, tokens=jnp.zeros_like(TOKENS)), "none": model(x, t),
                "precomputed": model(x, t, context=context, context_mask=mask),
                "guided_w0": guided(x, t, tokens=TOKENS)}

    out = {k: np.asarray(v) for k, v in outputs(text_model, x, t).items()}
    close = dict(atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(out["padded"], out["tokens"], **close)  # padding does not change the output
    assert np.isfinite(out["all_pad"]).all()
    np.testing.assert_allclose(out["all_pad"], out["none"], **close)  # all PAD = no caption = the null token only
    assert np.abs(out["tokens"] - out["none"]).max() > 1e-3  # a caption is not the null caption
    # precomputed embeddings (the hook for a user's own text encoder) give the same output as the tokens
    np.testing.assert_allclose(out["precomputed"], out["tokens"], **close)
    # classifier-free guidance against the null caption (all PAD) through guided_field
    np.testing.assert_allclose(out["guided_w0"], out["none"], **close)
    with pytest.raises(ValueError, match="not both"):
        text_model(x, t, tokens=TOKENS, context=jnp.zeros((B, 6, D)))
    with pytest.raises(ValueError, match="no encoder"):
        TextConditionedField(text_model.field)(x, t, tokens=TOKENS)
    with pytest.raises(ValueError, match=r"\(3, L\)"):
        text_model(x, t, tokens=TOKENS[:2])


class _PretrainedEncoder(nnx.Module):
    """A stand-in for a user's pretrained text encoder: a table of token vectors and a linear map."""

    def __init__(self, rngs):
        self.table = nnx.Embed(VOCAB, 8, rngs=rngs)
        self.lin = nnx.Linear(8, D, rngs=rngs)

    def __call__(self, tokens):
        return self.lin(self.table(tokens)), tokens != PAD


@pytest.mark.slow
@pytest.mark.parametrize("trainable", [True, False])
def test_an_external_encoder_is_frozen_by_trainable_false(trainable, inputs):
    x, t, _, _ = inputs
    field = _perturb_cross_attention(_small_dit())
    model = TextConditionedField(field, _PretrainedEncoder(nnx.Rngs(3)), trainable=trainable)

    @nnx.jit
    def grads(model):
        return nnx.grad(lambda m: jnp.mean((m(x, t, tokens=TOKENS) - x) ** 2))(model)

    g = grads(model)
    enc = [np.abs(np.asarray(v)).max() for v in jax.tree.leaves(nnx.state(g.encoder))]
    fld = [np.abs(np.asarray(v)).max() for v in jax.tree.leaves(nnx.state(g.field))]
    assert max(fld) > 0
    if trainable:
        assert max(enc) > 0
    else:
        assert max(enc) == 0.0  # stop_gradient: no gradient into the frozen encoder


def test_a_plain_function_can_be_the_encoder(inputs):
    x, t, _, _ = inputs
    table = jax.random.normal(jax.random.key(4), (VOCAB, D))
    field = _perturb_cross_attention(_small_dit())
    model = TextConditionedField(field, lambda tokens: (table[tokens], tokens != PAD), trainable=False)
    out = nnx.jit(lambda m, x, t, k: m(x, t, tokens=k))(model, x, t, TOKENS)
    expected = _apply(field, x, t, table[TOKENS], TOKENS != PAD)
    np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=1e-5, rtol=1e-5)
