r"""ODE solvers: integrate ``dX_t/dt = u_t(X_t)`` from noise (t=0) to data (t=1) (notes sec. 2.1).

* :class:`Euler` (notes eq. 2.1.2: ``X_{t+h} = X_t + h u_t(X_t)``), :class:`Midpoint`, :class:`Heun` (explicit
  trapezoid) and :class:`RK4` (the classical fourth-order Runge-Kutta method): fixed steps, written as a
  ``lax.scan`` over the time grid (the fastest form on small problems);
* :class:`Diffrax`: any explicit Runge-Kutta solver of diffrax (``diffrax.Tsit5()``, ``Dopri5``, ``Dopri8``,
  ``Bosh3``, ``Heun``, ...), adaptive with a PID step-size controller or on the fixed grid; by name ``tsit5``,
  ``dopri5``, ``dopri8`` and ``bosh3`` (adaptive).

The step formulas (:func:`euler_step`, :func:`heun_step`, ...) are pure functions of a field ``f(x, t)``, also used
by the EDM sampler and by consistency distillation's teacher step. The field is the model's velocity, decoded from
any parameterisation on the path. Grids may run backwards (``t1 < t0``: data to noise).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

import numpy as np
import jax
import jax.numpy as jnp

from jaxgen._checks import check_time, check_tolerances
from jaxgen.samplers.base import Grid, SampleResult, Segment, Solver, concrete_float, register

Array = jax.Array


# ---------------------------------------------------------------------------------------------------------
# Step formulas.
# ---------------------------------------------------------------------------------------------------------


def _h(x: Array, t, t_next, h):
    return (t_next - t).astype(x.dtype) if h is None else h


def euler_step(f: Callable, x: Array, t, t_next, *, h=None) -> Array:
    r"""Euler (notes eq. 2.1.2): ``x + h f(x, t)``, ``h = t_next - t`` (or the given ``h``, e.g. per sample)."""
    return x + _h(x, t, t_next, h) * f(x, t)


def midpoint_step(f: Callable, x: Array, t, t_next, *, h=None) -> Array:
    r"""Explicit midpoint: ``x + h f(x + h/2 f(x, t), t + h/2)`` (two evaluations, order 2)."""
    h = _h(x, t, t_next, h)
    return x + h * f(x + 0.5 * h * f(x, t), t + 0.5 * h)


def heun_step(f: Callable, x: Array, t, t_next, *, h=None, k1: Array | None = None) -> Array:
    r"""Heun (explicit trapezoid): ``x + h/2 (k_1 + f(x + h k_1, t_next))``, ``k_1 = f(x, t)`` (order 2).

    ``t`` and ``t_next`` are passed to ``f`` as they are (any pytree), so the step also integrates in another
    variable (EDM integrates in ``sigma`` and passes ``h = sigma_next - sigma``). ``k1`` reuses an evaluation
    the caller already made.
    """
    h = _h(x, t, t_next, h) if h is None else h
    k1 = f(x, t) if k1 is None else k1
    return x + 0.5 * h * (k1 + f(x + h * k1, t_next))


def rk4_step(f: Callable, x: Array, t, t_next, *, h=None) -> Array:
    r"""Classical Runge-Kutta (order 4, four evaluations):
    ``x + h/6 (k_1 + 2 k_2 + 2 k_3 + k_4)`` with ``k_1 = f(x, t)``, ``k_2 = f(x + h/2 k_1, t + h/2)``,
    ``k_3 = f(x + h/2 k_2, t + h/2)``, ``k_4 = f(x + h k_3, t + h)``."""
    h = _h(x, t, t_next, h)
    k1 = f(x, t)
    k2 = f(x + 0.5 * h * k1, t + 0.5 * h)
    k3 = f(x + 0.5 * h * k2, t + 0.5 * h)
    k4 = f(x + h * k3, t_next)
    return x + (h / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)


# ---------------------------------------------------------------------------------------------------------
# Fixed-step solvers.
# ---------------------------------------------------------------------------------------------------------


class _FixedStep(Solver):
    """A one-step method on the grid, integrating the model's velocity (either direction)."""

    direction: ClassVar[str] = "monotone"
    formula: ClassVar[Callable] = staticmethod(euler_step)

    def step(self, model, x, inp, key):
        x = type(self).formula(model.velocity, x, inp["t"], inp["t_next"])
        return x, x


