"""The image pipeline end to end on embedded digits with a tiny config: train, resume, sample, evaluate (CLI)."""

import json

import numpy as np
import pytest

from experiments import cli


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


# -- consistency distillation of the trained run (`jaxgen distill`) -------------------------------------------


def test_distill_at_step_zero_is_the_teachers_euler_jump(run_dir, tmp_path):
    """Initialised from the teacher in the denoiser parameterisation, f(x, 0) = x + u(x, 0): one consistency
    step is exactly the teacher's one Euler step (at w = 1, the conditional field the student network computes)."""
    out = tmp_path / "cd0"
    assert cli.main(["distill", "consistency_smoke", "--teacher", str(run_dir), "--out", str(out), "--no-progress",
                     "--set", "steps=0", "--set", "guidance=1", "--set", "sample_ts=0"]) == 0
    row = json.loads((out / "report.json").read_text())["rows"][0]
    assert row["nfe"] == 1
    np.testing.assert_allclose(row["fd"], row["teacher_euler_same_nfe"]["fd"], rtol=1e-3)


def test_distill_trains_resumes_and_refuses_other_settings(run_dir, tmp_path):
    out = tmp_path / "cd"
    assert cli.main(["distill", "consistency_smoke", "--teacher", str(run_dir), "--out", str(out), "--no-progress"]) == 0
    for f in ("config.json", "metrics.jsonl", "loss.png", "report.json", "report.md", "samples.npy", "labels.npy",
              "samples_1step.png", "samples_2step.png"):
        assert (out / f).stat().st_size > 0, f
    report = json.loads((out / "report.json").read_text())
    assert report["step"] == 10 and [r["nfe"] for r in report["rows"]] == [1, 2]
    assert all(np.isfinite(r["fd"]) and 0.0 <= r["accuracy"] <= 1.0 for r in report["rows"])
    assert np.load(out / "samples.npy").shape == (40, 8, 8, 1)
    assert cli.main(["distill", "consistency_smoke", "--teacher", str(run_dir), "--out", str(out), "--no-progress",
                     "--set", "steps=15", "--set", "sample_ts=0"]) == 0  # sampling settings may change
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 15]  # resumed from the step-10 checkpoint, no step trained twice
    with pytest.raises(ValueError, match="different settings"):
        cli.main(["distill", "consistency_smoke", "--teacher", str(run_dir), "--out", str(out), "--no-progress",
                  "--set", "num_scales=6"])


def test_distill_cli_errors(capsys, tmp_path):
    assert cli.main(["distill", "nope", "--teacher", str(tmp_path)]) == 2
    assert "unknown distillation config" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="not a jaxgen run directory"):
        cli.main(["distill", "--teacher", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), "--no-progress"])
