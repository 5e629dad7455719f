r"""A U-Net vector field for images (Flax NNX), after DDPM and ADM.

The architecture follows the ADM U-Net of Dhariwal & Nichol 2021 ("Diffusion Models Beat GANs on
Image Synthesis", ``openai/guided-diffusion``), itself a refinement of the DDPM U-Net of Ho et al.
2020 ("Denoising Diffusion Probabilistic Models"). TorchCFM's ``UNetModelWrapper`` is that same ADM
network, so with matching settings :class:`UNetField` has the same layers and the same number of
parameters (e.g. 702,753 for the 8x8 configuration in the :class:`UNetField` docstring).

Images are channels-last, ``(B, H, W, C)`` (the JAX/XLA convention), and the field is called with
jaxgen's signature ``model(x, t, y=labels)``.
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgen._checks import check_labels
from jaxgen.models.embeddings import sinusoidal_embedding
from jaxgen.models.sharding import shard_parameters

Array = jax.Array

_zeros = nnx.initializers.zeros_init()


def _group_count(channels: int, num_groups: int) -> int:
    """The largest ``g <= num_groups`` that divides ``channels`` (GroupNorm needs ``channels % g == 0``)."""
    g = max(1, min(num_groups, channels))
    while channels % g:
        g -= 1
    return g


class GroupNorm(nnx.Module):
    r"""Group normalisation (Wu & He 2018) of channels-last ``(B, H, W, C)`` features, with per-channel affine.

    The same function and parameters (``scale``, ``bias``) as ``nnx.GroupNorm``, computed in two stages
    that XLA's CPU backend runs about twice as fast: per-channel spatial moments ``E[x], E[x^2]`` of
    shape ``(B, C)``, averaged within each group, then one fused ``x * a + b``. Statistics are in float32.
    """

    def __init__(self, channels: int, num_groups: int = 32, *, epsilon: float = 1e-5, rngs: nnx.Rngs | None = None):
        self.num_groups = _group_count(channels, num_groups)
        self.epsilon = epsilon
        self.scale = nnx.Param(jnp.ones((channels,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((channels,), jnp.float32))

    def __call__(self, x: Array) -> Array:
        b, c, g = x.shape[0], x.shape[-1], self.num_groups
        xf = x.reshape(b, -1, c)
        x32 = xf.astype(jnp.float32)
        m1, m2 = jnp.mean(x32, axis=1), jnp.mean(jnp.square(x32), axis=1)  # (B, C)
        if g != c:
            m1 = jnp.repeat(m1.reshape(b, g, c // g).mean(-1), c // g, axis=-1)
            m2 = jnp.repeat(m2.reshape(b, g, c // g).mean(-1), c // g, axis=-1)
        inv = jax.lax.rsqrt(jnp.maximum(m2 - jnp.square(m1), 0.0) + self.epsilon) * self.scale[...]
        shift = self.bias[...] - m1 * inv
        return (xf * inv[:, None].astype(x.dtype) + shift[:, None].astype(x.dtype)).reshape(x.shape)


class Dropout(nnx.Dropout):
    r"""``nnx.Dropout`` with cheaper masks: each 32-bit random word gives two 16-bit uniforms.

    The same module (rate, ``deterministic``, ``model.eval()``/``model.train()``, the ``"dropout"`` RNG
    stream), but a sample is kept when a 16-bit uniform ``u < q = round(65536 (1 - rate)) / 65536`` and
    scaled by ``1 / q``, so ``E[mask / q] = 1`` exactly; ``q`` differs from ``1 - rate`` by at most
    ``7.6e-6``. Drawing half as many threefry words makes the dropout of the digits U-Net's training
    step about 1.5x cheaper on CPU. Falls back to ``nnx.Dropout`` for broadcast dims or explicit ``rngs``.
    """

    def __call__(self, inputs: Array, *, deterministic: bool | None = None, rngs=None) -> Array:
        det = self.deterministic if deterministic is None else deterministic
        if det or self.rate == 0.0 or self.rate == 1.0 or rngs is not None or self.broadcast_dims or self.rngs is None:
            return super().__call__(inputs, deterministic=deterministic, rngs=rngs)
        threshold = int(round(65536 * (1.0 - self.rate)))
        if threshold <= 0:
            return jnp.zeros_like(inputs)
        n = inputs.size
        words = jax.random.bits(self.rngs(), ((n + 1) // 2,), jnp.uint32)
        u16 = jnp.concatenate([words & 0xFFFF, words >> 16])[:n].reshape(inputs.shape)
        keep = threshold / 65536.0
        return jnp.where(u16 < threshold, inputs / jnp.asarray(keep, inputs.dtype), jnp.zeros_like(inputs))


def _norm(channels: int, num_groups: int, rngs: nnx.Rngs) -> GroupNorm:
    return GroupNorm(channels, num_groups, epsilon=1e-5, rngs=rngs)


def _shift(x: Array, axis: int, d: int) -> Array:
    """``x`` shifted by ``d`` along ``axis`` with zero fill, ``out[..., i, ...] = x[..., i + d, ...]``, as one
    ``lax.pad`` with a negative edge (XLA:CPU fuses it into its consumer more often than a slice and a pad)."""
    if d == 0:
        return x
    config = [(0, 0, 0)] * x.ndim
    config[axis] = (-d, d, 0)
    return jax.lax.pad(x, jnp.zeros((), x.dtype), config)


def _conv_matmul(x: Array, kernel: Array, stride: int) -> Array:
    r"""A 2-D cross-correlation with zero "same" padding, ``y[b,i,j] = sum_{p,q} x_pad[b, s i + p, s j + q] @ K[p, q]``,
    written as matrix products, the form XLA's CPU backend runs fastest (its native convolution is slower in
    the backward pass, and inside ``lax.scan`` / ``while`` bodies far slower).

    Stride 1: the ``kh`` vertical shifts of ``x`` are concatenated on the channel axis and multiplied by all
    ``kw`` kernel columns at once, ``(B H W, kh C) @ (kh C, kw O)``; the ``kw`` partial results are then summed
    with horizontal shifts (vertical shifts move whole rows, the cheaper copy; on the digits U-Net this order
    and :func:`_shift` make the forward pass 13% faster than padding first). With few input channels
    (``kh kw C <= 72``, an RGB or grey image) all ``kh kw`` shifts are concatenated instead (im2col): one product
    straight to the ``O`` outputs (the digits U-Net's input convolution: 2.7x faster backward). Other strides: the
    ``kh kw`` strided shifts are concatenated (im2col) and multiplied by the ``(kh kw C, O)`` kernel. Output size
    ``ceil(H / s)`` for odd kernels.
    """
    kh, kw, c, o = kernel.shape
    b, h, w, _ = x.shape
    ph, pw = (kh - 1) // 2, (kw - 1) // 2
    if kh == kw == 1 and stride == 1:
        return (x.reshape(-1, c) @ kernel.reshape(c, o)).reshape(b, h, w, o)
    if stride == 1 and kh * kw * c <= 72:  # few input channels (an image's): every tap in one product, no partials
        cols = jnp.concatenate([_shift(_shift(x, 1, p - ph), 2, q - pw) for p in range(kh) for q in range(kw)], axis=-1)
        return (cols.reshape(-1, kh * kw * c) @ kernel.reshape(kh * kw * c, o)).reshape(b, h, w, o)
    if stride == 1:
        cols = jnp.concatenate([_shift(x, 1, p - ph) for p in range(kh)], axis=-1) if kh > 1 else x
        k = kernel.transpose(0, 2, 1, 3).reshape(kh * c, kw * o)  # rows (p, c), columns (q, o)
        y = (cols.reshape(-1, kh * c) @ k).reshape(b, h, w, kw, o)
        out = _shift(y[..., 0, :], 2, -pw)
        for q in range(1, kw):
            out = out + _shift(y[..., q, :], 2, q - pw)
        return out
    ho, wo = (h + 2 * ph - kh) // stride + 1, (w + 2 * pw - kw) // stride + 1
    xp = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
    cols = jnp.concatenate([xp[:, p : p + stride * (ho - 1) + 1 : stride, q : q + stride * (wo - 1) + 1 : stride]
                            for p in range(kh) for q in range(kw)], axis=-1)
    return (cols.reshape(-1, kh * kw * c) @ kernel.reshape(kh * kw * c, o)).reshape(b, ho, wo, o)


# Sub-pixel form of a 3x3 convolution after nearest 2x upsampling: for output row phase ``a`` (row ``2 i + a``), the
# kernel rows ``p`` that read input row ``i + d``; the same table serves the columns.
_UPSAMPLE_TAPS = {0: {-1: (0,), 0: (1, 2)}, 1: {0: (0, 1), 1: (2,)}}


def _upsample_conv_matmul(x: Array, kernel: Array) -> Array:
    r"""``conv3x3(nearest_upsample_2x(x))`` with zero "same" padding, computed at the input's resolution.

    Output pixel ``(2 i + a, 2 j + b)`` sees input rows ``i - 1, i`` (``a = 0``) or ``i, i + 1`` (``a = 1``), and the
    same for columns, so each of the four phases is a 2x2 convolution of ``x`` whose taps are sums of the 3x3
    kernel's (the "sub-pixel" identity; Shi et al. 2016, "Real-Time Single Image and Video Super-Resolution Using an
    Efficient Sub-Pixel Convolutional Neural Network"). Per row phase: ``(B H W, 2 C) @ (2 C, 4 O)``, then the
    column shifts summed as in :func:`_conv_matmul`. 16 instead of 36 multiply-adds per input pixel and channel pair,
    and the upsampled map is never written: the digits U-Net's upsampling convolution runs 2.4x faster, forward and
    backward. The same function as upsampling then :func:`_conv_matmul`, up to float rounding.
    """
    b, h, w, c = x.shape
    o = kernel.shape[-1]
    rows_out = []
    for a in (0, 1):
        offsets = sorted(_UPSAMPLE_TAPS[a])
        cols = jnp.concatenate([_shift(x, 1, d) for d in offsets], axis=-1)  # (B, H, W, 2 C)
        blocks = [jnp.concatenate([sum(kernel[p, q] for p in _UPSAMPLE_TAPS[a][dr] for q in _UPSAMPLE_TAPS[bp][dc])
                                   for dr in offsets], axis=0)  # (2 C, O) for column phase bp, column offset dc
                  for bp in (0, 1) for dc in sorted(_UPSAMPLE_TAPS[bp])]
        y = (cols.reshape(-1, 2 * c) @ jnp.concatenate(blocks, axis=1)).reshape(b, h, w, 4, o)
        phases = []
        for i, bp in enumerate((0, 1)):
            d0, d1 = sorted(_UPSAMPLE_TAPS[bp])
            phases.append(_shift(y[..., 2 * i, :], 2, d0) + _shift(y[..., 2 * i + 1, :], 2, d1))
        rows_out.append(jnp.stack(phases, axis=3))  # (B, H, W, 2, O): column phase b
    return jnp.stack(rows_out, axis=2).reshape(b, 2 * h, 2 * w, o)  # (B, H, 2, W, 2, O) interleaved


class Conv2d(nnx.Module):
    r"""A 2-D convolution of channels-last images with odd ``k x k`` kernels, zero "same" padding and a stride.

    ``y = x (*) K + b`` with the parameters of ``nnx.Conv`` (``kernel`` of shape ``(k, k, C_in, C_out)``,
    ``bias`` of shape ``(C_out,)``; the same initialisers and random keys, so a model built from the same
    ``rngs`` starts from the same weights). ``impl`` picks the computation:

    * ``"xla"``: ``lax.conv_general_dilated`` (cuDNN on GPU, the MXU on TPU);
    * ``"matmul"``: the same convolution as matrix products (:func:`_conv_matmul`); on XLA:CPU it trains
      about 2x faster per convolution, and does not suffer the 20-50x slowdown of native convolutions
      inside ``lax.scan`` (fused training steps, sampler loops);
    * ``"auto"`` (default): ``"matmul"`` when the default backend is the CPU, else ``"xla"``.
    """

    def __init__(self, cin: int, cout: int, kernel_size: int = 3, *, stride: int = 1, zero: bool = False,
                 impl: str = "auto", rngs: nnx.Rngs):
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"Conv2d supports odd kernel sizes ('same' padding), got {kernel_size}.")
        if impl not in ("auto", "xla", "matmul"):
            raise ValueError(f"Conv2d impl must be 'auto', 'xla' or 'matmul', got {impl!r}.")
        init = _zeros if zero else nnx.initializers.lecun_normal()
        kernel_key, _bias_key = rngs.params(), rngs.params()  # the key order of nnx.Conv
        self.kernel = nnx.Param(init(kernel_key, (kernel_size, kernel_size, cin, cout), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((cout,), jnp.float32))
        self.stride = stride
        self.impl = impl

    def resolved_impl(self) -> str:
        """``"matmul"`` or ``"xla"``: what ``impl`` means on the default backend."""
        return self.impl if self.impl != "auto" else ("matmul" if jax.default_backend() == "cpu" else "xla")

    def __call__(self, x: Array) -> Array:
        dtype = jnp.result_type(x.dtype, self.kernel.dtype)
        x, k, bias = x.astype(dtype), self.kernel[...].astype(dtype), self.bias[...].astype(dtype)
        if self.resolved_impl() == "matmul":
            y = _conv_matmul(x, k, self.stride)
        else:
            pad = (k.shape[0] - 1) // 2
            y = jax.lax.conv_general_dilated(x, k, (self.stride, self.stride), ((pad, pad), (pad, pad)),
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + bias


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
    """A residual block, optionally followed by attention and/or resampling (one ADM ``TimestepEmbedSequential``)."""

    def __init__(self, res: ResBlock | None, attn: AttentionBlock | None = None, resample=None):
        self.res = res
        self.attn = attn
        self.resample = resample

    def __call__(self, x: Array, emb: Array) -> Array:
        if self.res is not None:
            x = self.res(x, emb)
        if self.attn is not None:
            x = self.attn(x)
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
      conv_impl: how the convolutions compute (:class:`Conv2d`): ``"auto"`` (matrix products on the CPU
        backend, ``lax.conv_general_dilated`` elsewhere), ``"matmul"`` or ``"xla"``; all give the same function.
      zero_init: zero-initialise the last convolution of each residual block, the attention output
        projections and the output convolution (ADM); the untrained field is then exactly zero.
      shard_axis: a mesh axis name (e.g. ``"data"``) to annotate the parameters for parameter sharding (FSDP style):
        every kernel of at least 16,384 weights is split over that axis along its output channels when a
        :class:`jaxgen.training.Trainer` with a mesh trains it (:func:`jaxgen.models.shard_parameters`); ``None``
        (default): no annotations, the parameters are replicated on a mesh.
      rngs: ``nnx.Rngs`` for parameters and dropout.
    """

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
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.channels = channels
        self.image_size = image_size
        self.num_classes = num_classes
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

        self.time_in = nnx.Linear(channels, emb_dim, rngs=rngs)
        self.time_out = nnx.Linear(emb_dim, emb_dim, rngs=rngs)
        self.label_embed = nnx.Embed(num_classes + 1, emb_dim, rngs=rngs) if num_classes is not None else None

        ch = widths[0]
        self.conv_in = _conv3x3(in_channels, ch, rngs, impl=conv_impl)
        size, sizes, skip_chs, down = image_size, [image_size], [ch], []
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                down.append(_Stage(ResBlock(ch, width, **block), attn(width, size)))
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
        self.mid = _Stage(ResBlock(ch, ch, **block), mid_attn)
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
                up.append(_Stage(res, attn(ch, size), resample))
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

    def embed(self, t: Array, y: Array | None, dtype=jnp.float32) -> Array:
        """The conditioning embedding ``MLP(sinusoidal(t)) [+ Embed(y)]`` of shape ``(B, 4 * channels)``.

        ``t`` and ``y`` have shape ``(B,)``; ``y`` holds class indices in ``[0, num_classes]``
        (``num_classes`` = null class; other values are not checked, as they may be traced).
        """
        emb = self.time_out(nnx.silu(self.time_in(sinusoidal_embedding(t, self.channels).astype(dtype))))
        if self.label_embed is not None and y is not None:
            emb = emb + self.label_embed(y).astype(emb.dtype)
        return emb

    def __call__(self, x: Array, t: Array, y: Array | None = None) -> Array:
        """``u_theta(x, t, y)`` of the same shape ``(B, H, W, C)`` as ``x``; ``y=None`` is the null class."""
        t, y = self._check_inputs(x, t, y)
        emb = nnx.silu(self.embed(t, y, x.dtype))  # every block starts with SiLU(emb)
        h = self.conv_in(x)
        hs = [h]
        for stage in self.down:
            h = stage(h, emb)
            hs.append(h)
        h = self.mid2(self.mid(h, emb), emb)
        for stage in self.up:
            h = stage(jnp.concatenate([h, hs.pop()], axis=-1), emb)
        return self.conv_out(nnx.silu(self.norm_out(h)))
