"""Probability paths: schedules ``(alpha_t, beta_t)`` and Gaussian conditional paths (notes ch. 3)."""

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
from jaxgen.paths.gaussian import GaussianPath, as_path

__all__ = [
    "SCHEDULES", "Schedule", "ScheduleOutput", "GaussianPath", "as_path", "get_schedule",
    "linear", "cond_ot", "cosine", "polynomial", "vp", "sub_vp", "ve", "edm", "custom",
]
