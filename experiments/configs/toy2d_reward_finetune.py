"""DRaFT-style reward fine-tuning of an 8-Gaussians flow: the reward -max(0, -x_1) (move mass into the right
half-plane) backpropagated through Euler-8, with a drift-change penalty (:mod:`experiments.differentiable`)."""

from experiments.differentiable import DifferentiableConfig


def get_config() -> DifferentiableConfig:
    return DifferentiableConfig(name="toy2d_reward_finetune", task="reward_finetune", target="8gaussians",
                                solver="euler", sample_steps=8, opt_steps=300, opt_learning_rate=1e-3,
                                drift_weight=0.1)
