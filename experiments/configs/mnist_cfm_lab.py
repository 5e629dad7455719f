"""MIT 6.S184 lab 3 on MNIST: null label, label dropout 0.1, guidance 1/3/5, Euler with 100 steps (TFDS data,
prepared once where it can be downloaded)."""

from experiments.images import ImageConfig


def get_config() -> ImageConfig:
    return ImageConfig(name="mnist_cfm_lab", dataset="mnist", channels=32, channel_mult=(1, 2, 2),
                       attention_resolutions=(7,), steps=20_000, batch_size=250, learning_rate=1e-3,
                       guidance_scales=(1.0, 3.0, 5.0), eval_guidance=3.0, sampler="euler", sample_steps=100,
                       checkpoint_every=2000, sample_every=2000)
