r"""Noise schedules ``(alpha_t, beta_t)`` of Gaussian probability paths.

A schedule defines the conditional path of the MIT 6.S184 notes (eq. 3.1.4)

.. math::  p_t(x \mid z) = \mathcal N(\alpha_t z, \beta_t^2 I), \qquad x_t = \alpha_t z + \beta_t \epsilon,

with jaxgen's time convention: **t = 0 is noise** (``alpha_0 = 0, beta_0 = 1``) and **t = 1 is
data** (``alpha_1 = 1, beta_1 = 0``). The time derivatives ``d_alpha``, ``d_beta`` are computed
by forward-mode autodiff (one ``jax.jvp``) from the same function, never hand-written.

Schedules from the diffusion literature run the other way (``tau = 0`` data, ``tau = 1``
noise) and are mapped with ``t = 1 - tau``; their coefficients at ``tau`` are reproduced exactly
(see :func:`vp`, :func:`sub_vp`, :func:`ve`, :func:`edm`). Those schedules only meet the boundary
conditions approximately (e.g. VP has ``alpha_0 = e^{-5.025}``; VE's prior is ``N(0, sigma_max^2)``),
and some have infinite derivatives at an endpoint; they therefore declare a time domain
``[t_min, t_max]`` inside ``[0, 1]`` (score_sde's ``eps``), and times outside it are clamped onto it.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Callable, NamedTuple

import numpy as np
import jax
import jax.numpy as jnp

Array = jax.Array
ScalarFn = Callable[[Array], Array]


class ScheduleOutput(NamedTuple):
    """Schedule coefficients at times ``t`` (each of the shape of ``t``)."""

    alpha: Array
    beta: Array
    d_alpha: Array
    d_beta: Array


@dataclasses.dataclass(frozen=True)
class Schedule:
    r"""A pair of scalar functions ``alpha(t)``, ``beta(t)`` on ``[0, 1]``.

    Args:
      alpha_fn: elementwise function ``t -> alpha_t`` (signal coefficient).
      beta_fn: elementwise function ``t -> beta_t`` (noise coefficient).
      name: name used in messages.
      t_min, t_max: the time domain; times are clamped onto it before evaluation. Use it for
        schedules whose derivatives blow up at an endpoint (VP: ``d beta/dt = inf`` at t=1).
      boundary: ``"exact"`` requires ``alpha_0 = 0, beta_0 = 1, alpha_1 = 1, beta_1 = 0`` within
        ``boundary_tol``; ``"approximate"`` requires the signal-to-noise ratios
        ``alpha/beta`` at ``t_min`` and ``beta/alpha`` at ``t_max`` to be at most ``boundary_tol``
        (the prior is then ``N(0, beta_0^2 I)``, and the path ends at ``beta_1 / alpha_1 ~ 0``).

    Construction validates the boundary conditions, finiteness on a grid, and that the map
    ``(z, eps) -> (x_t, u_t)`` is invertible (``alpha_t d_beta_t - beta_t d_alpha_t < 0``), which
    every conversion between predictions relies on. A violation raises ``ValueError``.
    """

    alpha_fn: ScalarFn
    beta_fn: ScalarFn
    name: str = "custom"
    t_min: float = 0.0
    t_max: float = 1.0
    boundary: str = "exact"
    boundary_tol: float = 1e-5

    def __post_init__(self):
        _validate(self)

    def clamp(self, t: Array) -> Array:
        """Clamp times onto the schedule's domain ``[t_min, t_max]``."""
        if self.t_min == 0.0 and self.t_max == 1.0:
            return t
        return jnp.clip(t, self.t_min, self.t_max)

    def _time(self, t: Array) -> Array:
        t = jnp.asarray(t)
        if not jnp.issubdtype(t.dtype, jnp.floating):
            t = t.astype(jnp.float32)
        return self.clamp(t)

    def __call__(self, t: Array) -> ScheduleOutput:
        """Evaluate ``(alpha_t, beta_t, d alpha_t/dt, d beta_t/dt)`` elementwise.

        The derivatives are ``jax.jvp`` of ``alpha_fn``/``beta_fn`` with unit tangent,
        evaluated at the clamped time.
        """
        tc = self._time(t)
        ones = jnp.ones_like(tc)
        alpha, d_alpha = jax.jvp(self.alpha_fn, (tc,), (ones,))
        beta, d_beta = jax.jvp(self.beta_fn, (tc,), (ones,))
        alpha, beta = _nonneg(alpha), _nonneg(beta)
        # Constant schedules (VE's alpha = 1) may return a broadcastable scalar.
        alpha, beta, d_alpha, d_beta = (jnp.broadcast_to(v, tc.shape).astype(tc.dtype)
                                        for v in (alpha, beta, d_alpha, d_beta))
        return ScheduleOutput(alpha, beta, d_alpha, d_beta)

    def values(self, t: Array) -> tuple[Array, Array]:
        """``(alpha_t, beta_t)``: the values of :meth:`__call__` without the two ``jax.jvp`` for the derivatives
        (what the log-SNR and the diffusion samplers need; half the work when evaluated op by op)."""
        tc = self._time(t)
        alpha, beta = _nonneg(self.alpha_fn(tc)), _nonneg(self.beta_fn(tc))
        return tuple(jnp.broadcast_to(v, tc.shape).astype(tc.dtype) for v in (alpha, beta))

    def snr(self, t: Array) -> Array:
        """Signal-to-noise ratio ``alpha_t^2 / beta_t^2`` (infinite where ``beta_t = 0``)."""
        c = self(t)
        return c.alpha**2 / c.beta**2


