"""Make the PyTorch fixture of tests/test_inception.py (run once with torch; the tests only read its outputs).

    /path/to/python-with-torch tests/data/make_inception_fixture.py [--full-check DIR]

Writes, next to this file:

* ``tiny_fid_inception.pth``: the state dict of a tiny random FID Inception-v3 (width 1/32, 10 classes) with the key
  names and structure of pytorch-fid's network, in ``torch.save``'s legacy format (``_use_new_zipfile_serialization=
  False``, 200 KB; the zip format costs another ~100 KB of per-entry overhead for its 566 tensors);
* ``small_state_dict.pth`` (zip format) and ``small_state_dict_legacy.pth`` (legacy format): a few tensors of several
  dtypes, including views that share a storage with an offset and non-contiguous strides, to test both readers;
* ``tiny_fid_inception_outputs.npz``: input images (NHWC, in [0, 1]) and that network's pool features, logits and
  unbiased logits (images resized to 75 x 75 as pytorch-fid resizes to 299, then ``2 x - 1``), and bilinear resizes
  of small images by ``F.interpolate(..., mode="bilinear", align_corners=False)``;
* ``fid_inception_keys.json``: every key of pytorch-fid's real ``FIDInceptionV3`` state dict with its shape.

pytorch-fid's ``FIDInceptionA/C/E`` subclass torchvision's blocks, whose channel counts are fixed, so the tiny
network is a twin written here: the same modules, names and forward passes, with every channel count ``c`` scaled to
``max(1, floor(c * width + 1/2))``. At width 1 the twin is checked against pytorch-fid itself (requires
``pip install pytorch-fid``): the same state-dict keys and shapes (a strict ``load_state_dict``) and the same pool
features on random images. ``--full-check DIR`` also saves a width-1 random twin (``.pth``, zip format) with its
outputs on 299 x 299 inputs, to check the JAX network at full size by hand.
"""

import argparse
import json
import math
import pathlib
from collections import OrderedDict

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = pathlib.Path(__file__).resolve().parent
WIDTH, NUM_CLASSES, SIZE = 1 / 32, 10, 75


def ch(c, width):
    return max(1, int(math.floor(c * width + 0.5)))


class BasicConv2d(nn.Module):
    def __init__(self, cin, cout, **kw):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kw)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg_valid(x):
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class A(nn.Module):
    def __init__(self, cin, pool, w):
        super().__init__()
        c = lambda n: ch(n, w)
        self.branch1x1 = BasicConv2d(cin, c(64), kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, c(48), kernel_size=1)
        self.branch5x5_2 = BasicConv2d(c(48), c(64), kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, c(64), kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(c(64), c(96), kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(c(96), c(96), kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, c(pool), kernel_size=1)
        self.out = c(64) + c(64) + c(96) + c(pool)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(avg_valid(x))], 1)


class B(nn.Module):
    def __init__(self, cin, w):
        super().__init__()
        c = lambda n: ch(n, w)
        self.branch3x3 = BasicConv2d(cin, c(384), kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, c(64), kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(c(64), c(96), kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(c(96), c(96), kernel_size=3, stride=2)
        self.out = c(384) + c(96) + cin

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class C(nn.Module):
    def __init__(self, cin, c7, w):
        super().__init__()
        c = lambda n: ch(n, w)
        c7 = c(c7)
        self.branch1x1 = BasicConv2d(cin, c(192), kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, c(192), kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, c(192), kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, c(192), kernel_size=1)
        self.out = 4 * c(192)

    def forward(self, x):
        d = x
        for i in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{i}")(d)
        return torch.cat([self.branch1x1(x), self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))), d,
                          self.branch_pool(avg_valid(x))], 1)


