"""Digits sample metrics: the classifier score (Inception-Score style), class balance, label consistency and k-NN
manifold metrics in the classifier's feature space, gathered by digits_sample_metrics. A nearest-centroid classifier
whose features are the pixels stands in for the trained one, so every number has an independent reference."""

import numpy as np
import pytest
import jax.numpy as jnp
from flax import nnx
from sklearn.datasets import load_digits

from jaxgen.evaluation import digits as ev
from jaxgen.metrics.manifold import manifold_metrics


class CentroidClassifier(nnx.Module):
    """``features(x)`` = the pixels; logits = ``-beta * |x - centroid_c|^2`` (nearest-centroid rule)."""

    def __init__(self, centroids, beta):
        self.centroids = nnx.Param(jnp.asarray(centroids, jnp.float32))
        self.beta = float(beta)
        self.num_classes = int(centroids.shape[0])

    def features(self, x):
        return jnp.asarray(x, jnp.float32).reshape(x.shape[0], -1)

    def __call__(self, x):
        f = self.features(x)
        return -self.beta * jnp.sum((f[:, None, :] - self.centroids[...][None]) ** 2, axis=-1)


@pytest.fixture(scope="module")
def data():
    d = load_digits()
    x = (d.images.astype(np.float32) / 8.0 - 1.0)[..., None]
    y = d.target.astype(np.int32)
    perm = np.random.default_rng(0).permutation(len(x))
    tr, te = perm[:1400], perm[1400:1760]
    return x[tr], y[tr], x[te], y[te]


@pytest.fixture(scope="module")
def clf(data):
    xtr, ytr, _, _ = data
    centroids = np.stack([xtr[ytr == c].reshape(-1, 64).mean(0) for c in range(10)])
    return CentroidClassifier(centroids, beta=0.5)


def test_class_balance():
    uniform = ev.class_balance(np.arange(50) % 10, 10)
    assert uniform["class_histogram"] == [0.1] * 10
    assert uniform["class_kl_from_uniform"] == pytest.approx(0.0, abs=1e-12)
    assert uniform["class_tv_from_uniform"] == pytest.approx(0.0, abs=1e-12)
    single = ev.class_balance(np.full(7, 3), 10)  # mode collapse onto one class
    assert single["class_kl_from_uniform"] == pytest.approx(np.log(10))
    assert single["class_tv_from_uniform"] == pytest.approx(0.9)
    h = np.array([0.5, 0.25, 0.25, 0.0])
    two = ev.class_balance(np.array([0, 0, 1, 2]), 4)
    assert two["class_histogram"] == h.tolist()
    assert two["class_kl_from_uniform"] == pytest.approx(np.sum(h[:3] * np.log(4 * h[:3])))
    assert two["class_tv_from_uniform"] == pytest.approx(0.5 * np.sum(np.abs(h - 0.25)))
    with pytest.raises(ValueError, match="lie in \\[0, 4\\)"):
        ev.class_balance(np.array([0, 4]), 4)
    with pytest.raises(ValueError, match="integer labels"):
        ev.class_balance(np.array([0.5, 1.0]), 4)


def test_classifier_score_bounds(clf, data):
    centroids = np.asarray(clf.centroids[...]).reshape(10, 8, 8, 1)
    sharp = CentroidClassifier(centroids.reshape(10, -1), beta=50.0)  # confident on its own centroids
    evenly = np.tile(centroids, (6, 1, 1, 1))  # confident predictions spread uniformly over the 10 classes
    assert ev.classifier_score(sharp, evenly) == pytest.approx(10.0, rel=1e-4)
    assert ev.classifier_score(sharp, np.repeat(centroids[:1], 60, axis=0)) == pytest.approx(1.0, abs=1e-5)
    _, _, xte, _ = data
    real = ev.classifier_score(clf, xte)
    assert 1.0 < real < 10.0
    assert ev.classifier_score(clf, xte, splits=4) <= 10.0


def test_digits_sample_metrics(clf, data):
    xtr, ytr, xte, _ = data
    samples, labels = xtr[:300], ytr[:300]  # "generated" digits: real training images with their labels
    m = ev.digits_sample_metrics(samples, labels, classifier=clf, reference=xte, k=5)
    assert m["extractor"] == "digits_classifier" and m["feature_dim"] == 64 and m["num_classes"] == 10
    assert m["num_samples"] == 300 and m["num_reference"] == 360 and m["knn_k"] == 5
    report = ev.digits_report(clf, samples, labels, xte)
    assert m["frechet_distance"] == pytest.approx(report["fd"])  # the report's Fréchet distance, reused
    assert m["frechet_distance_floor"] == pytest.approx(report["fd_floor"])
    assert m["label_consistency"] == pytest.approx(ev.guided_label_accuracy(clf, samples, labels))
    assert m["label_consistency"] > 0.8  # nearest centroid is a decent digits classifier
    pred = ev.classifier_predict(clf, samples)
    np.testing.assert_allclose(m["class_histogram"], np.bincount(pred, minlength=10) / 300)
    assert m["classifier_score"] == pytest.approx(ev.classifier_score(clf, samples), rel=1e-6)
    assert 1.0 <= m["classifier_score"] <= m["classifier_score_max"] == 10
    want = manifold_metrics(xte.reshape(360, -1), samples.reshape(300, -1), 5)  # the features are the pixels
    for name in ("precision", "recall", "density", "coverage"):
        assert m[name] == pytest.approx(float(want[name])), name
    assert m["precision"] > 0.8 and m["recall"] > 0.8 and m["coverage"] > 0.8  # same distribution

    # mode collapse: only zeros (repeated to the same 300 samples: exact duplicates), with random requested labels
    zeros = np.resize(xtr[ytr == 0], samples.shape)
    rnd = np.random.default_rng(0).integers(0, 10, 300)
    c = ev.digits_sample_metrics(zeros, rnd, classifier=clf, reference=xte)
    assert c["class_kl_from_uniform"] > 1.5 and c["class_tv_from_uniform"] > 0.7
    assert c["classifier_score"] < 2.0 and c["recall"] < 0.3 and c["coverage"] < 0.3 and c["precision"] > 0.8
    assert c["label_consistency"] < 0.3
    unconditional = ev.digits_sample_metrics(zeros, classifier=clf, reference=xte)
    assert unconditional["label_consistency"] is None and unconditional["per_class_label_consistency"] is None


def test_digits_sample_metrics_bad_input(clf, data):
    _, _, xte, _ = data
    with pytest.raises(ValueError, match="at least k \\+ 1 = 6"):
        ev.digits_sample_metrics(xte[:5], classifier=clf, reference=xte)
    bad = xte[:20].copy()
    bad[3, 2, 2, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        ev.digits_sample_metrics(bad, classifier=clf, reference=xte)
