"""Input validation shared by the mathematical core.

JAX code runs in two modes: eagerly (Colab, tests, scripts) and traced under
``jit``/``vmap``/``grad``. Shape errors are static and are always raised. Value
errors (``t`` outside ``[0, 1]``, NaN) can only be detected on concrete arrays:
we raise them eagerly and skip the check for tracers, so compiled programs pay
nothing for it.

The opt-in *checked mode* (:func:`checked`, ``Trainer(..., checked=True)``)
also checks traced values on the device -- finite inputs, labels in range --
with ``jax.experimental.checkify``: a failed check raises ``ValueError`` with
the same message once the compiled program has run.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from typing import Any, Callable

import numpy as np
import jax
import jax.numpy as jnp

Array = jax.Array


def is_concrete(x) -> bool:
    """True when ``x`` holds values (not a tracer inside jit/vmap/grad)."""
    return not isinstance(x, jax.core.Tracer)


# ---------------------------------------------------------------------------------------------------------
# Checked mode: device-side checks of traced values (jax.experimental.checkify), off unless asked for.
# ---------------------------------------------------------------------------------------------------------

_MODE = threading.local()


@contextlib.contextmanager
def checking(on: bool = True):
    """Trace the enclosed code with device-side checks (only meaningful inside a ``checkify.checkify``-transformed
    function, as :func:`checked` and ``Trainer(checked=True)`` arrange; the flag is read while tracing)."""
    previous = getattr(_MODE, "on", False)
    _MODE.on = on
    try:
        yield
    finally:
        _MODE.on = previous


def checking_on() -> bool:
    """Whether the code being traced now is in checked mode."""
    return getattr(_MODE, "on", False)


def device_check(predicate, message: str, **values) -> None:
    """In checked mode, a device-side assertion ``predicate`` (a traced boolean) with ``message`` (``{name}`` fields
    are filled from ``values``, traced scalars); outside it, nothing."""
    if checking_on():
        from jax.experimental import checkify

        literal = message.replace("{", "{{").replace("}", "}}")
        for k in values:
            literal = literal.replace("{{" + k + "}}", "{" + k + "}")
        checkify.check(jnp.all(predicate), literal, **values)


def raise_failed_check(error: Any, context: str = "") -> None:
    """Turn a ``checkify`` error from a checked program into ``ValueError`` (its message without checkify's source
    location); no error, nothing."""
    message = error.get()
    if message:
        first = message.split(" (check failed at")[0].replace("(`check` failed)", "").strip()
        raise ValueError(first + (f" ({context})" if context else ""))


def checkified(fn: Callable) -> Callable:
    """``fn`` traced in checked mode and transformed by ``checkify`` (user checks): it returns ``(error, out)``."""
    from jax.experimental import checkify

    def traced(*args, **kwargs):
        with checking():
            return fn(*args, **kwargs)

    return checkify.checkify(traced, errors=checkify.user_checks)


def checked(fn: Callable, *, jit: bool = True) -> Callable:
    """``fn`` with jaxgen's device-side input checks on (finite data and noise, labels in range), compiled
    (``jit=True``) and run; a failed check raises ``ValueError`` naming the problem, after the program ran.

    Example::

        run = jaxgen.checked(lambda x0, y: sample(model, x0, "heun", steps=20, cond={"y": y}).x)
        x = run(x0, labels)      # ValueError if x0 holds NaN or a label is outside [0, num_classes]

    Functions ``fn`` calls that are already ``jax.jit``-compiled keep the trace they had (compile them inside
    ``fn``'s trace to have them checked)."""
    program = checkified(fn)
    program = jax.jit(program) if jit else program

    @functools.wraps(fn)
    def run(*args, **kwargs):
        error, out = program(*args, **kwargs)
        raise_failed_check(error)
        return out

    return run


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
    if value is None:
        return
    if not is_concrete(value):
        if checking_on() and jnp.issubdtype(jnp.result_type(value), jnp.inexact):
            message = f"{name} must be finite: {name} holds NaN or inf." + (f" {hint}" if hint else "")
            device_check(jnp.isfinite(value), message)
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
    if y is None:
        return
    if not is_concrete(y):
        if not jnp.issubdtype(y.dtype, jnp.integer):
            raise ValueError(f"{owner} labels y must be integers, got dtype {y.dtype}; pass y.astype(jnp.int32).")
        device_check((y >= 0) & (y <= num_classes), f"{owner} labels y must lie in [0, {num_classes}] ({num_classes} = "
                     "the null class), got values in [{lo}, {hi}].", lo=jnp.min(y), hi=jnp.max(y))
        return
    arr = np.asarray(y)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{owner} labels y must be integers, got dtype {arr.dtype}; pass y.astype(jnp.int32).")
    if arr.size and (arr.min() < 0 or arr.max() > num_classes):
        raise ValueError(f"{owner} labels y must lie in [0, {num_classes}] ({num_classes} = the null class), got "
                         f"values in [{arr.min()}, {arr.max()}].")


def check_key(key, *, owner: str) -> None:
    """Raise for a ``key`` that is not a JAX PRNG key (a typed ``jax.random.key`` or a raw ``uint32`` key of
    ``jax.random.PRNGKey``); a Python int is the common slip."""
    if isinstance(key, (bool, int, np.integer)):
        raise TypeError(f"{owner} needs a PRNG key, got the integer {key!r}; pass jax.random.key({key!r}).")
    dtype = getattr(key, "dtype", None)
    if dtype is None or not (jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key) or dtype == jnp.uint32):
        raise TypeError(f"{owner} needs a PRNG key such as jax.random.key(0), got {type(key).__name__}"
                        + (f" of dtype {dtype}" if dtype is not None else "") + ".")


