r"""Captions for the 8x8 digits from measured attributes: ``"seven, thick, slanted right"``.

The digits data set has labels only; captions are made from two attributes measured on each image (no annotation):

* **thickness**, from the ink mass: ``ink = mean_{ij} I_ij`` with the intensity ``I = (x + 1) / 2`` in ``[0, 1]`` (so
  ``ink`` is in ``[0, 1]``, the fraction of the image covered, counting grey as partial ink). At a fixed shape more
  ink means a thicker pen stroke. A digit's shape also sets its ink (an "8" has more stroke than a "7"), so the bins
  are **per class**: "thin" / "medium" / "thick" are the terciles of ``ink`` *within the digit's class* on the
  training set, and "thick" means thick for that digit. (On scikit-learn's digits the class effect is small, because
  the digits were scaled to fill their 32x32 box before blurring to 8x8: the class means of ``ink`` range 0.297
  ("7") to 0.323 ("8") against a within-class spread of about 0.03. With global terciles "8" would be "thick" 50% of
  the time and "7" 23%; per class every digit is in each bin about a third of the time.)
* **slant**, from second-order central moments of the ink distribution (the moment-based "deskewing" of handwritten
  digit recognition, e.g. the deskewed-MNIST entries of LeCun et al. 1998): with ``u`` the height above the centroid (up
  = positive) and ``v`` the column offset, ``slant = mu_{11} / mu_{02} = sum I (v - v̄)(u - ū) / sum I (u - ū)^2``, the
  least-squares shear ``dv/du`` of the ink: positive = the top leans right, 0 for an upright bar, and exactly ``s`` for
  an image sheared by ``v -> v + s u``. The shape of a digit biases this much more strongly than the ink (class means
  from -0.20 for "6" to +0.14 for "7", within-class spread 0.06 - 0.14: a "7"'s diagonal stroke reads as a right lean, a
  "6"'s as a left one; with global terciles 99% of the sevens are "slanted right" and 93% of the sixes "slanted left"),
  so the slant bins are per class too: "slanted left" / "upright" / "slanted right" are the class's terciles (relative
  to how that digit is usually written).

:class:`AttributeBins` holds the tercile thresholds (fitted on the training set, per class or global);
:func:`caption_tokens` turns labels and bins into token ids, :func:`drop_caption_parts` drops attributes (and whole
captions, for classifier-free guidance) at training time, and :func:`jaxgen.evaluation.attribute_agreement` measures how often generated
digits have the requested label, thickness and slant. Every function on arrays is batched and jit-able.

Example::

    train = load_digits("train")
    bins = AttributeBins.fit(train.images, train.labels)                 # per-class terciles
    thickness, slant = bins.classify(train.images, train.labels)         # (N,), (N,) ints in {0, 1, 2}
    tokens = caption_tokens(train.labels, thickness, slant)              # (N, MAX_LEN) ids
    decode(tokens[0])                                                    # "zero, thin, slanted right"
    tokens = drop_caption_parts(key, tokens, p_attribute=0.3, p_all=0.1) # training-time caption dropout
    encode("seven, thick")                                               # a partial caption for sampling
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import jax
import jax.numpy as jnp

from jaxgen._checks import check_key, is_concrete

Array = jax.Array

PAD = 0  #: the padding id (the same as jaxgen.models.text.PAD)
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
THICKNESS_WORDS = ("thin", "medium", "thick")  #: thickness bins 0, 1, 2
SLANT_PHRASES = ("slanted left", "upright", "slanted right")  #: slant bins 0, 1, 2
#: the vocabulary: id ``i`` is ``VOCAB[i]``
VOCAB = ("<pad>", ",") + DIGIT_WORDS + THICKNESS_WORDS + ("upright", "slanted", "left", "right")
MAX_LEN = 8  #: token sequence length (the longest caption, "seven, thick, slanted right", has 6 tokens)

_ID = {w: i for i, w in enumerate(VOCAB)}
_COMMA = _ID[","]
_DIGIT_IDS = np.array([_ID[w] for w in DIGIT_WORDS], np.int32)
_THICK_IDS = np.array([_ID[w] for w in THICKNESS_WORDS], np.int32)
# word classes for drop_caption_parts: 0 = padding, 1 = digit, 2 = thickness, 3 = slant, 4 = comma
_PADDING, _DIGIT, _THICKNESS, _SLANT, _SEPARATOR = range(5)
_WORD_CLASS = np.array([_PADDING, _SEPARATOR] + [_DIGIT] * 10 + [_THICKNESS] * 3 + [_SLANT] * 4, np.int32)


# ---------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------


def _check_images(images, owner: str) -> tuple[int, ...]:
    shape = tuple(jnp.shape(images))
    if len(shape) != 4:
        hint = " Add the channel axis: images[..., None]." if len(shape) == 3 else ""
        raise ValueError(f"{owner} expects images of shape (B, H, W, C) in [-1, 1], got {shape}.{hint}")
    if not jnp.issubdtype(jnp.result_type(images), jnp.floating):
        raise ValueError(f"{owner} expects floating-point images in [-1, 1], got dtype {jnp.result_type(images)}; "
                         "convert uint8 images with x / 127.5 - 1.")
    return shape


def measure_attributes(images: Array) -> dict[str, Array]:
    r"""Ink mass and slant of images ``(B, H, W, C)`` in ``[-1, 1]`` (module docstring): ``{"ink": (B,), "slant":
    (B,)}``.

    ``ink = mean I`` with ``I = clip((x + 1) / 2, 0, 1)`` averaged over channels; ``slant = mu_11 / mu_02`` with the
    central moments ``mu_pq = sum I (v - v̄)^p (u - ū)^q`` of column ``v`` and height ``u = -row`` (the central moments
    of Hu 1962, "Visual pattern recognition by moment invariants"): the least-squares shear of the ink, positive when
    the top leans right. A blank image (or a single row of ink, ``mu_02 = 0``) has slant 0. Batched, jit-able,
    differentiable.
    """
    _, h, w, _ = _check_images(images, "measure_attributes")
    intensity = jnp.clip((jnp.mean(jnp.asarray(images, jnp.float32), axis=-1) + 1.0) / 2.0, 0.0, 1.0)  # (B, H, W)
    mass = jnp.sum(intensity, axis=(1, 2))
    safe_mass = jnp.maximum(mass, 1e-6)
    u = -jnp.arange(h, dtype=jnp.float32)[None, :, None]  # height: up is positive
    v = jnp.arange(w, dtype=jnp.float32)[None, None, :]
    u_bar = jnp.sum(intensity * u, axis=(1, 2)) / safe_mass
    v_bar = jnp.sum(intensity * v, axis=(1, 2)) / safe_mass
    du, dv = u - u_bar[:, None, None], v - v_bar[:, None, None]
    mu11 = jnp.sum(intensity * dv * du, axis=(1, 2))
    mu02 = jnp.sum(intensity * du * du, axis=(1, 2))
    slant = jnp.where(mu02 > 1e-6, mu11 / jnp.maximum(mu02, 1e-6), 0.0)
    return {"ink": mass / (h * w), "slant": slant}


_measure_jit = jax.jit(measure_attributes)


def _bin(values: Array, thresholds: Array, labels: Array | None) -> Array:
    """``(values > t_1) + (values > t_2)`` with the thresholds of each sample's class (or the global ones)."""
    t = thresholds[0][None] if thresholds.shape[0] == 1 else thresholds[labels]  # (B, 2)
    return ((values > t[:, 0]).astype(jnp.int32) + (values > t[:, 1]).astype(jnp.int32))


