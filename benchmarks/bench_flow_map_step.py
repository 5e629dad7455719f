"""The cost of a flow-map training step (a JVP of the network inside the compiled step) against plain flow matching.

Each row trains the same network with jaxgen's :class:`~jaxgen.training.Trainer` (``steps`` fused in one
``lax.scan``, after a compiled warm-up) and reports milliseconds per step and the ratio to flow matching:

* 2-D: flow matching with an ``MLPField`` vs MeanFlow and shortcut models with a ``FlowMapMLP`` of the same width
  (one more input), batch 256;
* digits (8 x 8): flow matching with the digits ``UNetField`` (16 channels, attention at 4 x 4) vs the MeanFlow loss on
  the same U-Net used as a flow map that ignores ``r`` (``u(x, r, t) = unet(x, t)``): the step then costs what a
  two-time U-Net's would, one forward pass, one JVP through every layer (attention included) and the backward pass.

Usage::

    python benchmarks/bench_flow_map_step.py [--steps 200]

Timings drift with machine load: compare only figures from the same run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    args = ap.parse_args(argv)
    sys.path.insert(0, ROOT)
    import jax
    import optax
    from flax import nnx

    from jaxgen.losses import flow_matching_loss, meanflow_loss, shortcut_loss
    from jaxgen.models import FlowMapMLP, MLPField, UNetField
    from jaxgen.training import Trainer

    def ms_per_step(model, loss, data) -> float:
        trainer = Trainer(model, loss, optax.adam(1e-3), data=data)
        state = trainer.init(0)
        state, losses = trainer.steps(state, args.steps)  # compiles
        jax.block_until_ready(losses)
        t0 = time.perf_counter()
        state, losses = trainer.steps(state, args.steps)
        jax.block_until_ready(losses)
        return 1000 * (time.perf_counter() - t0) / args.steps

    rows = []
    data2 = lambda k: {"x": jax.random.normal(k, (256, 2))}  # noqa: E731
    mlp = dict(width=128, hidden_layers=3, activation="silu")
    fm = ms_per_step(MLPField(2, **mlp, rngs=nnx.Rngs(0)), flow_matching_loss("linear"), data2)
    rows.append(("2-D MLP 128x3, batch 256", "flow matching", fm, 1.0))
    for name, loss in (("MeanFlow (JVP)", meanflow_loss("linear")), ("shortcut (3 passes)", shortcut_loss("linear"))):
        ms = ms_per_step(FlowMapMLP(2, **mlp, rngs=nnx.Rngs(0)), loss, data2)
        rows.append(("2-D MLP 128x3, batch 256", name, ms, ms / fm))

    def unet():
        return nnx.jit(lambda: UNetField(1, channels=16, channel_mult=(1, 2), num_res_blocks=1,
                                         attention_resolutions=(4,), dropout=0.0, image_size=8,
                                         num_groups=8, rngs=nnx.Rngs(0)))()

    class IgnoresR(nnx.Module):
        def __init__(self, net):
            self.net = net

        def __call__(self, x, r, t):
            return self.net(x, t)

    data8 = lambda k: {"x": jax.random.uniform(k, (128, 8, 8, 1), minval=-1, maxval=1)}  # noqa: E731
    fm = ms_per_step(unet(), flow_matching_loss("linear"), data8)
    rows.append(("digits U-Net 16ch + attention, batch 128", "flow matching", fm, 1.0))
    ms = ms_per_step(IgnoresR(unet()), meanflow_loss("linear"), data8)
    rows.append(("digits U-Net 16ch + attention, batch 128", "MeanFlow (JVP)", ms, ms / fm))

    print(f"device: {jax.devices()[0].device_kind}; {args.steps} fused steps per figure")
    print("| network | objective | ms / step | vs flow matching |\n|---|---|---|---|")
    for net, name, ms, ratio in rows:
        print(f"| {net} | {name} | {ms:.2f} | {ratio:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
