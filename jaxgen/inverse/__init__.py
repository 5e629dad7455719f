r"""Training-free inverse problems: sample ``p(x | y)`` for a linear measurement ``y = A x (+ noise)`` with a field
trained on ``p(x)`` only.

Measurements (:mod:`~jaxgen.inverse.operators`): :class:`MaskOperator` (inpainting), :class:`DownsampleOperator`
(super-resolution by average pooling), :class:`GrayscaleOperator` (colourisation), each with ``A x``, the
transpose ``A^T y`` and the exact Moore-Penrose pseudo-inverse ``A^+ y``; the standard masks :func:`half_mask`,
:func:`box_mask`, :func:`random_mask`.

Three ways to condition a sampler on ``y``:

* **Posterior-mean guidance** (:func:`posterior_guided_field`): a velocity field for any ODE/SDE solver of
  :func:`~jaxgen.samplers.sample`. The score gains ``grad_x log p(y | x_t)``, approximated through the
  posterior mean ``x1_hat(x_t)`` and a vector-Jacobian product through the network: DPS (Chung et al. 2023, the
  normalised gradient of ``-||y - A x1_hat||^2``) or PiGDM (Song et al. 2023, ``J^T A^+ (y - A x1_hat) / r_t^2``,
  exact posterior sampling for unit-variance Gaussian data); the correction enters the velocity through the path's
  velocity-score relation. Works for any linear ``A``; one network evaluation and one vjp per step.
* **Replacement and RePaint** (:class:`Inpaint`): a solver wrapping any one-step solver that, after each step,
  overwrites the observed pixels with the observation noised to the new time (score_sde's inpainter), and with
  ``resample > 1`` re-noises and repeats each step (RePaint, Lugmayr et al. 2022) to harmonise the two parts. No
  gradients through the network; inpainting only.
* **Label inference** (:func:`infer_labels`): with a class-conditional field, the class whose denoiser best
  reproduces the measurement (a diffusion classifier on the observed part, Li et al. 2023), or
  (:func:`infer_labels_by_evidence`) the class of largest Monte Carlo evidence ``p(y | k)`` over a pool of the
  model's own class-conditional samples, to condition a second completion on.
* **Inversion** (:func:`invert`, :func:`round_trip_error`): the deterministic sampler run backwards from data to
  noise (DDIM inversion), the encoder of editing methods; the round-trip error measures the solver's
  discretisation error.

Example (inpainting the right half of 8x8 images)::

    mask = half_mask((8, 8), "left")                                  # observed: the left half
    A = MaskOperator(mask)
    y = A(x_true)
    guided = posterior_guided_field(net, A, y, path="linear", prediction="velocity", method="pigdm")
    x = sample(guided, x0, Euler(), path="linear", steps=100).x
    x = sample(net, x0, Inpaint(y, mask, Euler(), resample=5), path="linear", steps=100, key=key).x
"""

from jaxgen.inverse.guidance import (METHODS, GuidanceTerms, guidance_terms, pigdm_coefficient, pigdm_variance,
                                     posterior_guided_field, score_to_velocity_coefficient)
from jaxgen.inverse.labels import (evidence_scores, infer_labels, infer_labels_by_evidence,
                                   kernel_width_by_cross_validation, label_errors)
from jaxgen.inverse.inversion import BACKWARD_SOLVERS, ReversedDDIM, invert, round_trip_error
from jaxgen.inverse.operators import (DownsampleOperator, GrayscaleOperator, LinearOperator, MaskOperator, box_mask,
                                      half_mask, operator_matrix, random_mask)
from jaxgen.inverse.solvers import Inpaint, noise_observation, renoise, usable_solvers

__all__ = [
    "LinearOperator", "MaskOperator", "DownsampleOperator", "GrayscaleOperator", "half_mask", "box_mask",
    "random_mask", "operator_matrix",
    "posterior_guided_field", "guidance_terms", "GuidanceTerms", "METHODS", "pigdm_variance", "pigdm_coefficient",
    "score_to_velocity_coefficient",
    "Inpaint", "renoise", "noise_observation", "usable_solvers",
    "invert", "round_trip_error", "ReversedDDIM", "BACKWARD_SOLVERS", "infer_labels", "label_errors",
    "evidence_scores", "infer_labels_by_evidence", "kernel_width_by_cross_validation",
]
