r"""Energy-based models: contrastive divergence with short-run Langevin negatives and a replay buffer.

An EBM ``p_theta(x) = exp(-E_theta(x)) / Z_theta`` has the log-likelihood gradient

.. math:: -\nabla_\theta \log p_\theta(x) = \nabla_\theta E_\theta(x) - \mathbb E_{x^- \sim p_\theta}
          [\nabla_\theta E_\theta(x^-)],

so minimising ``E(x+) - E(sg(x-))`` with negatives ``x-`` drawn from the model follows the maximum-likelihood
gradient (contrastive divergence, Hinton 2002, "Training Products of Experts by Minimizing Contrastive Divergence",
eq. 5). The negatives come from ``K`` steps of Langevin dynamics on the current energy (short-run MCMC, Nijkamp et
al. 2019, "Learning Non-Convergent Non-Persistent Short-Run MCMC Toward Energy-Based Model"), started from a replay
buffer of earlier negatives with probability ``1 - reinit`` and from noise otherwise (Du & Mordatch 2019, "Implicit
Generation and Generalization in Energy-Based Models", sec. 3.1), and the energy-magnitude penalty
``alpha (E(x+)^2 + E(x-)^2)`` keeps the energies bounded (Du & Mordatch 2019, sec. 3.3).

The chains run through jaxgen's own sampler, :class:`jaxgen.samplers.Langevin` at a fixed time, on the score field
``-grad_x E``. EBM practice decouples the gradient step from the noise, ``x <- x - a grad E(x) + sigma xi`` with
``sigma`` much smaller than Langevin's ``sqrt(2 a)``; that is exactly Langevin dynamics (``x <- x + eta s(x) +
sqrt(2 eta) xi``) with ``eta = sigma^2 / 2`` on the tempered score ``s = -(a / eta) grad E``, i.e. at temperature
``T = sigma^2 / (2 a)``: :func:`short_run_langevin` builds that field, optionally with the energy gradient clipped
elementwise (Du & Mordatch's gradient clipping), and hands it to :func:`jaxgen.samplers.sample`.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from jaxgen._checks import check_key, check_number
from jaxgen.losses.regression import split_batch
from jaxgen.samplers import Langevin, SampleResult, sample

Array = jax.Array

INITS = ("uniform", "gaussian")


def energy_score_field(model: Any, *, scale: float | Array = 1.0, grad_clip: float | None = None) -> Callable:
    r"""The field ``f(x, t) = scale * clip(-grad_x E(x), -grad_clip, grad_clip)`` of an energy model (anything with
    ``model.energy(x) -> (B,)``); ``t`` is ignored. With ``scale = 1`` and no clipping it is the model's score
    ``grad_x log p(x) = -grad_x E(x)`` (LeCun et al. 2006); ``scale = 1 / T`` is the score at temperature ``T``.
    One evaluation is one forward and one backward pass of the energy."""
    if not callable(getattr(model, "energy", None)):
        raise TypeError(f"an energy model needs a method energy(x) -> (B,) (e.g. jaxgen.models.ebm.EnergyNet), got "
                        f"{type(model).__name__}.")

    def field(x: Array, t: Array | None = None, **_: Any) -> Array:
        g = jax.grad(lambda v: jnp.sum(model.energy(v)))(x)
        if grad_clip is not None:
            g = jnp.clip(g, -grad_clip, grad_clip)
        return -jnp.asarray(scale, x.dtype) * g

    return field


def _frozen(model: Any) -> Any:
    """The model with every array leaf under ``stop_gradient`` (an NNX module is a pytree): a chain run on it carries
    no tangents or cotangents for the parameters."""
    return jax.tree.map(lambda a: jax.lax.stop_gradient(a) if isinstance(a, jax.Array) else a, model)


def _check_chain(steps, step_size, noise, grad_clip, owner: str) -> float:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{owner}: langevin_steps must be a positive int (the short-run chain's length, e.g. 20), "
                         f"got {steps!r}.")
    check_number(step_size, lambda v: v > 0, name="step_size", owner=owner,
                 what="a finite number > 0 (the gradient step a of x <- x - a grad E + noise xi, e.g. 0.01)")
    if noise is None:
        noise = math.sqrt(2.0 * step_size)
    check_number(noise, lambda v: v > 0, name="noise", owner=owner,
                 what="a finite number > 0 (the noise std of each Langevin step; None for sqrt(2 step_size))")
    if grad_clip is not None:
        check_number(grad_clip, lambda v: v > 0, name="grad_clip", owner=owner,
                     what="a finite number > 0 (the elementwise bound on grad E), or None")
    return float(noise)


def short_run_langevin(model: Any, x0: Array, key: Array, *, steps: int, step_size: float, noise: float | None = None,
                       grad_clip: float | None = None, clip: tuple[float, float] | None = None) -> SampleResult:
    r"""``steps`` steps of ``x <- x - a clip(grad E(x)) + sigma xi`` from ``x0`` (``a = step_size``, ``sigma = noise``,
    default ``sqrt(2 a)``: unadjusted Langevin at temperature 1), gradient-free with respect to the model.

    Runs :class:`jaxgen.samplers.Langevin` (``step_size = sigma^2 / 2``, fixed time ``t = 1``) on the tempered field
    :func:`energy_score_field` with ``scale = 2 a / sigma^2`` (module docstring). The parameters enter under
    ``stop_gradient`` and the result is ``stop_gradient``-ed: a loss using the negatives differentiates
    ``E(sg(x-))`` only (Hinton 2002; Du & Mordatch 2019, eq. 2).

    ``clip = (lo, hi)`` keeps the chain in the data's range (images in ``[-1, 1]``), projecting after every step as
    Du & Mordatch do: the Langevin solver has no per-step projection, so the chain is then a ``lax.scan`` of one-step
    ``sample`` calls (the same solver step, with keys split per step), each followed by the clip. Without it the
    chain is one ``sample`` call. NFE = ``steps`` (each one energy gradient on the whole batch).

    Returns:
      :class:`jaxgen.samplers.SampleResult` (``x``, ``nfe``).
    """
    noise = _check_chain(steps, step_size, noise, grad_clip, "short_run_langevin")
    check_key(key, owner="short_run_langevin")
    eta = 0.5 * noise**2
    field = energy_score_field(_frozen(model), scale=step_size / eta, grad_clip=grad_clip)
    solver = Langevin(step_size=eta, t=1.0)
    x0 = jax.lax.stop_gradient(x0)
    if clip is None:
        res = sample(field, x0, solver, steps=steps, prediction="score", key=key)
        return res._replace(x=jax.lax.stop_gradient(res.x))
    lo, hi = clip
    per_step = [0]

    def one(x, k):  # the solver has no per-step projection: one-step sample() calls, each followed by the clip
        res = sample(field, x, solver, steps=1, prediction="score", key=k)
        per_step[0] = int(res.nfe)
        return jnp.clip(res.x, lo, hi), None

    x, _ = jax.lax.scan(one, jnp.clip(x0, lo, hi), jax.random.split(key, steps))
    return SampleResult(jax.lax.stop_gradient(x), per_step[0] * steps, jnp.ones((steps + 1,), jnp.float32))


def noise_sampler(shape: Sequence[int], init: str = "uniform", scale: float = 1.0) -> Callable[[Array, int], Array]:
    """``draw(key, n) -> (n, *shape)``: uniform on ``[-scale, scale]`` per coordinate (``"uniform"``, Du & Mordatch
    2019) or ``N(0, scale^2 I)`` (``"gaussian"``); the chains' fresh starting points."""
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS} (the distribution of fresh chain starts), got {init!r}.")
    check_number(scale, lambda v: v > 0, name="init_scale", owner="the EBM noise sampler", what="a finite number > 0")
    shape = tuple(int(s) for s in shape)

    def draw(key: Array, n: int) -> Array:
        if init == "uniform":
            return jax.random.uniform(key, (n, *shape), jnp.float32, -scale, scale)
        return scale * jax.random.normal(key, (n, *shape), jnp.float32)

    return draw


