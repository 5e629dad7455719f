"""k-NN manifold metrics: improved precision/recall (Kynkäänniemi et al. 2019) and density/coverage (Naeem et al.
2020) on analytic cases, against a brute-force NumPy implementation, with exact duplicates, blocking and bad input."""

import numpy as np
import pytest
import jax

from jaxgen.metrics.manifold import density_coverage, knn_radii, manifold_metrics, precision_recall


def _brute(real, fake, k):
    """The papers' definitions with full distance matrices (float64), self excluded by index."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)

    def radii(x):
        d = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
        np.fill_diagonal(d, np.inf)
        return np.sort(d, axis=1)[:, k - 1]

    r_real, r_fake = radii(real), radii(fake)
    d = np.sqrt(((real[:, None] - fake[None]) ** 2).sum(-1))  # (N, M)
    inside_real = d <= r_real[:, None]
    return {"precision": inside_real.any(0).mean(), "recall": (d <= r_fake[None, :]).any(1).mean(),
            "density": inside_real.sum() / (k * fake.shape[0]), "coverage": (d.min(1) <= r_real).mean()}


def _modes(key_seed, n, centers, std=0.3):
    rng = np.random.default_rng(key_seed)
    idx = rng.integers(0, len(centers), n)
    return (centers[idx] + std * rng.normal(size=(n, centers.shape[1]))).astype(np.float32)


CENTERS = np.stack([10 * np.array([np.cos(a), np.sin(a)]) for a in np.linspace(0, 2 * np.pi, 8, endpoint=False)])


def _random_sets(seed):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(97, 6)).astype(np.float32), (1.3 * rng.normal(size=(61, 6)) + 0.4).astype(np.float32)


@pytest.mark.parametrize("k", [1, 4])
def test_matches_brute_force_on_random_data(k):
    real, fake = _random_sets(k)
    want = _brute(real, fake, k)
    got = manifold_metrics(real, fake, k, block_size=16)  # blocks that divide neither set
    for name in want:
        assert float(got[name]) == pytest.approx(want[name], abs=1e-6), name
    if k == 4:
        p, r = precision_recall(real, fake, k, block_size=16)
        d, c = density_coverage(real, fake, k, block_size=16)
        np.testing.assert_allclose([p, r, d, c], [want[n] for n in ("precision", "recall", "density", "coverage")],
                                   atol=1e-6)
        d_rr = np.sqrt(((real[:, None].astype(np.float64) - real[None]) ** 2).sum(-1))
        np.fill_diagonal(d_rr, np.inf)
        np.testing.assert_allclose(knn_radii(real, k, block_size=10), np.sort(d_rr, 1)[:, k - 1], rtol=1e-4)


def test_identical_and_disjoint_sets():
    x = _modes(0, 200, CENTERS)
    same = manifold_metrics(x, x, 5)
    assert float(same["precision"]) == 1.0 and float(same["recall"]) == 1.0 and float(same["coverage"]) == 1.0
    assert float(same["density"]) >= 1.0  # every point lies in its own ball, plus its neighbours'
    far = manifold_metrics(x, x + 1e3, 5)
    assert all(float(v) == 0.0 for v in far.values())


def test_samples_from_half_the_modes():
    real = _modes(1, 1000, CENTERS)
    fake = _modes(2, 1000, CENTERS[:4])
    m = {k: float(v) for k, v in manifold_metrics(real, fake, 5).items()}
    assert m["precision"] > 0.95  # every sample is realistic
    assert 0.4 < m["recall"] < 0.55  # but only half the real manifold is reached
    assert 0.4 < m["coverage"] < 0.55
    assert 0.75 < m["density"] < 1.3  # the same local density as the real modes it covers (E = 1)
    # the roles swapped: samples that spread over twice the real modes have recall ~1 and precision ~1/2
    p, r = precision_recall(fake, real, 5)
    assert float(r) > 0.95 and 0.4 < float(p) < 0.55


def test_exact_duplicates():
    rng = np.random.default_rng(3)
    base = (rng.normal(size=(30, 4)) * 100 + 1000).astype(np.float32)  # large offset: the expansion's worst case
    real = np.repeat(base, 6, axis=0)  # every point has 5 exact duplicates: its 5-NN radius is 0
    np.testing.assert_array_equal(knn_radii(real, 5), 0.0)
    assert float(knn_radii(real, 6).min()) > 0.0  # the 6th neighbour is another base point
    m = manifold_metrics(real, real, 5)
    assert float(m["precision"]) == 1.0 and float(m["recall"]) == 1.0 and float(m["coverage"]) == 1.0
    assert float(m["density"]) == pytest.approx(6 / 5)  # each sample lies in the 6 zero-radius balls of its copies
    shifted = real + np.float32(5.0)  # clearly resolvable, but outside every zero-radius ball
    p, _ = precision_recall(real, shifted, 5)
    assert float(p) == 0.0


def test_jit_compatible():
    real, fake = _random_sets(4)
    eager = manifold_metrics(real, fake, 4, block_size=16)  # compiled by the brute-force test already
    jitted = jax.jit(lambda a, b: manifold_metrics(a, b, 4, block_size=16))(real, fake)
    for name in eager:
        assert float(jitted[name]) == pytest.approx(float(eager[name]))


def test_bad_input():
    x = np.zeros((10, 3), np.float32)
    with pytest.raises(ValueError, match="k .*integer >= 1"):
        precision_recall(x, x, 0)
    with pytest.raises(ValueError, match="k .*integer >= 1"):
        density_coverage(x, x, 2.5)
    with pytest.raises(ValueError, match="block_size"):
        manifold_metrics(x, x, 3, block_size=0)
    with pytest.raises(ValueError, match="at least k \\+ 1 = 11"):
        precision_recall(x, x, 10)
    with pytest.raises(ValueError, match="same feature dimension"):
        manifold_metrics(x, np.zeros((10, 4), np.float32), 3)
    with pytest.raises(ValueError, match="shape \\(num_samples, dim\\)"):
        knn_radii(np.zeros(10, np.float32), 3)
    bad = x.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        manifold_metrics(x, bad, 3)
