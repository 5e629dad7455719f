"""Sample-quality and transport metrics (pure JAX): sliced and exact W2, MMD, energy distance, Fréchet distances,
trajectory straightness, curvature, path length and transport cost, k-NN precision/recall and density/coverage, and
mode coverage of Gaussian-mixture targets."""

from jaxgen.metrics.frechet import feature_moments, frechet_distance, frechet_distance_from_features, gaussian_moments
from jaxgen.metrics.manifold import density_coverage, knn_radii, manifold_metrics, precision_recall
from jaxgen.metrics.modes import ModeCoverage, eight_gaussians_modes, mode_coverage
from jaxgen.metrics.samples import energy_distance, mmd_rbf, sliced_wasserstein, wasserstein2_exact
from jaxgen.metrics.transport import curvature, path_length, straightness, transport_cost, wasserstein2

__all__ = ["sliced_wasserstein", "mmd_rbf", "energy_distance", "wasserstein2_exact", "wasserstein2", "frechet_distance",
           "gaussian_moments", "feature_moments", "frechet_distance_from_features", "straightness", "curvature",
           "path_length", "transport_cost", "knn_radii", "precision_recall", "density_coverage", "manifold_metrics",
           "ModeCoverage", "mode_coverage", "eight_gaussians_modes"]
