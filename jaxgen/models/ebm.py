r"""Energy networks (Flax NNX): a scalar energy ``E_theta(x)`` and its score field ``-grad_x E_theta(x)``.

An energy-based model (EBM) defines the unnormalised density ``p_theta(x) = exp(-E_theta(x)) / Z_theta`` (LeCun et
al. 2006, "A Tutorial on Energy-Based Learning"); its score ``grad_x log p_theta(x) = -grad_x E_theta(x)`` does not
involve ``Z_theta``, so :meth:`EnergyNet.score` (also the module's ``__call__``) is a field with jaxgen's signature
``model(x, t)`` (``t`` ignored) that every sampler takes with ``prediction="score"``, e.g. Langevin dynamics at a
fixed time::

    model = EnergyNet((2,), rngs=nnx.Rngs(0))
    res = sample(model, x0, Langevin(step_size=1e-2, t=1.0), steps=100, prediction="score", key=key)

It is trained by contrastive divergence (:func:`jaxgen.losses.ebm.contrastive_divergence_loss`). The energy is
smooth (swish / softplus activations) so that its gradient, which drives the Langevin chains, is continuous.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import jax
import jax.numpy as jnp
from flax import nnx

from jaxgen.models.layers import Conv2d

Array = jax.Array

# Smooth activations: the Langevin chains follow grad_x E, which is discontinuous for ReLU networks.
SMOOTH_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "swish": nnx.silu, "silu": nnx.silu, "softplus": nnx.softplus, "gelu": nnx.gelu, "elu": nnx.elu,
    "tanh": nnx.tanh,
}


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"EnergyNet {name} must be a positive integer, got {value!r}.")
    return int(value)


class EnergyNet(nnx.Module):
    r"""A scalar energy ``E_theta(x)`` on vectors ``(d,)`` (an MLP) or channels-last images ``(H, W, C)`` (a small
    convolutional network), with its score field.

    * vectors: ``depth`` Linear + activation layers of width ``width`` and a linear output to one number;
    * images: a 3x3 convolution to ``channels`` features, then ``levels`` stride-2 3x3 convolutions doubling the
      width (8x8 -> 4x4 -> 2x2 for the digits), each followed by the activation, then a Linear + activation of
      width ``width`` and a linear output. Convolutions are :class:`jaxgen.models.layers.Conv2d` (matrix products on
      CPU, fast inside the Langevin chains' ``lax.scan``).

    Methods: :meth:`energy` ``(B, *shape) -> (B,)``; :meth:`score` ``(x, t) -> -grad_x E(x)`` of ``x``'s shape (the
    field view; ``t`` is accepted for the field signature and ignored); ``model(x, t)`` is :meth:`score`. The energy
    of a sample depends on that sample alone (no batch statistics), so ``grad_x sum_b E(x_b)`` is the batch of
    per-sample gradients.

    Args:
      shape: one sample's shape, ``(d,)`` or ``(H, W, C)``.
      width: hidden width of the MLP (and of the convolutional network's dense layer).
      depth: hidden layers of the MLP.
      channels: features of the first convolution (images).
      levels: stride-2 convolutions (images); each halves the spatial size (``ceil``).
      activation: a smooth activation: ``"swish"`` (= ``"silu"``, default), ``"softplus"``, ``"gelu"``, ``"elu"``,
        ``"tanh"``.
      rngs: ``nnx.Rngs`` for the parameters.
    """

    def __init__(self, shape: Sequence[int], *, width: int = 64, depth: int = 3, channels: int = 16, levels: int = 2,
                 activation: str = "swish", rngs: nnx.Rngs):
        shape = tuple(int(s) for s in shape)
        if len(shape) not in (1, 3) or min(shape) < 1:
            raise ValueError(f"EnergyNet shape must be (d,) for vectors or (H, W, C) for images, got {shape}.")
        if activation not in SMOOTH_ACTIVATIONS:
            hint = (" ReLU networks have a discontinuous grad_x E, which the Langevin chains follow." if activation
                    in ("relu", "leaky_relu") else "")
            raise ValueError(f"EnergyNet activation must be a smooth one of {sorted(SMOOTH_ACTIVATIONS)}, got "
                             f"{activation!r}.{hint}")
        width, depth = _positive_int(width, "width"), _positive_int(depth, "depth")
        self.shape = shape
        self.activation = activation
        if len(shape) == 1:
            sizes = [shape[0]] + [width] * depth
            self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
            self.convs = None
        else:
            channels, levels = _positive_int(channels, "channels"), _positive_int(levels, "levels")
            h, w, c = shape
            convs = [Conv2d(c, channels, 3, rngs=rngs)]
            for i in range(levels):
                convs.append(Conv2d(channels * 2**i, channels * 2 ** (i + 1), 3, stride=2, rngs=rngs))
                h, w = -(-h // 2), -(-w // 2)
            self.convs = nnx.List(convs)
            flat = h * w * channels * 2**levels
            self.layers = nnx.List([nnx.Linear(flat, width, rngs=rngs)])
        self.out = nnx.Linear(width, 1, rngs=rngs)

    def _check(self, x: Array) -> None:
        if tuple(jnp.shape(x)[1:]) != self.shape or jnp.ndim(x) != len(self.shape) + 1:
            raise ValueError(f"EnergyNet was built for samples of shape {self.shape}; got x of shape "
                             f"{tuple(jnp.shape(x))} (expected (B, {', '.join(map(str, self.shape))})).")

    def energy(self, x: Array) -> Array:
        """The energies ``E_theta(x)`` of a batch ``x`` of shape ``(B, *shape)``: shape ``(B,)``."""
        self._check(x)
        act = SMOOTH_ACTIVATIONS[self.activation]
        h = x
        if self.convs is not None:
            for conv in self.convs:
                h = act(conv(h))
            h = h.reshape(h.shape[0], math.prod(h.shape[1:]))
        for layer in self.layers:
            h = act(layer(h))
        return self.out(h)[:, 0]

    def score(self, x: Array, t: Array | None = None) -> Array:
        r"""The score ``grad_x log p_theta(x) = -grad_x E_theta(x)`` (LeCun et al. 2006), of ``x``'s shape; one
        forward and one backward pass of the energy. ``t`` is ignored (field signature ``model(x, t)``)."""
        self._check(x)
        return -jax.grad(lambda v: jnp.sum(self.energy(v)))(x)

    def __call__(self, x: Array, t: Array | None = None) -> Array:
        """The score field ``-grad_x E(x)`` (:meth:`score`), so the module plugs into every sampler."""
        return self.score(x, t)


__all__ = ["EnergyNet", "SMOOTH_ACTIVATIONS"]
