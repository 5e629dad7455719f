"""VQ-VAE: nearest codes, the straight-through gradient, the EMA codebook (hand-computed step, k-means fixed point,
carried by the Trainer), usage statistics, the loss's terms, and the recipe."""

import numpy as np
import jax
import jax.numpy as jnp
import optax
import pytest
from flax import nnx

from experiments.recipes import Context
from experiments.recipes.vqvae import build_vqvae
from jaxgen.losses.vq import (code_histogram, codes_used, ema_codebook_update, nearest_code, perplexity,
                              squared_distances, straight_through, vqvae_loss)
from jaxgen.models.vqvae import VQVAE, EMACodebook, VectorQuantizer
from jaxgen.training import Trainer


def _moons(key, n=32):
    from jaxgen.data.toy2d import get_distribution
    return {"x": get_distribution("moons")(key, n)}


# -- nearest codes and the straight-through estimator ----------------------------------------------------------------
def test_nearest_code_matches_brute_force():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(7, 3, 4)).astype(np.float32)
    e = rng.normal(size=(10, 4)).astype(np.float32)
    brute_d = ((z[..., None, :] - e) ** 2).sum(-1)  # (7, 3, 10)
    np.testing.assert_allclose(squared_distances(jnp.asarray(z), jnp.asarray(e)), brute_d, rtol=1e-5, atol=1e-5)
    idx = np.asarray(nearest_code(jnp.asarray(z), jnp.asarray(e)))
    assert idx.shape == (7, 3) and idx.dtype == np.int32
    np.testing.assert_array_equal(idx, brute_d.argmin(-1))
    # the quantiser returns those codes' vectors, and z_q has their value
    vq = VectorQuantizer(10, 4, rngs=nnx.Rngs(0))
    vq.codebook[...] = jnp.asarray(e)
    q = vq(jnp.asarray(z))
    np.testing.assert_array_equal(q.indices, brute_d.argmin(-1))
    np.testing.assert_allclose(q.z_q, e[brute_d.argmin(-1)], atol=1e-6)
    np.testing.assert_array_equal(q.codes, e[brute_d.argmin(-1)])


