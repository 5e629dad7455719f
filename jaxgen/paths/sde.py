r"""Score SDEs (Song et al. 2021, "Score-Based Generative Modeling through SDEs") in jaxgen time.

The diffusion literature runs time ``tau`` from data (``tau = 0``) to noise (``tau = T = 1``) with a
forward (noising) SDE

.. math:: dx = f(x, \tau)\, d\tau + g(\tau)\, dW_\tau \qquad (\text{Song et al. eq. 5}),

and samples with the reverse-time SDE (Anderson 1982; Song et al. eq. 6) or the probability-flow ODE
(eq. 13)

.. math::

   dx = [f - g^2 \nabla \log p_\tau(x)]\, d\tau + g\, d\bar W_\tau, \qquad
   \frac{dx}{d\tau} = f - \tfrac12 g^2 \nabla \log p_\tau(x),

integrated from ``tau = 1`` down to ``tau = 0``. jaxgen's time is ``t = 1 - tau`` (``t = 0`` noise, ``t = 1``
data), so ``dt = -d tau`` and the same processes run *forward* in ``t``:

.. math::

   dx = -[f(x, 1-t) - g(1-t)^2 s_t(x)]\, dt + g(1-t)\, dW_t, \qquad
   \frac{dx}{dt} = -[f(x, 1-t) - \tfrac12 g(1-t)^2 s_t(x)] ,

with ``s_t`` the score of jaxgen's marginal ``p_t = p_{tau = 1 - t}`` (:func:`reverse_drift`,
:func:`reverse_diffusion`, :func:`probability_flow_velocity`). The reverse SDE is the SDE extension of
the marginal flow with ``sigma_t = g(1 - t)`` (notes eq. 3.3.2: ``u + sigma^2/2 s = -(f - g^2 s)``), and the
probability-flow velocity is the marginal vector field of the matching :class:`~jaxgen.paths.GaussianPath`
(``"vp"``, ``"sub_vp"``, ``"ve"``; :attr:`SDE.path`). The reverse-time drifts are built from a score field in
:mod:`jaxgen.fields.sde`.

The three SDEs reproduce score_sde's ``sde_lib.py`` (``VPSDE``, ``subVPSDE``, ``VESDE``): the same
parameters, ``marginal_prob``, ``prior_sampling``, ``prior_logp`` and ``discretize`` (DDPM for VP,
SMLD for VE, Euler-Maruyama otherwise). Every method that takes a time takes score_sde's ``tau``,
shape ``(B,)`` or scalar.

score_sde's predictor-corrector sampler is :mod:`jaxgen.samplers.score_sde`.
"""

from __future__ import annotations

import abc
import dataclasses
import math

import numpy as np
import jax
import jax.numpy as jnp

from jaxgen._checks import batch_time, check_time, expand_like
from jaxgen.paths.gaussian import GaussianPath, gaussian_log_prob
from jaxgen.paths.schedules import vp_log_mean_coeff

Array = jax.Array


# ---------------------------------------------------------------------------------------------
# time conventions
# ---------------------------------------------------------------------------------------------

def to_jaxgen_time(tau: Array) -> Array:
    """``t = 1 - tau``: diffusion time (``tau = 0`` data) to jaxgen time (``t = 1`` data)."""
    check_time(tau, name="tau", convention="diffusion")
    return 1.0 - jnp.asarray(tau)


def to_diffusion_time(t: Array) -> Array:
    """``tau = 1 - t``: jaxgen time to score_sde's diffusion time."""
    check_time(t, name="t")
    return 1.0 - jnp.asarray(t)


def _batch_tau(tau, x: Array) -> Array:
    """``tau`` as an array of shape ``(B,)`` for a batch ``x`` of shape ``(B, ...)`` (diffusion time, checked)."""
    return batch_time(tau, x, name="tau", convention="diffusion")


