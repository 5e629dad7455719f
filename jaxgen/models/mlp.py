"""MLP vector fields for low-dimensional data (Flax NNX)."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import jax
import jax.numpy as jnp
from flax import nnx

from jaxgen._checks import check_labels
from jaxgen.models.embeddings import sinusoidal_embedding

Array = jax.Array

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "selu": nnx.selu, "silu": nnx.silu, "swish": nnx.silu, "gelu": nnx.gelu, "relu": nnx.relu,
    "tanh": nnx.tanh, "elu": nnx.elu,
}

INITS = ("lecun_normal", "pytorch")


def _linear(n_in: int, n_out: int, init: str, rngs: nnx.Rngs) -> nnx.Linear:
    """A dense layer initialised as Flax's default (``"lecun_normal"``: truncated normal weights of variance
    ``1/n_in``, zero biases) or as PyTorch's ``nn.Linear`` (``"pytorch"``: weights and biases ``U(+-1/sqrt(n_in))``,
    i.e. ``kaiming_uniform_(a=sqrt(5))``), to reproduce a PyTorch recipe."""
    if init == "lecun_normal":
        return nnx.Linear(n_in, n_out, rngs=rngs)
    bound = 1.0 / math.sqrt(n_in)

    def bias_init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return nnx.Linear(n_in, n_out, kernel_init=nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
                      bias_init=bias_init, rngs=rngs)


class MLPField(nnx.Module):
    r"""A vector field ``u_theta(x, t)`` on ``R^d``: an MLP on ``[x, embed(t)]``.

    With ``time_embedding="concat"`` the input is ``[x, t]`` (TorchCFM's ``MLP(dim, w, time_varying=True)``:
    ``hidden_layers`` Linear+activation blocks of width ``width`` and a linear output). With
    ``"sinusoidal"`` the time enters as a ``time_dim``-dimensional sinusoidal embedding. ``init`` chooses the dense
    layers' initialisation: Flax's ``"lecun_normal"`` (default) or ``"pytorch"`` (``nn.Linear``'s uniform fan-in
    weights and biases), with which the model reproduces a PyTorch recipe's runs in distribution.

    Call it with jaxgen's field signature: ``model(x, t)`` with ``x`` of shape ``(B, d)`` (or ``(B, ...)``,
    flattened) and ``t`` of shape ``(B,)``; optional ``num_classes`` adds a learned label embedding
    (``model(x, t, y=labels)``; label ``num_classes`` is the null class for guidance). With
    ``out_dim != dim`` (e.g. a scalar energy or a density ratio) the output has shape ``(B, out_dim)``.
    """

    def __init__(
        self,
        dim: int,
        *,
        width: int = 64,
        hidden_layers: int = 3,
        activation: str = "selu",
        time_embedding: str = "concat",
        time_dim: int = 32,
        num_classes: int | None = None,
        out_dim: int | None = None,
        init: str = "lecun_normal",
        rngs: nnx.Rngs,
    ):
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}; choose from {sorted(ACTIVATIONS)}.")
        if init not in INITS:
            raise ValueError(f"MLPField init must be one of {INITS}, got {init!r}.")
        if time_embedding not in ("concat", "sinusoidal"):
            raise ValueError(f"time_embedding must be 'concat' or 'sinusoidal', got {time_embedding!r}.")
        for name, value in (("dim", dim), ("width", width), ("hidden_layers", hidden_layers), ("time_dim", time_dim)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"MLPField {name} must be a positive integer, got {value!r}.")
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer))
                                        or num_classes < 1):
            raise ValueError(f"MLPField num_classes must be a positive integer or None (unconditional), got "
                             f"{num_classes!r}.")
        if out_dim is not None and (not isinstance(out_dim, (int, np.integer)) or out_dim < 1):
            raise ValueError(f"MLPField out_dim must be a positive integer or None (= dim), got {out_dim!r}.")
        self.dim = dim
        self.activation = activation
        self.time_embedding = time_embedding
        self.time_dim = time_dim
        t_in = (1 if time_embedding == "concat" else time_dim) * self.num_times
        self.label_embed = nnx.Embed(num_classes + 1, time_dim, rngs=rngs) if num_classes else None
        c_in = time_dim if num_classes else 0
        sizes = [dim + t_in + c_in] + [width] * hidden_layers
        self.layers = nnx.List([_linear(a, b, init, rngs) for a, b in zip(sizes[:-1], sizes[1:])])
        self.out = _linear(width, out_dim or dim, init, rngs)

    num_times: int = 1  # time inputs: 1 for a field u(x, t); FlowMapMLP has 2

    def __call__(self, x: Array, t: Array, y: Array | None = None) -> Array:
        return self._apply(x, [t], y)

    def _apply(self, x: Array, times: list, y: Array | None) -> Array:
        shape = jnp.shape(x)
        if len(shape) < 2:
            raise ValueError(f"MLPField expects x of shape (B, {self.dim}), got {tuple(shape)}; add the batch axis.")
        h = x.reshape(shape[0], -1)
        h_dim = h.shape[1]
        if h.shape[1] != self.dim:
            raise ValueError(f"MLPField was built for dim={self.dim} but got x of shape {tuple(shape)}.")
        parts = [h]
        for t in times:
            t_shape = jnp.shape(t)
            if t_shape != (shape[0],) and math.prod(t_shape) not in (1, shape[0]):
                raise ValueError(f"{type(self).__name__} expects t of shape (B,) = ({shape[0]},) or a scalar, got "
                                 f"{t_shape}.")
            t = jnp.broadcast_to(jnp.reshape(jnp.asarray(t, h.dtype), (-1,)), (shape[0],))
            parts.append(t[:, None] if self.time_embedding == "concat"
                         else sinusoidal_embedding(t, self.time_dim).astype(h.dtype))
        if self.label_embed is not None:
            if y is None:
                raise ValueError("this MLPField is class-conditional: call it as model(x, t, y=labels).")
            if jnp.shape(y) not in ((), (shape[0],)):
                raise ValueError(f"MLPField labels y must have shape (B,) = ({shape[0]},) or be a scalar, got "
                                 f"{jnp.shape(y)}.")
            check_labels(y, self.label_embed.num_embeddings - 1, owner="MLPField")
            parts.append(self.label_embed(jnp.broadcast_to(y, (shape[0],))))
        elif y is not None:
            raise ValueError("this MLPField is unconditional (num_classes=None) but labels y were given.")
        h = jnp.concatenate(parts, axis=-1)
        act = ACTIVATIONS[self.activation]
        for layer in self.layers:
            h = act(layer(h))
        out = self.out(h)
        return out.reshape(shape) if out.shape[1] == h_dim else out


class FlowMapMLP(MLPField):
    r"""A flow-map field ``u_theta(x, r, t)``: the average velocity from time ``r`` to time ``t`` at the starting point
    ``x`` (:mod:`jaxgen.losses.flow_map`), an :class:`MLPField` whose time input is the pair ``(t, t - r)`` (MeanFlow's
    choice, Geng et al. 2025, sec. 4.3). Same options as :class:`MLPField`; call ``model(x, r, t)`` (``y=labels``
    for a class-conditional one). ``flow_map_velocity(model)`` is its diagonal ``u(x, t, t)``, a velocity field for
    every sampler; ``sample(model, x0, FlowMap(), steps=k)`` jumps along the ODE in ``k`` evaluations.
    """

    num_times = 2

    def __call__(self, x: Array, r: Array, t: Array, y: Array | None = None) -> Array:
        n = jnp.shape(x)[0] if jnp.ndim(x) >= 1 else 0
        for name, v in (("r", r), ("t", t)):
            if math.prod(jnp.shape(v)) not in (1, n):
                raise ValueError(f"FlowMapMLP expects times of shape (B,) = ({n},) or scalars, got {name} of shape "
                                 f"{jnp.shape(v)}.")
        t = jnp.asarray(t)
        return self._apply(x, [t, t - jnp.asarray(r, t.dtype)], y)
