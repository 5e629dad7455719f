"""Samplers: one entry point, :func:`sample`, with solver objects.

ODE: :class:`Euler`, :class:`Midpoint`, :class:`Heun`, :class:`RK4` and any diffrax solver (:class:`Diffrax`,
adaptive ``tsit5``/``dopri5``/``dopri8``/``bosh3``); SDE: :class:`EulerMaruyama` with any noise level,
:class:`Langevin`, score_sde's :class:`PredictorCorrector`, :class:`DDPMAncestral`; the fast diffusion samplers
:class:`DDIM`, :class:`DPMSolver`, :class:`DPMSolverPP` (2S, 2M, 3M), :class:`UniPC`, :class:`EDM`; and
:class:`ConsistencyMultistep` and :class:`FlowMap` (jumps of a flow-map field). Every solver is reachable by name (:func:`get_solver`, :data:`SOLVERS`).
"""

from jaxgen.samplers.base import (SOLVERS, Grid, Model, SampleResult, Segment, Solver, get_solver, parse_solver_spec,
                                  register, sample)
from jaxgen.samplers.consistency import ConsistencyMultistep
from jaxgen.samplers.ddim import DDIM, DiffusionSolver, ddim_noise_scale, ddim_update
from jaxgen.samplers.ddpm import DDPMAncestral
from jaxgen.samplers.dpm_solver import DPMSolver, DPMSolverPP
from jaxgen.samplers.edm import EDM
from jaxgen.samplers.flow_map import FlowMap
from jaxgen.samplers.grids import karras_sigmas
from jaxgen.samplers.ode import RK4, Diffrax, Euler, Heun, Midpoint
from jaxgen.samplers.score_sde import PredictorCorrector, pc_nfe
from jaxgen.samplers.sde import EulerMaruyama, Langevin
from jaxgen.samplers.unipc import UniPC

__all__ = [
    "sample", "SampleResult", "Solver", "Model", "Grid", "Segment", "SOLVERS", "get_solver", "parse_solver_spec",
    "register", "Euler", "Midpoint", "Heun", "RK4", "Diffrax", "EulerMaruyama", "Langevin", "PredictorCorrector",
    "DDPMAncestral", "DDIM", "DPMSolver", "DPMSolverPP", "UniPC", "EDM", "ConsistencyMultistep", "FlowMap", "DiffusionSolver",
    "ddim_update", "ddim_noise_scale", "karras_sigmas", "pc_nfe",
]
