"""Tests for jaxgen.couplings.ot: minibatch OT couplings against scipy's exact assignment."""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from jaxgen.couplings import (
    Coupling,
    ExactOT,
    IndependentCoupling,
    OnMesh,
    SinkhornOT,
    get_coupling,
    solve_assignment,
)

N = 32  # every jitted coupling below sees (N, 2) points, so each compiles once


@functools.cache
def jitted(coupling: Coupling):
    return jax.jit(coupling.indices)


def points(seed: int, n: int = N, d: int = 2):
    """Host (NumPy) test points, so that making them compiles nothing."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), (rng.normal(size=(n, d)) * 0.5 + 1.0).astype(np.float32)


def cost_np(x0, x1):
    x0, x1 = np.asarray(x0, np.float64), np.asarray(x1, np.float64)
    return np.sum((x0[:, None, :] - x1[None, :, :]) ** 2, -1)


def optimal_mean_cost(cost: np.ndarray) -> float:
    r, c = linear_sum_assignment(cost)
    return float(cost[r, c].mean())


def assert_permutation(i):
    assert sorted(np.asarray(i).tolist()) == list(range(len(i)))


EXACT, EXACT_BLOCKS = ExactOT(), ExactOT(blocks=4, warm_start=10)


def test_exact_ot_is_optimal():
    for seed in range(4):
        x0, x1 = points(seed)
        if seed == 3:  # points on a small integer grid: many ties in the cost
            x0, x1 = np.round(2 * x0), np.round(2 * x1)
        i, j = jitted(EXACT)(jax.random.key(seed), x0, x1)
        assert i.dtype == jnp.int32 and j.dtype == jnp.int32
        np.testing.assert_array_equal(j, np.arange(N))  # data order kept
        assert_permutation(i)
        c = cost_np(x0, x1)
        np.testing.assert_allclose(c[np.asarray(i), np.asarray(j)].mean(), optimal_mean_cost(c), rtol=1e-5)


def test_one_dimensional_exact_ot_is_sorting():
    x0, x1 = points(3)
    x0[:, 1] = x1[:, 1] = 0.0  # 1-D points (second coordinate 0), same compiled shape
    i = np.asarray(jitted(EXACT)(jax.random.key(0), x0, x1)[0])
    # monotone rearrangement: the k-th smallest data point takes the k-th smallest source point
    order0, order1 = np.argsort(np.asarray(x0[:, 0])), np.argsort(np.asarray(x1[:, 0]))
    np.testing.assert_array_equal(i[order1], order0)


def test_blocks_are_optimal_per_block_and_never_cross():
    for seed in (7, 8):  # warm-started by Sinkhorn duals: still exact
        x0, x1 = points(seed)
        i, j = np.asarray(jitted(EXACT_BLOCKS)(jax.random.key(0), x0, x1)[0]), np.arange(N)
        assert_permutation(i)
        np.testing.assert_array_equal(i // 8, j // 8)  # no pair crosses a block
        c = cost_np(x0, x1)
        for b in range(4):
            blk = slice(8 * b, 8 * b + 8)
            np.testing.assert_allclose(c[i[blk], j[blk]].mean(), optimal_mean_cost(c[blk, blk]), rtol=1e-5)


def test_hook_form_and_gradients():
    x0, x1 = points(0)
    i, j = IndependentCoupling().indices(jax.random.key(0), x0, x1)
    np.testing.assert_array_equal(i, np.arange(N))
    np.testing.assert_array_equal(j, np.arange(N))

    def loss(x):  # the coupling is under stop_gradient: differentiating through the hook only sees the gather
        a, b = EXACT(jax.random.key(0), x, x1)
        return jnp.sum(a), (a, b)

    (_, (a, b)), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(x0)
    np.testing.assert_array_equal(b, x1)
    i = np.asarray(jitted(EXACT)(jax.random.key(0), x0, x1)[0])
    np.testing.assert_array_equal(a, np.asarray(x0)[i])
    np.testing.assert_allclose(g, np.ones_like(x0))


def test_on_mesh_couples_each_shard():
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))  # the code path; 8 devices: the benchmark
    x0, x1 = points(0)
    both = jax.jit(lambda *a: [OnMesh(coupling=EXACT, mesh=mesh, per_device=p).indices(*a) for p in (True, False)])
    for i, j in both(jax.random.key(0), x0, x1):
        np.testing.assert_array_equal(i, jitted(EXACT)(jax.random.key(0), x0, x1)[0])
        np.testing.assert_array_equal(j, np.arange(N))
    with pytest.raises(ValueError, match="not an axis"):
        OnMesh(coupling=EXACT, mesh=mesh, axis="batch")


def test_sinkhorn_small_epsilon_approaches_exact():
    x0, x1 = points(11)
    c = cost_np(x0, x1)
    opt = optimal_mean_cost(c)
    for backend in ("kernel", "ott"):
        coupling = SinkhornOT(epsilon=0.002, max_iterations=1000, threshold=1e-5, sample="argmax", backend=backend)
        i, j = jitted(coupling)(jax.random.key(0), x0, x1)
        assert c[np.asarray(i), np.asarray(j)].mean() == pytest.approx(opt, rel=0.02)


def test_sinkhorn_samples():
    samples = ("without_replacement", "with_replacement", "conditional")
    x0, x1 = points(5)
    pairs = jax.jit(lambda *a: [SinkhornOT(sample=s).indices(*a) for s in samples])(jax.random.key(1), x0, x1)
    c = cost_np(x0, x1)
    for sample, (i, j) in zip(samples, pairs):
        i, j = np.asarray(i), np.asarray(j)
        assert i.shape == j.shape == (N,) and i.min() >= 0 and i.max() < N
        if sample == "without_replacement":
            assert len(set(zip(i.tolist(), j.tolist()))) == N  # distinct cells of the plan
        if sample == "conditional":
            np.testing.assert_array_equal(j, np.arange(N))
        assert c[i, j].mean() < 0.5 * (optimal_mean_cost(c) + np.diag(c).mean())  # nearer OT than independent


@pytest.mark.parametrize("coupling", [ExactOT(label_key="y"),
                                      SinkhornOT(label_key="y", sample="permutation", blocks=2, epsilon=0.01,
                                                 max_iterations=200)], ids=["exact", "sinkhorn-permutation-blocks"])
def test_class_conditional_pairs_share_the_class(coupling):
    x0, x1 = points(2)
    labels = np.random.default_rng(9).integers(0, 3, N).astype(np.int32)
    key = jax.random.key(4)
    (i, j), src = jax.jit(lambda *a: (coupling.indices(*a), coupling.source_labels(a[0], a[3])))(key, x0, x1, labels)
    i, j, src, lab = np.asarray(i), np.asarray(j), np.asarray(src), labels
    np.testing.assert_array_equal(src[i], lab[j])
    c = cost_np(x0, x1)
    if isinstance(coupling, SinkhornOT):  # a permutation within each block of 16
        np.testing.assert_array_equal(j, np.arange(N))
        assert_permutation(i)
        np.testing.assert_array_equal(i // 16, j // 16)
        best = 0.0
        for b in (slice(0, 16), slice(16, 32)):
            assert sorted(src[b].tolist()) == sorted(lab[b].tolist())
            for y in range(3):  # the class-conditional optimum of the block
                rows, cols = np.arange(N)[b][src[b] == y], np.arange(N)[b][lab[b] == y]
                best += optimal_mean_cost(c[np.ix_(rows, cols)]) * len(rows) / N if len(rows) else 0.0
        assert c[i, j].mean() < 1.1 * best
        return
    assert sorted(src.tolist()) == sorted(lab.tolist())  # a permutation of the data labels
    for y in range(3):  # optimal within each class
        rows, cols = np.flatnonzero(src == y), np.flatnonzero(lab == y)
        mine = c[i[lab[j] == y], j[lab[j] == y]].mean()
        np.testing.assert_allclose(mine, optimal_mean_cost(c[np.ix_(rows, cols)]), rtol=1e-5)


def test_get_coupling_parses_specs():
    assert get_coupling("independent") == IndependentCoupling()
    assert get_coupling(None) == IndependentCoupling()
    assert get_coupling("exact") == ExactOT()
    assert get_coupling("exact:blocks=4") == ExactOT(blocks=4)
    assert get_coupling("exact:label_key=y") == ExactOT(label_key="y")
    assert get_coupling("sinkhorn:epsilon=0.05, sample=argmax, relative_epsilon=false") == SinkhornOT(
        epsilon=0.05, sample="argmax", relative_epsilon=False)
    assert get_coupling("OT:blocks=2,warm_start=10") == ExactOT(blocks=2, warm_start=10)
    c = SinkhornOT(max_iterations=7)
    assert get_coupling(c) is c


@pytest.mark.parametrize("make, match", [
    (lambda: get_coupling("hungarian"), "unknown coupling"),
    (lambda: get_coupling("exact:blocks=four"), "bad value"),
    (lambda: get_coupling("exact:epsilon=0.1"), "bad option"),
    (lambda: get_coupling("sinkhorn:epsilon"), "bad option"),
    (lambda: SinkhornOT(epsilon=-0.1), "epsilon must be"),
    (lambda: SinkhornOT(epsilon=0.0), "epsilon must be"),
    (lambda: SinkhornOT(sample="top"), "unknown sample"),
    (lambda: SinkhornOT(max_iterations=0), "max_iterations"),
    (lambda: ExactOT(blocks=0), "blocks must be"),
    (lambda: ExactOT(label_key=3), "label_key"),
    (lambda: ExactOT(blocks=3).indices(jax.random.key(0), *points(0)), "divisible by blocks"),
    (lambda: ExactOT().indices(jax.random.key(0), jnp.zeros((4, 2)), jnp.zeros((5, 2))), "same leading size"),
    (lambda: ExactOT().indices(jax.random.key(0), jnp.zeros((4, 2)), jnp.zeros((4, 3))), "same size"),
    (lambda: ExactOT().indices(jax.random.key(0), jnp.full((4, 2), jnp.nan), jnp.zeros((4, 2))), "finite"),
    (lambda: ExactOT(label_key="y").indices(jax.random.key(0), *points(0)), "needs labels"),
    (lambda: ExactOT(label_key="y")(jax.random.key(0), *points(0)), "needs the data's labels"),
    (lambda: ExactOT().indices(jax.random.key(0), *points(0), labels=jnp.zeros((N,))), "labels must be integers"),
    (lambda: solve_assignment(jnp.zeros((3, 4))), "square"),
])
def test_bad_inputs_raise_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def _mesh_training_worker():
    """(8 fake devices) 20 OT-CFM training steps with the coupling per device and global under the data mesh, and on
    one device with ``blocks=8`` and with the whole batch: the per-chunk losses, printed as a REPORT line."""
    import json

    import optax
    from flax import nnx

    from jaxgen.data.toy2d import get_distribution
    from jaxgen.losses import flow_matching_loss
    from jaxgen.models import MLPField
    from jaxgen.training import Trainer, data_mesh

    source, target = get_distribution("8gaussians"), get_distribution("moons")
    mesh = data_mesh()

    def run(coupling, on_mesh):
        trainer = Trainer(MLPField(2, width=16, rngs=nnx.Rngs(0)), flow_matching_loss("linear", source=source,
                          coupling=coupling), optax.adam(1e-2), data=lambda k: target(k, 64),
                          mesh=mesh if on_mesh else None)
        return np.asarray(trainer.fit(trainer.init(0), 20, chunk=10, progress=False)[1]).tolist()

    out = {"device": run(OnMesh(coupling=ExactOT(), mesh=mesh), True), "blocks": run(ExactOT(blocks=8), False),
           "global": run(OnMesh(coupling=ExactOT(), mesh=mesh, per_device=False), True), "whole": run(ExactOT(), False)}
    print("REPORT " + json.dumps(out), flush=True)


@pytest.mark.slow
def test_training_with_the_coupling_per_device_and_global_on_eight_fake_devices():
    """Under the data mesh of 8 fake devices, OT-CFM with the per-device coupling (OnMesh, each device's shard in
    ``shard_map``) trains exactly as one device with ``ExactOT(blocks=8)``, and with the global coupling (the batch
    all-gathered) exactly as one device coupling the whole batch; the two scopes pair differently."""
    import json
    import os
    import subprocess

    env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8",
           "PYTHONPATH": os.pathsep.join(filter(None, [os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                      os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "mesh"], capture_output=True, text=True,
                          env=env, timeout=600, stdin=subprocess.DEVNULL)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    loss = {k: np.asarray(v) for k, v in json.loads(lines[-1][len("REPORT "):]).items()}
    assert loss["device"].shape == (20,)
    np.testing.assert_allclose(loss["device"], loss["blocks"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(loss["global"], loss["whole"], rtol=1e-4, atol=1e-5)
    assert np.abs(loss["device"] - loss["global"]).max() > 1e-3


if __name__ == "__main__" and sys.argv[1:] == ["mesh"]:
    _mesh_training_worker()
