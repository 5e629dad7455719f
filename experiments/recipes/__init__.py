"""Recipes: how the ``generative`` experiment builds a model family (VAE, flow, GAN, EBM, flow matching, ...).

A family is named by a spec ``"name:key=value,..."`` (the samplers' syntax: ``"vae:beta=4,decoder=bernoulli"``).
Its builder ``build(ctx) -> Recipe`` gets the data's shape and the run's sizes in a :class:`Context` and returns the
network, the objective the one :class:`jaxgen.training.Trainer` runs, and how to sample and score the trained model.
The experiment owns everything else (data, checkpoints, resuming, progress bars, metrics, reports): a new family is a
builder function and an entry in :data:`experiments.recipes.registry.FAMILIES`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence


@dataclasses.dataclass(frozen=True)
class Context:
    """What a builder knows about the run.

    Attributes:
      shape: one sample's shape: ``(2,)`` for the 2-D targets, ``(8, 8, 1)`` for the digits (values in ``[-1, 1]``).
      num_classes: the number of classes when the run is class-conditional (batches then carry labels ``"y"``),
        else ``None`` (batches are ``{"x": ...}``).
      width: hidden width of MLPs / base channel count of convolutional networks.
      depth: hidden layers of MLPs.
      latent_dim: latent size (VAEs, GAN generators' noise, ...).
      steps, learning_rate, batch_size, seed: the run's.
      options: the family's own options, from its spec (``"vae:beta=4"`` -> ``{"beta": 4}``); read them with
        :func:`options`, which refuses unknown names.
    """

    shape: tuple[int, ...]
    num_classes: int | None = None
    width: int = 64
    depth: int = 3
    latent_dim: int = 8
    steps: int = 1000
    learning_rate: float = 1e-3
    batch_size: int = 128
    seed: int = 0
    options: dict = dataclasses.field(default_factory=dict)

    @property
    def is_image(self) -> bool:
        return len(self.shape) == 3


@dataclasses.dataclass
class Recipe:
    """A family's model, objective and evaluation hooks.

    Attributes:
      model: the ``nnx.Module`` holding every trained parameter (e.g. a GAN's generator and critic as attributes).
      objective: a loss ``loss(model, batch, key, **context)`` or a sequence of :class:`jaxgen.training.Update`.
      optimizer: an optax transformation, or a dict of them keyed by the updates' ``optimizer`` names.
      generate: ``generate(model, key, num, labels) -> (samples, nfe)``: ``num`` samples of shape ``(num, *shape)``
        in the data's space and the number of network evaluations per sample. ``labels`` is an int array
        ``(num,)`` for a conditional recipe, else ``None``. Must be jit-compatible in ``key`` (``num`` static).
      log_likelihood: ``(model, x, key) -> (B,)`` log-density of data ``x`` in nats (exact, or a stated bound such as
        IWAE's), or ``None`` when the family has none.
      likelihood_kind: how :attr:`log_likelihood` is computed ("exact", "IWAE bound (K=...)", "PF-ODE, Hutchinson").
      diagnostics: ``(model, x, key) -> dict[str, float]`` of family diagnostics on a data batch (KL per latent and
        active units, codebook perplexity, critic gap, ...), or ``None``.
      ema_decay: the trainer's EMA decay (``None``: none); sampling then uses the EMA weights.
      sampler: what ``generate`` does, for reports ("decoder, one pass", "Langevin, 100 steps").
      fuse_steps: the trainer's ``fuse_steps`` (``False`` for models with native convolutions on CPU).
      conditional: whether ``generate`` honours ``labels``.
    """

    model: Any
    objective: Callable | Sequence[Any]
    optimizer: Any
    generate: Callable
    log_likelihood: Callable | None = None
    likelihood_kind: str = ""
    diagnostics: Callable | None = None
    ema_decay: float | None = None
    sampler: str = ""
    fuse_steps: bool = True
    conditional: bool = False


def options(ctx: Context, defaults: dict[str, Any], family: str) -> dict[str, Any]:
    """The family's options: ``defaults`` overridden by the spec's, each cast to its default's type; an unknown name
    or a value of the wrong type is refused naming the family, the option and the known ones."""
    unknown = sorted(set(ctx.options) - set(defaults))
    if unknown:
        raise ValueError(f"family {family!r} has no option {', '.join(map(repr, unknown))}; its options are "
                         f"{', '.join(f'{k}={v!r}' for k, v in defaults.items()) or 'none'}.")
    out = dict(defaults)
    for k, v in ctx.options.items():
        want = type(defaults[k])
        if want is bool and not isinstance(v, bool):
            raise ValueError(f"family {family!r}: option {k} must be true or false, got {v!r}.")
        if want is float and isinstance(v, (int, float)) and not isinstance(v, bool):
            v = float(v)
        if defaults[k] is not None and not isinstance(v, want):
            raise ValueError(f"family {family!r}: option {k} must be a {want.__name__} (like {defaults[k]!r}), "
                             f"got {v!r}.")
        out[k] = v
    return out
