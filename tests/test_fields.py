"""Field algebra: exact round trips, agreement with the oracle, endpoint safety, SDE drift and guidance."""

import itertools

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from jaxgen import fields
from jaxgen.fields import PREDICTIONS, convert
from jaxgen.oracle import GaussianMixture
from jaxgen.paths import GaussianPath

NAMES = ["linear", "cosine", "polynomial", "vp", "sub_vp", "ve", "edm"]
PATHS = {n: GaussianPath.from_name(n) for n in NAMES}
GM = GaussianMixture.isotropic(jnp.array([[-1.0, 0.5], [1.5, -0.5], [0.0, 2.0]]), jnp.array([0.3, 0.5, 0.4]),
                               jnp.array([0.3, 0.3, 0.4]))
B = 64


def _inputs(path, lo=0.1, hi=0.9, seed=0):
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    t = jax.random.uniform(k1, (B,), minval=lo, maxval=hi)
    z = GM.sample(k2, B)
    x = path.sample(z, jax.random.normal(k3, z.shape), t)
    return x, t


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_round_trips_all_pairs(name):
    """A -> B -> A is the identity for every pair of parameterisations (to 1e-5 relative)."""
    path = PATHS[name]
    x, t = _inputs(path)
    for a, b in itertools.permutations(PREDICTIONS, 2):
        out = GM.field(path, a)(x, t)
        back = convert(path, convert(path, out, x, t, source=a, target=b), x, t, source=b, target=a)
        scale = float(jnp.abs(out).max()) + float(jnp.abs(x).max())
        np.testing.assert_allclose(back, out, atol=1e-5 * scale, rtol=1e-5, err_msg=f"{name}: {a}->{b}->{a}")


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_conversions_agree_with_oracle(name):
    """Converting any oracle prediction gives the oracle's other predictions (in float64: close to the data,
    data -> score divides ``alpha x0 - x`` by ``sigma^2`` and float32 rounding alone is amplified past any fixed
    tolerance)."""
    with jax.enable_x64(True):
        gm = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), GM)
        path = PATHS[name]
        k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
        t = jax.random.uniform(k1, (B,), jnp.float64, minval=0.02, maxval=0.98)
        z = gm.sample(k2, B)
        x = path.sample(z, jax.random.normal(k3, z.shape, jnp.float64), t)
        assert x.dtype == jnp.float64
        outputs = {p: gm.field(path, p)(x, t) for p in PREDICTIONS}
        np.testing.assert_allclose(outputs["score"], gm.marginal_score(path, x, t), rtol=1e-10)
        for a, b in itertools.permutations(PREDICTIONS, 2):
            got = convert(path, outputs[a], x, t, source=a, target=b)
            assert got.dtype == jnp.float64, (a, b)
            scale = float(jnp.abs(outputs[b]).max())
            np.testing.assert_allclose(got, outputs[b], rtol=1e-8, atol=1e-9 * scale, err_msg=f"{name}: {a}->{b}")


