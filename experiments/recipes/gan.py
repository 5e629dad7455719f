r"""GAN recipes: the minimax and non-saturating GAN (Goodfellow et al. 2014), WGAN with weight clipping (Arjovsky et
al. 2017), WGAN-GP (Gulrajani et al. 2017), the hinge loss, and spectral normalisation of the critic (SN-GAN,
Miyato et al. 2018), trained by the one :class:`jaxgen.training.Trainer` as two :class:`jaxgen.training.Update` s:
``n_critic`` critic updates, then one generator update, per step.

Options (``"gan:kind=wgan_gp,n_critic=5"``):

* ``kind``: ``"non_saturating"`` (default), ``"minimax"``, ``"wgan"``, ``"wgan_gp"`` or ``"hinge"``.
* ``spectral_norm``: normalise every critic layer (SN-GAN).
* ``n_critic``: critic updates per generator update; 0 (default) takes the paper's: 5 for ``wgan``/``wgan_gp`` and
  for spectrally normalised critics (SN-GAN's ``n_dis = 5``; with one critic update per step, 3,000 steps on 8
  Gaussians covered no mode in our runs), else 1.
* ``gp_weight``: WGAN-GP's ``lambda``; unset: 10 on images (the paper's), 1 on vectors (the paper's toy-data code
  uses 0.1: on 8 Gaussians at unit scale, lambda = 10 kept the critic too flat to move the generator, 2,000 steps
  covered 0/8 modes with sliced W2 2.7; lambda = 1 covered 8/8 with sliced W2 0.18). ``clip``: WGAN's clipping box
  ``c`` (0.01).
* ``lr``: both players' learning rate; 0 (default) takes the recipe's (below).
* ``ema``: decay of the EMA of the weights that sampling uses (0.999; 0 for none; Yazici et al. 2019).
* ``channels``: base channels of the image players; 0 (default) takes ``ctx.width // 2``, or ``ctx.width // 4`` with
  ``n_critic > 1`` (a step then makes ``n_critic`` critic updates: the smaller networks keep its cost near a
  one-critic-update step's).

Optimizers, the papers' kinds: Adam with ``b1 = 0.5`` for the minimax, non-saturating and hinge GANs (DCGAN, Radford
et al. 2016; ``b2 = 0.9`` with ``n_critic > 1``, as SN-GAN with ``n_dis = 5``), RMSProp with the critic's weights
clipped to ``[-c, c]`` after every update for WGAN (Arjovsky et al. 2017, Algorithm 1), Adam with ``b1 = 0``,
``b2 = 0.9`` for WGAN-GP (Gulrajani et al. 2017, Algorithm 1). The papers' learning rates (2e-4, 5e-5, 1e-4) are for
runs of 10^5 steps; the defaults here, for a few thousand steps, are larger: 1e-3 (2-D) / 5e-4 (images) for the
minimax, non-saturating and hinge GANs, 5e-4 for WGAN-GP, 2e-4 for WGAN. ``ctx.learning_rate`` is not used (a
likelihood model's rate does not suit a GAN); set ``lr`` to change them.

Networks: MLP players of ``ctx.width`` units and ``ctx.depth`` layers for the 2-D targets, small DCGAN-style
convolutional players for images (:mod:`jaxgen.models.gan`); noise of ``ctx.latent_dim`` dimensions. Every critic
update of a step sees the step's real batch with fresh generated samples. The GANs are unconditional (labels in the
batches are not used; ``conditional=False``) and have no likelihood.

Register-ready builders: :func:`build_gan` (``"gan"``), :func:`build_wgan`, :func:`build_wgan_gp` and
:func:`build_sngan` (hinge loss, spectral norm, ``n_critic = 5``), the last three :func:`build_gan` with those
defaults (the spec's options still override them).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from experiments.recipes import Context, Recipe, options
from jaxgen.losses.gan import KINDS, critic_loss, generator_loss, interpolate_gradient_norm
from jaxgen.metrics.modes import eight_gaussians_modes, mode_coverage
from jaxgen.models.gan import make_gan
from jaxgen.training import Update
from jaxgen.training.optim import clip_params

DEFAULTS = {"kind": "non_saturating", "spectral_norm": False, "n_critic": 0, "gp_weight": None, "clip": 0.01,
            "lr": 0.0, "ema": 0.999, "channels": 0}

# default learning rates (2-D targets, images), tuned for runs of a few thousand steps; the papers' are in the module
# docstring
_LR = {"minimax": (1e-3, 5e-4), "non_saturating": (1e-3, 5e-4), "hinge": (1e-3, 5e-4), "wgan": (2e-4, 2e-4),
       "wgan_gp": (5e-4, 5e-4)}

# diagnostics: generated samples for the mode-coverage measure (PacGAN's 2,500)
_MODE_SAMPLES = 2500


def _optimizer(kind: str, lr: float, n_critic: int, clip: float | None) -> optax.GradientTransformation:
    if kind == "wgan":
        opt = optax.rmsprop(lr, decay=0.99, eps=1e-8, eps_in_sqrt=False)  # PyTorch's RMSprop, as the paper's code
        return optax.chain(opt, clip_params(clip)) if clip is not None else opt
    if kind == "wgan_gp":
        return optax.adam(lr, b1=0.0, b2=0.9)
    return optax.adam(lr, b1=0.5, b2=0.9 if n_critic > 1 else 0.999)


def build_gan(ctx: Context) -> Recipe:
    """The GAN family (module docstring): a :class:`jaxgen.models.gan.GAN`, ``n_critic`` critic updates and one
    generator update per step, generation by one generator pass."""
    opts = options(ctx, DEFAULTS, "gan")
    kind = opts["kind"]
    if kind not in KINDS:
        raise ValueError(f"family 'gan': option kind must be one of {', '.join(KINDS)}, got {kind!r}.")
    n_critic = opts["n_critic"] or (5 if kind in ("wgan", "wgan_gp") or opts["spectral_norm"] else 1)
    if n_critic < 1:
        raise ValueError(f"family 'gan': option n_critic must be >= 1 (or 0 for the paper's), got {n_critic}.")
    if opts["gp_weight"] is None:
        opts["gp_weight"] = 10.0 if ctx.is_image else 1.0
    for name in ("gp_weight", "clip", "lr"):
        if isinstance(opts[name], bool) or not isinstance(opts[name], (int, float)) or not opts[name] >= 0:
            raise ValueError(f"family 'gan': option {name} must be a number >= 0, got {opts[name]!r}.")
    opts["gp_weight"] = float(opts["gp_weight"])
    if kind == "wgan" and opts["clip"] <= 0:
        raise ValueError("family 'gan': kind=wgan keeps its critic Lipschitz by clipping; option clip must be > 0 "
                         f"(0.01 in the paper), got {opts['clip']!r}.")
    if not 0.0 <= opts["ema"] < 1.0:
        raise ValueError(f"family 'gan': option ema must be in [0, 1) (0: no EMA), got {opts['ema']!r}.")
    if opts["channels"] < 0:
        raise ValueError(f"family 'gan': option channels must be >= 0 (0: ctx.width // 2, or // 4 with n_critic > 1), "
                         f"got {opts['channels']}.")
    lr = opts["lr"] or _LR[kind][ctx.is_image]
    if ctx.is_image:
        width = opts["channels"] or max(ctx.width // (2 if n_critic == 1 else 4), 1)
    else:
        width = ctx.width
    # built in one compiled program (the same values as eagerly, without compiling each initialiser on its own)
    model = nnx.jit(lambda: make_gan(ctx.shape, latent_dim=ctx.latent_dim, width=width, depth=ctx.depth,
                                     spectral_norm=opts["spectral_norm"], rngs=nnx.Rngs(ctx.seed)))()
    objective = [
        Update(critic_loss(kind, gp_weight=opts["gp_weight"]), params=nnx.PathContains("critic"),
               optimizer="critic", repeats=n_critic, name="critic"),
        Update(generator_loss(kind), params=nnx.PathContains("generator"), optimizer="generator",
               name="generator"),
    ]
    optimizer = {"critic": _optimizer(kind, lr, n_critic, opts["clip"] if kind == "wgan" else None),
                 "generator": _optimizer(kind, lr, n_critic, None)}

    def generate(model, key, num, labels=None):
        return model.sample(key, num), 1

    def diagnostics(model, x, key):
        return gan_diagnostics(model, x, key, with_modes=not ctx.is_image and ctx.shape == (2,))

    sn = ", spectral norm" if opts["spectral_norm"] else ""
    return Recipe(model=model, objective=objective, optimizer=optimizer, generate=generate, log_likelihood=None,
                  likelihood_kind="", diagnostics=diagnostics, ema_decay=opts["ema"] or None,
                  sampler=f"generator, one pass ({kind}{sn}, n_critic={n_critic})", fuse_steps=True,
                  conditional=False)


def gan_diagnostics(model, x, key, *, with_modes: bool = False) -> dict[str, float]:
    """Critic diagnostics on a data batch ``x`` and as many generated samples, in evaluation mode (spectral norm's
    ``u`` is not advanced): the critic's mean scores, the gap ``E D(real) - E D(fake)`` and the mean input-gradient
    norm at random interpolates. With ``with_modes`` and a batch that is the 8-Gaussians target (all 8 of
    :func:`jaxgen.metrics.modes.eight_gaussians_modes` covered by the data, >= 95% of it within 3 std), also the mode
    coverage of 2,500 generated samples: modes covered, high-quality fraction, KL of the mode histogram from
    uniform. One compiled program."""
    model = nnx.merge(*nnx.split(model))  # a copy: eval() must not change the caller's module
    model.eval()
    x = jnp.asarray(x)
    with_modes = bool(with_modes and x.ndim == 2 and x.shape[1] == 2)
    stats = {k: float(v) for k, v in _diagnose(model, x, key, with_modes).items()}
    out = {k: stats[k] for k in ("critic_real", "critic_fake", "critic_gap", "gradient_norm")}
    if with_modes and stats["data_modes"] == 8 and stats["data_high_quality"] >= 0.95:
        out.update(modes_covered=stats["modes_covered"], high_quality=stats["high_quality"], mode_kl=stats["mode_kl"])
    return out


@functools.partial(nnx.jit, static_argnames=("with_modes",))
def _diagnose(model, x, key, with_modes: bool):
    k_fake, k_gp, k_modes = jax.random.split(key, 3)
    n = x.shape[0]
    fake = model.sample(k_fake, n)
    scores = model.critic(jnp.concatenate([x, fake]))
    real_mean, fake_mean = jnp.mean(scores[:n]), jnp.mean(scores[n:])
    out = {"critic_real": real_mean, "critic_fake": fake_mean, "critic_gap": real_mean - fake_mean,
           "gradient_norm": interpolate_gradient_norm(model.critic, x, fake, k_gp)}
    if with_modes:
        centres, std = eight_gaussians_modes()
        data = mode_coverage(x, centres, std)
        cov = mode_coverage(model.sample(k_modes, _MODE_SAMPLES), centres, std)
        out.update(data_modes=data.modes_covered, data_high_quality=data.high_quality,
                   modes_covered=cov.modes_covered, high_quality=cov.high_quality, mode_kl=cov.kl_from_uniform)
    return out


def _with(ctx: Context, **defaults) -> Context:
    return dataclasses.replace(ctx, options={**defaults, **ctx.options})


def build_wgan(ctx: Context) -> Recipe:
    """WGAN with weight clipping (``kind=wgan``)."""
    return build_gan(_with(ctx, kind="wgan"))


def build_wgan_gp(ctx: Context) -> Recipe:
    """WGAN-GP (``kind=wgan_gp``)."""
    return build_gan(_with(ctx, kind="wgan_gp"))


def build_sngan(ctx: Context) -> Recipe:
    """SN-GAN: a spectrally normalised critic with the hinge loss and 5 critic updates per generator update
    (``kind=hinge, spectral_norm=true, n_critic=5``; Miyato et al. 2018 train with n_dis = 5 critic updates)."""
    return build_gan(_with(ctx, kind="hinge", spectral_norm=True, n_critic=5))


__all__ = ["build_gan", "build_wgan", "build_wgan_gp", "build_sngan", "gan_diagnostics", "DEFAULTS"]
