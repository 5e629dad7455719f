r"""ControlNet: spatial control of a trained U-Net field (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to
Text-to-Image Diffusion Models").

A frozen trained network ``F(x; Theta)`` is controlled by a trainable copy ``F(.; Theta_c)`` of its encoder, connected
through *zero convolutions* ``Z`` (1x1 convolutions whose weight and bias start at zero), paper sec. 3.1:

* eq. (1): the frozen block ``y = F(x; Theta)``;
* eq. (2): the controlled block ``y_c = F(x; Theta) + Z(F(x + Z(c; Theta_z1); Theta_c); Theta_z2)``.

For a U-Net (sec. 3.2, fig. 3) the copy is the encoder (input convolution, down stages and middle block, with its own
copy of the time/label embedding); the condition ``c`` is an image encoded by a small convolutional *hint encoder*
(``c_f = E(c_i)``, eq. 9) whose output enters after the copy's input convolution; and the copy's skip feature maps and
middle output, each through its own zero convolution, are added to the frozen decoder's skip connections and middle
input. At initialisation every zero convolution outputs exactly 0, so the controlled field *is* the base field
(no harmful noise reaches the trained network), while the gradient with respect to a zero convolution's weights is
not zero, so training moves them first and then the rest of the copy.

Usage (train only the ControlNet on images with their edge maps)::

    base = ...                                              # a trained UNetField
    field = ControlledField(base, ControlNet(base, control_channels=1, rngs=nnx.Rngs(1)))
    loss = flow_matching_loss("linear")                     # calls field(x_t, t, y=..., control=...)
    trainer = Trainer(field, [Update(loss, params=ControlledField.trainable)], optax.adam(1e-4),
                      data=lambda key: {"x": x, "y": y, "control": edge_map(x)})   # a batch sampler
    state, losses = trainer.fit(trainer.init(0), 2000)
    field = trainer.model(state).eval()
    samples = sample(field, x0, ..., cond={"y": labels, "control": edges})
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxgen.models.layers import Conv2d
from jaxgen.models.unet import UNetField

Array = jax.Array


class HintEncoder(nnx.Module):
    r"""The condition encoder ``c_f = E(c_i)`` of ControlNet (Zhang et al. 2023, eq. 9): 3x3 convolutions with SiLU,
    ending in a zero-initialised 3x3 convolution to the U-Net's input-convolution width.

    ``conv(C -> w_0), SiLU``, then for each further width ``w_i``: ``conv(w_{i-1} -> w_{i-1}), SiLU, conv(w_{i-1} ->
    w_i), SiLU`` (the first ``log2(downsample)`` of these last convolutions have stride 2), then the zero convolution.
    With ``widths=(16, 32, 96, 256)`` and ``downsample=8`` this is the paper's encoder of 512x512 conditions for a 64x64
    latent; the default ``(16, 32)``, ``downsample=1`` keeps the resolution (8x8 digits).
    """

    def __init__(self, in_channels: int, out_channels: int, *, widths: Sequence[int] = (16, 32), downsample: int = 1,
                 conv_impl: str = "auto", rngs: nnx.Rngs):
        widths = tuple(int(c) for c in widths)
        if not widths or min(widths) < 1:
            raise ValueError(f"the hint encoder's widths must be a non-empty sequence of positive ints, got {widths}.")
        if isinstance(downsample, bool) or not isinstance(downsample, int) or downsample < 1 \
                or downsample & (downsample - 1):
            raise ValueError(f"hint_downsample must be a power of two (1, 2, 4, 8, ...): the ratio of the control "
                             f"image's size to the U-Net's image size; got {downsample!r}.")
        steps = downsample.bit_length() - 1
        if steps > len(widths) - 1:
            raise ValueError(f"hint_downsample={downsample} needs {steps} stride-2 convolutions, one per width after "
                             f"the first, but hint_channels={widths} has {len(widths) - 1}: pass at least {steps + 1} "
                             f"widths, e.g. hint_channels=(16, 32, 96, 256)[:{steps + 1}].")
        convs = [Conv2d(in_channels, widths[0], 3, impl=conv_impl, rngs=rngs)]
        for i in range(1, len(widths)):
            convs.append(Conv2d(widths[i - 1], widths[i - 1], 3, impl=conv_impl, rngs=rngs))
            convs.append(Conv2d(widths[i - 1], widths[i], 3, stride=2 if i <= steps else 1, impl=conv_impl, rngs=rngs))
        self.convs = nnx.List(convs)
        self.zero_out = Conv2d(widths[-1], out_channels, 3, zero=True, impl=conv_impl, rngs=rngs)

    def __call__(self, c: Array) -> Array:
        for conv in self.convs:
            c = nnx.silu(conv(c))
        return self.zero_out(c)


def _context(unet: UNetField, batch: int, context, context_mask, kwargs: dict) -> dict:
    """The keywords for ``encode``/``decode``: ``kwargs`` plus a cross-attention context validated by the U-Net's
    ``check_context`` (only when one is given, so that U-Nets without cross-attention see no new keywords)."""
    if context is None and context_mask is None:
        return dict(kwargs)
    check = getattr(unet, "check_context", None)
    if check is not None:
        context, context_mask = check(context, context_mask, batch)
    return {**kwargs, "context": context, "context_mask": context_mask}


def _skip_channels(base: UNetField) -> tuple[list[int], int]:
    """The channel counts of the feature maps ``base.encode`` returns: the skips (input convolution, then each down
    stage) and the middle output."""
    ch = base.conv_in.kernel.shape[-1]
    chans = [ch]
    for stage in base.down:
        if stage.res is not None:
            ch = stage.res.conv2.kernel.shape[-1]
        chans.append(ch)
    return chans, base.mid2.conv2.kernel.shape[-1]


class ControlNet(nnx.Module):
    r"""A trainable copy of a :class:`jaxgen.models.UNetField`'s encoder with a hint encoder and zero convolutions
    (Zhang, Rao & Agrawala 2023, sec. 3.1-3.2, eq. 1-2 and 9, fig. 3): ``controlnet(x, t, control, y=...) ->
    (skip_residuals, middle_residual)``, the inputs :meth:`UNetField.decode` adds to its skips and middle input.

    * ``encoder``: a clone of ``base`` with its current weights (input convolution, down stages, middle block, time,
      label and guidance embeddings), its decoder removed; only its ``embed`` and ``encode`` are used. Its dropout
      streams are re-keyed, so its masks are independent of the base's.
    * ``hint``: a :class:`HintEncoder` from the control image to the input convolution's width, added after the
      copy's input convolution (its last convolution is zero: the copy starts by seeing no control at all).
    * ``zero_skips`` / ``zero_middle``: one zero-initialised 1x1 convolution per skip feature map and one for the
      middle output.

    At initialisation every residual is exactly zero. Use it through :class:`ControlledField`.

    Args:
      base: the (trained) U-Net field to control; a :class:`UNetField` (a flow map's two times are not supported).
      control_channels: channels of the control images (1 for an edge map or a mask; ``C + 1`` for
        :func:`jaxgen.data.controls.masked_image`).
      hint_channels: widths of the hint encoder's convolutions.
      hint_downsample: the control image's size over the U-Net's image size (a power of two; 1: the same size). The
        paper encodes 512x512 conditions for a 64x64 latent diffusion model (8, with ``hint_channels=(16, 32, 96,
        256)``).
      rngs: ``nnx.Rngs`` for the hint encoder (the copy takes the base's weights).
    """

    def __init__(self, base: UNetField, control_channels: int, *, hint_channels: Sequence[int] = (16, 32),
                 hint_downsample: int = 1, rngs: nnx.Rngs):
        if not isinstance(base, UNetField):
            raise ValueError(f"ControlNet controls a jaxgen.models.UNetField, got {type(base).__name__}.")
        if base.num_times != 1:
            raise ValueError(f"ControlNet supports fields u(x, t) (UNetField); {type(base).__name__} takes "
                             f"{base.num_times} times.")
        if isinstance(control_channels, bool) or not isinstance(control_channels, int) or control_channels < 1:
            raise ValueError(f"control_channels must be a positive int (e.g. 1 for an edge map), got "
                             f"{control_channels!r}.")
        skip_chs, mid_ch = _skip_channels(base)
        impl = base.conv_in.impl
        self.control_channels = control_channels
        self.hint_downsample = hint_downsample
        self.image_size = base.image_size
        self.hint = HintEncoder(control_channels, skip_chs[0], widths=hint_channels, downsample=hint_downsample,
                                conv_impl=impl, rngs=rngs)
        encoder = nnx.clone(base)
        encoder.up = nnx.List([])  # the decoder is never used: drop its parameters
        encoder.norm_out = None
        encoder.conv_out = None
        for _, stream in nnx.iter_graph(encoder):
            if isinstance(stream, nnx.RngStream) and stream.key.shape == ():
                stream.key.set_value(jax.random.fold_in(stream.key[...], 0x0C0))  # independent dropout masks
        self.encoder = encoder
        self.zero_skips = nnx.List([Conv2d(c, c, 1, zero=True, impl=impl, rngs=rngs) for c in skip_chs])
        self.zero_middle = Conv2d(mid_ch, mid_ch, 1, zero=True, impl=impl, rngs=rngs)

    def check_control(self, control, x_shape: tuple) -> None:
        """Raise ``ValueError`` unless ``control`` has shape ``(B, H * f, W * f, control_channels)`` for images ``x`` of
        shape ``(B, H, W, C)`` (``f = hint_downsample``)."""
        shape = tuple(jnp.shape(control))
        f, c = self.hint_downsample, self.control_channels
        want = (x_shape[0], x_shape[1] * f, x_shape[2] * f, c)
        if shape != want:
            hint = ""
            if len(shape) == 4 and shape[1:] == (c, want[1], want[2]):
                hint = " It looks channels-first (B, C, H, W); use control.transpose(0, 2, 3, 1)."
            elif len(shape) == 3 and shape == want[:3] and c == 1:
                hint = " Add the channel axis: control[..., None]."
            elif len(shape) == 4 and shape[:3] == want[:3]:
                hint = f" This ControlNet was built with control_channels={c}."
            raise ValueError(f"ControlNet expects control of shape (B, H*{f}, W*{f}, control_channels) = {want} "
                             f"(channels-last, one control image per sample, hint_downsample={f}), got {shape}.{hint}")

    def __call__(self, x: Array, t: Array, control: Array, y: Array | None = None, w: Array | None = None,
                 context: Array | None = None, context_mask: Array | None = None,
                 **kwargs) -> tuple[list[Array], Array]:
        """The residuals ``([Z_k(h_k)], Z_mid(h_mid))`` of the copy on ``(x, t, y[, w][, context])`` with the hint of
        ``control`` added after its input convolution (eq. 2, fig. 3); other keywords go to the copy's ``encode``."""
        enc = self.encoder
        t, y = enc._check_inputs(x, t, y)
        wc = enc._check_guidance(w, x.shape[0])
        kw = _context(enc, x.shape[0], context, context_mask, kwargs)
        self.check_control(control, tuple(jnp.shape(x)))
        emb = nnx.silu(enc.embed(t, y, x.dtype, w=wc))
        h, hs = enc.encode(x, emb, hint=self.hint(jnp.asarray(control, x.dtype)), **kw)
        return [z(s) for z, s in zip(self.zero_skips, hs)], self.zero_middle(h)


class ControlledField(nnx.Module):
    r"""A U-Net field under ControlNet control (Zhang, Rao & Agrawala 2023, eq. 2, fig. 3): ``field(x, t,
    control=c, y=labels)`` runs the frozen ``base``'s encoder, adds ``control_scale`` times the ControlNet's
    residuals to its skips and middle output, and runs its decoder. ``control=None`` is exactly ``base(x, t, y=...)``;
    at initialisation (zero convolutions at zero) so is every controlled call.

    ``control_scale`` (a float, or one value per sample, shape ``(B,)``; the call's ``control_scale`` overrides the
    attribute) weakens or strengthens the control at sampling time, as the paper's "control strength".

    **Training** keeps the base frozen by training only the parameters under ``controlnet``::

        trainer = Trainer(field, [Update(loss, params=ControlledField.trainable)], optax.adam(1e-4), data=...)

    ``ControlledField.trainable`` is the NNX filter ``nnx.All(nnx.Param, nnx.PathContains("controlnet"))`` (also usable
    with ``nnx.split(field, ControlledField.trainable, ...)``): the optimizer state covers the ControlNet only and the
    base's parameters stay bit-identical. Batches are dicts ``{"x": images,
    "control": controls, "y": labels}`` (every :mod:`jaxgen.losses` regression loss passes the other keys to the field).
    ``jaxgen.fields.guided_field`` guides it as any class-conditional field (the control is the same in both halves).
    """

    trainable = nnx.All(nnx.Param, nnx.PathContains("controlnet"))

    def __init__(self, base: UNetField, controlnet: ControlNet, control_scale: float = 1.0):
        if not isinstance(controlnet, ControlNet):
            raise ValueError(f"controlnet must be a jaxgen.models.ControlNet, got {type(controlnet).__name__}.")
        if (not isinstance(base, UNetField) or base.image_size != controlnet.image_size
                or _skip_channels(base)[0] != [z.kernel.shape[-1] for z in controlnet.zero_skips]):
            raise ValueError("ControlledField needs the UNetField the ControlNet was built from (same image size and "
                             "feature maps): build it as ControlledField(base, ControlNet(base, ...)).")
        self.base = base
        self.controlnet = controlnet
        self.control_scale = float(control_scale)

    def __call__(self, x: Array, t: Array, control: Array | None = None, y: Array | None = None,
                 w: Array | None = None, control_scale: float | Array | None = None, context: Array | None = None,
                 context_mask: Array | None = None, **kwargs) -> Array:
        """``u(x, t | y, control)`` of the shape of ``x``; ``context`` / ``context_mask`` (a cross-attention U-Net's
        token sequence) go to the base and the copy, other keywords to their ``encode``/``decode``."""
        if control is None:
            if context is not None or context_mask is not None:
                kwargs = {**kwargs, "context": context, "context_mask": context_mask}
            return self.base(x, t, y=y, w=w, **kwargs)
        base = self.base
        tb, yb = base._check_inputs(x, t, y)
        wb = base._check_guidance(w, x.shape[0])
        kw = _context(base, x.shape[0], context, context_mask, kwargs)
        self.controlnet.check_control(control, tuple(jnp.shape(x)))
        scale = jnp.asarray(self.control_scale if control_scale is None else control_scale, x.dtype)
        if scale.ndim and scale.shape != (x.shape[0],):
            raise ValueError(f"control_scale must be a scalar or one value per sample, shape ({x.shape[0]},), got "
                             f"{scale.shape}.")
        scale = scale.reshape((-1, 1, 1, 1)) if scale.ndim else scale
        skips, middle = self.controlnet(x, t, control, y=y, w=w, **kw)
        emb = nnx.silu(base.embed(tb, yb, x.dtype, w=wb))
        h, hs = base.encode(x, emb, **kw)
        return base.decode(h, hs, emb, control=([scale * s for s in skips], scale * middle), **kw)


__all__ = ["ControlNet", "ControlledField", "HintEncoder"]
