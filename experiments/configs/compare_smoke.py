"""A quick smoke configuration of the family comparison (tests): a few steps of every family on 2-D data."""

from experiments.compare import CompareConfig


def get_config() -> CompareConfig:
    return CompareConfig(name="compare_smoke", datasets=("8gaussians",), steps_2d=20, steps_digits=20, batch_size=32,
                         num_samples=64, likelihood_samples=16)
