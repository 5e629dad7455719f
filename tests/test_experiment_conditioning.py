"""Conditioning beyond labels through the image experiment and the CLI (experiments.conditioning): a caption run,
a ControlNet on a trained run, inverse problems (inpainting, super-resolution) with any method, and the clear errors
for misuse. The library pieces are tested in test_captions, test_cross_attention, test_controlnet and test_inverse."""

import argparse
import json

import numpy as np
import pytest

from experiments import cli, conditioning

SMALL = ["--set", "steps=2", "--set", "checkpoint_every=2", "--set", "sample_every=0", "--set", "batch_size=32",
         "--set", "sample_steps=2", "--set", "guidance_scales=2", "--set", "warmup_steps=1"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    assert cli.main(["train", "digits_smoke", "--out", str(out), "--no-progress", "--set", "steps=2",
                     "--set", "checkpoint_every=2", "--set", "sample_every=0"]) == 0
    return out


def _args(**kw):
    base = dict(caption=None, control=None, inpaint=None, superres=None, method=None, image=None, label=None)
    return argparse.Namespace(**{**base, **kw})


def test_sample_flags_are_checked_before_any_work(tmp_path):
    label = {"conditioning": "label", "objective": "flow_matching"}
    for kw, record, match in (
            (dict(caption="seven", inpaint="left"), label, "one of --caption"),
            (dict(caption="seven"), label, "needs a caption run"),
            (dict(caption="seven, bold"), {"conditioning": "caption"}, "bold"),
            (dict(control="test:0"), label, "needs a ControlNet run"),
            (dict(control=str(tmp_path / "none.png")), {"conditioning": "control"}, "no such file"),
            (dict(method="dps"), label, "go with --inpaint"),
            (dict(infer_label=True), label, "go with --inpaint"),
            (dict(inpaint="left", infer_label="guess"), label, "choose denoising or evidence"),
            (dict(inpaint="left", infer_label=True, evidence_samples=50), label, "add --infer-label evidence"),
            (dict(inpaint="left", infer_label="evidence", evidence_samples=1), label, ">= 2 samples per class"),
            (dict(inpaint="middle"), label, "the part to keep"),
            (dict(superres=1), label, ">= 2"),
            (dict(superres=2, method="repaint"), label, "use --method pigdm or dps"),
            (dict(inpaint="left", method="magic"), label, "choose from"),
            (dict(inpaint="left"), {"conditioning": "caption"}, "label-conditioned"),
            (dict(inpaint="left"), {"conditioning": "label", "objective": "meanflow"}, "flow-matching run")):
        with pytest.raises((ValueError, FileNotFoundError), match=match):
            conditioning.check_sample_args(_args(**kw), record)


def test_conditioning_config_errors(capsys, tmp_path):
    for bad, match in ((["--set", "conditioning=words"], "unknown conditioning 'words'"),
                       (["--set", "conditioning=caption:dim=10,heads=4"], "heads dividing dim"),
                       (["--set", "conditioning=caption", "--set", "objective=meanflow"], "objective=flow_matching"),
                       (["--set", "conditioning=control"], "base_run=RUN_DIR"),
                       (["--set", "conditioning=control:kind=sketch", "--set", f"base_run={tmp_path}"], "unknown kind"),
                       (["--set", "conditioning=control", "--set", f"base_run={tmp_path / 'none'}"], "no run there"),
                       (["--set", f"base_run={tmp_path}"], "base_run is the frozen base")):
        out = tmp_path / "never"
        assert cli.main(["train", "digits_smoke", "--out", str(out), *bad]) == 2
        assert match in capsys.readouterr().err
        assert not out.exists()


@pytest.mark.parametrize("network", [pytest.param("unet", marks=pytest.mark.slow), "dit"])  # unet: the run below
def test_a_caption_run_builds_either_network_with_cross_attention(network):
    """conditioning=caption on the U-Net or the DiT: the network takes the caption's tokens (no label input) and
    its output has the image's shape (abstract shapes only: nothing is compiled)."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from experiments import images
    from jaxgen.data.captions import MAX_LEN

    cfg = dataclasses.replace(images.ImageConfig(), conditioning="caption", network=network)
    model = nnx.eval_shape(lambda: images.build_model(cfg, (8, 8, 1), 0))
    x = jax.ShapeDtypeStruct((2, 8, 8, 1), jnp.float32)
    tokens = jax.ShapeDtypeStruct((2, MAX_LEN), jnp.int32)
    out = nnx.eval_shape(lambda m, x, tok: m(x, jnp.full((2,), 0.5), tokens=tok), model, x, tokens)
    assert out.shape == (2, 8, 8, 1)
    with pytest.raises(ValueError, match="unconditional"):  # the label is one of the caption's words
        nnx.eval_shape(lambda m, x: m(x, jnp.full((2,), 0.5), y=jnp.zeros(2, jnp.int32)), model, x)


@pytest.mark.slow
def test_inverse_problems_through_the_cli(base_run, tmp_path, capsys):
    """Each method completes held-out digits from the CLI: observed pixels kept exactly by the replacement methods,
    the classifier's agreement with the true labels printed, a grid of originals / observations / completions."""
    for flags in (["--inpaint", "left", "--method", "repaint", "--infer-label"],
                  ["--inpaint", "centre", "--method", "projection"],
                  ["--inpaint", "top", "--method", "dps"], ["--superres", "2", "--method", "pigdm", "--infer-label"],
                  ["--superres", "2", "--method", "pigdm", "--infer-label", "evidence", "--evidence-samples", "3"]):
        out = tmp_path / f"{flags[1]}_{flags[3]}_{flags[5] if len(flags) > 5 else flags[-1]}.png"
        assert cli.main(["sample", "--checkpoint", str(base_run), "--num", "4", "--steps", "3", "--out", str(out),
                         *flags]) == 0
        text = capsys.readouterr().out
        assert "digits classifier labels" in text and out.stat().st_size > 0
        if "evidence" in flags:  # the pool (the run's Euler, 2 steps, all classes in one batch) + the completion
            assert "label inferred (evidence)" in text and "NFE 5" in text, text
        grid = np.load(str(out).replace(".png", "_samples.npy"))
        assert grid.shape == (12, 8, 8, 1)  # originals, observations, completions
        originals, completions = grid[:4], grid[8:]
        if flags[0] == "--inpaint" and flags[3] in ("repaint", "projection"):
            from jaxgen.inverse import box_mask, half_mask

            keep = np.asarray(half_mask((8, 8), "left") if flags[1] == "left" else 1 - box_mask((8, 8)))
            np.testing.assert_allclose(completions * keep, originals * keep, atol=1e-5)
    image = tmp_path / "mine.npy"
    np.save(image, np.zeros((2, 8, 8, 1), np.float32))
    assert cli.main(["sample", "--checkpoint", str(base_run), "--inpaint", "bottom", "--image", str(image),
                     "--steps", "2", "--out", str(tmp_path / "mine.png")]) == 0
    assert "classifier" not in capsys.readouterr().out  # no labels to score a user's images against
    assert np.load(tmp_path / "mine_samples.npy").shape == (4, 8, 8, 1)


@pytest.mark.slow
def test_an_evidence_pool_drawn_once_serves_every_call(base_run, monkeypatch):
    """solve_inverse(infer_label="evidence") with a pool drawn beforehand (draw_evidence_pool) gives the completions
    and the NFE of drawing the pool inside; a pool of another image shape is refused before the completion, a bad
    method before the pool is drawn."""
    import jax

    from experiments import images

    cfg, trainer, state, shape = images.load_run(str(base_run))
    model = trainer.model(state, ema=True)
    x_true = np.asarray(images.load_dataset(cfg, "test").images[:4])
    operator = conditioning.inverse_operator("superres", 2, shape)
    kw = dict(key=jax.random.key(0), steps=3, infer_label="evidence")
    inside = conditioning.solve_inverse(cfg, model, x_true, operator, "pigdm", evidence_samples=3, **kw)
    pool = conditioning.draw_evidence_pool(cfg, model, shape, 3)
    assert pool[0].shape == (cfg.num_classes * 3, *shape) and pool[2] == 2
    outside = conditioning.solve_inverse(cfg, model, x_true, operator, "pigdm", evidence_pool=pool, **kw)
    np.testing.assert_array_equal(outside[0], inside[0])
    assert outside[1] == inside[1] == 2 + 3  # the pool's Euler steps + the completion's
    for bad in (0, 1):
        with pytest.raises(ValueError, match="samples per class >= 2"):
            conditioning.draw_evidence_pool(cfg, model, shape, bad)
    monkeypatch.setattr(conditioning, "draw_evidence_pool", lambda *a, **k: pytest.fail("drew a pool"))
    monkeypatch.setattr(conditioning, "_compiled_inverse", lambda *a, **k: pytest.fail("started a completion"))
    small = (pool[0][:, :4, :4], pool[1], pool[2])
    with pytest.raises(ValueError, match="evidence pool holds images of shape"):
        conditioning.solve_inverse(cfg, model, x_true, operator, "pigdm", evidence_pool=small, **kw)
    with pytest.raises(ValueError, match="unknown inverse-problem method"):
        conditioning.solve_inverse(cfg, model, x_true, operator, "magic", **kw)
    with pytest.raises(ValueError, match="solves inpainting"):
        conditioning.solve_inverse(cfg, model, x_true, operator, "repaint", **kw)
    with pytest.raises(ValueError, match="serves infer_label='evidence' only"):
        conditioning.solve_inverse(cfg, model, x_true, operator, "pigdm", **{**kw, "infer_label": "denoising"},
                                   evidence_pool=pool)


@pytest.mark.slow
def test_controlnet_run_trains_on_the_frozen_base_and_samples_with_a_control(base_run, tmp_path, capsys):
    out = tmp_path / "control"
    assert cli.main(["train", "digits_control", "--out", str(out), "--no-progress", "--set", f"base_run={base_run}",
                     "--set", "samples_per_class=2", *SMALL]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["channels"] == 8 and config["channel_mult"] == [1]  # the base run's network
    report = json.loads((out / "report.json").read_text())
    rows = report["control"]["rows"]
    assert rows["the real digit itself"]["score"] == pytest.approx(1.0, abs=1e-5)
    assert set(rows) >= {"ControlNet", "base model (no control)"} and (out / "control.png").stat().st_size > 0
    # the base's weights are those of the base run, untouched
    from experiments import images

    _, base_tr, base_state, _ = images.load_run(str(base_run))
    _, tr, state, _ = images.load_run(str(out))
    a = base_tr.model(base_state, ema=True).conv_out.kernel[...]
    b = tr.model(state, ema=True).base.conv_out.kernel[...]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    capsys.readouterr()
    assert cli.main(["sample", "--checkpoint", str(out), "--control", "test:3", "--num", "3", "--steps", "2",
                     "--out", str(tmp_path / "c.png")]) == 0
    assert np.load(tmp_path / "c_samples.npy").shape == (3, 8, 8, 1)
    assert cli.main(["sample", "--checkpoint", str(out), "--caption", "seven"]) == 2
    assert "needs a caption run" in capsys.readouterr().err


@pytest.mark.slow
def test_caption_run_trains_reports_attributes_and_samples_a_caption(tmp_path, capsys):
    out = tmp_path / "caption"
    assert cli.main(["train", "digits_caption", "--out", str(out), "--no-progress", "--set", "channels=8",
                     "--set", "channel_mult=1", "--set", "attention_resolutions=", "--set", "samples_per_class=10",
                     "--set", "conditioning=caption:dim=16,depth=1,heads=2", *SMALL]) == 0
    rows = json.loads((out / "report.json").read_text())["captions"]["rows"]
    assert set(rows) == {"full caption", "label word only", "null caption (unconditional)"}
    assert all(0 <= r["thickness"] <= 1 and 0 <= r["slant"] <= 1 for r in rows.values())
    assert (out / "captions.png").stat().st_size > 0
    capsys.readouterr()
    assert cli.main(["sample", "--checkpoint", str(out), "--caption", "seven, thick", "--num", "3", "--steps", "2",
                     "--out", str(tmp_path / "s.png")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "s_labels.npy"), [7, 7, 7])
    assert cli.main(["sample", "--checkpoint", str(out), "--caption", "seven, bold"]) == 2
    assert "bold" in capsys.readouterr().err
