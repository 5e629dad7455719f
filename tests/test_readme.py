"""The README's code runs as written (with fewer training steps)."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_tour_and_oracle_snippets_run():
    blocks = _python_blocks()
    assert len(blocks) >= 2
    tour = blocks[0]
    assert "10_000" in tour
    ns: dict = {}
    exec(compile(tour.replace("10_000", "200"), "README tour", "exec"), ns)
    assert ns["ode"].nfe == 100 and ns["ode"].x.shape == (2048, 2)
    assert ns["score"].shape == (2048, 2)
    exec(compile(blocks[1], "README oracle", "exec"), ns)
    assert ns["x1"].shape == (2048, 2)
    exec(compile(blocks[2], "README diffusion samplers", "exec"), ns)
    assert ns["pp"].nfe == 8 and ns["edm"].nfe == 35 and ns["ll"].log_prob.shape == (256,)


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "./test.sh" in ci and "./test.sh" in readme and "./run.sh" in readme
