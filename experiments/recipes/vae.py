r"""The VAE recipes: a Gaussian VAE / beta-VAE (Kingma & Welling 2014; Higgins et al. 2017), a two-layer hierarchical
VAE, and latent flow matching (a flow-matching prior trained in an autoencoder's latent space and decoded; Rombach et
al. 2022's latent diffusion with flow matching in place of diffusion).

Likelihoods: the VAEs report the importance-weighted bound ``L_K <= log p(x)`` (Burda et al. 2016) with
``K = iwae_samples``, of the data as given (the experiment dequantises the test digits). With ``dequantize=true``
(default) image VAEs train on uniformly dequantised data ``x + w u``, ``u ~ U[0, 1)``, with the bin width ``w`` of
the data's grid (digits ``(8, 8, 1)``: levels ``k/8 - 1``, ``w = 1/8``; other images: 8-bit, ``w = 2/255``), so the
Gaussian decoder models the density that bits/dim measure (Theis et al. 2016) instead of collapsing onto the grid.
A Bernoulli decoder has no density of ``x`` (its targets are the grey levels ``(x + 1) / 2`` read as
probabilities), so its recipes report no likelihood; it needs data in ``[-1, 1]`` (images).

Samples (option ``decoder_noise``, unset = automatic): on images the decoder's mean at prior latents (the usual VAE
samples); on vectors (2-D targets) draws from the decoder ``p(x|z)``, since the model's distribution there is the
decoder's Gaussian around a low-dimensional curve of means, which the means alone would show as a curve.

NFE (network evaluations per sample): VAE 1 (the decoder); hierarchical VAE 2 (``p(z1|z2)``, then the decoder);
latent flow matching: the ODE solver's field evaluations (Heun: 2 per step) + 1 decoder pass (+1 for the hierarchical
VAE's ``p(z1|z2)``).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from experiments.recipes import Context, Recipe, options
from jaxgen.likelihood.variational import gaussian_kl_diag, kl_standard_normal, kl_summary, reparameterize
from jaxgen.losses.vae import hvae_loss, vae_loss
from jaxgen.models.vae import DECODERS, GaussianVAE, HierarchicalVAE

DIGITS_BIN = 1.0 / 8.0  # the digits' levels k/8 - 1, k = 0..16
BYTE_BIN = 2.0 / 255.0  # 8-bit images on [-1, 1]: k/127.5 - 1

VAE_DEFAULTS = {"beta": 1.0, "decoder": "gaussian", "kl_warmup": 0, "free_bits": 0.0, "iwae_samples": 64,
                "dequantize": True, "channels": 0, "decoder_noise": None, "log_scale_init": None}
HVAE_DEFAULTS = {**VAE_DEFAULTS, "top_dim": 0}
LATENT_FM_DEFAULTS = {"autoencoder": "vae", "beta": 1.0, "kl_warmup": 0, "dequantize": True, "channels": 0,
                      "decoder_noise": None, "log_scale_init": None, "fm_width": 0, "fm_depth": 0, "ode_steps": 20,
                      "solver": "heun",
                      "ema_decay": 0.0, "num_codes": 64, "code_dim": 4, "downsample": 2}
AUTOENCODERS = ("vae", "hvae", "vqvae")


def bin_width(ctx: Context, dequantize: bool) -> float:
    """The dequantisation bin width for ``ctx``'s data: 1/8 for the digits, 2/255 for other images, 0 for vectors
    (continuous data) or with ``dequantize=False``."""
    if not dequantize or not ctx.is_image:
        return 0.0
    return DIGITS_BIN if tuple(ctx.shape) == (8, 8, 1) else BYTE_BIN


def decoder_noise(ctx: Context, opts: dict) -> bool:
    """Whether samples are draws from the decoder ``p(x|z)`` (default for vectors: a VAE's 2-D distribution is the
    decoder's Gaussian blurred along the decoder mean's low-dimensional curve, and the mean alone shows only the curve)
    or its mean (default for images: the usual, noise-free VAE samples)."""
    noise = opts.get("decoder_noise")
    if noise is None:
        return not ctx.is_image
    if not isinstance(noise, bool):
        raise ValueError(f"option decoder_noise must be true, false or unset (automatic), got {noise!r}.")
    return noise


def log_scale_init(ctx: Context, opts: dict) -> float:
    """The Gaussian decoder's initial log-scale (in the units of the data; the experiments standardise 2-D data to
    unit variance per coordinate). Unset: 0 on images; -1.5 on vectors, where a decoder that starts at the data's own
    scale explains the data as one Gaussian and the posterior collapses (8 Gaussians, 2,000 steps: KL 0.01 nats,
    held-out NLL 5.38 nats, the isotropic Gaussian fit's; at -1.5: KL 2.5 nats, NLL 4.62, sliced W2 1.02 -> 0.45)."""
    value = opts.get("log_scale_init")
    if value is None:
        return 0.0 if ctx.is_image else -1.5
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= -6.0:
        raise ValueError(f"option log_scale_init must be a number > -6 (the decoder's log-scale floor) or unset "
                         f"(automatic), got {value!r}.")
    return float(value)


def _optimizer(ctx: Context) -> optax.GradientTransformation:
    """Adam with gradient clipping (a learned decoder scale makes early gradients spiky) and a cosine decay to 10%."""
    schedule = optax.cosine_decay_schedule(ctx.learning_rate, max(int(ctx.steps), 1), alpha=0.1)
    return optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))


