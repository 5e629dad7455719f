"""Does a generated digit have what its caption asked for? Label (the digits classifier), stroke thickness and slant
(the measurements of :mod:`jaxgen.data.captions`)."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import jax
import jax.numpy as jnp
from flax import nnx

from jaxgen.data.captions import AttributeBins
from jaxgen.evaluation.digits import classifier_logits

_classify = jax.jit(AttributeBins.classify)


def _batch(images) -> int:
    shape = tuple(np.shape(images))
    if len(shape) != 4:
        raise ValueError(f"attribute_agreement expects a batch of channels-last images (B, H, W, C), got shape {shape}.")
    return shape[0]


def attribute_agreement(images: Any, requested_label: Any, requested_thickness: Any = None,
                        requested_slant: Any = None, *, bins: AttributeBins,
                        classifier: Callable | None = None) -> dict[str, float | None]:
    """How often generated digits have what their captions asked for: ``{"label", "thickness", "slant", "all"}``.

    * ``"label"``: the fraction that ``classifier`` (a :class:`jaxgen.models.DigitsClassifier`, e.g. from
      :func:`jaxgen.evaluation.load_or_train_digits_classifier`, or any callable ``images -> logits (B, 10)``)
      assigns to ``requested_label`` (None without a classifier);
    * ``"thickness"`` / ``"slant"``: the fraction whose measured bin (:meth:`AttributeBins.classify`, per-class bins
      taken at the *requested* label) equals the requested bin, over the samples that requested one (bin ``>= 0``;
      -1 or None = not requested; None when no sample requested it);
    * ``"all"``: the fraction meeting every requested part (label only when a classifier is given).

    Chance level is 1/3 for each attribute; on the real (training) digits with their own bins it is 1 by construction.
    """
    b = _batch(images)
    labels = np.asarray(requested_label)
    if labels.shape != (b,) or labels.dtype.kind not in "iu":
        raise ValueError(f"attribute_agreement expects integer requested_label of shape (B,) = ({b},), got "
                         f"{labels.shape} of dtype {labels.dtype}.")

    def requested(value, name):
        if value is None:
            return np.full((b,), -1)
        value = np.asarray(value)
        if value.shape != (b,) or value.dtype.kind not in "iu":
            raise ValueError(f"attribute_agreement expects integer {name} bins of shape (B,) = ({b},) (-1 = not "
                             f"requested), got {value.shape} of dtype {value.dtype}.")
        return value

    want_t = requested(requested_thickness, "requested_thickness")
    want_s = requested(requested_slant, "requested_slant")
    got_t, got_s = (np.asarray(a) for a in _classify(bins, jnp.asarray(images), jnp.asarray(labels)))
    ok = np.ones((b,), bool)
    out: dict[str, float | None] = {"label": None}
    if classifier is not None:
        logits = np.asarray(classifier_logits(classifier, images) if isinstance(classifier, nnx.Module)
                            else classifier(jnp.asarray(images)))
        label_ok = logits.argmax(-1) == labels
        out["label"] = float(label_ok.mean())
        ok &= label_ok
    for name, want, got in (("thickness", want_t, got_t), ("slant", want_s, got_s)):
        asked = want >= 0
        match = got == want
        out[name] = float(match[asked].mean()) if asked.any() else None
        ok &= match | ~asked
    out["all"] = float(ok.mean())
    return out



__all__ = ["attribute_agreement"]
