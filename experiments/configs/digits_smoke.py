"""A quick smoke configuration of the digits pipeline (tests, CI): every stage of the run, on a one-level U-Net
without attention so that it compiles fast (the U-Net's levels and attention are tested in tests/test_unet.py)."""

from experiments.images import ImageConfig


def get_config() -> ImageConfig:
    return ImageConfig(name="digits_smoke", steps=20, batch_size=32, channels=8, channel_mult=(1,),
                       attention_resolutions=(), checkpoint_every=10, sample_every=20, sampler="euler",
                       sample_steps=2, samples_per_class=4, guidance_scales=(0.0, 2.0), warmup_steps=5)
