r"""DPM-Solver (Lu et al. 2022, noise prediction) and DPM-Solver++ (Lu et al. 2022b, data prediction) on any
Gaussian path. The setting, the grids and the treatment of the path's ends are those of :mod:`jaxgen.samplers.ddim`.

* :class:`DPMSolver`: single-step DPM-Solver-1/2/3.
* :class:`DPMSolverPP`: single-step DPM-Solver++(2S) and multistep DPM-Solver++(2M) and (3M). The multistep
  solvers are the UniPC predictors without corrector (:class:`jaxgen.samplers.UniPC` with ``corrector=False``,
  ``variant="bh2"``): UniP-2 is DPM-Solver++(2M) exactly, and UniP-3 is the third-order multistep predictor that
  meets the order conditions (:func:`jaxgen.samplers.unipc.unipc_order_weights`).

The noise-prediction form (DPM-Solver) multiplies its eps estimates by up to ``alpha_t / alpha_s``: with long first
steps from ``alpha ~ 1e-3`` it amplifies float32 rounding (different parameterisations of the same exact field then
differ by ~1e-3 after 4 steps on ``[1e-3, 1]`` of the linear path, ~4e-6 on VP); DPM-Solver++ (data prediction)
does not, which is why Lu et al. (2022b) recommend it.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp

from jaxgen.samplers.base import Grid, Model, Segment, register
from jaxgen.samplers.ddim import DiffusionSolver, check_order, ddim_update, step_coefficients
from jaxgen.samplers.grids import open_ends, times_from_lambdas

Array = jax.Array

_FRACTIONS = {1: (), 2: (0.5,), 3: (1.0 / 3.0, 2.0 / 3.0)}
_TIMES = ("t_s", "t_s1", "t_s2")  # kept in float32 (the field's time); every other input is cast to x's dtype


def _intermediate_times(path, lam_s: Array, lam_t: Array, fractions: tuple[float, ...]) -> list[Array]:
    """Times at ``lambda_s + r h`` (``h = lambda_t - lambda_s``, float32) for each step ``[s, t]`` and each ``r``
    in ``fractions`` (one vectorised bisection for all of them)."""
    h = lam_t - lam_s
    r = jnp.asarray(fractions, jnp.float32)[:, None]
    times = times_from_lambdas(path, lam_s[None] + r * h[None])
    return [times[k] for k in range(len(fractions))]


def _dpm_solver_update(order: int, model: Model, x: Array, zs_es: tuple[Array, Array], c: dict) -> Array:
    r"""One single-step DPM-Solver-``order`` step from ``s`` to ``t`` (formulas in :class:`DPMSolver`).

    The interior points' actual ``r_k = (lambda_{s_k} - lambda_s) / h`` (of the bisected times) are used, for
    which the formulas hold as well. ``zs_es`` is the decoded field at the start; ``c`` holds the step's path
    coefficients. Requires finite ``lambda_s`` and ``lambda_t``.
    """
    z_s, e_s = zs_es
    a_t, b_t = c["alpha_t"], c["beta_t"]
    if order == 1:
        return ddim_update(z_s, e_s, a_t, b_t)
    lam_s, log_a_s = c["lam_s"], c["log_alpha_s"]
    h = c["lam_t"] - lam_s
    ratio_t = jnp.exp(c["log_alpha_t"] - log_a_s)
    phi_1 = jnp.expm1(h)
    h_1 = c["lam_s1"] - lam_s
    r_1 = h_1 / h
    u_1 = jnp.exp(c["log_alpha_s1"] - log_a_s) * x - c["beta_s1"] * jnp.expm1(h_1) * e_s
    _, e_1 = model.denoise(u_1, c["t_s1"])
    if order == 2:
        return ratio_t * x - b_t * phi_1 * e_s - b_t / (2.0 * r_1) * phi_1 * (e_1 - e_s)
    h_2 = c["lam_s2"] - lam_s
    r_2 = h_2 / h
    phi_22 = jnp.expm1(h_2) / h_2 - 1.0
    u_2 = (jnp.exp(c["log_alpha_s2"] - log_a_s) * x - c["beta_s2"] * jnp.expm1(h_2) * e_s
           - c["beta_s2"] * (r_2 / r_1) * phi_22 * (e_1 - e_s))
    _, e_2 = model.denoise(u_2, c["t_s2"])
    phi_2 = phi_1 / h - 1.0
    return ratio_t * x - b_t * phi_1 * e_s - (b_t / r_2) * phi_2 * (e_2 - e_s)


def _dpm_solver_pp_2s_update(model: Model, x: Array, zs_es: tuple[Array, Array], c: dict) -> Array:
    r"""One DPM-Solver++(2S) step (Lu et al. 2022b, Algorithm 1, data-prediction form), ``r = 1/2``:

    .. math:: u = \frac{\beta_1}{\beta_s} x - \alpha_1 (e^{-r h} - 1) \hat z_s,\qquad
              x_t = \frac{\beta_t}{\beta_s} x
              - \alpha_t (e^{-h} - 1)\Big[\hat z_s + \frac{1}{2r}\big(\hat z(u, s_1) - \hat z_s\big)\Big]
    """
    z_s, _ = zs_es
    b_s, lam_s = c["beta_s"], c["lam_s"]
    h = c["lam_t"] - lam_s
    h_1 = c["lam_s1"] - lam_s
    r_1 = h_1 / h
    u = (c["beta_s1"] / b_s) * x - c["alpha_s1"] * jnp.expm1(-h_1) * z_s
    z_1, _ = model.denoise(u, c["t_s1"])
    d = z_s + (z_1 - z_s) / (2.0 * r_1)
    return (c["beta_t"] / b_s) * x - c["alpha_t"] * jnp.expm1(-h) * d


def _cast(inp: dict, dtype) -> dict:
    return {k: (v if k in _TIMES or v.dtype == jnp.bool_ else v.astype(dtype)) for k, v in inp.items()}


@dataclasses.dataclass(frozen=True)
class _SingleStep(DiffusionSolver):
    """Single-step solvers: DDIM at the open ends of the grid, :meth:`update` (``order`` NFE) elsewhere.

    An end of the grid that is known at trace time gets its DDIM step outside the scan (1 NFE). With an end
    traced under ``jit`` (e.g. ``ts`` a jitted or differentiated argument) every step of order > 1 is checked inside
    the program: where its log-SNR is infinite at an end, the DDIM step (from the same first evaluation) is
    selected, and :meth:`update` runs on finite stand-in coefficients so that neither branch has ``inf`` or NaN in
    its derivative; such a step still costs ``order`` evaluations (counted in ``nfe``).
    """

    def step_order(self) -> int:
        """The number of field evaluations of one :meth:`update` (defined by each single-step solver)."""
        raise NotImplementedError(f"{type(self).__name__} must define step_order().")

    def update(self, model: Model, x: Array, zs_es, c: dict) -> Array:
        """One step of order :meth:`step_order` from ``x`` with the first evaluation ``zs_es`` and the step's
        coefficients ``c`` (defined by each single-step solver)."""
        raise NotImplementedError(f"{type(self).__name__} must define update().")

    def segments(self, model: Model, grid: Grid) -> list[Segment]:
        path, order = model.path, self.step_order()
        times = grid.times
        n = grid.steps
        open_start, open_end = open_ends(path, grid)
        first = 1 if open_start else 0
        last = n - 1 if (open_end and n - 1 >= first) else n  # regular steps are [first, last)
        alpha, beta, log_a, lam = step_coefficients(path, times, jnp.float32)

        def ddim_step(model, x, c, key):
            c = _cast(c, x.dtype)
            z, e = model.denoise(x, c["t_s"])
            x = ddim_update(z, e, c["alpha_t"], c["beta_t"])
            return x, x

        def ddim_inputs(i):
            return {"t_s": times[i:i + 1], "alpha_t": alpha[i + 1:i + 2], "beta_t": beta[i + 1:i + 2]}

        segs = []
        if first == 1:
            segs.append(Segment(ddim_step, ddim_inputs(0)))
        if last > first:
            sl = slice(first, last)
            nxt = slice(first + 1, last + 1)
            inp = {"t_s": times[sl], "alpha_s": alpha[sl], "beta_s": beta[sl], "log_alpha_s": log_a[sl],
                   "lam_s": lam[sl], "alpha_t": alpha[nxt], "beta_t": beta[nxt], "log_alpha_t": log_a[nxt],
                   "lam_t": lam[nxt]}
            checked = order > 1 and (grid.first is None or grid.last is None)
            if order > 1:
                lam_s, lam_t = lam[sl], lam[nxt]
                if checked:  # finite stand-ins (a step of 1 in lambda next to the finite end) where lambda is infinite
                    fin_s, fin_t = jnp.isfinite(lam_s), jnp.isfinite(lam_t)
                    inp["ok"] = fin_s & fin_t
                    lam_s = jnp.where(fin_s, lam_s, jnp.where(fin_t, lam_t - 1.0, 0.0))
                    lam_t = jnp.where(fin_t, lam_t, lam_s + 1.0)
                    inp["lam_s"], inp["lam_t"] = lam_s, lam_t
                    for k in ("log_alpha_s", "log_alpha_t"):
                        inp[k] = jnp.where(jnp.isfinite(inp[k]), inp[k], 0.0)
                for k, tk in enumerate(_intermediate_times(path, lam_s, lam_t, _FRACTIONS[order]), start=1):
                    a_k, b_k, log_a_k, lam_k = step_coefficients(path, tk, jnp.float32)
                    inp.update({f"t_s{k}": tk, f"alpha_s{k}": a_k, f"beta_s{k}": b_k, f"log_alpha_s{k}": log_a_k,
                                f"lam_s{k}": lam_k})

            def regular(model, x, c, key, checked=checked):
                c = _cast(c, x.dtype)
                zs_es = model.denoise(x, c["t_s"])
                x_next = self.update(model, x, zs_es, c)
                if checked:
                    x_next = jnp.where(c["ok"], x_next, ddim_update(*zs_es, c["alpha_t"], c["beta_t"]))
                return x_next, x_next

            segs.append(Segment(regular, inp))
        if last < n:
            segs.append(Segment(ddim_step, ddim_inputs(n - 1)))
        return segs


@dataclasses.dataclass(frozen=True)
class DPMSolver(_SingleStep):
    r"""Single-step DPM-Solver-1/2/3 (Lu et al. 2022), noise-prediction form, on any Gaussian path.

    ``steps`` steps of order ``order`` on the grid; each step ``[s, t]`` evaluates the field at ``s`` and at
    ``order - 1`` interior points placed at the log-SNR fractions ``r_1 = 1/2`` (order 2) or ``r_1 = 1/3, r_2 = 2/3``
    (order 3) of the step, found by bisection (:func:`~jaxgen.samplers.grids.times_from_lambdas`). With
    ``h = lambda_t - lambda_s``, ``r_k = (lambda_{s_k} - lambda_s) / h`` and ``eps_s = eps_hat(x_s, s)`` (Lu et al.
    2022, Algorithms 4-5):

    * order 1: ``x_t = (alpha_t/alpha_s) x_s - beta_t (e^h - 1) eps_s``, i.e. DDIM;
    * order 2: ``u = (alpha_{s_1}/alpha_s) x_s - beta_{s_1} (e^{r_1 h} - 1) eps_s`` and
      ``x_t = (alpha_t/alpha_s) x_s - beta_t (e^h - 1) eps_s - beta_t/(2 r_1) (e^h - 1) (eps_hat(u, s_1) - eps_s)``;
    * order 3: ``u_1`` as ``u``, ``D_1 = eps_hat(u_1, s_1) - eps_s``,
      ``u_2 = (alpha_{s_2}/alpha_s) x_s - beta_{s_2} (e^{r_2 h} - 1) eps_s
      - beta_{s_2} (r_2/r_1) ((e^{r_2 h} - 1)/(r_2 h) - 1) D_1``,
      ``x_t = (alpha_t/alpha_s) x_s - beta_t (e^h - 1) eps_s
      - (beta_t/r_2) ((e^h - 1)/h - 1) (eps_hat(u_2, s_2) - eps_s)``.

    The global error is ``O(h^{order})``. NFE = ``order * steps``, except that a step starting where ``alpha = 0``
    or ending where ``beta = 0`` (e.g. the default interval ``[0, 1]`` of the linear path) is taken with DDIM and
    costs 1 when that end is known at trace time (``order`` for a ``ts`` traced under ``jit``). The paper's "NFE
    budget" variant (mixing orders to hit a budget) is not implemented: choose ``steps`` and ``order``.
    """

    name: ClassVar[str] = "dpm_solver"
    default_steps: ClassVar[int] = 10
    order: int = 3

    def __post_init__(self):
        super().__post_init__()
        check_order(self.order, (1, 2, 3), "dpm_solver")

    def step_order(self):
        return int(self.order)

    def update(self, model, x, zs_es, c):
        return _dpm_solver_update(int(self.order), model, x, zs_es, c)


@dataclasses.dataclass(frozen=True)
class DPMSolverPP(_SingleStep):
    r"""DPM-Solver++ (Lu et al. 2022b), data-prediction form, on any Gaussian path.

    * ``method="multistep"`` (2M, Algorithm 2; 3M): one field evaluation per step; step ``i`` extrapolates the data
      prediction in ``lambda`` from the current and ``order - 1`` previous points (the UniPC predictor UniP-``order``
      without corrector, :class:`~jaxgen.samplers.UniPC`). The first steps have lower order (no history), and with
      ``lower_order_final`` (default) so have the last ones, whatever the number of steps (the reference
      implementations only do it for fewer than 10-15 steps; it keeps few-step sampling stable); a step that ends
      where ``beta = 0`` (``lambda = +inf``) is always first order. NFE = ``steps``. Global error ``O(h^{order})``
      (``O(h^2)`` with a first-order final step).
    * ``method="singlestep"`` (2S, Algorithm 1): each step evaluates at its start and at the log-SNR midpoint
      ``s_1`` (``r = 1/2``): ``u = (beta_{s_1}/beta_s) x - alpha_{s_1} (e^{-r h} - 1) z_s``,
      ``x_t = (beta_t/beta_s) x - alpha_t (e^{-h} - 1) [z_s + (z_hat(u, s_1) - z_s) / (2r)]``;
      NFE = ``2 * steps`` (minus one per open end, as :class:`DPMSolver`). Orders 1 and 2.

    ``order=1`` is DDIM for both methods.
    """

    name: ClassVar[str] = "dpm_solver_pp"
    default_steps: ClassVar[int] = 20
    order: int = 2
    method: str = "multistep"
    lower_order_final: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.method not in ("multistep", "singlestep"):
            raise ValueError(f"dpm_solver_pp method must be 'multistep' (2M, 3M) or 'singlestep' (2S), got "
                             f"{self.method!r}.")
        check_order(self.order, (1, 2, 3) if self.method == "multistep" else (1, 2), "dpm_solver_pp")

    def _multistep(self):
        from jaxgen.samplers.unipc import UniPC

        return UniPC(order=self.order, variant="bh2", corrector=False, lower_order_final=self.lower_order_final,
                     spacing=self.spacing)

    def step_order(self):
        return int(self.order)

    def update(self, model, x, zs_es, c):
        if self.order == 1:
            return ddim_update(*zs_es, c["alpha_t"], c["beta_t"])
        return _dpm_solver_pp_2s_update(model, x, zs_es, c)

    def solve(self, model, x0, grid, key, save_trajectory, unroll=1, gradient=None):
        if self.method == "multistep" and self.order > 1:
            return self._multistep().solve(model, x0, grid, key, save_trajectory, unroll, gradient)
        return super().solve(model, x0, grid, key, save_trajectory, unroll, gradient)


register(DPMSolver.name, DPMSolver)
register(DPMSolverPP.name, DPMSolverPP)

__all__ = ["DPMSolver", "DPMSolverPP"]
