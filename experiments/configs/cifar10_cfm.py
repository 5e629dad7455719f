"""TorchCFM's CIFAR-10 recipe (U-Net 128 channels, lr 2e-4, batch 128, EMA 0.9999), class-conditional (TFDS
data, prepared once where it can be downloaded)."""

from experiments.images import ImageConfig


def get_config() -> ImageConfig:
    return ImageConfig(name="cifar10_cfm", dataset="cifar10", channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                       attention_resolutions=(16,), num_heads=4, steps=400_000, batch_size=128, learning_rate=2e-4,
                       warmup_steps=5000, ema_decay=0.9999, checkpoint_every=5000, sample_every=20_000,
                       sampler="tsit5")
