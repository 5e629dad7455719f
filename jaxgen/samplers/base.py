r"""The sampling loop: one entry point, :func:`sample`, driving solver objects.

Every sampler of jaxgen is a :class:`Solver`: a small frozen dataclass that holds the method's options and writes
only what makes the method different -- its time grid, an initial carry, one step, and the map from the final
carry to the sample. :func:`sample` owns everything else: it binds the field's conditioning, decodes the field's
parameterisation (:class:`Model`), builds and validates the grid, runs the steps as ``lax.scan`` loops (one XLA
program), draws the per-step keys, saves the trajectory, and counts the field evaluations (NFE) exactly::

    res = sample(field, x0, Heun(), steps=50)                            # res.x, res.nfe == 100
    res = sample(field, x0, "dpm_solver_pp", path=path, steps=8)         # a solver by name (configs, CLI)
    res = sample(eps_net, x0, DDIM(eta=1.0), path=vp, prediction="eps", key=key, t0=1e-3)

Time runs from ``t0`` (noise; default the path's ``t_min``, or 0) to ``t1`` (data; default ``t_max``, or 1) on
``steps`` steps, or on an explicit grid ``ts``. The grid is float32, or float64 for a float64 state or ``ts`` (with
``jax_enable_x64``), so that derivatives checked by finite differences in float64 are meaningful.

Gradients. ``jax.grad`` flows through every solver, with respect to the field's parameters, ``x0``, anything the
field closes over (a guidance scale) and the time grid (a traced ``ts``, ``t0`` or ``t1``). ``gradient=`` picks the
memory strategy of the backward pass (:data:`GRADIENTS`): ``"full"`` stores every step (plain backpropagation
through ``lax.scan``, memory ``O(N)``), ``"checkpoint"`` stores ``O(sqrt N)`` states and recomputes the steps of one
block at a time (:func:`checkpointed_scan`; same values and gradients, one more forward pass), and ``"adjoint"``
(adaptive diffrax solves only) solves the continuous adjoint equations backwards (``O(1)`` memory, approximate
gradients).

NFE. A solver evaluates the field only through :class:`Model`, which counts its calls while the program is
traced; a step traced once inside a ``lax.scan`` of ``m`` iterations costs ``m`` times its count. The count is
exact for every solver whose evaluations are not skipped at run time (no ``lax.cond`` around a field call; the
adaptive diffrax solvers, whose step count is dynamic, report their own). ``result.nfe`` is a Python ``int``
(a 0-d array once returned from a jitted function). One evaluation is one call of the field on the whole batch
(a guided field on a doubled batch counts once).

Adding a sampler: subclass :class:`Solver`, write ``step`` (and ``grid``, ``init``, ``segments``, ``finish`` where
the defaults do not fit), and register it with :func:`register` to reach it by name.
"""

from __future__ import annotations

import abc
import ast
import dataclasses
import functools
import math
from typing import Any, Callable, ClassVar, NamedTuple

import numpy as np
import jax
import jax.numpy as jnp

from jaxgen._checks import check_finite, check_key, check_time, is_concrete
from jaxgen.fields.algebra import (canonical_prediction, check_data_identifiable, convert, from_data_and_noise,
                                   to_data_and_noise)
from jaxgen.fields.wrappers import change_path
from jaxgen.paths.gaussian import GaussianPath, as_path

Array = jax.Array

# The memory strategies of the backward pass through a sampler (``sample(..., gradient=...)``).
GRADIENTS = ("full", "checkpoint", "adjoint")


class SampleResult(NamedTuple):
    """Output of :func:`sample`.

    Attributes:
      x: the sample at the last time of the grid, shape of ``x0``.
      nfe: the number of field evaluations (each on the whole batch).
      ts: the time grid (for adaptive solvers: the saved times, or ``[t0, t1]``).
      trajectory: the states at ``ts``, shape ``(len(ts),) + x0.shape``, or ``None`` when not requested.
    """

    x: Array
    nfe: Array | int
    ts: Array
    trajectory: Array | None = None


class Grid(NamedTuple):
    """A solver's time grid ``t_0, ..., t_N`` (``N`` steps), with its ends as Python floats when they are known at
    trace time (``None`` for a grid traced under ``jit`` or differentiated)."""

    times: Array
    first: float | None
    last: float | None

    @property
    def steps(self) -> int:
        return int(self.times.shape[0]) - 1


