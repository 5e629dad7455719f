r"""The discrete-time DDPM chain (Ho et al. 2020, "Denoising Diffusion Probabilistic Models"; Nichol & Dhariwal 2021).

The forward chain has ``T`` steps ``q(x_n | x_{n-1}) = N(sqrt(1 - beta_n) x_{n-1}, beta_n I)``, ``n = 1..T``,
with ``x_0`` the data. With ``alpha_n = 1 - beta_n`` and ``abar_n = prod_{m <= n} alpha_m`` (``abar_0 = 1``):

.. math::

   q(x_n \mid x_0) = \mathcal N(\sqrt{\bar\alpha_n}\, x_0,\ (1 - \bar\alpha_n) I) \qquad (\text{Ho et al. eq. 4})

   q(x_{n-1} \mid x_n, x_0) = \mathcal N(\tilde\mu_n(x_n, x_0), \tilde\beta_n I), \quad
   \tilde\mu_n = \frac{\sqrt{\bar\alpha_{n-1}}\beta_n}{1 - \bar\alpha_n} x_0
               + \frac{\sqrt{\alpha_n}(1 - \bar\alpha_{n-1})}{1 - \bar\alpha_n} x_n, \quad
   \tilde\beta_n = \frac{1 - \bar\alpha_{n-1}}{1 - \bar\alpha_n}\beta_n \qquad (\text{eqs. 6-7}).

**Steps and jaxgen time.** Step ``n`` (``n = 0`` data, ``n = T`` noise) sits at jaxgen time
``t_n = 1 - n / T`` (``t = 0`` noise, ``t = 1`` data). :meth:`DDPMSchedule.path` is the
:class:`~jaxgen.paths.GaussianPath` with ``alpha_{t_n} = sqrt(abar_n)`` and ``beta_{t_n} = sqrt(1 - abar_n)`` at
every step (``log abar`` is interpolated linearly in ``n`` between steps), defined on ``[t_T, t_1] = [0, 1 - 1/T]``.
So any jaxgen field of any parameterisation on that path is a DDPM model: evaluated at ``(x_n, t_n)`` it
predicts the noise, data, score, ... of step ``n``. A respaced schedule (:meth:`DDPMSchedule.respace`) keeps
a subset of the original steps and their times.

Array convention: ``betas``, ``alphas_cumprod``, ... have length ``T``; entry ``n - 1`` belongs to step ``n``
(as in Ho et al.'s and improved-diffusion's code). Methods take the step ``n`` itself.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np
import jax
import jax.numpy as jnp

from jaxgen._checks import check_time, expand_like, is_concrete
from jaxgen.paths.gaussian import GaussianPath
from jaxgen.paths.schedules import Schedule

Array = jax.Array

VARIANCES = ("beta", "posterior")
_PATH_TOL = 0.1


# ---------------------------------------------------------------------------------------------
# beta schedules
# ---------------------------------------------------------------------------------------------

def linear_betas(T: int = 1000, beta_1: float = 1e-4, beta_T: float = 0.02, *, rescale: bool = False) -> np.ndarray:
    r"""Ho et al.'s linear schedule ``beta_n = linspace(beta_1, beta_T, T)`` (float64).

    ``rescale=True`` multiplies both ends by ``1000 / T`` (Nichol & Dhariwal 2021's ``get_named_beta_schedule``),
    which keeps ``abar_T`` near 0 for any ``T`` and equals score_sde's DDPM discretisation of the VP SDE.
    """
    _check_T(T)
    if rescale:
        beta_1, beta_T = beta_1 * 1000.0 / T, beta_T * 1000.0 / T
    return np.linspace(beta_1, beta_T, int(T), dtype=np.float64)


def cosine_betas(T: int = 1000, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    r"""Cosine schedule (Nichol & Dhariwal 2021, eq. 17): ``abar_n = f(n) / f(0)``,
    ``f(n) = cos^2(pi/2 (n/T + s) / (1 + s))``, ``beta_n = min(1 - abar_n / abar_{n-1}, max_beta)`` (float64)."""
    _check_T(T)
    if not s >= 0 or not 0 < max_beta < 1:
        raise ValueError(f"cosine_betas needs s >= 0 and 0 < max_beta < 1, got s={s}, max_beta={max_beta}.")
    n = np.arange(int(T) + 1, dtype=np.float64)
    f = np.cos((n / T + s) / (1.0 + s) * np.pi / 2.0) ** 2
    return np.minimum(1.0 - f[1:] / f[:-1], max_beta)


def _check_T(T) -> None:
    if not isinstance(T, (int, np.integer)) or T < 1:
        raise ValueError(f"the number of diffusion steps T must be a positive int, got {T!r}.")


# ---------------------------------------------------------------------------------------------
# the schedule
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True, eq=False)
class DDPMSchedule:
    r"""The coefficients of a ``T``-step DDPM (float64 numpy arrays; each method returns float32 JAX arrays).

    Build it with :meth:`linear`, :meth:`cosine` or :meth:`from_betas`. Close over it (it is a static
    object, hashed by identity) rather than passing it through ``jax.jit`` as an argument.

    Attributes:
      betas: ``beta_1 .. beta_T``, shape ``(T,)``.
      timesteps: the original step of each step, ``(T,)`` ints (``1..T`` unless respaced).
      num_original_steps: ``T`` of the schedule this one was respaced from (its own ``T`` otherwise).
    """

    betas: np.ndarray
    timesteps: np.ndarray
    num_original_steps: int

    def __post_init__(self):
        b = np.asarray(self.betas, np.float64)
        if b.ndim != 1 or b.size < 1:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {b.shape}.")
        if not np.all(np.isfinite(b)) or np.any(b <= 0) or np.any(b >= 1):
            raise ValueError(f"every beta_n must lie in (0, 1), got min {b.min():.4g}, max {b.max():.4g}.")
        ts = np.asarray(self.timesteps)
        if ts.shape != b.shape or np.any(np.diff(ts) <= 0) or ts[0] < 1 or ts[-1] > self.num_original_steps:
            raise ValueError("timesteps must be strictly increasing original steps in [1, num_original_steps], one "
                             f"per beta; got {ts} for {b.size} betas and num_original_steps={self.num_original_steps}.")
        object.__setattr__(self, "betas", b)
        object.__setattr__(self, "timesteps", ts.astype(np.int64))

    def __repr__(self) -> str:
        kept = "" if self.T == self.num_original_steps else f" of {self.num_original_steps}"
        return (f"DDPMSchedule(T={self.T}{kept}, betas={self.betas[0]:.4g}..{self.betas[-1]:.4g}, "
                f"abar_T={self.alphas_cumprod[-1]:.4g})")

    # -- constructors ------------------------------------------------------------------------
    @classmethod
    def from_betas(cls, betas) -> "DDPMSchedule":
        betas = np.asarray(betas, np.float64)
        return cls(betas, np.arange(1, betas.size + 1), int(betas.size))

    @classmethod
    def linear(cls, T: int = 1000, beta_1: float = 1e-4, beta_T: float = 0.02, *, rescale: bool = False):
        """Ho et al.'s linear schedule (see :func:`linear_betas`)."""
        return cls.from_betas(linear_betas(T, beta_1, beta_T, rescale=rescale))

    @classmethod
    def cosine(cls, T: int = 1000, s: float = 0.008, max_beta: float = 0.999):
        """Nichol & Dhariwal's cosine schedule (see :func:`cosine_betas`)."""
        return cls.from_betas(cosine_betas(T, s, max_beta))

    # -- derived coefficients (float64) -------------------------------------------------------
    @property
    def T(self) -> int:
        return int(self.betas.size)

    @property
    def alphas(self) -> np.ndarray:
        return 1.0 - self.betas

    @property
    def alphas_cumprod(self) -> np.ndarray:
        """``abar_n = prod_{m <= n} (1 - beta_m)``, ``n = 1..T``."""
        return np.cumprod(1.0 - self.betas)

    @property
    def alphas_cumprod_prev(self) -> np.ndarray:
        """``abar_{n-1}``, ``n = 1..T`` (``abar_0 = 1``)."""
        return np.concatenate([[1.0], self.alphas_cumprod[:-1]])

    @property
    def snr(self) -> np.ndarray:
        """``SNR(n) = abar_n / (1 - abar_n)`` (Kingma et al. 2021), ``n = 1..T``."""
        a = self.alphas_cumprod
        return a / (1.0 - a)

    @property
    def posterior_variance(self) -> np.ndarray:
        r"""``beta_tilde_n = (1 - abar_{n-1}) / (1 - abar_n) beta_n`` (eq. 7); ``beta_tilde_1 = 0``."""
        return (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod) * self.betas

    @property
    def posterior_mean_coef1(self) -> np.ndarray:
        """Coefficient of ``x_0`` in ``mu_tilde_n`` (eq. 7): ``sqrt(abar_{n-1}) beta_n / (1 - abar_n)``."""
        return np.sqrt(self.alphas_cumprod_prev) * self.betas / (1.0 - self.alphas_cumprod)

    @property
    def posterior_mean_coef2(self) -> np.ndarray:
        """Coefficient of ``x_n`` in ``mu_tilde_n`` (eq. 7): ``sqrt(alpha_n) (1 - abar_{n-1}) / (1 - abar_n)``."""
        return np.sqrt(self.alphas) * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

    def model_variance(self, variance: str = "beta") -> np.ndarray:
        r"""The reverse-step variances ``sigma_n^2``, ``n = 1..T`` (Ho et al. sec. 3.2).

        ``"beta"``: ``sigma_n^2 = beta_n`` (optimal for ``x_0 ~ N(0, I)``); ``"posterior"``:
        ``sigma_n^2 = beta_tilde_n`` (optimal for a point mass), with ``sigma_1^2 = beta_tilde_2`` since
        ``beta_tilde_1 = 0`` (improved-diffusion's clipped log-variance; used only by the decoder, the sampler
        adds no noise at ``n = 1``).
        """
        if variance not in VARIANCES:
            raise ValueError(f"unknown variance {variance!r}; use 'beta' (sigma_n^2 = beta_n) or 'posterior' "
                             "(sigma_n^2 = beta_tilde_n).")
        if variance == "beta":
            return self.betas
        pv = self.posterior_variance
        return np.concatenate([pv[1:2] if self.T > 1 else self.betas[:1], pv[1:]])

    # -- steps, times and the path -------------------------------------------------------------
    def _table(self, values, dtype=jnp.float32) -> Array:
        """``[v_0, v_1, ..., v_T]`` as a JAX array indexed by step (``v_0`` = value at the data)."""
        return jnp.asarray(np.asarray(values), dtype)

    def _check_step(self, n, lo: int = 1) -> Array:
        n = jnp.asarray(n)
        if not jnp.issubdtype(n.dtype, jnp.integer):
            raise ValueError(f"the step n must be an integer array (steps {lo}..T), got dtype {n.dtype}.")
        if is_concrete(n) and n.size:
            arr = np.asarray(n)  # numpy: jnp reductions would be traced inside a jit even for a constant
            if arr.min() < lo or arr.max() > self.T:
                raise ValueError(f"steps must lie in [{lo}, T={self.T}], got values in [{arr.min()}, {arr.max()}].")
        return n

    def _at(self, values_1_to_T, n, x: Array, *, lo: int = 1, value_0: float = 0.0) -> Array:
        """``values[n]`` for steps ``n`` (scalar or ``(B,)``) shaped to broadcast against ``x``."""
        n = self._check_step(n, lo)
        table = self._table(np.concatenate([[value_0], np.asarray(values_1_to_T, np.float64)]), x.dtype)
        v = table[jnp.broadcast_to(n, (x.shape[0],))]
        return expand_like(v, x)

    def time_of_step(self, n) -> Array:
        """jaxgen time ``t = 1 - n_orig / T_orig`` of step ``n`` (``n = 0`` gives ``t = 1``, the data)."""
        n = self._check_step(n, lo=0)
        orig = self._table(np.concatenate([[0], self.timesteps]), jnp.float32)[n]
        T0 = float(self.num_original_steps)
        return (T0 - orig) / T0  # = 1 - n/T, rounded once (near t = 0 a float32 t is then exact to 1e-10)

    def step_of_time(self, t) -> Array:
        """The original step ``n = round(T_orig (1 - t))`` (int32) at jaxgen time ``t``, the inverse of
        :meth:`time_of_step` on the kept steps (``t = 1`` gives 0, ``t = 0`` gives ``T_orig``).

        Ho et al.'s and improved-diffusion's code number the steps from 0: a network trained there takes
        ``n - 1``, e.g. ``field = lambda x, t: eps_net(x, schedule.step_of_time(t) - 1)``.
        """
        t = jnp.asarray(t)
        check_time(t, name="t")
        T0 = float(self.num_original_steps)
        return jnp.round(T0 - T0 * t).astype(jnp.int32)

    def path(self) -> GaussianPath:
        r"""The :class:`GaussianPath` through every step: ``alpha_{t_n} = sqrt(abar_n)``,
        ``beta_{t_n} = sqrt(1 - abar_n)``.

        Between steps ``log abar`` is linear in the (continuous) original step ``n(t) = T_orig (1 - t)``; the
        domain is ``[t_{T}, t_{1}]`` (``beta_t`` has an infinite slope at ``abar = 1``), and the boundary holds
        approximately: ``sqrt(abar_T / (1 - abar_T))`` and ``sqrt((1 - abar_1) / abar_1)`` must be at most 0.1.
        """
        cached = self.__dict__.get("_path")
        if cached is not None:
            return cached
        if self.T < 2:
            raise ValueError("a GaussianPath needs a schedule of at least 2 steps; use the original schedule's path.")
        knots = self.timesteps.astype(np.float64)
        log_abar = np.log(self.alphas_cumprod)
        r0 = math.sqrt(self.alphas_cumprod[-1] / (1.0 - self.alphas_cumprod[-1]))
        r1 = math.sqrt((1.0 - self.alphas_cumprod[0]) / self.alphas_cumprod[0])
        if r0 > _PATH_TOL or r1 > _PATH_TOL:
            raise ValueError(
                f"this DDPM schedule is too far from a noise-to-data path for a GaussianPath: sqrt(abar_T/(1-abar_T)) "
                f"= {r0:.3g} and sqrt((1-abar_1)/abar_1) = {r1:.3g}, both must be <= {_PATH_TOL}. Use more steps, "
                "larger betas (linear_betas(..., rescale=True) scales them by 1000/T) or a cosine schedule.")
        T0 = float(self.num_original_steps)
        log_abar_fn = _piecewise_linear(knots, log_abar, T0)

        t_max = 1.0 - knots[0] / T0
        t_min = 1.0 - knots[-1] / T0
        sched = Schedule(lambda t: jnp.exp(0.5 * log_abar_fn(t)), lambda t: jnp.sqrt(-jnp.expm1(log_abar_fn(t))),
                         name=f"ddpm(T={self.num_original_steps})", t_min=t_min, t_max=t_max,
                         boundary="approximate", boundary_tol=_PATH_TOL)
        path = GaussianPath(sched)
        object.__setattr__(self, "_path", path)  # built once per schedule (validation runs eagerly)
        return path

    def respace(self, steps: int) -> "DDPMSchedule":
        r"""Keep ``steps`` evenly spaced steps (Nichol & Dhariwal 2021, sec. 4): ``S = {1 + round(c_i)}``,
        ``c_i = i (T-1)/(K-1)``, always including steps 1 and ``T``, with betas recomputed so that ``abar`` is
        unchanged on ``S``: ``beta'_k = 1 - abar_{s_k} / abar_{s_{k-1}}`` (``abar_{s_0} = 1``).

        ``c_i`` is accumulated as improved-diffusion's ``space_timesteps(T, [K])`` does (a running float sum of the
        stride, Python's half-to-even ``round``), so the kept steps are exactly theirs: the sum can fall just below
        a half-integer, e.g. ``T = 1000, K = 21`` keeps step 500 (their index 499) where the exact ``c_10 = 499.5``
        rounds to index 500 (step 501).
        ``K = 1`` keeps step ``T`` (improved-diffusion keeps step 1, from which ancestral sampling cannot start).
        """
        if not isinstance(steps, (int, np.integer)) or not 1 <= steps <= self.T:
            raise ValueError(f"steps must be an int in [1, T={self.T}] to respace this schedule, got {steps!r}.")
        if steps == self.T:
            return self
        if steps == 1:
            idx = np.array([self.T - 1])
        else:
            stride, c, kept = (self.T - 1) / (int(steps) - 1), 0.0, []
            for _ in range(int(steps)):
                kept.append(round(c))
                c += stride
            idx = np.asarray(kept)
        idx = np.unique(idx.astype(np.int64))
        abar = self.alphas_cumprod[idx]
        new_betas = 1.0 - abar / np.concatenate([[1.0], abar[:-1]])
        return DDPMSchedule(new_betas, self.timesteps[idx], self.num_original_steps)

    # -- the forward process ---------------------------------------------------------------------
    def q_mean_std(self, n, x: Array) -> tuple[Array, Array]:
        """``(sqrt(abar_n), sqrt(1 - abar_n))`` shaped like ``x``'s batch, ``n = 0..T``."""
        return (self._at(np.sqrt(self.alphas_cumprod), n, x, lo=0, value_0=1.0),
                self._at(np.sqrt(1.0 - self.alphas_cumprod), n, x, lo=0, value_0=0.0))

    def q_sample(self, x0: Array, n, eps: Array) -> Array:
        r"""``x_n = sqrt(abar_n) x_0 + sqrt(1 - abar_n) eps``, a draw of ``q(x_n | x_0)`` (eq. 4); ``n = 0..T``."""
        a, s = self.q_mean_std(n, x0)
        return a * x0 + s * eps

    def q_posterior(self, x0: Array, x_n: Array, n) -> tuple[Array, Array]:
        r"""Mean ``mu_tilde_n(x_n, x_0)`` and variance ``beta_tilde_n`` (shape ``(B,)``) of ``q(x_{n-1} | x_n, x_0)``
        (eqs. 6-7), ``n = 1..T``."""
        c1 = self._at(self.posterior_mean_coef1, n, x0)
        c2 = self._at(self.posterior_mean_coef2, n, x0)
        var = self._at(self.posterior_variance, n, x0)
        return c1 * x0 + c2 * x_n, jnp.reshape(var, (x0.shape[0],))


def _piecewise_linear(knots: np.ndarray, values: np.ndarray, T0: float) -> Callable[[Array], Array]:
    """``t -> `` the linear interpolation of ``values`` at the original step ``n(t) = T0 (1 - t)``, for increasing
    integer ``knots``. Gathers only (a per-integer table of knot intervals), no search: cheap inside samplers
    and differentiable in ``t``."""
    lo, hi = int(knots[0]), int(knots[-1])
    # seg[m - lo] = index j of the interval [knots[j], knots[j+1]) holding [m, m + 1), m = lo .. hi - 1
    seg = np.searchsorted(knots, np.arange(lo, hi), side="right") - 1
    x0, y0 = knots[seg].astype(np.float32), values[seg].astype(np.float32)
    slope = ((values[seg + 1] - values[seg]) / (knots[seg + 1] - knots[seg])).astype(np.float32)

    def fn(t):
        n = jnp.clip(T0 - T0 * t, lo, hi)  # T0 - T0 t, not T0 (1 - t): integers at t = 1 - n/T0
        # The interval starting at the knot k for n in [k - 1e-3, k + 1): at a knot, where the slope jumps, every
        # evaluation takes the same side whatever the last bit of n (a compiler may fuse T0 - T0 t into one FMA and
        # land one ulp below k); the two lines meet at k, so the value changes by at most 1e-3 times the slope jump.
        m = jnp.clip(jnp.floor(n + 1e-3).astype(jnp.int32) - lo, 0, hi - lo - 1)
        return jnp.asarray(y0)[m] + jnp.asarray(slope)[m] * (n - jnp.asarray(x0)[m])

    return fn


__all__ = ["DDPMSchedule", "linear_betas", "cosine_betas", "VARIANCES"]