def test_straight_through_gradient_is_the_gradient_at_the_code():
    rng = np.random.default_rng(1)
    z_e = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
    e = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
    f = lambda z: jnp.sum(jnp.sin(2.0 * z) * w) + jnp.sum(z**3)  # nonlinear: f'(q) != f'(z_e)
    vq = VectorQuantizer(6, 3, rngs=nnx.Rngs(0))
    vq.codebook[...] = e

    @jax.jit
    def gradients(z_e, e, vq):
        q = e[nearest_code(z_e, e)]
        through = jax.grad(lambda z: f(straight_through(z, e[nearest_code(z, e)])))(z_e)
        module = jax.grad(lambda z: f(vq(z).z_q))(z_e)  # the same through the module
        return through, module, jax.grad(f)(q), jax.grad(f)(z_e)

    through, module, at_q, at_z = gradients(z_e, e, vq)
    np.testing.assert_allclose(through, at_q, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(module, at_q, rtol=1e-5, atol=1e-6)
    assert not np.allclose(at_q, at_z, atol=1e-3)  # the test can tell the two apart


# -- the EMA codebook -------------------------------------------------------------------------------------------------
def test_ema_update_matches_the_formula_by_hand():
    # K = 2 codes in D = 1; vectors 1, 3 -> code 0 and 9 -> code 1; decay 1/2, smoothing eps = 1/2
    n, m, e = ema_codebook_update(jnp.array([1.0, 1.0]), jnp.array([[0.0], [10.0]]), jnp.array([[1.0], [3.0], [9.0]]),
                                  jnp.array([0, 0, 1]), decay=0.5, eps=0.5)
    np.testing.assert_allclose(n, [1.5, 1.0])            # 0.5 * 1 + 0.5 * 2, 0.5 * 1 + 0.5 * 1
    np.testing.assert_allclose(m, [[2.0], [9.5]])        # 0.5 * 0 + 0.5 * 4, 0.5 * 10 + 0.5 * 9
    # smoothed sizes (N + 1/2) / (2.5 + 1) * 2.5 = 10/7, 15/14; codes m / N~
    np.testing.assert_allclose(e, [[2.0 * 7 / 10], [9.5 * 14 / 15]], rtol=1e-6)


def test_quantizer_training_pass_applies_the_ema_update_and_only_then():
    vq = VectorQuantizer(2, 1, decay=0.5, eps=0.5, rngs=nnx.Rngs(0))
    vq.codebook[...] = jnp.array([[0.0], [10.0]])
    vq.embed_sum[...] = jnp.array([[0.0], [10.0]])
    z = jnp.array([[1.0], [3.0], [9.0]])
    q = vq(z)  # not training: nothing moves
    np.testing.assert_array_equal(vq.codebook[...], [[0.0], [10.0]])
    np.testing.assert_array_equal(vq.cluster_size[...], [1.0, 1.0])
    q = vq(z, update=True)
    np.testing.assert_array_equal(q.codes, [[0.0], [0.0], [10.0]])  # assigned with the codebook before the update
    np.testing.assert_allclose(vq.cluster_size[...], [1.5, 1.0])
    np.testing.assert_allclose(vq.embed_sum[...], [[2.0], [9.5]])
    np.testing.assert_allclose(vq.codebook[...], [[1.4], [9.5 * 14 / 15]], rtol=1e-6)
    assert isinstance(vq.codebook, EMACodebook) and not isinstance(vq.codebook, nnx.Param)
    assert not jax.tree.leaves(nnx.state(vq, nnx.Param))  # nothing for an optimizer to train


def test_ema_codebook_converges_to_the_cluster_means():
    rng = np.random.default_rng(2)
    centres = np.array([[-6.0, 0.0], [6.0, 0.0], [0.0, 9.0]], np.float32)
    sizes = np.array([50, 80, 30])
    data = np.concatenate([c + rng.normal(size=(s, 2)) for c, s in zip(centres, sizes)]).astype(np.float32)
    means = np.stack([data[:50].mean(0), data[50:130].mean(0), data[130:].mean(0)])
    init = centres + np.array([[2.0, 1.5], [-2.0, 2.0], [1.0, -2.5]], np.float32)  # off, but nearest its own cluster

    def step(carry, _):
        n, m, e = carry
        n, m, e = ema_codebook_update(n, m, data, nearest_code(jnp.asarray(data), e), decay=0.9)
        return (n, m, e), None

    (n, _, e), _ = jax.lax.scan(step, (jnp.ones(3), jnp.asarray(init), jnp.asarray(init)), None, length=250)
    np.testing.assert_allclose(e, means, atol=1e-3)    # the k-means fixed point: every code at its cluster's mean
    np.testing.assert_allclose(n, sizes, rtol=1e-4)    # and N_i at the cluster sizes
    assert np.abs(init - means).max() > 1.0


def test_nothing_but_the_training_pass_moves_the_state():
    model = VQVAE((2,), num_codes=8, code_dim=3, width=8, depth=1, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (16, 2))
    stats = lambda m: nnx.state(m, nnx.Not(nnx.Param))

    @jax.jit
    def evaluate(model, x):  # every method but the training pass, then the state they leave and the decodings
        recon = model(x).reconstruction
        z = model.encode_latent(x)
        decoded = [model.decode_latent(z), model.decode_latent(z + 1e-4 * jnp.sin(z)),
                   model.decode_latent(model.encode(x)), model.decode_indices(model.code_indices(x))]
        model.sample(jax.random.key(1), 3)
        vqvae_loss(update_codebook=False)(model, {"x": x}, jax.random.key(2))
        return stats(model), recon, decoded

    @jax.jit
    def train(model, x):
        model(x, update=True)
        return stats(model)

    before = jax.tree.map(np.array, stats(model))
    after, recon, decoded = evaluate(model, x)
    jax.tree.map(np.testing.assert_array_equal, before, after)
    for d in decoded:  # the latent interface: code vectors (perturbed too, or unquantised) decode to the reconstruction
        np.testing.assert_allclose(d, recon, rtol=1e-5, atol=1e-6)
    after = train(model, x)
    assert not np.array_equal(after["quantizer"]["codebook"][...], before["quantizer"]["codebook"][...])
    assert not np.array_equal(after["position_usage"][...], before["position_usage"][...])


# -- usage statistics -------------------------------------------------------------------------------------------------
def test_perplexity_and_codes_used():
    k = 16
    stats = jax.jit(lambda p: (perplexity(p), codes_used(p)))
    probs = jnp.stack([jnp.full(k, 1 / k), jax.nn.one_hot(3, k), jnp.zeros(k).at[:2].set(0.5),
                       jnp.zeros(k).at[:2].set(2.0)])  # uniform, one-hot, two codes, two codes as counts
    ppl, used = stats(probs)
    np.testing.assert_allclose(ppl, [k, 1.0, 2.0, 2.0], rtol=1e-5)
    np.testing.assert_allclose(used, [1.0, 1 / k, 2 / k, 2 / k])
    hist = jax.jit(code_histogram, static_argnums=1)(jnp.array([[0, 1], [1, 1], [5, 0]]), 8)
    np.testing.assert_allclose(hist, [2 / 6, 3 / 6, 0, 0, 0, 1 / 6, 0, 0], rtol=1e-6)
    ppl, used = stats(jnp.pad(hist, (0, k - 8)))
    np.testing.assert_allclose(ppl, np.exp(-sum(p * np.log(p) for p in (1 / 3, 1 / 2, 1 / 6))), rtol=1e-5)
    np.testing.assert_allclose(used, 3 / k)
    with pytest.raises(ValueError, match="num_codes"):
        code_histogram(jnp.array([0]), 0)


# -- the loss and the Trainer -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small():
    """A small 2-D VQ-VAE with an EMA codebook, its trainer and a state after 3 steps (on given batches: one compiled
    step for the fixture and the test)."""
    model = VQVAE((2,), num_codes=8, code_dim=2, width=16, depth=1, latents=2, rngs=nnx.Rngs(0))
    trainer = Trainer(model, vqvae_loss(0.25), optax.adam(1e-2), data=_moons)
    state0 = trainer.init(0)
    state, losses = state0, []
    for i in range(3):
        state, loss = trainer.step(state, _moons(jax.random.key(10 + i)))
        losses.append(loss)
    return trainer, state0, state, np.asarray(losses)


def test_trainer_carries_the_ema_codebook(small):
    trainer, state0, state, losses = small
    assert np.all(np.isfinite(losses))
    param_paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state.params)[0]]
    assert param_paths and not any("codebook" in p for p in param_paths)  # not a parameter, not optimised
    book0, book = state0.rest["quantizer"]["codebook"][...], state.rest["quantizer"]["codebook"][...]
    assert not np.allclose(book0, book)
    model = trainer.model(state)
    np.testing.assert_array_equal(model.quantizer.codebook[...], book)
    # one more step on a known batch is exactly one EMA update of the carried state, with the step's encoder
    batch = _moons(jax.random.key(7))
    new, _ = trainer.step(state, batch)

    @jax.jit
    def expected(model, x):
        z_e = model.encode(x)
        vq = model.quantizer
        return ema_codebook_update(vq.cluster_size[...], vq.embed_sum[...], z_e, nearest_code(z_e, vq.embeddings),
                                   decay=0.99, eps=1e-5)

    n, m, e = expected(model, batch["x"])
    np.testing.assert_allclose(new.rest["quantizer"]["cluster_size"][...], n, rtol=1e-5)
    np.testing.assert_allclose(new.rest["quantizer"]["embed_sum"][...], m, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(new.rest["quantizer"]["codebook"][...], e, rtol=1e-4, atol=1e-6)


def test_loss_terms_and_where_their_gradients_go():
    model = VQVAE((2,), num_codes=8, code_dim=2, width=16, depth=1, latents=2, ema=False, rngs=nnx.Rngs(1))
    assert isinstance(model.quantizer.codebook, nnx.Param)
    batch, key = _moons(jax.random.key(3), 16), jax.random.key(0)

    @jax.jit
    def run(model):
        out = model(batch["x"])
        values = [vqvae_loss(beta, update_codebook=False)(model, batch, key) for beta in (0.0, 0.25, 1.0)]
        grads = [nnx.grad(lambda m, beta=beta: vqvae_loss(beta, update_codebook=False)(m, batch, key))(model)
                 for beta in (0.0, 1.0)]
        return out, values, grads

    out, values, (g0, g1) = run(model)
    recon = float(jnp.mean((out.reconstruction - batch["x"]) ** 2))
    gap = float(jnp.mean((out.z_e - out.codes) ** 2))
    for beta, value in zip((0.0, 0.25, 1.0), values):
        np.testing.assert_allclose(value, recon + gap + beta * gap, rtol=1e-5)  # codebook term + beta * commitment
    # the commitment term moves the encoder only; the codebook's gradient is the codebook term's alone, pulling each
    # used code towards its vectors: d/de_k mean ||sg(z_e) - e||^2 = -2 sum_{j -> k} (z_j - e_k) / (M D)
    np.testing.assert_allclose(g0["quantizer"]["codebook"][...], g1["quantizer"]["codebook"][...], atol=1e-7)
    assert not np.allclose(g0["encoder"][0]["kernel"][...], g1["encoder"][0]["kernel"][...])
    z = np.asarray(out.z_e).reshape(-1, 2)
    idx = np.asarray(out.indices).reshape(-1)
    e = np.asarray(model.quantizer.codebook[...])
    want = np.zeros_like(e)
    np.add.at(want, idx, -2.0 * (z - e[idx]) / z.size)
    np.testing.assert_allclose(g0["quantizer"]["codebook"][...], want, rtol=1e-4, atol=1e-7)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="divisible"):
        VQVAE((9, 9, 1), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="decay"):
        VectorQuantizer(4, 2, decay=1.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="commitment"):
        vqvae_loss(-1.0)
    model = VQVAE((2,), num_codes=4, code_dim=2, width=8, depth=1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="shape"):
        model(jnp.zeros((3, 3)))
    with pytest.raises(ValueError, match="Python bool"):
        model.quantizer(jnp.zeros((3, 2)), update=jnp.array(True))
    with pytest.raises(ValueError, match="no option"):
        build_vqvae(Context(shape=(2,), options={"codes": 4}))


