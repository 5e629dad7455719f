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

import jax
import jax.numpy as jnp

from jaxgen._checks import batch_time, check_same_shape, expand_like, safe_divide
from jaxgen.paths.schedules import Schedule, ScheduleOutput, get_schedule

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class GaussianPath:
    """The Gaussian path of a :class:`Schedule`.

    Example::

        path = GaussianPath.from_name("linear")          # CondOT: x_t = t z + (1 - t) eps
        xt = path.sample(z, eps, t)
        ut = path.conditional_velocity(xt, z, t)           # = z - eps for CondOT
    """

    schedule: Schedule

    @classmethod
    def from_name(cls, name: str, **kwargs) -> "GaussianPath":
        """Build the path of a named schedule (see :func:`jaxgen.paths.get_schedule`)."""
        return cls(get_schedule(name, **kwargs))

    @property
    def name(self) -> str:
        return self.schedule.name

    # -- coefficients ------------------------------------------------------------------------
    def coefficients(self, t: Array) -> ScheduleOutput:
        """``(alpha_t, beta_t, d_alpha_t, d_beta_t)`` at ``t`` (autodiff derivatives)."""
        return self.schedule(t)

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
        beta0 = self.schedule(jnp.zeros((), jnp.float32)).beta
        return beta0.astype(dtype) * jax.random.normal(key, shape, dtype)

    def prior_log_prob(self, x: Array) -> Array:
        """Log density of ``N(0, beta_0^2 I)`` at each ``x`` of shape ``(B, ...)``; returns ``(B,)``."""
        beta0 = self.schedule(jnp.zeros((), jnp.float32)).beta
        d = x[0].size
        sq = jnp.sum(jnp.reshape(x, (x.shape[0], -1)) ** 2, axis=-1)
        return -0.5 * sq / beta0**2 - 0.5 * d * jnp.log(2 * jnp.pi * beta0**2)

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
        r = jnp.reshape(x - a * z, (x.shape[0], -1))
        b = jnp.maximum(jnp.reshape(b, (x.shape[0],)), 1e-6)  # a point mass at t=1: floored, finite
        d = r.shape[1]
        return -0.5 * jnp.sum(r**2, -1) / b**2 - d * jnp.log(b) - 0.5 * d * jnp.log(2 * jnp.pi)


def as_path(path: "GaussianPath | str") -> GaussianPath:
    """Accept a :class:`GaussianPath` or a schedule name (``"linear"``, ``"vp"``, ...)."""
    if isinstance(path, GaussianPath):
        return path
    if isinstance(path, str):
        return GaussianPath.from_name(path)
    raise TypeError(f"path must be a GaussianPath or a schedule name such as 'linear', got {type(path).__name__}.")
