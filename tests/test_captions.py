"""Digit captions: attribute measurements on constructed images, tercile bins on the digits, the tokenizer, caption
tokens, caption dropout statistics and the attribute-agreement metric."""

import numpy as np
import pytest
import jax
import jax.numpy as jnp
from flax import nnx

from jaxgen.data import load_digits
from jaxgen.data.captions import (MAX_LEN, PAD, VOCAB, AttributeBins, caption_digits,
                                  caption_text, caption_tokens, decode, drop_caption_parts, encode,
                                  measure_attributes)
from jaxgen.evaluation import attribute_agreement
from jaxgen.models import DigitsClassifier

_measure = jax.jit(measure_attributes)


def _canvas(ink: np.ndarray) -> np.ndarray:
    """A (B, H, W, 1) image in [-1, 1] from ink in [0, 1]."""
    return (2.0 * ink - 1.0)[..., None].astype(np.float32)


def _sheared_bar(shear: float, size: int = 16, width: float = 1.5) -> np.ndarray:
    """A vertical bar of half-width ``width`` (anti-aliased), sheared so its column is ``c + shear * height``."""
    rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    height = (size - 1) / 2 - rows  # up is positive
    centre = (size - 1) / 2 + shear * height
    return np.clip(width + 0.5 - np.abs(cols - centre), 0.0, 1.0)


@pytest.fixture(scope="module")
def digits():
    return load_digits("train"), load_digits("test")


@pytest.fixture(scope="module")
def bins(digits):
    train, _ = digits
    return AttributeBins.fit(train.images, train.labels)


# ---------------------------------------------------------------------------------------------------------------
# Measurements on constructed images
# ---------------------------------------------------------------------------------------------------------------


def test_a_thicker_stroke_has_more_ink():
    bar = _sheared_bar(0.3, width=0.5)
    dilated = np.maximum.reduce([np.roll(bar, d, axis=1) for d in (-1, 0, 1)])  # 3-pixel max filter along rows
    dilated = np.maximum.reduce([np.roll(dilated, d, axis=0) for d in (-1, 0, 1)])
    m = _measure(_canvas(np.stack([bar, dilated, np.zeros_like(bar), np.ones_like(bar)])))
    ink = np.asarray(m["ink"])
    assert ink[1] > 1.5 * ink[0] > 0
    np.testing.assert_allclose(ink[2:], [0.0, 1.0], atol=1e-6)  # blank and full images: the ends of [0, 1]
    assert np.isfinite(np.asarray(m["slant"])).all() and abs(float(m["slant"][2])) < 1e-6  # blank: slant 0


def test_slant_has_the_sign_of_the_shear_is_monotone_and_zero_for_an_upright_bar():
    shears = np.array([-0.6, -0.3, -0.1, 0.0, 0.1, 0.3, 0.6])
    images = _canvas(np.stack([_sheared_bar(s) for s in shears]))
    slant = np.asarray(_measure(images)["slant"])
    assert abs(slant[3]) < 1e-6  # an upright vertical bar
    np.testing.assert_array_equal(np.sign(slant), np.sign(shears))  # positive = the top leans right
    assert np.all(np.diff(slant) > 0)  # monotone in the shear
    np.testing.assert_allclose(slant, shears, atol=0.1)  # ~ the shear itself (edges of the canvas cut the bar)
    flipped = np.asarray(_measure(images[:, :, ::-1])["slant"])  # a mirror image leans the other way
    np.testing.assert_allclose(flipped, -slant, atol=1e-5)
    shifted = np.asarray(_measure(np.roll(images, 2, axis=2))["slant"])  # central moments: shift-invariant
    np.testing.assert_allclose(shifted[2:5], slant[2:5], atol=1e-4)


def test_measurements_are_batched_jittable_and_reject_bad_images():
    x = _canvas(np.stack([_sheared_bar(s, size=8) for s in (0.0, 0.2)]))
    one = measure_attributes(x[:1])
    both = _measure(x)
    np.testing.assert_allclose(np.asarray(both["slant"][:1]), np.asarray(one["slant"]), atol=1e-6)
    grad = jax.grad(lambda z: measure_attributes(z)["slant"].sum())(jnp.asarray(x))
    assert np.isfinite(np.asarray(grad)).all()
    with pytest.raises(ValueError, match=r"images\[\.\.\., None\]"):
        measure_attributes(x[..., 0])
    with pytest.raises(ValueError, match="floating-point"):
        measure_attributes(np.zeros((1, 8, 8, 1), np.uint8))


