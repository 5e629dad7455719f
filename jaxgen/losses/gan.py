r"""Adversarial objectives: the players' losses of GANs and WGANs, and their diagnostics (pure JAX).

A GAN is a two-player game between a generator ``G(z)``, ``z ~ N(0, I)``, and a critic ``D(x)`` (the discriminator;
a logit for the minimax objectives, a real-valued critic for the Wasserstein ones). The model passed to the losses
holds both players: ``model.generator(z) -> (B, *shape)``, ``model.critic(x) -> (B,)`` and ``model.latent_dim``
(e.g. :class:`jaxgen.models.gan.GAN`). Each player has its own loss ``loss(model, batch, key) -> scalar``, which the
trainer minimises over that player's parameters only, one :class:`jaxgen.training.Update` each::

    updates = [Update(critic_loss("wgan_gp"), params=nnx.PathContains("critic"), optimizer="critic", repeats=5),
               Update(generator_loss("wgan_gp"), params=nnx.PathContains("generator"), optimizer="generator")]

Kinds (``kind``):

* ``"minimax"``: the value function ``V(D, G) = E log D(x) + E log(1 - D(G(z)))`` (Goodfellow et al. 2014, eq. 1),
  ``D = sigmoid(logit)``; the critic maximises ``V``, the generator minimises ``E log(1 - D(G(z)))``.
* ``"non_saturating"``: the same critic; the generator maximises ``E log D(G(z))`` instead (Goodfellow et al.
  2014, sec. 3): the same fixed point, but strong gradients where the critic rejects the samples (``D ~ 0``).
* ``"wgan"``: the critic maximises ``E D(x) - E D(G(z))`` (Arjovsky et al. 2017, eq. 3 and Algorithm 1), kept
  Lipschitz by clipping its weights (the optimizer's job: :func:`jaxgen.training.optim.clip_params`); the generator
  minimises ``-E D(G(z))``.
* ``"wgan_gp"``: WGAN with the gradient penalty ``lambda E (||grad D(x_hat)|| - 1)^2`` on random interpolates
  ``x_hat`` of real and generated samples instead of clipping (Gulrajani et al. 2017, eq. 3).
* ``"hinge"``: the critic minimises ``E relu(1 - D(x)) + E relu(1 + D(G(z)))`` and the generator ``-E D(G(z))`` (Lim
  & Ye 2017, "Geometric GAN"; the hinge loss of SN-GAN, Miyato et al. 2018, sec. 4).

Batches are ``{"x": x}`` (labels or other conditioning in the batch are not used: these GANs are unconditional).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxgen._checks import check_number
from jaxgen.losses.regression import split_batch

Array = jax.Array

KINDS = ("minimax", "non_saturating", "wgan", "wgan_gp", "hinge")

_NORM_EPS = 1e-12


def _check_kind(kind: Any, owner: str) -> str:
    if kind not in KINDS:
        raise ValueError(f"{owner}: unknown GAN objective kind {kind!r}; choose one of {', '.join(KINDS)}.")
    return kind


def _scores(out: Array, n: int, owner: str) -> Array:
    """The critic's output as ``(n,)`` scores (``(n, 1)`` is accepted)."""
    shape = jnp.shape(out)
    if shape == (n, 1):
        return out[:, 0]
    if shape != (n,):
        raise ValueError(f"{owner}: the critic must return one score per sample, shape ({n},), got {shape}.")
    return out


def _check_model(model: Any, owner: str) -> None:
    missing = [a for a in ("generator", "critic", "latent_dim") if not hasattr(model, a)]
    if missing:
        raise ValueError(f"{owner} needs a model with a generator, a critic and latent_dim (e.g. "
                         f"jaxgen.models.gan.GAN); {type(model).__name__} has no {', '.join(missing)}.")


def _generate(model: Any, key: Array, n: int, like: Array | None, owner: str) -> Array:
    """``G(z)`` for ``n`` draws ``z ~ N(0, I)``, checked against the data's sample shape."""
    z = jax.random.normal(key, (n, int(model.latent_dim)))
    fake = model.generator(z)
    if like is not None and jnp.shape(fake)[1:] != jnp.shape(like)[1:]:
        raise ValueError(f"{owner}: the generator makes samples of shape {jnp.shape(fake)[1:]} but the data has "
                         f"{jnp.shape(like)[1:]}; build the GAN for the data's shape.")
    return fake


def _real(batch: Any, key: Array, batch_size: int | None, owner: str) -> Array:
    """The batch's data, or a random ``batch_size`` of its rows (without replacement)."""
    x, _ = split_batch(batch, owner=owner)
    if batch_size is None:
        return x
    n = jnp.shape(x)[0]
    if batch_size > n:
        raise ValueError(f"{owner}: batch_size={batch_size} real samples per call, but the batch has only {n} rows; "
                         f"draw at least {batch_size} (e.g. n_critic * batch_size, so each critic update sees "
                         "fresh data).")
    if batch_size == n:
        return x
    return x[jax.random.choice(key, n, (batch_size,), replace=False)]