class AttributeBins(NamedTuple):
    """Tercile thresholds of the attributes (:func:`measure_attributes`), fitted on a training set.

    ``ink_thresholds`` and ``slant_thresholds`` have shape ``(K, 2)``: the 1/3 and 2/3 quantiles per class (``K`` =
    the number of classes) or for all images (``K = 1``). A NamedTuple of arrays, hence a pytree: pass it into jitted
    functions. Bins: ``0`` below the first threshold, ``1`` between, ``2`` above (thin / medium / thick; slanted left
    / upright / slanted right).
    """

    ink_thresholds: Array
    slant_thresholds: Array

    @classmethod
    def fit(cls, images: Any, labels: Any = None, *, num_classes: int = 10, per_class_thickness: bool = True,
            per_class_slant: bool = True) -> "AttributeBins":
        """Terciles of ``ink`` and ``slant`` on ``images`` ``(N, H, W, C)`` (per class of ``labels`` ``(N,)``, the
        default for both, or globally). Each class needs at least 3 images."""
        _check_images(images, "AttributeBins.fit")
        n = jnp.shape(images)[0]
        if per_class_thickness or per_class_slant:
            if labels is None:
                raise ValueError("AttributeBins.fit: per-class bins need the labels; pass labels=(N,) or "
                                 "per_class_thickness=False, per_class_slant=False for global bins.")
            labels = np.asarray(labels)
            if labels.shape != (n,) or labels.dtype.kind not in "iu":
                raise ValueError(f"AttributeBins.fit expects integer labels of shape (N,) = ({n},), got "
                                 f"{labels.shape} of dtype {labels.dtype}.")
            counts = np.bincount(labels, minlength=num_classes)
            if labels.min() < 0 or labels.max() >= num_classes or counts.min() < 3:
                raise ValueError(f"AttributeBins.fit: every class 0..{num_classes - 1} needs at least 3 images for "
                                 f"per-class terciles; got class counts {counts.tolist()}.")
        m = {k: np.asarray(a) for k, a in _measure_jit(images).items()}

        def terciles(values: np.ndarray, per_class: bool) -> Array:
            if not per_class:
                return jnp.asarray(np.quantile(values, [1 / 3, 2 / 3])[None], jnp.float32)
            return jnp.asarray(np.stack([np.quantile(values[labels == k], [1 / 3, 2 / 3])
                                         for k in range(num_classes)]), jnp.float32)

        return cls(terciles(m["ink"], per_class_thickness), terciles(m["slant"], per_class_slant))

    def classify(self, images: Array, labels: Array | None = None) -> tuple[Array, Array]:
        """``(thickness_bin, slant_bin)``, each ``(B,)`` ints in ``{0, 1, 2}``, of images ``(B, H, W, C)`` whose classes
        are ``labels`` ``(B,)`` (needed for per-class thresholds: the true labels, or the requested ones for generated
        images). Jit-able."""
        b = _check_images(images, "AttributeBins.classify")[0]
        per_class = self.ink_thresholds.shape[0] > 1 or self.slant_thresholds.shape[0] > 1
        if per_class:
            if labels is None:
                raise ValueError("AttributeBins.classify: these bins are per class; pass the labels (B,).")
            if jnp.shape(labels) != (b,):
                raise ValueError(f"AttributeBins.classify expects labels of shape (B,) = ({b},), got "
                                 f"{tuple(jnp.shape(labels))}.")
        m = measure_attributes(images)
        return _bin(m["ink"], self.ink_thresholds, labels), _bin(m["slant"], self.slant_thresholds, labels)


