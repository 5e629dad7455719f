"""Sample-quality and transport metrics (pure JAX): sliced and exact W2, MMD, energy distance, Fréchet distances,
trajectory straightness."""

from jaxgen.metrics.frechet import feature_moments, frechet_distance, frechet_distance_from_features, gaussian_moments
from jaxgen.metrics.samples import energy_distance, mmd_rbf, sliced_wasserstein, wasserstein2_exact
from jaxgen.metrics.transport import straightness

__all__ = ["sliced_wasserstein", "mmd_rbf", "energy_distance", "wasserstein2_exact", "frechet_distance",
           "gaussian_moments", "feature_moments", "frechet_distance_from_features", "straightness"]
