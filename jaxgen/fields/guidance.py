r"""Guidance: classifier-free guidance (notes sec. 5.2.2) and classifier guidance (notes sec. 5.3)."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from jaxgen._checks import batch_time, check_finite, expand_like
from jaxgen.fields.algebra import canonical_prediction, convert, from_data_and_noise, to_data_and_noise
from jaxgen.paths.gaussian import GaussianPath, as_path

Array = jax.Array


def cfg_combine(conditional: Array, unconditional: Array, guidance_scale: float | Array) -> Array:
    r"""Classifier-free guidance (notes section 5.2.2): ``(1 - w) u(x|null) + w u(x|y)``.

    ``w = 1`` is the conditional field and ``w = 0`` the unconditional one. Papers that write
    ``u(x|y) + w' (u(x|y) - u(x|null))`` (Ho & Salimans 2022) use ``w = 1 + w'``. The combination is
    linear, so it is the same for velocity, score, eps, data and v predictions.
    """
    w = jnp.asarray(guidance_scale, conditional.dtype)
    if w.ndim == 1 and conditional.ndim > 1:
        w = expand_like(w, conditional)
    return (1.0 - w) * unconditional + w * conditional


def _labels(cond: dict, label_key: str, owner: str, batch: int) -> Array:
    """Pop the labels a guided field guides towards: class indices of shape ``(B,)`` (a scalar is broadcast), or one
    array per sample of shape ``(B, ...)`` (e.g. a caption's tokens ``(B, L)``)."""
    if label_key not in cond:
        raise ValueError(f"the {owner} needs the labels to guide towards: call it as field(x, t, {label_key}=labels) "
                         f"(in sample(): cond={{{label_key!r}: labels}}); got keywords {sorted(cond)}.")
    y = jnp.asarray(cond.pop(label_key))
    if y.shape != () and y.shape[0] != batch:
        raise ValueError(f"the {owner}'s labels {label_key} must have shape (B, ...) with B = {batch} or be a scalar, "
                         f"got {tuple(y.shape)}.")
    return jnp.broadcast_to(y, (batch,)) if y.shape == () else y


def guided_field(field: Callable, guidance_scale: float | Array, *, null_label: int, label_key: str = "y") -> Callable:
    """A field ``x, t, y -> cfg_combine(field(x,t,y), field(x,t,null), w)`` evaluated as ONE network call
    on a doubled batch (conditional and unconditional halves). Counts as one NFE of batch 2B.

    The labels ``cond[label_key]`` are class indices ``(B,)`` or one array per sample ``(B, ...)`` (a caption's tokens,
    whose null is the all-padding sequence ``null_label=0``); the other conditioning arrays with the batch's leading
    size (a ControlNet's control images) are the same in both halves.

    Raises ``ValueError`` for a guidance scale that is known here (not traced) and is NaN or inf.
    """
    check_finite(guidance_scale, name="guidance_scale", hint="Use w = 0 (unconditional), 1 (conditional) or > 1.")

    def guided(x, t, **cond):
        t = batch_time(t, x)
        y = _labels(cond, label_key, "guided_field", x.shape[0])
        n = x.shape[0]
        xx = jnp.concatenate([x, x], axis=0)
        tt = jnp.concatenate([t, t], axis=0)
        yy = jnp.concatenate([y, jnp.full_like(y, null_label)], axis=0)
        rest = {k: (jnp.concatenate([v, v], axis=0) if jnp.ndim(v) >= 1 and jnp.shape(v)[0] == n else v)
                for k, v in cond.items()}
        out = field(xx, tt, **{label_key: yy}, **rest)
        return cfg_combine(out[:n], out[n:], guidance_scale)

    return guided


def classifier_guided_field(
    path: GaussianPath | str,
    field: Callable,
    log_prob: Callable,
    guidance_scale: float,
    *,
    prediction: str = "velocity",
    label_key: str = "y",
) -> Callable:
    r"""Classifier guidance (Dhariwal & Nichol 2021; notes sec. 5.3): the score of ``p_t(x | y)^w``-tilted
    sampling is ``score_t(x) + w grad_x log p_t(y | x)``.

    ``log_prob(x, t, y) -> (B,)`` is a time-dependent classifier's log-probability of the labels. The
    guided field keeps ``field``'s parameterisation: the classifier gradient is added to the decoded
    score and re-encoded, e.g. for velocity ``u + (beta^2 da/a - db beta) w grad log p(y|x)`` (eq. 4.2.3).
    One network call plus one classifier gradient per evaluation.
    """
    path = as_path(path)
    prediction = canonical_prediction(prediction)

    def guided(x, t, **cond):
        t = batch_time(t, x)
        y = _labels(cond, label_key, "classifier_guided_field", x.shape[0])
        out = field(x, t, **cond)
        grad = jax.grad(lambda xx: jnp.sum(log_prob(xx, t, y)))(x)
        z, eps = to_data_and_noise(path, out, x, t, prediction)
        score = from_data_and_noise(path, z, eps, t, "score") + guidance_scale * grad
        return convert(path, score, x, t, source="score", target=prediction)

    return guided


__all__ = ["cfg_combine", "guided_field", "classifier_guided_field"]
