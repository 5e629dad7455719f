r"""SDE solvers and Langevin dynamics (notes sections 2.2, 3.3.2 and 3.3.4).

* :class:`EulerMaruyama` integrates ``dX_t = f_t(X_t) dt + sigma_t dW_t`` with
  ``X_{t+h} = X_t + h f_t(X_t) + sigma_t sqrt(h) xi`` (notes eq. 2.2.4). By default the drift is the SDE
  extension of the model (notes eq. 3.3.2): ``u_t + sigma_t^2 / 2 * score_t``, both decoded from one field
  evaluation, so that the SDE has the marginals of the probability-flow ODE for any noise level ``sigma_t``
  (``sigma = 0`` is the ODE); with ``drift="field"`` the field itself is the drift.
* :class:`Langevin` runs unadjusted Langevin dynamics ``dX = eta grad log p_t(X) ds + sqrt(2 eta) dW`` (notes
  eq. 3.3.4) at each time of the grid (annealed Langevin dynamics, Song & Ermon 2019), or at one fixed time.

Noise is drawn inside the loop with ``jax.random.fold_in(key, step)``: nothing of size ``steps x batch`` is
allocated, and results are a pure function of ``key``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar

import numpy as np
import jax
import jax.numpy as jnp

from jaxgen._checks import expand_like, is_concrete
from jaxgen.fields.sde import sde_drift
from jaxgen.samplers.base import Grid, Solver, check_steps, register, uniform_grid

Array = jax.Array


def _sigma_at(sigma, t: Array, x: Array) -> Array:
    s = sigma(jnp.broadcast_to(t, (x.shape[0],))) if callable(sigma) else sigma
    s = jnp.broadcast_to(jnp.asarray(s, x.dtype), (x.shape[0],))
    return expand_like(s, x)


def _flat_norm_mean(a: Array) -> Array:
    return jnp.mean(jnp.sqrt(jnp.sum(jnp.reshape(a, (a.shape[0], -1)) ** 2, -1)))


def snr_langevin_step(x: Array, score: Array, noise: Array, snr, *, alpha=1.0) -> tuple[Array, Array]:
    r"""One Langevin step at a target signal-to-noise ratio (Song et al. 2021, Algorithm 4; score_sde's
    ``LangevinCorrector``): with ``eps = 2 alpha (snr * mean ||xi|| / mean ||s||)^2``, the norms averaged over the
    batch,

    .. math:: x \leftarrow x + \epsilon\, s(x) + \sqrt{2 \epsilon}\, \xi .

    Batch-averaged norms, as score_sde's (per-sample norms are too noisy in low dimension: a sample on a mode has
    ``s ~ 0`` and would take a huge step). Returns ``(x_new, x_mean)``, ``x_mean`` the update without noise.
    """
    alpha = jnp.asarray(alpha, x.dtype)
    e = 2.0 * alpha * (snr * _flat_norm_mean(noise) / jnp.maximum(_flat_norm_mean(score), 1e-30)) ** 2
    if jnp.ndim(e) == 1:
        e = expand_like(e, x)
    x_mean = x + e * score
    return x_mean + jnp.sqrt(2.0 * e) * noise, x_mean


@dataclasses.dataclass(frozen=True)
class EulerMaruyama(Solver):
    r"""Euler-Maruyama (notes eq. 2.2.4) with any noise level ``sigma_t``: NFE = ``steps``.

    Args:
      sigma: the diffusion coefficient ``sigma_t``: a constant, a function of ``t`` (shape ``(B,)``), or ``"beta"``
        (default): the path's noise coefficient ``beta_t`` (``1 - t`` on the linear path), which vanishes at the data
        end, where the score of a path with ``beta_1 = 0`` diverges.
      drift: ``"extension"`` (default): the model's ``u_t + sigma_t^2/2 score_t`` (notes eq. 3.3.2), decoded from
        one evaluation of a field of any parameterisation (needs the path unless ``sigma`` is 0); ``"field"``: the
        field is the drift itself (``prediction`` and ``path`` unused), for any SDE ``dX = f dt + sigma dW``.

    The drift is evaluated at the left end of each step, never at ``t1``. For schedules whose score diverges at
    t=1 (``beta_1 = 0``) keep ``sigma_t`` bounded. An eps or score field says nothing about the data where
    ``alpha_t = 0``: start such fields at ``t0 > 0`` (e.g. 1e-3).
    """

    name: ClassVar[str] = "euler_maruyama"
    sigma: Callable | float | str = "beta"
    drift: str = "extension"

    def __post_init__(self):
        if self.drift not in ("extension", "field"):
            raise ValueError(f"drift must be 'extension' (u + sigma^2/2 score from the model) or 'field' (the field is "
                             f"the drift), got {self.drift!r}.")
        if isinstance(self.sigma, str):
            if self.sigma != "beta":
                raise ValueError(f"sigma must be a number >= 0, a function of t, or 'beta' (the path's beta_t), got "
                                 f"{self.sigma!r}.")
        elif not callable(self.sigma) and is_concrete(self.sigma) and not float(np.min(np.asarray(self.sigma))) >= 0:
            raise ValueError(f"sigma must be >= 0 (or a function of t), got {self.sigma!r}.")

    def needs_key(self) -> bool:
        return True

    def check(self, model, grid):
        if self.sigma == "beta" and model.path is None:
            raise ValueError("sigma='beta' is the path's noise coefficient beta_t: pass sample(..., path=...), or a "
                             "number or function of t as sigma.")
        if self.drift == "extension":
            super().check(model, grid)

    def step(self, model, x, inp, key):
        t, t_next = inp["t"], inp["t_next"]
        h = (t_next - t).astype(x.dtype)
        sigma = (lambda tt: model.path.schedule.values(tt)[1]) if self.sigma == "beta" else self.sigma
        sig = _sigma_at(sigma, t, x)
        if self.drift == "field":
            f = model.raw(x, t)
        else:
            u, s = model.velocity_and_score(x, t)
            f = sde_drift(u, s, sig)
        xi = jax.random.normal(jax.random.fold_in(key, inp["i"]), x.shape, x.dtype)
        x_next = x + h * f + sig * jnp.sqrt(h) * xi
        return x_next, x_next


@dataclasses.dataclass(frozen=True)
class Langevin(Solver):
    r"""Langevin dynamics (notes eq. 3.3.4) at each time ``t_0 .. t_{N-1}`` of the grid: annealed Langevin dynamics
    (Song & Ermon 2019, Algorithm 1) from noise towards data, or at the fixed time ``t`` (a constant grid).

    At each level ``steps_per_level`` steps of

    .. math:: x_{k+1} = x_k + \eta\, \nabla \log p_t(x_k) + \sqrt{2 \eta}\, \xi_k ,

    the Euler-Maruyama discretisation of ``dX = sigma^2/2 grad log p dt + sigma dW`` with
    ``eta = h sigma^2 / 2``. With a fixed ``step_size`` the stationary law approaches ``p_t`` as ``eta -> 0``
    (for a Gaussian ``N(m, s^2)`` it is exactly ``N(m, s^2 / (1 - eta / (2 s^2)))``); by default
    (``step_size=None``) the step follows score_sde's Langevin corrector at the target ratio ``snr``
    (:func:`snr_langevin_step`), which adapts to the scale of each level.

    The final grid time is the end of the sweep and is not evaluated (``steps`` levels, NFE =
    ``steps * steps_per_level``). The score is the model's, decoded from any parameterisation (a score field needs
    no path). Step ``k`` of level ``i`` draws from ``fold_in(key, i * steps_per_level + k)``.

    Args:
      step_size: a fixed ``eta > 0``, or ``None`` for the SNR rule.
      snr: the target signal-to-noise ratio of the SNR rule (score_sde uses 0.16 on CIFAR-10).
      steps_per_level: Langevin steps per level.
      t: run every step at this time (the grid is then ``steps + 1`` copies of ``t``).
    """

    name: ClassVar[str] = "langevin"
    direction: ClassVar[str] = "nondecreasing"
    decodes_data: ClassVar[bool] = False
    step_size: float | None = None
    snr: float = 0.16
    steps_per_level: int = 1
    t: float | None = None

    def __post_init__(self):
        if self.step_size is not None and is_concrete(self.step_size) and not float(self.step_size) > 0:
            raise ValueError(f"step_size must be positive (or None for the SNR rule), got {self.step_size}.")
        if is_concrete(self.snr) and not float(self.snr) > 0:
            raise ValueError(f"snr must be positive (score_sde uses 0.16), got {self.snr}.")
        check_steps(self.steps_per_level, "steps_per_level")

    def needs_key(self) -> bool:
        return True

    def grid(self, model, steps, t0, t1, ts):
        if self.t is not None:
            if ts is not None or t0 is not None or t1 is not None:
                raise ValueError("Langevin(t=...) runs at one fixed time: pass steps, not ts, t0 or t1.")
            g = uniform_grid(self.default_steps if steps is None else steps, self.t, self.t)
            return Grid(g.times, g.first, g.last)
        return super().grid(model, steps, t0, t1, ts)

    def step(self, model, x, inp, key):
        t = inp["t"]
        k = int(self.steps_per_level)
        for j in range(k):  # unrolled: steps_per_level is small
            s = model.score(x, t)
            xi = jax.random.normal(jax.random.fold_in(key, inp["i"] * k + j), x.shape, x.dtype)
            if self.step_size is None:
                x, _ = snr_langevin_step(x, s, xi, self.snr)
            else:
                eta = jnp.asarray(self.step_size, x.dtype)
                x = x + eta * s + jnp.sqrt(2 * eta) * xi
        return x, x


register(EulerMaruyama.name, EulerMaruyama)
register(Langevin.name, Langevin)

__all__ = ["EulerMaruyama", "Langevin", "snr_langevin_step"]
