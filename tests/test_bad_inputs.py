"""Bad inputs get one clear error before any work is done and before anything is written (issue 10's probe, kept as
tables). The CLI cases run the `jaxgen` CLI in-process: exit status 2, one line on stderr naming the problem, no output
folder. The API cases call the library: the expected exception type, a message naming the problem, raised by jaxgen's
own checks rather than from inside a dependency."""

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
    ("checked=maybe", "cannot parse checked='maybe'"), ("schedule=cosinus", "unknown schedule 'cosinus'"),
    ("prediction=noise2", "unknown prediction type 'noise2'"), ("batch_size=abc", "cannot parse batch_size='abc'"),
    ("sampler=diffrax:rtol=-1", "rtol must be a finite number"),
]
TRAIN_TOY2D = [("steps=-1", "steps=-1"), ("batch_size=0", "batch_size=0"), ("learning_rate=nan", "learning_rate"),
               ("target=moonz", "Unknown distribution 'moonz'"), ("adaptive_tol=0", "both 0"),
               ("hidden_layers=0", "hidden_layers must be a positive integer"), ("activation=relu6x", "relu6x")]
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
    (["train", "digits_cd_smoke", "--set", "num_scales=1"], "num_scales=1 is invalid"),
    (["train", "digits_cd_smoke", "--set", "parameterization=xyz"], "parameterization='xyz' is invalid"),
    (["train", "{tmp}/no_such_config.py"], "not found"),
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


# -- the Python API ----------------------------------------------------------------------------------------------
# (case id, call on the shared objects `a`, expected exception type, words the message must contain). Every case fails
# in jaxgen's own checks, before any compilation; the probe that found them is summarised in issue 10's closing note.