class D(nn.Module):
    def __init__(self, cin, w):
        super().__init__()
        c = lambda n: ch(n, w)
        self.branch3x3_1 = BasicConv2d(cin, c(192), kernel_size=1)
        self.branch3x3_2 = BasicConv2d(c(192), c(320), kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, c(192), kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(c(192), c(192), kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(c(192), c(192), kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(c(192), c(192), kernel_size=3, stride=2)
        self.out = c(320) + c(192) + cin

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class E(nn.Module):
    def __init__(self, cin, w, max_pool):
        super().__init__()
        c = lambda n: ch(n, w)
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, c(320), kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, c(384), kernel_size=1)
        self.branch3x3_2a = BasicConv2d(c(384), c(384), kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(c(384), c(384), kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, c(448), kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(c(448), c(384), kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(c(384), c(384), kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(c(384), c(384), kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, c(192), kernel_size=1)
        self.out = c(320) + 4 * c(384) + c(192)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else avg_valid(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(b3), self.branch3x3_2b(b3), self.branch3x3dbl_3a(d),
                          self.branch3x3dbl_3b(d), self.branch_pool(pool)], 1)


class TwinFIDInception(nn.Module):
    """pytorch-fid's FID Inception-v3 (fid_inception_v3 + the InceptionV3 wrapper's forward), width-scaled."""

    def __init__(self, width=1.0, num_classes=1008):
        super().__init__()
        c = lambda n: ch(n, width)
        self.Conv2d_1a_3x3 = BasicConv2d(3, c(32), kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(c(32), c(32), kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(c(32), c(64), kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(c(64), c(80), kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(c(80), c(192), kernel_size=3)
        self.Mixed_5b = A(c(192), 32, width)
        self.Mixed_5c = A(self.Mixed_5b.out, 64, width)
        self.Mixed_5d = A(self.Mixed_5c.out, 64, width)
        self.Mixed_6a = B(self.Mixed_5d.out, width)
        self.Mixed_6b = C(self.Mixed_6a.out, 128, width)
        self.Mixed_6c = C(self.Mixed_6b.out, 160, width)
        self.Mixed_6d = C(self.Mixed_6c.out, 160, width)
        self.Mixed_6e = C(self.Mixed_6d.out, 192, width)
        self.Mixed_7a = D(self.Mixed_6e.out, width)
        self.Mixed_7b = E(self.Mixed_7a.out, width, max_pool=False)
        self.Mixed_7c = E(self.Mixed_7b.out, width, max_pool=True)
        self.fc = nn.Linear(self.Mixed_7c.out, num_classes)

    def forward(self, x01, size=299):
        """Images NCHW in [0, 1] -> (pool features, logits), as pytorch-fid's InceptionV3 (resize, 2x - 1)."""
        x = F.interpolate(x01, size=(size, size), mode="bilinear", align_corners=False)
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        f = F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)
        return f, self.fc(f)


def randomise(net, size, gen):
    """Random weights with batch-norm statistics calibrated on random images (so activations stay O(1)), then random
    affine batch-norm parameters."""
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average
    net.train()
    with torch.no_grad():
        for _ in range(4):
            net(torch.rand(8, 3, 32, 32, generator=gen), size)
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0.0, 0.2, generator=gen)
                m.running_var.mul_(torch.empty_like(m.running_var).uniform_(0.8, 1.25, generator=gen))
            if isinstance(m, nn.Linear):
                m.bias.normal_(0.0, 0.5, generator=gen)
    net.eval()
    return net


def check_against_pytorch_fid(gen):
    """At width 1 the twin has pytorch-fid's keys and shapes, and computes its pool features."""
    import pytorch_fid.inception as pfi

    twin = randomise(TwinFIDInception(1.0, 1008), 299, gen)
    pfi.load_state_dict_from_url = lambda *a, **k: twin.state_dict()  # nothing is downloaded
    real = pfi.InceptionV3([3]).eval()  # strict load_state_dict: raises on any key or shape mismatch
    inception = pfi.fid_inception_v3()
    keys = {k: list(v.shape) for k, v in inception.state_dict().items()}
    assert keys == {k: list(v.shape) for k, v in twin.state_dict().items()}
    x = torch.rand(2, 3, 40, 40, generator=gen)
    with torch.no_grad():
        ours, _ = twin(x)
        theirs = real(x)[0].flatten(1)
    err = (ours - theirs).abs().max().item() / theirs.abs().max().item()
    print(f"width 1 twin vs pytorch-fid: {len(keys)} keys match, pool features max rel. error {err:.2e}")
    assert err < 1e-5
    return keys, twin


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--full-check", type=pathlib.Path, default=None)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    keys, full = check_against_pytorch_fid(gen)
    (HERE / "fid_inception_keys.json").write_text(json.dumps(keys, separators=(",", ":")) + "\n")

    net = randomise(TwinFIDInception(WIDTH, NUM_CLASSES), SIZE, gen)
    sd = net.state_dict()
    torch.save(sd, HERE / "tiny_fid_inception.pth", _use_new_zipfile_serialization=False)
    a = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    small = OrderedDict(a=a, a_t=a.t(), a_row=a[1], n=torch.tensor(7), h=torch.tensor([0.5, -2.0], dtype=torch.float16),
                        b=torch.tensor([True, False]), i=torch.arange(-3, 3, dtype=torch.int32).reshape(2, 3)[:, ::2])
    torch.save(small, HERE / "small_state_dict.pth")
    torch.save(small, HERE / "small_state_dict_legacy.pth", _use_new_zipfile_serialization=False)
    images = torch.rand(3, 3, 20, 20, generator=gen)
    small = torch.rand(2, 3, 6, 9, generator=gen)
    large = torch.rand(1, 3, 40, 33, generator=gen)
    with torch.no_grad():
        feats, logits = net(images, SIZE)
        out = dict(
            images=images.permute(0, 2, 3, 1).numpy(), features=feats.numpy(), logits=logits.numpy(),
            logits_unbiased=(logits - net.fc.bias).numpy(),
            resize_small=small.permute(0, 2, 3, 1).numpy(),
            resize_small_11=F.interpolate(small, size=(11, 11), mode="bilinear", align_corners=False)
            .permute(0, 2, 3, 1).numpy(),
            resize_large=large.permute(0, 2, 3, 1).numpy(),
            resize_large_11=F.interpolate(large, size=(11, 11), mode="bilinear", align_corners=False)
            .permute(0, 2, 3, 1).numpy())
    np.savez(HERE / "tiny_fid_inception_outputs.npz", **{k: v.astype(np.float32) for k, v in out.items()})
    print("tiny features", feats.shape, "std", feats.std().item(), "logits std", logits.std().item())
    if args.full_check is not None:
        args.full_check.mkdir(parents=True, exist_ok=True)
        torch.save(full.state_dict(), args.full_check / "full_random_twin.pth")
        x = torch.rand(2, 3, 32, 32, generator=gen)
        with torch.no_grad():
            f, lg = full(x)
        np.savez(args.full_check / "full_random_twin_outputs.npz", images=x.permute(0, 2, 3, 1).numpy(),
                 features=f.numpy(), logits=lg.numpy())
    for p in sorted(HERE.glob("*")):
        print(p.name, p.stat().st_size)


if __name__ == "__main__":
    main()