def _check_batch_size(batch_size: Any, owner: str) -> int | None:
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"{owner}: batch_size must be a positive int or None (the whole batch), got {batch_size!r}.")
    return batch_size


# -- the objectives as functions of the critic's scores --------------------------------------------------------------

def minimax_value(d_real: Array, d_fake: Array) -> Array:
    r"""The value function ``V(D, G) = E log D(x) + E log(1 - D(G(z)))`` (Goodfellow et al. 2014, eq. 1) from the
    critic's logits, ``D = sigmoid(logit)``: ``-E softplus(-d_real) - E softplus(d_fake)`` (no log(0))."""
    return -jnp.mean(jax.nn.softplus(-d_real)) - jnp.mean(jax.nn.softplus(d_fake))


def critic_objective(kind: str, d_real: Array, d_fake: Array) -> Array:
    """The critic's loss (to minimise) from its scores on real and generated samples, without any gradient penalty:
    ``-V(D, G)`` for ``"minimax"``/``"non_saturating"`` (Goodfellow et al. 2014, eq. 1), ``E D(fake) - E D(real)`` for
    ``"wgan"``/``"wgan_gp"`` (Arjovsky et al. 2017, eq. 3), ``E relu(1 - D(real)) + E relu(1 + D(fake))`` for
    ``"hinge"`` (Lim & Ye 2017)."""
    kind = _check_kind(kind, "critic_objective")
    if kind in ("minimax", "non_saturating"):
        return -minimax_value(d_real, d_fake)
    if kind in ("wgan", "wgan_gp"):
        return jnp.mean(d_fake) - jnp.mean(d_real)
    return jnp.mean(jax.nn.relu(1.0 - d_real)) + jnp.mean(jax.nn.relu(1.0 + d_fake))


def generator_objective(kind: str, d_fake: Array) -> Array:
    r"""The generator's loss (to minimise) from the critic's scores of its samples: ``E log(1 - D(G(z))) =
    -E softplus(d_fake)`` for ``"minimax"`` (Goodfellow et al. 2014, eq. 1), ``-E log D(G(z)) = E softplus(-d_fake)``
    for ``"non_saturating"`` (sec. 3), ``-E D(G(z))`` for ``"wgan"``, ``"wgan_gp"`` and ``"hinge"``.

    The minimax loss's derivative in the logit is ``-sigmoid(l)``, which vanishes where the critic rejects the samples
    (``D ~ 0``, early training); the non-saturating one's is ``-(1 - sigmoid(l))``, which does not. Both are
    ``-1/2`` at ``D = 1/2`` and decrease in ``D``: the same fixed point."""
    kind = _check_kind(kind, "generator_objective")
    if kind == "minimax":
        return -jnp.mean(jax.nn.softplus(d_fake))
    if kind == "non_saturating":
        return jnp.mean(jax.nn.softplus(-d_fake))
    return -jnp.mean(d_fake)


# -- gradient penalty and diagnostics --------------------------------------------------------------------------------

def interpolates(key: Array, real: Array, fake: Array) -> Array:
    r"""``x_hat = eps x + (1 - eps) x_tilde``, ``eps ~ U[0, 1]`` per sample: random points on the segments between
    real and generated samples (Gulrajani et al. 2017, Algorithm 1)."""
    if jnp.shape(real) != jnp.shape(fake):
        raise ValueError(f"interpolates needs real and generated samples of one shape, got {jnp.shape(real)} and "
                         f"{jnp.shape(fake)}.")
    eps = jax.random.uniform(key, (jnp.shape(real)[0],) + (1,) * (jnp.ndim(real) - 1), dtype=real.dtype)
    return eps * real + (1.0 - eps) * fake


def critic_gradient_norm(critic: Callable[[Array], Array], x: Array) -> Array:
    r"""Per-sample input-gradient norms ``||grad_x D(x)||_2``, shape ``(B,)`` (the gradient of ``sum_i D(x_i)``,
    which is per sample for a critic without batch coupling such as batch norm). The norm is
    ``sqrt(sum g^2 + 1e-12)``, differentiable at ``g = 0``."""
    n = jnp.shape(x)[0]
    grads = jax.grad(lambda x: jnp.sum(_scores(critic(x), n, "critic_gradient_norm")))(x)
    return jnp.sqrt(jnp.sum(jnp.square(grads).reshape(n, -1), axis=-1) + _NORM_EPS)


def gradient_penalty(critic: Callable[[Array], Array], real: Array, fake: Array, key: Array,
                     target: float = 1.0) -> Array:
    r"""``E (||grad D(x_hat)|| - target)^2`` on random interpolates ``x_hat`` (Gulrajani et al. 2017, eq. 3, without
    its weight ``lambda``)."""
    norms = critic_gradient_norm(critic, interpolates(key, real, jax.lax.stop_gradient(fake)))
    return jnp.mean(jnp.square(norms - target))