def test_named_conversions_are_the_notes_formulas():
    """u = (beta^2 da/a - db beta) s + (da/a) x (eq. 4.2.3); s = -eps/beta; Tweedie z = (x + beta^2 s)/a."""
    path = PATHS["cosine"]
    x, t = _inputs(path)
    a, b, da, db = (v[:, None] for v in path.coefficients(t))
    s = GM.marginal_score(path, x, t)
    np.testing.assert_allclose(fields.score_to_velocity(path, s, x, t), (b**2 * da / a - db * b) * s + da / a * x, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(fields.score_to_eps(path, s, x, t), -b * s, rtol=1e-6)
    np.testing.assert_allclose(fields.tweedie_data(path, s, x, t), (x + b**2 * s) / a, rtol=1e-4, atol=1e-5)
    u = GM.marginal_velocity(path, x, t)
    np.testing.assert_allclose(fields.velocity_to_score(path, u, x, t), s, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(fields.eps_to_score(path, -b * s, x, t), s, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_no_nan_or_inf_anywhere_on_closed_interval(name):
    path = PATHS[name]
    t = jnp.concatenate([jnp.zeros(8), jnp.ones(8), jnp.linspace(0, 1, B - 16)])
    z = GM.sample(jax.random.key(3), B)
    x = path.sample(z, jax.random.normal(jax.random.key(4), z.shape), t)
    for a in PREDICTIONS:
        out = GM.field(path, a)(x, t)
        assert np.all(np.isfinite(np.asarray(out))), (name, a)
        for b in PREDICTIONS:
            assert np.all(np.isfinite(np.asarray(convert(path, out, x, t, source=a, target=b)))), (name, a, b)


@pytest.mark.parametrize("name", ["linear", "cosine", "vp", "ve"])
def test_score_from_velocity_is_exact_at_noise_end(name):
    """p_0 = N(0, beta_0^2 I) for any data, so the score at t=0 is -x / beta_0^2; no division by alpha_0 = 0."""
    path = PATHS[name]
    x = 2.0 * jax.random.normal(jax.random.key(5), (B, 2))
    t = jnp.zeros(B)
    s = fields.velocity_to_score(path, GM.marginal_velocity(path, x, t), x, t)
    b0 = float(path.coefficients(jnp.zeros(())).beta)
    a0 = float(path.coefficients(jnp.zeros(())).alpha)
    if a0 == 0.0:
        np.testing.assert_allclose(s, -x / b0**2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s, GM.marginal_score(path, x, t), rtol=1e-4, atol=1e-6)


def test_aliases_and_unknown_prediction():
    assert fields.canonical_prediction("x0") == "data"
    assert fields.canonical_prediction("noise") == "eps"
    with pytest.raises(ValueError, match="unknown prediction type 'banana'"):
        fields.canonical_prediction("banana")


def test_sde_drift_is_extension_trick():
    u, s = jnp.ones((3, 2)), 2 * jnp.ones((3, 2))
    np.testing.assert_allclose(fields.sde_drift(u, s, 0.5), 1 + 0.125 * 2)
    np.testing.assert_allclose(fields.sde_drift(u, s, jnp.array([0.0, 1.0, 2.0]))[:, 0], [1.0, 2.0, 5.0])


def test_sde_drift_field_from_eps_model_matches_velocity_and_score():
    path = PATHS["vp"]
    x, t = _inputs(path)
    sigma = lambda tt: 0.3 + tt
    drift = fields.sde_drift_field(path, GM.field(path, "eps"), sigma, prediction="eps")(x, t)
    want = GM.marginal_velocity(path, x, t) + 0.5 * (0.3 + t[:, None]) ** 2 * GM.marginal_score(path, x, t)
    np.testing.assert_allclose(drift, want, rtol=1e-4, atol=1e-4)


def test_classifier_free_guidance_combination_and_doubled_batch():
    cond, uncond = jnp.full((2, 2), 3.0), jnp.full((2, 2), 1.0)
    np.testing.assert_allclose(fields.cfg_combine(cond, uncond, 0.0), uncond)
    np.testing.assert_allclose(fields.cfg_combine(cond, uncond, 1.0), cond)
    np.testing.assert_allclose(fields.cfg_combine(cond, uncond, 2.0), 5.0)
    calls = []

    def field(x, t, y):
        calls.append(x.shape)
        return x * 0 + y[:, None].astype(x.dtype)

    g = fields.guided_field(field, 3.0, null_label=10)
    out = g(jnp.zeros((4, 2)), jnp.full((4,), 0.5), y=jnp.array([1, 2, 3, 4]))
    assert calls == [(8, 2)]  # one network call on the doubled batch
    np.testing.assert_allclose(out[:, 0], (1 - 3) * 10 + 3 * np.array([1, 2, 3, 4]))
    for bad in (float("nan"), float("inf"), jnp.array([1.0, jnp.nan])):
        with pytest.raises(ValueError, match="guidance_scale must be finite"):
            fields.guided_field(field, bad, null_label=10)
    traced = jax.jit(lambda w: fields.guided_field(field, w, null_label=10)(
        jnp.zeros((4, 2)), 0.5, y=jnp.array([1, 2, 3, 4])))(2.0)  # a traced scale is not checked
    np.testing.assert_allclose(traced[:, 0], (1 - 2) * 10 + 2 * np.array([1, 2, 3, 4]))


def test_guided_field_over_token_sequences_doubles_the_other_conditioning():
    """A caption's tokens (B, L) guide like class labels, their null the all-padding sequence; a per-sample control
    array is the same in both halves of the doubled batch, scalars pass as they are."""
    seen = {}

    def field(x, t, tokens, control, scale):
        seen.update(tokens=tokens, control=control, scale=scale)
        return x * 0 + (tokens.sum(-1) + control[:, 0])[:, None].astype(x.dtype) * scale

    tokens = jnp.array([[3, 4, 0], [5, 0, 0]])
    control = jnp.array([[10.0], [20.0]])
    out = fields.guided_field(field, 2.0, null_label=0, label_key="tokens")(
        jnp.zeros((2, 1)), 0.5, tokens=tokens, control=control, scale=1.0)
    np.testing.assert_array_equal(seen["tokens"], [[3, 4, 0], [5, 0, 0], [0, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(seen["control"][:, 0], [10, 20, 10, 20])
    # (1 - w) (0 + c) + w (sum + c) = c + w sum
    np.testing.assert_allclose(out[:, 0], [10 + 2 * 7, 20 + 2 * 5])
    with pytest.raises(ValueError, match="must have shape"):
        fields.guided_field(field, 2.0, null_label=0, label_key="tokens")(
            jnp.zeros((2, 1)), 0.5, tokens=tokens[:1], control=control, scale=1.0)


def test_label_dropout_drops_a_token_sequence_as_a_whole():
    from jaxgen.losses import regression_loss

    seen = []

    def field(x, t, tokens):
        seen.append(tokens)
        return x * 0

    loss = regression_loss("linear", "velocity", label_dropout=0.5, null_label=0, label_key="tokens")
    tokens = jnp.tile(jnp.array([[7, 8, 9]]), (256, 1))
    loss(field, {"x": jnp.ones((256, 2)), "tokens": tokens}, jax.random.key(0))
    got = np.asarray(seen[-1])
    rows_kept = np.all(got == [7, 8, 9], axis=1)
    rows_null = np.all(got == 0, axis=1)
    assert np.all(rows_kept | rows_null)  # never partly dropped
    assert 0.35 < rows_null.mean() < 0.65


def test_as_field_converts_outputs():
    path = PATHS["linear"]
    x, t = _inputs(path)
    f = fields.as_field(path, GM.field(path, "eps"), source="noise", target="velocity")
    np.testing.assert_allclose(f(x, t), GM.marginal_velocity(path, x, t), rtol=1e-4, atol=1e-4)


def test_conversion_rejects_mismatched_shapes():
    path = PATHS["linear"]
    with pytest.raises(ValueError, match="shape mismatch"):
        convert(path, jnp.ones((4, 2)), jnp.ones((4, 3)), 0.5, source="eps", target="velocity")


@pytest.mark.slow
def test_velocity_decoding_where_the_determinant_vanishes():
    """polynomial(2) has alpha = d_alpha = d_beta = 0 at t = 0 (u_0 = 0 for every z): eps = x, score = -x."""
    path = GaussianPath.from_name("polynomial", n=2.0)
    x = jax.random.normal(jax.random.key(9), (8, 2))
    t = jnp.zeros(8)
    u = GM.marginal_velocity(path, x, t)
    np.testing.assert_allclose(convert(path, u, x, t, source="velocity", target="eps"), x, rtol=1e-5)
    np.testing.assert_allclose(convert(path, u, x, t, source="velocity", target="score"), -x, rtol=1e-5)


def test_conversions_accept_schedule_names():
    x = jnp.ones((2, 2))
    np.testing.assert_allclose(convert("linear", x, x, 0.5, source="eps", target="data"),
                               convert(PATHS["linear"], x, x, 0.5, source="eps", target="data"))


@pytest.mark.slow
def test_classifier_guidance_with_the_exact_classifier_gives_the_conditional_field():
    """With p(y|x_t) from the oracle (component posterior) and w = 1, the guided score is the score of
    the y-th component's path."""
    path = PATHS["cosine"]
    x, t = _inputs(path, 0.2, 0.8)

    def log_prob(xx, tt, y):
        a, b, _, _ = (v[:, None] for v in path.coefficients(tt))
        logits = jnp.stack([GaussianMixture.isotropic(GM.means[k:k + 1], jnp.sqrt(GM.covs[k, 0, 0]))
                            .marginal_log_prob(path, xx, tt) for k in range(3)], -1) + jnp.log(GM.weights)
        return jnp.take_along_axis(jax.nn.log_softmax(logits, -1), y[:, None], -1)[:, 0]

    y = jnp.full((B,), 2)
    guided = fields.classifier_guided_field(path, GM.field(path, "velocity"), log_prob, 1.0)(x, t, y=y)
    comp = GaussianMixture.isotropic(GM.means[2:3], jnp.sqrt(GM.covs[2, 0, 0]))
    np.testing.assert_allclose(guided, comp.marginal_velocity(path, x, t), rtol=1e-3, atol=1e-3)


def test_label_dropout_replaces_labels_with_null():
    from jaxgen.losses import flow_matching_loss

    seen = {}

    def field(x, t, y):
        seen["y"] = y
        return jnp.zeros_like(x)

    flow_matching_loss("linear", label_dropout=0.5, null_label=10)(field, {"x": jnp.zeros((1000, 2)), "y": jnp.zeros(1000, jnp.int32)}, jax.random.key(0))
    frac = float(jnp.mean(seen["y"] == 10))
    assert 0.45 < frac < 0.55 and set(np.unique(np.asarray(seen["y"]))) == {0, 10}
    with pytest.raises(ValueError, match="null_label"):
        flow_matching_loss("linear", label_dropout=0.1)


@pytest.mark.slow
def test_chunked_field_equals_the_field_with_padding_and_split_conditions():
    w = jax.random.normal(jax.random.key(0), (3, 3))

    def field(x, t, y, scale):
        return jnp.tanh(x @ w) * t[:, None] + y[:, None] * scale

    x = jax.random.normal(jax.random.key(1), (10, 3))
    t, y = jnp.linspace(0, 1, 10), jnp.arange(10.0)
    direct = field(x, t, y=y, scale=0.5)
    for size in (1, 3, 4, 10, 16):
        np.testing.assert_allclose(fields.chunked_field(field, size)(x, t, y=y, scale=0.5), direct, rtol=1e-6)
    # a scalar time is broadcast; chunking composes with guidance (one doubled-batch call, then chunks)
    np.testing.assert_allclose(fields.chunked_field(field, 4)(x, 0.3, y=y, scale=0.5),
                               field(x, jnp.full(10, 0.3), y=y, scale=0.5), rtol=1e-6)
    g = lambda f: fields.guided_field(lambda x, t, y: f(x, t, y=y, scale=1.0), 2.0, null_label=-1)
    np.testing.assert_allclose(g(fields.chunked_field(field, 3))(x, t, y=y), g(field)(x, t, y=y), rtol=1e-6)
    with pytest.raises(ValueError, match="chunk_size"):
        fields.chunked_field(field, 0)


@pytest.mark.parametrize("source,target,prediction", [("linear", "vp", "eps"), ("cosine", "ve", "velocity"),
                                                      ("vp", "linear", "data"), ("linear", "edm", "v")])
@pytest.mark.slow
def test_change_path_gives_the_oracle_field_of_the_other_path(source, target, prediction):
    """The same data on two Gaussian paths: the field of one path, moved onto the other by log-SNR matching and
    scaling, is the other path's exact field (the oracle's, in the same parameterisation)."""
    src, tgt = GaussianPath.from_name(source), GaussianPath.from_name(target)
    gm = GaussianMixture.isotropic(jnp.array([[1.0, -1.0], [-1.5, 0.5]]), 0.4)
    t = jnp.linspace(tgt.schedule.t_min + 0.05, tgt.schedule.t_max - 0.05, 16)
    x = tgt.sample(gm.sample(jax.random.key(0), 16), jax.random.normal(jax.random.key(1), (16, 2)), t)
    moved = fields.change_path(gm.field(src, prediction), source=src, target=tgt, prediction=prediction)
    got, want = jax.jit(lambda x, t: (moved(x, t), gm.field(tgt, prediction)(x, t)))(x, t)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))
