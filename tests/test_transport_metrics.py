"""Tests for the transport metrics of jaxgen.metrics.transport: W2 on device, curvature, path length, transport cost."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from jaxgen import metrics

N = 64
w2_jit = jax.jit(metrics.wasserstein2, static_argnames=("method", "epsilon", "squared"))
curvature_jit = jax.jit(metrics.curvature, static_argnames=("per_sample",))


def points(seed: int, n: int = N):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, 2)).astype(np.float32), (rng.normal(size=(n, 2)) * 0.5 + 1.0).astype(np.float32)


def test_exact_w2_matches_scipy_and_is_a_metric():
    for seed in range(3):
        x, y = points(seed)
        np.testing.assert_allclose(w2_jit(x, y), metrics.wasserstein2_exact(x, y), rtol=1e-5)
    assert float(w2_jit(x, x)) == 0.0
    shift = np.array([3.0, -4.0], np.float32)
    np.testing.assert_allclose(w2_jit(x, x + shift), 5.0, rtol=1e-5)


def test_sinkhorn_divergence_w2():
    x, y = points(4)
    exact = metrics.wasserstein2_exact(x, y)
    shift = np.array([3.0, -4.0], np.float32)
    # translation: exactly |c| for any epsilon; same set: 0; small epsilon: close to exact
    np.testing.assert_allclose(w2_jit(x, x + shift, "sinkhorn", epsilon=0.01), 5.0, rtol=1e-3)
    assert float(w2_jit(x, x, "sinkhorn", epsilon=0.01)) < 1e-2
    np.testing.assert_allclose(w2_jit(x, y, "sinkhorn", epsilon=0.01), exact, rtol=0.03)


def test_straight_paths():
    x0, x1 = points(1, 16)
    ts = np.linspace(0.0, 1.0, 9, dtype=np.float32)
    traj = x0[None] + (ts**2)[:, None, None] * (x1 - x0)[None]  # straight, at varying speed
    np.testing.assert_allclose(curvature_jit(traj, ts), 0.0, atol=1e-5)
    d2 = np.sum((x1 - x0) ** 2, -1)
    np.testing.assert_allclose(metrics.transport_cost(traj), d2.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics.transport_cost(x0, x1, per_sample=True), d2, rtol=1e-5)
    np.testing.assert_allclose(metrics.path_length(traj), np.sqrt(d2).mean(), rtol=1e-5)


def test_circular_arc_has_the_analytic_curvature():
    k, radius = 64, np.array([1.0, 2.5], np.float32)
    for theta in (np.pi / 2, np.pi):
        phi = np.linspace(0.0, theta, k + 1, dtype=np.float32)
        traj = np.stack([np.cos(phi)[:, None] * radius, np.sin(phi)[:, None] * radius], -1)  # (K + 1, 2, 2)
        polygon = k * np.sin(theta / (2 * k)) / np.sin(theta / 2) - 1  # the K-segment inscribed polygon
        np.testing.assert_allclose(curvature_jit(traj, per_sample=True), [polygon, polygon], rtol=1e-4)
        np.testing.assert_allclose(polygon, theta / (2 * np.sin(theta / 2)) - 1, rtol=1e-3)  # the arc itself
        np.testing.assert_allclose(metrics.path_length(traj, per_sample=True),
                                   2 * k * radius * np.sin(theta / (2 * k)), rtol=1e-5)
    loop = np.concatenate([traj, traj[::-1]])  # there and back: zero chord
    assert np.isinf(curvature_jit(loop, per_sample=True)).all()
    assert float(metrics.curvature(np.zeros((3, 2, 2)))) == 0.0  # never moves


def test_transport_cost_of_an_optimal_pairing_is_w2_squared():
    x0, x1 = points(2)
    i, j = linear_sum_assignment(np.sum((x0[:, None] - x1[None]) ** 2, -1))  # the host's optimal pairing
    ot_cost = metrics.transport_cost(x0[i], x1[j])
    np.testing.assert_allclose(ot_cost, w2_jit(x0, x1) ** 2, rtol=1e-5)
    assert float(metrics.transport_cost(x0, x1)) > 1.1 * float(ot_cost)  # the independent pairing is not OT


@pytest.mark.parametrize("call, match", [
    (lambda: metrics.wasserstein2(np.zeros((4, 2)), np.zeros((5, 2))), "same number of samples"),
    (lambda: metrics.wasserstein2(np.zeros((4, 2)), np.zeros((4, 2)), "emd"), "unknown method"),
    (lambda: metrics.wasserstein2(np.zeros((4, 2)), np.zeros((4, 2)), "sinkhorn", epsilon=-1.0), "epsilon"),
    (lambda: metrics.curvature(np.zeros((1, 4, 2))), "K \\+ 1 >= 2"),
    (lambda: metrics.curvature(np.zeros((3, 4, 2)), np.zeros(4)), "ts must have shape"),
    (lambda: metrics.transport_cost(np.zeros((4, 2)), np.zeros((5, 2))), "same shape"),
])
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()