def interpolate_gradient_norm(critic: Callable[[Array], Array], real: Array, fake: Array, key: Array) -> Array:
    """The mean input-gradient norm ``E ||grad D(x_hat)||`` at random interpolates (WGAN-GP's diagnostic: the
    penalty drives it to 1, Gulrajani et al. 2017, sec. 4)."""
    return jnp.mean(critic_gradient_norm(critic, interpolates(key, real, fake)))


def critic_gap(critic: Callable[[Array], Array], real: Array, fake: Array) -> Array:
    r"""``E D(real) - E D(fake)``: a WGAN critic's estimate of the Wasserstein-1 distance (up to its Lipschitz
    constant; Arjovsky et al. 2017, eq. 3), and how well any critic separates the two sets. One critic pass."""
    if jnp.shape(real)[1:] != jnp.shape(fake)[1:]:
        raise ValueError(f"critic_gap needs samples of one shape, got {jnp.shape(real)} and {jnp.shape(fake)}.")
    n = jnp.shape(real)[0]
    scores = _scores(critic(jnp.concatenate([real, fake])), n + jnp.shape(fake)[0], "critic_gap")
    return jnp.mean(scores[:n]) - jnp.mean(scores[n:])


def optimal_discriminator(log_p_data: Array, log_p_g: Array) -> Array:
    r"""The optimal discriminator for a fixed generator, ``D*(x) = p_data(x) / (p_data(x) + p_g(x))`` (Goodfellow et
    al. 2014, Prop. 1), from the two log-densities at ``x``: ``sigmoid(log p_data - log p_g)`` (stable where both
    densities underflow)."""
    return jax.nn.sigmoid(jnp.asarray(log_p_data) - jnp.asarray(log_p_g))


# -- the players' losses ---------------------------------------------------------------------------------------------

def critic_loss(kind: str = "non_saturating", *, gp_weight: float = 10.0,
                batch_size: int | None = None) -> Callable[[Any, Any, Array], Array]:
    r"""The critic's (discriminator's) loss ``loss(model, batch, key) -> scalar``: :func:`critic_objective` of one
    critic pass over the real batch and as many generated samples (held fixed: no gradient flows into the generator),
    plus ``gp_weight *`` :func:`gradient_penalty` for ``"wgan_gp"`` (Gulrajani et al. 2017, eq. 3; lambda = 10 in
    the paper).

    Args:
      kind: one of :data:`KINDS`.
      gp_weight: the penalty weight ``lambda`` (``"wgan_gp"`` only).
      batch_size: real samples per call: a random subset of the batch's rows (``None``: the whole batch). With
        ``n_critic`` critic updates per step, draw ``n_critic * batch_size`` rows so each update sees fresh data, as
        in Arjovsky et al. 2017, Algorithm 1.
    """
    owner = "critic_loss"
    kind = _check_kind(kind, owner)
    check_number(gp_weight, lambda v: v >= 0, name="gp_weight", owner=owner, what="a finite number >= 0 (e.g. 10)")
    batch_size = _check_batch_size(batch_size, owner)

    def loss(model, batch, key):
        _check_model(model, owner)
        k_real, k_z, k_gp = jax.random.split(key, 3)
        real = _real(batch, k_real, batch_size, owner)
        n = jnp.shape(real)[0]
        fake = jax.lax.stop_gradient(_generate(model, k_z, n, real, owner)).astype(real.dtype)
        scores = _scores(model.critic(jnp.concatenate([real, fake])), 2 * n, owner)  # one pass: one SN update
        value = critic_objective(kind, scores[:n], scores[n:])
        if kind == "wgan_gp":
            value = value + gp_weight * gradient_penalty(model.critic, real, fake, k_gp)
        return value

    return loss


def generator_loss(kind: str = "non_saturating", *,
                   batch_size: int | None = None) -> Callable[[Any, Any, Array], Array]:
    r"""The generator's loss ``loss(model, batch, key) -> scalar``: :func:`generator_objective` of the critic's scores
    of ``B`` fresh samples ``G(z)`` (``B`` = the batch's size, or ``batch_size``); the batch's values are not used."""
    owner = "generator_loss"
    kind = _check_kind(kind, owner)
    batch_size = _check_batch_size(batch_size, owner)

    def loss(model, batch, key):
        _check_model(model, owner)
        x, _ = split_batch(batch, owner=owner)
        n = jnp.shape(x)[0] if batch_size is None else batch_size
        fake = _generate(model, key, n, x, owner)
        return generator_objective(kind, _scores(model.critic(fake), n, owner))

    return loss


__all__ = ["KINDS", "critic_loss", "generator_loss", "critic_objective", "generator_objective", "minimax_value",
           "interpolates", "critic_gradient_norm", "gradient_penalty", "interpolate_gradient_norm", "critic_gap",
           "optimal_discriminator"]
