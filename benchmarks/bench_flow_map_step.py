"""The cost of a flow-map training step (a JVP of the network inside the compiled step) against plain flow matching.

Each row trains the same network with jaxgen's :class:`~jaxgen.training.Trainer` (``steps`` fused in one
``lax.scan``, after a compiled warm-up) and reports milliseconds per step and the ratio to flow matching:

* 2-D: flow matching with an ``MLPField`` vs MeanFlow and shortcut models with a ``FlowMapMLP`` of the same width
  (one more input), batch 256;
* digits (8 x 8), class-conditional: flow matching with a ``UNetField`` (16 channels, attention at 4 x 4) and with a
  ``DiTField`` of the main job's size vs MeanFlow with the two-time ``FlowMapUNet`` / ``FlowMapDiT`` (one forward pass
  and one JVP through every layer, attention included, then the backward pass), unguided and with guidance built
  into training (the scale as an input; one more forward pass for the unconditional velocity).

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
    from jaxgen.models import DiTField, FlowMapDiT, FlowMapMLP, FlowMapUNet, MLPField, UNetField
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

    data8 = lambda k: {"x": jax.random.uniform(k, (128, 8, 8, 1), minval=-1, maxval=1),  # noqa: E731
                       "y": jax.random.randint(jax.random.fold_in(k, 1), (128,), 0, 10)}
    unet = dict(channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,), dropout=0.0,
                image_size=8, num_groups=8, num_classes=10)
    dit = dict(image_size=8, patch_size=2, hidden=96, depth=4, num_heads=4, num_classes=10)
    guided = meanflow_loss("linear", p=0.0, label_dropout=0.1, null_label=10, guidance_scales=(1.0, 4.0))
    for label, field, flow_map, kw in (("digits U-Net 16ch + attention, batch 128", UNetField, FlowMapUNet, unet),
                                       ("digits DiT 96x4 (724k), batch 128", DiTField, FlowMapDiT, dit)):
        fm = ms_per_step(nnx.jit(lambda: field(1, **kw, rngs=nnx.Rngs(0)))(), flow_matching_loss("linear"), data8)
        rows.append((label, "flow matching", fm, 1.0))
        for name, loss, extra in (("MeanFlow (JVP)", meanflow_loss("linear", p=0.0), {}),
                                  ("MeanFlow, guidance in training (JVP + unconditional pass)", guided,
                                   {"guidance_input": True})):
            ms = ms_per_step(nnx.jit(lambda: flow_map(1, **kw, **extra, rngs=nnx.Rngs(0)))(), loss, data8)
            rows.append((label, name, ms, ms / fm))

    print(f"device: {jax.devices()[0].device_kind}; {args.steps} fused steps per figure")
    print("| network | objective | ms / step | vs flow matching |\n|---|---|---|---|")
    for net, name, ms, ratio in rows:
        print(f"| {net} | {name} | {ms:.2f} | {ratio:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
