"""The classifier-free guidance scale w of a class-conditional 8-Gaussians flow, learned by gradient descent on the
class-averaged sliced W2 between guided samples and each mode's data (:mod:`experiments.differentiable`)."""

from experiments.differentiable import DifferentiableConfig


def get_config() -> DifferentiableConfig:
    return DifferentiableConfig(name="toy2d_learn_guidance", task="learn_guidance", target="8gaussians",
                                solver="euler", sample_steps=8, opt_steps=200, opt_learning_rate=0.05,
                                opt_batch=512, guidance_init=0.0)
