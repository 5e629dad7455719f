"""jaxgen: generative models as time-dependent vector fields, in JAX.

The mathematical core (``paths``, ``fields``, ``samplers``, ``couplings``, ``losses``, ``likelihood``, ``metrics``,
``oracle``) imports neither Flax, optax, orbax nor data loading; networks live in ``jaxgen.models``, training in
``jaxgen.training``, data in ``jaxgen.data`` and learned-feature evaluation in ``jaxgen.evaluation``.
"""

from jaxgen import couplings, fields, likelihood, losses, metrics, oracle, paths, samplers
from jaxgen._checks import checked
from jaxgen.likelihood import log_likelihood
from jaxgen.paths import GaussianPath, get_schedule
from jaxgen.oracle import GaussianMixture
from jaxgen.samplers import SampleResult, Solver, get_solver, sample

__version__ = "0.1.0"

__all__ = ["checked", "couplings", "fields", "likelihood", "log_likelihood", "losses", "metrics", "oracle", "paths", "samplers",
           "GaussianPath", "get_schedule", "GaussianMixture", "SampleResult", "Solver", "get_solver", "sample",
           "__version__"]