@dataclasses.dataclass(frozen=True)
class Euler(_FixedStep):
    """Euler's method (notes eq. 2.1.2), one evaluation per step. NFE = ``steps``."""

    name: ClassVar[str] = "euler"
    formula: ClassVar[Callable] = staticmethod(euler_step)


@dataclasses.dataclass(frozen=True)
class Midpoint(_FixedStep):
    """The explicit midpoint method, two evaluations per step. NFE = ``2 steps``."""

    name: ClassVar[str] = "midpoint"
    formula: ClassVar[Callable] = staticmethod(midpoint_step)


@dataclasses.dataclass(frozen=True)
class Heun(_FixedStep):
    """Heun's method (explicit trapezoid), two evaluations per step. NFE = ``2 steps`` (``- 1`` with ``final_euler``).

    Args:
      final_euler: take the last step with Euler, so the field is never evaluated at ``t1`` (EDM's Algorithm 1;
        needed for data/eps predictions decoded to a velocity where a path coefficient vanishes at ``t1``).
        ``None`` (default): for every field that is not a velocity (decoded by the path).
    """

    name: ClassVar[str] = "heun"
    formula: ClassVar[Callable] = staticmethod(heun_step)
    final_euler: bool | None = None

    def segments(self, model, grid):
        inp = self.step_inputs(model, grid)
        final_euler = model.prediction != "velocity" if self.final_euler is None else self.final_euler
        if not final_euler:
            return [Segment(self.step, inp)]

        def euler(model, x, inp, key):
            x = euler_step(model.velocity, x, inp["t"], inp["t_next"])
            return x, x

        head = jax.tree.map(lambda a: a[:-1], inp)
        tail = jax.tree.map(lambda a: a[-1:], inp)
        return [Segment(self.step, head), Segment(euler, tail)]


@dataclasses.dataclass(frozen=True)
class RK4(_FixedStep):
    """The classical fourth-order Runge-Kutta method, four evaluations per step. NFE = ``4 steps``."""

    name: ClassVar[str] = "rk4"
    formula: ClassVar[Callable] = staticmethod(rk4_step)


# ---------------------------------------------------------------------------------------------------------
# diffrax.
# ---------------------------------------------------------------------------------------------------------

# Adaptive Runge-Kutta methods reachable by name: the diffrax solver class.
ADAPTIVE = ("tsit5", "dopri5", "dopri8", "bosh3")


def diffrax_stages(solver: Any) -> tuple[int, bool]:
    """``(stages, fsal)`` of an explicit Runge-Kutta solver of diffrax, for exact NFE counts:
    ``(stages - fsal) * attempted_steps + fsal`` evaluations (verified with a counting field in the tests)."""
    import diffrax

    if isinstance(solver, diffrax.Euler):
        return 1, False
    if isinstance(solver, diffrax.AbstractERK):
        return int(solver.tableau.num_stages), bool(solver.tableau.fsal)
    raise ValueError(f"jaxgen counts the field evaluations of explicit Runge-Kutta solvers only (diffrax.Euler or an "
                     f"AbstractERK such as Tsit5, Dopri5, Heun), got {type(solver).__name__}.")


def diffrax_solver(solver: Any):
    import diffrax

    if isinstance(solver, str):
        name = {"tsit5": "Tsit5", "dopri5": "Dopri5", "dopri8": "Dopri8", "bosh3": "Bosh3", "euler": "Euler",
                "heun": "Heun", "midpoint": "Midpoint"}.get(solver.lower())
        if name is None:
            raise ValueError(f"unknown diffrax method {solver!r}; use one of {ADAPTIVE} or a diffrax solver object.")
        return getattr(diffrax, name)()
    return solver