# ---------------------------------------------------------------------------------------------
# the SDEs
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SDE(abc.ABC):
    r"""A forward SDE ``dx = f(x, tau) d tau + g(tau) dW`` with a linear drift ``f = c(tau) x``.

    Subclasses define :meth:`drift_coeff` (``c``), :meth:`diffusion` (``g``), :meth:`marginal_coeffs`
    (mean coefficient and std of ``p(x_tau | x_0) = N(m(tau) x_0, std(tau)^2 I)``), the prior and
    :attr:`path`. ``N`` is the number of discretisation steps of :meth:`discretize` and of the samplers.
    """

    T = 1.0  # end time, as score_sde

    def __post_init__(self):
        if not isinstance(self.N, (int, np.integer)) or self.N < 1:
            raise ValueError(f"N (number of discretisation steps) must be a positive int, got {self.N!r}.")

    # -- to be defined by subclasses ------------------------------------------------------------
    @abc.abstractmethod
    def drift_coeff(self, tau: Array) -> Array:
        """``c(tau)`` of the linear drift ``f(x, tau) = c(tau) x``."""
        ...

    @abc.abstractmethod
    def diffusion(self, tau: Array) -> Array:
        """Diffusion coefficient ``g(tau)``."""
        ...

    @abc.abstractmethod
    def marginal_coeffs(self, tau: Array) -> tuple[Array, Array]:
        """``(m(tau), std(tau))`` of the perturbation kernel ``p(x_tau | x_0) = N(m x_0, std^2 I)``."""
        ...

    @property
    @abc.abstractmethod
    def path(self) -> GaussianPath:
        """The jaxgen :class:`GaussianPath` with the same marginals: ``alpha_t = m(1 - t)``, ``beta_t = std(1 - t)``."""
        ...

    @property
    def prior_std(self) -> float:
        return 1.0

    # -- score_sde's interface -----------------------------------------------------------------
    def sde(self, x: Array, tau: Array) -> tuple[Array, Array]:
        """Drift ``f(x, tau)`` (shape of ``x``) and diffusion ``g(tau)`` (shape ``(B,)``) of the forward SDE."""
        tau = _batch_tau(tau, x)
        return expand_like(self.drift_coeff(tau), x) * x, self.diffusion(tau)

    def marginal_prob(self, x0: Array, tau: Array) -> tuple[Array, Array]:
        """Mean ``m(tau) x0`` (shape of ``x0``) and std (shape ``(B,)``) of ``p(x_tau | x_0)``."""
        tau = _batch_tau(tau, x0)
        m, std = self.marginal_coeffs(tau)
        return expand_like(m, x0) * x0, std

    def prior_sampling(self, key: Array, shape: tuple[int, ...], dtype=jnp.float32) -> Array:
        """A draw from the prior ``N(0, prior_std^2 I)`` (``prior_std = 1``, or ``sigma_max`` for VE)."""
        return self.prior_std * jax.random.normal(key, shape, dtype)

    def prior_logp(self, z: Array) -> Array:
        """``log N(z; 0, prior_std^2 I)`` per sample, shape ``(B,)``."""
        return gaussian_log_prob(z, self.prior_std)

    def timestep_index(self, tau: Array) -> Array:
        """score_sde's discrete index of a time: ``int(tau (N - 1) / T)`` (truncation, as ``sde_lib``)."""
        return (jnp.asarray(tau) * (self.N - 1) / self.T).astype(jnp.int32)

    def discretize(self, x: Array, tau: Array) -> tuple[Array, Array]:
        r"""``x_{i+1} = x_i + f_i + G_i z_i``: Euler-Maruyama by default,
        ``f = f(x, tau) / N``, ``G = g(tau) / sqrt(N)``."""
        drift, g = self.sde(x, tau)
        dt = self.T / self.N
        return drift * dt, g * math.sqrt(dt)

    def langevin_alpha(self, tau: Array) -> Array:
        """The factor ``alpha_i`` of score_sde's Langevin step size (1 except for VP-type SDEs)."""
        return jnp.ones_like(jnp.asarray(tau))

    # -- jaxgen time ---------------------------------------------------------------------------
    def sde_at(self, x: Array, t: Array) -> tuple[Array, Array]:
        """``(f(x, 1 - t), g(1 - t))``: the forward coefficients at jaxgen time ``t``."""
        return self.sde(x, to_diffusion_time(t))


def _vp_beta(tau, beta_min, beta_max):
    return beta_min + tau * (beta_max - beta_min)


