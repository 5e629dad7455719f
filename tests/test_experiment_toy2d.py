"""The 2-D experiment end to end through the shared CLI: outputs, resume, sampling, and the quality target of the
default recipe."""

import json

import numpy as np
import pytest

from experiments import cli, configs, toy2d


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy2d")
    assert cli.main(["train", "toy2d_gaussian_to_moons", "--out", str(out), "--no-progress", "--set", "steps=300",
                     "--set", "num_samples=256", "--set", "euler_steps=20", "--set", "chunk=150",
                     "--set", "checkpoint_every=150"]) == 0
    return out


@pytest.mark.slow
def test_short_run_writes_every_output(short_run):
    for f in ("samples.npy", "samples_adaptive.npy", "metrics.json", "config.json", "samples.png",
              "trajectories.png", "loss.png", "metrics.jsonl"):
        assert (short_run / f).stat().st_size > 0, f
    samples = np.load(short_run / "samples.npy")
    assert samples.shape == (256, 2) and np.all(np.isfinite(samples))
    saved = json.loads((short_run / "metrics.json").read_text())
    assert saved["euler"]["nfe"] == 20 and saved["adaptive"]["nfe"] > 0
    assert {"sliced_w2", "energy_distance", "mmd_rbf", "w2_exact_1024"} <= set(saved["euler"])
    assert "euler_maruyama" in saved  # Gaussian source: the SDE sampler runs too
    assert saved["train"]["steps"] == 300 and saved["step"] == 300


@pytest.mark.slow
def test_resume_sample_and_evaluate_with_any_sampler(short_run, tmp_path):
    assert cli.main(["train", "toy2d_gaussian_to_moons", "--out", str(short_run), "--no-progress", "--set", "steps=450",
                     "--set", "num_samples=256", "--set", "euler_steps=20", "--set", "chunk=150",
                     "--set", "checkpoint_every=150"]) == 0
    steps = [json.loads(l)["step"] for l in (short_run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [150, 300, 450]  # resumed from the step-300 checkpoint
    out = tmp_path / "s.png"
    assert cli.main(["sample", "--checkpoint", str(short_run), "--sampler", "dpm_solver_pp:order=3", "--steps", "6",
                     "--num", "64", "--out", str(out)]) == 0
    assert out.stat().st_size > 0 and np.load(tmp_path / "s_samples.npy").shape == (64, 2)
    assert cli.main(["evaluate", "--checkpoint", str(short_run), "--sampler", "heun", "--steps", "8",
                     "--out", str(tmp_path / "eval")]) == 0
    report = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert report["heun"]["nfe"] == 16 and report["step"] == 450


def test_configs_and_overrides():
    cfg = configs.get_config("toy2d_gaussian_to_moons", ["steps=7", "schedule=cosine"])
    assert isinstance(cfg, toy2d.Toy2DConfig) and cfg.steps == 7 and cfg.source == "gaussian"
    assert cfg.schedule == "cosine"
    with pytest.raises(ValueError, match="unknown experiment"):
        configs.load("nope")
    with pytest.raises(ValueError, match="unknown config field"):
        configs.get_config("toy2d_gaussian_to_moons", ["stepz=3"])


@pytest.mark.slow
@pytest.mark.optimised
def test_default_recipe_reaches_sliced_w2_target(tmp_path):
    """Issue target: 8 Gaussians -> moons, Euler-100 samples, sliced W2 (256 directions, 2048 vs 2048 fresh) < 0.15."""
    report = toy2d.train(configs.load("toy2d_8gaussians_to_moons"), str(tmp_path), progress=False)
    assert report["euler"]["nfe"] == 100
    assert report["euler"]["sliced_w2"] < 0.15, report["euler"]
    assert report["source_to_target"]["sliced_w2"] > 1.0  # the metric does separate distributions


def test_transport_options_are_checked_before_any_work(tmp_path):
    bad = [(["--set", "coupling=hungarian"], "unknown coupling"),
           (["--set", "schedule=cosine", "--set", "sigma_min=0.01"], "linear schedule only"),
           (["--set", "train_score=true"], "bridge_noise > 0"),
           (["--set", "bridge_noise=-1"], "bridge_noise")]
    for extra, match in bad:
        cfg = configs.get_config("toy2d_8gaussians_to_moons", [e for e in extra if e != "--set"])
        with pytest.raises(ValueError, match=match):
            toy2d.train(cfg, str(tmp_path / "run"), progress=False)
        assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_sb_cfm_with_learned_score_trains_and_samples_both_ways(tmp_path, capsys):
    """SB-CFM (entropic OT plan + Brownian-bridge noise, velocity and score) from 8 Gaussians: the ODE and the SDE that
    uses both fields sample; a decoding sampler is refused with the reason."""
    out = tmp_path / "sb"
    assert cli.main(["train", "toy2d_8gaussians_to_moons_sb_cfm", "--out", str(out), "--no-progress", "--set",
                     "steps=400", "--set", "num_samples=256", "--set", "euler_steps=20", "--set", "chunk=200",
                     "--set", "checkpoint_every=200"]) == 0
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["method"] == "SB-CFM"
    assert saved["euler_maruyama"]["score"] == "learned" and saved["euler_maruyama"]["nfe"] == 20
    src = saved["source_to_target"]["w2_exact_1024"]
    for k in ("euler", "euler_1_step", "euler_maruyama"):  # far closer to the target than the source is
        assert saved[k]["w2_exact_1024"] < 0.5 * src, (k, saved[k], src)
    assert 0 <= saved["euler"]["straightness"] < 1.0
    with pytest.raises(ValueError, match="has none; use an ODE solver"):
        cli.main(["--debug", "sample", "--checkpoint", str(out), "--sampler", "dpm_solver_pp", "--out",
                  str(tmp_path / "s.png")])
