r"""Glow (Kingma & Dhariwal 2018, "Glow: Generative Flow with Invertible 1x1 Convolutions"): multi-scale flows whose
steps are actnorm, an invertible 1x1 convolution (LU) and an affine coupling (their table 1 and fig. 2)."""

from __future__ import annotations

from typing import Sequence

from flax import nnx

from jaxgen.models.flows import (ActNorm, AffineCoupling, Bijector, Flow, InvertibleLinear, Split, Squeeze,
                                 _check_positive_int, _check_shape)


class Glow(Flow):
    r"""Glow's multi-scale architecture (Kingma & Dhariwal 2018, fig. 2).

    Images ``(H, W, C)``: ``levels`` scales, each a :class:`~jaxgen.models.flows.Squeeze` followed by ``steps`` flow
    steps ``[ActNorm -> InvertibleLinear (1x1 conv, LU) -> AffineCoupling (channel mask)]`` and, except at the last
    scale, a :class:`~jaxgen.models.flows.Split` that factors out half the channels with a learned conditional prior
    (``learned_prior=True``, Glow's ``split2d``; ``False``: standard normal). For the ``(8, 8, 1)`` digits with
    ``levels=2``: squeeze to 4x4x4, K steps, split to 4x4x2, squeeze to 2x2x8, K steps. The coupling masks alternate
    which half of the channels is transformed (the 1x1 convolutions mix channels in between).

    Vectors ``(d,)``: ``steps`` flow steps ``[ActNorm -> InvertibleLinear -> AffineCoupling (alternating mask)]`` with
    MLP conditioners: the 1x1 convolution is an invertible linear layer with the same LU code.

    Args:
      shape: per-sample shape, ``(d,)`` or ``(H, W, C)``.
      steps: flow steps per scale (``K``).
      levels: scales (images only; ``H`` and ``W`` divisible by ``2 ** levels``).
      hidden, depth, activation: the coupling networks' width, hidden layers and activation (default GELU for
        vectors, ReLU for images).
      learned_prior: the splits' conditional Gaussian prior (``False``: standard normal).
      clamp: bound of the couplings' log-scales.
    """

    def __init__(self, shape: Sequence[int], *, steps: int = 4, levels: int = 2, hidden: int = 64, depth: int = 2,
                 learned_prior: bool = True, clamp: float = 2.0, activation: str | None = None, rngs: nnx.Rngs):
        shape = _check_shape(shape, "Glow")
        steps = _check_positive_int(steps, "steps", "Glow")
        levels = _check_positive_int(levels, "levels", "Glow")
        kw = dict(hidden=hidden, depth=depth, clamp=clamp, rngs=rngs,
                  activation=activation or ("gelu" if len(shape) == 1 else "relu"))
        layers: list[Bijector] = []

        def flow_steps(s, mask):
            for i in range(steps):
                layers.extend([ActNorm(s[-1]), InvertibleLinear(s[-1], rngs=rngs), AffineCoupling(s, mask, i % 2, **kw)])

        if len(shape) == 1:
            flow_steps(shape, "alternate")
        else:
            h, w, _ = shape
            if h % 2 ** levels or w % 2 ** levels:
                raise ValueError(f"Glow: levels={levels} squeezes {levels} times, which needs H and W divisible by "
                                 f"{2 ** levels}; got shape {shape}. Use fewer levels.")
            s = shape
            for level in range(levels):
                layers.append(Squeeze())
                s = layers[-1].output_shape(s)
                flow_steps(s, "channel")
                if level < levels - 1:
                    layers.append(Split(s, learned_prior=learned_prior, rngs=rngs))
                    s = s[:-1] + (layers[-1].keep,)
        super().__init__(shape, layers)


__all__ = ["Glow"]