# -- the recipe -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2,), pytest.param((8, 8, 1), marks=pytest.mark.slow)])  # images: the full suite
def test_recipe_smoke(shape):
    ctx = Context(shape=shape, width=8, depth=1, batch_size=8, steps=3,
                  options={"num_codes": 8, "code_dim": 2, "ema": shape == (2,)})
    r = build_vqvae(ctx)
    assert r.log_likelihood is None and "unigram" in r.sampler and not r.conditional

    def data(key):
        x = jax.random.uniform(key, (8,) + shape, minval=-1.0, maxval=1.0)
        return {"x": x}

    trainer = Trainer(r.model, r.objective, r.optimizer, data=data, ema_decay=r.ema_decay, fuse_steps=r.fuse_steps)
    state, losses = trainer.steps(trainer.init(0), 3)
    assert np.all(np.isfinite(np.asarray(losses)))
    model = trainer.model(state)
    samples, nfe = jax.jit(lambda k: r.generate(model, k, 5, None))(jax.random.key(0))
    assert samples.shape == (5,) + shape and nfe == 1 and np.all(np.isfinite(samples))
    diag = r.diagnostics(model, data(jax.random.key(1))["x"], jax.random.key(2))
    assert 1.0 <= diag["codebook_perplexity"] <= 8.0 + 1e-4 and 1 <= diag["codes_used"] <= 8
    assert all(np.isfinite(v) for v in diag.values())


@pytest.mark.slow
@pytest.mark.optimised
def test_vqvae_reconstructs_held_out_digits():
    from jaxgen.data.images import device_sampler, load_digits

    train, test = load_digits("train"), load_digits("test")
    r = build_vqvae(Context(shape=(8, 8, 1), width=32, depth=2, batch_size=128, steps=600,
                            options={"downsample": 1}))
    trainer = Trainer(r.model, r.objective, r.optimizer, data=device_sampler(train, 128, with_labels=False))
    state, losses = trainer.fit(trainer.init(0), 600, progress=False)
    x = jnp.asarray(test.images)
    diag = r.diagnostics(trainer.model(state), x)
    mean_image_mse = float(jnp.mean((x - jnp.asarray(train.images).mean(0)) ** 2))
    # a discrete bottleneck (a 4x4 grid of codes from 64) that still reconstructs unseen digits: well under the
    # mean-image error
    assert diag["reconstruction_mse"] < 0.05 < 0.2 * mean_image_mse, (diag, mean_image_mse)
    assert diag["codebook_perplexity"] > 20 and diag["codes_used"] >= 48, diag  # the EMA codebook is well used
