"""The FID Inception-v3 in Flax NNX and its weights: a tiny random network saved by PyTorch (tests/data, made by
tests/data/make_inception_fixture.py with pytorch-fid's structure and key names) is read without torch and reproduces
PyTorch's features and logits; every key of the real network is mapped; FID / IS behave; bad input is refused."""

import json
import pathlib
import pickle

import numpy as np
import pytest
import jax
from flax import nnx

from jaxgen.evaluation import inception as inc
from jaxgen.evaluation import inception_weights as iw

DATA = pathlib.Path(__file__).resolve().parent / "data"
TINY = DATA / "tiny_fid_inception.pth"  # width 1/32, 10 classes, legacy torch.save format


@pytest.fixture(scope="module")
def torch_out():
    with np.load(DATA / "tiny_fid_inception_outputs.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def net():
    # the fixture's images are in [0, 1] (pytorch-fid's convention) and were resized to 75 x 75 by PyTorch
    return iw.load_inception(TINY, resize_to=75, input_range=(0.0, 1.0), precision="highest")


@pytest.fixture(scope="module")
def outputs(net, torch_out):
    return inc.inception_outputs(torch_out["images"], network=net, batch_size=3)


def _rel(a, b):
    return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


def test_tiny_network_reproduces_pytorch(net, outputs, torch_out):
    feats, logits = outputs
    assert net.num_features == feats.shape[1] == 64 and net.num_classes == logits.shape[1] == 10
    assert _rel(feats, torch_out["features"]) < 1e-4
    assert _rel(logits, torch_out["logits"]) < 1e-4
    assert _rel(net.logits(feats, unbiased=True), torch_out["logits_unbiased"]) < 1e-4
    assert np.std(torch_out["features"]) > 1.0  # the fixture's activations are O(1), not vanishing


def test_npz_round_trip_gives_the_same_network(net, tmp_path, monkeypatch):
    npz = iw.convert_inception_weights(TINY, tmp_path / "tiny.npz")
    monkeypatch.setenv(iw.WEIGHTS_ENV, str(npz))  # the environment variable is the default path
    again = iw.load_inception(resize_to=75, input_range=(0.0, 1.0), precision="highest")
    a, b = nnx.state(net).flat_state(), dict(nnx.state(again).flat_state())
    assert len(a) == len(b) == 94 * 5 + 2  # 94 conv + batch-norm layers and the fc layer
    for path, var in a:
        np.testing.assert_array_equal(var.get_value(), b[path].get_value(), err_msg=str(path))


def test_every_key_of_the_real_network_is_mapped():
    """pytorch-fid's FIDInceptionV3 state dict (keys and shapes saved by the fixture script) is exactly what the
    converter expects at width 1."""
    real = {k: tuple(v) for k, v in json.loads((DATA / "fid_inception_keys.json").read_text()).items()}
    assert len(real) == 566
    real = {k: v for k, v in real.items() if not k.endswith("num_batches_tracked")}
    assert iw.expected_torch_shapes(1.0, 1008) == real
    assert iw.torch_key(("Mixed_7c", "branch3x3dbl_3b", "bn", "var")) == "Mixed_7c.branch3x3dbl_3b.bn.running_var"


def test_fid_of_a_set_with_itself_is_zero_and_is_bounds(net, outputs, torch_out):
    x = torch_out["images"]
    feats, _ = outputs
    fid_self = inc.inception_fid(x[::-1], x, network=net, batch_size=3)  # order does not matter
    assert abs(fid_self) < 1e-6 * np.var(feats, axis=0).sum() * 3
    moments = inc.inception_reference_moments(x, network=net, batch_size=3)
    assert abs(inc.inception_fid(x, moments, network=net, batch_size=3)) < 1e-6 * np.var(feats, axis=0).sum() * 3
    assert inc.inception_fid(np.clip(x + 0.3, 0, 1), moments, network=net, batch_size=3) > 1.0
    is_mean, is_std = inc.inception_score(x, network=net, splits=1, batch_size=3)
    assert 1.0 <= is_mean <= 10.0 and is_std == 0.0


def test_inception_score_from_logits():
    k = 7
    confident = 50.0 * np.eye(k)[np.arange(70) % k]  # confident, evenly spread predictions
    assert float(inc.inception_score_from_logits(confident)[0]) == pytest.approx(k, rel=1e-4)
    same = np.tile(np.random.default_rng(0).normal(size=(1, k)), (40, 1))  # identical predictions
    assert float(inc.inception_score_from_logits(same)[0]) == pytest.approx(1.0, abs=1e-5)
    logits = 3 * np.random.default_rng(1).normal(size=(60, k))
    mean, std = inc.inception_score_from_logits(logits, splits=3)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scores = []
    for part in np.split(p, 3):  # the original code's per-split score
        kl = (part * (np.log(part) - np.log(part.mean(0, keepdims=True)))).sum(1)
        scores.append(np.exp(kl.mean()))
    assert float(mean) == pytest.approx(np.mean(scores), rel=1e-5)
    assert float(std) == pytest.approx(np.std(scores), rel=1e-4)
    assert all(1.0 <= s <= k for s in scores)
    with pytest.raises(ValueError, match="splits"):
        inc.inception_score_from_logits(logits, splits=61)
    with pytest.raises(ValueError, match="num_samples, num_classes"):
        inc.inception_score_from_logits(logits[0])


def test_preprocessing_matches_pytorch_resize(torch_out):
    for name in ("resize_small", "resize_large"):  # up- and down-sampling, no antialiasing (F.interpolate)
        got = inc.inception_preprocess(torch_out[name], resize_to=11)
        np.testing.assert_allclose(got, torch_out[name + "_11"], atol=1e-6)
    grey = torch_out["resize_small"][..., :1]
    np.testing.assert_array_equal(inc.inception_preprocess(grey, resize_to=11),
                                  inc.inception_preprocess(np.repeat(grey, 3, -1), resize_to=11))
    u8 = np.array([[[[0.0, 127.5, 255.0]]]], np.float32)
    np.testing.assert_allclose(inc.inception_preprocess(u8, resize_to=1, input_range=(0, 255)),
                               [[[[-1.0, 0.0, 1.0]]]])
    with pytest.raises(ValueError, match="channels-last"):
        inc.inception_preprocess(np.zeros((2, 3, 16, 16)))
    with pytest.raises(ValueError, match="at least 75"):
        inc.inception_preprocess(np.zeros((1, 16, 16, 3)), resize_to=None)
    with pytest.raises(ValueError, match="at least 75"):
        inc.FIDInceptionV3(width=1 / 32, resize_to=32)
    with pytest.raises(ValueError, match="input_range"):
        inc.FIDInceptionV3(width=1 / 32, input_range=(1, 1))


def test_missing_weights_error(monkeypatch, tmp_path):
    monkeypatch.delenv(iw.WEIGHTS_ENV, raising=False)
    with pytest.raises(ValueError, match="no Inception weights given") as err:
        iw.load_inception()
    message = str(err.value)
    assert iw.FID_WEIGHTS_URL in message and "JAXGEN_INCEPTION_WEIGHTS" in message and "downloads nothing" in message
    with pytest.raises(ValueError, match="no Inception weights given"):
        inc.inception_fid(np.zeros((2, 8, 8, 3)), np.zeros((2, 8, 8, 3)))
    monkeypatch.setenv(iw.WEIGHTS_ENV, str(tmp_path / "absent.pth"))
    with pytest.raises(FileNotFoundError, match="absent.pth .*JAXGEN_INCEPTION_WEIGHTS"):
        iw.load_inception()


def test_torch_readers_both_formats():
    for name in ("small_state_dict.pth", "small_state_dict_legacy.pth"):
        sd = iw.read_torch_state_dict(DATA / name)
        a = np.arange(12, dtype=np.float32).reshape(3, 4)
        np.testing.assert_array_equal(sd["a"], a)
        np.testing.assert_array_equal(sd["a_t"], a.T)  # a strided view of the same storage
        np.testing.assert_array_equal(sd["a_row"], a[1])  # a view with a storage offset
        assert sd["n"].dtype == np.int64 and sd["n"].shape == () and int(sd["n"]) == 7
        assert sd["h"].dtype == np.float16 and sd["h"].tolist() == [0.5, -2.0]
        assert sd["b"].dtype == np.bool_ and sd["b"].tolist() == [True, False]
        np.testing.assert_array_equal(sd["i"], np.arange(-3, 3, dtype=np.int32).reshape(2, 3)[:, ::2])


def test_weights_files_are_checked(tmp_path):
    # a pickle that asks for anything but tensors is refused, before it can run
    class Evil:
        def __reduce__(self):
            import os

            return (os.getcwd, ())

    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        for obj in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}, {"x": Evil()}):
            pickle.dump(obj, f, protocol=2)
    with pytest.raises(ValueError, match="refusing to load (posix|nt|os).getcwd"):
        iw.read_torch_state_dict(evil)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(pickle.dumps(12345))
    with pytest.raises(ValueError, match="bad magic number"):
        iw.read_torch_state_dict(junk)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes((DATA / "small_state_dict_legacy.pth").read_bytes()[:-5])
    with pytest.raises(ValueError, match="truncated"):
        iw.read_torch_state_dict(truncated)
    # torch.hub's naming convention: <name>-<sha256 prefix>.pth
    misnamed = tmp_path / "weights-00000000.pth"
    misnamed.write_bytes(TINY.read_bytes())
    with pytest.raises(ValueError, match="SHA-256"):
        iw.load_inception_arrays(misnamed)
    # a state dict that is not the FID Inception's
    sd = iw.read_torch_state_dict(TINY)
    assert len(iw.convert_state_dict(sd)) == 94 * 5 + 2
    with pytest.raises(ValueError, match="missing keys \\['Mixed_6b.branch1x1.bn.bias'\\]"):
        iw.convert_state_dict({k: v for k, v in sd.items() if k != "Mixed_6b.branch1x1.bn.bias"})
    with pytest.raises(ValueError, match="Mixed_5b.branch_pool.conv.weight has shape"):
        iw.convert_state_dict({**sd, "Mixed_5b.branch_pool.conv.weight": np.zeros((2, 2, 1, 1), np.float32)})
    with pytest.raises(ValueError, match="no 'fc.weight'"):
        iw.convert_state_dict({"Conv2d_1a_3x3.conv.weight": sd["Conv2d_1a_3x3.conv.weight"]})


