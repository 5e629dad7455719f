"""jaxgen: generative models as time-dependent vector fields, in JAX.

The mathematical core (``paths``, ``fields``, ``losses``, ``samplers``, ``likelihood``, ``oracle``, ``metrics``)
imports neither Flax nor data loading; networks live in ``jaxgen.models`` and training in
``jaxgen.train``.
"""

from jaxgen import ddpm, fields, likelihood, losses, metrics, oracle, paths, rectified, samplers, score_sde
from jaxgen.likelihood import log_likelihood
from jaxgen.paths import GaussianPath, get_schedule
from jaxgen.oracle import GaussianMixture
from jaxgen.samplers import SampleResult, sample_ode, sample_sde

__version__ = "0.1.0"

__all__ = ["ddpm", "score_sde", "fields", "likelihood", "log_likelihood", "losses", "metrics", "oracle", "paths", "rectified", "samplers", "GaussianPath", "get_schedule",
           "GaussianMixture", "SampleResult", "sample_ode", "sample_sde", "__version__"]
