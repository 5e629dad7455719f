"""Samplers: ODE (fixed-step and adaptive), SDE (Euler-Maruyama), Langevin dynamics, the fast diffusion samplers
(DDIM, DPM-Solver, DPM-Solver++, UniPC, EDM), DDPM ancestral sampling, predictor-corrector and consistency sampling."""

from jaxgen.samplers.consistency import consistency_sample
from jaxgen.samplers.ddpm import ddpm_ancestral_sample
from jaxgen.samplers.diffusion import (ddim, dpm_solver, dpm_solver_pp, edm_sampler, karras_sigmas, log_snr,
                                       sigmas_from_times, times_from_lambdas, times_from_sigmas)
from jaxgen.samplers.ode import ADAPTIVE, FIXED_STEP_NFE, SampleResult, sample_ode, time_grid
from jaxgen.samplers.score_sde import pc_nfe, pc_sample
from jaxgen.samplers.sde import annealed_langevin, euler_maruyama, langevin, sample_sde
from jaxgen.samplers.unipc import unipc

__all__ = ["SampleResult", "sample_ode", "sample_sde", "euler_maruyama", "langevin", "annealed_langevin",
           "time_grid", "FIXED_STEP_NFE", "ADAPTIVE", "ddim", "dpm_solver", "dpm_solver_pp", "unipc", "edm_sampler",
           "karras_sigmas", "log_snr", "sigmas_from_times", "times_from_lambdas", "times_from_sigmas",
           "ddpm_ancestral_sample", "pc_sample", "pc_nfe", "consistency_sample"]