def _nonneg(v: Array) -> Array:
    """``max(v, 0)``: round-off can make ``cos(pi/2) = -4e-8``, so the coefficients are kept non-negative; written as
    a select, whose derivative is 1 (not ``jnp.maximum``'s 1/2) where ``v = 0``: the one-sided derivative at an open
    end of the path (``alpha_0 = 0``, ``beta_1 = 0``)."""
    return jnp.where(v < 0, jnp.zeros_like(v), v)


def _validate(s: Schedule) -> None:
    if not (0.0 <= s.t_min < s.t_max <= 1.0):
        raise ValueError(f"schedule '{s.name}': need 0 <= t_min < t_max <= 1, got t_min={s.t_min}, t_max={s.t_max}.")
    if s.boundary not in ("exact", "approximate"):
        raise ValueError(f"schedule '{s.name}': boundary must be 'exact' or 'approximate', got {s.boundary!r}.")
    grid = np.concatenate([[0.0, 1.0], np.linspace(0.0, 1.0, 65)]).astype(np.float64)
    with jax.ensure_compile_time_eval():
        out = s(jnp.asarray(grid, jnp.float32))
    a, b, da, db = (np.asarray(v, np.float64) for v in out)
    for label, v in (("alpha", a), ("beta", b), ("d alpha/dt", da), ("d beta/dt", db)):
        if not np.all(np.isfinite(v)):
            bad = grid[~np.isfinite(v)][0]
            raise ValueError(
                f"schedule '{s.name}': {label} is not finite at t={bad:.4g}. If a derivative is infinite at an "
                "endpoint (e.g. sqrt near 0), restrict the domain with t_min/t_max."
            )
    a0, b0, a1, b1 = a[0], b[0], a[1], b[1]
    if s.boundary == "exact":
        errs = {"alpha_0": (a0, 0.0), "beta_0": (b0, 1.0), "alpha_1": (a1, 1.0), "beta_1": (b1, 0.0)}
        bad = {k: v for k, v in errs.items() if abs(v[0] - v[1]) > s.boundary_tol}
        if bad:
            desc = ", ".join(f"{k}={v[0]:.6g} (expected {v[1]:g})" for k, v in bad.items())
            raise ValueError(
                f"schedule '{s.name}' violates its boundary conditions: {desc}. A Gaussian path must start at "
                "noise (alpha_0=0, beta_0=1) and end at data (alpha_1=1, beta_1=0); fix the functions, or pass "
                "boundary='approximate' for a diffusion-style schedule that only reaches them in the limit."
            )
    else:
        r0 = abs(a0) / max(abs(b0), 1e-30)
        r1 = abs(b1) / max(abs(a1), 1e-30)
        if r0 > s.boundary_tol or r1 > s.boundary_tol:
            raise ValueError(
                f"schedule '{s.name}' violates its approximate boundary conditions: alpha/beta at t_min is "
                f"{r0:.4g} and beta/alpha at t_max is {r1:.4g}, both must be <= {s.boundary_tol:g} (the path must "
                "start near pure noise and end near the data)."
            )
    if np.any(b < -1e-7) or np.any(a < -1e-7):
        raise ValueError(f"schedule '{s.name}': alpha_t and beta_t must be non-negative on [0, 1].")
    det = a * db - b * da
    # Interior only: at an endpoint det may vanish (polynomial n > 1 has u_0 = 0 for every z), where the
    # conversions' floored divisions keep results finite.
    interior = (grid > 0) & (grid < 1)
    bad_mask = interior & (det >= 0) | (det > 0)
    if np.any(bad_mask):
        bad = grid[bad_mask][0]
        raise ValueError(
            f"schedule '{s.name}': alpha_t * d_beta_t - beta_t * d_alpha_t must be negative (signal increasing "
            f"relative to noise), but it is {det[bad_mask][0]:.4g} at t={bad:.4g}; conversions between velocity, "
            "score and noise predictions would be singular there."
        )


