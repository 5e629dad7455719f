"""The README's code runs as written (with fewer training steps)."""

import pytest
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


@pytest.mark.slow
def test_readme_python_snippets_run_in_order(tmp_path, monkeypatch):
    blocks = _python_blocks()
    assert len(blocks) == 6, "each README python block is run here: add the new one's assertions"
    tour, oracle, new_sampler, mesh, diffusion, transport = blocks
    assert "10_000" in tour
    ns: dict = {}
    exec(compile(tour.replace("10_000", "200"), "README tour", "exec"), ns)
    assert ns["ode"].nfe == 100 and ns["ode"].x.shape == (2048, 2)
    assert ns["score"].shape == (2048, 2)
    exec(compile(oracle, "README oracle", "exec"), ns)
    assert ns["x1"].shape == (2048, 2)
    from jaxgen.samplers import SOLVERS

    try:
        exec(compile(new_sampler, "README new sampler", "exec"), ns)
        assert ns["ral"].nfe == 40 and ns["ral"].x.shape == (2048, 2)
        # Ralston is second order: on the trained field its 20-step sample is as close to RK4's as Heun's is
        ref = ns["sample"](ns["field"], ns["x0"], "rk4", steps=20).x
        heun = ns["sample"](ns["field"], ns["x0"], "heun", steps=20).x
        err_ral = float(abs(ns["ral"].x - ref).max())
        err_heun = float(abs(heun - ref).max())
        assert err_ral < 3 * err_heun + 1e-5, (err_ral, err_heun)
    finally:
        SOLVERS.pop("ralston", None)
    exec(compile(diffusion, "README diffusion samplers", "exec"), ns)
    assert ns["pp"].nfe == 8 and ns["edm"].nfe == 35 and ns["ll"].log_prob.shape == (256,)
    import jax.numpy as jnp

    assert transport.count("5_000") == 2
    exec(compile(transport.replace("5_000", "100"), "README optimal transport", "exec"), ns)
    assert ns["sde"].x.shape == ns["one"].x.shape == ns["grad"].shape == (512, 2)
    assert ns["ode"].nfe == 100 and bool(jnp.all(jnp.isfinite(ns["grad"])))
    monkeypatch.chdir(tmp_path)  # the data-parallel block writes runs/mesh_demo
    assert "1_000" in mesh and "every=500" in mesh
    exec(compile(mesh.replace("1_000", "20").replace("every=500", "every=10"), "README scaling out", "exec"), ns)
    assert int(ns["state"].step) == 20 and ns["losses"].shape == (20,)
    import jax

    kernel = ns["state"].params["out"]["kernel"][...]
    assert kernel.sharding.is_fully_replicated and len(kernel.sharding.device_set) == jax.device_count()


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "./test.sh" in ci and "./test.sh" in readme and "./run.sh" in readme
