r"""A diffusion transformer (DiT) vector field and flow map for images (Flax NNX).

The network of Peebles & Xie 2023 ("Scalable Diffusion Models with Transformers", DiT): the image is cut into
``p x p`` patches, each patch a token; a stack of transformer blocks conditioned by adaLN-Zero on the time (and
label, guidance scale) embedding; a linear decoder back to patches. It carries three changes of LLaMA-style
transformers that the flow-map networks use (improved MeanFlow, Geng et al. 2025, arXiv 2512.02012): rotary position
embeddings (RoPE, Su et al. 2021), here 2-D axial, on the queries and keys of every attention layer instead of DiT's
fixed absolute sin-cos embedding; RMSNorm (Zhang & Sennrich 2019) instead of LayerNorm; a SwiGLU MLP (Shazeer 2020)
instead of the GELU one. (Improved MeanFlow's network also normalises queries and keys and conditions in context,
with extra tokens, rather than by adaLN; neither is done here.)

Images are channels-last, ``(B, H, W, C)``, as for :class:`jaxgen.models.UNetField`; the field is called as
``model(x, t, y=labels)`` and the flow map as ``model(x, r, t, y=labels)``. With ``context_dim`` every block also
reads a token sequence by cross-attention (PixArt-alpha, Chen et al. 2023): ``model(x, t, context=c,
context_mask=m)``.
"""

from __future__ import annotations

import math

import numpy as np
import jax
import jax.numpy as jnp
from flax import nnx

from jaxgen._checks import check_finite, check_labels
from jaxgen.models.embeddings import GUIDANCE_EMBEDDING_SCALE, ScalarEmbedding
from jaxgen.models.text import CrossAttention, check_context

Array = jax.Array

FREQUENCY_DIM = 256  # sinusoidal features of a time / guidance scale before its MLP (DiT's frequency_embedding_size)

_zeros = nnx.initializers.zeros_init()
_xavier = nnx.initializers.xavier_uniform()  # DiT's initialisation of every transformer linear layer
_small = nnx.initializers.normal(0.02)  # DiT's initialisation of the label table and the time MLPs


