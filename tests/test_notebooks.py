"""The teaching notebooks run top to bottom (with fewer training steps).

Each code cell is executed in order in one fresh namespace, as a kernel would. The notebook JSON is read
with the json module (no nbformat/nbconvert); IPython-only lines (``!pip ...``, ``%matplotlib ...``) are
skipped and matplotlib draws off-screen (Agg).
"""

import json
import pathlib
import warnings

import matplotlib

matplotlib.use("Agg", force=True)
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import pytest  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
# notebook -> (source line, the smaller setting the test runs it with)
NOTEBOOKS = {"01_flow_matching_2d.ipynb": ("TRAIN_STEPS = 3000", "TRAIN_STEPS = 300"),
             "02_diffusion_samplers_and_likelihood.ipynb": ("N_SAMPLES = 2000", "N_SAMPLES = 400"),
             "03_optimal_transport_and_bridges.ipynb": ("TRAIN_STEPS = 3000", "TRAIN_STEPS = 100")}


def _code_cells(path: pathlib.Path) -> list[str]:
    nb = json.loads(path.read_text(encoding="utf-8"))
    assert nb["nbformat"] == 4 and nb["metadata"]["kernelspec"]["name"] == "python3"
    cells = []
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        assert cell["outputs"] == [] and cell["execution_count"] is None, "notebooks are stored without outputs"
        src = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
        lines = [line for line in src.splitlines() if not line.lstrip().startswith(("!", "%"))]
        cells.append("\n".join(lines))
    return cells


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(NOTEBOOKS))
def test_notebook_runs(name):
    old, new = NOTEBOOKS[name]
    cells = _code_cells(ROOT / "notebooks" / name)
    assert sum(src.count(old) for src in cells) == 1, f"{name} must set `{old}` exactly once"
    cells = [src.replace(old, new) for src in cells]
    namespace = {"__name__": "__main__"}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*non-interactive.*")  # plt.show() under Agg
            for i, src in enumerate(cells):
                exec(compile(src, f"{name}, code cell {i}", "exec"), namespace)
                plt.close("all")
    finally:
        plt.close("all")
    var, value = (part.strip() for part in new.split("="))
    assert namespace[var] == int(value)  # the substitution took effect


def test_every_notebook_is_tested():
    found = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
    assert found == sorted(NOTEBOOKS), "add new notebooks (and their size substitution) to NOTEBOOKS"
