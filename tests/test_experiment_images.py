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


@pytest.mark.slow
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


@pytest.mark.slow
def test_resume_continues_from_last_checkpoint(run_dir):
    assert cli.main(["train", "digits_smoke", "--out", str(run_dir), "--no-progress", "--set", "steps=30"]) == 0
    steps = [json.loads(l)["step"] for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [10, 20, 30]  # no step trained twice
    assert json.loads((run_dir / "report.json").read_text())["step"] == 30


@pytest.mark.slow
def test_a_different_config_in_the_same_directory_is_refused(run_dir, capsys):
    before = (run_dir / "config.json").read_text()
    assert cli.main(["train", "digits_smoke", "--out", str(run_dir), "--no-progress", "--set", "channels=16"]) == 2
    err = capsys.readouterr().err
    assert "different configuration" in err and "channels" in err and len(err.strip().splitlines()) == 1
    assert (run_dir / "config.json").read_text() == before  # nothing written
    with pytest.raises(ValueError, match="different configuration"):  # --debug: the exception itself
        cli.main(["train", "digits_smoke", "--out", str(run_dir), "--no-progress", "--set", "channels=16", "--debug"])


@pytest.mark.slow
def test_sample_command_writes_grid_and_arrays(run_dir, tmp_path):
    out = tmp_path / "grid.png"
    assert cli.main(["sample", "--checkpoint", str(run_dir), "--label", "3", "--guidance", "2", "--sampler", "euler",
                     "--steps", "2", "--num", "8", "--out", str(out)]) == 0
    assert out.stat().st_size > 0
    assert np.load(tmp_path / "grid_samples.npy").shape == (8, 8, 8, 1)
    np.testing.assert_array_equal(np.load(tmp_path / "grid_labels.npy"), np.full(8, 3))


def test_cli_errors(capsys, tmp_path):
    assert cli.main(["train", "nope"]) == 2
    assert "unknown experiment" in capsys.readouterr().err
    assert cli.main(["list"]) == 0
    listed = capsys.readouterr().out
    assert "digits_cfm" in listed and "toy2d_8gaussians_to_moons" in listed and "dpm_solver_pp" in listed
    for bad, match in ((["--set", "sampler=rk99"], "unknown sampler 'rk99'"), (["--set", "steps=-5"], "steps"),
                       (["--set", "compute_dtype=float16"], "compute_dtype"), (["--set", "batch_size=0"], "batch_size"),
                       (["--set", "stepz=3"], "unknown config field 'stepz'"),
                       (["--set", "sampler=flow_map"], "needs a flow-map model"),
                       (["--set", "objective=meanflow:q=1"], "has no option 'q'"),
                       (["--set", "network=dit:patch=3"], "not divisible by patch_size=3"),
                       (["--set", "objective=meanflow", "--set", "prediction=eps"], "prediction=velocity"),
                       (["--set", "sampler=consistency"], "needs a consistency model"),
                       (["--set", "objective=scm", "--set", "sampler=consistency"], "schedule=cosine")):
        out = tmp_path / "never"
        assert cli.main(["train", "digits_smoke", "--out", str(out), *bad]) == 2
        assert match in capsys.readouterr().err
        assert not out.exists()  # refused before anything is written


def test_a_python_config_file_with_overrides(tmp_path):
    from experiments import configs

    path = tmp_path / "wide.py"
    path.write_text("from experiments.images import ImageConfig\n\n"
                    "def get_config():\n    return ImageConfig(name='wide', channels=48, sampler='dpm_solver_pp:order=3')\n")
    cfg = configs.get_config(str(path), ["steps=7", "guidance_scales=0,1.5"])
    assert (cfg.name, cfg.channels, cfg.steps, cfg.guidance_scales) == ("wide", 48, 7, (0.0, 1.5))
    assert cfg.sampler == "dpm_solver_pp:order=3"
    with pytest.raises(ValueError, match="get_config"):
        (tmp_path / "empty.py").write_text("x = 1\n")
        configs.load(str(tmp_path / "empty.py"))


# -- every sampler by name on the trained digits model --------------------------------------------------------

SAMPLER_STEPS = {"pc": 25, "predictor_corrector": 25}  # the VP SDE's discrete betas need N > beta_max = 20


@pytest.mark.slow
def test_every_sampler_runs_by_name_in_the_image_generator():
    """Every registered sampler name through the generator that `jaxgen sample` and the reports call (guidance on a
    doubled batch, labels, exact NFE), on 8x8 images with a small labelled MLP field, so that each name costs one
    small compile; then an eps-prediction VP run, whose decoding solvers start at t0 > 0. The U-Net run below goes
    through the CLI with one sampler of each kind."""
    import dataclasses

    import jax
    from flax import nnx

    from experiments import images
    from experiments.configs import get_config
    from jaxgen.models import MLPField
    from jaxgen.samplers import SOLVERS

    model = MLPField(64, width=16, hidden_layers=1, num_classes=10, rngs=nnx.Rngs(0))
    cfg = get_config("digits_smoke")
    eps_cfg = dataclasses.replace(cfg, schedule="vp", prediction="eps")
    # every sampler of a velocity field (flow_map jumps with a two-time flow-map field: refused with a clear error)
    with pytest.raises(ValueError, match="flow-map field"):
        images.generate(model, cfg, np.array([1, 7]), 2.0, jax.random.key(0), sampler="flow_map", steps=1,
                        shape=(8, 8, 1))
    runs = ([(cfg, name) for name in sorted(SOLVERS) if name != "flow_map"]
            + [(eps_cfg, n) for n in ("euler", "dpm_solver_pp", "pc", "edm")])
    for c, name in runs:
        steps = SAMPLER_STEPS.get(name, 3) if images.resolve_sampler(name, c.prediction)[0].takes_steps() else None
        x, nfe = images.generate(model, c, np.array([1, 7]), 2.0, jax.random.key(0), sampler=name, steps=steps,
                                 shape=(8, 8, 1))
        assert x.shape == (2, 8, 8, 1) and np.all(np.isfinite(x)), (c.prediction, name)
        assert nfe >= (steps or 1), (name, nfe)  # each solver's exact count is tested in test_samplers
    assert images.resolve_sampler("dpm_solver_pp", "eps")[1] == 1e-3 and images.resolve_sampler("pc", "eps")[1] is None


@pytest.mark.slow
def test_samplers_of_each_kind_run_by_name_through_the_cli(run_dir, tmp_path, capsys):
    """`jaxgen sample --sampler NAME` on the trained U-Net: a fixed-grid ODE solver, a multistep solver that decodes
    the data, an adaptive solve (no --steps) and a predictor-corrector SDE on its own grid; `jaxgen evaluate` with
    options in the sampler spec."""
    for name in ("heun", "unipc", "tsit5", "pc"):
        out = tmp_path / f"{name}.png"
        args = ["sample", "--checkpoint", str(run_dir), "--sampler", name, "--label", "1", "--num", "2", "--out", str(out)]
        if name != "tsit5":
            args += ["--steps", str(SAMPLER_STEPS.get(name, 3))]
        assert cli.main(args) == 0, (name, capsys.readouterr().err)
        line = capsys.readouterr().out
        assert "NFE" in line, line
        x = np.load(tmp_path / f"{name}_samples.npy")
        assert x.shape == (2, 8, 8, 1) and np.all(np.isfinite(x)), name
    assert cli.main(["evaluate", "--checkpoint", str(run_dir), "--sampler", "dpm_solver_pp:order=3", "--steps", "4",
                     "--out", str(tmp_path / "eval")]) == 0
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["sampler"] == "dpm_solver_pp:order=3"


# -- consistency distillation of the trained run (`jaxgen train digits_cd_smoke --set teacher=RUN`) -----------


@pytest.mark.slow
def test_distill_at_step_zero_is_the_teachers_euler_jump(run_dir, tmp_path):
    """Initialised from the teacher in the denoiser parameterisation, f(x, 0) = x + u(x, 0): one consistency
    step is exactly the teacher's one Euler step (at w = 1, the conditional field the student network computes)."""
    out = tmp_path / "cd0"
    assert cli.main(["train", "digits_cd_smoke", "--set", f"teacher={run_dir}", "--out", str(out), "--no-progress",
                     "--set", "steps=0", "--set", "guidance=1", "--set", "sample_ts=0"]) == 0
    row = json.loads((out / "report.json").read_text())["rows"][0]
    assert row["nfe"] == 1
    np.testing.assert_allclose(row["fd"], row["teacher_euler_same_nfe"]["fd"], rtol=1e-3)


@pytest.mark.slow
def test_distill_trains_resumes_and_refuses_other_settings(run_dir, tmp_path):
    out = tmp_path / "cd"
    teacher = ["--set", f"teacher={run_dir}"]
    assert cli.main(["train", "digits_cd_smoke", *teacher, "--out", str(out), "--no-progress"]) == 0
    for f in ("config.json", "metrics.jsonl", "loss.png", "report.json", "report.md", "samples.npy", "labels.npy",
              "samples_1step.png", "samples_2step.png"):
        assert (out / f).stat().st_size > 0, f
    report = json.loads((out / "report.json").read_text())
    assert report["step"] == 10 and [r["nfe"] for r in report["rows"]] == [1, 2]
    assert all(np.isfinite(r["fd"]) and 0.0 <= r["accuracy"] <= 1.0 for r in report["rows"])
    assert np.load(out / "samples.npy").shape == (40, 8, 8, 1)
    assert cli.main(["train", "digits_cd_smoke", *teacher, "--out", str(out), "--no-progress",
                     "--set", "steps=15", "--set", "sample_ts=0"]) == 0  # sampling settings may change
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 15]  # resumed from the step-10 checkpoint, no step trained twice
    with pytest.raises(ValueError, match="different configuration"):
        cli.main(["train", "digits_cd_smoke", *teacher, "--out", str(out), "--no-progress", "--set", "num_scales=6",
                  "--debug"])
    assert cli.main(["sample", "--checkpoint", str(out), "--label", "2", "--num", "3",
                     "--out", str(tmp_path / "cd.png")]) == 0  # consistency sampling of the student
    assert np.load(tmp_path / "cd_samples.npy").shape == (3, 8, 8, 1)


