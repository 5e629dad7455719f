"""TorchCFM's own I-CFM, OT-CFM, SB-CFM and target CFM on its 2-D recipe, for benchmarks/bench_cfm_variants.py.

Runs in the peers' environment (``../shared/peers/setup.sh``), not in jaxgen's. Recipe of TorchCFM's 2-D examples: MLP
of width 64 (SELU, ``time_varying=True``), batch 256, Adam 1e-3, no EMA. Prints one JSON line with the training
steps/s and writes the Euler samples (1 step and 100 steps, with the 100-step trajectory) to ``--out`` (.npz); the
metrics are computed by the caller, on both libraries' samples with the same code.

    python peer_torchcfm_variants.py --method ot --task 8gaussians_to_moons --steps 5000 --out /tmp/ot.npz
"""

import argparse
import json
import time

import numpy as np
import torch
from torchcfm.conditional_flow_matching import (ConditionalFlowMatcher, ExactOptimalTransportConditionalFlowMatcher,
                                                SchrodingerBridgeConditionalFlowMatcher, TargetConditionalFlowMatcher)
from torchcfm.models.models import MLP
from torchcfm.utils import sample_8gaussians

p = argparse.ArgumentParser()
p.add_argument("--method", choices=["i", "ot", "sb", "target"], required=True)
p.add_argument("--task", choices=["8gaussians_to_moons", "gaussian_to_8gaussians"], required=True)
p.add_argument("--steps", type=int, default=5000)
p.add_argument("--sigma", type=float, default=0.0, help="SB-CFM's sigma or target CFM's sigma_min")
p.add_argument("--threads", type=int, default=2)
p.add_argument("--seed", type=int, default=0)
p.add_argument("--num", type=int, default=2048)
p.add_argument("--out", required=True)
a = p.parse_args()

torch.manual_seed(a.seed)
np.random.seed(a.seed)
torch.set_num_threads(a.threads)


def sample_moons(n):
    """The moons both libraries train on and are scored against: jaxgen's ``moons`` (scikit-learn's ``make_moons``
    geometry, a uniform angle on a moon chosen by a fair coin, Gaussian noise of std 0.2, then ``* 3 - 1``).
    ``torchcfm.utils.sample_moons`` is another distribution: torchdyn's ``generate_moons`` places evenly spaced
    points and shifts each along the diagonal by ``U[0, 0.2)``, so scoring it against these moons would charge
    TorchCFM for the difference of targets."""
    angle = np.random.uniform(0.0, np.pi, n)
    outer = (np.random.rand(n) < 0.5)[:, None]
    x = np.where(outer, np.stack([np.cos(angle), np.sin(angle)], -1),
                 np.stack([1.0 - np.cos(angle), 0.5 - np.sin(angle)], -1))
    x = x + 0.2 * np.random.randn(n, 2)
    return torch.from_numpy((x * 3.0 - 1.0).astype(np.float32))


if a.task == "8gaussians_to_moons":
    source, target = sample_8gaussians, sample_moons
else:
    source, target = (lambda n: torch.randn(n, 2)), sample_8gaussians
fm = {"i": lambda: ConditionalFlowMatcher(sigma=a.sigma),
      "ot": lambda: ExactOptimalTransportConditionalFlowMatcher(sigma=a.sigma),
      "sb": lambda: SchrodingerBridgeConditionalFlowMatcher(sigma=a.sigma, ot_method="exact"),
      "target": lambda: TargetConditionalFlowMatcher(sigma=a.sigma)}[a.method]()
model = MLP(dim=2, w=64, time_varying=True)
opt = torch.optim.Adam(model.parameters(), 1e-3)
bs = 256


def step():
    opt.zero_grad()
    x0, x1 = source(bs), target(bs)
    t, xt, ut = fm.sample_location_and_conditional_flow(x0, x1)
    loss = torch.mean((model(torch.cat([xt, t[:, None]], -1)) - ut) ** 2)
    loss.backward()
    opt.step()
    return loss


for _ in range(50):
    step()
start = time.perf_counter()
for _ in range(a.steps):
    loss = step()
seconds = time.perf_counter() - start


@torch.no_grad()
def euler(x, n):
    traj = [x]
    for k in range(n):
        t = torch.full((x.shape[0], 1), k / n)
        x = x + model(torch.cat([x, t], -1)) / n
        traj.append(x)
    return torch.stack(traj)


x0 = source(a.num)
traj = euler(x0, 100)
one = euler(x0, 1)[-1]
np.savez(a.out, x0=x0.numpy(), euler1=one.numpy(), euler100=traj[-1].numpy(), trajectory=traj.numpy())
print(json.dumps({"steps_per_second": a.steps / seconds, "final_loss": loss.item(), "steps": a.steps}))
