"""Tests for jaxgen.data.images (digits, TFDS via mock data, loaders, samplers)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgen.data import images

tfds = pytest.importorskip("tensorflow_datasets")


@pytest.fixture(autouse=True)
def _temporary_files_in_tmp_path(tmp_path, monkeypatch):
    """Mocked TFDS builders make an (empty) temporary folder for dataset info each; keep them out of /tmp."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


def _collect(loader, n):
    return [next(loader) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for ba, bb in zip(a, b):
        assert ba.keys() == bb.keys()
        for k in ba:
            np.testing.assert_array_equal(np.asarray(ba[k]), np.asarray(bb[k]))


@pytest.fixture(scope="module")
def digits():
    return images.load_digits("all")


# ---------------------------------------------------------------------------
# Digits
# ---------------------------------------------------------------------------


def test_digits_shapes_dtypes_range(digits):
    assert len(digits) == 1797
    assert digits.images.shape == (1797, 8, 8, 1)
    assert digits.shape == (8, 8, 1)
    assert digits.images.dtype == np.float32 and digits.labels.dtype == np.int32
    assert digits.num_classes == 10 and digits.name == "digits"
    assert digits.images.min() == -1.0 and digits.images.max() == 1.0
    assert set(np.unique(digits.labels)) == set(range(10))


def test_digits_scaling_is_exact(digits):
    from sklearn.datasets import load_digits as sk_load_digits

    raw = sk_load_digits().images  # values 0..16
    np.testing.assert_array_equal(digits.images[..., 0], (raw / 8 - 1).astype(np.float32))
    assert np.all(digits.images[..., 0][raw == 0] == -1.0)
    assert np.all(digits.images[..., 0][raw == 16] == 1.0)
    assert np.all(digits.images[..., 0][raw == 8] == 0.0)


def test_digits_split_disjoint_covering_stratified_deterministic(digits):
    train = images.load_digits("train")
    test = images.load_digits("test")
    assert (len(train), len(test)) == (1438, 359)
    # Rows identify examples (digits has a few duplicate images, so use the
    # multiset of (image, label) rows).
    def rows(ds):
        return sorted(map(bytes, np.concatenate([ds.images.reshape(len(ds), -1),
                                                  ds.labels[:, None].astype(np.float32)], 1)))
    assert sorted(rows(train) + rows(test)) == rows(digits)
    # Stratified: every class keeps ~20% in test.
    counts_all = np.bincount(digits.labels, minlength=10)
    counts_test = np.bincount(test.labels, minlength=10)
    np.testing.assert_array_equal(counts_test, np.round(0.2 * counts_all).astype(int))
    # Deterministic, seed-dependent.
    again = images.load_digits("test")
    np.testing.assert_array_equal(again.images, test.images)
    np.testing.assert_array_equal(again.labels, test.labels)
    other = images.load_digits("test", seed=1)
    assert not np.array_equal(other.images, test.images)
    assert len(images.load_digits("test", test_fraction=0.5)) == np.round(0.5 * counts_all).sum()


def test_digits_errors():
    with pytest.raises(ValueError, match="Unknown split 'validation'"):
        images.load_digits("validation")
    with pytest.raises(ValueError, match="test_fraction"):
        images.load_digits("train", test_fraction=1.0)


def test_uint8_roundtrip():
    x = np.arange(256, dtype=np.uint8)
    f = images.uint8_to_float(x)
    assert f.dtype == np.float32 and f[0] == -1.0 and f[255] == 1.0
    np.testing.assert_array_equal(images.float_to_uint8(f), x)


# ---------------------------------------------------------------------------
# TFDS (mocked, no download, no TensorFlow)
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, shape", [("mnist", (28, 28, 1)), ("fashion_mnist", (28, 28, 1)), ("cifar10", (32, 32, 3))]
)
def test_load_tfds_mocked(name, shape):
    with tfds.testing.mock_data(num_examples=6):
        ds = images.load_tfds(name, "train")
        raw = tfds.data_source(name, split="train")
        raw0 = raw[0]
    assert ds.images.shape == (6, *shape) and ds.shape == shape
    assert ds.images.dtype == np.float32 and ds.labels.dtype == np.int32
    assert ds.images.min() >= -1.0 and ds.images.max() <= 1.0
    assert ds.num_classes == 10 and ds.name == name
    assert np.all((ds.labels >= 0) & (ds.labels < 10))
    np.testing.assert_array_equal(ds.images[0], raw0["image"].astype(np.float32) / 127.5 - 1)
    assert ds.labels[0] == raw0["label"]


