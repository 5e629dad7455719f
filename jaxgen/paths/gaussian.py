r"""Gaussian conditional probability paths (MIT 6.S184 notes, sections 3.1-3.3).

.. math::

   p_t(x \mid z) = \mathcal N(\alpha_t z, \beta_t^2 I), \qquad x_t = \alpha_t z + \beta_t \epsilon
   \quad (\text{eq. 3.1.4})

   u_t(x \mid z) = \Big(\dot\alpha_t - \frac{\dot\beta_t}{\beta_t}\alpha_t\Big) z + \frac{\dot\beta_t}{\beta_t} x
   \quad (\text{eq. 3.2.1}), \qquad
   \nabla \log p_t(x \mid z) = -\frac{x - \alpha_t z}{\beta_t^2} \quad (\text{eq. 3.3.3})

Here ``z`` is a data point (t = 1) and ``epsilon ~ N(0, I)`` the noise (t = 0). Every method takes
a batch ``x`` of shape ``(B, ...)`` and times ``t`` of shape ``(B,)`` (a scalar is broadcast).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import jax
import jax.numpy as jnp

from jaxgen._checks import batch_time, check_same_shape, check_time, expand_like, safe_divide
from jaxgen.paths.schedules import Schedule, ScheduleOutput, get_schedule

Array = jax.Array


def gaussian_log_prob(residual: Array, std: Array | float) -> Array:
    r"""``log N(x; m, std^2 I)`` per sample from the residual ``x - m`` of shape ``(B, ...)``; ``std`` a scalar or
    ``(B,)``. Returns ``(B,)``, computed in the residual's dtype:
    ``-||x - m||^2 / (2 std^2) - D log std - D/2 log(2 pi)``, ``D`` the per-sample dimension."""
    r = jnp.reshape(residual, (residual.shape[0], -1))
    std = jnp.asarray(std, r.dtype)
    d = r.shape[1]
    return -0.5 * jnp.sum(r**2, -1) / std**2 - d * jnp.log(std) - 0.5 * d * math.log(2 * math.pi)


def _log_safe(v: Array) -> Array:
    """``log v`` for ``v >= 0``: ``-inf`` where ``v = 0``, there with derivative 0 instead of ``1 / 0 = inf`` (a
    constant), so that a time grid ending where ``alpha = 0`` or ``beta = 0`` is differentiated without
    ``0 * inf = NaN`` (the "double where": the logarithm only sees ``v > 0``)."""
    pos = v > 0
    return jnp.where(pos, jnp.log(jnp.where(pos, v, jnp.ones_like(v))), -jnp.inf)


def log_snr_from_coefficients(alpha: Array, beta: Array) -> Array:
    r"""Half log signal-to-noise ratio ``lambda = log alpha - log beta`` (Lu et al. 2022, sec. 3.1): ``-inf`` where
    ``alpha = 0`` and ``+inf`` where ``beta = 0``, no NaN, with derivative 0 where it is infinite."""
    return _log_safe(alpha) - _log_safe(beta)


def log_snr(path: "GaussianPath | str", t: Array) -> Array:
    r"""``lambda_t = log(alpha_t / beta_t)`` of a path at times ``t`` (any shape), increasing in ``t`` for every valid
    schedule; ``-inf`` where ``alpha_t = 0``, ``+inf`` where ``beta_t = 0`` (:func:`log_snr_from_coefficients`)."""
    return log_snr_from_coefficients(*as_path(path).schedule.values(jnp.asarray(t, jnp.float32)))


def sigmas_from_times(path: GaussianPath | str, t: Array) -> Array:
    r"""EDM noise level ``sigma_t = beta_t / alpha_t = e^{-lambda_t}`` (Karras et al. 2022, sec. 2 with
    ``s(t) = alpha_t``); ``+inf`` where ``alpha_t = 0`` and ``0`` where ``beta_t = 0``."""
    return jnp.exp(-log_snr(path, t))


def times_from_lambdas(path: GaussianPath | str, lambdas: Array, *, iters: int = 48) -> Array:
    r"""Invert ``lambda_t = log(alpha_t / beta_t)`` on the path's domain ``[t_min, t_max]`` by bisection.

    Vectorised over ``lambdas`` (any shape) and jit-able: a fixed number of halvings (48 by default,
    below float32 resolution) of the bracket ``[t_min, t_max]``, valid because ``lambda`` is increasing
    (``alpha d_beta - beta d_alpha < 0``, checked when the schedule is built). Levels outside the path's
    range map to the nearest end: ``-inf`` (or below ``lambda(t_min)``) to ``t_min``, ``+inf`` to ``t_max``.

    Differentiable: the derivative is that of the inverse function, ``dt / dlambda = 1 / lambda'(t)``
    (implicit function theorem; the bisection's own derivative would be zero), and zero for levels mapped
    to an end.
    """
    path = as_path(path)
    sched = path.schedule
    iters = int(iters)
    t_min, t_max = float(sched.t_min), float(sched.t_max)
    lam_lo = log_snr(path, jnp.float32(t_min))
    lam_hi = log_snr(path, jnp.float32(t_max))

    @jax.custom_jvp
    def bisect(lam):
        def halve(_, bracket):
            lo, hi = bracket
            mid = 0.5 * (lo + hi)
            below = log_snr(path, mid) < lam
            return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

        lo0 = jnp.full(lam.shape, t_min, jnp.float32)
        hi0 = jnp.full(lam.shape, t_max, jnp.float32)
        lo, hi = jax.lax.fori_loop(0, iters, halve, (lo0, hi0))
        t = 0.5 * (lo + hi)
        t = jnp.where(lam >= lam_hi, t_max, t)
        return jnp.where(lam <= lam_lo, t_min, t)

    @bisect.defjvp
    def bisect_jvp(primals, tangents):
        (lam,), (lam_dot,) = primals, tangents
        t = bisect(lam)
        c = path.coefficients(t)
        pos = (c.alpha > 0) & (c.beta > 0)
        dlam_dt = jnp.where(pos, c.d_alpha / jnp.where(pos, c.alpha, 1.0) - c.d_beta / jnp.where(pos, c.beta, 1.0),
                            0.0)
        inside = (lam > lam_lo) & (lam < lam_hi) & (dlam_dt > 0) & jnp.isfinite(dlam_dt)
        return t, jnp.where(inside, lam_dot / jnp.where(inside, dlam_dt, 1.0), 0.0)

    return bisect(jnp.asarray(lambdas, jnp.float32))


def times_from_sigmas(path: GaussianPath | str, sigmas: Array, *, iters: int = 48) -> Array:
    r"""Times ``t`` with ``beta_t / alpha_t = sigma`` (EDM noise level -> jaxgen time), by bisection.

    ``sigma = 0`` maps to the data end ``t_max``; levels above ``sigma(t_min)`` map to ``t_min``. See
    :func:`times_from_lambdas` (``lambda = -log sigma``). For the ``edm`` path with the same
    ``(sigma_min, sigma_max, rho)`` the Karras grid maps to a uniform grid in ``t``.
    """
    sigmas = jnp.asarray(sigmas, jnp.float32)
    return times_from_lambdas(path, -jnp.log(sigmas), iters=iters)


@dataclasses.dataclass(frozen=True)
class GaussianPath:
    """The Gaussian path of a :class:`Schedule`.

    Example::

        path = GaussianPath.from_name("linear")          # CondOT: x_t = t z + (1 - t) eps
        xt = path.sample(z, eps, t)
        ut = path.conditional_velocity(xt, z, t)           # = z - eps for CondOT
    """

    schedule: Schedule

    def __post_init__(self):
        if not isinstance(self.schedule, Schedule):
            hint = (f" For a schedule by name use GaussianPath.from_name({self.schedule!r}) or as_path({self.schedule!r})."
                    if isinstance(self.schedule, str) else "")
            raise TypeError(f"GaussianPath needs a jaxgen Schedule (e.g. get_schedule('vp')), got "
                            f"{type(self.schedule).__name__}.{hint}")

    @classmethod
    def from_name(cls, name: str, **kwargs) -> "GaussianPath":
        """Build the path of a named schedule (see :func:`jaxgen.paths.get_schedule`)."""
        return cls(get_schedule(name, **kwargs))

    @property
    def name(self) -> str:
        return self.schedule.name

    # -- coefficients ------------------------------------------------------------------------
    def coefficients(self, t: Array) -> ScheduleOutput:
        """``(alpha_t, beta_t, d_alpha_t, d_beta_t)`` at ``t`` (autodiff derivatives; ``t`` in ``[0, 1]``, clamped
        onto the schedule's domain)."""
        check_time(t)
        return self.schedule(t)

    def log_snr(self, t: Array) -> Array:
        """``lambda_t = log(alpha_t / beta_t)`` at times ``t`` (see :func:`log_snr`)."""
        return log_snr(self, t)

    def same_as(self, other: "GaussianPath") -> bool:
        """Whether two paths have the same domain and coefficients (compared on a grid of 33 times, at trace time):
        equal schedules built twice (e.g. two ``vp`` paths) are the same path, though not ``==``."""
        if self is other:
            return True
        a, b = self.schedule, other.schedule
        if (a.t_min, a.t_max) != (b.t_min, b.t_max):
            return False
        with jax.ensure_compile_time_eval():
            t = jnp.linspace(a.t_min, a.t_max, 33, dtype=jnp.float32)
            return bool(jnp.allclose(jnp.stack(a.values(t)), jnp.stack(b.values(t)), rtol=1e-6, atol=1e-7))

    def _coeffs(self, x: Array, t: Array) -> tuple[Array, ...]:
        t = batch_time(t, x)
        c = self.schedule(t)
        return tuple(expand_like(v.astype(x.dtype), x) for v in c)

    # -- sampling ----------------------------------------------------------------------------
    def sample(self, z: Array, eps: Array, t: Array) -> Array:
        r"""``x_t = alpha_t z + beta_t eps`` (eq. 3.1.4). ``eps`` may also be a sample of any source."""
        check_same_shape(z=z, eps=eps)
        a, b, _, _ = self._coeffs(z, t)
        return a * z + b * eps

    def sample_conditional(self, key: Array, z: Array, t: Array) -> Array:
        """Draw ``x_t ~ p_t(. | z)``."""
        return self.sample(z, jax.random.normal(key, z.shape, z.dtype), t)

    def sample_prior(self, key: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
        r"""Draw from the path's start ``p_0 = N(0, beta_0^2 I)`` (``beta_0 = 1`` except for VE/EDM).

        For schedules whose boundary holds approximately the small ``alpha_0 z`` term is neglected,
        as in score_sde's ``prior_sampling``.
        """
        shape = tuple(shape) if isinstance(shape, (tuple, list)) else (shape,)
        if not all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 0 for n in shape):
            raise ValueError(f"sample_prior needs a shape of non-negative integers such as (batch, dim), got {shape}.")
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(f"sample_prior draws Gaussian noise: dtype must be floating point, got {dtype}.")
        beta0 = self.schedule(jnp.zeros((), jnp.float32)).beta
        return beta0.astype(dtype) * jax.random.normal(key, shape, dtype)

    def prior_log_prob(self, x: Array, t: float = 0.0) -> Array:
        r"""``log N(x; 0, beta_t^2 I)`` at each ``x`` of shape ``(B, ...)`` (default ``t = 0``: the prior
        ``N(0, beta_0^2 I)``); returns ``(B,)`` in ``x``'s dtype.

        This is ``p_t`` of the path up to the neglected ``alpha_t z`` term: exact at ``t = 0`` for paths with
        ``alpha_0 = 0`` (linear, cosine, polynomial); approximate for VP (``alpha_0 = e^{-5.025}``) and VE/EDM
        (``p_0 = p_data * N(0, sigma_max^2)``), like score_sde's ``prior_logp``.
        """
        beta = self.coefficients(jnp.asarray(t, x.dtype)).beta.astype(x.dtype)
        return gaussian_log_prob(x, beta)

    # -- conditional fields ------------------------------------------------------------------
    def conditional_velocity(self, x: Array, z: Array, t: Array) -> Array:
        r"""Conditional vector field ``u_t(x|z)`` (eq. 3.2.1), computed as ``d_alpha z + d_beta (x - alpha z) / beta``.

        At ``t = 1`` (``beta = 0``) the noise ``(x - alpha z) / beta`` is not identifiable from ``x``;
        the division is floored (finite, and ``d_alpha z`` for ``x = z``). For training targets use
        :meth:`conditional_velocity_from_noise`, which needs no division.
        """
        check_same_shape(x=x, z=z)
        a, b, da, db = self._coeffs(x, t)
        return da * z + db * safe_divide(x - a * z, b)

    def conditional_velocity_from_noise(self, z: Array, eps: Array, t: Array) -> Array:
        r"""``u_t(x_t|z) = d_alpha_t z + d_beta_t eps`` at ``x_t = alpha_t z + beta_t eps`` (eq. 4.1.3)."""
        check_same_shape(z=z, eps=eps)
        _, _, da, db = self._coeffs(z, t)
        return da * z + db * eps

    def conditional_score(self, x: Array, z: Array, t: Array) -> Array:
        r"""``grad log p_t(x|z) = -(x - alpha_t z) / beta_t^2`` (eq. 3.3.3); floored at ``t = 1``."""
        check_same_shape(x=x, z=z)
        a, b, _, _ = self._coeffs(x, t)
        return -safe_divide(x - a * z, b**2, floor=1e-12)

    def conditional_log_prob(self, x: Array, z: Array, t: Array) -> Array:
        """``log N(x; alpha_t z, beta_t^2 I)`` per sample, shape ``(B,)`` (``beta_t`` floored at 1e-6)."""
        check_same_shape(x=x, z=z)
        a, b, _, _ = self._coeffs(x, t)
        b = jnp.maximum(jnp.reshape(b, (x.shape[0],)), 1e-6)  # a point mass at t=1: floored, finite
        return gaussian_log_prob(x - a * z, b)


def as_path(path: "GaussianPath | str") -> GaussianPath:
    """Accept a :class:`GaussianPath` or a schedule name (``"linear"``, ``"vp"``, ...)."""
    if isinstance(path, GaussianPath):
        return path
    if isinstance(path, str):
        return GaussianPath.from_name(path)
    raise TypeError(f"path must be a GaussianPath or a schedule name such as 'linear', got {type(path).__name__}.")


__all__ = ["GaussianPath", "as_path", "log_snr", "log_snr_from_coefficients", "gaussian_log_prob", "sigmas_from_times",
           "times_from_lambdas", "times_from_sigmas"]