def _check_common(family: str, ctx: Context, opts: dict) -> None:
    if opts.get("decoder", "gaussian") not in DECODERS:
        raise ValueError(f"family {family!r}: option decoder must be one of {DECODERS}, got {opts['decoder']!r}.")
    if opts.get("decoder") == "bernoulli" and not ctx.is_image:
        raise ValueError(f"family {family!r}: the Bernoulli decoder models grey levels (x + 1) / 2 in [0, 1] of images "
                         f"in [-1, 1]; data of shape {ctx.shape} is unbounded. Use decoder=gaussian.")
    if opts.get("iwae_samples", 1) < 1:
        raise ValueError(f"family {family!r}: option iwae_samples must be >= 1, got {opts['iwae_samples']}.")
    if opts.get("kl_warmup", 0) < 0 or opts.get("free_bits", 0.0) < 0 or opts.get("beta", 1.0) < 0:
        raise ValueError(f"family {family!r}: options beta, kl_warmup and free_bits must be >= 0, got beta="
                         f"{opts.get('beta')}, kl_warmup={opts.get('kl_warmup')}, free_bits={opts.get('free_bits')}.")


def _channels(ctx: Context, opts: dict) -> int:
    return opts["channels"] or max(8, ctx.width // 4)


def _built(make):
    """``make()`` traced once under ``nnx.jit``: the same parameters as an eager build, initialised by one compiled
    program instead of one small program per parameter shape (twice as fast to build on a CPU)."""
    return nnx.jit(make)()


def _vae_model(ctx: Context, opts: dict) -> GaussianVAE:
    ls = log_scale_init(ctx, opts)
    return _built(lambda: GaussianVAE(ctx.shape, ctx.latent_dim, decoder=opts["decoder"], width=ctx.width,
                                      depth=ctx.depth, channels=_channels(ctx, opts), log_scale_init=ls,
                                      rngs=nnx.Rngs(ctx.seed)))


def _hvae_model(ctx: Context, opts: dict) -> HierarchicalVAE:
    top = opts.get("top_dim", 0) or max(2, ctx.latent_dim // 2)
    ls = log_scale_init(ctx, opts)
    return _built(lambda: HierarchicalVAE(ctx.shape, (ctx.latent_dim, top), decoder=opts["decoder"], width=ctx.width,
                                          depth=ctx.depth, channels=_channels(ctx, opts), log_scale_init=ls,
                                          rngs=nnx.Rngs(ctx.seed)))


@jax.jit
def _vae_diagnostics(model: GaussianVAE, x, key) -> dict:
    mean, logvar = model.encode(x)
    out = kl_summary(kl_standard_normal(mean, logvar), mean)
    log_px = model.reconstruction_log_prob(x, reparameterize(key, mean, logvar))
    out["neg_elbo_nats"] = jnp.mean(out["kl_total"] - log_px)
    out["reconstruction_mse"] = jnp.mean((model.decoder_mean(mean) - x) ** 2)
    return out


@jax.jit
def _hvae_diagnostics(model: HierarchicalVAE, x, key) -> dict:
    h = model.features(x)
    m2, lv2 = model.posterior_top(h)
    z2 = reparameterize(key, m2, lv2)
    m1, lv1 = model.posterior_bottom(h, z2)
    kl1 = gaussian_kl_diag(m1, lv1, *model.prior_bottom(z2))
    top, bottom = kl_summary(kl_standard_normal(m2, lv2), m2), kl_summary(kl1, m1)
    m1_det = model.posterior_bottom(h, m2)[0]  # the reconstruction through the posterior means
    log_px = model.reconstruction_log_prob(x, reparameterize(jax.random.fold_in(key, 1), m1, lv1))
    return {
        "kl_per_dim": jnp.concatenate([bottom["kl_per_dim"], top["kl_per_dim"]]),  # z1's dimensions, then z2's
        "kl_per_dim_z1": bottom["kl_per_dim"], "kl_per_dim_z2": top["kl_per_dim"],
        "kl_total": bottom["kl_total"] + top["kl_total"], "kl_z1": bottom["kl_total"], "kl_z2": top["kl_total"],
        "active_units": bottom["active_units"] + top["active_units"],
        "active_units_z1": bottom["active_units"], "active_units_z2": top["active_units"],
        "neg_elbo_nats": jnp.mean(bottom["kl_total"] + top["kl_total"] - log_px),
        "reconstruction_mse": jnp.mean((model.decoder_mean(m1_det) - x) ** 2),
    }


def _as_report(d: dict) -> dict[str, Any]:
    """Scalars to floats, per-dimension arrays to lists of floats."""
    out = {}
    for k, v in d.items():
        a = jax.device_get(v)
        out[k] = float(a) if jnp.ndim(a) == 0 else [float(u) for u in jnp.ravel(a)]
    return out


def _iwae_ll(num_samples: int):
    def ll(model, x, key):
        return model.log_prob_iwae(x, key, num_samples)
    return ll


def build_vae(ctx: Context) -> Recipe:
    """The Gaussian VAE family: ``"vae:beta=1,decoder=gaussian,kl_warmup=0,free_bits=0,iwae_samples=64,
    dequantize=true,channels=0"`` (``beta != 1``: a beta-VAE; ``kl_warmup``: steps of linear KL warm-up;
    ``free_bits``: nats per latent dimension; ``channels``: the image networks' base channels, 0 =
    ``max(8, width // 4)``, 16 at the default width 64; ``log_scale_init``: the Gaussian decoder's initial
    log-scale, :func:`log_scale_init`). MLP encoder/decoder on vectors, convolutional on images,
    ``latent_dim`` latents; samples are the decoder's mean at prior draws (one decoder pass)."""
    opts = options(ctx, VAE_DEFAULTS, "vae")
    _check_common("vae", ctx, opts)
    model = _vae_model(ctx, opts)
    loss = vae_loss(opts["beta"], warmup_steps=opts["kl_warmup"], free_bits=opts["free_bits"],
                    dequantize=bin_width(ctx, opts["dequantize"]))
    gaussian = opts["decoder"] == "gaussian"
    k = opts["iwae_samples"]
    noise = decoder_noise(ctx, opts)

    def generate(model, key, num, labels=None):
        return model.sample(key, num, noise=noise), 1

    return Recipe(model=model, objective=loss, optimizer=_optimizer(ctx), generate=generate,
                  log_likelihood=_iwae_ll(k) if gaussian else None,
                  likelihood_kind=f"IWAE bound, K={k}" if gaussian else "",
                  diagnostics=lambda model, x, key: _as_report(_vae_diagnostics(model, x, key)),
                  sampler=f"{'draw from' if noise else 'mean of'} p(x|z) at z ~ N(0, I), one decoder pass")


def build_hvae(ctx: Context) -> Recipe:
    """The two-layer hierarchical VAE family (:class:`jaxgen.models.vae.HierarchicalVAE`): the options of
    :func:`build_vae` and ``top_dim`` (the size of ``z2``; 0 = ``max(2, latent_dim // 2)``; ``z1`` has
    ``latent_dim``). Samples by ancestral sampling ``z2 -> z1 -> `` decoder mean (2 network passes)."""
    opts = options(ctx, HVAE_DEFAULTS, "hvae")
    _check_common("hvae", ctx, opts)
    if opts["top_dim"] < 0:
        raise ValueError(f"family 'hvae': option top_dim must be >= 0 (0 = automatic), got {opts['top_dim']}.")
    model = _hvae_model(ctx, opts)
    loss = hvae_loss(opts["beta"], warmup_steps=opts["kl_warmup"], free_bits=opts["free_bits"],
                     dequantize=bin_width(ctx, opts["dequantize"]))
    gaussian = opts["decoder"] == "gaussian"
    k = opts["iwae_samples"]
    noise = decoder_noise(ctx, opts)

    def generate(model, key, num, labels=None):
        return model.sample(key, num, noise=noise), 2

    return Recipe(model=model, objective=loss, optimizer=_optimizer(ctx), generate=generate,
                  log_likelihood=_iwae_ll(k) if gaussian else None,
                  likelihood_kind=f"IWAE bound, K={k}" if gaussian else "",
                  diagnostics=lambda model, x, key: _as_report(_hvae_diagnostics(model, x, key)),
                  sampler=f"ancestral: z2 ~ N(0, I), z1 ~ p(z1|z2), {'x ~' if noise else 'mean of'} p(x|z1)")


class LatentFlowMatching(nnx.Module):
    """An autoencoder and a flow-matching prior over its latents, trained together: ``autoencoder`` (anything with
    ``encode_latent``, ``decode_latent`` and ``latent_shape``) and ``prior`` (a field on the flattened latent)."""

    def __init__(self, autoencoder: nnx.Module, prior: nnx.Module):
        self.autoencoder = autoencoder
        self.prior = prior


def build_latent_fm(ctx: Context) -> Recipe:
    r"""Latent flow matching: ``"latent_fm:autoencoder=vae,beta=1,ode_steps=20,solver=heun,fm_width=0,fm_depth=0,
    ema_decay=0"`` (``autoencoder``: ``vae``, ``hvae`` or ``vqvae``; for the VQ-VAE also ``num_codes``, ``code_dim``,
    ``downsample``; ``fm_width``/``fm_depth`` 0: ``2 width`` / ``depth``; ``kl_warmup``, ``dequantize``,
    ``channels``, ``decoder_noise``, ``log_scale_init`` as for ``vae``).

    One :class:`jaxgen.training.Trainer` run, two :class:`~jaxgen.training.Update` s per step, each with its own Adam:
    the autoencoder's loss on its parameters (``nnx.PathContains("autoencoder")``), then conditional flow matching
    (CondOT path) of an :class:`jaxgen.models.MLPField` (``nnx.PathContains("prior")``) on
    ``stop_gradient(encode_latent(x))``, the latents of the autoencoder just updated (the latent-diffusion recipe of
    Rombach et al. 2022 with the two stages interleaved instead of sequential). ``generate`` integrates the prior from
    ``N(0, I)`` and decodes: NFE = the solver's field evaluations + the decoding passes (module docstring).
    """
    from jaxgen.losses import flow_matching_loss
    from jaxgen.models import MLPField
    from jaxgen.samplers import sample

    opts = options(ctx, LATENT_FM_DEFAULTS, "latent_fm")
    kind = opts["autoencoder"]
    if kind not in AUTOENCODERS:
        raise ValueError(f"family 'latent_fm': option autoencoder must be one of {AUTOENCODERS}, got {kind!r}.")
    if opts["ode_steps"] < 1 or opts["fm_width"] < 0 or opts["fm_depth"] < 0:
        raise ValueError(f"family 'latent_fm': ode_steps must be >= 1 and fm_width, fm_depth >= 0 (0 = automatic), "
                         f"got ode_steps={opts['ode_steps']}, fm_width={opts['fm_width']}, "
                         f"fm_depth={opts['fm_depth']}.")
    if not 0.0 <= opts["ema_decay"] < 1.0:
        raise ValueError(f"family 'latent_fm': ema_decay must be in [0, 1) (0 = no EMA), got {opts['ema_decay']}.")
    _check_common("latent_fm", ctx, opts)
    ae_opts = {**opts, "decoder": "gaussian", "top_dim": 0}
    deq = bin_width(ctx, opts["dequantize"])
    decode_passes = 1
    if kind == "vae":
        autoencoder = _vae_model(ctx, ae_opts)
        ae_loss = vae_loss(opts["beta"], warmup_steps=opts["kl_warmup"], dequantize=deq)
    elif kind == "hvae":
        autoencoder = _hvae_model(ctx, ae_opts)
        ae_loss = hvae_loss(opts["beta"], warmup_steps=opts["kl_warmup"], dequantize=deq)
        decode_passes = 2
    else:
        from jaxgen.losses.vq import vqvae_loss
        from jaxgen.models.vqvae import VQVAE

        depth = min(ctx.depth, 2) if ctx.is_image else ctx.depth
        autoencoder = _built(lambda: VQVAE(ctx.shape, num_codes=opts["num_codes"], code_dim=opts["code_dim"],
                                           width=ctx.width, depth=depth, downsample=opts["downsample"],
                                           rngs=nnx.Rngs(ctx.seed)))
        ae_loss = vqvae_loss()
    latent_shape = tuple(autoencoder.latent_shape)
    dim = math.prod(latent_shape)
    prior = _built(lambda: MLPField(dim, width=opts["fm_width"] or 2 * ctx.width,
                                    hidden_layers=opts["fm_depth"] or ctx.depth, activation="silu",
                                    rngs=nnx.Rngs(ctx.seed + 1)))
    model = LatentFlowMatching(autoencoder, prior)
    fm_loss = flow_matching_loss("linear")
    wants_step = kind != "vqvae"

    def autoencoder_loss(model, batch, key, step=None):
        if wants_step:
            return ae_loss(model.autoencoder, batch, key, step=step)
        return ae_loss(model.autoencoder, batch, key)

    def prior_loss(model, batch, key):
        z = jax.lax.stop_gradient(model.autoencoder.encode_latent(batch["x"]))
        return fm_loss(model.prior, {"x": z.reshape(z.shape[0], dim)}, key)

    from jaxgen.training import Update

    objective = [Update(autoencoder_loss, params=nnx.PathContains("autoencoder"), optimizer="autoencoder",
                        name="autoencoder"),
                 Update(prior_loss, params=nnx.PathContains("prior"), optimizer="prior", name="flow matching")]
    optimizer = {"autoencoder": _optimizer(ctx), "prior": _optimizer(ctx)}
    solver, steps = opts["solver"], opts["ode_steps"]
    noise = decoder_noise(ctx, opts) and kind != "vqvae"  # the VQ-VAE's decoder has no noise model

    def generate(model, key, num, labels=None):
        k0, kx = jax.random.split(key)
        z0 = jax.random.normal(k0, (num, dim), jnp.float32)
        res = sample(model.prior, z0, solver, steps=steps)
        z = res.x.reshape((num,) + latent_shape)
        x = model.autoencoder.decode_latent(z, key=kx) if noise else model.autoencoder.decode_latent(z)
        return x, res.nfe + decode_passes

    @jax.jit
    def latent_diagnostics(model, x, key):
        z = model.autoencoder.encode_latent(x).reshape(x.shape[0], dim)
        recon = model.autoencoder.decode_latent(z.reshape((x.shape[0],) + latent_shape))
        out = {"latent_std_per_dim": jnp.std(z, axis=0), "latent_mean_abs": jnp.mean(jnp.abs(jnp.mean(z, 0))),
               "reconstruction_mse": jnp.mean((recon - x) ** 2)}
        if kind == "vae":
            out.update(_vae_diagnostics(model.autoencoder, x, key))
        elif kind == "hvae":
            out.update(_hvae_diagnostics(model.autoencoder, x, key))
        return out

    def diagnostics(model, x, key):
        return _as_report(latent_diagnostics(model, x, key))

    return Recipe(model=model, objective=objective, optimizer=optimizer, generate=generate, log_likelihood=None,
                  diagnostics=diagnostics, ema_decay=opts["ema_decay"] or None,
                  sampler=f"latent flow matching ({kind}), {solver} {steps} steps, then the decoder's "
                          f"{'draw' if noise else 'mean'}")


__all__ = ["build_vae", "build_hvae", "build_latent_fm", "LatentFlowMatching", "bin_width"]
