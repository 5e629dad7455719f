"""Probability paths: schedules ``(alpha_t, beta_t)``, Gaussian conditional paths (notes ch. 3), the discrete DDPM
chain, score_sde's forward SDEs and stochastic interpolants."""

from jaxgen.paths.schedules import (
    SCHEDULES,
    Schedule,
    ScheduleOutput,
    cond_ot,
    cosine,
    custom,
    edm,
    get_schedule,
    linear,
    polynomial,
    sub_vp,
    ve,
    vp,
)
from jaxgen.paths.gaussian import (GaussianPath, as_path, gaussian_log_prob, log_snr, log_snr_from_coefficients,
                                  sigmas_from_times, times_from_lambdas, times_from_sigmas)
from jaxgen.paths.interpolants import (InterpolantCoefficients, StochasticInterpolant, as_interpolant,
                                      schrodinger_bridge)
from jaxgen.paths.ddpm import DDPMSchedule, cosine_betas, linear_betas
from jaxgen.paths.sde import SDE, VESDE, VPSDE, SubVPSDE, subVPSDE, to_diffusion_time, to_jaxgen_time

__all__ = [
    "SCHEDULES", "Schedule", "ScheduleOutput", "GaussianPath", "as_path", "get_schedule", "log_snr",
    "log_snr_from_coefficients", "gaussian_log_prob", "sigmas_from_times", "times_from_lambdas", "times_from_sigmas",
    "linear", "cond_ot", "cosine", "polynomial", "vp", "sub_vp", "ve", "edm", "custom",
    "DDPMSchedule", "linear_betas", "cosine_betas", "SDE", "VPSDE", "SubVPSDE", "subVPSDE", "VESDE",
    "to_jaxgen_time", "to_diffusion_time", "StochasticInterpolant", "InterpolantCoefficients", "as_interpolant",
    "schrodinger_bridge",
]