def test_load_tfds_not_prepared_says_download_first(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)not available locally.*download_and_prepare"):
        images.load_tfds("mnist", "train", data_dir=str(tmp_path))
    assert not any(tmp_path.rglob("*.array_record*"))  # nothing was downloaded


def test_load_tfds_errors(tmp_path):
    with pytest.raises(ValueError, match="Unknown TFDS dataset 'no_such_dataset'"):
        images.load_tfds("no_such_dataset", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="not an image-classification dataset"):
        images.load_tfds("imdb_reviews", data_dir=str(tmp_path))
    with pytest.raises(TypeError, match="split"):
        images.load_tfds("mnist", ["train", "test"], data_dir=str(tmp_path))


def test_loader_over_mocked_tfds_source():
    with tfds.testing.mock_data(num_examples=10):
        src = tfds.data_source("mnist", split="train")
        loader = images.ImageLoader(
            src, 4, seed=0, num_epochs=1, process_count=1, process_index=0,
            transform=lambda b: {"x": images.uint8_to_float(b["x"]), "y": b["y"].astype(np.int32)},
        )
        batches = list(loader)
    assert len(batches) == 2
    assert batches[0]["x"].shape == (4, 28, 28, 1) and batches[0]["x"].dtype == np.float32
    assert batches[0]["y"].shape == (4,) and batches[0]["y"].dtype == np.int32
    assert set(batches[0]) == {"x", "y"}


# ---------------------------------------------------------------------------
# ImageLoader
# ---------------------------------------------------------------------------


def _small(n=50):
    x = np.arange(n, dtype=np.float32)[:, None, None, None] * np.ones((1, 2, 2, 1), np.float32)
    return images.ImageDataset(images=x, labels=np.arange(n, dtype=np.int32) % 3, num_classes=3, name="small")


def test_loader_each_example_once_per_epoch_and_reshuffles():
    ds = _small(50)
    loader = images.ImageLoader(ds, 10, seed=3, process_index=0, process_count=1)
    assert len(loader) == 5
    epochs = []
    for _ in range(3):
        batches = _collect(loader, 5)
        for b in batches:
            assert b["x"].shape == (10, 2, 2, 1) and b["y"].shape == (10,)
            np.testing.assert_array_equal(b["y"], b["x"][:, 0, 0, 0].astype(np.int32) % 3)
        ids = np.concatenate([b["x"][:, 0, 0, 0] for b in batches]).astype(int)
        np.testing.assert_array_equal(np.sort(ids), np.arange(50))
        epochs.append(ids)
    assert loader.state() == {"epoch": 3, "position": 0}
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    # Same seed, same sequence; different seed, different sequence.
    again = images.ImageLoader(ds, 10, seed=3, process_index=0, process_count=1)
    np.testing.assert_array_equal(next(again)["x"][:, 0, 0, 0].astype(int), epochs[0][:10])
    other = images.ImageLoader(ds, 10, seed=4, process_index=0, process_count=1)
    assert not np.array_equal(next(other)["x"][:, 0, 0, 0].astype(int), epochs[0][:10])


