"""Differentiable sampling: gradients through the samplers against central finite differences in float64.

For Euler, Heun, DPM-Solver++(2M) (a data prediction on the linear path), the adaptive diffrax Tsit5 (with each
``gradient`` mode) and Euler-Maruyama (fixed key), the derivative of a scalar function of the sample with respect
to (a) the network's parameters, (b) the initial noise ``x0``, (c) the guidance scale of a classifier-free guided
field (:func:`jaxgen.fields.guided_field`) and (d) the time grid (``ts = cumsum(softmax(theta))``, or ``t0``/``t1``
of an adaptive solve) matches central differences along a random direction to 1e-3 relative error; and
``gradient="checkpoint"`` gives the values and gradients of ``"full"``.

The module runs under ``jax.enable_x64(True)`` (a module-scoped fixture: other test modules stay in float32); every
array is built inside the tests.
"""

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from jaxgen.fields import guided_field
from jaxgen.samplers import DPMSolverPP, Diffrax, Euler, EulerMaruyama, Heun, sample
from jaxgen.samplers.base import checkpointed_scan

N = 13        # steps: with gradient="checkpoint", 3 blocks of 4 steps and a tail of 1
BATCH = 4
EPS = 1e-5    # central differences in float64: truncation ~EPS^2, round-off ~1e-16 / EPS
RTOL = 1e-3


