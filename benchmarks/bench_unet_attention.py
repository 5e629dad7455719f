"""The U-Net's attention (``jax.nn.dot_product_attention``) against the two einsums it replaced, in one
run: fused training steps/s and Euler-20 sampling images/s of :class:`jaxgen.models.UNetField`, for the digits
configuration of the main job and a CIFAR-sized one. The two forms alternate, 3 rounds each; medians and every round
are printed.

Usage: python benchmarks/bench_unet_attention.py [digits] [cifar]
"""
import sys
import time
import numpy as np
import jax, jax.numpy as jnp, optax
from flax import nnx
from jaxgen.models import unet as U
from jaxgen.models import UNetField
from jaxgen.losses import flow_matching_loss
from jaxgen.training import Trainer
from jaxgen.samplers import Euler, sample

orig = U.AttentionBlock.__call__  # jax.nn.dot_product_attention


def einsum_call(self, x, emb=None):
    """The attention the U-Net used before: two einsums, softmax in float32."""
    b, hh, ww, c = x.shape
    n, nh = hh * ww, self.num_heads
    d = c // nh
    qkv = self.qkv(self.norm(x).reshape(b, n, c))
    q, k, v = qkv[..., :c] * (1.0 / np.sqrt(d)), qkv[..., c:2 * c], qkv[..., 2 * c:]
    softmax = lambda z: jax.nn.softmax(z.astype(jnp.float32), axis=-1).astype(v.dtype)
    if nh == 1:
        a = jnp.einsum("bqk,bkd->bqd", softmax(jnp.einsum("bqd,bkd->bqk", q, k)), v)
    else:
        q, k, v = (z.reshape(b, n, nh, d) for z in (q, k, v))
        a = jnp.einsum("bhqk,bkhd->bqhd", softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k)), v).reshape(b, n, c)
    return x + self.proj(a).reshape(b, hh, ww, c)

FORMS = {"einsum": einsum_call, "dot_product_attention": orig}

def setup(kind):
    if kind == "digits":
        shape, kw, batch = (8, 8, 1), dict(channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,), num_heads=1, dropout=0.1), 128
    else:
        shape, kw, batch = (32, 32, 3), dict(channels=64, channel_mult=(1, 2, 2), num_res_blocks=1, attention_resolutions=(16, 8), num_heads=4, dropout=0.1), 32
    return shape, kw, batch

def run(kind, form, steps):
    U.AttentionBlock.__call__ = FORMS[form]
    shape, kw, batch = setup(kind)
    model = UNetField(shape[-1], image_size=shape[0], num_classes=10, rngs=nnx.Rngs(0), **kw)
    data = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (batch,) + shape), jnp.float32)
    labels = jnp.arange(batch) % 10
    tr = Trainer(model, flow_matching_loss("linear"), optax.adam(1e-4), data=lambda key: {"x": data, "y": labels})
    st = tr.init(0)
    st, l = tr.steps(st, steps); jax.block_until_ready(l)
    t = time.perf_counter(); st, l = tr.steps(st, steps); jax.block_until_ready(l); train = steps / (time.perf_counter() - t)
    m = tr.model(st); m.eval()
    x0 = jax.random.normal(jax.random.key(1), (batch,) + shape)
    f = jax.jit(lambda x, y: sample(m, x, Euler(), steps=20, cond={"y": y}).x)
    jax.block_until_ready(f(x0, labels))
    t = time.perf_counter(); jax.block_until_ready(f(x0, labels)); samp = batch / (time.perf_counter() - t)
    U.AttentionBlock.__call__ = orig
    return train, samp

kinds = sys.argv[1:] or ["digits", "cifar"]
for kind in kinds:
    steps = 20 if kind == "digits" else 5
    res = {f: [] for f in FORMS}
    for r in range(3):
        for f in FORMS:
            res[f].append(run(kind, f, steps))
    for f, v in res.items():
        v = np.array(v)
        print(f"{kind:7s} {f:22s} train steps/s {np.median(v[:,0]):7.2f}  ({', '.join(f'{a:.2f}' for a in v[:,0])})   sampling img/s {np.median(v[:,1]):8.1f} ({', '.join(f'{a:.1f}' for a in v[:,1])})", flush=True)
