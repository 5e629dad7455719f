"""Evaluation: the digits classifier generalises, its cache is exact and keyed, Fréchet distances are sane."""

import time

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx
from sklearn.datasets import load_digits

from jaxgen.evaluation import digits as ev
from jaxgen.metrics import feature_moments, frechet_distance, frechet_distance_from_features, gaussian_moments


def _leaves(model):
    return [np.asarray(v) for v in jax.tree.leaves(nnx.state(model))]


def _entries(cache):
    """The cache's entries: one checkpoint folder per key."""
    return sorted(p for p in cache.iterdir() if p.is_dir()) if cache.is_dir() else []


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    x = (d.images.astype(np.float32) / 8.0 - 1.0)[..., None]  # (N, 8, 8, 1) in [-1, 1]
    y = d.target.astype(np.int32)
    perm = np.random.default_rng(0).permutation(len(x))
    n_train = int(0.8 * len(x))
    tr, te = perm[:n_train], perm[n_train:]
    return x[tr], y[tr], x[te], y[te]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("digits_cache")


@pytest.fixture(scope="module")
def trained(digits, cache_dir):
    xtr, ytr, _, _ = digits
    t0 = time.perf_counter()
    clf = ev.load_or_train_digits_classifier(xtr, ytr, cache_dir=cache_dir)
    jax.block_until_ready(nnx.state(clf))
    return clf, time.perf_counter() - t0


@pytest.fixture(scope="module")
def clf(trained):
    return trained[0]


@pytest.fixture(scope="module")
def corrupted(digits):
    """Test images with no digit structure: uniform noise, and each image's pixels randomly permuted."""
    _, _, xte, _ = digits
    rng = np.random.default_rng(1)
    noise = rng.uniform(-1.0, 1.0, xte.shape).astype(np.float32)
    shuffled = np.stack([im.reshape(-1)[rng.permutation(im.size)].reshape(im.shape) for im in xte])
    return noise, shuffled


@pytest.mark.slow
def test_classifier_generalises(clf, digits):
    xtr, ytr, xte, yte = digits
    assert ev.classifier_accuracy(clf, xte, yte) >= 0.95
    assert ev.classifier_accuracy(clf, xtr, ytr) >= 0.98
    logits = clf(jnp.asarray(xte[:7]))
    assert logits.shape == (7, 10)
    assert clf.features(jnp.asarray(xte[:7])).shape[0] == 7
    with pytest.raises(ValueError, match="channels-last"):
        clf(jnp.zeros((2, 1, 8, 8)))


def test_cache_hit_is_identical_and_fast(trained, digits, cache_dir):
    clf, train_time = trained
    xtr, ytr, _, _ = digits
    assert len(_entries(cache_dir)) == 1
    t0 = time.perf_counter()
    again = ev.load_or_train_digits_classifier(xtr, ytr, cache_dir=cache_dir)
    load_time = time.perf_counter() - t0
    assert load_time < 1.0 and load_time < train_time
    for a, b in zip(_leaves(clf), _leaves(again)):
        np.testing.assert_array_equal(a, b)
    assert len(_entries(cache_dir)) == 1


@pytest.mark.slow
def test_cache_is_keyed_on_data_hparams_and_version(digits, tmp_path, monkeypatch):
    xtr, ytr, _, _ = digits
    x, y = xtr[:300], ytr[:300]
    monkeypatch.setenv("JAXGEN_CACHE", str(tmp_path))
    assert ev.default_cache_dir() == tmp_path / "digits_classifier"
    files = lambda: _entries(tmp_path / "digits_classifier")

    base = ev.load_or_train_digits_classifier(x, y, steps=30)  # cache_dir=None -> $JAXGEN_CACHE
    assert len(files()) == 1
    same = ev.load_or_train_digits_classifier(x.copy(), y.copy(), steps=30)
    assert len(files()) == 1
    for a, b in zip(_leaves(base), _leaves(same)):
        np.testing.assert_array_equal(a, b)

    y2 = y.copy()
    y2[0] = (y2[0] + 1) % 10  # one changed label
    changed = ev.load_or_train_digits_classifier(x, y2, steps=30)
    assert len(files()) == 2
    assert any(not np.array_equal(a, b) for a, b in zip(_leaves(base), _leaves(changed)))

    ev.load_or_train_digits_classifier(x, y, steps=30, seed=1)  # changed hyperparameter
    assert len(files()) == 3
    version = ev.CACHE_VERSION
    monkeypatch.setattr(ev, "CACHE_VERSION", version + "-bumped")  # changed recipe version
    ev.load_or_train_digits_classifier(x, y, steps=30)
    assert len(files()) == 4
    monkeypatch.setattr(ev, "CACHE_VERSION", version)

    for entry in files():  # corrupt caches are retrained, not trusted
        for f in entry.rglob("*"):
            if f.is_file():
                f.write_bytes(b"not a checkpoint")
    retrained = ev.load_or_train_digits_classifier(x, y, steps=30)
    for a, b in zip(_leaves(base), _leaves(retrained)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)

    with pytest.raises(TypeError, match="unknown training arguments"):
        ev.load_or_train_digits_classifier(x, y, stepz=3)


