"""Target CFM (Lipman et al. 2023's OT path, ``x_t = t z + (1 - (1 - sigma_min) t) eps`` with ``sigma_min = 0.01``) from
N(0, I) to TorchCFM's 8 Gaussians."""

from experiments.toy2d import Toy2DConfig


def get_config() -> Toy2DConfig:
    return Toy2DConfig(name="toy2d_gaussian_to_8gaussians_target_cfm", source="gaussian", target="8gaussians",
                       sigma_min=0.01)
