r"""A U-Net vector field for images (Flax NNX), after DDPM and ADM.

The architecture follows the ADM U-Net of Dhariwal & Nichol 2021 ("Diffusion Models Beat GANs on
Image Synthesis", ``openai/guided-diffusion``), itself a refinement of the DDPM U-Net of Ho et al.
2020 ("Denoising Diffusion Probabilistic Models"). TorchCFM's ``UNetModelWrapper`` is that same ADM
network, so with matching settings :class:`UNetField` has the same layers and the same number of
parameters (e.g. 702,753 for the 8x8 configuration in the :class:`UNetField` docstring).

Images are channels-last, ``(B, H, W, C)`` (the JAX/XLA convention), and the field is called with
jaxgen's signature ``model(x, t, y=labels)``; with ``context_dim`` it also reads a token sequence by cross-attention,
``model(x, t, context=c, context_mask=m)`` (Rombach et al. 2022, sec. 3.3).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgen._checks import check_labels
from jaxgen.models.embeddings import GUIDANCE_EMBEDDING_SCALE, ScalarEmbedding, sinusoidal_embedding
from jaxgen.models.layers import Conv2d, Dropout, _norm, _upsample_conv_matmul
from jaxgen.models.sharding import shard_parameters
from jaxgen.models.text import CrossAttention, check_context

Array = jax.Array

_zeros = nnx.initializers.zeros_init()


def _conv3x3(cin: int, cout: int, rngs: nnx.Rngs, *, stride: int = 1, zero: bool = False, impl: str = "auto") -> Conv2d:
    return Conv2d(cin, cout, 3, stride=stride, zero=zero, impl=impl, rngs=rngs)


class ResBlock(nnx.Module):
    r"""ADM residual block: ``skip(x) + Conv(Drop(SiLU(GN(Conv(SiLU(GN(x))) + W emb))))``.

    With ``scale_shift=True`` the embedding instead modulates the second normalisation,
    ``GN(h) * (1 + scale) + shift`` (FiLM, Dhariwal & Nichol 2021 "AdaGN"). The skip connection is a
    1x1 convolution (a per-pixel ``nnx.Linear``) when the channel count changes. The block's last
    convolution starts at zero (``zero_init``), so each block starts as the identity.
    ``emb`` is the *activated* embedding ``SiLU(emb)``, computed once per forward pass.
    """

    def __init__(self, cin: int, cout: int, emb_dim: int, *, dropout: float, num_groups: int,
                 scale_shift: bool, zero_init: bool, conv_impl: str = "auto", rngs: nnx.Rngs):
        self.scale_shift = scale_shift
        self.norm1 = _norm(cin, num_groups, rngs)
        self.conv1 = _conv3x3(cin, cout, rngs, impl=conv_impl)
        self.emb = nnx.Linear(emb_dim, 2 * cout if scale_shift else cout, rngs=rngs)
        self.norm2 = _norm(cout, num_groups, rngs)
        self.dropout = Dropout(dropout, rngs=rngs)
        self.conv2 = _conv3x3(cout, cout, rngs, zero=zero_init, impl=conv_impl)
        self.skip = nnx.Linear(cin, cout, rngs=rngs) if cin != cout else None

    def __call__(self, x: Array, emb: Array) -> Array:
        h = self.conv1(nnx.silu(self.norm1(x)))
        e = self.emb(emb)[:, None, None, :].astype(h.dtype)
        if self.scale_shift:
            scale, shift = jnp.split(e, 2, axis=-1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(self.dropout(nnx.silu(h)))
        return (x if self.skip is None else self.skip(x)) + h


class AttentionBlock(nnx.Module):
    r"""Multi-head self-attention over the ``H * W`` positions: ``x + W_o MHA(GN(x))`` (Ho et al. 2020).

    Each head computes ``softmax(q k^T / sqrt(d)) v`` (Vaswani et al. 2017, eq. 1) with
    :func:`jax.nn.dot_product_attention` (logits and softmax in float32 for bfloat16 inputs; a fused kernel where
    the backend has one), as fast as two einsums on CPU (``benchmarks/bench_unet_attention.py``); the output
    projection starts at zero (``zero_init``) as in ADM.
    """

    def __init__(self, channels: int, *, num_heads: int, num_groups: int, zero_init: bool, rngs: nnx.Rngs):
        if channels % num_heads:
            raise ValueError(f"attention channels {channels} are not divisible by num_heads={num_heads}.")
        self.num_heads = num_heads
        self.norm = _norm(channels, num_groups, rngs)
        self.qkv = nnx.Linear(channels, 3 * channels, rngs=rngs)
        self.proj = nnx.Linear(channels, channels, rngs=rngs, **({"kernel_init": _zeros} if zero_init else {}))

    def __call__(self, x: Array, emb: Array | None = None) -> Array:
        b, hh, ww, c = x.shape
        n, nh = hh * ww, self.num_heads
        qkv = self.qkv(self.norm(x).reshape(b, n, c))
        q, k, v = (z.reshape(b, n, nh, c // nh) for z in jnp.split(qkv, 3, axis=-1))
        a = jax.nn.dot_product_attention(q, k, v)  # (B, HW, heads, C / heads)
        return x + self.proj(a.reshape(b, n, c)).reshape(b, hh, ww, c)


class CrossAttentionBlock(nnx.Module):
    r"""Cross-attention from the ``H * W`` positions to a context: ``x + W_o MHA(q = GN(x), k, v = context)``, the
    conditioning layer of latent diffusion's U-Net (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent
    Diffusion Models", sec. 3.3).

    The attention is :class:`jaxgen.models.text.CrossAttention`: a learned null key/value token that every position
    can attend to (so no context, or an all-masked one, is well defined), padding masked out, and ``W_o`` initialised
    to zero *whatever* ``zero_init`` says, so that a U-Net with cross-attention computes at initialisation exactly the
    function of the same U-Net without it.
    """

    def __init__(self, channels: int, context_dim: int, *, num_heads: int, num_groups: int, rngs: nnx.Rngs):
        self.norm = _norm(channels, num_groups, rngs)
        self.attn = CrossAttention(channels, context_dim, num_heads=num_heads, rngs=rngs)

    def __call__(self, x: Array, context: Array | None = None, context_mask: Array | None = None) -> Array:
        b, hh, ww, c = x.shape
        out = self.attn(self.norm(x).reshape(b, hh * ww, c), context, context_mask)
        return x + out.reshape(b, hh, ww, c)


class Downsample(nnx.Module):
    """Halve the resolution (``ceil(H / 2)``): a stride-2 3x3 convolution, or a 2x2 average pool."""

    def __init__(self, channels: int, *, use_conv: bool, conv_impl: str = "auto", rngs: nnx.Rngs):
        self.conv = _conv3x3(channels, channels, rngs, stride=2, impl=conv_impl) if use_conv else None

    def __call__(self, x: Array, emb: Array | None = None) -> Array:
        if self.conv is not None:
            return self.conv(x)
        return nnx.avg_pool(x, (2, 2), strides=(2, 2), padding="SAME", count_include_pad=False)


class Upsample(nnx.Module):
    """Nearest-neighbour 2x upsampling (cropped to ``size`` for odd sizes), then an optional 3x3 convolution."""

    def __init__(self, channels: int, size: int, *, use_conv: bool, conv_impl: str = "auto", rngs: nnx.Rngs):
        self.size = size
        self.conv = _conv3x3(channels, channels, rngs, impl=conv_impl) if use_conv else None

    def __call__(self, x: Array, emb: Array | None = None) -> Array:
        b, h, w, c = x.shape
        conv = self.conv
        if (conv is not None and conv.resolved_impl() == "matmul" and conv.kernel.shape[:2] == (3, 3)
                and 2 * h == self.size and 2 * w == self.size):  # no crop: the sub-pixel form, never upsampling
            dtype = jnp.result_type(x.dtype, conv.kernel.dtype)
            return _upsample_conv_matmul(x.astype(dtype), conv.kernel[...].astype(dtype)) + conv.bias[...].astype(dtype)
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
        if 2 * h != self.size or 2 * w != self.size:
            x = x[:, : self.size, : self.size]
        return x if self.conv is None else self.conv(x)


class _Stage(nnx.Module):
    """A residual block, optionally followed by self-attention (and cross-attention to a context) and/or resampling
    (one ADM ``TimestepEmbedSequential``; LDM's ``SpatialTransformer`` takes the attention's place when there is a
    context)."""

    def __init__(self, res: ResBlock | None, attn: AttentionBlock | None = None, resample=None,
                 xattn: CrossAttentionBlock | None = None):
        self.res = res
        self.attn = attn
        self.resample = resample
        self.xattn = xattn

    def __call__(self, x: Array, emb: Array, context: Array | None = None, context_mask: Array | None = None) -> Array:
        if self.res is not None:
            x = self.res(x, emb)
        if self.attn is not None:
            x = self.attn(x)
        if self.xattn is not None:
            x = self.xattn(x, context, context_mask)
        if self.resample is not None:
            x = self.resample(x)
        return x


class UNetField(nnx.Module):
    r"""A U-Net vector field ``u_theta(x, t[, y])`` on images ``x`` of shape ``(B, H, W, C)``.

    The ADM U-Net (Dhariwal & Nichol 2021), a refinement of the DDPM U-Net (Ho et al. 2020); with the
    same settings it is layer-for-layer the network of TorchCFM's ``UNetModelWrapper``:

    * time: ``sinusoidal_embedding(t, channels)`` -> Linear -> SiLU -> Linear, of width ``4 * channels``;
      with ``num_classes`` a learned label embedding ``nnx.Embed(num_classes + 1, 4 * channels)`` is added
      (label ``num_classes`` is the learned *null* class for classifier-free guidance, used when ``y`` is None);
    * down path: a 3x3 input convolution, then per level of ``channel_mult`` ``num_res_blocks``
      :class:`ResBlock`\ s of width ``channels * mult`` (each followed by :class:`AttentionBlock` if the
      feature map is ``r x r`` with ``r`` in ``attention_resolutions``) and, except at the last level, a
      :class:`Downsample`;
    * middle: ResBlock, AttentionBlock, ResBlock;
    * with ``context_dim``: a :class:`CrossAttentionBlock` after every AttentionBlock (the attention resolutions and
      the middle block), reading a context ``(B, L, context_dim)`` (token embeddings, e.g. of a caption; Rombach et al.
      2022, sec. 3.3);
    * up path: per level ``num_res_blocks + 1`` ResBlocks on ``[h, skip]`` concatenations (plus attention
      where configured) and an :class:`Upsample` (nearest + 3x3 conv);
    * output: GroupNorm -> SiLU -> zero-initialised 3x3 convolution to ``out_channels``.

    Example (the 8x8 configuration; 702,753 parameters, the same as TorchCFM's
    ``UNetModelWrapper(dim=(1, 8, 8), num_channels=32, num_res_blocks=1, channel_mult=(1, 2),
    class_cond=True, num_classes=11, attention_resolutions="4", dropout=0.1)``)::

        model = UNetField(1, channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                          dropout=0.1, num_classes=10, image_size=8, rngs=nnx.Rngs(0))
        v = model(x, t, y=labels)        # x: (B, 8, 8, 1), t: (B,), labels: (B,) ints in [0, 10]

    28x28 inputs work with e.g. ``channel_mult=(1, 2, 2)`` (28 -> 14 -> 7); odd sizes are halved with
    ``ceil`` and cropped back on the way up.

    **Dropout** uses ``nnx.Dropout`` with streams forked from ``rngs`` at construction. The module is
    built in training mode (dropout active, each call draws new masks and advances the RNG state held
    in the module, so a compiled training step must carry that state, as :class:`jaxgen.training.Trainer`
    does); call ``model.eval()`` before sampling or evaluating (samplers need a deterministic field)
    and ``model.train()`` to switch back. On CPU, ``rngs=nnx.Rngs(jax.random.key(0, impl="rbg"))``
    makes the dropout masks (and initialisation) cheaper than the default threefry keys.

    Caption conditioning (``context_dim=64``; :class:`jaxgen.models.TextConditionedField` maps token ids to the
    context)::

        model = UNetField(1, channels=32, num_classes=None, context_dim=64, image_size=8, rngs=nnx.Rngs(0))
        v = model(x, t, context=c, context_mask=m)  # c: (B, L, 64) embeddings, m: (B, L) bool, True = a real token
        v0 = model(x, t)                            # no context = the null caption (only the learned null token)

    Without ``context_dim`` the network, its parameters and their count are exactly those of the caption-free U-Net.

    Differences from TorchCFM's network, none of which changes the parameter count: the time is
    embedded as ``sinusoidal_embedding(t)``, i.e. scaled by 1000 to DDPM's step range (TorchCFM embeds
    ``t in [0, 1]`` unscaled); weights use Flax's default initialisers (LeCun normal) rather than
    PyTorch's; label values are range-checked when they are concrete (not under ``jit``), so keep traced ones in
    ``[0, num_classes]``.

    Args:
      in_channels: channels ``C`` of the input images.
      channels: base width (``model_channels`` in ADM); the time embedding has ``4 * channels`` features.
      channel_mult: width multiplier per resolution level; ``len(channel_mult) - 1`` downsamplings
        (each to ``ceil(size / 2)``).
      num_res_blocks: residual blocks per level on the down path (``num_res_blocks + 1`` on the up path).
      attention_resolutions: feature-map sizes at which self-attention is used (``(4,)``: at 4x4), the
        convention of TorchCFM's ``attention_resolutions="4"``; sizes that do not occur raise ValueError.
        The middle block always has attention.
      num_heads: attention heads (must divide the channel count where attention is used).
      dropout: dropout rate inside the residual blocks.
      num_classes: number of classes for class conditioning, or None for an unconditional field.
      image_size: the (square) input size ``H = W``; inputs of another size are rejected.
      out_channels: output channels (default ``in_channels``).
      num_groups: GroupNorm groups (32 in ADM), reduced where needed to divide the channel count.
      conv_resample: downsample with a strided 3x3 convolution and convolve after upsampling (True,
        ADM's default), or use 2x2 average pooling / plain nearest upsampling (False).
      use_scale_shift_norm: condition the residual blocks by scale-shift (FiLM) instead of addition.
      conv_impl: how the convolutions compute (:class:`jaxgen.models.layers.Conv2d`): ``"auto"`` (matrix products
        on the CPU backend, ``lax.conv_general_dilated`` elsewhere), ``"matmul"`` or ``"xla"``; all give the same
        function.
      zero_init: zero-initialise the last convolution of each residual block, the attention output
        projections and the output convolution (ADM); the untrained field is then exactly zero.
      shard_axis: a mesh axis name (e.g. ``"data"``) to annotate the parameters for parameter sharding (FSDP style):
        every kernel of at least 16,384 weights is split over that axis along its output channels when a
        :class:`jaxgen.training.Trainer` with a mesh trains it (:func:`jaxgen.models.shard_parameters`); ``None``
        (default): no annotations, the parameters are replicated on a mesh.
      guidance_input: take a per-sample guidance scale ``w`` as a conditioning input (``model(x, t, y=labels,
        w=scales)``; ``w=None`` is ``w = 1``), embedded as ``MLP(sinusoidal(w))`` and added to the time embedding:
        a network trained on the guided target at every ``w`` samples guided in one call per step (improved
        MeanFlow, Geng et al. 2025; :func:`jaxgen.losses.meanflow_loss` with ``guidance=``).
      time_scale: the sinusoidal time embedding's ``scale`` (:func:`sinusoidal_embedding`; 1000: DDPM's step range,
        the highest frequency 1000 rad per unit of time). Losses that differentiate the network in time
        (MeanFlow's JVP) want a smoother embedding: :class:`FlowMapUNet` uses 10 (sCM, Lu & Song 2025, sec. 4.1,
        likewise drops the factor 1000 for stable time derivatives).
      context_dim: the width ``D`` of a conditioning sequence ``(B, L, D)`` read by cross-attention wherever there
        is self-attention (:class:`CrossAttentionBlock`, zero-initialised output, learned null token); None (default):
        no cross-attention.
      rngs: ``nnx.Rngs`` for parameters and dropout.
    """

    num_times: int = 1  # time inputs: 1 for a field u(x, t); FlowMapUNet has 2

    def __init__(
        self,
        in_channels: int = 1,
        *,
        channels: int = 32,
        channel_mult: Sequence[int] = (1, 2),
        num_res_blocks: int = 1,
        attention_resolutions: Sequence[int] = (4,),
        num_heads: int = 1,
        dropout: float = 0.1,
        num_classes: int | None = None,
        image_size: int = 8,
        out_channels: int | None = None,
        num_groups: int = 32,
        conv_resample: bool = True,
        use_scale_shift_norm: bool = False,
        zero_init: bool = True,
        conv_impl: str = "auto",
        shard_axis: str | None = None,
        guidance_input: bool = False,
        time_scale: float = 1000.0,
        context_dim: int | None = None,
        rngs: nnx.Rngs,
    ):
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int (square images), got {image_size!r}.")
        if len(channel_mult) < 1 or num_res_blocks < 1 or channels < 2 or channels % 2:
            raise ValueError("UNetField needs an even channels >= 2, num_res_blocks >= 1 and a non-empty channel_mult; "
                             f"got channels={channels}, num_res_blocks={num_res_blocks}, channel_mult={channel_mult}.")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
        if num_classes is not None and num_classes < 1:
            raise ValueError(f"num_classes must be a positive int or None, got {num_classes}.")
        if context_dim is not None and (isinstance(context_dim, bool) or not isinstance(context_dim, int)
                                        or context_dim < 1):
            raise ValueError(f"context_dim must be a positive int (the width of the context tokens) or None, got "
                             f"{context_dim!r}.")
        self.context_dim = context_dim
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.channels = channels
        self.image_size = image_size
        self.num_classes = num_classes
        self.time_scale = float(time_scale)
        attention_resolutions = tuple(int(r) for r in attention_resolutions)
        level_sizes = [image_size]
        for _ in channel_mult[1:]:
            level_sizes.append(-(-level_sizes[-1] // 2))
        missing = sorted(set(attention_resolutions) - set(level_sizes))
        if missing:
            raise ValueError(
                f"attention_resolutions {missing} are not feature-map sizes of this U-Net; with image_size="
                f"{image_size} and channel_mult={tuple(channel_mult)} the sizes are {level_sizes} (pass () for none)."
            )
        widths = [int(m * channels) for m in channel_mult]
        emb_dim = 4 * channels
        block = dict(emb_dim=emb_dim, dropout=dropout, num_groups=num_groups,
                     scale_shift=use_scale_shift_norm, zero_init=zero_init, conv_impl=conv_impl, rngs=rngs)

        def attn(ch: int, size: int):
            if size not in attention_resolutions:
                return None
            return AttentionBlock(ch, num_heads=num_heads, num_groups=num_groups, zero_init=zero_init, rngs=rngs)

        def xattn(ch: int, size: int | None = None):
            if context_dim is None or (size is not None and size not in attention_resolutions):
                return None
            return CrossAttentionBlock(ch, context_dim, num_heads=num_heads, num_groups=num_groups, rngs=rngs)

        self.time_in = nnx.Linear(channels, emb_dim, rngs=rngs)
        self.time_out = nnx.Linear(emb_dim, emb_dim, rngs=rngs)
        self.label_embed = nnx.Embed(num_classes + 1, emb_dim, rngs=rngs) if num_classes is not None else None
        # the flow map's second time input (the interval t - r) and the guidance scale, embedded like the time
        self.interval_embed = (ScalarEmbedding(channels, emb_dim, scale=self.time_scale, rngs=rngs)
                               if self.num_times == 2 else None)
        self.guidance_embed = ScalarEmbedding(channels, emb_dim, scale=GUIDANCE_EMBEDDING_SCALE,
                                               rngs=rngs) if guidance_input else None

        ch = widths[0]
        self.conv_in = _conv3x3(in_channels, ch, rngs, impl=conv_impl)
        size, sizes, skip_chs, down = image_size, [image_size], [ch], []
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                down.append(_Stage(ResBlock(ch, width, **block), attn(width, size), None, xattn(width, size)))
                ch = width
                skip_chs.append(ch)
                sizes.append(size)
            if level != len(widths) - 1:
                down.append(_Stage(None, None, Downsample(ch, use_conv=conv_resample, conv_impl=conv_impl, rngs=rngs)))
                size = -(-size // 2)
                skip_chs.append(ch)
                sizes.append(size)
        self.down = nnx.List(down)
        mid_attn = AttentionBlock(ch, num_heads=num_heads, num_groups=num_groups, zero_init=zero_init, rngs=rngs)
        self.mid = _Stage(ResBlock(ch, ch, **block), mid_attn, None, xattn(ch))
        self.mid2 = ResBlock(ch, ch, **block)
        up = []
        for level, width in reversed(list(enumerate(widths))):
            for i in range(num_res_blocks + 1):
                res = ResBlock(ch + skip_chs.pop(), width, **block)
                sizes.pop()
                ch = width
                resample = None
                if level and i == num_res_blocks:
                    resample = Upsample(ch, sizes[-1], use_conv=conv_resample, conv_impl=conv_impl, rngs=rngs)
                up.append(_Stage(res, attn(ch, size), resample, xattn(ch, size)))
                if resample is not None:
                    size = sizes[-1]
        self.up = nnx.List(up)
        self.norm_out = _norm(ch, num_groups, rngs)
        self.conv_out = _conv3x3(ch, self.out_channels, rngs, zero=zero_init, impl=conv_impl)
        if shard_axis is not None:
            shard_parameters(self, shard_axis)

    def _check_inputs(self, x: Array, t, y) -> tuple[Array, Array | None]:
        """Validate shapes (before any computation) and return ``t`` and ``y`` of shape ``(B,)``."""
        s, c = self.image_size, self.in_channels
        shape = tuple(jnp.shape(x))
        if len(shape) != 4 or shape[1:] != (s, s, c):
            hint = ""
            if len(shape) == 4 and shape[1:] == (c, s, s):
                hint = " It looks channels-first (B, C, H, W); use x.transpose(0, 2, 3, 1)."
            raise ValueError(
                f"UNetField expects x of shape (B, H, W, C) = (B, {s}, {s}, {c}) (channels-last), "
                f"got {shape}.{hint}"
            )
        batch = shape[0]
        t_shape = jnp.shape(t)
        if t_shape != (batch,) and math.prod(t_shape) not in (1, batch):
            raise ValueError(f"UNetField expects t of shape (B,) = ({batch},) or a scalar, got {t_shape}.")
        t = jnp.broadcast_to(jnp.reshape(t, (-1,)), (batch,)) if t_shape != (batch,) else t
        if self.label_embed is None:
            if y is not None:
                raise ValueError("this UNetField is unconditional (num_classes=None) but labels y were given.")
            return t, None
        if y is None:
            return t, jnp.full((batch,), self.num_classes, jnp.int32)  # the learned null class
        y_shape = jnp.shape(y)
        if y_shape not in ((), (batch,)):
            raise ValueError(f"labels y must have shape (B,) = ({batch},) or be a scalar, got {y_shape}.")
        check_labels(y, self.num_classes, owner="UNetField")
        return t, (jnp.broadcast_to(y, (batch,)) if y_shape == () else y)

    def embed(self, t: Array, y: Array | None, dtype=jnp.float32, *, interval: Array | None = None,
              w: Array | None = None) -> Array:
        """The conditioning embedding ``MLP(sinusoidal(t)) [+ Embed(y)] [+ MLP(sinusoidal(t - r))]
        [+ MLP(sinusoidal(w))]`` of shape ``(B, 4 * channels)``.

        ``t``, ``y``, ``interval`` (``t - r``, flow maps) and ``w`` (the guidance scale) have shape ``(B,)``; ``y``
        holds class indices in ``[0, num_classes]`` (``num_classes`` = null class; other values are not checked, as
        they may be traced).
        """
        emb = self.time_out(nnx.silu(self.time_in(
            sinusoidal_embedding(t, self.channels, scale=self.time_scale).astype(dtype))))
        if self.label_embed is not None and y is not None:
            emb = emb + self.label_embed(y).astype(emb.dtype)
        if self.interval_embed is not None and interval is not None:
            emb = emb + self.interval_embed(interval, emb.dtype)
        if self.guidance_embed is not None and w is not None:
            emb = emb + self.guidance_embed(w, emb.dtype)
        return emb

    def _check_guidance(self, w, batch: int) -> Array | None:
        if self.guidance_embed is None:
            if w is not None:
                raise ValueError(f"this {type(self).__name__} has no guidance input but a guidance scale w was given; "
                                 "build it with guidance_input=True, or guide it with jaxgen.fields.guided_field.")
            return None
        if w is None:
            return jnp.ones((batch,), jnp.float32)
        if math.prod(jnp.shape(w)) not in (1, batch):
            raise ValueError(f"the guidance scale w must have shape (B,) = ({batch},) or be a scalar, got "
                             f"{jnp.shape(w)}.")
        return jnp.broadcast_to(jnp.reshape(jnp.asarray(w, jnp.float32), (-1,)), (batch,))

    def __call__(self, x: Array, t: Array, y: Array | None = None, w: Array | None = None,
                 context: Array | None = None, context_mask: Array | None = None) -> Array:
        """``u_theta(x, t, y[, w][, context])`` of the same shape ``(B, H, W, C)`` as ``x``; ``y=None`` is the null
        class, ``w`` the guidance scale of a ``guidance_input`` network (``None``: 1); ``context`` ``(B, L,
        context_dim)`` and ``context_mask`` ``(B, L)`` (bool, True = a real token; None = all real) the sequence of a
        ``context_dim`` network (``context=None``: the null caption)."""
        t, y = self._check_inputs(x, t, y)
        context, context_mask = self.check_context(context, context_mask, x.shape[0])
        return self._apply(x, self.embed(t, y, x.dtype, w=self._check_guidance(w, x.shape[0])),
                           context=context, context_mask=context_mask)

    def check_context(self, context, context_mask, batch: int) -> tuple[Array | None, Array | None]:
        """Validate ``context`` / ``context_mask`` for a batch of ``batch`` images (:func:`jaxgen.models.text.
        check_context`): ``(context, bool mask)``, or ``(None, None)`` for none; ValueError for a context given to a
        network without ``context_dim`` or of the wrong shape."""
        return check_context(context, context_mask, batch=batch, context_dim=self.context_dim,
                             owner=type(self).__name__)

    def _apply(self, x: Array, emb: Array, *, control: tuple | None = None, context: Array | None = None,
               context_mask: Array | None = None) -> Array:
        """The network on ``x`` given the conditioning embedding ``emb`` (:meth:`embed`): :meth:`encode` then
        :meth:`decode`; ``control`` = ``(skip_residuals, middle_residual)`` added to the decoder's inputs
        (:class:`jaxgen.models.ControlNet`); ``context`` / ``context_mask`` go to every cross-attention block."""
        emb = nnx.silu(emb)  # every block starts with SiLU(emb)
        h, hs = self.encode(x, emb, context=context, context_mask=context_mask)
        return self.decode(h, hs, emb, control=control, context=context, context_mask=context_mask)

    def encode(self, x: Array, emb: Array, *, hint: Array | None = None, context: Array | None = None,
               context_mask: Array | None = None) -> tuple[Array, list[Array]]:
        """The down path and the middle block: ``(h, skips)``, the middle block's output and the feature maps the
        decoder concatenates (the input convolution's and every down stage's, in order). ``emb`` is the *activated*
        embedding ``SiLU(embed(...))``; ``hint`` (ControlNet's encoded control, of the input convolution's output
        shape) is added after the input convolution; ``context`` ``(B, L, context_dim)`` / ``context_mask`` ``(B, L)``
        (validated by :meth:`check_context`; a None mask = every token real) feed the cross-attention blocks of a
        ``context_dim`` network (None: the null caption) and are ignored without ``context_dim``."""
        h = self.conv_in(x)
        if hint is not None:
            h = h + hint.astype(h.dtype)
        hs = [h]
        for stage in self.down:
            h = stage(h, emb, context, context_mask)
            hs.append(h)
        return self.mid2(self.mid(h, emb, context, context_mask), emb), hs

    def decode(self, h: Array, hs: list[Array], emb: Array, *, control: tuple | None = None,
               context: Array | None = None, context_mask: Array | None = None) -> Array:
        """The up path and the output layers from the middle block's output ``h`` and the skips ``hs``
        (:meth:`encode`); ``control = (skip_residuals, middle_residual)`` is added to the skips and to ``h``
        first (ControlNet, Zhang et al. 2023, fig. 3); ``context`` / ``context_mask`` as in :meth:`encode`."""
        hs = list(hs)
        if control is not None:
            skips, middle = control
            if len(skips) != len(hs):
                raise ValueError(f"control residuals: {len(skips)} skip residuals for {len(hs)} skips.")
            h = h + middle.astype(h.dtype)
            hs = [a + r.astype(a.dtype) for a, r in zip(hs, skips)]
        for stage in self.up:
            h = stage(jnp.concatenate([h, hs.pop()], axis=-1), emb, context, context_mask)
        return self.conv_out(nnx.silu(self.norm_out(h)))


class FlowMapUNet(UNetField):
    r"""A flow-map U-Net ``u_theta(x, r, t[, y, w])``: the average velocity from time ``r`` to time ``t`` at the
    starting point ``x`` (:mod:`jaxgen.losses.flow_map`), a :class:`UNetField` whose conditioning adds an embedding of
    the interval ``t - r`` to that of ``t`` (MeanFlow's ``(t, t - r)`` input, Geng et al. 2025, sec. 4.3; the same
    convention as :class:`jaxgen.models.FlowMapMLP`). Same arguments as :class:`UNetField` (but ``time_scale=10``: a
    smooth time embedding, since the MeanFlow target differentiates the network in time); with
    ``guidance_input=True`` it also takes the guidance scale ``w`` the flow map was trained for, and with
    ``context_dim`` a context ``(B, L, context_dim)`` / ``context_mask`` as :class:`UNetField`.

    ``sample(model, x0, FlowMap(), steps=k, cond={"y": labels, "w": scales})`` jumps along the (guided) ODE in ``k``
    evaluations; ``flow_map_velocity(model)`` is its diagonal ``u(x, t, t)``, a velocity field for every sampler.
    """

    num_times = 2

    def __init__(self, in_channels: int = 1, *, time_scale: float = 10.0, **kwargs):
        super().__init__(in_channels, time_scale=time_scale, **kwargs)

    def __call__(self, x: Array, r: Array, t: Array, y: Array | None = None, w: Array | None = None,
                 context: Array | None = None, context_mask: Array | None = None) -> Array:
        n = jnp.shape(x)[0] if jnp.ndim(x) >= 1 else 0
        if math.prod(jnp.shape(r)) not in (1, n):
            raise ValueError(f"FlowMapUNet expects times of shape (B,) = ({n},) or scalars, got r of shape "
                             f"{jnp.shape(r)}.")
        t, y = self._check_inputs(x, t, y)
        r = jnp.broadcast_to(jnp.reshape(jnp.asarray(r, t.dtype), (-1,)), t.shape)
        context, context_mask = self.check_context(context, context_mask, x.shape[0])
        return self._apply(x, self.embed(t, y, x.dtype, interval=t - r, w=self._check_guidance(w, x.shape[0])),
                           context=context, context_mask=context_mask)