# ---------------------------------------------------------------------------------------------------------------
# Tercile bins on the digits
# ---------------------------------------------------------------------------------------------------------------


def test_per_class_terciles_split_the_training_digits_in_thirds_and_carry_to_the_test_digits(digits, bins):
    train, test = digits
    assert bins.ink_thresholds.shape == (10, 2) and bins.slant_thresholds.shape == (10, 2)
    assert np.all(np.diff(np.asarray(bins.ink_thresholds), axis=1) > 0)
    thickness, slant = (np.asarray(a) for a in jax.jit(AttributeBins.classify)(bins, train.images, train.labels))
    for values in (thickness, slant):
        for k in range(10):
            fractions = np.bincount(values[train.labels == k], minlength=3) / np.sum(train.labels == k)
            # terciles of each class (up to ties: the ink is a multiple of 1/1024, ~140 digits per class)
            np.testing.assert_allclose(fractions, 1 / 3, atol=0.04)
    # held-out digits: still roughly a third each (measured 0.39 / 0.32 / 0.29 and 0.37 / 0.30 / 0.34)
    for values in jax.jit(AttributeBins.classify)(bins, test.images, test.labels):
        np.testing.assert_allclose(np.bincount(np.asarray(values), minlength=3) / len(test), 1 / 3, atol=0.08)
    # global bins: also thirds overall, but the slant bins then mostly encode the digit (a 7 "slants right")
    glob = AttributeBins.fit(train.images, train.labels, per_class_thickness=False, per_class_slant=False)
    assert glob.ink_thresholds.shape == (1, 2)
    _, slant_global = (np.asarray(a) for a in glob.classify(train.images))
    assert np.mean(slant_global[train.labels == 7] == 2) > 0.9 and np.mean(slant_global[train.labels == 6] == 0) > 0.9
    with pytest.raises(ValueError, match="pass the labels"):
        bins.classify(train.images)
    with pytest.raises(ValueError, match="at least 3 images"):
        AttributeBins.fit(train.images[:20], train.labels[:20])


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer and caption tokens
# ---------------------------------------------------------------------------------------------------------------


def test_tokenizer_round_trip_and_unknown_words():
    assert VOCAB[PAD] == "<pad>" and PAD == 0
    for text in ("seven, thick, slanted right", "zero, thin, upright", "one", "eight, slanted left", "nine, medium"):
        ids = encode(text)
        assert ids.shape == (MAX_LEN,) and ids.dtype == np.int32
        assert decode(ids) == text
    assert decode(encode("Seven ,THICK")) == "seven, thick"
    assert decode(np.stack([encode("one"), encode("two, thin")])) == ["one", "two, thin"]
    with pytest.raises(ValueError, match=r"\['fat'\].*vocabulary.*'slanted'"):
        encode("seven, fat")
    with pytest.raises(ValueError, match="max_len=2"):
        encode("seven, thick", max_len=2)
    with pytest.raises(ValueError, match=r"\[0, 18\]"):
        decode(np.array([1, 99]))


def test_caption_tokens_equal_the_encoded_caption_text():
    labels = np.array([7, 0, 3, 9, 1, 5])
    thickness = np.array([2, 0, -1, 1, -1, 0])
    slant = np.array([2, 1, 0, -1, -1, 1])
    tokens = np.asarray(jax.jit(caption_tokens)(labels, thickness, slant))
    assert tokens.shape == (6, MAX_LEN)
    for row, y, th, sl in zip(tokens, labels, thickness, slant):
        np.testing.assert_array_equal(row, encode(caption_text(y, th, sl)))
    assert decode(tokens[0]) == "seven, thick, slanted right" and decode(tokens[4]) == "one"
    assert decode(caption_tokens(np.array([4]))[0]) == "four"
    with pytest.raises(ValueError, match="digits 0..9"):
        caption_tokens(np.array([10]))


def test_caption_digits_gives_every_digit_its_full_caption(digits, bins):
    train, _ = digits
    tokens = np.asarray(jax.jit(caption_digits)(train.images[:50], train.labels[:50], bins))
    texts = decode(tokens)
    for text, y in zip(texts, train.labels[:50]):
        parts = text.split(", ")
        assert len(parts) == 3 and parts[0] == caption_text(y)