# ---------------------------------------------------------------------------------------------
# The schedules.
# ---------------------------------------------------------------------------------------------


def linear(sigma_min: float = 0.0) -> Schedule:
    r"""CondOT / rectified-flow schedule: ``alpha_t = t``, ``beta_t = 1 - t`` (notes eq. 4.1.3).

    With ``sigma_min > 0`` it is the optimal-transport path of Lipman et al. (2023, eq. 20), the *target CFM* of
    Tong et al. (2024, eq. 16): ``beta_t = 1 - (1 - sigma_min) t``, so that the path ends at ``N(z, sigma_min^2 I)``
    around each data point rather than at the point (``get_schedule("linear", sigma_min=1e-4)``).
    """
    sigma_min = float(sigma_min)
    if not 0.0 <= sigma_min < 1.0:
        raise ValueError(f"linear schedule needs 0 <= sigma_min < 1 (the noise left at t=1), got {sigma_min}.")
    if sigma_min == 0.0:
        return Schedule(lambda t: t, lambda t: 1.0 - t, name="linear")
    return Schedule(lambda t: t, lambda t: 1.0 - (1.0 - sigma_min) * t, name="linear",
                    boundary="approximate", boundary_tol=max(sigma_min * (1 + 1e-6), 1e-5))


cond_ot = linear


def cosine() -> Schedule:
    r"""Trigonometric schedule ``alpha_t = sin(pi t / 2)``, ``beta_t = cos(pi t / 2)``.

    Variance preserving (``alpha^2 + beta^2 = 1``); the continuous-time limit of the cosine
    schedule of Nichol & Dhariwal (2021) without its offset ``s``.
    """
    return Schedule(lambda t: jnp.sin(0.5 * jnp.pi * t), lambda t: jnp.cos(0.5 * jnp.pi * t), name="cosine")


