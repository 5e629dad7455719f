"""Samplers: ODE (fixed-step and adaptive), SDE (Euler-Maruyama), Langevin dynamics."""

from jaxgen.samplers.ode import ADAPTIVE, FIXED_STEP_NFE, SampleResult, sample_ode, time_grid
from jaxgen.samplers.sde import annealed_langevin, euler_maruyama, langevin, sample_sde

__all__ = ["SampleResult", "sample_ode", "sample_sde", "euler_maruyama", "langevin", "annealed_langevin",
           "time_grid", "FIXED_STEP_NFE", "ADAPTIVE"]