@pytest.mark.slow
def test_drop_caption_parts_statistics():
    n = 4000
    tokens = caption_tokens(np.full(n, 7), np.full(n, 2), np.full(n, 0))  # "seven, thick, slanted left"
    dropped = np.asarray(jax.jit(drop_caption_parts)(jax.random.key(0), tokens, 0.3, 0.1))
    texts = np.array(decode(dropped))
    null = np.all(dropped == PAD, axis=1)
    has_thick = np.array(["thick" in t for t in texts])
    has_slant = np.array(["slanted left" in t for t in texts])
    se = lambda p: 4 * np.sqrt(p * (1 - p) / n)  # 4 standard errors
    assert abs(null.mean() - 0.1) < se(0.1)
    assert abs(has_thick.mean() - 0.9 * 0.7) < se(0.63) and abs(has_slant.mean() - 0.63) < se(0.63)
    both = has_thick & has_slant
    assert abs(both.mean() - 0.9 * 0.49) < se(0.441)  # the two attributes are dropped independently
    # every result is a well-formed (partial) caption, left-aligned: the encoding of its own text
    allowed = {"", "seven", "seven, thick", "seven, slanted left", "seven, thick, slanted left"}
    assert set(texts) == allowed
    for row, text in zip(dropped[:200], texts[:200]):
        np.testing.assert_array_equal(row, encode(text))
    # partial captions stay partial; p = 0 keeps everything, p_all = 1 drops everything
    partial = jnp.asarray(np.stack([encode("seven, slanted left")] * 4))
    np.testing.assert_array_equal(np.asarray(drop_caption_parts(jax.random.key(1), partial, 0.0, 0.0)), partial)
    assert not np.asarray(drop_caption_parts(jax.random.key(1), tokens[:5], 0.0, 1.0)).any()
    with pytest.raises(ValueError, match=r"p_all must be a probability in \[0, 1\]"):
        drop_caption_parts(jax.random.key(1), tokens, 0.1, 1.5)
    with pytest.raises(TypeError, match="PRNG key"):
        drop_caption_parts(0, tokens, 0.1, 0.1)


# ---------------------------------------------------------------------------------------------------------------
# Attribute agreement
# ---------------------------------------------------------------------------------------------------------------


def test_attribute_agreement_is_one_on_real_digits_and_about_a_third_for_random_requests(digits, bins):
    train, _ = digits
    x, y = train.images[:600], train.labels[:600]
    thickness, slant = (np.asarray(a) for a in bins.classify(x, y))
    oracle = lambda images: jax.nn.one_hot(jnp.asarray(y), 10)  # a perfect "classifier" of these
    exact = attribute_agreement(x, y, thickness, slant, bins=bins, classifier=oracle)
    assert exact == {"label": 1.0, "thickness": 1.0, "slant": 1.0, "all": 1.0}
    rng = np.random.default_rng(0)
    random = attribute_agreement(x, y, rng.integers(0, 3, len(y)), rng.integers(0, 3, len(y)), bins=bins)
    assert random["label"] is None
    assert abs(random["thickness"] - 1 / 3) < 0.08 and abs(random["slant"] - 1 / 3) < 0.08
    # only requested attributes count (-1 = not requested)
    partial = attribute_agreement(x, y, np.where(np.arange(len(y)) % 2, thickness, -1), None, bins=bins)
    assert partial["thickness"] == 1.0 and partial["slant"] is None and partial["all"] == 1.0
    wrong = attribute_agreement(x, y, (thickness + 1) % 3, slant, bins=bins)
    assert wrong["thickness"] == 0.0 and wrong["slant"] == 1.0 and wrong["all"] == 0.0
    # an nnx classifier (here untrained: about chance) is applied under jit
    untrained = attribute_agreement(x, y, thickness, slant, bins=bins, classifier=DigitsClassifier(rngs=nnx.Rngs(0)))
    assert 0.0 <= untrained["label"] < 0.5 and untrained["all"] <= untrained["label"]
    with pytest.raises(ValueError, match=r"requested_label of shape \(B,\) = \(600,\)"):
        attribute_agreement(x, y[:5], thickness, slant, bins=bins)
