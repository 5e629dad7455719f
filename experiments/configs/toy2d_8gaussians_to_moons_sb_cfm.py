"""Schrödinger-bridge CFM (Tong et al. 2024, SF2M) on TorchCFM's 2-D task, 8 Gaussians -> moons: the entropic OT plan
at ``epsilon = 2 sigma^2`` (absolute), Brownian-bridge noise ``sigma sqrt(t (1 - t))`` with ``sigma = 0.5``, and a
learned score next to the velocity, so that the evaluation also samples the bridge's SDE
``dX = (u + sigma^2/2 s) dt + sigma dW``. Checked mode is off, as in ``toy2d_8gaussians_to_moons_ot_cfm``."""

from experiments.toy2d import Toy2DConfig


def get_config() -> Toy2DConfig:
    return Toy2DConfig(name="toy2d_8gaussians_to_moons_sb_cfm", bridge_noise=0.5, train_score=True,
                       checked=False,
                       coupling="sinkhorn:epsilon=0.5,relative_epsilon=false,max_iterations=200")