# ---------------------------------------------------------------------------
# Captions and the tokenizer
# ---------------------------------------------------------------------------


def caption_text(label: int, thickness: int | None = None, slant: int | None = None) -> str:
    """The caption of a digit ``label`` with a thickness bin and a slant bin (each ``0..2``, or None / -1 to leave it
    out): ``caption_text(7, 2, 2) == "seven, thick, slanted right"``, ``caption_text(7, 2) == "seven, thick"``."""
    if not 0 <= int(label) < 10:
        raise ValueError(f"caption_text: label must be a digit 0..9, got {label!r}.")
    parts = [DIGIT_WORDS[int(label)]]
    for value, words, name in ((thickness, THICKNESS_WORDS, "thickness"), (slant, SLANT_PHRASES, "slant")):
        if value is None or int(value) < 0:
            continue
        if int(value) > 2:
            raise ValueError(f"caption_text: {name} must be a bin 0, 1, 2 ({', '.join(words)}) or None, got {value!r}.")
        parts.append(words[int(value)])
    return ", ".join(parts)


def _words(text: str) -> list[str]:
    return text.lower().replace(",", " , ").split()


def encode(text: str, max_len: int = MAX_LEN) -> np.ndarray:
    """Token ids ``(max_len,)`` (int32) of a caption, padded with ``PAD``: words are split on spaces, "," is a token,
    case is ignored. Raises ValueError naming unknown words (and listing the vocabulary) or a caption longer than
    ``max_len``. The model is trained on the canonical order ``"<digit>[, <thickness>][, <slant>]"``
    (:func:`caption_text`)."""
    if not isinstance(text, str):
        raise ValueError(f"encode expects a caption string, got {type(text).__name__}; token arrays go to decode.")
    words = _words(text)
    unknown = [w for w in words if w not in _ID or w == VOCAB[PAD]]
    if unknown:
        raise ValueError(f"unknown word(s) {unknown} in the caption {text!r}; the vocabulary is "
                         f"{list(VOCAB[1:])} (e.g. 'seven, thick, slanted right').")
    if len(words) > max_len:
        raise ValueError(f"the caption {text!r} has {len(words)} tokens, more than max_len={max_len}.")
    ids = np.zeros((max_len,), np.int32)
    ids[:len(words)] = [_ID[w] for w in words]
    return ids