@pytest.mark.slow
def test_concurrent_callers_train_the_classifier_once(digits, tmp_path, monkeypatch):
    """Several callers at once (pytest-xdist workers, parallel runs) share one training and one cache entry."""
    import threading

    from jaxgen.training import Trainer

    xtr, ytr, _, _ = digits
    x, y = xtr[:300], ytr[:300]
    fits, fit = [], Trainer.fit
    monkeypatch.setattr(Trainer, "fit", lambda self, *a, **k: fits.append(1) or fit(self, *a, **k))
    start, models, errors = threading.Barrier(3), [None] * 3, []

    def call(i):
        try:
            start.wait()
            models[i] = ev.load_or_train_digits_classifier(x, y, steps=30, cache_dir=tmp_path)
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(fits) == 1 and len(_entries(tmp_path)) == 1
    for other in models[1:]:
        for a, b in zip(_leaves(models[0]), _leaves(other)):
            np.testing.assert_array_equal(a, b)


def test_frechet_distance_separates_real_from_corrupted(clf, digits, corrupted):
    xtr, _, xte, _ = digits
    noise, shuffled = corrupted
    feat = ev.classifier_feature_fn(clf)
    fd_floor = frechet_distance_from_features(feat, xtr, xte)
    fd_self = frechet_distance_from_features(feat, xte, xte)
    fd_noise = frechet_distance_from_features(feat, xte, noise)
    fd_shuffled = frechet_distance_from_features(feat, xte, shuffled)
    assert 0.0 < fd_floor
    assert abs(fd_self) < 0.1 * fd_floor
    assert fd_noise > 20 * fd_floor
    assert fd_shuffled > 20 * fd_floor
    # Precomputed reference moments give the same value.
    moments = feature_moments(feat, xte)
    assert frechet_distance_from_features(feat, moments, noise) == pytest.approx(fd_noise, rel=1e-5)


def test_guided_label_accuracy(clf, digits, corrupted):
    _, _, xte, yte = digits
    acc = ev.classifier_accuracy(clf, xte, yte)
    assert ev.guided_label_accuracy(clf, xte, yte) == pytest.approx(acc)
    assert acc >= 0.95
    shuffled_labels = np.random.default_rng(2).permutation(yte)
    assert abs(ev.guided_label_accuracy(clf, xte, shuffled_labels) - 0.1) < 0.05


def test_frechet_distance_identity_features_matches_closed_form():
    rng = np.random.default_rng(0)
    n, mu1, mu2 = 20000, np.array([1.0, -0.5, 0.0]), np.zeros(3)
    s1, s2 = np.array([1.0, 2.0, 0.5]), np.array([1.5, 1.0, 0.5])
    x = (mu1 + s1 * rng.standard_normal((n, 3))).astype(np.float32)
    y = (mu2 + s2 * rng.standard_normal((n + 123, 3))).astype(np.float32)
    # Diagonal covariances: FD = |mu1 - mu2|^2 + sum_i (s1_i - s2_i)^2.
    closed = float(np.sum((mu1 - mu2) ** 2) + np.sum((s1 - s2) ** 2))
    fd = frechet_distance_from_features(lambda a: a, x, y, batch_size=999)
    assert fd == pytest.approx(closed, rel=0.05)
    # Batching (with a ragged last batch) does not change the plug-in estimate.
    direct = float(frechet_distance(*gaussian_moments(x), *gaussian_moments(y)))
    assert fd == pytest.approx(direct, rel=1e-4, abs=1e-4)
    # Image-shaped outputs are flattened; jit=False accepts non-jittable feature functions.
    imgs = x[:, :, None, None]
    assert frechet_distance_from_features(lambda a: np.asarray(a), imgs, y[:, :, None, None], jit=False) \
        == pytest.approx(fd, rel=1e-4, abs=1e-4)


def test_digits_report(clf, digits):
    xtr, _, xte, yte = digits
    report = ev.digits_report(clf, xte, yte, xte, train_images=xtr)
    assert report["accuracy"] == pytest.approx(ev.classifier_accuracy(clf, xte, yte))
    assert len(report["per_class_accuracy"]) == 10 and min(report["per_class_accuracy"]) > 0.8
    assert sum(report["class_histogram"]) == pytest.approx(1.0)
    assert report["fd_floor_source"] == "train_vs_test"
    assert report["fd_floor"] == pytest.approx(
        frechet_distance_from_features(ev.classifier_feature_fn(clf), xtr, xte), rel=1e-4)
    assert abs(report["fd"]) < 0.1 * report["fd_floor"]

    uncond = ev.digits_report(clf, xtr[:360], None, xte)
    assert uncond["accuracy"] is None and uncond["per_class_accuracy"] is None
    assert uncond["fd_floor_source"] == "split_half" and uncond["fd"] > 0
