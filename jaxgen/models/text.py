r"""Sequence (caption) conditioning: cross-attention, a small token encoder, and a field wrapper that maps captions to
the networks' ``context``.

A caption-conditioned field is called as ``model(x, t, context=c, context_mask=m)`` with ``c`` of shape
``(B, L, context_dim)`` (one embedding per token) and ``m`` of shape ``(B, L)`` (``True`` = a real token, ``False`` =
padding). The networks (:class:`jaxgen.models.UNetField` and :class:`jaxgen.models.DiTField` built with
``context_dim=...``) read the context by cross-attention (:class:`CrossAttention`; Rombach et al. 2022, "High-Resolution
Image Synthesis with Latent Diffusion Models", sec. 3.3). Every cross-attention layer has a learned *null* key/value
token that every query can attend to, so a caption with no tokens at all (``context=None`` or an all-``False`` mask: the
unconditional branch of classifier-free guidance) is a well-defined, finite input.

:class:`TokenEncoder` turns token ids into a context (a small pre-norm transformer); :class:`TextConditionedField`
composes an encoder and a field, so that samplers and ``guided_field(..., label_key="tokens", null_label=PAD)`` can
pass token ids as the condition.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import jax
import jax.numpy as jnp
from flax import nnx

from jaxgen._checks import check_finite, is_concrete

Array = jax.Array

PAD = 0  #: the padding token id; an all-PAD token sequence is the null (empty) caption

_zeros = nnx.initializers.zeros_init()
_small = nnx.initializers.normal(0.02)
_lecun = nnx.initializers.lecun_normal()


def check_context(context, context_mask, *, batch: int, context_dim: int | None, owner: str
                  ) -> tuple[Array | None, Array | None]:
    """Validate a cross-attention context before any work; return ``(context, mask)`` (``mask`` a bool array, all
    ``True`` when ``context_mask`` is None) or ``(None, None)`` for no context (the null caption).

    Raises ``ValueError`` for a context given to a network without cross-attention (``context_dim=None``), a mask
    without a context, a context not of shape ``(B, L, context_dim)``, a mask not of shape ``(B, L)`` or of a floating
    dtype, and (when concrete) a context holding NaN or inf.
    """
    if context_dim is None:
        if context is not None or context_mask is not None:
            raise ValueError(f"this {owner} has no cross-attention (context_dim=None) but a context was given; build "
                             "it with context_dim=D to condition on a sequence (B, L, D), or drop "
                             "context=/context_mask=.")
        return None, None
    if context is None:
        if context_mask is not None:
            raise ValueError(f"{owner}: context_mask was given without a context; pass context=(B, L, {context_dim}) "
                             "embeddings with it (or neither, for the null caption).")
        return None, None
    shape = tuple(jnp.shape(context))
    if len(shape) != 3 or shape[0] != batch or shape[2] != context_dim:
        raise ValueError(f"{owner} expects context of shape (B, L, context_dim) = ({batch}, L, {context_dim}), got "
                         f"{shape}.")
    if not jnp.issubdtype(jnp.result_type(context), jnp.floating):
        raise ValueError(f"{owner}: the context must be floating point embeddings, got dtype {jnp.result_type(context)}"
                         "; token ids go through an encoder first (jaxgen.models.TextConditionedField).")
    check_finite(context, name="the context")
    if context_mask is None:
        return context, jnp.ones(shape[:2], bool)
    if tuple(jnp.shape(context_mask)) != shape[:2]:
        raise ValueError(f"{owner} expects context_mask of shape (B, L) = {shape[:2]} to match the context, got "
                         f"{tuple(jnp.shape(context_mask))}.")
    dtype = jnp.result_type(context_mask)
    if not (dtype == jnp.bool_ or jnp.issubdtype(dtype, jnp.integer)):
        raise ValueError(f"{owner}: context_mask must be boolean (True = a real token, False = padding), got dtype "
                         f"{dtype}; pass tokens != PAD.")
    return context, jnp.asarray(context_mask) != 0


class CrossAttention(nnx.Module):
    r"""Multi-head cross-attention from queries ``h`` ``(B, N, dim)`` to a context ``(B, L, context_dim)``:
    ``W_o MHA(q = W_q h, k = W_k c, v = W_v c)`` (Rombach et al. 2022, sec. 3.3; each head ``softmax(q k^T / sqrt(d))
    v``, Vaswani et al. 2017, eq. 1), without the residual (the callers add it and normalise ``h`` first).

    A learned null key/value pair ``(k_0, v_0)`` is prepended to the context's keys and values and is never masked:
    every query can always attend to it, so padding masks (``mask`` ``(B, L)``, ``False`` = ignore) never leave a row
    with nothing to attend to, and no context at all (``context=None``, or every token masked) gives exactly
    ``W_o v_0`` at every position. Masked tokens get zero weight, so appending padding does not change the output.
    The output projection ``W_o`` starts at zero: a network gains cross-attention layers without changing its function
    at initialisation (as the zero-initialised output projections of ADM and the adaLN-Zero of DiT).
    """

    def __init__(self, dim: int, context_dim: int, *, num_heads: int, kernel_init=_lecun,
                 rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"cross-attention width {dim} is not divisible by num_heads={num_heads}.")
        self.num_heads = num_heads
        self.q = nnx.Linear(dim, dim, kernel_init=kernel_init, rngs=rngs)
        self.kv = nnx.Linear(context_dim, 2 * dim, kernel_init=kernel_init, rngs=rngs)
        self.null_kv = nnx.Param(_small(rngs.params(), (2, dim)))  # the null token's key and value
        self.proj = nnx.Linear(dim, dim, kernel_init=_zeros, rngs=rngs)

    def __call__(self, h: Array, context: Array | None = None, mask: Array | None = None) -> Array:
        b, n, d = h.shape
        nh = self.num_heads
        null_k, null_v = (jnp.broadcast_to(z.astype(h.dtype), (b, 1, d)) for z in self.null_kv[...])
        if context is None:
            k, v, valid = null_k, null_v, jnp.ones((b, 1), bool)
        else:
            ck, cv = jnp.split(self.kv(context.astype(h.dtype)), 2, axis=-1)
            k = jnp.concatenate([null_k, ck.astype(h.dtype)], axis=1)
            v = jnp.concatenate([null_v, cv.astype(h.dtype)], axis=1)
            mask = jnp.ones(context.shape[:2], bool) if mask is None else mask.astype(bool)
            valid = jnp.concatenate([jnp.ones((b, 1), bool), mask], axis=1)
        q = self.q(h).reshape(b, n, nh, d // nh)
        k, v = (z.reshape(b, -1, nh, d // nh) for z in (k, v))
        # the XLA implementation: differentiable in forward mode (flow-map losses take a JVP through the network)
        a = jax.nn.dot_product_attention(q, k, v, mask=valid[:, None, None, :], implementation="xla")
        return self.proj(a.reshape(b, n, d))


class _EncoderLayer(nnx.Module):
    """A pre-norm transformer encoder layer: ``h + W_o MHA(LN(h))``, then ``h + MLP(LN(h))`` (GELU MLP)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, *, rngs: nnx.Rngs):
        self.heads = heads
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.qkv = nnx.Linear(dim, 3 * dim, rngs=rngs)
        self.proj = nnx.Linear(dim, dim, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        hidden = int(mlp_ratio * dim)
        self.fc1 = nnx.Linear(dim, hidden, rngs=rngs)
        self.fc2 = nnx.Linear(hidden, dim, rngs=rngs)

    def __call__(self, h: Array, attend: Array) -> Array:
        b, n, d = h.shape
        q, k, v = (z.reshape(b, n, self.heads, d // self.heads) for z in jnp.split(self.qkv(self.norm1(h)), 3, -1))
        a = jax.nn.dot_product_attention(q, k, v, mask=attend, implementation="xla")
        h = h + self.proj(a.reshape(b, n, d))
        return h + self.fc2(nnx.gelu(self.fc1(self.norm2(h))))


class TokenEncoder(nnx.Module):
    r"""Token ids ``(B, L)`` -> ``(context (B, L, dim), mask (B, L))``: a token embedding plus learned absolute
    positions, ``depth`` pre-norm transformer layers (Vaswani et al. 2017; pre-norm as in Xiong et al. 2020, "On Layer
    Normalization in the Transformer Architecture") whose self-attention ignores padding, and a final LayerNorm.

    ``mask = tokens != PAD`` (``PAD = 0``); the context is zero at padded positions. Padding only ever appears in keys
    through the mask (each token also attends to itself, so an all-PAD row is finite), so appending PAD tokens does not
    change the other positions' outputs; an all-PAD sequence (the null caption) has an all-``False`` mask and the
    field's cross-attention then sees only its null token.

    Example::

        enc = TokenEncoder(vocab_size=18, dim=64, depth=2, heads=4, max_len=8, rngs=nnx.Rngs(0))
        context, mask = enc(tokens)                 # tokens: (B, L) ints, L <= 8
        v = unet(x, t, context=context, context_mask=mask)

    Args:
      vocab_size: number of token ids (ids ``0 .. vocab_size - 1``, ``0`` the padding).
      dim: the embedding width (the field's ``context_dim``).
      depth: transformer layers.
      heads: attention heads (must divide ``dim``).
      max_len: the longest token sequence (number of learned positions).
      mlp_ratio: the MLP's hidden width relative to ``dim``.
      rngs: ``nnx.Rngs`` for the parameters.
    """

    def __init__(self, vocab_size: int, dim: int, depth: int = 2, heads: int = 4, max_len: int = 16, *,
                 mlp_ratio: float = 4.0, rngs: nnx.Rngs):
        for name, value in (("vocab_size", vocab_size), ("dim", dim), ("heads", heads), ("max_len", max_len)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"TokenEncoder {name} must be a positive integer, got {value!r}.")
        if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or depth < 0:
            raise ValueError(f"TokenEncoder depth must be a non-negative integer, got {depth!r}.")
        if vocab_size < 2:
            raise ValueError(f"TokenEncoder vocab_size must be >= 2 (PAD = 0 and at least one word), got {vocab_size}.")
        if dim % heads:
            raise ValueError(f"TokenEncoder dim={dim} is not divisible by heads={heads}.")
        self.vocab_size, self.dim, self.max_len = int(vocab_size), int(dim), int(max_len)
        self.embed = nnx.Embed(vocab_size, dim, embedding_init=_small, rngs=rngs)
        self.positions = nnx.Param(_small(rngs.params(), (max_len, dim)))
        self.layers = nnx.List([_EncoderLayer(dim, heads, mlp_ratio, rngs=rngs) for _ in range(depth)])
        self.norm = nnx.LayerNorm(dim, rngs=rngs)

    def __call__(self, tokens: Array) -> tuple[Array, Array]:
        shape = tuple(jnp.shape(tokens))
        if len(shape) != 2:
            raise ValueError(f"TokenEncoder expects token ids of shape (B, L), got {shape}"
                             + (" (add the batch axis: tokens[None])." if len(shape) == 1 else "."))
        if shape[1] > self.max_len:
            raise ValueError(f"TokenEncoder: {shape[1]} tokens but max_len={self.max_len}; shorten the caption or "
                             f"build the encoder with max_len >= {shape[1]}.")
        dtype = jnp.result_type(tokens)
        if not jnp.issubdtype(dtype, jnp.integer):
            raise ValueError(f"TokenEncoder expects integer token ids, got dtype {dtype}.")
        if is_concrete(tokens) and np.size(tokens):
            values = np.asarray(tokens)  # on the host: also when a jitted function closes over concrete tokens
            lo, hi = int(values.min()), int(values.max())
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(f"TokenEncoder token ids must lie in [0, {self.vocab_size - 1}], got values in "
                                 f"[{lo}, {hi}].")
        mask = tokens != PAD
        n = shape[1]
        h = self.embed(tokens) + self.positions[:n].astype(self.embed.embedding.dtype)
        attend = (mask[:, None, None, :] | jnp.eye(n, dtype=bool)[None, None])  # keys: real tokens, and itself
        for layer in self.layers:
            h = layer(h, attend)
        return jnp.where(mask[..., None], self.norm(h), 0.0), mask


class TextConditionedField(nnx.Module):
    r"""A caption-conditioned field ``x, t, tokens -> field(x, t, context=..., context_mask=...)``.

    ``field`` is a network built with ``context_dim`` (:class:`jaxgen.models.UNetField`,
    :class:`jaxgen.models.DiTField`) and ``encoder`` maps token ids ``(B, L)`` to ``(context (B, L, context_dim),
    mask (B, L))``, e.g. a :class:`TokenEncoder` trained jointly with the field. The wrapper is itself a field:
    samplers pass ``cond={"tokens": ids}`` and ``guided_field(model, w, label_key="tokens", null_label=PAD)`` runs
    classifier-free guidance against the null caption (all PAD).

    ``__call__(x, t, tokens=None, context=None, context_mask=None, **cond)``:

    * ``tokens``: encoded by the encoder, then passed on as ``context`` / ``context_mask``; an all-PAD row (or
      ``tokens=None`` and no context) is the null caption;
    * ``context`` / ``context_mask``: precomputed embeddings, passed to the field as they are (the encoder is skipped);
    * ``**cond``: the field's other inputs (``y``, ``w``), passed through.

    **A pretrained text encoder.** Either precompute its embeddings once and pass them directly (the cheapest way when
    the encoder is large and frozen)::

        context, mask = t5_embed(captions)          # any model, outside the training step: (B, L, D), (B, L)
        v = model(x, t, context=context, context_mask=mask)

    or give it as ``encoder=``: any callable ``tokens -> (context, mask)``, either an ``nnx.Module`` (its parameters
    become part of this module's state) or a pure function closing over its weights. ``trainable=False`` freezes it:
    its output is wrapped in ``jax.lax.stop_gradient``, so no gradient reaches its parameters::

        class Pretrained(nnx.Module):               # e.g. weights loaded from a checkpoint
            def __init__(self, table): self.table = nnx.Param(table)
            def __call__(self, tokens): return self.table[tokens], tokens != PAD
        model = TextConditionedField(UNetField(..., context_dim=D, rngs=rngs), Pretrained(table), trainable=False)
        v = model(x, t, tokens=ids)

    A frozen ``nnx.Module`` encoder still holds ``nnx.Param``\ s: give the optimizer only the field's
    (``nnx.Optimizer(model, tx, wrt=nnx.All(nnx.Param, nnx.PathContains("field")))``) so weight decay does not move it.

    Args:
      field: the caption-conditioned network (called with ``context=``, ``context_mask=``).
      encoder: ``tokens -> (context, mask)``, or None (then only ``context=`` conditions the field).
      trainable: False: no gradient into the encoder (``jax.lax.stop_gradient`` on its output).
    """

    def __init__(self, field: Callable, encoder: Callable | None = None, *, trainable: bool = True):
        if not callable(field):
            raise ValueError(f"TextConditionedField needs a callable field, got {type(field).__name__}.")
        if encoder is not None and not callable(encoder):
            raise ValueError(f"TextConditionedField encoder must be a callable tokens -> (context, mask), got "
                             f"{type(encoder).__name__}.")
        self.field = field
        self.encoder = encoder
        self.trainable = bool(trainable)

    def encode(self, tokens: Array) -> tuple[Array, Array]:
        """``(context, mask)`` of token ids ``(B, L)`` (through ``stop_gradient`` when the encoder is frozen)."""
        if self.encoder is None:
            raise ValueError("this TextConditionedField has no encoder, so it cannot read tokens; build it with "
                             "encoder=TokenEncoder(...) (or any tokens -> (context, mask)), or pass context= "
                             "embeddings.")
        out = self.encoder(tokens)
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise ValueError("the encoder of a TextConditionedField must return a pair (context (B, L, D), mask "
                             f"(B, L)), got {type(out).__name__}.")
        context, mask = out
        if not self.trainable:
            context = jax.lax.stop_gradient(context)
        return context, mask

    def __call__(self, x: Array, t: Array, tokens: Array | None = None, context: Array | None = None,
                 context_mask: Array | None = None, **cond) -> Array:
        if tokens is not None:
            if context is not None or context_mask is not None:
                raise ValueError("TextConditionedField: pass either tokens= or context= (precomputed embeddings), not "
                                 "both.")
            n = jnp.shape(x)[0] if jnp.ndim(x) else None
            if jnp.ndim(tokens) != 2 or jnp.shape(tokens)[0] != n:
                raise ValueError(f"TextConditionedField expects tokens of shape (B, L) = ({n}, L), got "
                                 f"{tuple(jnp.shape(tokens))}.")
            context, context_mask = self.encode(tokens)
        return self.field(x, t, context=context, context_mask=context_mask, **cond)


__all__ = ["PAD", "CrossAttention", "TokenEncoder", "TextConditionedField", "check_context"]