@dataclasses.dataclass(frozen=True)
class _VPFamily(SDE):
    """What VP and sub-VP share: ``beta(tau) = beta_min + tau (beta_max - beta_min)``, the drift ``-1/2 beta(tau) x``,
    score_sde's discrete betas and the Langevin factor ``alpha_i = 1 - beta_i``."""

    beta_min: float = 0.1
    beta_max: float = 20.0
    N: int = 1000

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.beta_min < self.beta_max:
            raise ValueError(f"{type(self).__name__} needs 0 <= beta_min < beta_max, got ({self.beta_min}, "
                             f"{self.beta_max}).")

    def drift_coeff(self, tau):
        return -0.5 * _vp_beta(tau, self.beta_min, self.beta_max)

    @property
    def discrete_betas(self) -> np.ndarray:
        """score_sde's ``linspace(beta_min / N, beta_max / N, N)`` (float64), index ``i = 0 .. N-1``, i.e. DDPM's
        ``beta_i = beta_min / N + i (beta_max - beta_min) / (N (N - 1))`` (Ho et al.'s ``1e-4 .. 0.02`` for the
        defaults), checked to be a valid chain (every ``beta_i < 1``)."""
        if self.beta_max / self.N >= 1.0:
            raise ValueError(
                f"{type(self).__name__}'s discrete betas linspace(beta_min/N, beta_max/N, N) reach beta_max/N = "
                f"{self.beta_max}/{self.N} >= 1, so sqrt(1 - beta_i) and the Langevin factor 1 - beta_i are invalid "
                f"(NaN samples). Use N (the predictor-corrector sampler's steps) > beta_max, e.g. >= "
                f"{math.floor(self.beta_max) + 1}, or the 'euler_maruyama' predictor with corrector='none', which do "
                "not use the discrete betas.")
        return np.linspace(self.beta_min / self.N, self.beta_max / self.N, self.N)

    def langevin_alpha(self, tau):
        """``alpha_i = 1 - beta_i`` at ``i = int(tau (N - 1))`` (score_sde's ``sde.alphas[timestep]``)."""
        return 1.0 - jnp.asarray(self.discrete_betas, jnp.float32)[self.timestep_index(tau)]


@dataclasses.dataclass(frozen=True)
class VPSDE(_VPFamily):
    r"""Variance-preserving SDE ``dx = -1/2 beta(tau) x d tau + sqrt(beta(tau)) dW`` (Song et al. eq. 11).

    ``beta(tau) = beta_min + tau (beta_max - beta_min)``; the kernel is ``N(m x_0, (1 - m^2) I)`` with
    ``log m = -1/4 tau^2 (beta_max - beta_min) - 1/2 tau beta_min`` (eq. 29). Its DDPM discretisation has
    ``beta_i = linspace(beta_min / N, beta_max / N, N)``, i.e. Ho et al.'s ``1e-4 .. 0.02`` for the defaults.
    """

    def diffusion(self, tau):
        return jnp.sqrt(_vp_beta(tau, self.beta_min, self.beta_max))

    def marginal_coeffs(self, tau):
        lm = vp_log_mean_coeff(tau, self.beta_min, self.beta_max)
        return jnp.exp(lm), jnp.sqrt(-jnp.expm1(2.0 * lm))

    @property
    def path(self):
        return GaussianPath.from_name("vp", beta_min=self.beta_min, beta_max=self.beta_max)

    @property
    def alphas(self) -> np.ndarray:
        """score_sde's ``alphas = 1 - discrete_betas`` (float64)."""
        return 1.0 - self.discrete_betas

    @property
    def alphas_cumprod(self) -> np.ndarray:
        """score_sde's ``alphas_cumprod`` (float64): ``abar_i``; ``sqrt(1 - abar_i)`` at ``i = timestep_index(tau)`` is
        the std by which score_sde scales a discretely trained VP model (``sqrt_1m_alphas_cumprod``)."""
        return np.cumprod(self.alphas)

    def discretize(self, x, tau):
        r"""DDPM discretisation (Song et al. eq. 10): ``x_{i+1} = sqrt(1 - beta_i) x_i + sqrt(beta_i) z``,
        i.e. ``f = (sqrt(1 - beta_i) - 1) x``, ``G = sqrt(beta_i)``, ``i = int(tau (N - 1))``."""
        tau = _batch_tau(tau, x)
        beta = jnp.asarray(self.discrete_betas, x.dtype)[self.timestep_index(tau)]
        return expand_like(jnp.sqrt(1.0 - beta) - 1.0, x) * x, jnp.sqrt(beta)


