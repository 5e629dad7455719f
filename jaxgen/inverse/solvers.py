r"""Inpainting by replacement, and RePaint, as a solver of :func:`jaxgen.samplers.sample`.

:class:`Inpaint` wraps any one-step solver (its carry is the state: Euler, Midpoint, Heun, RK4, DDIM, single-step
DPM-Solver, Euler-Maruyama, DDPM ancestral sampling, ...). After each inner step ``t -> t'`` it replaces the observed
pixels by the observation noised to the new time (Song et al. 2021, "Score-Based Generative Modeling through
SDEs", App. I.2, score_sde's ``get_pc_inpainter``; Lugmayr et al. 2022, "RePaint", eq. 8):

.. math:: x_{t'} \leftarrow (1 - m) \odot x_{t'} + m \odot (\alpha_{t'} y + \beta_{t'} \xi), \qquad \xi \sim N(0, I),

and with ``resample = U > 1`` resamples as RePaint (Lugmayr et al. 2022, Alg. 1, jump length 1): the step and the
replacement are repeated ``U`` times, and between two repeats the state is noised back from ``t'`` to ``t`` with the
Gaussian transition that keeps the path's marginals (:func:`renoise`),

.. math:: x_t = \frac{\alpha_t}{\alpha_{t'}} x_{t'} + \sqrt{\beta_t^2 - \Big(\frac{\alpha_t \beta_{t'}}{\alpha_{t'}}\Big)^2}
          \,\xi

(the DDPM forward kernel ``q(x_t | x_{t-1}) = N(sqrt(1 - b_t) x_{t-1}, b_t I)`` of the paper, for any Gaussian path).
The known and generated parts are harmonised by the repeated model evaluations. The final state has the observed
pixels exactly equal to ``y``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import numpy as np
import jax
import jax.numpy as jnp

from jaxgen._checks import check_finite, is_concrete, safe_divide
from jaxgen.inverse.operators import MaskOperator, broadcasts_to
from jaxgen.samplers.base import SOLVERS, Grid, Model, SampleResult, Segment, Solver, get_solver

Array = jax.Array


def noise_observation(y: Array, alpha: Array, beta: Array, noise: Array) -> Array:
    r"""The observation on the path at a time of coefficients ``(alpha, beta)``: ``alpha y + beta xi`` (a draw of
    ``p_t(x | x_1 = y)``, the paper's ``x_{t-1}^{known}``, RePaint eq. 8)."""
    return alpha * y + beta * noise


def renoise(x: Array, alpha_from: Array, beta_from: Array, alpha_to: Array, beta_to: Array, noise: Array) -> Array:
    r"""Noise a state from a time ``t'`` back to an earlier (noisier) time ``t`` with the Gaussian transition of the
    path (RePaint Alg. 1 line 11, for any Gaussian path):
    ``x_t = (alpha_t / alpha_t') x_t' + sqrt(beta_t^2 - (alpha_t beta_t' / alpha_t')^2) xi``.

    If ``x_t' ~ p_t'`` then ``x_t ~ p_t`` (the data term ``alpha_t x_1`` and the noise variance ``beta_t^2`` match).
    Guards: the division by ``alpha_t'`` is floored (``alpha_t' = 0`` only at the noise end, where ``alpha_t = 0`` too)
    and the variance is clipped at 0 (a transition to a less noisy time does not exist; it is then deterministic).
    """
    alpha_from, beta_from, alpha_to, beta_to = (jnp.asarray(v, x.dtype) for v in (alpha_from, beta_from, alpha_to,
                                                                                  beta_to))
    ratio = safe_divide(alpha_to, alpha_from)
    var = jnp.maximum(beta_to**2 - (ratio * beta_from) ** 2, 0.0)
    return ratio * x + jnp.sqrt(var) * noise


def usable_solvers() -> list[str]:
    """The registered solvers :class:`Inpaint` can wrap: a carry that is the state (``init`` and ``finish`` of
    :class:`~jaxgen.samplers.Solver`) and the generic step loop (``solve``)."""
    names = []
    for name, factory in sorted(SOLVERS.items()):
        try:
            s = factory()
        except Exception:  # a solver that needs options: not listed
            continue
        if _usable(s):
            names.append(name)
    return names


def _usable(base: Solver) -> bool:
    t = type(base)
    return t.init is Solver.init and t.finish is Solver.finish and t.solve is Solver.solve and base.takes_steps()


@dataclasses.dataclass(frozen=True, eq=False)
class Inpaint(Solver):
    r"""Inpainting with a one-step ``solver``: replacement (score_sde's inpainter) or RePaint (``resample > 1``).

    Args:
      observed: the observation ``y`` (the known pixels; any values where ``mask`` is 0), broadcastable to the
        state ``x0`` of :func:`~jaxgen.samplers.sample` (e.g. ``(B, H, W, C)`` or ``(H, W, C)``).
      mask: 1 = observed, 0 = to inpaint (binary), broadcastable to the state; or a
        :class:`~jaxgen.inverse.MaskOperator`.
      solver: the inner one-step solver (a :class:`~jaxgen.samplers.Solver` or a name), default Euler.
      resample: ``U``, the number of times each step is taken (RePaint's resampling; 1 = plain replacement).

    Each step: for ``r = 0 .. U-1``, take the inner step ``t -> t'``, replace the observed pixels by
    ``alpha_t' y + beta_t' xi``, and, unless ``r = U-1``, noise back to ``t`` (:func:`renoise`). The initial state
    gets the observation noised to ``t0`` (nothing changes in distribution where ``alpha_t0 = 0``), and the last
    state the observation itself. The grid, checks and path are the inner solver's (``steps``, ``ts``, ``t0``,
    ``t1``; increasing only). NFE = ``U`` times the inner solver's. ``sample`` needs a ``key``: the initial
    replacement draws from ``split(key)[0]``; step ``i``, repeat ``r`` splits ``fold_in(fold_in(split(key)[1], i), r)``
    into three keys: the inner step's key, the replacement's noise and the re-noising's noise.

    Example::

        mask = half_mask((8, 8), "left")                      # the left half is observed
        res = sample(field, x0, Inpaint(y, mask, Heun(final_euler=True), resample=5), path="linear", steps=50,
                     key=key)
    """

    name: ClassVar[str] = "inpaint"
    __eq__ = object.__eq__  # identity (the observation is an array): a static argument of jit keyed by the instance
    __hash__ = object.__hash__
    observed: Any = None
    mask: Any = None
    solver: Solver | str = "euler"
    resample: int = 1

    def __post_init__(self):
        base = get_solver(self.solver) if isinstance(self.solver, str) else self.solver
        if not isinstance(base, Solver):
            raise TypeError(f"Inpaint: solver must be a jaxgen Solver or a solver name, got {type(base).__name__}.")
        if isinstance(base, Inpaint) or not _usable(base):
            raise ValueError(f"Inpaint wraps a one-step solver whose carry is the state (it replaces pixels of that "
                             f"state after every step); {type(base).__name__} keeps another carry (a history, a "
                             f"multistep buffer) or chooses its own steps. Use one of: {', '.join(usable_solvers())}.")
        object.__setattr__(self, "solver", base)
        r = self.resample
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r < 1:
            raise ValueError(f"Inpaint: resample must be a positive integer (1 = plain replacement; RePaint uses 10), "
                             f"got {r!r}.")
        object.__setattr__(self, "resample", int(r))
        mask = self.mask.mask if isinstance(self.mask, MaskOperator) else self.mask
        if mask is None or self.observed is None:
            raise ValueError("Inpaint needs the observation and its mask: Inpaint(observed=y, mask=m) with m = 1 on the "
                             "observed pixels (e.g. half_mask((H, W), 'left')).")
        mask = MaskOperator(mask).mask  # binary, floating
        object.__setattr__(self, "mask", mask)
        y = jnp.asarray(self.observed)
        if not jnp.issubdtype(y.dtype, jnp.floating):
            raise ValueError(f"Inpaint: observed must be floating point, got dtype {y.dtype}; pass y.astype(jnp.float32).")
        if is_concrete(y):
            check_finite(jnp.where(mask > 0, y, 0.0), name="the observed pixels",
                         hint="Give finite values where the mask is 1.")
        object.__setattr__(self, "observed", y)

    # -- delegated to the inner solver ---------------------------------------------------------------
    def needs_key(self) -> bool:
        return True

    def takes_steps(self) -> bool:
        return True

    def default_path(self, field):
        return self.solver.default_path(field)

    def process_path(self):
        return self.solver.process_path()

    def default_interval(self, model):
        return self.solver.default_interval(model)

    def gradient_modes(self):
        return self.solver.gradient_modes()

    def check_gradient(self, gradient):
        self.solver.check_gradient(gradient)

    def grid(self, model: Model, steps, t0, t1, ts) -> Grid:
        g = self.solver.grid(model, steps, t0, t1, ts)
        if g.first is not None and g.last is not None and not g.first < g.last:
            raise ValueError(f"Inpaint runs from noise at t0 to data at t1: need t0 < t1 (an increasing grid), got "
                             f"{g.first:g} -> {g.last:g}.")
        return g

    def check(self, model: Model, grid: Grid) -> None:
        if model.path is None:
            raise ValueError("Inpaint noises the observation onto the path (alpha_t y + beta_t xi): pass "
                             "sample(..., path=...) (e.g. path='linear').")
        self.solver.check(model, grid)

    # -- the method ----------------------------------------------------------------------------------
    def _arrays(self, x: Array) -> tuple[Array, Array]:
        shape = tuple(x.shape)
        for name, v in (("observed", self.observed), ("mask", self.mask)):
            if not broadcasts_to(jnp.shape(v), shape):
                raise ValueError(f"Inpaint: {name} of shape {tuple(jnp.shape(v))} does not broadcast to the state of "
                                 f"shape {shape}; give it the shape of the images (B, H, W, C), or of one image.")
        return self.observed.astype(x.dtype), self.mask > 0

    def solve(self, model: Model, x0: Array, grid: Grid, key: Array | None, save_trajectory: bool,
              unroll: int | bool = 1, gradient: str | None = None) -> SampleResult:
        y, m = self._arrays(x0)
        k_init, k_steps = jax.random.split(key)
        a, b = model.path.schedule.values(grid.times[0])
        xi = jax.random.normal(k_init, x0.shape, x0.dtype)
        x0 = jnp.where(m, noise_observation(y, a.astype(x0.dtype), b.astype(x0.dtype), xi), x0)
        return super().solve(model, x0, grid, k_steps, save_trajectory, unroll, gradient)

    def segments(self, model: Model, grid: Grid) -> list[Segment]:
        alpha, beta = model.path.schedule.values(grid.times)
        out, offset = [], 0
        for seg in self.solver.segments(model, grid):
            leaves = jax.tree.leaves(seg.inputs)
            n = int(leaves[0].shape[0]) if leaves else 0
            if n == 0:
                continue
            now, nxt = slice(offset, offset + n), slice(offset + 1, offset + n + 1)
            inp = {"inner": seg.inputs, "i": jnp.arange(offset, offset + n), "alpha": alpha[now], "beta": beta[now],
                   "alpha_next": alpha[nxt], "beta_next": beta[nxt]}
            out.append(Segment(functools.partial(self._step, seg.fn), inp))
            offset += n
        if offset != grid.steps:
            raise ValueError(f"Inpaint: the {self.solver.name} solver's segments take {offset} steps on a grid of "
                             f"{grid.steps}; it cannot be wrapped (its steps do not follow the grid one by one).")
        return out

    def _step(self, inner, model: Model, x: Array, inp: dict, key: Array) -> tuple[Array, Array]:
        y, m = self._arrays(x)
        dt = x.dtype
        a, b, a_next, b_next = (inp[k].astype(dt) for k in ("alpha", "beta", "alpha_next", "beta_next"))
        step_key = jax.random.fold_in(key, inp["i"])

        def attempt(x, r):
            k_inner, k_obs, k_back = jax.random.split(jax.random.fold_in(step_key, r), 3)
            x_next, _ = inner(model, x, inp["inner"], k_inner)
            x_next = x_next.astype(dt)
            known = noise_observation(y, a_next, b_next, jax.random.normal(k_obs, x.shape, dt))
            x_next = jnp.where(m, known, x_next)
            back = renoise(x_next, a_next, b_next, a, b, jax.random.normal(k_back, x.shape, dt))
            return x_next, back

        if self.resample == 1:
            x_next, _ = attempt(x, 0)
            return x_next, x_next

        def body(x, r):
            x_next, back = attempt(x, r)
            return jnp.where(r < self.resample - 1, back, x_next), None

        before = model.count
        x_next, _ = jax.lax.scan(body, x, jnp.arange(self.resample))
        model.count += (self.resample - 1) * (model.count - before)  # the scan traced the inner step once
        return x_next, x_next

    def finish(self, model: Model, carry: Array) -> Array:
        y, m = self._arrays(carry)
        return jnp.where(m, y, carry)


__all__ = ["Inpaint", "renoise", "noise_observation", "usable_solvers"]
