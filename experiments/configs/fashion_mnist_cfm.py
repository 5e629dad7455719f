"""Class-conditional flow matching on Fashion-MNIST (TFDS data, prepared once where it can be downloaded)."""

from experiments.images import ImageConfig


def get_config() -> ImageConfig:
    return ImageConfig(name="fashion_mnist_cfm", dataset="fashion_mnist", channels=32, channel_mult=(1, 2, 2),
                       attention_resolutions=(7,), steps=30_000, batch_size=128, learning_rate=1e-3,
                       checkpoint_every=2000, sample_every=2000)