def replay_starts(buffer: Array, key: Array, n: int, reinit: float,
                  draw: Callable[[Array, int], Array]) -> tuple[Array, Array, Array]:
    r"""The chains' starting points (Du & Mordatch 2019, sec. 3.1): ``n`` buffer entries drawn uniformly (with
    replacement), each replaced by a fresh ``draw`` with probability ``reinit``.

    Returns:
      ``(x0, idx, fresh)``: the starts ``(n, *shape)``, the buffer rows they came from ``(n,)`` (where the
      negatives are written back), and the boolean mask of fresh starts ``(n,)``.
    """
    k_idx, k_fresh, k_noise = jax.random.split(key, 3)
    idx = jax.random.randint(k_idx, (n,), 0, buffer.shape[0])
    fresh = jax.random.bernoulli(k_fresh, reinit, (n,))
    mask = jnp.reshape(fresh, (n,) + (1,) * (buffer.ndim - 1))
    return jnp.where(mask, draw(k_noise, n).astype(buffer.dtype), buffer[idx]), idx, fresh


def contrastive_divergence_loss(
    shape: Sequence[int],
    *,
    langevin_steps: int = 20,
    step_size: float = 0.01,
    noise: float | None = None,
    buffer_size: int = 10_000,
    reinit: float = 0.05,
    alpha: float = 1.0,
    init: str = "uniform",
    init_scale: float = 1.0,
    grad_clip: float | None = None,
    clip: tuple[float, float] | None = None,
) -> Callable:
    r"""Contrastive divergence with short-run Langevin negatives and a replay buffer (Hinton 2002; Nijkamp et al.
    2019; Du & Mordatch 2019): a stateful loss ``loss(model, batch, key, *, state) -> (value, new_state)``.

    .. math:: L = \overline{E_\theta(x^+)} - \overline{E_\theta(\mathrm{sg}(x^-))}
              + \alpha \big(\overline{E_\theta(x^+)^2} + \overline{E_\theta(x^-)^2}\big)

    (Du & Mordatch 2019, eq. 2 and sec. 3.3), bars denoting batch means, with ``x-`` the end of
    :func:`short_run_langevin` from :func:`replay_starts`. The new negatives are written back into the buffer rows
    they started from. ``model`` is anything with ``energy(x) -> (B,)``
    (:class:`jaxgen.models.ebm.EnergyNet`). Unconditional: a batch with labels is refused.

    With :class:`jaxgen.training.Trainer` the buffer is the trainer's objective state (``TrainState.aux``), created by
    ``loss.init_state(key)``: ``{"buffer": (buffer_size, *shape) noise draws, "steps": int32 updates so far,
    "fresh": the fraction of the last batch's chains started from noise}``.

    Args:
      shape: one sample's shape (``(2,)``, ``(8, 8, 1)``).
      langevin_steps: ``K``, the chain's length (NFE per training step: ``K`` energy gradients).
      step_size: ``a`` in ``x <- x - a grad E + noise xi``.
      noise: the noise std per step (default ``sqrt(2 a)``: exact Langevin at temperature 1; EBM practice uses far
        less, e.g. 0.005, i.e. a temperature ``noise^2 / (2 a)`` below 1).
      buffer_size: the replay buffer's size.
      reinit: the probability of starting a chain from noise (1: non-persistent short-run MCMC, Nijkamp et al. 2019;
        Du & Mordatch use 0.05).
      alpha: the weight of the energy-magnitude penalty.
      init, init_scale: fresh starts: ``"uniform"`` on ``[-init_scale, init_scale]`` or ``"gaussian"`` with that std.
      grad_clip: elementwise bound on ``grad E`` inside the chain (None: no clipping).
      clip: ``(lo, hi)``: clip the negatives into the data range (images in ``[-1, 1]``).
    """
    owner = "contrastive_divergence_loss"
    shape = tuple(int(s) for s in shape)
    noise = _check_chain(langevin_steps, step_size, noise, grad_clip, owner)
    if isinstance(buffer_size, bool) or not isinstance(buffer_size, int) or buffer_size < 1:
        raise ValueError(f"{owner}: buffer_size must be a positive int, got {buffer_size!r}.")
    check_number(reinit, lambda v: 0 <= v <= 1, name="reinit", owner=owner,
                 what="a probability in [0, 1] (the fraction of chains restarted from noise)")
    check_number(alpha, lambda v: v >= 0, name="alpha", owner=owner, what="a number >= 0 (the energy penalty weight)")
    if clip is not None and not (len(clip) == 2 and clip[0] < clip[1]):
        raise ValueError(f"{owner}: clip must be None or a range (lo, hi) with lo < hi, got {clip!r}.")
    draw = noise_sampler(shape, init, init_scale)

    def init_state(key: Array) -> dict:
        check_key(key, owner=f"{owner}.init_state")
        return {"buffer": draw(key, buffer_size), "steps": jnp.zeros((), jnp.int32),
                "fresh": jnp.zeros((), jnp.float32)}

    def loss(model, batch, key: Array, *, state: dict) -> tuple[Array, dict]:
        z, cond = split_batch(batch, owner=owner)
        if cond:
            raise ValueError(f"{owner} trains an unconditional energy, but the batch has conditioning {sorted(cond)}; "
                             "sample batches without labels (device_sampler(..., with_labels=False)).")
        if tuple(z.shape[1:]) != shape:
            raise ValueError(f"{owner} was built for samples of shape {shape}, got a batch of shape {tuple(z.shape)}.")
        if state is None or "buffer" not in state:
            raise ValueError(f"{owner} needs its replay buffer: pass state=loss.init_state(key) (the Trainer does).")
        check_key(key, owner=owner)
        k_start, k_chain = jax.random.split(key)
        buffer = state["buffer"]
        x0, idx, fresh = replay_starts(buffer, k_start, z.shape[0], reinit, draw)
        x_neg = short_run_langevin(model, x0, k_chain, steps=langevin_steps, step_size=step_size, noise=noise,
                                   grad_clip=grad_clip, clip=clip).x
        e_pos, e_neg = model.energy(z), model.energy(x_neg.astype(z.dtype))
        value = jnp.mean(e_pos) - jnp.mean(e_neg) + alpha * (jnp.mean(e_pos**2) + jnp.mean(e_neg**2))
        new_state = {"buffer": buffer.at[idx].set(x_neg.astype(buffer.dtype)), "steps": state["steps"] + 1,
                     "fresh": jnp.mean(fresh.astype(jnp.float32))}
        return value, new_state

    loss.init_state = init_state
    loss.sample_noise = draw
    return loss


__all__ = ["contrastive_divergence_loss", "short_run_langevin", "energy_score_field", "replay_starts",
           "noise_sampler"]
