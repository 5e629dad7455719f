"""Training objectives: pure ``loss(field, batch, key) -> scalar`` functions (flow matching, score matching, DDPM,
x0 and v prediction, consistency, rectified flow, MeanFlow, shortcut models), and the other families' objectives (VAE and IWAE bounds, VQ-VAE,
maximum likelihood of flows and FFJORD, GAN players, contrastive divergence, sliced score matching, NCSN)."""

from jaxgen.losses.consistency import (consistency_distillation_loss, consistency_times, consistency_training_loss,
                                       ct_schedule)
from jaxgen.losses.ebm import contrastive_divergence_loss
from jaxgen.losses.flow_map import adaptive_weight, meanflow_loss, meanflow_target, meanflow_times, shortcut_loss
from jaxgen.losses.gan import critic_gap, critic_loss, generator_loss, gradient_penalty, optimal_discriminator
from jaxgen.losses.likelihood import cnf_loss, maximum_likelihood_loss
from jaxgen.losses.rectified import distillation_loss, reflow_loss
from jaxgen.losses.regression import (data_prediction_loss, denoising_score_matching_loss, flow_matching_loss,
                                      logit_normal_time, marginal_regression_loss, noise_prediction_loss,
                                      regression_loss, split_batch, uniform_time, v_prediction_loss,
                                      velocity_and_score_loss, with_params)
from jaxgen.losses.scm import scm_loss, scm_tangent, scm_times, trigflow_jvp
from jaxgen.losses.score_matching import ncsn_loss, sliced_score_matching_loss
from jaxgen.losses.vae import hvae_loss, iwae_loss, vae_loss
from jaxgen.losses.vq import vqvae_loss

__all__ = [
    "regression_loss", "flow_matching_loss", "denoising_score_matching_loss", "noise_prediction_loss",
    "data_prediction_loss", "v_prediction_loss", "marginal_regression_loss", "with_params", "split_batch",
    "uniform_time", "logit_normal_time", "consistency_distillation_loss", "consistency_training_loss",
    "consistency_times", "ct_schedule", "reflow_loss", "distillation_loss", "velocity_and_score_loss",
    "vae_loss", "hvae_loss", "iwae_loss", "vqvae_loss", "maximum_likelihood_loss", "cnf_loss", "critic_loss",
    "generator_loss", "gradient_penalty", "critic_gap", "optimal_discriminator", "contrastive_divergence_loss",
    "sliced_score_matching_loss", "ncsn_loss", "meanflow_loss", "meanflow_target", "meanflow_times", "adaptive_weight",
    "shortcut_loss",
    "scm_loss", "scm_tangent", "scm_times", "trigflow_jvp",
]