def test_network_is_jittable_by_parts(net, torch_out):
    """The pool-feature extractor is a pure jitted function of the images (what frechet_distance_from_features and
    the manifold metrics take)."""
    fn = inc.inception_feature_fn(net)
    f = fn(jax.numpy.asarray(torch_out["images"]))
    assert _rel(f, torch_out["features"]) < 1e-4


def test_random_initialisation():
    """Without rngs the network waits for weights (zero kernels); with rngs its kernels are LeCun-normal."""
    bare = inc.FIDInceptionV3(width=1 / 32, num_classes=10)
    rand = inc.FIDInceptionV3(width=1 / 32, num_classes=10, rngs=nnx.Rngs(0))
    z = []
    for (path, v), (_, w) in zip(nnx.state(bare).flat_state(), nnx.state(rand).flat_state()):
        value = np.asarray(w.get_value())
        if path[-1] == "kernel":
            assert not np.any(v.get_value())
            z.append(value.ravel() * np.sqrt(np.prod(value.shape[:-1])))  # N(0, 1) after scaling by sqrt(fan_in)
        else:
            np.testing.assert_array_equal(v.get_value(), value)  # batch norm: scale 1, bias 0, mean 0, var 1
    z = np.concatenate(z)
    assert abs(z.mean()) < 0.05 and abs(z.std() - 1) < 0.05 and z.size > 10_000
