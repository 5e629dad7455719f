"""A 6-step Euler time grid learned by gradient descent (distillation onto a Heun-100 solve of the same noise),
against the uniform grid at the same NFE on fresh noise (:mod:`experiments.differentiable`)."""

from experiments.differentiable import DifferentiableConfig


def get_config() -> DifferentiableConfig:
    return DifferentiableConfig(name="toy2d_learn_time_grid", task="learn_time_grid", target="8gaussians",
                                solver="euler", sample_steps=6, opt_steps=300, opt_learning_rate=0.05)
