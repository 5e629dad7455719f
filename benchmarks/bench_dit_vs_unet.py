"""DiT against U-Net on the digits at (nearly) equal parameter count, in one run: quality and images/s.

Both train the main job's recipe (``jaxgen train digits_cfm``: class-conditional flow matching with label dropout,
batch 128, Adam 2e-3 with warm-up, EMA, ``--steps`` steps) through :mod:`experiments.images`, one with the default
U-Net (702,753 parameters) and one with ``network=dit`` (``DiTField`` hidden 96, depth 4, 4 heads, patch 2: 724,356
parameters), then report: training steps/s and images/s (the fused training chunks' wall time), guided sampling
images/s (Heun, 20 steps, w = 2, 1,000 images, timed on a second compiled call), and the guided samples' label accuracy
and classifier Fréchet distance from each run's report. With ``--meanflow`` each network is also trained as a
MeanFlow flow map (``digits_meanflow``, twice the steps) and scored at 1 and 2 jumps.

Usage: python benchmarks/bench_dit_vs_unet.py [--steps 1000] [--out runs/bench_dit] [--meanflow]
Timings move with the machine's load: compare only figures of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(config, network, out, overrides):
    import jax
    import numpy as np
    from flax import nnx

    from experiments import configs, images

    cfg = configs.get_config(config, [f"network={network}", "sample_every=0", *overrides])
    report = images.train(cfg, out, progress=False)
    steps = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    seconds = steps[-1]["seconds"] - steps[0]["seconds"]  # without the first chunk (compilation)
    steps_per_s = (steps[-1]["step"] - steps[0]["step"]) / seconds
    cfg_, trainer, state, shape = images.load_run(out)
    model = trainer.model(state, ema=True)
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    labels = np.repeat(np.arange(10), 100)
    images.generate(model, cfg_, labels, 2.0, jax.random.key(0), shape=shape)  # compiles
    t0 = time.perf_counter()
    _, nfe = images.generate(model, cfg_, labels, 2.0, jax.random.key(1), shape=shape)
    rate = len(labels) / (time.perf_counter() - t0)
    row = {"config": config, "network": network, "parameters": int(params), "steps": int(state.step),
           "train_steps_per_s": round(steps_per_s, 2), "train_images_per_s": round(steps_per_s * cfg.batch_size),
           "sampler": f"{cfg_.sampler} {cfg_.sample_steps}", "nfe": nfe, "sampling_images_per_s": round(rate),
           "accuracy": report["accuracy"], "fd": round(report["fd"], 2)}
    if images.is_flow_map(cfg_):
        two = images.evaluate_samples(cfg_, *_samples(images, model, cfg_, shape, 2), brief=False)
        row.update({"accuracy_2_jumps": two["accuracy"], "fd_2_jumps": round(two["fd"], 2)})
    print(json.dumps(row), flush=True)
    return row


def _samples(images, model, cfg, shape, steps):
    import jax
    import numpy as np

    labels = np.repeat(np.arange(10), cfg.samples_per_class)
    x, _ = images.generate(model, cfg, labels, cfg.eval_guidance, jax.random.key(cfg.seed + 7), steps=steps,
                           shape=shape)
    return x, labels


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--out", default="runs/bench_dit")
    p.add_argument("--meanflow", action="store_true", help="also train both as MeanFlow flow maps (2x steps)")
    a = p.parse_args(argv)
    rows = []
    for net in ("unet", "dit"):
        rows.append(run("digits_cfm", net, os.path.join(a.out, f"cfm_{net}"), [f"steps={a.steps}"]))
    if a.meanflow:
        for net in ("unet", "dit"):
            rows.append(run("digits_meanflow", net, os.path.join(a.out, f"meanflow_{net}"), [f"steps={2 * a.steps}"]))
    print("\n| objective | network | parameters | train steps/s | train img/s | sampler (NFE) | sampling img/s "
          "| accuracy | FD |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        extra = (f" (2 jumps: {r['accuracy_2_jumps']:.3f})" if "accuracy_2_jumps" in r else "",
                 f" (2 jumps: {r['fd_2_jumps']:.2f})" if "fd_2_jumps" in r else "")
        print(f"| {r['config']} | {r['network']} | {r['parameters']:,} | {r['train_steps_per_s']} | "
              f"{r['train_images_per_s']:,} | {r['sampler']} ({r['nfe']}) | {r['sampling_images_per_s']:,} | "
              f"{r['accuracy']:.3f}{extra[0]} | {r['fd']:.2f}{extra[1]} |")
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "dit_vs_unet.json"), "w") as fh:
        json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