def test_distill_cli_errors(capsys, tmp_path):
    out = tmp_path / "o"
    assert cli.main(["train", "digits_cd_smoke", "--set", f"teacher={tmp_path / 'missing'}", "--out", str(out)]) == 2
    assert "not a jaxgen run directory" in capsys.readouterr().err
    assert not out.exists()


def test_the_cli_keeps_compiled_programs_in_a_persistent_cache(tmp_path, monkeypatch):
    import jax

    from experiments import cli

    before = jax.config.jax_compilation_cache_dir
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("JAXGEN_CACHE", str(tmp_path))
    try:
        jax.config.update("jax_compilation_cache_dir", None)  # as for a user who configured no cache (the tests do)
        monkeypatch.setenv("JAXGEN_COMPILATION_CACHE", "0")
        cli._compilation_cache()
        assert jax.config.jax_compilation_cache_dir is None  # turned off: untouched
        monkeypatch.setenv("JAXGEN_COMPILATION_CACHE", "1")
        cli._compilation_cache()
        assert jax.config.jax_compilation_cache_dir == str(tmp_path / "xla") and (tmp_path / "xla").is_dir()
    finally:
        jax.config.update("jax_compilation_cache_dir", before)


@pytest.mark.slow
def test_meanflow_on_a_dit_trains_resumes_and_samples_guided_in_one_jump(tmp_path, capsys):
    """objective=meanflow: a flow-map DiT with the guidance scale as an input, trained, resumed and evaluated through
    the CLI; the report's samples take one network call (NFE 1), two jumps NFE 2, and its diagonal samples with any
    ODE sampler."""
    out = tmp_path / "mf"
    args = ["train", "digits_smoke", "--out", str(out), "--no-progress", "--set", "objective=meanflow",
            "--set", "network=dit:hidden=16,depth=1,heads=1", "--set", "sampler=flow_map", "--set", "sample_steps=1",
            "--set", "guidance_scales=1,2"]
    assert cli.main(args + ["--set", "steps=10"]) == 0
    assert cli.main(args) == 0  # resumes to 20
    report = json.loads((out / "report.json").read_text())
    assert report["step"] == 20 and report["nfe"] == 1 and set(report["guidance_sweep"]) == {"1.0", "2.0"}
    assert np.load(out / "samples.npy").shape == (40, 8, 8, 1)
    for sampler, steps, nfe in (("flow_map", "2", 2), ("euler", "3", 3)):
        grid = tmp_path / f"{sampler}.png"
        assert cli.main(["sample", "--checkpoint", str(out), "--label", "3", "--guidance", "2", "--sampler", sampler,
                         "--steps", steps, "--num", "4", "--out", str(grid)]) == 0
        assert f"NFE {nfe}" in capsys.readouterr().out and grid.stat().st_size > 0


