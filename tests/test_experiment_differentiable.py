"""The differentiable-sampling examples end to end through the CLI, on tiny settings: inversion, learned time grid,
learned guidance scale and reward fine-tuning each do what they claim, and bad configs fail before any work."""

import json

import pytest

from experiments import cli, common, configs, differentiable

TINY = ["--no-progress", *(a for s in ("base_steps=1000", "base_learning_rate=0.003", "checked=false", "num_eval=512",
                                        "reference_steps=40", "chunk=50") for a in ("--set", s))]


def _run(config, out, *sets):
    assert cli.main(["train", config, "--out", str(out), *TINY, *(a for s in sets for a in ("--set", s))]) == 0
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """One unconditional base (N(0, I) -> moons, 1,000 steps) shared by the examples: a run directory may be
    reused by another example (``task`` is a free field), which then resumes the base instead of training it."""
    return tmp_path_factory.mktemp("diff")


@pytest.mark.slow
def test_inversion_reduces_reconstruction_error_by_a_large_factor(base_dir):
    report = _run("toy2d_invert_noise", base_dir, "target=moons", "opt_batch=64", "opt_steps=300")
    m = report["invert_noise"]
    assert m["error_after"] < m["error_before"] / 100, m
    # gradient inversion inverts the K-step sampler itself, more exactly than the continuous ODE's inversion does
    assert m["error_after"] < m["error_ode_inversion"], m
    for f in ("metrics.json", "report.md", "config.json", "invert_noise.png", "opt_loss.png", "loss.png"):
        assert (base_dir / f).stat().st_size > 0, f
    assert "gradient inversion" in (base_dir / "report.md").read_text()


@pytest.mark.slow
def test_learned_time_grid_beats_uniform_grid_at_equal_nfe_on_fresh_noise(base_dir):
    report = _run("toy2d_learn_time_grid", base_dir, "target=moons", "sample_steps=4", "opt_batch=128",
                  "opt_steps=150", "opt_learning_rate=0.1")
    m = report["learn_time_grid"]
    assert m["learned"]["nfe"] == m["uniform"]["nfe"] == 4
    assert m["learned"]["distill_mse"] < 0.8 * m["uniform"]["distill_mse"], m
    ts = m["learned_ts"]
    assert ts[0] == 0.0 and ts[-1] == 1.0 and all(a < b for a, b in zip(ts, ts[1:]))
    assert report["base"]["steps"] == 1000  # the base of the inversion test, resumed, not retrained


@pytest.mark.slow
def test_reward_finetuning_increases_the_reward(base_dir):
    report = _run("toy2d_reward_finetune", base_dir, "target=moons", "opt_batch=128", "opt_steps=100")
    m = report["reward_finetune"]
    assert m["fine-tuned"]["reward"] > m["base"]["reward"] + 0.5, m
    assert m["fine-tuned"]["fraction_right"] > m["base"]["fraction_right"] + 0.2, m


@pytest.mark.slow
def test_learned_guidance_scale_beats_the_unconditional_and_strong_guidance(tmp_path):
    report = _run("toy2d_learn_guidance", tmp_path, "opt_batch=128", "opt_steps=100")
    m = report["learn_guidance"]
    at = m["at"]
    learned = at[f"w={round(m['learned_w'], 3):g}"]
    assert 0.5 < m["learned_w"] < 2.0, m
    assert learned["objective"] < at["w=0"]["objective"] and learned["objective"] < at["w=3"]["objective"], at
    assert (tmp_path / "learn_guidance.png").stat().st_size > 0


def test_bad_configs_fail_before_any_work(tmp_path, capsys):
    for sets, match in ((["task=denoise"], "config field task='denoise' is invalid"),
                        (["solver=euler_maruyama"], "deterministic fixed-step solver"),
                        (["opt_steps=0"], "opt_steps=0 is invalid"),
                        (["prior_weight=nan"], "must be finite")):
        with pytest.raises(ValueError, match=match):
            differentiable.train(configs.get_config("toy2d_invert_noise", sets), str(tmp_path / "x"), progress=False)
    with pytest.raises(ValueError, match="leave base_run empty"):
        differentiable.train(configs.get_config("toy2d_learn_guidance", ["base_run=runs/toy2d"]), str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()  # nothing written
    common.write_config(str(tmp_path / "g"), configs.load("toy2d_learn_guidance"))  # a conditional base's directory
    with pytest.raises(ValueError, match="another kind of example"):
        differentiable.train(configs.get_config("toy2d_invert_noise", ["target=8gaussians"]), str(tmp_path / "g"))
    assert cli.main(["train", "toy2d_reward_finetune", "--out", str(tmp_path / "y"), "--set", "drift_weight=-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "drift_weight=-1.0 is invalid: must be >= 0" in err


def test_sample_and_evaluate_say_they_do_not_apply(tmp_path, capsys):
    common.write_config(str(tmp_path), configs.load("toy2d_invert_noise"))
    for command in ("sample", "evaluate"):
        assert cli.main([command, "--checkpoint", str(tmp_path)]) == 2
        assert "differentiable-sampling example" in capsys.readouterr().err


@pytest.mark.slow
def test_base_run_from_a_toy2d_run(tmp_path):
    toy = tmp_path / "toy"
    assert cli.main(["train", "toy2d_gaussian_to_moons", "--out", str(toy), "--no-progress", "--set", "steps=300",
                     "--set", "num_samples=64", "--set", "euler_steps=4", "--set", "checkpoint_every=300"]) == 0
    report = _run("toy2d_invert_noise", tmp_path / "inv", f"base_run={toy}", "opt_batch=32", "opt_steps=100")
    assert report["base"]["steps"] == 300 and report["base"]["from"] == str(toy)
    assert not (tmp_path / "inv" / "checkpoints").exists()  # nothing trained here
    assert report["invert_noise"]["error_after"] < report["invert_noise"]["error_before"] / 10
    with pytest.raises(ValueError, match="must be a toy2d run with a Gaussian source"):
        differentiable.check_config(configs.get_config("toy2d_invert_noise", [f"base_run={tmp_path / 'inv'}"]))