def polynomial(n: float = 2.0) -> Schedule:
    r"""Polynomial schedule ``alpha_t = t^n``, ``beta_t = 1 - t^n`` (``n > 0``).

    For ``n < 1`` the derivative is infinite at t=0, so the domain starts at
    ``t_min = min(1e-5, 0.02^(1/n))`` (where ``alpha = t_min^n <= 0.02``) and the boundary holds
    approximately.
    """
    if not n > 0:
        raise ValueError(f"polynomial schedule needs an exponent n > 0, got n={n}.")
    if n >= 1:
        return Schedule(lambda t: t**n, lambda t: 1.0 - t**n, name=f"polynomial(n={n})")
    t_min = min(1e-5, 0.02 ** (1.0 / n))
    if t_min < 1e-30:
        raise ValueError(f"polynomial schedule exponent n={n} is too small for float32 times; use n >= 0.03.")
    return Schedule(lambda t: t**n, lambda t: 1.0 - t**n, name=f"polynomial(n={n})", t_min=t_min,
                    boundary="approximate", boundary_tol=0.05)


def vp_log_mean_coeff(tau: Array, beta_min: float, beta_max: float) -> Array:
    r"""``log m(tau) = -1/4 tau^2 (beta_max - beta_min) - 1/2 tau beta_min`` (Song et al. 2021, eq. 29): the log of
    the VP/sub-VP mean coefficient ``alpha`` at diffusion time ``tau``."""
    return -0.25 * tau**2 * (beta_max - beta_min) - 0.5 * tau * beta_min


def _check_vp_args(name: str, beta_min: float, beta_max: float, eps: float) -> None:
    """``0 <= beta_min <= beta_max`` (finite, ``beta_max > 0``) and ``0 < eps < 1``, as score_sde's VP SDE."""
    if not (np.isfinite(beta_min) and np.isfinite(beta_max) and 0 <= beta_min <= beta_max and beta_max > 0):
        raise ValueError(f"{name} schedule needs finite 0 <= beta_min <= beta_max with beta_max > 0 (beta(tau) = "
                         f"beta_min + tau (beta_max - beta_min) grows towards the noise end; score_sde: 0.1, 20), got "
                         f"beta_min={beta_min}, beta_max={beta_max}.")
    if not 0 < eps < 1:
        raise ValueError(f"{name} schedule needs 0 < eps < 1 (the domain ends at t = 1 - eps), got eps={eps}.")


def vp(beta_min: float = 0.1, beta_max: float = 20.0, eps: float = 1e-5) -> Schedule:
    r"""Variance-preserving schedule (DDPM's linear betas in continuous time; Song et al. 2021, eq. 11/29).

    With diffusion time ``tau = 1 - t`` and ``beta(tau) = beta_min + tau (beta_max - beta_min)``:

    .. math:: \alpha_t = \exp\!\big(-\tfrac12 \int_0^\tau \beta(s) ds\big), \qquad \beta_t = \sqrt{1 - \alpha_t^2}.

    ``beta_t`` is computed as ``sqrt(-expm1(2 log alpha_t))`` for accuracy near the data end. Its
    derivative is infinite at ``tau = 0``, so the domain is ``t <= 1 - eps`` (score_sde trains on
    ``tau in [eps, 1]`` with ``eps = 1e-5``). DDPM's discrete ``beta_i = beta_min/N + i (beta_max -
    beta_min)/(N(N-1))`` with ``N = 1000`` is this schedule with the defaults.
    """
    _check_vp_args("vp", beta_min, beta_max, eps)

    def alpha_fn(t):
        return jnp.exp(vp_log_mean_coeff(1.0 - t, beta_min, beta_max))

    def beta_fn(t):
        return jnp.sqrt(-jnp.expm1(2.0 * vp_log_mean_coeff(1.0 - t, beta_min, beta_max)))

    return Schedule(alpha_fn, beta_fn, name="vp", t_max=1.0 - eps, boundary="approximate", boundary_tol=0.05)


def sub_vp(beta_min: float = 0.1, beta_max: float = 20.0, eps: float = 1e-5) -> Schedule:
    r"""Sub-VP schedule (Song et al. 2021, eq. 12/30): ``alpha_t`` as VP, ``beta_t = 1 - alpha_t^2``."""
    _check_vp_args("sub_vp", beta_min, beta_max, eps)

    def alpha_fn(t):
        return jnp.exp(vp_log_mean_coeff(1.0 - t, beta_min, beta_max))

    def beta_fn(t):
        return -jnp.expm1(2.0 * vp_log_mean_coeff(1.0 - t, beta_min, beta_max))

    return Schedule(alpha_fn, beta_fn, name="sub_vp", t_max=1.0 - eps, boundary="approximate", boundary_tol=0.05)