API = [
    ("schedule name", lambda a: a.paths.get_schedule("cosinus"), ValueError, "unknown schedule 'cosinus'"),
    ("schedule option", lambda a: a.paths.get_schedule("vp", beta=3), TypeError, "has no option beta"),
    ("vp betas swapped", lambda a: a.paths.get_schedule("vp", beta_min=20.0, beta_max=0.1), ValueError, "beta_min"),
    ("ve sigma_max nan", lambda a: a.paths.get_schedule("ve", sigma_max=float("nan")), ValueError, "sigma_max"),
    ("path of a string", lambda a: a.paths.GaussianPath("cond_ot"), TypeError, "from_name('cond_ot')"),
    ("t above 1", lambda a: a.path.sample(a.x2, a.x2, 1.5), ValueError, "t must lie in [0, 1]"),
    ("t nan", lambda a: a.path.sample(a.x2, a.x2, float("nan")), ValueError, "NaN"),
    ("t batch", lambda a: a.path.sample(a.x2, a.x2, a.jnp.ones(3) / 2), ValueError, "shape (B,) = (4,)"),
    ("coefficients t<0", lambda a: a.path.coefficients(-0.1), ValueError, "t must lie in [0, 1]"),
    ("prior shape", lambda a: a.path.sample_prior(a.key, (-1, 2)), ValueError, "non-negative integers"),
    ("diffusion time", lambda a: a.paths.to_jaxgen_time(2.0), ValueError, "tau must lie in [0, 1]"),
    ("prediction typo", lambda a: a.fields.canonical_prediction("veloctiy"), ValueError, "unknown prediction"),
    ("convert shapes", lambda a: a.fields.convert(a.path, a.x2, a.jnp.ones((4, 3)), 0.5, source="velocity",
                                                  target="score"), ValueError, "shape mismatch"),
    ("as_field int", lambda a: a.fields.as_field(a.path, 3, source="eps", target="velocity"), TypeError, "callable"),
    ("guidance nan", lambda a: a.fields.guided_field(a.mlpc, float("nan"), null_label=3), ValueError,
     "guidance_scale must be finite"),
    ("guided no labels", lambda a: a.fields.guided_field(a.mlpc, 2.0, null_label=3)(a.x2, 0.5), ValueError,
     "needs the labels"),
    ("mlp dim 0", lambda a: a.MLPField(0, rngs=a.nnx.Rngs(0)), ValueError, "dim must be a positive integer"),
    ("mlp width", lambda a: a.MLPField(2, width=-3, rngs=a.nnx.Rngs(0)), ValueError, "width"),
    ("mlp activation", lambda a: a.MLPField(2, activation="relu6x", rngs=a.nnx.Rngs(0)), ValueError, "relu6x"),
    ("mlp x dim", lambda a: a.mlp(a.jnp.ones((4, 3)), 0.5), ValueError, "built for dim=2"),
    ("mlp t batch", lambda a: a.mlp(a.x2, a.jnp.ones(3)), ValueError, "t of shape (B,)"),
    ("mlp label range", lambda a: a.mlpc(a.x2, 0.5, y=a.jnp.full(4, 7)), ValueError, "must lie in [0, 3]"),
    ("mlp label float", lambda a: a.mlpc(a.x2, 0.5, y=a.jnp.ones(4)), ValueError, "must be integers"),
    ("mlp label shape", lambda a: a.mlpc(a.x2, 0.5, y=a.jnp.zeros((4, 1), a.jnp.int32)), ValueError, "shape (B,)"),
    ("mlp no labels", lambda a: a.mlpc(a.x2, 0.5), ValueError, "class-conditional"),
    ("unet heads", lambda a: a.UNetField(1, channels=8, num_heads=3, num_groups=4, rngs=a.nnx.Rngs(0)), ValueError,
     "num_heads=3"),
    ("unet dropout", lambda a: a.UNetField(1, channels=8, dropout=1.5, rngs=a.nnx.Rngs(0)), ValueError, "dropout"),
    ("unet NCHW", lambda a: a.unet(a.jnp.ones((2, 1, 8, 8)), 0.5), ValueError, "channels-first"),
    ("unet label", lambda a: a.unet(a.img, 0.5, y=a.jnp.full(2, 4)), ValueError, "must lie in [0, 3]"),
    ("sampler name", lambda a: a.sample(a.mlp, a.x2, "rk5", steps=4), ValueError, "unknown sampler 'rk5'"),
    ("steps 0", lambda a: a.sample(a.mlp, a.x2, steps=0), ValueError, "steps must be a positive integer"),
    ("steps float", lambda a: a.sample(a.mlp, a.x2, steps=2.5), ValueError, "steps must be a positive integer"),
    ("ts range", lambda a: a.sample(a.mlp, a.x2, ts=a.jnp.array([0.0, 0.5, 1.5])), ValueError, "ts must lie"),
    ("ts one time", lambda a: a.sample(a.mlp, a.x2, ts=a.jnp.array([0.0])), ValueError, "at least 2 times"),
    ("steps and ts", lambda a: a.sample(a.mlp, a.x2, steps=3, ts=a.jnp.linspace(0, 1, 4)), ValueError, "not both"),
    ("x0 nan", lambda a: a.sample(a.mlp, a.x2.at[0, 0].set(a.jnp.nan), steps=3), ValueError, "x0 must be finite"),
    ("x0 int", lambda a: a.sample(a.mlp, a.jnp.ones((4, 2), a.jnp.int32), steps=3), ValueError, "floating point"),
    ("x0 scalar", lambda a: a.sample(a.mlp, 1.0, steps=3), ValueError, "leading batch axis"),
    ("sde no key", lambda a: a.sample(a.mlp, a.x2, "euler_maruyama", path=a.path, steps=3), ValueError,
     "pass key="),
    ("key int", lambda a: a.sample(a.mlp, a.x2, "euler_maruyama", path=a.path, steps=3, key=0), TypeError,
     "jax.random.key(0)"),
    ("ddim no path", lambda a: a.sample(a.mlp, a.x2, "ddim", steps=3), ValueError, "pass sample(..., path=...)"),
    ("labels length", lambda a: a.sample(a.mlpc, a.x2, steps=3, cond={"y": a.jnp.zeros(3, a.jnp.int32)}), ValueError,
     "shape (B,)"),
    ("unroll 0", lambda a: a.sample(a.mlp, a.x2, steps=3, unroll=0), ValueError, "unroll"),
    ("field not callable", lambda a: a.sample(3, a.x2, steps=3), TypeError, "callable"),
    ("solver option", lambda a: a.get_solver("heun:foo=1"), ValueError, "its options are"),
    ("ddim eta", lambda a: a.get_solver("ddim:eta=2"), ValueError, "eta must be a number in [0, 1]"),
    ("dpm order", lambda a: a.samplers.DPMSolver(order=5), ValueError, "order must be one of"),
    ("diffrax rtol", lambda a: a.samplers.Diffrax(rtol=-1.0), ValueError, "rtol must be a finite number"),
    ("edm churn", lambda a: a.samplers.EDM(s_churn=-1.0), ValueError, "s_churn"),
    ("loss empty batch", lambda a: a.fm(a.mlp, a.jnp.ones((0, 2)), a.key), ValueError, "empty batch"),
    ("loss int data", lambda a: a.fm(a.mlp, a.jnp.ones((4, 2), a.jnp.int32), a.key), ValueError, "floating point"),
    ("loss nan data", lambda a: a.fm(a.mlp, a.x2.at[0, 0].set(a.jnp.inf), a.key), ValueError, "must be finite"),
    ("loss dict key", lambda a: a.fm(a.mlp, {"data": a.x2}, a.key), ValueError, "under key 'x'"),
    ("loss label sizes", lambda a: a.fm(a.mlpc, {"x": a.x2, "y": a.jnp.zeros(3, a.jnp.int32)}, a.key), ValueError,
     "leading size 3"),
    ("loss key int", lambda a: a.fm(a.mlp, a.x2, 0), TypeError, "PRNG key"),
    ("loss t_range", lambda a: a.losses.regression_loss(a.path, t_range=(0.9, 0.1)), ValueError, "t_range"),
    ("loss dropout", lambda a: a.losses.regression_loss(a.path, label_dropout=0.1), ValueError, "null_label"),
    ("reflow pairs", lambda a: a.losses.reflow_loss()(a.mlp, {"x0": a.x2, "x1": a.x2.astype(a.jnp.int32)}, a.key),
     ValueError, "floating point"),
    ("fit negative", lambda a: a.trainer.fit(a.state, -5, progress=False), ValueError, "num_steps must be >= 0"),
    ("fit float", lambda a: a.trainer.fit(a.state, 2.5, progress=False), ValueError, "num_steps must be an int"),
    ("fit chunk", lambda a: a.trainer.fit(a.state, 5, chunk=0, progress=False), ValueError, "chunk must be >= 1"),
    ("fit until negative", lambda a: a.trainer.fit(a.state, until_step=-1, progress=False), ValueError,
     "until_step must be >= 0"),
    ("trainer ema", lambda a: a.make_trainer(ema_decay=1.5), ValueError, "ema_decay"),
    ("trainer optimizer", lambda a: a.Trainer(a.mlp, a.fm, 1e-3), TypeError, "optax GradientTransformation"),
    ("trainer dtype", lambda a: a.make_trainer(compute_dtype=a.jnp.int32), ValueError, "floating-point dtype"),
    ("adam lr nan", lambda a: a.adam_with_schedule(float("nan")), ValueError, "learning_rate"),
    ("adam clip 0", lambda a: a.adam_with_schedule(1e-3, clip_norm=0.0), ValueError, "clip_norm"),
    ("checkpoint keep", lambda a: a.Checkpointer(a.tmp / "c1", max_to_keep=0), ValueError, "max_to_keep"),
    ("checkpoint file", lambda a: a.Checkpointer(a.file), NotADirectoryError, "is a file"),
    ("checkpoint missing", lambda a: a.Checkpointer(a.tmp / "none").restore(a.state), FileNotFoundError,
     "no checkpoint"),
    ("checkpoint nan", lambda a: a.Checkpointer(a.tmp / "c2", async_save=False).save(a.nan_state), FloatingPointError,
     "never checkpointed"),
    ("distribution name", lambda a: a.get_distribution("9gaussians"), ValueError, "Unknown distribution"),
    ("distribution nan", lambda a: a.get_distribution("moons", noise=float("nan")), ValueError, "must be finite"),
    ("digits split", lambda a: a.load_digits("test2"), ValueError, "Unknown split"),
    ("dataset nan", lambda a: a.ImageDataset(a.np.full((4, 8, 8, 1), a.np.nan, a.np.float32),
                                             a.np.zeros(4, a.np.int32), 10), ValueError, "hold NaN or inf"),
    ("dataset labels", lambda a: a.ImageDataset(a.np.zeros((4, 8, 8, 1), a.np.float32), a.np.full(4, 12), 10),
     ValueError, "[0, 10)"),
    ("dataset uint8", lambda a: a.ImageDataset(a.np.zeros((4, 8, 8, 1), a.np.uint8), a.np.zeros(4, a.np.int32), 10),
     ValueError, "uint8_to_float"),
    ("loader batch", lambda a: a.ImageLoader(a.load_digits("test"), 0), ValueError, "batch_size"),
    ("sliced dims", lambda a: a.metrics.sliced_wasserstein(a.jnp.ones((5, 2)), a.jnp.ones((5, 3)), a.key),
     ValueError, "feature dimension"),
    ("mmd nan", lambda a: a.metrics.mmd_rbf(a.jnp.full((5, 2), a.jnp.nan), a.jnp.ones((5, 2))), ValueError,
     "must be finite"),
    ("mmd bandwidth", lambda a: a.metrics.mmd_rbf(a.jnp.ones((5, 2)), a.jnp.ones((5, 2)), bandwidths=(0.0,)),
     ValueError, "bandwidths"),
    ("w2 sizes", lambda a: a.metrics.wasserstein2_exact(a.jnp.ones((5, 2)), a.jnp.ones((6, 2))), ValueError,
     "same number of samples"),
    ("frechet shapes", lambda a: a.metrics.frechet_distance(a.jnp.zeros(2), a.jnp.ones((2, 3)), a.jnp.zeros(2),
                                                            a.jnp.eye(2)), ValueError, "cov1"),
    ("likelihood nan", lambda a: a.log_likelihood(a.mlp, a.x2.at[0, 0].set(a.jnp.nan), path=a.path), ValueError,
     "x must be finite"),
    ("likelihood int", lambda a: a.log_likelihood(a.mlp, a.jnp.ones((4, 2), a.jnp.int32), path=a.path), ValueError,
     "dequantize"),
    ("likelihood tolerances", lambda a: a.log_likelihood(a.mlp, a.x2, path=a.path, rtol=0.0, atol=0.0), ValueError,
     "both 0"),
    ("likelihood probes", lambda a: a.log_likelihood(a.mlp, a.x2, path=a.path, divergence="hutchinson"), ValueError,
     "needs a PRNG key"),
    ("mixture weights", lambda a: a.GaussianMixture(a.jnp.zeros((2, 2)), a.jnp.stack([a.jnp.eye(2)] * 2),
                                                    a.jnp.array([0.5, 0.7])), ValueError, "sum to 1"),
]


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    import types

    import numpy as np
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    import jaxgen
    from jaxgen import fields, losses, metrics, paths, samplers
    from jaxgen.data import ImageDataset, ImageLoader, get_distribution, load_digits
    from jaxgen.models import MLPField, UNetField
    from jaxgen.oracle import GaussianMixture
    from jaxgen.training import Checkpointer, Trainer, adam_with_schedule

    a = types.SimpleNamespace(
        np=np, jax=jax, jnp=jnp, nnx=nnx, fields=fields, losses=losses, metrics=metrics, paths=paths,
        samplers=samplers, ImageDataset=ImageDataset, ImageLoader=ImageLoader, get_distribution=get_distribution,
        load_digits=load_digits, MLPField=MLPField, UNetField=UNetField, GaussianMixture=GaussianMixture,
        Checkpointer=Checkpointer, Trainer=Trainer, adam_with_schedule=adam_with_schedule)
    a.sample, a.get_solver, a.log_likelihood = jaxgen.sample, jaxgen.get_solver, jaxgen.log_likelihood
    a.key, a.x2, a.img = jax.random.key(0), jnp.linspace(-1.0, 1.0, 8).reshape(4, 2), jnp.zeros((2, 8, 8, 1))
    a.path = paths.GaussianPath.from_name("linear")
    a.fm = losses.flow_matching_loss(a.path)
    a.mlp = MLPField(2, width=8, hidden_layers=1, rngs=nnx.Rngs(0))
    a.mlpc = MLPField(2, width=8, hidden_layers=1, num_classes=3, rngs=nnx.Rngs(0))
    a.unet = UNetField(1, channels=8, channel_mult=(1,), attention_resolutions=(), num_groups=4, num_classes=3,
                       rngs=nnx.Rngs(0))
    a.make_trainer = lambda **kw: Trainer(MLPField(2, width=8, hidden_layers=1, rngs=nnx.Rngs(0)), a.fm,
                                          optax.adam(1e-3), data=lambda k: jax.random.normal(k, (8, 2)), **kw)
    a.trainer = a.make_trainer()
    a.state = a.trainer.init(0)
    a.nan_state = a.state._replace(params=jax.tree.map(lambda p: p * jnp.nan, a.state.params))
    a.tmp = tmp_path_factory.mktemp("api")
    a.file = a.tmp / "a_file"
    a.file.write_text("")
    return a


@pytest.mark.parametrize("call, kind, words", [c[1:] for c in API], ids=[c[0] for c in API])
def test_api_errors(api, call, kind, words):
    with pytest.raises(kind) as info:
        call(api)
    message = str(info.value)
    assert words in message, message
    origin = info.traceback[-1].path  # raised by jaxgen's own check, not from inside a dependency
    assert "site-packages" not in str(origin) and "jaxgen" in str(origin), (origin, message)


def test_the_table_covers_the_probe():
    assert len(API) + len(TRAIN_IMAGES) + len(TRAIN_TOY2D) + len(OTHER) >= 100
