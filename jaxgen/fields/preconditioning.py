r"""Preconditioning of a network into a consistency function (Song et al. 2023, Appendix C; EDM, Karras et al.
2022, Table 1), in jaxgen time.

With ``x_t = alpha_t z + beta_t eps`` the rescaled ``x_t / alpha_t = z + sigma_t eps`` is an EDM variable
of noise level ``sigma_t = beta_t / alpha_t``. Writing the paper's

.. math:: f = c_{skip}(\sigma) \frac{x}{\alpha_t} + c_{out}(\sigma) F_\theta, \quad
   c_{skip} = \frac{\sigma_d^2}{(\sigma - \sigma_e)^2 + \sigma_d^2}, \quad
   c_{out} = \frac{(\sigma - \sigma_e)\sigma_d}{\sqrt{\sigma^2 + \sigma_d^2}}, \quad
   c_{in} = \frac{1}{\sqrt{\sigma^2 + \sigma_d^2}}

in ``x`` units at the data end (times ``alpha_e``) and multiplying through by ``alpha_t`` gives
formulas without any division by ``alpha_t`` (zero at t = 0), with
``b_t = (beta_t alpha_e - alpha_t beta_e) / alpha_e = alpha_t (sigma_t - sigma_e)``:

.. math:: f_\theta(x, t) = c_{skip}(t)\, x + c_{out}(t)\, F_\theta(c_{in}(t)\, x, t), \qquad
   c_{skip} = \frac{\alpha_e \alpha_t \sigma_d^2}{\alpha_t^2 \sigma_d^2 + b_t^2}, \quad
   c_{out} = \frac{\alpha_e b_t \sigma_d}{\sqrt{\alpha_t^2 \sigma_d^2 + \beta_t^2}}, \quad
   c_{in} = \frac{1}{\sqrt{\alpha_t^2 \sigma_d^2 + \beta_t^2}}.

``b_t = 0`` at ``t_end``, so ``c_skip = 1`` and ``c_out = 0`` there: the boundary condition ``f(x, t_end) = x``
holds exactly. The network wrapper is :class:`jaxgen.models.ConsistencyFunction`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxgen._checks import safe_divide
from jaxgen.paths.gaussian import GaussianPath, as_path

Array = jax.Array


def _end_time(path: GaussianPath, t_end: float | None) -> float:
    s = path.schedule
    t_end = s.t_max if t_end is None else float(t_end)
    if not s.t_min < t_end <= s.t_max:
        raise ValueError(f"t_end must lie in (t_min, t_max] = ({s.t_min:g}, {s.t_max:g}] of the '{path.name}' "
                         f"schedule (the data end of the consistency function), got {t_end}.")
    with jax.ensure_compile_time_eval():
        a_e = float(path.coefficients(jnp.asarray(t_end, jnp.float32)).alpha)
    if not a_e > 0:
        raise ValueError(f"alpha at t_end={t_end} is {a_e}; the data end of a consistency function needs alpha > 0.")
    return t_end


def consistency_coefficients(path: GaussianPath | str, t: Array, *, sigma_data: float = 0.5,
                             t_end: float | None = None) -> tuple[Array, Array, Array]:
    r"""``(c_skip, c_out, c_in)`` at times ``t`` (Song et al. 2023, Appendix C, mapped to jaxgen time).

    See the module docstring: ``c_skip = alpha_e alpha_t sd^2 / (alpha_t^2 sd^2 + b_t^2)``,
    ``c_out = alpha_e b_t sd / sqrt(alpha_t^2 sd^2 + beta_t^2)``, ``c_in = 1 / sqrt(alpha_t^2 sd^2 + beta_t^2)``
    with ``b_t = (beta_t alpha_e - alpha_t beta_e) / alpha_e``. ``c_skip(t_end) = 1`` and ``c_out(t_end) = 0``
    exactly, and nothing divides by ``alpha_t`` or ``beta_t``.
    """
    path = as_path(path)
    if not sigma_data > 0:
        raise ValueError(f"sigma_data (the data's standard deviation per coordinate) must be > 0, got {sigma_data}.")
    t_end = _end_time(path, t_end)
    t = jnp.asarray(t)
    t = t.astype(t.dtype if jnp.issubdtype(t.dtype, jnp.floating) else jnp.float32)
    a, b, _, _ = path.coefficients(t)
    end = path.coefficients(jnp.asarray(t_end, t.dtype))
    a_e, b_e = end.alpha, end.beta
    sd2 = jnp.asarray(sigma_data**2, t.dtype)
    bt = (b * a_e - a * b_e) / a_e
    var = a * a * sd2 + b * b  # alpha_t^2 sd^2 + beta_t^2 > 0 for a valid schedule
    c_skip = safe_divide(a_e * (a * sd2), a * (a * sd2) + bt * bt, floor=1e-20)
    c_out = a_e * bt * sigma_data * jax.lax.rsqrt(jnp.maximum(var, 1e-20))
    c_in = jax.lax.rsqrt(jnp.maximum(var, 1e-20))
    at_end = t >= t_end
    return jnp.where(at_end, 1.0, c_skip), jnp.where(at_end, 0.0, c_out), c_in


__all__ = ["consistency_coefficients"]