def decode(ids: Any) -> str:
    """The caption of token ids ``(L,)`` (padding skipped): ``decode(encode(t)) == t`` for a canonical caption ``t``;
    ids ``(B, L)`` give a list of captions."""
    ids = np.asarray(ids)
    if ids.ndim == 2:
        return [decode(row) for row in ids]
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise ValueError(f"decode expects integer token ids of shape (L,) or (B, L), got {ids.shape} of dtype "
                         f"{ids.dtype}.")
    if ids.size and (ids.min() < 0 or ids.max() >= len(VOCAB)):
        raise ValueError(f"decode: token ids must lie in [0, {len(VOCAB) - 1}], got values in "
                         f"[{ids.min()}, {ids.max()}].")
    return " ".join(VOCAB[i] for i in ids if i != PAD).replace(" ,", ",")


def _compact(tokens: Array, keep: Array) -> Array:
    """Move the kept tokens to the front (in order) and pad the rest: ``(B, L)`` -> ``(B, L)``."""
    order = jnp.argsort(~keep, axis=-1, stable=True)
    packed = jnp.take_along_axis(tokens, order, axis=-1)
    count = jnp.sum(keep, axis=-1, keepdims=True)
    return jnp.where(jnp.arange(tokens.shape[-1])[None] < count, packed, PAD).astype(jnp.int32)


def _per_sample(value, batch: int, name: str) -> Array:
    if value is None:
        return jnp.full((batch,), -1, jnp.int32)
    if _size(value) not in (1, batch):
        raise ValueError(f"caption_tokens expects {name} of shape (B,) = ({batch},) or a scalar, got "
                         f"{tuple(jnp.shape(value))}.")
    if not jnp.issubdtype(jnp.result_type(value), jnp.integer):
        raise ValueError(f"caption_tokens expects integer {name} bins (0, 1, 2, or -1 = leave out), got dtype "
                         f"{jnp.result_type(value)}.")
    return jnp.broadcast_to(jnp.reshape(jnp.asarray(value, jnp.int32), (-1,)), (batch,))


def _size(value) -> int:
    return int(np.prod(jnp.shape(value)))


