"""Digits U-Net side by side: TorchCFM's UNetModelWrapper recipe vs jaxgen's UNetField + Trainer, one run.

Both: 1x8x8 digits in [-1, 1], channels 32, channel_mult (1, 2), one residual block per level, attention
at 4x4, dropout 0.1, 10 classes + null, label dropout 0.1, Adam 2e-4, batch 128, CondOT flow matching.
Prints training steps/s and images/s, and Euler-20 sampling images/s of 256 images, both conditional (one
network call per step, TorchCFM's own script) and classifier-free guided (one call on the doubled batch per
step; TorchCFM's side is ``torchcfm_guided_sampling.py``, the same sampler written for its network).
jaxgen trains with its defaults (all steps fused in one XLA program, data sampled inside) and samples
inside ``jax.jit`` with the field evaluated in chunks of 128 (``jaxgen.fields.chunked_field``); the
unchunked figure is printed too.

Usage: python benchmarks/bench_digits_unet.py [--steps 40] [--threads 2] [--peers-python PATH] [--no-peers]
Targets (issue 11): >= 1x TorchCFM's training images/s and its conditional and guided sampling images/s.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_toy2d import PEERS, _peer_python  # noqa: E402


def run_peer(py, steps, threads):
    out = subprocess.run([py, os.path.join(PEERS, "peer_torchcfm_unet.py"), str(steps), "128", str(threads), "32"],
                         capture_output=True, text=True, timeout=1800)
    text = out.stdout + out.stderr
    tr = re.search(r"\(([\d.]+)M params.*train: ([\d.]+) steps/s = (\d+) images/s", text)
    sm = re.search(r"sampling of \d+: [\d.]+ s = (\d+) images/s", text)
    if tr is None:
        print(f"[bench] TorchCFM U-Net failed:\n{text[-2000:]}")
        return None
    out = subprocess.run([py, os.path.join(HERE, "torchcfm_guided_sampling.py"), "256", "20", str(threads), "32"],
                         capture_output=True, text=True, timeout=1800)
    gm = re.search(r"sampling of \d+: [\d.]+ s = (\d+) images/s", out.stdout)
    if gm is None:
        print(f"[bench] TorchCFM guided sampling failed:\n{(out.stdout + out.stderr)[-2000:]}")
    nan = float("nan")
    return {"params_M": float(tr.group(1)), "steps_per_s": float(tr.group(2)), "images_per_s": float(tr.group(3)),
            "cond_sampling": float(sm.group(1)) if sm else nan, "guided_sampling": float(gm.group(1)) if gm else nan}


def run_jax(steps):
    import jax
    import optax
    from flax import nnx

    from jaxgen.data.images import device_sampler, load_digits
    from jaxgen.fields import chunked_field, guided_field
    from jaxgen.losses import flow_matching_loss
    from jaxgen.models import UNetField
    from jaxgen.samplers import Euler, sample
    from jaxgen.training import Trainer

    data = load_digits("all")
    model = UNetField(1, channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                      dropout=0.1, num_classes=10, image_size=8, rngs=nnx.Rngs(0))
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    tr = Trainer(model, flow_matching_loss("linear", label_dropout=0.1, null_label=10), optax.adam(2e-4),
                 data=device_sampler(data, 128))
    state = tr.init(0)
    state, l = tr.steps(state, steps)
    jax.block_until_ready(l)
    t0 = time.perf_counter()
    state, l = tr.steps(state, steps)
    jax.block_until_ready(l)
    sps = steps / (time.perf_counter() - t0)

    m = tr.model(state)
    m.eval()
    labels = jax.numpy.arange(256) % 10

    def sampler(guided, chunk):
        @jax.jit
        def draw(m, key):
            x0 = jax.random.normal(key, (256, 8, 8, 1))
            f = chunked_field(m, chunk) if chunk else m
            f = guided_field(f, 2.0, null_label=10) if guided else f
            return sample(f, x0, Euler(), steps=20, cond={"y": labels}).x

        jax.block_until_ready(draw(m, jax.random.key(0)))
        t0 = time.perf_counter()
        jax.block_until_ready(draw(m, jax.random.key(1)))
        return 256 / (time.perf_counter() - t0)

    return {"params_M": n_params / 1e6, "steps_per_s": sps, "images_per_s": sps * 128,
            "cond_sampling": sampler(False, 128), "guided_sampling": sampler(True, 128),
            "guided_unchunked": sampler(True, 0)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--peers-python", default=None)
    p.add_argument("--no-peers", action="store_true")
    a = p.parse_args(argv)
    peer = None if a.no_peers else run_peer(_peer_python(a.peers_python) or sys.exit("peers unavailable"), a.steps,
                                            a.threads)
    jx = run_jax(a.steps)
    print("\n=== digits U-Net, batch 128, Euler-20 sampling of 256 (same CPU, same run) ===")
    print(f"{'':10s} {'params(M)':>10s} {'steps/s':>8s} {'train img/s':>12s} {'cond. sampling img/s':>21s} "
          f"{'guided sampling img/s':>22s}")
    for name, r in (("torchcfm", peer), ("jaxgen", jx)):
        if r:
            print(f"{name:10s} {r['params_M']:10.3f} {r['steps_per_s']:8.2f} {r['images_per_s']:12.0f} "
                  f"{r['cond_sampling']:21.0f} {r['guided_sampling']:22.0f}")
    print(f"jaxgen guided sampling without chunking: {jx['guided_unchunked']:.0f} img/s")
    if peer:
        print(f"ratios jaxgen/torchcfm: training images/s {jx['images_per_s'] / peer['images_per_s']:.2f}x "
              f"(target >= 1x), conditional sampling {jx['cond_sampling'] / peer['cond_sampling']:.2f}x, "
              f"guided sampling {jx['guided_sampling'] / peer['guided_sampling']:.2f}x (target >= 1x)")


if __name__ == "__main__":
    main()
