"""Likelihoods: exact log-likelihood through the probability-flow ODE, bits per dimension, DDPM's bound, and the
variational bounds of latent-variable models (ELBO, IWAE, KL terms, posterior-collapse diagnostics)."""

from jaxgen.likelihood.ddpm import (DDPMBound, ddpm_elbo, diffusion_kl_term, diffusion_kl_term_eps,
                                    diffusion_kl_term_snr, discretized_gaussian_log_likelihood, eps_kl_weight,
                                    gaussian_kl, snr_kl_weight)
from jaxgen.likelihood.dequantization import ImageLikelihood, bits_per_dim, dequantize, image_bits_per_dim
from jaxgen.likelihood.variational import (active_units, bernoulli_log_prob, elbo, gaussian_kl_diag,
                                           gaussian_log_prob, iwae_bound, kl_per_dimension, kl_standard_normal,
                                           kl_summary, reparameterize)
from jaxgen.likelihood.ode import (DIVERGENCES, PROBES, LikelihoodResult, divergence_exact, divergence_hutchinson,
                                   log_likelihood, sample_probes, value_and_divergence_exact,
                                   value_and_divergence_hutchinson)

__all__ = [
    "LikelihoodResult", "log_likelihood", "divergence_exact", "divergence_hutchinson", "value_and_divergence_exact",
    "value_and_divergence_hutchinson", "sample_probes", "DIVERGENCES", "PROBES",
    "ImageLikelihood", "bits_per_dim", "dequantize", "image_bits_per_dim", "DDPMBound", "ddpm_elbo", "gaussian_kl",
    "diffusion_kl_term", "diffusion_kl_term_eps", "diffusion_kl_term_snr", "eps_kl_weight", "snr_kl_weight",
    "discretized_gaussian_log_likelihood", "kl_standard_normal", "gaussian_kl_diag", "gaussian_log_prob",
    "bernoulli_log_prob", "reparameterize", "elbo", "iwae_bound", "active_units", "kl_per_dimension", "kl_summary",
]
