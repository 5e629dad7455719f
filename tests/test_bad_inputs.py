"""Bad inputs get one clear line before any work is done and before anything is written (issue 10's probe, kept as
a table). Every case runs the `jaxgen` CLI in-process: exit status 2, one line on stderr naming the problem, no
output folder."""

import pytest

from experiments import cli

TRAIN_IMAGES = [  # (--set override, words the message must contain)
    ("steps=-5", "steps=-5"), ("batch_size=0", "batch_size=0"), ("channels=0", "channels=0"),
    ("sample_steps=0", "sample_steps=0"), ("samples_per_class=0", "samples_per_class"),
    ("compute_dtype=float16", "float32 or bfloat16"), ("learning_rate=0", "learning_rate"),
    ("learning_rate=nan", "learning_rate=nan"), ("label_dropout=1", "label_dropout"),
    ("guidance_scales=", "at least one scale"), ("guidance_scales=0,nan", "finite"),
    ("eval_guidance=nan", "eval_guidance=nan"), ("eval_guidance=inf", "eval_guidance=inf"),
    ("warmup_steps=-1", "warmup_steps=-1"), ("num_res_blocks=0", "num_res_blocks"),
    ("num_heads=3", "divide channels"), ("dropout=1.0", "dropout"), ("channel_mult=", "channel_mult"),
    ("channel_mult=1,0", "channel_mult"), ("attention_resolutions=0", "attention_resolutions"),
    ("num_classes=0", "num_classes"), ("clip_norm=-1", "clip_norm"), ("keep_checkpoints=0", "keep_checkpoints"),
    ("sample_chunk=-1", "sample_chunk"), ("checkpoint_every=0", "checkpoint_every"),
    ("sample_every=-1", "sample_every"), ("sampler=nope", "unknown sampler 'nope'"),
    ("sampler=heun:foo=1", "bad options"), ("sampler=ddim:eta=nan", "eta must be a number in [0, 1]"),
    ("sampler=edm:s_churn=inf", "s_churn"), ("ema_decay=1.5", "ema_decay"), ("no_such_field=1", "no_such_field"),
]
TRAIN_TOY2D = [("steps=-1", "steps=-1"), ("batch_size=0", "batch_size=0"), ("learning_rate=nan", "learning_rate")]
OTHER = [  # (argv without --out, words)
    (["train", "no_such_experiment"], "unknown experiment"),
    (["sample", "--checkpoint", "{tmp}/missing", "--steps", "0"], "--steps must be a positive integer"),
    (["sample", "--checkpoint", "{tmp}/missing", "--num", "0"], "--num must be a positive integer"),
    (["sample", "--checkpoint", "{tmp}/missing", "--guidance", "nan"], "--guidance must be a finite number"),
    (["sample", "--checkpoint", "{tmp}/missing", "--guidance", "inf"], "--guidance must be a finite number"),
    (["sample", "--checkpoint", "{tmp}/missing", "--sampler", "rk5"], "unknown sampler 'rk5'"),
    (["sample", "--checkpoint", "{tmp}/missing", "--sampler", "dpm_solver_pp:order=nan"], "order must be one of"),
    (["sample", "--checkpoint", "{tmp}/missing", "--sampler", "euler_maruyama:sigma=nan"], "sigma must be >= 0"),
    (["sample", "--checkpoint", "{tmp}/missing"], "not a jaxgen run directory"),
    (["evaluate", "--checkpoint", "{tmp}/missing", "--steps", "-2"], "--steps must be a positive integer"),
    (["evaluate", "--checkpoint", "{tmp}/missing"], "not a jaxgen run directory"),
    (["train", "digits_cd_smoke", "--set", "teacher={tmp}/missing"], "not a jaxgen run directory"),
]


def _refused(argv, words, tmp_path, capsys, out=None):
    assert cli.main(argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err, (argv, err)
    if out is not None:
        assert not out.exists(), f"{argv} left {out} behind"


@pytest.mark.parametrize("override, words", TRAIN_IMAGES, ids=[c[0] for c in TRAIN_IMAGES])
def test_image_config_errors(override, words, tmp_path, capsys):
    out = tmp_path / "run"
    _refused(["train", "digits_smoke", "--out", str(out), "--no-progress", "--set", override], words, tmp_path,
             capsys, out)


@pytest.mark.parametrize("override, words", TRAIN_TOY2D, ids=[c[0] for c in TRAIN_TOY2D])
def test_toy2d_config_errors(override, words, tmp_path, capsys):
    out = tmp_path / "run"
    _refused(["train", "toy2d_8gaussians_to_moons", "--out", str(out), "--no-progress", "--set", override], words,
             tmp_path, capsys, out)


@pytest.mark.parametrize("argv, words", OTHER, ids=[" ".join(c[0][:1] + c[0][3:]) for c in OTHER])
def test_command_errors(argv, words, tmp_path, capsys):
    out = tmp_path / "out"
    argv = [a.format(tmp=tmp_path) for a in argv] + ["--out", str(out)]
    _refused(argv, words, tmp_path, capsys, out)
