"""The image pipeline end to end on embedded digits with a tiny config: train, resume, sample, evaluate (CLI)."""

import json

import numpy as np
import pytest

from jaxgen import cli


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits_run")
    assert cli.main(["train", "digits_smoke", "--out", str(out), "--no-progress"]) == 0
    return out


def test_train_writes_outputs(run_dir):
    for f in ("config.json", "metrics.jsonl", "samples_per_class.png", "guidance_sweep.png", "loss.png",
              "report.json", "report.md", "samples.npy", "labels.npy"):
        assert (run_dir / f).stat().st_size > 0, f
    samples, labels = np.load(run_dir / "samples.npy"), np.load(run_dir / "labels.npy")
    assert samples.shape == (40, 8, 8, 1) and labels.shape == (40,)
    assert samples.min() >= -1.0 and samples.max() <= 1.0
    np.testing.assert_array_equal(labels, np.repeat(np.arange(10), 4))
    report = json.loads((run_dir / "report.json").read_text())
    assert report["step"] == 20 and 0.0 <= report["accuracy"] <= 1.0 and set(report["guidance_sweep"]) == {"0.0", "2.0"}


def test_resume_continues_from_last_checkpoint(run_dir):
    assert cli.main(["train", "digits_smoke", "--out", str(run_dir), "--no-progress", "--set", "steps=30"]) == 0
    steps = [json.loads(l)["step"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [10, 20, 30]  # no step trained twice
    assert json.loads((run_dir / "report.json").read_text())["step"] == 30


def test_a_different_config_in_the_same_directory_is_refused(run_dir):
    with pytest.raises(ValueError, match="different configuration"):
        cli.main(["train", "digits_smoke", "--out", str(run_dir), "--no-progress", "--set", "channels=16"])


def test_sample_command_writes_grid_and_arrays(run_dir, tmp_path):
    out = tmp_path / "grid.png"
    assert cli.main(["sample", "--checkpoint", str(run_dir), "--label", "3", "--guidance", "2", "--sampler", "euler",
                     "--steps", "2", "--num", "8", "--out", str(out)]) == 0
    assert out.stat().st_size > 0
    assert np.load(tmp_path / "grid_samples.npy").shape == (8, 8, 8, 1)
    np.testing.assert_array_equal(np.load(tmp_path / "grid_labels.npy"), np.full(8, 3))


def test_cli_errors(capsys):
    assert cli.main(["train", "nope"]) == 2
    assert "unknown experiment" in capsys.readouterr().err
    assert cli.main(["list"]) == 0
    assert "digits_cfm" in capsys.readouterr().out
