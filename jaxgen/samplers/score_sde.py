r"""score_sde's predictor-corrector sampler (Song et al. 2021, Algorithms 1-3 of Appendix G;
``sampling.get_pc_sampler``) as one ``lax.scan`` with an exact NFE. The SDEs are :mod:`jaxgen.paths.sde`.

On the diffusion-time grid ``tau_i = linspace(1, t_eps, N)`` (the field is evaluated at jaxgen time
``t_i = 1 - tau_i``), each step runs first the corrector, then the predictor:

* corrector ``"langevin"`` (Algorithms 4/5), ``corrector_steps`` times: ``x <- x + e s(x) + sqrt(2 e) z`` with
  ``e = 2 alpha_i (snr ||z|| / ||s(x)||)^2`` (:func:`jaxgen.samplers.sde.snr_langevin_step`; the norms are batch
  means of per-sample norms, as score_sde's pmean'd norms), ``alpha_i = 1 - beta_i`` for VP/sub-VP, ``1`` for VE;
* predictor ``"reverse_diffusion"`` (eq. 46): with ``(f, G) = sde.discretize(x, tau_i)``,
  ``x <- x - f + G^2 s(x) + G z``; or ``"euler_maruyama"``: ``x <- x - [f - g^2 s] / N + g z / sqrt(N)``
  (score_sde's step ``1/N``, not the grid spacing ``(1 - t_eps)/(N - 1)``; equal when ``t_eps = 1/N``).
  ``probability_flow=True`` uses ``g^2/2`` and no noise.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar

import numpy as np
import jax
import jax.numpy as jnp

from jaxgen._checks import expand_like
from jaxgen.paths.sde import SDE
from jaxgen.samplers.base import Grid, Segment, Solver, check_steps, register
from jaxgen.samplers.sde import snr_langevin_step

Array = jax.Array

PREDICTORS = ("reverse_diffusion", "euler_maruyama", "none")
CORRECTORS = ("langevin", "none")


def pc_nfe(steps: int, predictor: str, corrector: str, corrector_steps: int) -> int:
    """Exact NFE of :class:`PredictorCorrector`: ``steps * ([predictor != none] + corrector_steps [corrector != none])``.

    score_sde's ``pc_sampler`` reports ``N (n_steps + 1)`` whatever the predictor and corrector: e.g. 2000 for a
    1000-step ``euler_maruyama`` + ``none`` sampler, which evaluates the model 1000 times. The final denoising
    step costs nothing: it is the last predictor update without its noise.
    """
    return int(steps) * (int(predictor != "none") + int(corrector_steps) * int(corrector != "none"))


def _sde_by_name(sde):
    if isinstance(sde, SDE):
        return sde
    from jaxgen.paths.sde import VESDE, VPSDE, SubVPSDE

    table = {"vp": VPSDE, "sub_vp": SubVPSDE, "subvp": SubVPSDE, "ve": VESDE}
    key = str(sde).lower().replace("-", "_")
    if key not in table:
        raise ValueError(f"sde must be a jaxgen.paths.SDE (VPSDE, SubVPSDE, VESDE) or one of their names "
                         f"{sorted(table)}, got {sde!r}.")
    return table[key]()


@dataclasses.dataclass(frozen=True)
class PredictorCorrector(Solver):
    r"""score_sde's predictor-corrector sampler (module docstring) for a score SDE.

    The field is decoded on the SDE's path (:attr:`jaxgen.paths.SDE.path`); a field trained on another path
    (``sample(..., path=...)``) is moved onto it (:func:`jaxgen.fields.change_path`). Pass ``prediction="score"`` for
    a score network. ``steps`` is ``N`` (default ``sde.N``); the grid is
    score_sde's, not ``ts``/``t0``/``t1``. ``denoise=True`` returns the last predictor update without its noise
    (score_sde's ``x_mean``; with ``predictor="none"`` the last state). Noise comes from ``fold_in(key, step)``
    (the predictor's from ``fold_in(., 0)``, corrector step ``j`` from ``fold_in(., j)``).

    Args:
      sde: the forward SDE (:class:`~jaxgen.paths.VPSDE`, :class:`~jaxgen.paths.SubVPSDE`,
        :class:`~jaxgen.paths.VESDE`) or its name ``"vp"``, ``"sub_vp"``, ``"ve"``.
      predictor: ``"reverse_diffusion"``, ``"euler_maruyama"`` or ``"none"``.
      corrector: ``"langevin"`` or ``"none"``.
      snr, corrector_steps: the Langevin corrector's target ratio and number of steps.
      denoise: return the noise-free last update.
      t_eps: the last diffusion time (score_sde samples down to ``tau = 1e-3``).
      probability_flow: the predictor follows the probability-flow ODE.

    NFE: :func:`pc_nfe`.
    """

    name: ClassVar[str] = "predictor_corrector"
    decodes_data: ClassVar[bool] = False
    sde: SDE | str = "vp"
    predictor: str = "reverse_diffusion"
    corrector: str = "langevin"
    snr: float = 0.16
    corrector_steps: int = 1
    denoise: bool = True
    t_eps: float = 1e-3
    probability_flow: bool = False

    def __post_init__(self):
        object.__setattr__(self, "sde", _sde_by_name(self.sde))
        if self.predictor not in PREDICTORS:
            raise ValueError(f"unknown predictor {self.predictor!r}; use one of {PREDICTORS}.")
        if self.corrector not in CORRECTORS:
            raise ValueError(f"unknown corrector {self.corrector!r}; use one of {CORRECTORS}.")
        if self.predictor == "none" and self.corrector == "none":
            raise ValueError("predictor='none' and corrector='none' would leave x_init unchanged; choose a predictor "
                             "(e.g. 'reverse_diffusion') or a corrector ('langevin').")
        if isinstance(self.corrector_steps, bool) or not isinstance(self.corrector_steps, (int, np.integer)) \
                or self.corrector_steps < 1:
            raise ValueError(f"corrector_steps must be a positive int, got {self.corrector_steps!r} "
                             "(use corrector='none' for no correction).")
        if not 0.0 < float(self.t_eps) < 1.0:
            raise ValueError(f"t_eps must lie in (0, 1) (score_sde samples down to tau = eps = 1e-3), got {self.t_eps}.")
        if not float(self.snr) > 0:
            raise ValueError(f"snr must be positive (score_sde uses 0.16 for CIFAR-10), got {self.snr}.")
        if self.probability_flow and self.predictor == "none":
            raise ValueError("probability_flow=True changes the predictor; it needs predictor != 'none'.")

    def needs_key(self) -> bool:
        return True

    def process_path(self):
        return self.sde.path

    def grid(self, model, steps, t0, t1, ts):
        if ts is not None or t0 is not None or t1 is not None:
            raise ValueError("the predictor-corrector sampler runs on score_sde's grid tau = linspace(1, t_eps, N): "
                             "pass steps (N) and t_eps, not ts, t0 or t1.")
        n = check_steps(self.sde.N if steps is None else steps)
        taus = jnp.linspace(self.sde.T, self.t_eps, n, dtype=jnp.float32)
        return Grid(1.0 - jnp.concatenate([taus, jnp.zeros((1,), jnp.float32)]), 1.0 - float(self.sde.T), 1.0)

    def init(self, model, x0, grid):
        return x0, x0

    def step_inputs(self, model, grid):
        return {"i": jnp.arange(grid.steps), "tau": 1.0 - grid.times[:-1]}

    def segments(self, model, grid):
        # the steps read the SDE discretised with N = steps (its discrete betas and step 1/N)
        return [Segment(functools.partial(self._step, dataclasses.replace(self.sde, N=grid.steps)),
                        self.step_inputs(model, grid))]

    def _step(self, sde, model, carry, inp, key):
        x, _ = carry
        tau = inp["tau"]
        k = jax.random.fold_in(key, inp["i"])
        dtype = x.dtype
        c = 0.5 if self.probability_flow else 1.0
        tau_b = jnp.broadcast_to(tau, (x.shape[0],))
        if self.corrector == "langevin":  # unrolled: corrector_steps is small (1 in score_sde's configs)
            for j in range(1, self.corrector_steps + 1):
                s = model.score(x, 1.0 - tau)
                z = jax.random.normal(jax.random.fold_in(k, j), x.shape, dtype)
                x, _ = snr_langevin_step(x, s, z, self.snr, alpha=sde.langevin_alpha(tau_b).astype(dtype))
        if self.predictor == "none":
            return (x, x), x
        s = model.score(x, 1.0 - tau)
        z = jax.random.normal(jax.random.fold_in(k, 0), x.shape, dtype)
        if self.predictor == "reverse_diffusion":
            f, g = sde.discretize(x, tau_b)
            x_mean = x - (f - c * expand_like(g**2, x) * s)
            noise_scale = g
        else:  # euler_maruyama, dt = -1/N as score_sde
            f, g = sde.sde(x, tau_b)
            dt = sde.T / sde.N
            x_mean = x - (f - c * expand_like(g**2, x) * s) * dt
            noise_scale = g * math.sqrt(dt)
        if self.probability_flow:
            return (x_mean, x_mean), x_mean
        x = x_mean + expand_like(noise_scale.astype(dtype), x) * z
        return (x, x_mean), x

    def finish(self, model, carry):
        x, x_mean = carry
        return x_mean if self.denoise else x

    def trajectory(self, x0, records, x):
        traj = jnp.concatenate(records, axis=0)
        return jnp.concatenate([x0[None], traj[:-1], x[None]], axis=0)


register(PredictorCorrector.name, PredictorCorrector)
register("pc", PredictorCorrector)

__all__ = ["PredictorCorrector", "pc_nfe", "PREDICTORS", "CORRECTORS"]
