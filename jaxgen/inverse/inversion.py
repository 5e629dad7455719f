r"""Inversion: the deterministic sampler run backwards, from data to the noise that regenerates it.

The probability-flow ODE ``dx/dt = u_t(x)`` is a bijection between ``t1`` (data) and ``t0`` (noise); integrating it
from ``t1`` down to ``t0`` encodes a data point ``x1`` into the noise ``x0`` that the same sampler maps back to
``x1`` (DDIM inversion: Song et al. 2021, "Denoising Diffusion Implicit Models", sec. 4.3 and eq. 14; Dhariwal &
Nichol 2021, App. F; for flows, Liu et al. 2023 and Lipman et al. 2023). :func:`invert` runs any deterministic
fixed-step solver backwards on the same grid reversed; :func:`round_trip_error` inverts and regenerates and reports
the mean absolute error per coordinate, which measures the discretisation error of the pair (it vanishes at the
solver's order as the steps grow: Euler 1, Heun 2, RK4 4).

Which solvers run backwards. The ODE solvers (:class:`~jaxgen.samplers.Euler`, ``Midpoint``, ``Heun``, ``RK4``,
``Diffrax``) accept decreasing grids (``direction = "monotone"``). :class:`~jaxgen.samplers.DDIM` with ``eta = 0``
is the exact DDIM inversion when run on a decreasing grid (``x_{i+1} = alpha_{i+1} z_hat(x_i) + beta_{i+1}
eps_hat(x_i)``, the field evaluated at the data-side end of each step), but ``ddim.py`` builds increasing grids only
(``DiffusionSolver.grid`` calls ``diffusion_grid``, which refuses ``t0 > t1``, and ``direction`` is
``"increasing"``); here a private subclass flips its grid (:class:`ReversedDDIM`), with no change to ``ddim.py``.

The ends of the path. Velocity (and v) fields on the linear path are finite on the whole ``[0, 1]``: invert
down to ``t0 = 0``. An eps or score field does not determine the data at ``alpha_t = 0`` (t=0 of linear, cosine,
...), where the backward step would divide by ``alpha``: invert down to ``t0 = 1e-3`` (and regenerate from the
same ``t0``; :func:`invert` raises otherwise). A data (x0) field does not determine the noise at ``beta = 0``
(t=1): Heun and RK4 evaluate there at the first backward step; start the inversion at ``t1 = 1 - 1e-3``, or use
Euler or DDIM.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar

import jax
import jax.numpy as jnp

from jaxgen.fields.algebra import canonical_prediction, check_data_identifiable
from jaxgen.paths.gaussian import GaussianPath, as_path
from jaxgen.samplers.base import Grid, Model, Solver, explicit_grid, get_solver, sample
from jaxgen.samplers.ddim import DDIM

Array = jax.Array

BACKWARD_SOLVERS = ("euler", "midpoint", "heun", "rk4", "diffrax (fixed or adaptive)", "ddim (eta=0)")


@dataclasses.dataclass(frozen=True)
class ReversedDDIM(DDIM):
    """Deterministic DDIM on a decreasing grid (DDIM inversion, Song et al. 2021 sec. 4.3): the grid of
    :class:`~jaxgen.samplers.DDIM` from ``t1`` (noise end, as :func:`invert` passes it) to ``t0`` (data end), reversed.
    Each step evaluates the field at its data-side end and moves to the noisier time with DDIM's update."""

    name: ClassVar[str] = "ddim_inversion"
    direction: ClassVar[str] = "monotone"

    def __post_init__(self):
        super().__post_init__()
        if not (isinstance(self.eta, (int, float)) and self.eta == 0):
            raise ValueError(f"DDIM inversion is deterministic: eta must be 0, got {self.eta!r}.")

    def grid(self, model: Model, steps, t0, t1, ts) -> Grid:
        if ts is not None:
            return explicit_grid(ts, direction="monotone", dtype=model.time_dtype)
        g = super().grid(model, steps, t1, t0, None)  # increasing, noise end -> data end
        return Grid(g.times[::-1], g.last, g.first)


