r"""score_sde's predictor-corrector sampler (Song et al. 2021, Algorithms 1-3 of Appendix G;
``sampling.get_pc_sampler``) as one ``lax.scan``, with an exact NFE. The SDEs are :mod:`jaxgen.paths.sde`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np
import jax
import jax.numpy as jnp

from jaxgen._checks import expand_like
from jaxgen.fields.sde import _score_fn
from jaxgen.paths.sde import SDE, _sq_norm
from jaxgen.samplers.ode import SampleResult, _bind

Array = jax.Array

PREDICTORS = ("reverse_diffusion", "euler_maruyama", "none")
CORRECTORS = ("langevin", "none")


# ---------------------------------------------------------------------------------------------
# predictor-corrector sampling
# ---------------------------------------------------------------------------------------------

def pc_nfe(steps: int, predictor: str, corrector: str, corrector_steps: int) -> int:
    """Exact NFE of :func:`pc_sample`: ``steps * ([predictor != none] + corrector_steps [corrector != none])``.

    score_sde's ``pc_sampler`` reports ``N (n_steps + 1)`` whatever the predictor and corrector: e.g. 2000 for a
    1000-step ``euler_maruyama`` + ``none`` sampler, which evaluates the model 1000 times. The final denoising
    step costs nothing: it is the last predictor update without its noise.
    """
    return int(steps) * (int(predictor != "none") + int(corrector_steps) * int(corrector != "none"))


def pc_sample(
    score_field: Callable,
    x_init: Array,
    key: Array,
    *,
    sde: SDE,
    steps: int | None = None,
    predictor: str = "reverse_diffusion",
    corrector: str = "langevin",
    snr: float = 0.16,
    corrector_steps: int = 1,
    denoise: bool = True,
    t_eps: float = 1e-3,
    probability_flow: bool = False,
    prediction: str = "score",
    cond: dict | None = None,
    save_trajectory: bool = False,
) -> SampleResult:
    r"""Predictor-corrector sampling (Song et al. 2021, Alg. 1-3 of App. G; score_sde ``get_pc_sampler``).

    On the diffusion-time grid ``tau_i = linspace(1, t_eps, N)`` (``N = steps``, default ``sde.N``; the field
    is evaluated at jaxgen time ``t_i = 1 - tau_i``), each step runs first the corrector, then the predictor:

    * corrector ``"langevin"`` (Alg. 4/5), ``corrector_steps`` times:
      ``x <- x + e s(x) + sqrt(2 e) z`` with ``e = 2 alpha_i (snr ||z|| / ||s(x)||)^2``, the norms being batch
      means of per-sample norms (as score_sde's pmean'd norms) and ``alpha_i = 1 - beta_i`` for VP/sub-VP,
      ``1`` for VE;
    * predictor ``"reverse_diffusion"`` (eq. 46): with ``(f, G) = sde.discretize(x, tau_i)``,
      ``x <- x - f + G^2 s(x) + G z``; or ``"euler_maruyama"``: ``x <- x - [f - g^2 s] / N + g z / sqrt(N)``
      (score_sde's step ``1/N``, not the grid spacing ``(1 - t_eps)/(N - 1)``; equal when ``t_eps = 1/N``).
      ``probability_flow=True`` uses ``g^2/2`` and no noise.

    ``denoise=True`` returns the last predictor update without its noise (score_sde's ``x_mean``; with
    ``predictor="none"`` there is none, and the last state is returned). Everything is one ``lax.scan``
    (the ``corrector_steps`` unrolled in its body); noise comes from ``fold_in(key, step)``.

    Args:
      score_field: ``field(x, t, **cond)`` predicting ``prediction`` (default the score) on ``sde.path``.
      x_init: start, usually ``sde.prior_sampling(key, shape)``.
      key: PRNG key.

    Returns:
      ``SampleResult`` with the exact ``nfe`` (:func:`pc_nfe`), ``ts = 1 - [tau_0, ..., tau_{N-1}, 0]`` in
      jaxgen time, and, with ``save_trajectory``, the ``N + 1`` states (start and after each step).
    """
    if not isinstance(sde, SDE):
        raise ValueError(f"sde must be a jaxgen.paths.SDE (VPSDE, SubVPSDE, VESDE), got {type(sde).__name__}.")
    if predictor not in PREDICTORS:
        raise ValueError(f"unknown predictor {predictor!r}; use one of {PREDICTORS}.")
    if corrector not in CORRECTORS:
        raise ValueError(f"unknown corrector {corrector!r}; use one of {CORRECTORS}.")
    if predictor == "none" and corrector == "none":
        raise ValueError("predictor='none' and corrector='none' would leave x_init unchanged; choose a predictor "
                         "(e.g. 'reverse_diffusion') or a corrector ('langevin').")
    steps = sde.N if steps is None else steps
    if not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}.")
    if not isinstance(corrector_steps, (int, np.integer)) or corrector_steps < 1:
        raise ValueError(f"corrector_steps must be a positive int, got {corrector_steps!r} "
                         "(use corrector='none' for no correction).")
    if not 0.0 < float(t_eps) < 1.0:
        raise ValueError(f"t_eps must lie in (0, 1) (score_sde samples down to tau = eps = 1e-3), got {t_eps}.")
    if not float(snr) > 0:
        raise ValueError(f"snr must be positive (score_sde uses 0.16 for CIFAR-10), got {snr}.")
    if probability_flow and predictor == "none":
        raise ValueError("probability_flow=True changes the predictor; it needs predictor != 'none'.")
    if x_init.ndim < 1:
        raise ValueError("x_init must have a leading batch axis (B, ...).")

    sde = dataclasses.replace(sde, N=int(steps))
    score = _bind(_score_fn(sde, score_field, prediction), cond)
    c = 0.5 if probability_flow else 1.0
    taus = jnp.linspace(sde.T, t_eps, sde.N, dtype=jnp.float32)
    dtype = x_init.dtype

    def flat_norm_mean(a):
        return jnp.mean(jnp.sqrt(_sq_norm(a)))

    def langevin_step(x, inp):
        k, tau = inp
        tau_b = jnp.broadcast_to(tau, (x.shape[0],))
        s = score(x, 1.0 - tau)
        z = jax.random.normal(k, x.shape, dtype)
        alpha = sde.langevin_alpha(tau_b).astype(dtype)
        e = 2.0 * alpha * (snr * flat_norm_mean(z) / jnp.maximum(flat_norm_mean(s), 1e-30)) ** 2
        x_mean = x + expand_like(e, x) * s
        return x_mean + expand_like(jnp.sqrt(2.0 * e), x) * z, x_mean

    def predictor_step(k, x, tau):
        tau_b = jnp.broadcast_to(tau, (x.shape[0],))
        s = score(x, 1.0 - tau)
        z = jax.random.normal(k, x.shape, dtype)
        if predictor == "reverse_diffusion":
            f, G = sde.discretize(x, tau_b)
            x_mean = x - (f - c * expand_like(G**2, x) * s)
            noise_scale = G
        else:  # euler_maruyama, dt = -1/N as score_sde
            f, g = sde.sde(x, tau_b)
            dt = sde.T / sde.N
            x_mean = x - (f - c * expand_like(g**2, x) * s) * dt
            noise_scale = g * math.sqrt(dt)
        if probability_flow:
            return x_mean, x_mean
        return x_mean + expand_like(noise_scale.astype(dtype), x) * z, x_mean

    def body(carry, inp):
        x, x_mean = carry
        i, tau = inp
        k = jax.random.fold_in(key, i)
        if corrector == "langevin":  # unrolled: corrector_steps is small (1 in score_sde's configs)
            for j in range(1, corrector_steps + 1):
                x, _ = langevin_step(x, (jax.random.fold_in(k, j), tau))
        if predictor != "none":
            x, x_mean = predictor_step(jax.random.fold_in(k, 0), x, tau)
        else:
            x_mean = x
        return (x, x_mean), (x if save_trajectory else None)

    (x, x_mean), traj = jax.lax.scan(body, (x_init, x_init), (jnp.arange(sde.N), taus))
    out = x_mean if denoise else x
    if save_trajectory:
        traj = jnp.concatenate([x_init[None], traj[:-1], out[None]], axis=0)
    ts = 1.0 - jnp.concatenate([taus, jnp.zeros((1,), jnp.float32)])
    return SampleResult(out, pc_nfe(sde.N, predictor, corrector, corrector_steps), ts, traj)


__all__ = ["pc_sample", "pc_nfe", "PREDICTORS", "CORRECTORS"]
