"""Input validation shared by the mathematical core.

JAX code runs in two modes: eagerly (Colab, tests, scripts) and traced under
``jit``/``vmap``/``grad``. Shape errors are static and are always raised. Value
errors (``t`` outside ``[0, 1]``, NaN) can only be detected on concrete arrays:
we raise them eagerly and skip the check for tracers, so compiled programs pay
nothing for it.
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp

Array = jax.Array


def is_concrete(x) -> bool:
    """True when ``x`` holds values (not a tracer inside jit/vmap/grad)."""
    return not isinstance(x, jax.core.Tracer)


_CONVENTIONS = {
    "jaxgen": ("jaxgen's convention: t=0 is noise, t=1 is data",
               "If your times come from a diffusion code base where tau=0 is data, pass t = 1 - tau."),
    "diffusion": ("score_sde's diffusion time: tau=0 is data, tau=1 is noise",
                  "If you hold jaxgen times t (t=1 is data), pass tau = 1 - t."),
}


def check_time(t, *, name: str = "t", lo: float = 0.0, hi: float = 1.0, convention: str = "jaxgen") -> None:
    """Raise ``ValueError`` if a concrete ``t`` leaves ``[lo, hi]`` or is not finite.

    ``convention`` names the time in the message: ``"jaxgen"`` (t=0 noise, t=1 data) or ``"diffusion"``
    (score_sde's tau=0 data, tau=1 noise).
    """
    if not is_concrete(t):
        return
    arr = np.asarray(t)
    if arr.size == 0:
        return
    meaning, hint = _CONVENTIONS[convention]
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or inf; time must be a finite value in [{lo:g}, {hi:g}] ({meaning}).")
    tmin, tmax = float(arr.min()), float(arr.max())
    if tmin < lo or tmax > hi:
        raise ValueError(f"{name} must lie in [{lo:g}, {hi:g}] ({meaning}), got values in [{tmin:.6g}, {tmax:.6g}]. "
                         + hint)


def batch_time(t, x: Array, *, name: str = "t", convention: str = "jaxgen") -> Array:
    """Return ``t`` as an array of shape ``(B,)`` for a batch ``x`` of shape ``(B, ...)``.

    A scalar ``t`` is broadcast to the batch. A ``(B,)`` array must match ``x.shape[0]``.
    A ``(B, 1)`` array (a common habit from PyTorch code) is accepted and flattened.
    """
    check_time(t, name=name, convention=convention)
    dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.float32
    t = jnp.asarray(t, dtype=dtype)
    if x.ndim == 0:
        raise ValueError("x must have a leading batch axis, got a scalar; reshape it to (1, ...).")
    batch = x.shape[0]
    if t.ndim == 0:
        return jnp.broadcast_to(t, (batch,))
    if t.ndim == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.ndim != 1 or t.shape[0] != batch:
        raise ValueError(
            f"{name} must be a scalar or have shape (B,) = ({batch},) to match x of shape {tuple(x.shape)}; "
            f"got {name}.shape = {tuple(t.shape)}."
        )
    return t


def expand_like(c: Array, x: Array) -> Array:
    """Reshape a per-sample coefficient ``(B,)`` to ``(B, 1, ..., 1)`` so it broadcasts against ``x``."""
    return jnp.reshape(c, c.shape + (1,) * (x.ndim - c.ndim))


def check_same_shape(**arrays) -> None:
    """Raise ``ValueError`` if the named arrays do not share one shape."""
    shapes = {k: tuple(jnp.shape(v)) for k, v in arrays.items()}
    if len(set(shapes.values())) > 1:
        desc = ", ".join(f"{k}.shape={s}" for k, s in shapes.items())
        raise ValueError(f"shape mismatch: {desc}; these arrays must have the same shape (B, ...).")


def safe_divide(num: Array, den: Array, floor: float = 1e-6) -> Array:
    """``num / den`` with ``|den|`` floored at ``floor`` (its sign kept; 0 counts as positive).

    Used wherever a conversion divides by ``alpha_t`` (zero at t=0) or ``beta_t`` (zero at
    t=1): the result is exact wherever ``|den| >= floor`` and finite everywhere.
    """
    sign = jnp.where(den < 0, -1.0, 1.0).astype(den.dtype)
    den = jnp.where(jnp.abs(den) < floor, sign * floor, den)
    return num / den


def check_finite(value, *, name: str, hint: str = "") -> None:
    """Raise ``ValueError`` if a concrete ``value`` (a number or an array) holds NaN or inf; tracers pass.

    The test runs where the array lives and at once, also while an enclosing function is being traced (a concrete
    array closed over by a jitted function): one boolean comes back to the host."""
    if value is None or not is_concrete(value):
        return
    with jax.ensure_compile_time_eval():
        arr = jnp.asarray(value)
        if arr.size == 0 or not jnp.issubdtype(arr.dtype, jnp.inexact) or bool(jnp.isfinite(arr).all()):
            return
    raise ValueError(f"{name} must be finite: {name} holds NaN or inf." + (f" {hint}" if hint else ""))


def check_labels(y, num_classes: int, *, owner: str) -> None:
    """Raise ``ValueError`` for concrete labels that are not integers in ``[0, num_classes]`` (``num_classes`` is the
    null class of classifier-free guidance); an embedding lookup outside that range returns NaN silently. Traced
    labels pass."""
    if y is None or not is_concrete(y):
        return
    arr = np.asarray(y)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{owner} labels y must be integers, got dtype {arr.dtype}; pass y.astype(jnp.int32).")
    if arr.size and (arr.min() < 0 or arr.max() > num_classes):
        raise ValueError(f"{owner} labels y must lie in [0, {num_classes}] ({num_classes} = the null class), got "
                         f"values in [{arr.min()}, {arr.max()}].")