@pytest.mark.slow
def test_a_shortcut_model_trains_through_the_same_experiment(tmp_path):
    out = tmp_path / "sc"
    assert cli.main(["train", "digits_smoke", "--out", str(out), "--no-progress", "--set", "objective=shortcut",
                     "--set", "network=dit:hidden=16,depth=1,heads=1", "--set", "sampler=flow_map", "--set", "sample_steps=2", "--set", "steps=10",
                     "--set", "guidance_scales=2"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["step"] == 10 and report["nfe"] == 2 and 0.0 <= report["accuracy"] <= 1.0


@pytest.mark.slow
def test_a_continuous_time_consistency_model_trains_and_samples_through_the_same_experiment(tmp_path):
    """objective=scm: TrigFlow's consistency function around a (small) DiT, trained by the sCM loss, sampled by the
    consistency sampler in one and two jumps; guided sampling is refused in one line."""
    out = tmp_path / "scm"
    args = ["train", "digits_scm", "--out", str(out), "--no-progress", "--set", "steps=10",
            "--set", "network=dit:hidden=16,depth=1,heads=1", "--set", "samples_per_class=4",
            "--set", "checkpoint_every=10"]
    assert cli.main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["step"] == 10 and report["nfe"] == 1 and np.load(out / "samples.npy").shape == (40, 8, 8, 1)
    grid = tmp_path / "two.png"
    assert cli.main(["sample", "--checkpoint", str(out), "--label", "3", "--steps", "2", "--num", "4",
                     "--out", str(grid)]) == 0
    assert grid.stat().st_size > 0
    assert cli.main(["sample", "--checkpoint", str(out), "--label", "3", "--guidance", "2", "--num", "4",
                     "--out", str(tmp_path / "never.png")]) == 2
