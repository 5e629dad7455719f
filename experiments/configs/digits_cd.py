"""Consistency distillation of the main job's guided field into the same U-Net (``--set teacher=RUN``)."""

from experiments.distill import DistillConfig


def get_config() -> DistillConfig:
    return DistillConfig(name="digits_cd")