def _hoist_closure(fn: Callable, *example) -> tuple[Callable, list]:
    """``(g, consts)`` with ``g(*args, consts) == fn(*args)`` and every array ``fn`` closes over in ``consts``: what
    ``jax.closure_convert`` does, but hoisting integer tracers (labels) as well, which a custom VJP such as diffrax's
    ``BacksolveAdjoint`` must not capture (a tracer of the enclosing ``jit`` would leak into its backward pass)."""
    closed = jax.make_jaxpr(fn)(*example)

    def g(*args):
        *args, consts = args
        return jax.core.eval_jaxpr(closed.jaxpr, consts, *args)[0]

    return g, list(closed.consts)


@dataclasses.dataclass(frozen=True)
class Diffrax(Solver):
    r"""Any explicit Runge-Kutta solver of diffrax, adaptive or on the grid.

    Args:
      solver: a diffrax solver (``diffrax.Tsit5()``, ...) or its name (``"tsit5"``, ``"dopri5"``, ``"dopri8"``,
        ``"bosh3"``).
      adaptive: a PID step-size controller on ``[t0, t1]`` (``rtol``, ``atol``; ``steps``/``ts`` are not used);
        ``False`` steps exactly on the grid (``diffrax.StepTo``).
      rtol, atol: tolerances of the controller.
      max_steps: diffrax's step limit (a solve that needs more raises).
      num_save: with ``save_trajectory``, the number of uniformly spaced times saved by an adaptive solve.
      adjoint: a diffrax adjoint for gradients, used when :func:`~jaxgen.samplers.sample` gets no ``gradient``
        (default ``None``: diffrax's ``RecursiveCheckpointAdjoint()``, exact gradients of the numerical solution).

    ``sample(..., gradient=...)`` picks the adjoint by name instead (not together with ``adjoint``):

    * ``"full"``: ``RecursiveCheckpointAdjoint(checkpoints=max_steps)``, every step stored (``steps`` on a grid;
      ``max_steps`` states allocated by an adaptive solve's backward pass), no recomputation;
    * ``"checkpoint"``: ``RecursiveCheckpointAdjoint()``, about ``sqrt(2 max_steps)`` checkpoints with each step
      recomputed at most once (Stumm & Walther 2010 online checkpointing); the same values and gradients;
    * ``"adjoint"`` (adaptive only): ``BacksolveAdjoint()``, the continuous adjoint of Chen et al. 2018 (Neural
      ODEs, eq. 4-5) solved backwards with the same solver and controller: ``O(1)`` memory, gradients accurate to the
      tolerances. The solve then runs in ``s = (t - t0) / (t1 - t0)`` on ``[0, 1]`` (the same steps on the default
      interval) with ``t0``, ``t1`` and the arrays the field closes over (hoisted from its trace) passed to diffrax as
      ``args``, since the adjoint differentiates only ``y0``, ``args`` and the terms: all four kinds of parameters
      (network, ``x0``, guidance scale, ``t0``/``t1``) get gradients.

    NFE = ``(stages - fsal) * attempted_steps + fsal`` (accepted and rejected steps; exact, checked against a
    counting field), a traced value for adaptive solves.
    """

    name: ClassVar[str] = "diffrax"
    direction: ClassVar[str] = "monotone"
    solver: Any = "tsit5"
    adaptive: bool = True
    rtol: float = 1e-5
    atol: float = 1e-5
    max_steps: int = 4096
    num_save: int = 101
    adjoint: Any = None

    def __post_init__(self):
        check_tolerances(self.rtol, self.atol, self.max_steps, owner="Diffrax")
        if isinstance(self.num_save, bool) or not isinstance(self.num_save, (int, np.integer)) or self.num_save < 2:
            raise ValueError(f"Diffrax: num_save must be an integer >= 2 (saved times of an adaptive solve), got "
                             f"{self.num_save!r}.")

    def takes_steps(self) -> bool:
        return not self.adaptive

    def gradient_modes(self):
        return ("full", "checkpoint", "adjoint") if self.adaptive else ("full", "checkpoint")

    def check_gradient(self, gradient):
        if gradient == "adjoint" and not self.adaptive:
            raise ValueError("gradient='adjoint' (diffrax.BacksolveAdjoint) needs an adaptive solve, whose backward "
                             "solve chooses its own steps: use Diffrax(adaptive=True), or gradient='full' / "
                             "'checkpoint' on a fixed grid.")
        super().check_gradient(gradient)
        if gradient is not None and self.adjoint is not None:
            raise ValueError(f"pass either Diffrax(adjoint=...) or sample(..., gradient={gradient!r}), not both: "
                             "gradient= picks the diffrax adjoint by name.")

    def grid(self, model, steps, t0, t1, ts):
        if not self.adaptive:
            return super().grid(model, steps, t0, t1, ts)
        if ts is not None or steps is not None:
            raise ValueError("an adaptive solver chooses its own steps: pass t0/t1 (not steps or ts), or "
                             "Diffrax(..., adaptive=False) to step on a grid.")
        lo, hi = self.default_interval(model)
        t0, t1 = (lo if t0 is None else t0), (hi if t1 is None else t1)
        times = jnp.stack([jnp.asarray(t0), jnp.asarray(t1)]).astype(model.time_dtype)
        check_time(times, name="(t0, t1)")
        return Grid(times, concrete_float(t0), concrete_float(t1))

    def _adjoint(self, gradient, max_steps):
        import diffrax

        if gradient is None:
            return self.adjoint
        if gradient == "full":
            return diffrax.RecursiveCheckpointAdjoint(checkpoints=max_steps)
        if gradient == "checkpoint":
            return diffrax.RecursiveCheckpointAdjoint()
        return diffrax.BacksolveAdjoint()

    def solve(self, model, x0, grid, key, save_trajectory, unroll=1, gradient=None):
        import diffrax

        solver = diffrax_solver(self.solver)
        stages, fsal = diffrax_stages(solver)
        t0, t1 = grid.times[0], grid.times[-1]
        if self.adaptive:
            save_ts = jnp.linspace(t0, t1, int(self.num_save), dtype=grid.times.dtype)
            controller = diffrax.PIDController(rtol=self.rtol, atol=self.atol)
            max_steps = int(self.max_steps)
        else:
            save_ts = grid.times
            controller = diffrax.StepTo(ts=grid.times)
            max_steps = grid.steps
        adjoint = self._adjoint(gradient, max_steps)
        kwargs = {} if adjoint is None else {"adjoint": adjoint}
        if gradient == "adjoint":  # in s = (t - t0) / (t1 - t0), everything differentiable passed as args (docstring)
            field, consts = _hoist_closure(lambda t, y: model.velocity(y, t), t0, x0)

            def vf(s, y, args):
                a, b, hoisted = args
                return (b - a).astype(y.dtype) * field(a + s * (b - a), y, hoisted)

            term, args = diffrax.ODETerm(vf), (t0, t1, consts)
            span = (jnp.zeros((), grid.times.dtype), jnp.ones((), grid.times.dtype))
            saved = (save_ts - t0) / (t1 - t0)
        else:
            term, args = diffrax.ODETerm(lambda t, y, args: model.velocity(y, t)), None
            span, saved = (t0, t1), save_ts
        saveat = diffrax.SaveAt(ts=saved) if save_trajectory else diffrax.SaveAt(t1=True)
        sol = diffrax.diffeqsolve(term, solver, span[0], span[1], None, x0, args=args, stepsize_controller=controller,
                                  saveat=saveat, max_steps=max_steps, **kwargs)
        n = sol.stats["num_steps"] if self.adaptive else grid.steps
        nfe = (stages - int(fsal)) * n + int(fsal)
        ts = save_ts if (save_trajectory or not self.adaptive) else grid.times
        return SampleResult(sol.ys[-1], nfe, ts, sol.ys if save_trajectory else None)


for _cls in (Euler, Midpoint, Heun, RK4, Diffrax):
    register(_cls.name, _cls)
for _name in ADAPTIVE:
    register(_name, lambda _n=_name, **kw: Diffrax(solver=_n, **kw))

__all__ = ["Euler", "Midpoint", "Heun", "RK4", "Diffrax", "ADAPTIVE", "euler_step", "midpoint_step", "heun_step",
           "rk4_step", "diffrax_stages", "diffrax_solver"]
