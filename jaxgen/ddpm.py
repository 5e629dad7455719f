r"""Discrete-time DDPM (Ho et al. 2020, "Denoising Diffusion Probabilistic Models"; Nichol & Dhariwal 2021).

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
from typing import Callable, NamedTuple

import numpy as np
import jax
import jax.numpy as jnp

from jaxgen._checks import expand_like, is_concrete
from jaxgen.fields import canonical_prediction, to_data_and_noise
from jaxgen.paths.gaussian import GaussianPath
from jaxgen.paths.schedules import Schedule
from jaxgen.samplers.ode import SampleResult, _bind

Array = jax.Array

VARIANCES = ("beta", "posterior")
DECODERS = ("gaussian", "discretized")
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
        if is_concrete(t) and t.size:
            arr = np.asarray(t)
            if not np.all(np.isfinite(arr)) or arr.min() < 0.0 or arr.max() > 1.0:
                raise ValueError(f"jaxgen times must lie in [0, 1] (t = 0 noise, t = 1 data), got values in "
                                 f"[{arr.min():.6g}, {arr.max():.6g}]; a diffusion time tau = n / T is t = 1 - tau.")
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
        n = jnp.clip(T0 - T0 * t, lo, hi)  # T0 - T0 t, not T0 (1 - t): exact integers at t = 1 - n/T0
        m = jnp.clip(jnp.floor(n).astype(jnp.int32) - lo, 0, hi - lo - 1)
        return jnp.asarray(y0)[m] + jnp.asarray(slope)[m] * (n - jnp.asarray(x0)[m])

    return fn


# ---------------------------------------------------------------------------------------------
# model predictions
# ---------------------------------------------------------------------------------------------

def _as_time_fn(schedule: DDPMSchedule, path_time: Callable | None) -> Callable:
    """``k -> t`` for steps ``k`` of ``schedule``: ``path_time(n_orig)`` or the default ``1 - n_orig / T_orig``."""
    if path_time is None:
        return schedule.time_of_step
    orig = jnp.asarray(schedule.timesteps, jnp.int32)
    return lambda k: jnp.asarray(path_time(orig[k - 1]), jnp.float32)


def _predict_x0(field, schedule, path, prediction, time_fn, x, k, clip_denoised):
    """``(x0_hat, eps_hat)`` at step ``k`` (B,) from one field evaluation, through the field algebra."""
    t = jnp.broadcast_to(time_fn(k), (x.shape[0],))
    out = field(x, t)
    x0_hat, eps_hat = to_data_and_noise(path, out, x, t, prediction)
    if clip_denoised is not None:
        x0_hat = jnp.clip(x0_hat, -clip_denoised, clip_denoised)
    return x0_hat, eps_hat


def _setup(schedule, steps, path, path_time, prediction, field, cond):
    if not isinstance(schedule, DDPMSchedule):
        raise ValueError("schedule must be a DDPMSchedule (e.g. DDPMSchedule.linear()), "
                         f"got {type(schedule).__name__}.")
    sched = schedule if steps is None else schedule.respace(steps)
    path = schedule.path() if path is None else path
    return sched, path, canonical_prediction(prediction), _as_time_fn(sched, path_time), _bind(field, cond)


def ddpm_ancestral_sample(
    field: Callable,
    x_T: Array,
    key: Array,
    *,
    schedule: DDPMSchedule,
    prediction: str = "eps",
    variance: str = "beta",
    steps: int | None = None,
    path: GaussianPath | None = None,
    path_time: Callable | None = None,
    clip_denoised: float | None = None,
    cond: dict | None = None,
    save_trajectory: bool = False,
) -> SampleResult:
    r"""Ancestral sampling (Ho et al. 2020, Algorithm 2) with a field of any parameterisation.

    For ``n = T, ..., 1``: decode ``x0_hat`` from ``field(x_n, t_n)`` (one evaluation; optionally clipped to
    ``[-clip_denoised, clip_denoised]``) and draw ``x_{n-1} = mu_tilde_n(x_n, x0_hat) + sigma_n z`` (eq. 7), with
    ``z = 0`` at ``n = 1``. Without clipping this is Algorithm 2's
    ``x_{n-1} = (x_n - beta_n / sqrt(1 - abar_n) eps_hat) / sqrt(alpha_n) + sigma_n z``.

    Args:
      field: ``field(x, t, **cond)`` predicting ``prediction`` (eps, data, score, v or velocity) on ``path``.
      x_T: start, shape ``(B, ...)``, e.g. ``jax.random.normal(key, shape)``.
      schedule: the DDPM.
      variance: ``sigma_n^2 = beta_n`` (``"beta"``) or ``beta_tilde_n`` (``"posterior"``).
      steps: sample with ``steps < T`` steps of the respaced schedule (:meth:`DDPMSchedule.respace`).
      path: the path the field was trained on; default ``schedule.path()`` (its ``alpha, beta`` at ``t_n`` must be
        ``sqrt(abar_n), sqrt(1 - abar_n)`` for the decoding to be the DDPM's).
      path_time: map from an original step ``n`` (int array) to the field's time; default ``1 - n / T``.

    Returns:
      ``SampleResult`` with ``nfe`` = the number of steps, ``ts`` the jaxgen times of ``x_T, ..., x_0`` and,
      with ``save_trajectory``, those states.
    """
    sched, path, prediction, time_fn, f = _setup(schedule, steps, path, path_time, prediction, field, cond)
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; use 'beta' or 'posterior'.")
    K = sched.T
    c1 = jnp.asarray(sched.posterior_mean_coef1, x_T.dtype)
    c2 = jnp.asarray(sched.posterior_mean_coef2, x_T.dtype)
    sig = jnp.asarray(np.sqrt(sched.model_variance(variance)), x_T.dtype)

    def body(x, k):
        x0_hat, _ = _predict_x0(f, sched, path, prediction, time_fn, x, k, clip_denoised)
        mean = c1[k - 1] * x0_hat + c2[k - 1] * x
        z = jax.random.normal(jax.random.fold_in(key, k), x.shape, x.dtype)
        x_prev = mean + jnp.where(k > 1, sig[k - 1], 0.0) * z
        return x_prev, (x_prev if save_trajectory else None)

    ks = jnp.arange(K, 0, -1)
    x, traj = jax.lax.scan(body, x_T, ks)
    if save_trajectory:
        traj = jnp.concatenate([x_T[None], traj], axis=0)
    ts = sched.time_of_step(jnp.arange(K, -1, -1))
    return SampleResult(x, K, ts, traj)


# ---------------------------------------------------------------------------------------------
# the variational bound
# ---------------------------------------------------------------------------------------------

def gaussian_kl(mean1: Array, var1: Array, mean2: Array, var2: Array) -> Array:
    r"""``KL(N(mean1, var1 I) || N(mean2, var2 I))`` summed over the non-batch axes, shape ``(B,)``:
    ``1/2 sum [log(var2/var1) + var1/var2 + (mean1 - mean2)^2 / var2 - 1]``."""
    d = math.prod(mean1.shape[1:])
    var1 = jnp.reshape(var1, (-1,))
    var2 = jnp.reshape(var2, (-1,))
    sq = jnp.sum(jnp.reshape(mean1 - mean2, (mean1.shape[0], -1)) ** 2, -1)
    return 0.5 * (d * (jnp.log(var2) - jnp.log(var1) + var1 / var2 - 1.0) + sq / var2)


def _check_kl_step(schedule: DDPMSchedule, n) -> None:
    """``L_{n-1}`` is a KL term only for ``n >= 2`` (``beta_tilde_1 = 0``: it would be infinite at ``n = 1``)."""
    n = jnp.asarray(n)
    if is_concrete(n) and n.size and jnp.issubdtype(n.dtype, jnp.integer) and np.asarray(n).min() < 2:
        raise ValueError(f"the KL term L_(n-1) needs steps n >= 2, got n = {np.asarray(n).min()}: at n = 1 the posterior "
                         "variance beta_tilde_1 is 0, and that step is the decoder L_0 = -log p(x_0 | x_1) "
                         "(ddpm_elbo's `decoder` term).")


def diffusion_kl_term(schedule: DDPMSchedule, x0: Array, x_n: Array, x0_hat: Array, n, *,
                      variance: str = "beta") -> Array:
    r"""``L_{n-1} = KL(q(x_{n-1} | x_n, x_0) || p(x_{n-1} | x_n))`` for ``n >= 2`` in closed form (Ho et al. eq. 5),
    with the model mean ``mu_tilde_n(x_n, x0_hat)`` and variance ``sigma_n^2``. Shape ``(B,)``, nats."""
    _check_kl_step(schedule, n)
    mean_q, var_q = schedule.q_posterior(x0, x_n, n)
    mean_p, _ = schedule.q_posterior(x0_hat, x_n, n)
    var_p = jnp.reshape(schedule._at(schedule.model_variance(variance), n, x0), (-1,))
    return gaussian_kl(mean_q, var_q, mean_p, var_p)


def _variance_mismatch(schedule, n, x, variance):
    """``d/2 (r - 1 - log r)``, ``r = beta_tilde_n / sigma_n^2``: the part of ``L_{n-1}`` that the model mean
    does not affect."""
    d = math.prod(x.shape[1:])
    r = schedule._at(schedule.posterior_variance / schedule.model_variance(variance), n, x)
    r = jnp.reshape(r, (-1,))
    return 0.5 * d * (r - 1.0 - jnp.log(r))


def eps_kl_weight(schedule: DDPMSchedule, n, x: Array, *, variance: str = "beta") -> Array:
    r"""Ho et al. eq. 12: ``beta_n^2 / (2 sigma_n^2 alpha_n (1 - abar_n))``, the weight of ``||eps - eps_hat||^2``
    in ``L_{n-1}``. Shape ``(B,)``."""
    sigma2 = schedule.model_variance(variance)
    w = schedule.betas**2 / (2.0 * sigma2 * schedule.alphas * (1.0 - schedule.alphas_cumprod))
    return jnp.reshape(schedule._at(w, n, x), (-1,))


def snr_kl_weight(schedule: DDPMSchedule, n, x: Array, *, variance: str = "beta") -> Array:
    r"""``(beta_tilde_n / sigma_n^2) (SNR(n-1) - SNR(n)) / 2``, the weight of ``||x_0 - x0_hat||^2`` in ``L_{n-1}``
    (Kingma et al. 2021, eq. 13 in discrete time, for ``sigma_n^2 = beta_tilde_n``). Shape ``(B,)``; ``n >= 2``."""
    _check_kl_step(schedule, n)
    snr = schedule.snr
    snr_prev = np.concatenate([[np.inf], snr[:-1]])
    with np.errstate(invalid="ignore"):
        w = 0.5 * (schedule.posterior_variance / schedule.model_variance(variance)) * (snr_prev - snr)
    w[0] = np.nan  # L_0 is the decoder, not a KL term
    return jnp.reshape(schedule._at(w, n, x), (-1,))


def diffusion_kl_term_eps(schedule: DDPMSchedule, eps: Array, eps_hat: Array, n, *, variance: str = "beta") -> Array:
    r"""``L_{n-1}`` in noise form (Ho et al. eq. 12), ``n >= 2``:
    ``C_n + beta_n^2 / (2 sigma_n^2 alpha_n (1 - abar_n)) ||eps - eps_hat||^2``, ``C_n`` the variance mismatch. Equals :func:`diffusion_kl_term` when ``x0_hat`` is decoded from ``eps_hat``."""
    _check_kl_step(schedule, n)
    sq = jnp.sum(jnp.reshape(eps - eps_hat, (eps.shape[0], -1)) ** 2, -1)
    return _variance_mismatch(schedule, n, eps, variance) + eps_kl_weight(schedule, n, eps, variance=variance) * sq


def diffusion_kl_term_snr(schedule: DDPMSchedule, x0: Array, x0_hat: Array, n, *, variance: str = "beta") -> Array:
    r"""``L_{n-1}`` in data (SNR) form, ``n >= 2``: ``C_n + (beta_tilde_n/sigma_n^2) (SNR(n-1) - SNR(n))/2 ||x_0 - x0_hat||^2``.

    Since ``x_0 - x0_hat = (eps_hat - eps) / sqrt(SNR(n))``, the eps weight of eq. 12 is this weight over ``SNR(n)``.
    """
    _check_kl_step(schedule, n)
    sq = jnp.sum(jnp.reshape(x0 - x0_hat, (x0.shape[0], -1)) ** 2, -1)
    return _variance_mismatch(schedule, n, x0, variance) + snr_kl_weight(schedule, n, x0, variance=variance) * sq


def _log1mexp(a: Array) -> Array:
    """``log(1 - exp(a))`` for ``a <= 0``, accurate for every ``a`` (Maechler 2012)."""
    a = jnp.minimum(a, -1e-30)
    return jnp.where(a > -math.log(2.0), jnp.log(-jnp.expm1(a)), jnp.log1p(-jnp.exp(a)))


def discretized_gaussian_log_likelihood(x: Array, mean: Array, std: Array, *, num_bins: int = 256) -> Array:
    r"""``log P(x)`` per element of the discretised Gaussian of Ho et al. eq. 13 on ``num_bins`` levels in ``[-1, 1]``.

    Each value owns the interval ``[x - 1/(num_bins - 1), x + 1/(num_bins - 1)]``, the outer two extended to
    ``-inf`` and ``+inf``; the probability is the Gaussian mass of that interval, computed from ``log Phi``
    on the tail where it is accurate. (Ho et al.'s and improved-diffusion's code use a tanh approximation of
    ``Phi`` and clamp probabilities at ``1e-12``; on 8-bit data that moves a mean by a few ``1e-5`` bits/dim.)
    """
    half = 1.0 / (num_bins - 1)
    lo = (x - mean - half) / std
    hi = (x - mean + half) / std
    log_cdf_hi = jax.scipy.special.log_ndtr(hi)      # log P(X < upper)
    log_sf_lo = jax.scipy.special.log_ndtr(-lo)      # log P(X > lower)
    # mass = Phi(hi) - Phi(lo) = Phi(-lo) - Phi(-hi); use the smaller tail for accuracy.
    upper_tail = lo > 0
    mid = jnp.where(upper_tail,
                    log_sf_lo + _log1mexp(jax.scipy.special.log_ndtr(-hi) - log_sf_lo),
                    log_cdf_hi + _log1mexp(jax.scipy.special.log_ndtr(lo) - log_cdf_hi))
    return jnp.where(x < -1.0 + half, log_cdf_hi, jnp.where(x > 1.0 - half, log_sf_lo, mid))


class DDPMBound(NamedTuple):
    """Terms of the negative ELBO per sample (nats), shape ``(B,)`` each.

    Attributes:
      nelbo: ``prior + diffusion + decoder``.
      bits_per_dim: ``nelbo / (D log 2)``.
      prior: ``L_T = KL(q(x_T | x_0) || N(0, I))``.
      diffusion: ``sum_{n=2}^T L_{n-1}`` (or its unbiased estimate).
      decoder: ``L_0 = -log p(x_0 | x_1)``.
    """

    nelbo: Array
    bits_per_dim: Array
    prior: Array
    diffusion: Array
    decoder: Array


def _decoder_variance(sched: DDPMSchedule, variance: str, decoder_variance) -> float:
    """``sigma_1^2`` of the decoder ``p(x_0 | x_1)`` (see :func:`ddpm_elbo`)."""
    if decoder_variance is None:
        return float(sched.model_variance(variance)[0])
    if isinstance(decoder_variance, str):
        if decoder_variance != "clipped":
            raise ValueError(f"unknown decoder_variance {decoder_variance!r}; use None (sigma_1^2 of `variance`), "
                             "'clipped' (beta_tilde_2, as Ho et al.'s and improved-diffusion's code) or a positive float.")
        return float(sched.model_variance("posterior")[0])
    v = float(decoder_variance)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"decoder_variance must be a positive finite float (or None / 'clipped'), got {decoder_variance!r}.")
    return v


def ddpm_elbo(
    field: Callable,
    x0: Array,
    key: Array,
    *,
    schedule: DDPMSchedule,
    prediction: str = "eps",
    variance: str = "beta",
    decoder: str = "gaussian",
    num_bins: int = 256,
    num_terms: int | None = None,
    steps: int | None = None,
    path: GaussianPath | None = None,
    path_time: Callable | None = None,
    clip_denoised: float | None = None,
    cond: dict | None = None,
    decoder_variance: str | float | None = None,
) -> DDPMBound:
    r"""Negative variational bound of a DDPM per sample (Ho et al. 2020, eq. 5):

    .. math:: -\mathrm{ELBO}(x_0) = \underbrace{KL(q(x_T|x_0) \| N(0,I))}_{L_T}
              + \sum_{n=2}^{T} \mathbb E_{q(x_n|x_0)} \underbrace{KL(q(x_{n-1}|x_n,x_0) \| p(x_{n-1}|x_n))}_{L_{n-1}}
              + \mathbb E_{q(x_1|x_0)} \underbrace{[-\log p(x_0|x_1)]}_{L_0} \;\ge\; -\log p_\theta(x_0).

    Each ``L_{n-1}`` is the exact Gaussian KL (:func:`diffusion_kl_term`) at one draw ``x_n ~ q(x_n|x_0)`` per term.
    ``num_terms=None`` sums all ``T - 1`` terms (``T`` field evaluations in all); ``num_terms=k`` draws ``k``
    steps uniformly from ``{2..T}`` per sample and returns the unbiased ``(T - 1)/k`` -weighted sum (``k + 1``
    evaluations). The decoder ``p(x_0|x_1)`` has mean ``mu_tilde_1(x_1, x0_hat) = x0_hat`` and variance ``sigma_1^2``
    (:meth:`DDPMSchedule.model_variance`): ``"gaussian"`` is the continuous density (then the bound is on a
    density of ``x_0`` and is comparable with a continuous NLL); ``"discretized"`` is eq. 13 for data on
    ``num_bins`` levels in ``[-1, 1]`` (a probability: the bound is on a discrete NLL).

    ``decoder_variance`` replaces the decoder's ``sigma_1^2``: ``None`` keeps ``model_variance(variance)[0]``
    (``beta_1`` for ``"beta"``, as eq. 13 with ``sigma_t^2 = beta_t``), ``"clipped"`` uses ``beta_tilde_2``, which
    Ho et al.'s ``diffusion_utils_2.py`` and improved-diffusion use at the first step for *both* fixed variances
    (their ``fixedlarge`` log-variance is ``log(append(beta_tilde_2, betas[1:]))``), a float uses that variance.
    Their bits/dim are ``variance="beta"`` or ``"posterior"``, ``decoder="discretized"``,
    ``decoder_variance="clipped"``, ``clip_denoised=1.0`` (their ``calc_bpd_loop`` default).

    Returns:
      :class:`DDPMBound` (nats; ``bits_per_dim`` divides by ``D log 2``, ``D`` the data dimension).
    """
    sched, path, prediction, time_fn, f = _setup(schedule, steps, path, path_time, prediction, field, cond)
    if variance not in VARIANCES:
        raise ValueError(f"unknown variance {variance!r}; use 'beta' or 'posterior'.")
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; use 'gaussian' (continuous) or 'discretized' "
                         "(Ho et al. eq. 13).")
    if decoder == "discretized":
        if not isinstance(num_bins, (int, np.integer)) or num_bins < 2:
            raise ValueError(f"num_bins must be an int >= 2, got {num_bins!r}.")
        arr = np.asarray(x0) if is_concrete(x0) else None
        if arr is not None and (arr.min() < -1.0 - 1e-6 or arr.max() > 1.0 + 1e-6):
            raise ValueError("the discretized decoder needs data scaled to [-1, 1] (e.g. 2 * uint8 / 255 - 1), "
                             f"got values in [{arr.min():.4g}, {arr.max():.4g}].")
    if num_terms is not None and (not isinstance(num_terms, (int, np.integer)) or num_terms < 1):
        raise ValueError(f"num_terms must be a positive int (or None for all T - 1 terms), got {num_terms!r}.")
    var1 = _decoder_variance(sched, variance, decoder_variance)
    K, B = sched.T, x0.shape[0]
    d = math.prod(x0.shape[1:])
    dtype = x0.dtype

    def x0_hat_at(x, k):
        return _predict_x0(f, sched, path, prediction, time_fn, x, k, clip_denoised)[0]

    # L_T: KL(N(sqrt(abar_T) x0, 1 - abar_T) || N(0, 1)) per dimension, summed.
    abar_T = float(sched.alphas_cumprod[-1])
    prior = 0.5 * jnp.sum(jnp.reshape(abar_T * x0**2, (B, -1)), -1) + 0.5 * d * (-abar_T - math.log1p(-abar_T))

    # sum_{n=2}^{K} L_{n-1}
    def term(k, subkey):
        eps = jax.random.normal(subkey, x0.shape, dtype)
        x_n = sched.q_sample(x0, k, eps)
        return diffusion_kl_term(sched, x0, x_n, x0_hat_at(x_n, k), k, variance=variance)

    if K < 2:
        diffusion = jnp.zeros((B,), dtype)
    elif num_terms is None:
        def body(acc, k):
            return acc + term(jnp.broadcast_to(k, (B,)), jax.random.fold_in(key, k)), None
        diffusion, _ = jax.lax.scan(body, jnp.zeros((B,), dtype), jnp.arange(2, K + 1))
    else:
        def body(acc, j):
            kj = jax.random.fold_in(jax.random.fold_in(key, K + 1), j)
            k = jax.random.randint(kj, (B,), 2, K + 1)
            return acc + term(k, jax.random.fold_in(kj, 1)), None
        total, _ = jax.lax.scan(body, jnp.zeros((B,), dtype), jnp.arange(num_terms))
        diffusion = total * ((K - 1) / num_terms)

    # L_0 = -log p(x0 | x1)
    one = jnp.ones((B,), jnp.int32)
    x1 = sched.q_sample(x0, one, jax.random.normal(jax.random.fold_in(key, 1), x0.shape, dtype))
    mean = x0_hat_at(x1, one)  # mu_tilde_1(x1, x0_hat) = x0_hat: coef1 = 1, coef2 = 0 at n = 1
    if decoder == "gaussian":
        sq = jnp.sum(jnp.reshape((x0 - mean) ** 2, (B, -1)), -1)
        dec = 0.5 * sq / var1 + 0.5 * d * math.log(2.0 * math.pi * var1)
    else:
        ll = discretized_gaussian_log_likelihood(x0, mean, jnp.asarray(math.sqrt(var1), dtype), num_bins=num_bins)
        dec = -jnp.sum(jnp.reshape(ll, (B, -1)), -1)

    nelbo = prior + diffusion + dec
    return DDPMBound(nelbo, nelbo / (d * math.log(2.0)), prior, diffusion, dec)


__all__ = [
    "DDPMSchedule", "linear_betas", "cosine_betas", "ddpm_ancestral_sample", "ddpm_elbo", "DDPMBound",
    "gaussian_kl", "diffusion_kl_term", "diffusion_kl_term_eps", "diffusion_kl_term_snr", "eps_kl_weight",
    "snr_kl_weight", "discretized_gaussian_log_likelihood", "VARIANCES", "DECODERS",
]
