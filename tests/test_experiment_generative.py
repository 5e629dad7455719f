"""The generative-families experiment end to end (CLI): train, resume, sample, evaluate; the comparison table."""

import json

import numpy as np
import pytest

from experiments import cli
from experiments.recipes import Context, options
from experiments.recipes.registry import FAMILIES, build, parse_family


def test_family_specs_and_options_are_checked_before_any_work():
    assert parse_family("wgan_gp:n_critic=3") == ("wgan_gp", {"n_critic": 3})
    with pytest.raises(ValueError, match="unknown model family 'vea'"):
        parse_family("vea")
    ctx = Context(shape=(2,), options={"beta": 2, "bogus": 1})
    with pytest.raises(ValueError, match="has no option 'bogus'"):
        options(ctx, {"beta": 1.0}, "vae")
    assert options(Context(shape=(2,), options={"beta": 2}), {"beta": 1.0}, "vae") == {"beta": 2.0}
    with pytest.raises(ValueError, match="option beta must be a float"):
        options(Context(shape=(2,), options={"beta": "big"}), {"beta": 1.0}, "vae")
    with pytest.raises(ValueError, match="has no option 'nope'"):
        build("flow_matching:nope=1", Context(shape=(2,)))
    assert {"vae", "vqvae", "realnvp", "glow", "ffjord", "gan", "wgan_gp", "sngan", "ebm", "ncsn"} <= set(FAMILIES)


def test_cli_refuses_bad_family_configs_in_one_line(capsys, tmp_path):
    for bad, what in ((["--set", "family=vea"], "unknown model family"), (["--set", "data=mooons"], "data='mooons'"),
                      (["--set", "num_samples=3"], "num_samples")):
        assert cli.main(["train", "digits_vae", "--out", str(tmp_path / "x"), *bad]) == 2
        err = capsys.readouterr().err
        assert what in err and err.count("\n") == 1, err
        assert not (tmp_path / "x").exists()  # nothing written


@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("vae_run")
    args = ["train", "digits_vae", "--out", str(out), "--no-progress", "--set", "steps=20", "--set", "chunk=10",
            "--set", "checkpoint_every=10", "--set", "num_samples=64", "--set", "likelihood_samples=8"]
    assert cli.main(args) == 0
    return out, args


@pytest.mark.slow
def test_a_family_trains_resumes_samples_and_evaluates_through_the_cli(vae_run, tmp_path, capsys):
    out, args = vae_run
    for f in ("config.json", "metrics.jsonl", "loss.png", "report.json", "report.md", "samples.npy", "samples.png"):
        assert (out / f).stat().st_size > 0, f
    report = json.loads((out / "report.json").read_text())
    assert report["step"] == 20 and report["nfe"] >= 1 and report["num_samples"] == 64
    q = report["quality"]
    assert q["num_samples"] == 64 and 0.0 <= q["class_tv_from_uniform"] <= 1.0
    assert np.isfinite(report["nll"]["bits_per_dim"]) and "IWAE" in report["nll"]["kind"]
    assert np.load(out / "samples.npy").shape == (64, 8, 8, 1)
    # resume: only the new steps are trained
    assert cli.main(args[:-10] + ["--set", "steps=30", "--set", "chunk=10", "--set", "checkpoint_every=10",
                                  "--set", "num_samples=64", "--set", "likelihood_samples=8"]) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [10, 20, 30]
    assert json.loads((out / "report.json").read_text())["step"] == 30
    # another configuration in the same directory is refused
    assert cli.main(["train", "digits_vae", "--out", str(out), "--set", "latent_dim=4"]) == 2
    assert "different configuration" in capsys.readouterr().err
    grid = tmp_path / "g.png"
    assert cli.main(["sample", "--checkpoint", str(out), "--num", "12", "--out", str(grid)]) == 0
    assert grid.stat().st_size > 0 and np.load(tmp_path / "g_samples.npy").shape == (12, 8, 8, 1)
    assert cli.main(["evaluate", "--checkpoint", str(out), "--out", str(tmp_path / "ev")]) == 0
    assert json.loads((tmp_path / "ev" / "report.json").read_text())["step"] == 30


@pytest.mark.slow
def test_the_comparison_writes_one_table_and_resumes_finished_runs(tmp_path, capsys):
    out = tmp_path / "cmp"
    args = ["train", "compare_smoke", "--out", str(out), "--no-progress", "--set", "families=flow_matching,gan"]
    assert cli.main(args) == 0
    table = (out / "comparison.md").read_text()
    assert "| flow_matching |" in table and "| gan |" in table and "8gaussians" in table
    reports = json.loads((out / "comparison.json").read_text())
    assert set(reports["8gaussians"]) == {"flow_matching", "gan"}
    assert reports["8gaussians"]["gan"]["nfe"] == 1 and "modes" in reports["8gaussians"]["gan"]["quality"]
    assert (out / "samples_8gaussians.png").stat().st_size > 0
    capsys.readouterr()
    assert cli.main(args[:-2] + ["--set", "families=flow_matching,gan"]) == 0  # finished pairs are read back
    assert json.loads((out / "comparison.json").read_text()) == reports
