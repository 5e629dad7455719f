r"""Stochastic interpolants: a Gaussian path between any two distributions, plus a Brownian-bridge-like noise.

.. math::

   x_t = \alpha_t x_1 + \beta_t x_0 + \gamma_t \xi, \qquad \xi \sim \mathcal N(0, I), \qquad
   \gamma_0 = \gamma_1 = 0

(Albergo, Boffi & Vanden-Eijnden 2023, "Stochastic interpolants", eq. 2.1, in jaxgen's time: ``x_0`` the source at
t = 0, ``x_1`` the data at t = 1, ``(alpha, beta)`` a :class:`~jaxgen.paths.Schedule`). Given a coupling of
``(x_0, x_1)`` (independent, minibatch OT, ...; :mod:`jaxgen.couplings`) the conditional velocity and the score of
``x_t`` given ``(x_0, x_1)`` are

.. math::

   u_t = \dot\alpha_t x_1 + \dot\beta_t x_0 + \dot\gamma_t \xi \quad (\text{eq. 2.10}), \qquad
   \nabla \log p_t(x \mid x_0, x_1) = -\xi / \gamma_t \quad (\text{eq. 2.14}),

and the marginal velocity ``b_t(x) = E[u_t | x_t = x]`` and score ``s_t(x) = -E[xi | x_t = x] / gamma_t`` are learned
by regression (:func:`jaxgen.losses.regression_loss` with this interpolant as its path). Any
``dX = (b_t + eps_t s_t) dt + sqrt(2 eps_t) dW``, ``eps_t >= 0``, has the marginals ``p_t`` (eq. 2.32; notes
eq. 3.3.2 with ``sigma_t^2 = 2 eps_t``), sampled with :class:`jaxgen.samplers.EulerMaruyama` on
:func:`jaxgen.fields.interpolant_drift`.

Special cases, all on the same API:

* ``gamma = 0``: the Gaussian path of the schedule with the source as its ``eps`` (data-to-data flow matching).
* Schrödinger-bridge CFM (Tong et al. 2024, "Improving and generalizing flow-based generative models with minibatch
  optimal transport", sec. 3.3 and eq. 19): the linear schedule, ``gamma_t = sigma sqrt(t (1 - t))`` (the Brownian
  bridge's standard deviation) and the entropic OT coupling with ``epsilon = 2 sigma^2``
  (:func:`schrodinger_bridge`).
* A Gaussian source with the independent coupling: ``beta_t x_0 + gamma_t xi ~ N(0, (beta_t^2 + gamma_t^2) I)``, so the
  marginal path is the Gaussian path with ``beta'_t = sqrt(beta_t^2 + gamma_t^2)`` and the same marginal velocity
  (:meth:`StochasticInterpolant.gaussian_path`); every diffusion sampler and the likelihood then decode it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from jaxgen._checks import batch_time, check_same_shape, check_time, expand_like
from jaxgen.paths.gaussian import GaussianPath, as_path
from jaxgen.paths.schedules import Schedule

Array = jax.Array

GAMMAS = ("zero", "brownian_bridge", "quadratic")


class InterpolantCoefficients(NamedTuple):
    """``(alpha, beta, gamma)`` and their time derivatives at ``t``."""

    alpha: Array
    beta: Array
    gamma: Array
    d_alpha: Array
    d_beta: Array
    d_gamma: Array


@dataclasses.dataclass(frozen=True)
class StochasticInterpolant:
    r"""``x_t = alpha_t x_1 + beta_t x_0 + gamma_t xi`` (Albergo et al. 2023, eq. 2.1).

    Args:
      path: the deterministic part, a :class:`GaussianPath` or a schedule name (``alpha`` multiplies the data,
        ``beta`` the source).
      gamma: the noise amplitude: ``"brownian_bridge"`` (``sigma sqrt(t (1 - t))``, SB-CFM; Albergo et al.'s
        ``sqrt(a t (1 - t))`` with ``a = sigma^2``), ``"quadratic"`` (``sigma t (1 - t)``, smooth at the ends),
        ``"zero"``, or a callable ``t -> gamma_t`` (elementwise, zero at both ends; its derivative by ``jax.jvp``).
      sigma: the scale of the named ``gamma``.
      t_clip: ``d gamma / dt`` of the Brownian bridge is ``sigma (1 - 2t) / (2 sqrt(t (1 - t)))``, infinite at
        t = 0 and 1; it is evaluated at ``t`` clipped to ``[t_clip, 1 - t_clip]`` (finite everywhere, exact inside).

    Example::

        sb = StochasticInterpolant("linear", gamma="brownian_bridge", sigma=0.5)
        loss = flow_matching_loss(sb, source=eight_gaussians, coupling=SinkhornOT(epsilon=2 * 0.5**2))
    """

    path: GaussianPath | str = "linear"
    gamma: str | Callable = "brownian_bridge"
    sigma: float = 1.0
    t_clip: float = 1e-5

    def __post_init__(self):
        object.__setattr__(self, "path", as_path(self.path))
        if isinstance(self.gamma, str) and self.gamma not in GAMMAS:
            raise ValueError(f"unknown gamma {self.gamma!r}; use one of {GAMMAS} or a callable t -> gamma_t.")
        if not (isinstance(self.gamma, str) or callable(self.gamma)):
            raise TypeError(f"gamma must be a name in {GAMMAS} or a callable t -> gamma_t, got "
                            f"{type(self.gamma).__name__}.")
        if not (isinstance(self.sigma, (int, float)) and math.isfinite(self.sigma) and self.sigma >= 0):
            raise ValueError(f"sigma (the noise scale of the interpolant) must be a finite number >= 0, got "
                             f"{self.sigma!r}.")
        if not 0.0 < self.t_clip < 0.5:
            raise ValueError(f"t_clip must be in (0, 0.5), got {self.t_clip}.")
        if callable(self.gamma):
            ends = jnp.abs(jnp.asarray(self.gamma(jnp.asarray([0.0, 1.0], jnp.float32))))
            if not bool(jnp.all(ends <= 1e-6)):
                raise ValueError(f"a custom gamma must vanish at t = 0 and t = 1 (x_0 and x_1 are the endpoints), "
                                 f"got gamma(0), gamma(1) = {ends.tolist()}.")

    @property
    def schedule(self) -> Schedule:
        return self.path.schedule

    @property
    def name(self) -> str:
        g = self.gamma if isinstance(self.gamma, str) else "custom"
        return f"{self.path.name}+{g}({self.sigma:g})" if self.has_noise else self.path.name

    @property
    def has_noise(self) -> bool:
        """Whether ``gamma`` is not identically zero."""
        return callable(self.gamma) or (self.gamma != "zero" and self.sigma > 0)

    # -- coefficients ------------------------------------------------------------------------
    def gamma_and_derivative(self, t: Array) -> tuple[Array, Array]:
        r"""``(gamma_t, d gamma_t / dt)`` elementwise; the derivative at ``t`` clipped to ``[t_clip, 1 - t_clip]``
        for the Brownian bridge (see the class docstring)."""
        t = jnp.asarray(t)
        if callable(self.gamma):
            g, dg = jax.jvp(self.gamma, (t,), (jnp.ones_like(t),))
            return jnp.broadcast_to(g, t.shape).astype(t.dtype), jnp.broadcast_to(dg, t.shape).astype(t.dtype)
        s = jnp.asarray(self.sigma, t.dtype)
        if self.gamma == "zero" or self.sigma == 0:
            return jnp.zeros_like(t), jnp.zeros_like(t)
        if self.gamma == "quadratic":
            return s * t * (1 - t), s * (1 - 2 * t)
        tt = jnp.clip(t, 0.0, 1.0)
        g = s * jnp.sqrt(tt * (1 - tt))
        tc = jnp.clip(t, self.t_clip, 1.0 - self.t_clip)
        return g, s * (1 - 2 * tc) / (2 * jnp.sqrt(tc * (1 - tc)))

    def gamma_squared(self, t: Array) -> Array:
        """``gamma_t^2``, written without the square root (smooth at the ends for the Brownian bridge)."""
        t = jnp.asarray(t)
        if isinstance(self.gamma, str) and self.gamma == "brownian_bridge":
            return jnp.asarray(self.sigma, t.dtype) ** 2 * t * (1 - t)
        return self.gamma_and_derivative(t)[0] ** 2

    def coefficients(self, t: Array) -> InterpolantCoefficients:
        """``(alpha, beta, gamma, d_alpha, d_beta, d_gamma)`` at ``t`` in ``[0, 1]``."""
        check_time(t)
        c = self.path.schedule(t)
        g, dg = self.gamma_and_derivative(jnp.asarray(t, c.alpha.dtype))
        return InterpolantCoefficients(c.alpha, c.beta, g, c.d_alpha, c.d_beta, dg)

    def _coeffs(self, x: Array, t: Array) -> InterpolantCoefficients:
        t = batch_time(t, x)
        return InterpolantCoefficients(*(expand_like(v.astype(x.dtype), x) for v in self.coefficients(t)))

    # -- samples and conditional targets -----------------------------------------------------
    def sample(self, x1: Array, x0: Array, xi: Array, t: Array) -> Array:
        r"""``x_t = alpha_t x_1 + beta_t x_0 + gamma_t xi`` (eq. 2.1)."""
        check_same_shape(x1=x1, x0=x0, xi=xi)
        c = self._coeffs(x1, t)
        return c.alpha * x1 + c.beta * x0 + c.gamma * xi

    def conditional_velocity(self, x1: Array, x0: Array, xi: Array, t: Array) -> Array:
        r"""``u_t = d_alpha x_1 + d_beta x_0 + d_gamma xi`` (eq. 2.10), the velocity of ``x_t`` given its draws."""
        check_same_shape(x1=x1, x0=x0, xi=xi)
        c = self._coeffs(x1, t)
        return c.d_alpha * x1 + c.d_beta * x0 + c.d_gamma * xi

    def gaussian_path(self) -> GaussianPath:
        r"""The marginal Gaussian path of this interpolant for a **standard normal source with the independent
        coupling**: ``alpha_t x_1 + sqrt(beta_t^2 + gamma_t^2) eps`` has the same marginals and the same marginal
        velocity (``E[d_beta x_0 + d_gamma xi | w] = (beta d_beta + gamma d_gamma) / (beta^2 + gamma^2) w`` for
        ``w = beta x_0 + gamma xi``), so a field trained on the interpolant decodes to scores, noise and data on it."""
        if not self.has_noise:
            return self.path
        sched = self.path.schedule
        gamma_sq = self.gamma_squared
        # sqrt(beta^2 + gamma^2) has an infinite slope where both vanish (t = 1 on the linear path), so the domain
        # ends at 1 - 1e-5, like VP's (Schedule.t_max).
        return GaussianPath(Schedule(sched.alpha_fn, lambda t: jnp.sqrt(sched.beta_fn(t) ** 2 + gamma_sq(t)),
                                     name=f"{self.name} (marginal)", t_min=sched.t_min,
                                     t_max=min(sched.t_max, 1.0 - 1e-5), boundary="approximate",
                                     boundary_tol=max(sched.boundary_tol, 0.05)))


def schrodinger_bridge(sigma: float = 1.0, path: GaussianPath | str = "linear") -> StochasticInterpolant:
    r"""The Brownian-bridge interpolant of SB-CFM (Tong et al. 2024, eq. 19): ``x_t = t x_1 + (1 - t) x_0 +
    sigma sqrt(t (1 - t)) xi``. Pair it with the entropic OT coupling at ``epsilon = 2 sigma^2``
    (``jaxgen.couplings.SinkhornOT(epsilon=2 * sigma**2)``) to learn the Schrödinger bridge of the Brownian motion
    ``sigma W`` between the two marginals; sample its SDE with diffusion ``sigma``."""
    return StochasticInterpolant(path, gamma="brownian_bridge", sigma=sigma)


def as_interpolant(path) -> StochasticInterpolant:
    """A :class:`StochasticInterpolant` as it is, or a Gaussian path / schedule name as the noiseless interpolant."""
    if isinstance(path, StochasticInterpolant):
        return path
    return StochasticInterpolant(as_path(path), gamma="zero", sigma=0.0)


__all__ = ["StochasticInterpolant", "InterpolantCoefficients", "schrodinger_bridge", "as_interpolant", "GAMMAS"]
