"""The families the ``generative`` experiment knows, by name: ``FAMILIES[name] = (module, builder, fixed options)``.

A name may fix options of a shared builder (``wgan_gp`` is the GAN builder with ``kind="wgan_gp"``); options given in
the spec (``"wgan_gp:n_critic=3"``) are added to those. Builders are imported when used, so that listing the families
costs nothing.
"""

from __future__ import annotations

import importlib
from typing import Any

from experiments.recipes import Context, Recipe

# name: (module under experiments.recipes, builder, fixed options, one-line description)
FAMILIES: dict[str, tuple[str, str, dict[str, Any], str]] = {
    "flow_matching": ("flow_matching", "build_flow_matching", {}, "conditional flow matching (CondOT path)"),
    "vae": ("vae", "build_vae", {}, "Gaussian VAE (Kingma & Welling 2014)"),
    # the KL warmed up over 1,000 steps (Bowman et al. 2016): from the start, beta = 4 collapsed the digits' posterior
    # (2,000 steps: class histogram 0.57 from uniform, classifier FD 238; warmed up: 0.13, FD 45)
    "beta_vae": ("vae", "build_vae", {"beta": 4.0, "kl_warmup": 1000},
                 "beta-VAE, beta = 4 (Higgins et al. 2017), KL warmed up over 1,000 steps"),
    "hvae": ("vae", "build_hvae", {}, "VAE with two stochastic layers"),
    "vqvae": ("vqvae", "build_vqvae", {}, "VQ-VAE, EMA codebook (van den Oord et al. 2017)"),
    "latent_fm": ("vae", "build_latent_fm", {}, "flow matching in a VAE's latent space (LDM)"),
    "realnvp": ("flows", "build_realnvp", {}, "RealNVP affine couplings (Dinh et al. 2017)"),
    "glow": ("flows", "build_glow", {}, "Glow: actnorm, 1x1 convolutions, multi-scale (Kingma & Dhariwal 2018)"),
    "ffjord": ("flows", "build_ffjord", {}, "FFJORD continuous flow, maximum likelihood (Grathwohl et al. 2019)"),
    "gan": ("gan", "build_gan", {"kind": "non_saturating"}, "GAN, non-saturating loss (Goodfellow et al. 2014)"),
    "wgan": ("gan", "build_gan", {"kind": "wgan"}, "WGAN, weight clipping (Arjovsky et al. 2017)"),
    "wgan_gp": ("gan", "build_gan", {"kind": "wgan_gp"}, "WGAN-GP (Gulrajani et al. 2017)"),
    "sngan": ("gan", "build_gan", {"kind": "hinge", "spectral_norm": True},
              "SN-GAN: spectrally normalised critic, hinge loss (Miyato et al. 2018)"),
    "ebm": ("ebm", "build_ebm", {}, "EBM, contrastive divergence, short-run Langevin + replay buffer"),
    "ncsn": ("ebm", "build_ncsn", {}, "NCSN, annealed Langevin (Song & Ermon 2019)"),
    "ssm": ("ebm", "build_ssm", {}, "score model by sliced score matching (Song et al. 2019)"),
    "meanflow": ("flow_map", "build_meanflow", {}, "MeanFlow: a flow map u(x, r, t), one-step (Geng et al. 2025)"),
    "shortcut": ("flow_map", "build_shortcut", {}, "shortcut model: self-consistent jumps (Frans et al. 2025)"),
    "scm": ("scm", "build_scm", {}, "sCM: continuous-time consistency training, TrigFlow (Lu & Song 2025)"),
}


def parse_family(spec: str) -> tuple[str, dict[str, Any]]:
    """``"wgan_gp:n_critic=3"`` -> ``("wgan_gp", {"n_critic": 3})``, refusing an unknown family."""
    from jaxgen.samplers import parse_solver_spec

    name, opts = parse_solver_spec(spec)
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; choose from {', '.join(FAMILIES)} (options as "
                         "'name:key=value,...', e.g. 'vae:beta=4').")
    return name, opts


def build(spec: str, ctx: Context) -> Recipe:
    """The recipe of a family spec on ``ctx`` (the spec's options replace ``ctx.options``)."""
    import dataclasses

    name, opts = parse_family(spec)
    module, builder, fixed, _ = FAMILIES[name]
    fn = getattr(importlib.import_module(f"experiments.recipes.{module}"), builder)
    return fn(dataclasses.replace(ctx, options={**fixed, **opts}))


__all__ = ["FAMILIES", "parse_family", "build"]