def ve(sigma_min: float = 0.01, sigma_max: float = 50.0) -> Schedule:
    r"""Variance-exploding schedule (SMLD / NCSN++; Song et al. 2021, eq. 9/31).

    ``alpha_t = 1`` and ``beta_t = sigma(tau) = sigma_min (sigma_max / sigma_min)^tau`` with ``tau = 1 - t``.
    The prior is ``N(0, sigma_max^2 I)`` (sample it with :meth:`GaussianPath.sample_prior`); the
    boundary holds approximately: ``alpha_0 / beta_0 = 1/sigma_max`` and ``beta_1 = sigma_min``.
    score_sde's defaults are (0.01, 50) for CIFAR-10 and (0.01, 348/378) for CelebA-HQ/FFHQ.
    """
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"ve schedule needs 0 < sigma_min < sigma_max, got ({sigma_min}, {sigma_max}).")
    log_ratio = math.log(sigma_max / sigma_min)
    return Schedule(lambda t: jnp.ones_like(t), lambda t: sigma_min * jnp.exp((1.0 - t) * log_ratio),
                    name="ve", boundary="approximate", boundary_tol=0.05)


def edm(sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0) -> Schedule:
    r"""EDM noise levels (Karras et al. 2022, eq. 5/269) as a continuous schedule.

    ``alpha_t = 1`` and ``beta_t = sigma(t) = (sigma_max^{1/rho} + t (sigma_min^{1/rho} - sigma_max^{1/rho}))^rho``,
    so a uniform grid in ``t`` is exactly the Karras sigma grid ``sigma_i`` of the EDM sampler.
    """
    if not 0 < sigma_min < sigma_max or rho <= 0:
        raise ValueError(f"edm schedule needs 0 < sigma_min < sigma_max and rho > 0, got ({sigma_min}, {sigma_max}, {rho}).")
    lo, hi = sigma_min ** (1.0 / rho), sigma_max ** (1.0 / rho)
    return Schedule(lambda t: jnp.ones_like(t), lambda t: (hi + t * (lo - hi)) ** rho,
                    name="edm", boundary="approximate", boundary_tol=0.05)


def custom(alpha_fn: ScalarFn, beta_fn: ScalarFn, *, name: str = "custom", **kwargs) -> Schedule:
    """A user-defined schedule from two elementwise callables (validated like the built-ins)."""
    return Schedule(alpha_fn, beta_fn, name=name, **kwargs)


SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "linear": linear,
    "cond_ot": linear,
    "condot": linear,
    "rectified_flow": linear,
    "cosine": cosine,
    "polynomial": polynomial,
    "vp": vp,
    "sub_vp": sub_vp,
    "subvp": sub_vp,
    "ve": ve,
    "edm": edm,
}


def get_schedule(name: str | Schedule, **kwargs) -> Schedule:
    """Look a schedule up by name (``'linear'``, ``'cosine'``, ``'vp'``, ...), or pass a Schedule through."""
    if isinstance(name, Schedule):
        if kwargs:
            raise ValueError("keyword arguments are only accepted with a schedule name, not a Schedule object.")
        return name
    key = str(name).lower().replace("-", "_")
    if key not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; known schedules: {sorted(set(SCHEDULES))}. "
                         "For your own, use jaxgen.paths.custom(alpha_fn, beta_fn).")
    factory = SCHEDULES[key]
    params = list(inspect.signature(factory).parameters)
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise TypeError(f"schedule {key!r} has no option {', '.join(unknown)}; its options are: "
                        f"{', '.join(params) or 'none'}.")
    return factory(**kwargs)