class Segment(NamedTuple):
    """Steps that share one step function: ``fn(model, carry, inputs_i, key) -> (carry, record)`` over the leading
    axis of ``inputs`` (a dict of arrays). One step is called directly; several run in one ``lax.scan``."""

    fn: Callable
    inputs: dict


# ---------------------------------------------------------------------------------------------------------
# The model: the field as the solvers see it.
# ---------------------------------------------------------------------------------------------------------


class Model:
    r"""A field with its conditioning, path and parameterisation: what a solver evaluates.

    Each method is one field evaluation (counted in :attr:`count` while tracing) at ``(x, t)``, ``t`` a scalar or
    ``(B,)``: :meth:`raw` (the field's output), :meth:`velocity`, :meth:`score` and :meth:`denoise` (the pair
    ``(z_hat, eps_hat)`` with ``x = alpha_t z_hat + beta_t eps_hat``), decoded by the field algebra
    (:mod:`jaxgen.fields.algebra`). A velocity field needs no path for :meth:`velocity`, a score field none for
    :meth:`score`; everything else needs the path.
    """

    def __init__(self, field: Callable, path: GaussianPath | None, prediction: str, cond: dict | None,
                 time_dtype=jnp.float32):
        if not callable(field):
            raise TypeError(f"field must be callable as field(x, t, **cond), got {type(field).__name__}.")
        self.field = field
        self.path = path
        self.prediction = prediction
        self.cond = dict(cond or {})
        self.count = 0
        self.time_dtype = time_dtype  # of the grid: float32, or float64 for a float64 state (:func:`time_dtype`)

    def _t(self, x: Array, t) -> Array:
        return jnp.broadcast_to(jnp.asarray(t, x.dtype), (x.shape[0],))

    def raw(self, x: Array, t) -> Array:
        """The field's output at ``(x, t)`` (one evaluation)."""
        self.count += 1
        out = self.field(x, self._t(x, t), **self.cond)
        if getattr(out, "shape", None) != x.shape:
            raise ValueError(f"the field returned shape {getattr(out, 'shape', None)} for x of shape {tuple(x.shape)}; "
                             "a field must return an array of the same shape as x.")
        return out

    def average_velocity(self, x: Array, r, t) -> Array:
        """A flow-map field's average velocity ``u(x, r, t)`` from time ``r`` to ``t`` (one evaluation: the field
        called with two times, :mod:`jaxgen.losses.flow_map`)."""
        self.count += 1
        try:
            out = self.field(x, self._t(x, r), self._t(x, t), **self.cond)
        except TypeError as err:
            raise ValueError(f"the flow_map sampler needs a flow-map field u(x, r, t, **cond) (a FlowMapMLP trained by "
                             f"meanflow_loss or shortcut_loss); calling this field with two times failed ({err}). A "
                             f"velocity field u(x, t) samples with an ODE solver instead, e.g. sampler 'euler'.") from err
        if getattr(out, "shape", None) != x.shape:
            raise ValueError(f"the flow-map field returned shape {getattr(out, 'shape', None)} for x of shape "
                             f"{tuple(x.shape)}; it must return an average velocity of the shape of x.")
        return out

    def _need_path(self, what: str) -> GaussianPath:
        if self.path is None:
            raise ValueError(f"decoding a {self.prediction!r} prediction into {what} needs the path the field was "
                             "trained on: pass sample(..., path=...) (e.g. path='linear').")
        return self.path

    def denoise(self, x: Array, t) -> tuple[Array, Array]:
        """``(z_hat, eps_hat)``: the posterior means of the data and the noise (one evaluation)."""
        out = self.raw(x, t)
        return to_data_and_noise(self._need_path("data and noise"), out, x, self._t(x, t), self.prediction)

    def velocity(self, x: Array, t) -> Array:
        """The marginal velocity ``u_t(x)`` (one evaluation)."""
        out = self.raw(x, t)
        if self.prediction == "velocity":
            return out
        return convert(self._need_path("a velocity"), out, x, self._t(x, t), source=self.prediction, target="velocity")

    def score(self, x: Array, t) -> Array:
        """The marginal score ``grad log p_t(x)`` (one evaluation)."""
        out = self.raw(x, t)
        if self.prediction == "score":
            return out
        return convert(self._need_path("a score"), out, x, self._t(x, t), source=self.prediction, target="score")

    def velocity_and_score(self, x: Array, t) -> tuple[Array, Array]:
        """``(u_t(x), grad log p_t(x))`` from one evaluation."""
        if self.prediction == "velocity" and self.path is None:
            raise ValueError("the score of a velocity field needs the path it was trained on: pass "
                             "sample(..., path=...).")
        z, eps = self.denoise(x, t)
        tb = self._t(x, t)
        return (from_data_and_noise(self.path, z, eps, tb, "velocity"),
                from_data_and_noise(self.path, z, eps, tb, "score"))