def test_loader_no_shuffle_remainder_and_num_epochs():
    ds = _small(23)
    loader = images.ImageLoader(ds, 10, shuffle=False, drop_remainder=False, num_epochs=2,
                                process_index=0, process_count=1)
    batches = list(loader)
    assert [len(b["y"]) for b in batches] == [10, 10, 3, 10, 10, 3]
    np.testing.assert_array_equal(batches[0]["x"][:, 0, 0, 0], np.arange(10))
    dropped = images.ImageLoader(ds, 10, shuffle=False, num_epochs=1, process_index=0, process_count=1)
    assert [len(b["y"]) for b in dropped] == [10, 10]


def test_loader_restore_resumes_exact_sequence():
    ds = _small(37)
    kw = dict(seed=7, process_index=0, process_count=1)
    ref = images.ImageLoader(ds, 8, **kw)  # 4 batches per epoch
    expected = _collect(ref, 14)
    loader = images.ImageLoader(ds, 8, **kw)
    _collect(loader, 6)
    state = loader.state()
    assert state == {"epoch": 1, "position": 2}
    resumed = images.ImageLoader(ds, 8, **kw).restore(state)
    _assert_batches_equal(_collect(resumed, 8), expected[6:])
    # End-of-epoch state is equivalent to the start of the next epoch.
    fresh = images.ImageLoader(ds, 8, **kw).restore({"epoch": 0, "position": 4})
    _assert_batches_equal(_collect(fresh, 2), expected[4:6])


def test_loader_host_sharding_disjoint_and_covering():
    ds = _small(50)
    for shuffle in (True, False):
        hosts = [images.ImageLoader(ds, 5, seed=1, shuffle=shuffle, process_index=p, process_count=2)
                 for p in range(2)]
        assert [len(h) for h in hosts] == [5, 5]
        for _ in range(2):  # two epochs
            ids = [np.concatenate([b["x"][:, 0, 0, 0] for b in _collect(h, 5)]).astype(int) for h in hosts]
            assert not set(ids[0]) & set(ids[1])
            np.testing.assert_array_equal(np.sort(np.concatenate(ids)), np.arange(50))
        if not shuffle:  # contiguous slices
            np.testing.assert_array_equal(hosts[0].indices(0), np.arange(25))
            np.testing.assert_array_equal(hosts[1].indices(0), np.arange(25, 50))
    # Odd size: equal shards (lock-step), one example skipped per epoch.
    odd = [images.ImageLoader(_small(51), 5, seed=1, process_index=p, process_count=2) for p in range(2)]
    assert odd[0].num_examples == odd[1].num_examples == 25
    assert not set(odd[0].indices(0)) & set(odd[1].indices(0))


def test_loader_over_numpy_and_tuple_sources():
    arr = np.arange(12, dtype=np.float32).reshape(12, 1)
    b = next(images.ImageLoader(arr, 4, shuffle=False, process_index=0, process_count=1))
    assert set(b) == {"x"}
    np.testing.assert_array_equal(b["x"][:, 0], [0, 1, 2, 3])

    class Pairs:
        def __len__(self):
            return 6

        def __getitem__(self, i):
            return np.full((2, 2, 1), i, np.float32), i

    b = next(images.ImageLoader(Pairs(), 3, shuffle=False, process_index=0, process_count=1))
    np.testing.assert_array_equal(b["y"], [0, 1, 2])
    assert b["x"].shape == (3, 2, 2, 1)


def test_loader_errors():
    ds = _small(10)
    with pytest.raises(ValueError, match="larger than the 10 examples per host"):
        images.ImageLoader(ds, 11, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="larger than the 5 examples per host"):
        images.ImageLoader(ds, 6, process_index=0, process_count=2)
    images.ImageLoader(ds, 11, drop_remainder=False, process_index=0, process_count=1)  # ok
    with pytest.raises(ValueError, match="positive"):
        images.ImageLoader(ds, 0)
    with pytest.raises(ValueError, match="process_index"):
        images.ImageLoader(ds, 2, process_index=2, process_count=2)
    with pytest.raises(TypeError, match="len"):
        images.ImageLoader(object(), 2)
    loader = images.ImageLoader(ds, 5, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="exceeds the 2 batches per epoch"):
        loader.restore({"epoch": 0, "position": 3})
    with pytest.raises(ValueError, match="'epoch' and 'position'"):
        loader.restore({"epoch": 0})


