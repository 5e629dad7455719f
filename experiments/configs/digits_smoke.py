"""A quick smoke configuration of the digits pipeline (tests, CI)."""

from experiments.images import ImageConfig


def get_config() -> ImageConfig:
    return ImageConfig(name="digits_smoke", steps=20, batch_size=32, channels=8, checkpoint_every=10, sample_every=20,
                       sampler="euler", sample_steps=2, samples_per_class=4, guidance_scales=(0.0, 2.0),
                       warmup_steps=5)