def caption_tokens(labels: Array, thickness_bin: Array | None = None, slant_bin: Array | None = None,
                   max_len: int = MAX_LEN) -> Array:
    """Token ids ``(B, max_len)`` of the captions ``"<digit>, <thickness>, <slant>"`` of ``labels`` ``(B,)`` and bins
    ``(B,)`` (:meth:`AttributeBins.classify`); a bin of -1 (or None for all) leaves that attribute out. Equal to
    ``encode(caption_text(...))`` row by row; an array operation, jit-able."""
    labels = jnp.asarray(labels)
    if labels.ndim != 1 or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"caption_tokens expects integer labels of shape (B,), got {labels.shape} of dtype "
                         f"{labels.dtype}.")
    if max_len < 6:
        raise ValueError(f"caption_tokens needs max_len >= 6 (the longest caption has 6 tokens), got {max_len}.")
    if is_concrete(labels) and labels.size:
        values = np.asarray(labels)
        if values.min() < 0 or values.max() > 9:
            raise ValueError(f"caption_tokens: labels must be digits 0..9, got values in [{values.min()}, "
                             f"{values.max()}].")
    b = labels.shape[0]
    th = _per_sample(thickness_bin, b, "thickness_bin")
    sl = _per_sample(slant_bin, b, "slant_bin")
    comma = jnp.full((b,), _COMMA, jnp.int32)
    slant1 = jnp.where(sl == 1, _ID["upright"], _ID["slanted"])
    slant2 = jnp.where(sl == 0, _ID["left"], jnp.where(sl == 2, _ID["right"], PAD))
    seq = jnp.stack([jnp.asarray(_DIGIT_IDS)[labels], comma, jnp.asarray(_THICK_IDS)[jnp.clip(th, 0, 2)], comma,
                     slant1, slant2], axis=-1)
    keep = jnp.stack([jnp.ones((b,), bool), th >= 0, th >= 0, sl >= 0, sl >= 0, (sl == 0) | (sl == 2)], axis=-1)
    seq = _compact(seq, keep)
    return jnp.pad(seq, ((0, 0), (0, max_len - seq.shape[1])))


def drop_caption_parts(key: Array, tokens: Array, p_attribute: float | Array, p_all: float | Array) -> Array:
    """Caption dropout for training: each caption ``(B, L)`` independently loses its thickness (with probability
    ``p_attribute``), independently its slant (``p_attribute``), and with probability ``p_all`` everything (the
    all-PAD null caption of classifier-free guidance, Ho & Salimans 2022). The remaining tokens are moved to the front,
    so the result is the encoding of the partial caption (``"seven, slanted right"``, ``"seven"``): a model trained
    on it can be asked for any subset of the attributes.

    Parts are found by their words (a comma belongs to the part after it), so captions of any subset of parts work.
    Jit-able (``p_attribute``, ``p_all`` may be traced)."""
    check_key(key, owner="drop_caption_parts")
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"drop_caption_parts expects integer token ids of shape (B, L), got {tokens.shape} of dtype "
                         f"{tokens.dtype}.")
    for name, p in (("p_attribute", p_attribute), ("p_all", p_all)):
        if is_concrete(p) and not (np.ndim(p) == 0 and 0.0 <= float(p) <= 1.0):
            raise ValueError(f"drop_caption_parts: {name} must be a probability in [0, 1], got {p!r}.")
    b = tokens.shape[0]
    word_class = jnp.asarray(_WORD_CLASS)[jnp.clip(tokens, 0, len(VOCAB) - 1)]
    following = jnp.concatenate([word_class[:, 1:], jnp.full((b, 1), _PADDING, jnp.int32)], axis=1)
    part = jnp.where(word_class == _SEPARATOR, following, word_class)
    u = jax.random.uniform(key, (3, b))
    drop_thickness, drop_slant, drop_all = u[0] < p_attribute, u[1] < p_attribute, u[2] < p_all
    keep = ((tokens != PAD) & ~((part == _THICKNESS) & drop_thickness[:, None])
            & ~((part == _SLANT) & drop_slant[:, None]) & ~drop_all[:, None])
    return _compact(tokens, keep)


def caption_digits(images: Array, labels: Array, bins: AttributeBins, max_len: int = MAX_LEN) -> Array:
    """The full captions ``(B, max_len)`` of labelled digits: measure, bin (:meth:`AttributeBins.classify`), tokenize
    (:func:`caption_tokens`). Jit-able."""
    thickness, slant = bins.classify(images, labels)
    return caption_tokens(labels, thickness, slant, max_len)


__all__ = ["PAD", "VOCAB", "MAX_LEN", "DIGIT_WORDS", "THICKNESS_WORDS", "SLANT_PHRASES", "measure_attributes",
           "AttributeBins", "caption_text", "encode", "decode", "caption_tokens", "drop_caption_parts",
           "caption_digits"]
