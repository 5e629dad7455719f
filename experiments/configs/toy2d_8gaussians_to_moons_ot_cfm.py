"""OT-CFM (Tong et al. 2024) on TorchCFM's 2-D task, 8 Gaussians -> moons: each minibatch re-paired by entropic OT
(kernel-domain Sinkhorn, epsilon 0.05 of the mean cost, 20 iterations, sources drawn from the plan's columns) inside the
compiled training step. ``--set coupling=exact`` couples by exact minibatch OT instead (4x slower on 2 CPU cores; see
``benchmarks/bench_cfm_variants.py``). On several devices each device couples its own shard
(``--set coupling_scope=global`` couples the whole batch). Checked mode is off: JAX cannot check a program whose
per-device coupling runs its solver inside ``shard_map``; the data are drawn by the library on the device."""

from experiments.toy2d import Toy2DConfig


def get_config() -> Toy2DConfig:
    return Toy2DConfig(name="toy2d_8gaussians_to_moons_ot_cfm", coupling="sinkhorn:max_iterations=20",
                       checked=False)
