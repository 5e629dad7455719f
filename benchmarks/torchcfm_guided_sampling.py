"""Run with the peers' Python: classifier-free-guided Euler sampling with TorchCFM's UNetModelWrapper.

The same network as ``peer_torchcfm_unet.py`` (digits configuration) and the same guided sampler as
jaxgen's benchmark: per step ONE network call on the doubled batch ``[x, x]`` with labels ``[y, null]``,
then ``(1 - w) u_null + w u_y``. Sampling time does not depend on the weights, so the network is untrained.
Prints one line: ``guided euler-20 sampling of N: S s = R images/s``.
Usage: torchcfm_guided_sampling.py [N=256] [STEPS=20] [THREADS=2] [CHANNELS=32]
"""
import sys
import time

import torch
from torchcfm.models.unet.unet import UNetModelWrapper

n = int(sys.argv[1]) if len(sys.argv) > 1 else 256
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 20
torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 2)
ch = int(sys.argv[4]) if len(sys.argv) > 4 else 32
torch.manual_seed(0)
model = UNetModelWrapper(dim=(1, 8, 8), num_channels=ch, num_res_blocks=1, channel_mult=(1, 2),
                         class_cond=True, num_classes=11, attention_resolutions="4", dropout=0.1).eval()
w, null = 2.0, 10


def sample(n):
    x = torch.randn(n, 1, 8, 8)
    y = torch.arange(n) % 10
    yy = torch.cat([y, torch.full_like(y, null)])
    for i in range(steps):
        t = torch.full((2 * n,), i / steps)
        out = model(t, torch.cat([x, x]), yy)
        x = x + ((1 - w) * out[n:] + w * out[:n]) / steps
    return x


with torch.no_grad():
    sample(16)  # warm-up
    t0 = time.perf_counter()
    sample(n)
    dt = time.perf_counter() - t0
print(f"guided euler-{steps} sampling of {n}: {dt:.2f} s = {n / dt:.0f} images/s")
