"""A quick smoke configuration of consistency distillation (for a ``digits_smoke`` teacher)."""

from experiments.distill import DistillConfig


def get_config() -> DistillConfig:
    return DistillConfig(name="digits_cd_smoke", teacher="runs/digits_smoke", steps=10, batch_size=16,
                         checkpoint_every=5, num_scales=4, solver="euler", samples_per_class=4)