def patchify(x: Array, patch_size: int) -> Array:
    """Cut images ``(B, H, W, C)`` into non-overlapping ``p x p`` patches: tokens ``(B, (H/p) (W/p), p p C)`` in
    row-major order (token ``i (W/p) + j`` is the patch at row ``i``, column ``j``; inside a patch, pixels in
    row-major order, channels last). A linear layer on the tokens is DiT's patch embedding (a stride-``p`` ``p x p``
    convolution; Peebles & Xie 2023, sec. 3.2 "Patchify")."""
    b, h, w, c = x.shape
    p = patch_size
    x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: Array, patch_size: int, height: int, width: int) -> Array:
    """The inverse of :func:`patchify`: tokens ``(B, (H/p) (W/p), p p C)`` back to images ``(B, H, W, C)``."""
    b, _, d = tokens.shape
    p = patch_size
    c = d // (p * p)
    x = tokens.reshape(b, height // p, width // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, height, width, c)


def rope_angles(positions: Array, head_dim: int, *, base: float = 10_000.0) -> Array:
    r"""The rotation angles of 2-D axial rotary position embeddings, shape ``(L, head_dim / 2)``.

    ``positions`` of shape ``(L, 2)`` holds each token's ``(row, column)``. The first ``head_dim / 4`` angles are
    ``row * theta_k`` and the last ``head_dim / 4`` are ``column * theta_k``, with RoFormer's frequencies
    ``theta_k = base^{-k / (head_dim / 4)}``, ``k = 0 .. head_dim / 4 - 1`` (Su et al. 2021, "RoFormer", sec. 3.2.2,
    eq. 15, for the ``head_dim / 2`` dimensions each axis gets): half the head dimensions rotate with the row index,
    half with the column index (the axial 2-D RoPE of Heo et al. 2024, "Rotary Position Embedding for Vision
    Transformer", sec. 3.2).
    """
    if head_dim % 4:
        raise ValueError(f"2-D rotary embeddings need a head dimension divisible by 4, got {head_dim}.")
    quarter = head_dim // 4
    freqs = base ** (-jnp.arange(quarter, dtype=jnp.float32) / quarter)
    positions = jnp.asarray(positions, jnp.float32)
    return jnp.concatenate([positions[:, :1] * freqs, positions[:, 1:2] * freqs], axis=-1)


def apply_rope(x: Array, angles: Array) -> Array:
    r"""Rotate queries or keys ``x`` of shape ``(B, L, heads, head_dim)`` by ``angles`` ``(L, head_dim / 2)``.

    Each pair ``(x_{2i}, x_{2i+1})`` turns by the angle ``a_i`` of its token (Su et al. 2021, sec. 3.4.2, eq. 34):
    ``(x_{2i} cos a_i - x_{2i+1} sin a_i, x_{2i} sin a_i + x_{2i+1} cos a_i)``. A rotation keeps norms, and
    ``<R(p) q, R(p') k>`` depends on the positions only through ``p - p'`` (eq. 16), which makes attention
    relative-position aware.
    """
    cos, sin = (f(angles)[:, None, :].astype(x.dtype) for f in (jnp.cos, jnp.sin))  # (L, 1, head_dim / 2)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1).reshape(x.shape)


def _modulate(h: Array, shift: Array, scale: Array) -> Array:
    """DiT's adaptive normalisation ``h (1 + scale) + shift`` (Peebles & Xie 2023, sec. 3.2 "adaLN")."""
    return h * (1 + scale) + shift


def _rms_norm(features: int, rngs: nnx.Rngs) -> nnx.RMSNorm:
    """``h / sqrt(mean(h^2) + 1e-6)`` (Zhang & Sennrich 2019, eq. 4), without a learned gain: adaLN's scale is one."""
    return nnx.RMSNorm(features, epsilon=1e-6, use_scale=False, rngs=rngs)


class DiTBlock(nnx.Module):
    r"""A pre-norm transformer block with adaLN-Zero conditioning (Peebles & Xie 2023, sec. 3.2, Fig. 3):

    .. math:: h \leftarrow h + g_1 \odot W_o\,\mathrm{Attn}(\mathrm{mod}(\mathrm{RMS}(h), \beta_1, \gamma_1)), \qquad
       h \leftarrow h + g_2 \odot \mathrm{SwiGLU}(\mathrm{mod}(\mathrm{RMS}(h), \beta_2, \gamma_2)),

    with ``mod(h, beta, gamma) = h (1 + gamma) + beta`` and the six vectors ``(beta_1, gamma_1, g_1, beta_2, gamma_2,
    g_2)`` a linear function of the conditioning ``c`` (already SiLU-ed), initialised to zero so that the block starts
    as the identity ("adaLN-Zero"). Attention is softmax attention per head (Vaswani et al. 2017, eq. 1) with
    rotary embeddings on queries and keys (:func:`apply_rope`); the MLP is
    ``SwiGLU(h) = W_2 (SiLU(W_g h) * (W_u h))`` (Shazeer 2020, "GLU Variants Improve Transformer", sec. 2).

    With ``context_dim`` a cross-attention sub-block sits between the two, as in PixArt-alpha (Chen et al. 2023,
    "PixArt-alpha: Fast Training of Diffusion Transformer for Photorealistic Text-to-Image Synthesis", sec. "Efficient
    T2I Transformer Design", Fig. 4): ``h <- h + W_o MHA(q = RMS(h), k, v = context)``, not modulated by adaLN
    (the time conditions the two other sub-blocks only), with a learned null token and a zero-initialised ``W_o``
    (:class:`jaxgen.models.text.CrossAttention`), so the block starts as the caption-free block. The queries are
    normalised (RMSNorm) where PixArt feeds ``h`` itself, to keep the attention logits in range; no rotary embedding
    (the context's positions are the text encoder's business).
    """

    def __init__(self, hidden: int, num_heads: int, mlp_hidden: int, *, context_dim: int | None = None,
                 rngs: nnx.Rngs):
        self.num_heads = num_heads
        self.norm1 = _rms_norm(hidden, rngs)
        self.qkv = nnx.Linear(hidden, 3 * hidden, kernel_init=_xavier, rngs=rngs)
        self.proj = nnx.Linear(hidden, hidden, kernel_init=_xavier, rngs=rngs)
        self.norm2 = _rms_norm(hidden, rngs)
        self.gate_up = nnx.Linear(hidden, 2 * mlp_hidden, kernel_init=_xavier, rngs=rngs)  # W_g and W_u side by side
        self.down = nnx.Linear(mlp_hidden, hidden, kernel_init=_xavier, rngs=rngs)
        self.ada = nnx.Linear(hidden, 6 * hidden, kernel_init=_zeros, rngs=rngs)  # adaLN-Zero
        self.norm_cross = _rms_norm(hidden, rngs) if context_dim is not None else None
        self.cross = (CrossAttention(hidden, context_dim, num_heads=num_heads, kernel_init=_xavier, rngs=rngs)
                      if context_dim is not None else None)

    def __call__(self, h: Array, c: Array, angles: Array, context: Array | None = None,
                 context_mask: Array | None = None) -> Array:
        b, n, d = h.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(self.ada(c)[:, None, :], 6, axis=-1)
        q, k, v = (z.reshape(b, n, self.num_heads, d // self.num_heads)
                   for z in jnp.split(self.qkv(_modulate(self.norm1(h), shift1, scale1)), 3, axis=-1))
        # the XLA implementation: differentiable in forward mode (the flow-map losses take a JVP through the network)
        a = jax.nn.dot_product_attention(apply_rope(q, angles), apply_rope(k, angles), v, implementation="xla")
        h = h + gate1 * self.proj(a.reshape(b, n, d))
        if self.cross is not None:
            h = h + self.cross(self.norm_cross(h), context, context_mask)
        g, u = jnp.split(self.gate_up(_modulate(self.norm2(h), shift2, scale2)), 2, axis=-1)
        return h + gate2 * self.down(nnx.silu(g) * u)


class DiTField(nnx.Module):
    r"""A diffusion-transformer vector field ``u_theta(x, t[, y, w])`` on images ``x`` of shape ``(B, H, W, C)``.

    DiT (Peebles & Xie 2023) with RoPE, RMSNorm and SwiGLU (module docstring):

    * patchify: ``p x p`` patches (:func:`patchify`), each linearly embedded to ``hidden`` features (sec. 3.2); no
      position embedding is added, positions enter through 2-D rotary embeddings in every attention layer
      (:func:`rope_angles`, :func:`apply_rope`; Su et al. 2021);
    * conditioning ``c = MLP(sinusoidal(t)) [+ Embed(y)] [+ MLP(sinusoidal(w))]`` of width ``hidden`` (DiT's
      timestep and label embedders, sec. 3.2; :class:`ScalarEmbedding`); label ``num_classes`` is the learned *null*
      class of classifier-free guidance (Ho & Salimans 2022), used when ``y`` is None; with ``guidance_input`` the
      guidance scale ``w`` is an input too (improved MeanFlow, Geng et al. 2025), embedded with
      ``sinusoidal_embedding(w, scale=100)`` so that ``w in [0, 10]`` spans the frequencies ``t in [0, 1]`` spans at
      the default ``time_scale``;
    * ``depth`` :class:`DiTBlock`\ s, each conditioned on ``SiLU(c)`` by adaLN-Zero (and, with ``context_dim``, on a
      context ``(B, L, context_dim)`` by a zero-initialised cross-attention sub-block, PixArt-alpha style);
    * final layer: RMSNorm, adaLN shift and scale, a linear map to ``p * p * out_channels`` per token (sec. 3.2
      "Transformer decoder"; both layers zero-initialised), then :func:`unpatchify`. The untrained field is exactly
      zero, as :class:`jaxgen.models.UNetField`'s.

    Weights follow DiT's ``initialize_weights``: Xavier-uniform transformer layers, ``N(0, 0.02^2)`` label table and
    time-MLP weights, zero biases, zero adaLN and output layers.

    Example (a class-conditional 8x8 field of 1,277,124 parameters)::

        model = DiTField(1, image_size=8, patch_size=2, hidden=128, depth=4, num_heads=4, num_classes=10,
                         rngs=nnx.Rngs(0))
        v = model(x, t, y=labels)        # x: (B, 8, 8, 1), t: (B,), labels: (B,) ints in [0, 10]
        n_params = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))

    Caption conditioning: ``DiTField(..., context_dim=64)`` and ``model(x, t, context=c, context_mask=m)`` with ``c``
    ``(B, L, 64)`` token embeddings and ``m`` ``(B, L)`` bool (True = a real token); ``context=None`` is the null
    caption. Without ``context_dim`` the network is exactly the caption-free one (same parameters).

    Args:
      in_channels: channels ``C`` of the input images.
      image_size: the (square) input size ``H = W``; inputs of another size are rejected.
      patch_size: the patch side ``p``; must divide ``image_size``. The sequence has ``(image_size / p)^2`` tokens.
      hidden: the transformer width (features per token).
      depth: the number of transformer blocks.
      num_heads: attention heads; ``hidden / num_heads`` must be a multiple of 4 (2-D rotary embeddings).
      mlp_ratio: the MLP width relative to ``hidden`` before SwiGLU's reduction: the SwiGLU hidden size is
        ``int(2/3 mlp_ratio hidden)`` rounded up to a multiple of 8, the same parameter count as a GELU MLP of width
        ``mlp_ratio hidden`` (LLaMA, Touvron et al. 2023, sec. 2.2).
      num_classes: number of classes for class conditioning, or None for an unconditional field.
      guidance_input: take a per-sample guidance scale ``w`` (shape ``(B,)`` or a scalar; ``None`` means 1) as an
        input, for flow maps trained on the guided target at every ``w`` (:func:`jaxgen.losses.meanflow_loss`).
      out_channels: output channels (default ``in_channels``).
      time_scale: the sinusoidal time embedding's ``scale`` (1000, DiT's; :class:`FlowMapDiT` uses 10, a smooth
        embedding for losses that differentiate the network in time, as :class:`jaxgen.models.FlowMapUNet`).
      context_dim: the width ``D`` of a conditioning sequence ``(B, L, D)`` read by a cross-attention sub-block in
        every transformer block; None (default): none.
      rngs: ``nnx.Rngs`` for the parameters.
    """

    num_times: int = 1  # time inputs embedded into c: 1 for a field u(x, t); FlowMapDiT has 2

    def __init__(self, in_channels: int = 1, *, image_size: int = 8, patch_size: int = 2, hidden: int = 128,
                 depth: int = 4, num_heads: int = 4, mlp_ratio: float = 4.0, num_classes: int | None = None,
                 guidance_input: bool = False, out_channels: int | None = None, time_scale: float = 1000.0,
                 context_dim: int | None = None, rngs: nnx.Rngs):
        name = type(self).__name__
        for arg, value in (("in_channels", in_channels), ("image_size", image_size), ("patch_size", patch_size),
                           ("hidden", hidden), ("depth", depth), ("num_heads", num_heads),
                           ("out_channels", 1 if out_channels is None else out_channels),
                           ("num_classes", 1 if num_classes is None else num_classes),
                           ("context_dim", 1 if context_dim is None else context_dim)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} {arg} must be a positive integer, got {value!r}.")
        if image_size % patch_size:
            raise ValueError(f"{name}: image_size={image_size} is not divisible by patch_size={patch_size}; pick a "
                             "patch_size that divides the image size (or pad the images).")
        if hidden % num_heads or (hidden // num_heads) % 4:
            raise ValueError(f"{name}: hidden={hidden} must be num_heads={num_heads} times a multiple of 4 (each "
                             "head's dimensions rotate in pairs, half with the row, half with the column).")
        if not mlp_ratio > 0:
            raise ValueError(f"{name} mlp_ratio must be > 0, got {mlp_ratio!r}.")
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.image_size = image_size
        self.patch_size = patch_size
        self.num_classes = num_classes
        self.context_dim = None if context_dim is None else int(context_dim)
        self.head_dim = hidden // num_heads
        mlp_hidden = 8 * -(-int(2 / 3 * mlp_ratio * hidden) // 8)
        p = patch_size
        self.patch_embed = nnx.Linear(p * p * in_channels, hidden, kernel_init=_xavier, rngs=rngs)
        self.time_scale = float(time_scale)
        self.time_embeds = nnx.List([ScalarEmbedding(FREQUENCY_DIM, hidden, scale=self.time_scale, kernel_init=_small,
                                                     rngs=rngs) for _ in range(self.num_times)])
        self.label_embed = (nnx.Embed(num_classes + 1, hidden, embedding_init=_small, rngs=rngs)
                            if num_classes is not None else None)
        self.guidance_embed = (ScalarEmbedding(FREQUENCY_DIM, hidden, scale=GUIDANCE_EMBEDDING_SCALE,
                                               kernel_init=_small, rngs=rngs)
                               if guidance_input else None)
        self.blocks = nnx.List([DiTBlock(hidden, num_heads, mlp_hidden, context_dim=self.context_dim, rngs=rngs)
                                for _ in range(depth)])
        self.norm_out = _rms_norm(hidden, rngs)
        self.ada_out = nnx.Linear(hidden, 2 * hidden, kernel_init=_zeros, rngs=rngs)
        self.out = nnx.Linear(hidden, p * p * self.out_channels, kernel_init=_zeros, rngs=rngs)

    def __call__(self, x: Array, t: Array, y: Array | None = None, w: Array | None = None,
                 context: Array | None = None, context_mask: Array | None = None) -> Array:
        """``u_theta(x, t, y, w[, context])`` of the same shape ``(B, H, W, C)`` as ``x`` (``C = out_channels``); ``t``
        of shape ``(B,)`` or a scalar; ``y=None`` is the null class; ``w`` the guidance scale of a ``guidance_input``
        network (``None``: 1); ``context`` ``(B, L, context_dim)`` and ``context_mask`` ``(B, L)`` (bool, True = a
        real token; None = all real) the sequence of a ``context_dim`` network (``context=None``: the null caption)."""
        (t,), y, w = self._check_inputs(x, {"t": t}, y, w)
        context, context_mask = check_context(context, context_mask, batch=x.shape[0], context_dim=self.context_dim,
                                              owner=type(self).__name__)
        return self._forward(x, (t,), y, w, context, context_mask)

    def _check_inputs(self, x: Array, times: dict, y, w) -> tuple[tuple[Array, ...], Array | None, Array | None]:
        """Validate shapes (before any computation); return the times, ``y`` and ``w`` of shape ``(B,)``."""
        name, s, c = type(self).__name__, self.image_size, self.in_channels
        shape = tuple(jnp.shape(x))
        if len(shape) != 4 or shape[1:] != (s, s, c):
            hint = ""
            if len(shape) == 4 and shape[1:] == (c, s, s):
                hint = " It looks channels-first (B, C, H, W); use x.transpose(0, 2, 3, 1)."
            elif len(shape) == 3 and shape == (s, s, c):
                hint = " Add the batch axis: x[None]."
            raise ValueError(f"{name} expects x of shape (B, H, W, C) = (B, {s}, {s}, {c}) (channels-last), got "
                             f"{shape}.{hint}")
        batch = shape[0]

        def per_sample(v, what: str) -> Array:  # float32 (not bfloat16: the embeddings scale times by 1000)
            if math.prod(jnp.shape(v)) not in (1, batch):
                raise ValueError(f"{name} expects {what} of shape (B,) = ({batch},) or a scalar, got shape "
                                 f"{tuple(jnp.shape(v))}.")
            return jnp.broadcast_to(jnp.reshape(jnp.asarray(v, jnp.float32), (-1,)), (batch,))

        times = tuple(per_sample(v, k) for k, v in times.items())
        if self.label_embed is None:
            if y is not None:
                raise ValueError(f"this {name} is unconditional (num_classes=None) but labels y were given; build it "
                                 "with num_classes=... to condition on labels.")
        elif y is None:
            y = jnp.full((batch,), self.num_classes, jnp.int32)  # the learned null class
        else:
            if jnp.shape(y) not in ((), (batch,)):
                raise ValueError(f"{name} labels y must have shape (B,) = ({batch},) or be a scalar, got "
                                 f"{tuple(jnp.shape(y))}.")
            check_labels(y, self.num_classes, owner=name)
            y = jnp.broadcast_to(y, (batch,))
        if self.guidance_embed is None:
            if w is not None:
                raise ValueError(f"this {name} has no guidance input but a guidance scale w was given; build it with "
                                 "guidance_input=True, or guide it with jaxgen.fields.guided_field.")
        elif w is None:
            w = jnp.ones((batch,), jnp.float32)
        else:
            check_finite(w, name="the guidance scale w")
            w = per_sample(w, "the guidance scale w")
        return times, y, w

    def _forward(self, x: Array, times: tuple[Array, ...], y: Array | None, w: Array | None,
                 context: Array | None = None, context_mask: Array | None = None) -> Array:
        """The network on validated inputs; ``times`` are the ``num_times`` time inputs, each ``(B,)``."""
        c = sum(embed(s) for embed, s in zip(self.time_embeds, times))
        if self.label_embed is not None:
            c = c + self.label_embed(y)
        if self.guidance_embed is not None:
            c = c + self.guidance_embed(w)
        c = nnx.silu(c)  # every adaLN layer starts with SiLU(c) (DiT)
        s, p = self.image_size, self.patch_size
        grid = np.stack(np.meshgrid(np.arange(s // p), np.arange(s // p), indexing="ij"), -1).reshape(-1, 2)
        angles = rope_angles(grid, self.head_dim)  # (L, head_dim / 2), constants under jit
        h = self.patch_embed(patchify(x, p))
        for block in self.blocks:
            h = block(h, c, angles, context, context_mask)
        shift, scale = jnp.split(self.ada_out(c)[:, None, :], 2, axis=-1)
        return unpatchify(self.out(_modulate(self.norm_out(h), shift, scale)), p, s, s)


class FlowMapDiT(DiTField):
    r"""A flow-map DiT ``u_theta(x, r, t[, y, w])``: the average velocity from time ``r`` to time ``t`` at the
    starting point ``x`` (:mod:`jaxgen.losses.flow_map`), a :class:`DiTField` whose conditioning adds an embedding of
    the interval ``t - r`` to that of ``t``: ``c = MLP(sinusoidal(t)) + MLP(sinusoidal(t - r)) [+ Embed(y)]
    [+ MLP(sinusoidal(w))]`` (MeanFlow's ``(t, t - r)`` input, Geng et al. 2025, sec. 4.3; the convention of
    :class:`jaxgen.models.FlowMapMLP`). Same arguments as :class:`DiTField` (but ``time_scale=10``).

    Example::

        model = FlowMapDiT(1, image_size=8, hidden=128, depth=4, num_heads=4, num_classes=10, rngs=nnx.Rngs(0))
        loss = jaxgen.losses.meanflow_loss("linear")(model, {"x": x, "y": labels}, key)
        u = model(x, r, t, y=labels)     # r, t: (B,) or scalars; x_t = x + (t - r) u

    ``sample(model, x0, FlowMap(), steps=k)`` jumps along the ODE in ``k`` evaluations; ``flow_map_velocity(model)`` is
    its diagonal ``u(x, t, t)``, a velocity field for every sampler.
    """

    num_times = 2

    def __init__(self, in_channels: int = 1, *, time_scale: float = 10.0, **kwargs):
        super().__init__(in_channels, time_scale=time_scale, **kwargs)

    def __call__(self, x: Array, r: Array, t: Array, y: Array | None = None, w: Array | None = None,
                 context: Array | None = None, context_mask: Array | None = None) -> Array:
        """``u_theta(x, r, t, y, w[, context])`` of the same shape as ``x``; ``r``, ``t`` of shape ``(B,)`` or
        scalars; ``context`` / ``context_mask`` as :class:`DiTField`."""
        (r, t), y, w = self._check_inputs(x, {"r": r, "t": t}, y, w)
        context, context_mask = check_context(context, context_mask, batch=x.shape[0], context_dim=self.context_dim,
                                              owner=type(self).__name__)
        return self._forward(x, (t, t - r), y, w, context, context_mask)


__all__ = ["DiTField", "FlowMapDiT", "DiTBlock", "patchify", "unpatchify", "rope_angles",
           "apply_rope"]