# ---------------------------------------------------------------------------------------------------------
# Solvers.
# ---------------------------------------------------------------------------------------------------------


def check_steps(steps, name: str = "steps") -> int:
    """A positive Python integer, or ``ValueError``."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"{name} must be a positive integer, got {steps!r}.")
    return int(steps)


def concrete_float(v) -> float | None:
    """``float(v)`` when ``v`` is known at trace time, else ``None``."""
    return float(np.asarray(v)) if is_concrete(v) else None


def time_dtype(*arrays) -> Any:
    """The dtype of a time grid for these states / grids: float64 when one of them is float64 (with
    ``jax_enable_x64``), else float32 (also for bfloat16 and float16 states, whose times stay float32)."""
    wide = any(a is not None and jnp.asarray(a).dtype == jnp.float64 for a in arrays)
    return jnp.float64 if wide else jnp.float32


def uniform_grid(steps: int, t0, t1, dtype=jnp.float32) -> Grid:
    """``steps + 1`` times from ``t0`` to ``t1``, uniform (``t1 < t0`` runs backwards), in ``dtype``."""
    steps = check_steps(steps)
    check_time(jnp.asarray([t0, t1]), name="(t0, t1)")
    return Grid(jnp.linspace(t0, t1, steps + 1, dtype=dtype), concrete_float(t0), concrete_float(t1))


def explicit_grid(ts, *, direction: str = "increasing", dtype=None) -> Grid:
    """A user's grid ``ts`` (1-D, at least 2 times in ``[0, 1]``), checked to be ``direction`` when concrete:
    ``"increasing"`` (noise to data), ``"monotone"`` (either way) or ``"nondecreasing"``. In ``dtype``, by default
    float32, or float64 for a float64 ``ts`` (kept, so that its derivatives are float64's)."""
    ts = jnp.asarray(ts)
    ts = ts.astype(time_dtype(ts) if dtype is None else dtype)
    if ts.ndim != 1 or ts.shape[0] < 2:
        raise ValueError(f"a time grid ts must be a 1-D array of at least 2 times, got shape {tuple(ts.shape)}.")
    check_time(ts, name="ts")
    if not is_concrete(ts):
        return Grid(ts, None, None)
    arr = np.asarray(ts, np.float64)
    d = np.diff(arr)
    ok = {"increasing": np.all(d > 0), "nondecreasing": np.all(d >= 0),
          "monotone": np.all(d > 0) or np.all(d < 0)}[direction]
    if not ok:
        what = {"increasing": "strictly increasing", "nondecreasing": "non-decreasing",
                "monotone": "strictly monotone"}[direction]
        raise ValueError(f"ts must be {what}: jaxgen samples from noise (t=0) to data (t=1); if your grid comes from "
                         "a diffusion code base (tau=0 is data), pass 1 - tau.")
    return Grid(ts, float(arr[0]), float(arr[-1]))


@dataclasses.dataclass(frozen=True)
class Solver(abc.ABC):
    """A sampler for :func:`sample`: options as dataclass fields, the method in a few small methods.

    Class attributes a solver sets:
      name: its registry name.
      default_steps: ``steps`` when neither ``steps`` nor ``ts`` is given.
      direction: the grids it accepts: ``"increasing"`` (noise to data), ``"monotone"`` (ODE solvers also run
        backwards) or ``"nondecreasing"``.
      decodes_data: whether it needs the data estimate ``z_hat`` at the first time, which an eps or score
        prediction does not determine where ``alpha_t = 0`` (:meth:`check` then asks for ``t0 > 0``).
    """

    name: ClassVar[str] = "solver"
    default_steps: ClassVar[int] = 100
    direction: ClassVar[str] = "increasing"
    decodes_data: ClassVar[bool] = True

    # -- options -------------------------------------------------------------------------------------
    def needs_key(self) -> bool:
        """Whether the solver draws noise (then :func:`sample` requires ``key``)."""
        return False

    def takes_steps(self) -> bool:
        """Whether the solver steps on a grid (``steps``/``ts``); adaptive solvers choose their own steps."""
        return True

    def default_path(self, field: Callable) -> GaussianPath | None:
        """The path to decode the field on when :func:`sample` gets none (e.g. a consistency function's own)."""
        return None

    def process_path(self) -> GaussianPath | None:
        """The path of the process the solver is defined for (a DDPM chain's, a score SDE's), or ``None`` for a solver
        of any path. :func:`sample` moves a field of another path onto it (:func:`jaxgen.fields.change_path`)."""
        return None

    # -- the grid ------------------------------------------------------------------------------------
    def default_interval(self, model: Model) -> tuple[float, float]:
        """``(t0, t1)`` when not given: the path's domain, or ``[0, 1]``."""
        if model.path is None:
            return 0.0, 1.0
        return float(model.path.schedule.t_min), float(model.path.schedule.t_max)

    def grid(self, model: Model, steps, t0, t1, ts) -> Grid:
        """The time grid: ``ts``, or ``steps`` uniform steps from ``t0`` to ``t1`` (in ``model.time_dtype``)."""
        if ts is not None:
            return explicit_grid(ts, direction=self.direction, dtype=model.time_dtype)
        lo, hi = self.default_interval(model)
        t0 = lo if t0 is None else t0
        t1 = hi if t1 is None else t1
        g = uniform_grid(self.default_steps if steps is None else steps, t0, t1, model.time_dtype)
        if self.direction == "increasing" and g.first is not None and g.last is not None and not g.first < g.last:
            raise ValueError(f"need t0 < t1 (this sampler runs from noise at t0 to data at t1), got t0={t0}, t1={t1}.")
        return g

    def gradient_modes(self) -> tuple[str, ...]:
        """The values of ``sample(..., gradient=...)`` the solver supports (default: ``"full"`` and ``"checkpoint"``,
        the two ways of backpropagating through the step loops)."""
        return ("full", "checkpoint")

    def check_gradient(self, gradient: str | None) -> None:
        """``ValueError`` for a ``gradient`` the solver does not support (called by :func:`sample` before any work)."""
        if gradient is None or gradient in self.gradient_modes():
            return
        if gradient == "adjoint":
            raise ValueError(f"gradient='adjoint' is the continuous adjoint (diffrax.BacksolveAdjoint) of an adaptive "
                             f"diffrax solve (e.g. solver='tsit5'); the {self.name} sampler backpropagates through its "
                             "steps: use gradient='full', or gradient='checkpoint' for O(sqrt(steps)) memory.")
        raise ValueError(f"the {self.name} sampler supports gradient={' or '.join(map(repr, self.gradient_modes()))}, "
                         f"got {gradient!r}.")

    def check(self, model: Model, grid: Grid) -> None:
        """Input checks that need the grid (default: an eps/score prediction must not be decoded where
        ``alpha ~ 0``)."""
        if self.decodes_data and grid.first is not None and model.path is not None:
            check_data_identifiable(model.path, model.prediction, grid.first, what=f"the {self.name} sampler")

    # -- the method ----------------------------------------------------------------------------------
    def init(self, model: Model, x0: Array, grid: Grid) -> Any:
        """The initial carry (default: the state ``x0``)."""
        return x0

    def segments(self, model: Model, grid: Grid) -> list[Segment]:
        """The steps, as segments of equal step functions (default: :meth:`step` on every interval)."""
        return [Segment(self.step, self.step_inputs(model, grid))]

    def step_inputs(self, model: Model, grid: Grid) -> dict:
        """Per-step inputs of the default segment: ``i``, ``t`` (left end) and ``t_next``."""
        t = grid.times
        return {"i": jnp.arange(grid.steps), "t": t[:-1], "t_next": t[1:]}

    def step(self, model: Model, carry: Any, inp: dict, key: Array | None) -> tuple[Any, Array]:
        """One step: ``(carry, record)``, ``record`` the state saved in the trajectory after the step."""
        raise NotImplementedError(f"{type(self).__name__} must define step() or segments().")

    def finish(self, model: Model, carry: Any) -> Array:
        """The sample from the final carry (default: the carry itself)."""
        return carry

    def trajectory(self, x0: Array, records: list[Array], x: Array) -> Array:
        """The saved states at the grid times: ``x0`` and one record per step (default)."""
        return jnp.concatenate([x0[None], *records], axis=0)

    def solve(self, model: Model, x0: Array, grid: Grid, key: Array | None, save_trajectory: bool,
              unroll: int | bool = 1, gradient: str | None = None) -> SampleResult:
        """Run the segments (the generic loop; the adaptive solvers override it): each segment of several steps as
        one ``lax.scan``, or as a :func:`checkpointed_scan` with ``gradient="checkpoint"``."""
        scan = checkpointed_scan if gradient == "checkpoint" else jax.lax.scan
        nfe = 0
        before = model.count
        carry = self.init(model, x0, grid)
        nfe += model.count - before
        records = []
        for seg in self.segments(model, grid):
            leaves = jax.tree.leaves(seg.inputs)
            m = int(leaves[0].shape[0]) if leaves else 0
            if m == 0:
                continue
            if m == 1:
                before = model.count
                new, rec = seg.fn(model, carry, jax.tree.map(lambda a: a[0], seg.inputs), key)
                carry = _keep_dtypes(new, carry)
                nfe += model.count - before
                if save_trajectory:
                    records.append(rec[None])
                continue
            per_step = [0]

            def body(c, inp, fn=seg.fn, per_step=per_step):
                start = model.count
                new, rec = fn(model, c, inp, key)
                per_step[0] = model.count - start  # the last trace's count (a retrace recounts)
                return _keep_dtypes(new, c), (rec if save_trajectory else None)

            carry, rec = scan(body, carry, seg.inputs, unroll=unroll)
            nfe += per_step[0] * m
            if save_trajectory:
                records.append(rec)
        before = model.count
        x = self.finish(model, carry)
        nfe += model.count - before
        traj = self.trajectory(x0, records, x) if save_trajectory else None
        return SampleResult(x, int(nfe), grid.times, traj)


def checkpointed_scan(f: Callable, init: Any, xs: Any, *, unroll: int | bool = 1) -> tuple[Any, Any]:
    r"""``lax.scan(f, init, xs)`` whose reverse-mode derivative stores ``O(sqrt(n))`` carries instead of ``n``.

    Two-level checkpointing (Griewank 1992, "Achieving logarithmic growth of temporal and spatial complexity in
    reverse automatic differentiation"; Chen et al. 2016, "Training deep nets with sublinear memory cost"):
    the ``n`` steps run as a scan over ``n // k`` blocks of ``k = round(sqrt(n))`` steps, each block an inner scan
    wrapped in ``jax.checkpoint``. The backward pass keeps only the carry at each block's start and, block by block
    from the last, recomputes the block's forward pass to get its residuals: peak memory ``O(n / k + k)`` carries and
    step residuals, ``O(sqrt(n))``, for one extra forward pass. The ``n mod k < k`` remaining steps run as a last,
    also checkpointed, scan.

    The steps, their order and their arithmetic are those of ``lax.scan`` (``f`` is traced once), so values and
    gradients equal the plain scan's; ``unroll`` applies to the inner scans. Stacked outputs come back in step order.
    """
    leaves = jax.tree.leaves(xs)
    n = int(leaves[0].shape[0]) if leaves else 0
    k = max(1, int(round(math.sqrt(n))))
    blocks = n // k
    if blocks < 2 or k < 2:  # nothing to nest (n < 4): a plain scan
        return jax.lax.scan(f, init, xs, unroll=unroll)
    main = blocks * k

    @functools.partial(jax.checkpoint, prevent_cse=False)  # inside a scan, CSE cannot undo the recomputation
    def block(carry, xb):
        return jax.lax.scan(f, carry, xb, unroll=unroll)

    head = jax.tree.map(lambda a: a[:main].reshape((blocks, k) + a.shape[1:]), xs)
    carry, ys = jax.lax.scan(block, init, head)
    ys = jax.tree.map(lambda a: a.reshape((main,) + a.shape[2:]), ys)
    if main == n:
        return carry, ys
    carry, ys_tail = block(carry, jax.tree.map(lambda a: a[main:], xs))
    return carry, jax.tree.map(lambda a, b: jnp.concatenate([a, b], axis=0), ys, ys_tail)


def _keep_dtypes(new: Any, old: Any) -> Any:
    """The carry after a step in the dtypes it had before: a state in ``bfloat16`` stays ``bfloat16`` when the field
    or the step's coefficients compute in ``float32`` (``lax.scan`` needs a carry of fixed type)."""
    return jax.tree.map(lambda a, b: a.astype(b.dtype) if hasattr(a, "astype") and a.dtype != b.dtype else a,
                        new, old)


# ---------------------------------------------------------------------------------------------------------
# The entry point.
# ---------------------------------------------------------------------------------------------------------


def sample(
    field: Callable,
    x0: Array,
    solver: Solver | str = "euler",
    *,
    path: GaussianPath | str | None = None,
    prediction: str = "velocity",
    steps: int | None = None,
    ts: Array | None = None,
    t0: float | None = None,
    t1: float | None = None,
    key: Array | None = None,
    cond: dict | None = None,
    save_trajectory: bool = False,
    unroll: int | bool = 1,
    gradient: str | None = None,
) -> SampleResult:
    r"""Sample by integrating a field from noise ``x0`` (at ``t0``) to data (at ``t1``) with ``solver``.

    Args:
      field: any callable ``field(x, t, **cond)`` with ``x`` of shape ``(B, ...)`` and ``t`` of shape ``(B,)``: a
        Flax NNX module, a plain function, the oracle's fields.
      x0: the initial states ``(B, ...)``, e.g. ``path.sample_prior(key, shape)``.
      solver: a :class:`Solver` (``Euler()``, ``DPMSolverPP(order=3)``, ...) or a name with options
        (``"heun"``, ``"dpm_solver_pp:order=3"``; see :func:`get_solver`).
      path: the :class:`~jaxgen.paths.GaussianPath` (or schedule name) the field was trained on; needed to decode
        a parameterisation other than the one the solver uses, and by the diffusion solvers. The solvers of one
        process (DDPM ancestral sampling, score_sde's predictor-corrector) use their own path by default, and move a
        field of another path onto it (:func:`jaxgen.fields.change_path`).
      prediction: what the field predicts: ``velocity`` | ``score`` | ``eps`` | ``data`` | ``v`` (or an alias).
      steps: the number of steps (default: the solver's). Ignored when ``ts`` is given.
      ts: an explicit time grid ``t_0 .. t_N`` (``N`` steps).
      t0, t1: the interval (default: the path's domain ``[t_min, t_max]``, or ``[0, 1]`` without a path).
      key: PRNG key, required by stochastic solvers (Euler-Maruyama, Langevin, DDPM, DDIM with ``eta > 0``, ...);
        step ``i`` draws from ``fold_in(key, i)``.
      cond: conditioning keywords passed to the field (e.g. ``{"y": labels}``).
      save_trajectory: also return the states at every grid time.
      unroll: ``lax.scan``'s ``unroll`` of the step loops.
      gradient: the memory strategy of ``jax.grad`` through the sampler (:data:`GRADIENTS`; the forward pass and the
        values are the same for all): ``"full"`` stores every step (plain backpropagation, memory ``O(steps)``);
        ``"checkpoint"`` stores ``O(sqrt(steps))`` states and recomputes the rest (:func:`checkpointed_scan`; the
        same gradients); ``"adjoint"`` (adaptive :class:`~jaxgen.samplers.Diffrax` only) the continuous adjoint,
        ``O(1)`` memory and approximate gradients. ``None`` (default): ``"full"``, or for :class:`Diffrax` its
        ``adjoint`` (diffrax's default checkpointing). Diffrax maps the names to its own adjoints (:class:`Diffrax`).

    Returns:
      :class:`SampleResult` ``(x, nfe, ts, trajectory)`` with the exact number of field evaluations.

    Call it inside ``jax.jit`` when you call it repeatedly (eagerly, each call traces and compiles its loops
    anew). Gradients flow through every solver (``jax.grad`` with respect to the field's parameters, ``x0``, what the
    field closes over, and a traced ``ts``, ``t0`` or ``t1``); with ``x0`` (or ``ts``) in float64 the grid is float64.
    """
    solver = get_solver(solver) if isinstance(solver, str) else solver
    if not isinstance(solver, Solver):
        raise TypeError(f"solver must be a jaxgen Solver or a solver name (one of {sorted(SOLVERS)}), got "
                        f"{type(solver).__name__}.")
    if not callable(field):
        raise TypeError(f"sample() needs a field callable as field(x, t, **cond) (a model, a function), got "
                        f"{type(field).__name__}.")
    prediction = canonical_prediction(prediction)
    path = solver.default_path(field) if path is None else as_path(path)
    process = solver.process_path()
    if process is not None:  # a solver of one process samples a field of any path, moved onto the process's path
        if path is not None and not path.same_as(process):
            field = change_path(field, source=path, target=process, prediction=prediction)
        path = process
    x0 = jnp.asarray(x0)
    if x0.ndim < 1:
        raise ValueError("x0 must have a leading batch axis (B, ...), got a scalar; reshape it to (1, ...).")
    if not jnp.issubdtype(x0.dtype, jnp.floating):
        raise ValueError(f"x0 must be floating point, got dtype {x0.dtype}; pass x0.astype(jnp.float32).")
    check_finite(x0, name="x0", hint="Draw it from the prior, e.g. path.sample_prior(key, shape).")  # jit pays nothing
    if ts is not None and steps is not None:
        raise ValueError("pass either steps (a uniform grid from t0 to t1) or ts (an explicit grid), not both.")
    if solver.needs_key() and key is None:
        raise ValueError(f"the {solver.name} sampler draws fresh noise: pass key=jax.random.key(...).")
    if key is not None:
        check_key(key, owner="sample()")
    if not isinstance(unroll, bool) and (not isinstance(unroll, (int, np.integer)) or unroll < 1):
        raise ValueError(f"unroll must be a positive integer (or True: unroll fully), got {unroll!r}.")
    if gradient is not None and gradient not in GRADIENTS:
        raise ValueError(f"gradient must be one of {GRADIENTS} (the memory strategy of jax.grad through the sampler: "
                         f"'full' stores every step, 'checkpoint' O(sqrt(steps)) of them), got {gradient!r}.")
    solver.check_gradient(gradient)
    model = Model(field, path, prediction, cond, time_dtype=time_dtype(x0, ts))
    grid = solver.grid(model, steps, t0, t1, ts)
    if grid.times.dtype != model.time_dtype and model.time_dtype == jnp.float64:  # a solver's own float32 grid
        grid = grid._replace(times=grid.times.astype(jnp.float64))
    solver.check(model, grid)
    return solver.solve(model, x0, grid, key, bool(save_trajectory), unroll, gradient)


# ---------------------------------------------------------------------------------------------------------
# Solvers by name.
# ---------------------------------------------------------------------------------------------------------

SOLVERS: dict[str, Callable[..., Solver]] = {}


def register(name: str, factory: Callable[..., Solver]) -> None:
    """Make ``factory(**options)`` reachable as ``get_solver(name)`` (and from configs and the CLI)."""
    SOLVERS[str(name).lower()] = factory


def _parse_value(text: str) -> Any:
    text = text.strip()
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    if low in ("nan", "inf", "+inf", "-inf"):
        return float(low)  # checked by the solver like any other number
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parse_solver_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"name:key=value,key=value"`` -> ``(name, options)`` (values as Python literals; bare words as strings)."""
    name, _, rest = str(spec).partition(":")
    options = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        if "=" not in item:
            raise ValueError(f"solver option {item!r} in {spec!r} must look like key=value, e.g. 'dpm_solver_pp:order=3'.")
        k, v = item.split("=", 1)
        options[k.strip()] = _parse_value(v)
    return name.strip().lower().replace("-", "_"), options


def get_solver(spec: str | Solver, **options) -> Solver:
    """A solver by name, with options: ``get_solver("dpm_solver_pp", order=3)`` or
    ``get_solver("dpm_solver_pp:order=3,method=multistep")``. A :class:`Solver` is returned as it is (with
    ``options`` applied by ``dataclasses.replace``)."""
    if isinstance(spec, Solver):
        return dataclasses.replace(spec, **options) if options else spec
    name, parsed = parse_solver_spec(spec)
    if name not in SOLVERS:
        raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(sorted(SOLVERS))} (options as "
                         "'name:key=value,...', e.g. 'dpm_solver_pp:order=3').")
    parsed.update(options)
    try:
        return SOLVERS[name](**parsed)
    except TypeError as err:
        factory = SOLVERS[name]
        fields = [f.name for f in dataclasses.fields(factory)] if dataclasses.is_dataclass(factory) else []
        raise ValueError(f"bad options {parsed} for sampler {name!r} ({err}); its options are: "
                         f"{', '.join(fields) or 'none'}.") from None


__all__ = ["sample", "SampleResult", "Solver", "Model", "Grid", "Segment", "SOLVERS", "GRADIENTS", "register",
           "get_solver", "parse_solver_spec", "uniform_grid", "explicit_grid", "check_steps", "checkpointed_scan",
           "time_dtype"]
