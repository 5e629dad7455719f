"""Fields: the exact algebra between parameterisations (velocity, score, eps, data, v), SDE drifts, guidance,
preconditioning and evaluation wrappers. Every field has jaxgen's signature ``field(x, t, **cond)``."""

from jaxgen.fields.algebra import (PREDICTIONS, VectorField, as_field, canonical_prediction, convert, eps_to_score,
                                   from_data_and_noise, score_to_eps, score_to_velocity, to_data_and_noise,
                                   tweedie_data, velocity_to_score)
from jaxgen.fields.guidance import cfg_combine, classifier_guided_field, guided_field
from jaxgen.fields.preconditioning import consistency_coefficients
from jaxgen.fields.sde import (interpolant_drift, probability_flow_velocity, reverse_diffusion, reverse_drift, sde_drift,
                               sde_drift_field)
from jaxgen.fields.wrappers import change_path, chunked_field, flow_map_to_data, flow_map_velocity

__all__ = [
    "PREDICTIONS", "VectorField", "as_field", "canonical_prediction", "convert", "eps_to_score", "from_data_and_noise",
    "score_to_eps", "score_to_velocity", "to_data_and_noise", "tweedie_data", "velocity_to_score", "cfg_combine",
    "classifier_guided_field", "guided_field", "consistency_coefficients", "probability_flow_velocity",
    "reverse_diffusion", "reverse_drift", "sde_drift", "sde_drift_field", "interpolant_drift", "chunked_field",
    "change_path", "flow_map_velocity", "flow_map_to_data",
]