@pytest.fixture(scope="module", autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def net(params, x, t, y):
    """A tiny conditional network: ``tanh(x W) (1 - t/2) + b_y (1/2 + t)``; class 2 is the null label."""
    tt = t[:, None]
    return jnp.tanh(x @ params["W"]) * (1.0 - 0.5 * tt) + params["b"][y] * (0.5 + tt)


def grid_from(theta, t0=0.0, t1=1.0):
    """A monotone grid from ``t0`` to ``t1`` with ``len(theta)`` steps: ``t0 + (t1 - t0) cumsum(softmax(theta))``
    (normalised so that the last time is ``t1`` exactly)."""
    c = jnp.cumsum(jax.nn.softmax(theta))
    return t0 + (t1 - t0) * jnp.concatenate([jnp.zeros((1,), c.dtype), c / c[-1]])


def adaptive_interval(theta):
    return {"t0": 0.05 * jax.nn.sigmoid(theta[0]), "t1": 0.95 + 0.05 * jax.nn.sigmoid(theta[1])}


# name -> (solver, sample() keywords, the time keywords from theta, len(theta))
CASES = {
    "euler": (Euler(), {}, lambda th: {"ts": grid_from(th)}, N),
    "heun": (Heun(), {}, lambda th: {"ts": grid_from(th)}, N),
    "dpm_solver_pp": (DPMSolverPP(), {"path": "linear", "prediction": "data"},
                      lambda th: {"ts": grid_from(th, 1e-3, 1.0 - 1e-3)}, N),
    "euler_maruyama": (EulerMaruyama(), {"path": "linear", "key": None}, lambda th: {"ts": grid_from(th)}, N),
    "tsit5": (Diffrax(rtol=1e-10, atol=1e-10), {}, adaptive_interval, 2),
}


def params_for(n_theta):
    k = jax.random.split(jax.random.key(0), 4)
    return {"net": {"W": 0.8 * jax.random.normal(k[0], (2, 2)), "b": jax.random.normal(k[1], (3, 2))},
            "x0": jax.random.normal(k[2], (BATCH, 2)),
            "scale": jnp.asarray(1.7),
            "theta": 0.3 * jax.random.normal(k[3], (n_theta,))}


def loss_fn(case, gradient=None):
    solver, kwargs, times, _ = CASES[case]
    kwargs = dict(kwargs)
    if "key" in kwargs:
        kwargs["key"] = jax.random.key(7)  # fixed noise: the sample is a smooth function of the parameters
    labels = jnp.array([0, 1, 1, 0])
    weights = jnp.linspace(-1.0, 1.0, 2 * BATCH).reshape(BATCH, 2)

    def loss(p):
        field = guided_field(lambda x, t, y: net(p["net"], x, t, y), p["scale"], null_label=2)
        x1 = sample(field, p["x0"], solver, cond={"y": labels}, gradient=gradient, **times(p["theta"]),
                    **kwargs).x
        return jnp.sum(jnp.sin(x1) * weights)

    return loss


def check_against_differences(case, modes):
    """Directional derivatives along a random direction per group, from ``jax.grad`` with each ``gradient`` mode and
    from central differences (the 2 x 4 shifted losses evaluated by ``vmap``), all in one compiled program;
    ``"checkpoint"`` must also give the values and gradients of ``"full"``."""
    p = params_for(CASES[case][3])
    keys = iter(jax.random.split(jax.random.key(1), 8))
    directions = {g: jax.tree.map(lambda a: jax.random.normal(next(keys), a.shape, a.dtype), p[g]) for g in p}
    shift = lambda p, g, s: {**p, g: jax.tree.map(lambda a, d: a + s * EPS * d, p[g], directions[g])}

    @jax.jit
    def program(p):
        shifted = [shift(p, g, s) for g in sorted(p) for s in (1.0, -1.0)]
        values = jax.vmap(loss_fn(case))(jax.tree.map(lambda *a: jnp.stack(a), *shifted))
        return {m: jax.value_and_grad(loss_fn(case, m))(p) for m in modes}, values

    results, values = program(p)
    for k, g in enumerate(sorted(p)):
        fd = float(values[2 * k] - values[2 * k + 1]) / (2 * EPS)
        assert abs(fd) > 1e-5, (case, g, fd)  # a direction the loss depends on
        for mode, (_, grads) in results.items():
            ad = sum(float(jnp.vdot(a, d)) for a, d in zip(jax.tree.leaves(grads[g]), jax.tree.leaves(directions[g])))
            assert abs(ad - fd) <= RTOL * abs(fd), (case, mode, g, ad, fd)
    if "full" in modes and "checkpoint" in modes:
        for a, b in zip(jax.tree.leaves(results["full"]), jax.tree.leaves(results["checkpoint"])):
            np.testing.assert_allclose(b, a, rtol=1e-13, atol=1e-15)


def _case(case, modes, slow=False):
    return pytest.param(case, modes, id=f"{case}-{'+'.join(modes)}", marks=[pytest.mark.slow] if slow else [])


@pytest.mark.parametrize("case,modes", [
    _case("euler", ("full", "checkpoint")), _case("heun", ("full",)),
    _case("heun", ("full", "checkpoint"), slow=True), _case("dpm_solver_pp", ("full", "checkpoint"), slow=True),
    _case("euler_maruyama", ("full", "checkpoint"), slow=True),
    _case("tsit5", ("full", "checkpoint", "adjoint"), slow=True),
])
def test_gradients_match_differences(case, modes):
    check_against_differences(case, modes)


def test_checkpointed_scan_keeps_outputs_in_order():
    f = lambda c, x: (c + x, c * x)
    for n in (2, 10):  # a plain scan; 3 blocks of 3 steps and a tail of 1
        xs = jnp.arange(n, dtype=jnp.float64)
        c0, ys0 = jax.lax.scan(f, 1.0, xs)
        c1, ys1 = checkpointed_scan(f, 1.0, xs)
        np.testing.assert_array_equal(ys1, ys0)
        assert float(c1) == float(c0)


def test_checkpoint_keeps_nfe_and_trajectory():
    """The field is evaluated exactly ``nfe`` times (counted at run time) by the nested scans."""
    count = [0]

    def field(x, t):
        jax.debug.callback(lambda: count.__setitem__(0, count[0] + 1))
        return -x * t[:, None]

    x0 = jnp.ones((BATCH, 2))
    res = jax.block_until_ready(sample(field, x0, Heun(), steps=N, save_trajectory=True, gradient="checkpoint"))
    jax.effects_barrier()
    assert res.nfe == 2 * N == count[0]
    np.testing.assert_allclose(res.trajectory[-1], res.x)
    assert res.trajectory.shape == (N + 1, BATCH, 2)


def test_grids_follow_the_state_dtype():
    def dtypes(x0, solver, **kw):  # traced only (jax.eval_shape): nothing is compiled
        out = jax.eval_shape(lambda: (lambda r: (r.x, r.ts))(sample(lambda x, t: -x, x0, solver, **kw)))
        return out[0].dtype, out[1].dtype

    x0 = jnp.ones((BATCH, 2))
    assert dtypes(x0, Euler(), steps=4) == (jnp.float64, jnp.float64)
    assert dtypes(x0.astype(jnp.float32), Euler(), steps=4) == (jnp.float32, jnp.float32)
    assert dtypes(x0.astype(jnp.bfloat16), Euler(), steps=4) == (jnp.bfloat16, jnp.float32)
    # a user's float64 grid is kept, also for a float32 state
    assert dtypes(x0.astype(jnp.float32), Euler(), ts=jnp.linspace(0.0, 1.0, 5)) == (jnp.float32, jnp.float64)
    assert dtypes(x0, Diffrax()) == (jnp.float64, jnp.float64)
    assert dtypes(x0, DPMSolverPP(), path="linear", prediction="data", steps=4)[1] == jnp.float64


def test_bad_gradient_options():
    field, x0 = (lambda x, t: -x), jnp.ones((BATCH, 2))
    with pytest.raises(ValueError, match="gradient must be one of"):
        sample(field, x0, Euler(), steps=4, gradient="remat")
    with pytest.raises(ValueError, match="gradient='adjoint' is the continuous adjoint.*gradient='checkpoint'"):
        sample(field, x0, Euler(), steps=4, gradient="adjoint")
    with pytest.raises(ValueError, match="needs an adaptive solve"):
        sample(field, x0, Diffrax(adaptive=False), steps=4, gradient="adjoint")
    with pytest.raises(ValueError, match="either Diffrax\\(adjoint=...\\) or"):
        import diffrax

        sample(field, x0, Diffrax(adjoint=diffrax.RecursiveCheckpointAdjoint()), gradient="full")
