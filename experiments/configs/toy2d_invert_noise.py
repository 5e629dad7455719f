"""Noise-space inversion: for held-out moons points y, the noise x0 with Heun-8(x0) = y, by Adam through the sampler,
against the ODE run backwards (:mod:`experiments.differentiable`)."""

from experiments.differentiable import DifferentiableConfig


def get_config() -> DifferentiableConfig:
    return DifferentiableConfig(name="toy2d_invert_noise", task="invert_noise", target="moons", solver="heun",
                                sample_steps=8, opt_steps=500, opt_learning_rate=0.2, prior_weight=1e-3)