def _backward_solver(solver: Solver | str) -> Solver:
    solver = get_solver(solver) if isinstance(solver, str) else solver
    if not isinstance(solver, Solver):
        raise TypeError(f"solver must be a jaxgen Solver or a solver name, got {type(solver).__name__}.")
    if isinstance(solver, ReversedDDIM):
        return solver
    if type(solver) is DDIM:
        if not (isinstance(solver.eta, (int, float)) and solver.eta == 0):
            raise ValueError(f"inversion needs a deterministic sampler: DDIM(eta={solver.eta!r}) draws noise; use "
                             "DDIM(eta=0).")
        return ReversedDDIM(spacing=solver.spacing)
    if solver.direction != "monotone" or solver.needs_key():
        raise ValueError(f"the {solver.name} sampler cannot run backwards (data to noise); invert with one of: "
                         f"{', '.join(BACKWARD_SOLVERS)}.")
    return solver


def _interval(path: GaussianPath | None, t0, t1) -> tuple:
    lo, hi = (0.0, 1.0) if path is None else (float(path.schedule.t_min), float(path.schedule.t_max))
    return (lo if t0 is None else t0), (hi if t1 is None else t1)


def invert(field: Callable, x1: Array, solver: Solver | str = "heun", *, steps: int | None = None,
           ts: Array | None = None, path: GaussianPath | str | None = None, prediction: str = "velocity",
           t0: float | None = None, t1: float | None = None, cond: dict | None = None) -> Array:
    r"""The noise ``x0`` that ``solver`` maps to the data ``x1``: the sampler run backwards from ``t1`` to ``t0``.

    Args:
      field, path, prediction, cond: as :func:`~jaxgen.samplers.sample`.
      x1: the data ``(B, ...)``.
      solver: a deterministic solver that runs backwards: Euler, Midpoint, Heun, RK4, Diffrax, or DDIM with
        ``eta = 0`` (a :class:`~jaxgen.samplers.Solver` or a name).
      steps: the number of steps, on the sampler's grid from ``t0`` to ``t1`` (uniform in ``t``, or DDIM's
        ``spacing``), traversed from ``t1`` to ``t0``; or ``ts``, an explicit grid of the forward sampler
        (increasing), traversed backwards.
      t0, t1: the noise and the data end (default: the path's domain, or ``[0, 1]``); regenerate with the same
        ones. Eps or score fields on paths with ``alpha_0 = 0`` need ``t0 > 0`` (e.g. ``1e-3``).

    Returns:
      ``x0``, the shape of ``x1``: ``sample(field, x0, solver, t0=t0, t1=t1, steps=steps, ...)`` returns ``x1`` up to
      the discretisation error (:func:`round_trip_error`).
    """
    backward = _backward_solver(solver)
    prediction = canonical_prediction(prediction)
    path = None if path is None else as_path(path)
    t0, t1 = _interval(path, t0, t1)
    if path is not None:
        check_data_identifiable(path, prediction, t0, what="inversion (its last step decodes the data there)",
                                fix="invert down to t0=1e-3 and regenerate from the same t0, or use a velocity, "
                                    "data or v field")
    if ts is not None:
        ts = jnp.asarray(ts)[::-1]
        return sample(field, x1, backward, ts=ts, path=path, prediction=prediction, cond=cond).x
    return sample(field, x1, backward, steps=steps, t0=t1, t1=t0, path=path, prediction=prediction, cond=cond).x


def round_trip_error(field: Callable, x1: Array, solver: Solver | str = "heun", steps: int | None = None, *,
                     ts: Array | None = None, path: GaussianPath | str | None = None, prediction: str = "velocity",
                     t0: float | None = None, t1: float | None = None, cond: dict | None = None) -> Array:
    r"""Invert ``x1`` to noise and regenerate it with the same solver and grid: the mean absolute error per
    coordinate, ``mean |sample(invert(x1)) - x1|`` (a scalar). Arguments as :func:`invert`."""
    forward = get_solver(solver) if isinstance(solver, str) else solver
    if isinstance(forward, ReversedDDIM):
        forward = DDIM(spacing=forward.spacing)
    x0 = invert(field, x1, forward, steps=steps, ts=ts, path=path, prediction=prediction, t0=t0, t1=t1, cond=cond)
    path = None if path is None else as_path(path)
    lo, hi = _interval(path, t0, t1)
    if ts is not None:
        x = sample(field, x0, forward, ts=ts, path=path, prediction=prediction, cond=cond).x
    else:
        x = sample(field, x0, forward, steps=steps, t0=lo, t1=hi, path=path, prediction=prediction, cond=cond).x
    return jnp.mean(jnp.abs(x - x1))


__all__ = ["invert", "round_trip_error", "ReversedDDIM", "BACKWARD_SOLVERS"]