@dataclasses.dataclass(frozen=True)
class SubVPSDE(_VPFamily):
    r"""Sub-VP SDE (Song et al. eq. 12): drift as VP, ``g(tau)^2 = beta(tau) (1 - exp(-2 int_0^tau beta))``.

    The kernel is ``N(m x_0, (1 - m^2)^2 I)`` with ``m`` as VP (eq. 30): score_sde's ``marginal_prob``
    returns ``std = 1 - m^2``. Its ``discretize`` is Euler-Maruyama (score_sde defines none). Its Langevin factor
    ``alpha_i = 1 - beta_i`` is VP's of the same ``beta(tau)``: score_sde's corrector reads ``sde.alphas``, which its
    ``subVPSDE`` lacks, so Langevin correction of sub-VP raises there.
    """

    def diffusion(self, tau):
        discount = -jnp.expm1(-2.0 * self.beta_min * tau - (self.beta_max - self.beta_min) * tau**2)
        return jnp.sqrt(_vp_beta(tau, self.beta_min, self.beta_max) * discount)

    def marginal_coeffs(self, tau):
        lm = vp_log_mean_coeff(tau, self.beta_min, self.beta_max)
        return jnp.exp(lm), -jnp.expm1(2.0 * lm)

    @property
    def path(self):
        return GaussianPath.from_name("sub_vp", beta_min=self.beta_min, beta_max=self.beta_max)


@dataclasses.dataclass(frozen=True)
class VESDE(SDE):
    r"""Variance-exploding SDE (Song et al. eq. 9): ``dx = sigma(tau) sqrt(2 log(sigma_max/sigma_min)) dW``.

    ``sigma(tau) = sigma_min (sigma_max / sigma_min)^tau``, kernel ``N(x_0, sigma(tau)^2 I)`` (eq. 31; score_sde
    neglects ``sigma_min`` in the kernel's variance, ``sigma(tau)^2 - sigma(0)^2``, as we do). Prior
    ``N(0, sigma_max^2 I)``; SMLD discretisation with the geometric grid of ``N`` noise levels.
    """

    sigma_min: float = 0.01
    sigma_max: float = 50.0
    N: int = 1000

    def __post_init__(self):
        super().__post_init__()
        if not 0 < self.sigma_min < self.sigma_max:
            raise ValueError(f"VESDE needs 0 < sigma_min < sigma_max, got ({self.sigma_min}, {self.sigma_max}).")

    def sigma(self, tau):
        """``sigma(tau) = sigma_min (sigma_max / sigma_min)^tau``."""
        return self.sigma_min * jnp.exp(tau * math.log(self.sigma_max / self.sigma_min))

    def drift_coeff(self, tau):
        return jnp.zeros_like(tau)

    def diffusion(self, tau):
        return self.sigma(tau) * math.sqrt(2.0 * math.log(self.sigma_max / self.sigma_min))

    def marginal_coeffs(self, tau):
        return jnp.ones_like(tau), self.sigma(tau)

    @property
    def path(self):
        return GaussianPath.from_name("ve", sigma_min=self.sigma_min, sigma_max=self.sigma_max)

    @property
    def prior_std(self) -> float:
        return float(self.sigma_max)

    @property
    def discrete_sigmas(self) -> np.ndarray:
        """``exp(linspace(log sigma_min, log sigma_max, N))`` (float64)."""
        return np.exp(np.linspace(math.log(self.sigma_min), math.log(self.sigma_max), self.N))

    def discretize(self, x, tau):
        r"""SMLD discretisation (Song et al. eq. 8): ``x_{i+1} = x_i + sqrt(sigma_i^2 - sigma_{i-1}^2) z``
        (``sigma_{-1} = 0``), ``i = int(tau (N - 1))``."""
        tau = _batch_tau(tau, x)
        i = self.timestep_index(tau)
        sig = jnp.asarray(self.discrete_sigmas, x.dtype)
        adjacent = jnp.where(i == 0, 0.0, sig[jnp.maximum(i - 1, 0)])
        return jnp.zeros_like(x), jnp.sqrt(sig[i] ** 2 - adjacent**2)


subVPSDE = SubVPSDE  # score_sde's spelling


__all__ = ["SDE", "VPSDE", "SubVPSDE", "subVPSDE", "VESDE", "to_jaxgen_time", "to_diffusion_time"]