def check_data(z, *, owner: str, name: str = "the data") -> None:
    """Raise ``ValueError`` for training data a loss cannot use: no batch axis, an empty batch, an integer dtype, or
    (when concrete) NaN/inf. Shapes and dtypes are checked also under ``jit``; values only outside it."""
    shape, dtype = jnp.shape(z), getattr(z, "dtype", None)
    if dtype is None:
        dtype = jnp.asarray(z).dtype
    if len(shape) < 1:
        raise ValueError(f"{owner}: {name} must have a leading batch axis (B, ...), got a scalar.")
    if shape[0] == 0:
        raise ValueError(f"{owner}: {name} is an empty batch (shape {tuple(shape)}); a loss needs at least one sample.")
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{owner}: {name} must be floating point, got dtype {dtype}; convert it, e.g. "
                         "x.astype(jnp.float32) (images scaled to [-1, 1]).")
    check_finite(z, name=name, hint=f"Found by the {owner}: clean the data set or check the pipeline that produced it.")


def check_number(value, ok: Callable[[Any], bool], *, name: str, owner: str, what: str) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite real Python/NumPy number for which ``ok(value)`` holds;
    ``what`` says what it must be (``"a finite number > 0 (e.g. 1e-3)"``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not np.isfinite(value) or not ok(value):
        raise ValueError(f"{owner}: {name} must be {what}, got {value!r}.")


def check_tolerances(rtol, atol, max_steps, *, owner: str) -> None:
    """Raise ``ValueError`` for adaptive-solver settings diffrax would reject deep inside a solve (or loop on):
    ``rtol`` and ``atol`` finite, non-negative and not both zero, ``max_steps`` a positive integer."""
    for name, v in (("rtol", rtol), ("atol", atol)):
        check_number(v, lambda x: x >= 0, name=name, owner=owner, what="a finite number >= 0 (typical: 1e-5)")
    if rtol == 0 and atol == 0:
        raise ValueError(f"{owner}: rtol and atol are both 0, which no adaptive step can meet; use e.g. "
                         "rtol=atol=1e-5.")
    if isinstance(max_steps, bool) or not isinstance(max_steps, (int, np.integer)) or max_steps < 1:
        raise ValueError(f"{owner}: max_steps must be a positive integer, got {max_steps!r}.")