def test_loader_defaults_to_jax_process():
    loader = images.ImageLoader(_small(10), 2)
    assert (loader.process_index, loader.process_count) == (jax.process_index(), jax.process_count())


# ---------------------------------------------------------------------------
# Prefetch and device sampler
# ---------------------------------------------------------------------------


def test_prefetch_to_device_yields_same_batches():
    ds = _small(30)
    kw = dict(seed=0, num_epochs=2, process_index=0, process_count=1)
    host = list(images.ImageLoader(ds, 4, **kw))
    dev = list(images.prefetch_to_device(images.ImageLoader(ds, 4, **kw), size=3))
    assert len(dev) == len(host) == 14
    assert all(isinstance(b["x"], jax.Array) for b in dev)
    _assert_batches_equal(dev, host)

    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    bs = 2 * jax.device_count()
    loader = images.ImageLoader(ds, bs, shuffle=False, num_epochs=1, process_index=0, process_count=1)
    out = list(images.prefetch_to_device(loader, sharding=sharding))
    assert out[0]["x"].sharding == sharding
    np.testing.assert_array_equal(np.asarray(out[0]["y"]), np.arange(bs) % 3)
    with pytest.raises(ValueError, match="size"):
        next(images.prefetch_to_device(iter([]), size=0))


def test_device_sampler_under_jit(digits):
    sample = images.device_sampler(digits, 32)
    batch = jax.jit(sample)(jax.random.key(0))
    assert batch["x"].shape == (32, 8, 8, 1) and batch["x"].dtype == jnp.float32
    assert batch["y"].shape == (32,) and batch["y"].dtype == jnp.int32
    # Every drawn example is a real (image, label) pair of the dataset.
    x = np.asarray(batch["x"]).reshape(32, -1)
    flat = digits.images.reshape(len(digits), -1)
    for xi, yi in zip(x, np.asarray(batch["y"])):
        match = np.flatnonzero((flat == xi).all(axis=1))
        assert match.size and yi in digits.labels[match]
    # Pure function of the key.
    again = jax.jit(sample)(jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(again["x"]), np.asarray(batch["x"]))

    ds = _small(16)
    no_rep = jax.jit(images.device_sampler(ds, 16, replace=False))(jax.random.key(1))
    np.testing.assert_array_equal(np.sort(np.asarray(no_rep["x"])[:, 0, 0, 0]), np.arange(16))
    # Inside a scanned loop (as in fused training steps).
    sample = images.device_sampler(ds, 4)
    ys = jax.jit(lambda k: jax.lax.map(lambda kk: sample(kk)["y"], jax.random.split(k, 5)))(jax.random.key(2))
    assert ys.shape == (5, 4) and bool(jnp.all((ys >= 0) & (ys < 3)))


def test_device_sampler_errors():
    ds = _small(8)
    with pytest.raises(ValueError, match="larger than the dataset"):
        images.device_sampler(ds, 9, replace=False)
    images.device_sampler(ds, 9)  # with replacement it is allowed
    assert set(images.device_sampler(ds, 2, with_labels=False)(jax.random.key(0))) == {"x"}
    with pytest.raises(ValueError, match="positive"):
        images.device_sampler(ds, 0)
    with pytest.raises(TypeError, match="images"):
        images.device_sampler(np.zeros((4, 2)), 2)
    with pytest.raises(ValueError, match="shape"):
        images.ImageDataset(np.zeros((4, 2, 2)), np.zeros(4, np.int32), 2)
