r"""Exact log-likelihoods through the probability-flow ODE, and bits per dimension.

A field ``u_t`` that transports ``p_0`` (noise, t=0) to ``p_1`` (data, t=1) along ``dx/dt = u_t(x)``
defines a continuous normalising flow, and the log-density along a trajectory obeys the
instantaneous change of variables (Chen et al. 2018, thm. 1; Song et al. 2021, sec. 4.3, for the
probability-flow ODE of a diffusion model):

.. math::

   \frac{d}{dt} \log p_t(x_t) = -\nabla\!\cdot u_t(x_t)
   \quad\Longrightarrow\quad
   \log p_1(x_1) = \log p_0(x_0) - \int_0^1 \nabla\!\cdot u_t(x_t)\, dt .

:func:`log_likelihood` integrates the data ``x_1 = x`` backwards, from ``t_data`` to ``t_noise``,
together with ``g(t) = -\int_t^{t_data} div u_s(x_s) ds`` (the state obeys ``dg/dt = div u_t``,
``g(t_data) = 0``), as ONE diffrax solve for the whole batch, and returns
``log p(x) = log p_0(x_0) + g(t_noise)``.

The divergence is computed either exactly, as the trace of the per-sample Jacobian from
``D = prod(x.shape[1:])`` forward-mode products with the basis vectors (for small ``D``), or by the
Hutchinson-Skilling estimator ``div u = E_v[v^T (du/dx) v]`` with ``E[v v^T] = I`` (Hutchinson 1989;
Skilling 1989; FFJORD, Grathwohl et al. 2019), with Rademacher or Gaussian probes ``v`` drawn once and
kept fixed for the whole solve, one JVP per probe. Both assume a per-sample field (sample ``i`` of
the output depends only on sample ``i`` of the input: no batch statistics).

The estimator is unbiased for ``log p`` (the trajectory ``x_t`` does not depend on the probes and the
integral is linear in the estimate), not for ``p``.

NFE convention: one evaluation of the field, or one JVP of the field (which also delivers its
value), counts as ONE function evaluation on the whole batch. A right-hand side of the augmented ODE
therefore costs ``D`` evaluations with the exact divergence and ``num_probes`` with Hutchinson.

Float64: call inside ``with jax.enable_x64(True):`` with ``x`` in float64 (``jax.enable_x64`` is the
context manager in jax 0.10; ``jax.experimental.enable_x64`` does not exist there). Everything --
times, state, the divergence and the prior -- is computed in ``x.dtype``. Tolerances below about
``1e-6`` need float64 (diffrax FAQ).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import numpy as np
import jax
import jax.numpy as jnp

from jaxgen._checks import check_finite, check_key, check_time, check_tolerances, is_concrete
from jaxgen.fields.algebra import as_field, canonical_prediction, check_data_identifiable
from jaxgen.paths.gaussian import GaussianPath, as_path
from jaxgen.paths.interpolants import StochasticInterpolant
from jaxgen.samplers.ode import ADAPTIVE, diffrax_solver, diffrax_stages

Array = jax.Array

DIVERGENCES = ("exact", "hutchinson")
PROBES = ("rademacher", "gaussian")


class LikelihoodResult(NamedTuple):
    """Output of :func:`log_likelihood` (per-sample arrays have shape ``(B,)``).

    Attributes:
      log_prob: ``log p_{t_data}(x) = prior_log_prob + delta_log_prob``, in nats.
      prior_log_prob: ``log p_{t_noise}(x_noise)`` under the prior density.
      delta_log_prob: ``-int_{t_noise}^{t_data} div u_t(x_t) dt`` along the trajectory.
      x_noise: the end point ``x_{t_noise}`` of the backward solve, shape of ``x``.
      nfe: field evaluations on the whole batch (a JVP counts as one): ``rhs_evals * D`` (exact) or
        ``rhs_evals * num_probes`` (Hutchinson).
      rhs_evals: evaluations of the augmented right-hand side, ``(stages - 1) * num_steps + 1``.
      num_steps: attempted (accepted + rejected) solver steps.
    """

    log_prob: Array
    prior_log_prob: Array
    delta_log_prob: Array
    x_noise: Array
    nfe: Array
    rhs_evals: Array
    num_steps: Array


# -- divergences ---------------------------------------------------------------------------------

def _flat_dim(x: Array) -> int:
    return int(np.prod(x.shape[1:], dtype=np.int64))


def value_and_divergence_exact(f: Callable[[Array], Array], x: Array) -> tuple[Array, Array]:
    r"""``(f(x), div f(x))`` with the exact per-sample divergence ``tr(df_i/dx_i)`` (Jacobian trace).

    ``f`` maps a batch ``(B, ...)`` to ``(B, ...)`` sample-wise. The trace is assembled from ``D``
    JVPs with the basis vectors ``e_j`` (each applied to every sample at once, as ``jax.jacfwd``
    does): ``div_b = sum_j (J e_j)_{b, j}``. Memory ``O(D^2 B)``: meant for small ``D``.
    """
    d = _flat_dim(x)
    basis = jnp.eye(d, dtype=x.dtype).reshape((d, 1) + x.shape[1:])
    basis = jnp.broadcast_to(basis, (d,) + x.shape)
    value, jv = jax.vmap(lambda v: jax.jvp(f, (x,), (v,)), out_axes=(None, 0))(basis)
    jv = jv.reshape((d, x.shape[0], d))
    return value, jnp.einsum("jbj->b", jv)


def value_and_divergence_hutchinson(f: Callable[[Array], Array], x: Array, probes: Array) -> tuple[Array, Array]:
    r"""``(f(x), mean_k v_k^T J v_k)``: the Hutchinson-Skilling estimate of the per-sample divergence.

    ``probes`` has shape ``(K,) + x.shape`` with ``E[v v^T] = I`` (Rademacher or standard normal);
    one JVP ``J v_k`` per probe. Unbiased: ``E[v^T J v] = tr(J E[v v^T]) = tr J``.
    """
    if probes.ndim != x.ndim + 1 or probes.shape[1:] != x.shape:
        raise ValueError(f"probes must have shape (K,) + x.shape = (K,) + {tuple(x.shape)}, got {tuple(probes.shape)}.")
    value, jv = jax.vmap(lambda v: jax.jvp(f, (x,), (v,)), out_axes=(None, 0))(probes)
    axes = tuple(range(2, probes.ndim))
    return value, jnp.mean(jnp.sum(probes * jv, axis=axes), axis=0)


def divergence_exact(f: Callable, x: Array, t: Array) -> Array:
    """Exact per-sample divergence ``(B,)`` of a field ``f(x, t)`` at ``(x, t)`` (see :func:`value_and_divergence_exact`)."""
    _check_batch(x)
    return value_and_divergence_exact(lambda y: f(y, t), x)[1]


def divergence_hutchinson(f: Callable, x: Array, t: Array, probes: Array) -> Array:
    """Hutchinson estimate ``(B,)`` of the divergence of ``f(x, t)``; ``probes`` of shape ``(K,) + x.shape``."""
    _check_batch(x)
    return value_and_divergence_hutchinson(lambda y: f(y, t), x, jnp.asarray(probes, x.dtype))[1]


def sample_probes(key: Array, shape: tuple[int, ...], num_probes: int = 1, probe: str = "rademacher",
                  dtype=jnp.float32) -> Array:
    """Draw ``num_probes`` probes of ``shape`` with ``E[v v^T] = I``: Rademacher (+-1) or standard normal."""
    if probe not in PROBES:
        raise ValueError(f"unknown probe {probe!r}; use one of {PROBES}.")
    if not isinstance(num_probes, (int, np.integer)) or num_probes < 1:
        raise ValueError(f"num_probes must be a positive int, got {num_probes!r}.")
    full = (int(num_probes),) + tuple(shape)
    if probe == "rademacher":
        return jax.random.rademacher(key, full, dtype=dtype)
    return jax.random.normal(key, full, dtype=dtype)


# -- the likelihood ------------------------------------------------------------------------------

def _adaptive_solver(method):
    """The diffrax solver of an adaptive ``method`` name (or a diffrax solver object)."""
    if isinstance(method, str):
        if method.lower() not in ADAPTIVE:
            raise ValueError(f"unknown method {method!r} for the likelihood ODE; use an adaptive method: "
                             f"{sorted(ADAPTIVE)}, or a diffrax solver.")
        method = method.lower()
    return diffrax_solver(method)


def _check_batch(x) -> None:
    if jnp.ndim(x) < 2:
        raise ValueError(f"x must have shape (B, ...) with a leading batch axis and at least one data axis, "
                         f"got shape {tuple(jnp.shape(x))}; reshape a single point to (1, d).")


def _check_times(path: GaussianPath, t_data, t_noise) -> tuple[float, float]:
    s = path.schedule
    t_data = s.t_max if t_data is None else t_data
    t_noise = s.t_min if t_noise is None else t_noise
    for name, v in (("t_data", t_data), ("t_noise", t_noise)):
        if not is_concrete(v) or np.ndim(v) != 0:
            raise ValueError(f"{name} must be a Python float (the integration interval is static), got {v!r}.")
    t_data, t_noise = float(t_data), float(t_noise)
    check_time(np.asarray([t_noise, t_data]), name="(t_noise, t_data)")
    if not t_noise < t_data:
        raise ValueError(f"need t_noise < t_data (t=0 is noise, t=1 is data), got t_noise={t_noise}, t_data={t_data}.")
    if t_noise < s.t_min or t_data > s.t_max:
        raise ValueError(
            f"the path '{path.name}' is defined on [t_min, t_max] = [{s.t_min:g}, {s.t_max:g}] (times outside are "
            f"clamped, so the ODE would be wrong there), got [t_noise, t_data] = [{t_noise:g}, {t_data:g}]; "
            "leave t_noise/t_data as None to use the path's domain.")
    return t_data, t_noise


def _check_identifiable(path: GaussianPath, prediction: str, t_data: float, t_noise: float) -> None:
    """Reject conversions to a velocity that are undetermined at an end of the interval."""
    check_data_identifiable(path, prediction, t_noise, what="the likelihood ODE", where="t_noise", min_alpha=1e-6,
                            quantity="velocity", fix="pass t_noise > 0 (e.g. 1e-3) and, for an exact endpoint, a "
                            "prior_log_prob of p_{t_noise}")
    with jax.ensure_compile_time_eval():
        beta1 = float(path.schedule.values(jnp.asarray(t_data, jnp.float32))[1])
    if prediction == "data" and beta1 < 1e-6:
        raise ValueError(
            f"a 'data' prediction does not determine the velocity at t_data={t_data:g}, where the path "
            f"'{path.name}' has beta_t = {beta1:.3g} (the noise is not identifiable from x there); pass "
            "t_data < 1 (e.g. 1 - 1e-3): the result is then log p_{t_data}, a slightly smoothed density.")


def log_likelihood(
    field: Callable,
    x: Array,
    *,
    path: GaussianPath | str,
    prediction: str = "velocity",
    method: str = "tsit5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    divergence: str = "exact",
    num_probes: int = 1,
    probe: str = "rademacher",
    key: Array | None = None,
    t_data: float | None = None,
    t_noise: float | None = None,
    cond: dict | None = None,
    prior_log_prob: Callable[[Array], Array] | None = None,
    max_steps: int = 4096,
    adjoint: Any = None,
) -> LikelihoodResult:
    r"""Log-likelihood ``log p_{t_data}(x)`` of a batch under the probability-flow ODE of ``field``.

    Solves, backwards from ``t_data`` to ``t_noise`` (Chen et al. 2018, thm. 1; Song et al. 2021, sec. 4.3)

    .. math:: \frac{d}{dt}\begin{bmatrix} x_t \\ g_t \end{bmatrix}
              = \begin{bmatrix} u_t(x_t) \\ \nabla\!\cdot u_t(x_t) \end{bmatrix},\quad
              x_{t_{data}} = x,\ g_{t_{data}} = 0,
              \qquad \log p_{t_{data}}(x) = \log p_{t_{noise}}(x_{t_{noise}}) + g_{t_{noise}},

    as one ODE for the whole batch (one step-size sequence, whose error norm covers every sample).

    Args:
      field: ``field(x, t, **cond)`` with ``x`` of shape ``(B, ...)``, ``t`` of shape ``(B,)``. Any
        parameterisation: it is converted to a velocity with :func:`jaxgen.fields.as_field`.
      x: data, floating point, shape ``(B, ...)``; the per-sample dimension is ``D = prod(x.shape[1:])``.
        For 8-bit images dequantise first (:func:`dequantize`, :func:`image_bits_per_dim`).
      path: the :class:`GaussianPath` (or its name) the field was trained on, or the
        :class:`~jaxgen.paths.StochasticInterpolant` of a velocity field. For data-to-data transport (a source that is
        not ``N(0, beta_0^2 I)``) pass the source's density as ``prior_log_prob``.
      prediction: ``velocity`` (flow matching), ``eps``/``score``/``data``/``v`` (diffusion models).
      method: adaptive Runge-Kutta method ``tsit5`` | ``dopri5`` | ``dopri8`` | ``bosh3`` (diffrax).
      rtol, atol: tolerances of diffrax's ``PIDController`` (on ``x`` and on ``g`` alike).
      divergence: ``exact`` (D JVPs per right-hand side; small D) or ``hutchinson``.
      num_probes, probe, key: Hutchinson probes (``rademacher`` or ``gaussian``), drawn once from
        ``key`` with shape ``(num_probes,) + x.shape`` and fixed over the solve. ``key`` is required.
      t_data, t_noise: the interval; default the path's domain ``[t_min, t_max]`` (``[0, 1]``, or
        ``[0, 1 - 1e-5]`` for VP/sub-VP, where the result is the density of the data convolved with a
        ``N(0, beta_{t_max}^2 = 1e-6)`` smoothing, and ``[0, 1]`` for VE/EDM, which end at
        ``N(0, sigma_min^2)``).
      cond: conditioning keywords passed to the field.
      prior_log_prob: ``x_noise -> (B,)`` log density of ``p_{t_noise}``. Default
        ``path.prior_log_prob(x_noise, t_noise)``: ``N(0, beta_{t_noise}^2 I)``. That is
        exact for the linear/cosine/polynomial paths (``alpha_0 = 0``) and an approximation for VP
        (``alpha_0 = e^{-5.025}``: the data mean is neglected, an error ``~ alpha_0 |mu||x_0|`` nats) and
        VE/EDM (prior ``N(0, sigma_max^2)`` for ``p_data * N(0, sigma_max^2)``).
      max_steps: diffrax's step limit (a solve that needs more raises).
      adjoint: diffrax adjoint for ``jax.grad`` through the solve (default ``RecursiveCheckpointAdjoint``:
        exact gradients of the numerical solution; a closure over parameters is fine with it).

    Returns:
      :class:`LikelihoodResult`. NFE: a JVP of the field counts as one evaluation, so
      ``nfe = rhs_evals * (D or num_probes)`` with ``rhs_evals = (stages - 1) * num_steps + 1`` (the count
      of :class:`jaxgen.samplers.Diffrax`).

    Call it inside ``jax.jit`` (with the field and options closed over) when calling it repeatedly.
    """
    prediction = canonical_prediction(prediction)
    if isinstance(path, StochasticInterpolant):  # its velocity field is all the ODE needs; its domain is its path's
        if prediction != "velocity":
            raise ValueError(f"the likelihood of a stochastic interpolant's field needs its velocity; got prediction="
                             f"{prediction!r}.")
        path = path.path
    path = as_path(path)
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; use 'exact' (small dimensions) or 'hutchinson'.")
    solver = _adaptive_solver(method)
    if divergence == "hutchinson":
        if key is None:
            raise ValueError("divergence='hutchinson' needs a PRNG key for its probes: pass key=jax.random.key(0).")
        if probe not in PROBES:
            raise ValueError(f"unknown probe {probe!r}; use one of {PROBES}.")
        if not isinstance(num_probes, (int, np.integer)) or num_probes < 1:
            raise ValueError(f"num_probes must be a positive int, got {num_probes!r}.")
    _check_batch(x)
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be floating point, got dtype {x.dtype}; dequantise integer images first with "
                         "jaxgen.likelihood.dequantize (or use image_bits_per_dim).")
    check_finite(x, name="x", hint="The likelihood of a point with NaN/inf coordinates is undefined.")
    check_tolerances(rtol, atol, max_steps, owner="log_likelihood")
    if key is not None:
        check_key(key, owner="log_likelihood")
    t_data, t_noise = _check_times(path, t_data, t_noise)
    _check_identifiable(path, prediction, t_data, t_noise)

    if prior_log_prob is not None:
        shape = jax.eval_shape(prior_log_prob, jax.ShapeDtypeStruct(x.shape, x.dtype)).shape
        if shape != (x.shape[0],):
            raise ValueError(f"prior_log_prob must return one value per sample, shape ({x.shape[0]},), got {shape}.")

    import diffrax

    dtype = x.dtype
    batch = x.shape[0]
    d = _flat_dim(x)
    cond = cond or {}
    velocity = as_field(path, field, source=prediction, target="velocity")

    if divergence == "hutchinson":
        probes = sample_probes(key, x.shape, int(num_probes), probe, dtype)
        per_rhs = int(num_probes)
    else:
        probes, per_rhs = None, d

    def rhs(t, state, args):
        y, _ = state
        tb = jnp.broadcast_to(jnp.asarray(t, dtype), (batch,))

        def f(z):
            out = velocity(z, tb, **cond)
            if getattr(out, "shape", None) != z.shape:
                raise ValueError(f"the field returned shape {getattr(out, 'shape', None)} for x of shape "
                                 f"{tuple(z.shape)}; a field must return an array of the same shape as x.")
            return out.astype(dtype)

        if probes is None:
            u, div = value_and_divergence_exact(f, y)
        else:
            u, div = value_and_divergence_hutchinson(f, y, probes)
        return u, div.astype(dtype)

    stages, fsal = diffrax_stages(solver)
    kwargs = {} if adjoint is None else {"adjoint": adjoint}
    sol = diffrax.diffeqsolve(
        diffrax.ODETerm(rhs), solver,
        jnp.asarray(t_data, dtype), jnp.asarray(t_noise, dtype), None,
        (x, jnp.zeros((batch,), dtype)),
        stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
        saveat=diffrax.SaveAt(t1=True), max_steps=max_steps, **kwargs)
    x_noise, delta = sol.ys[0][-1], sol.ys[1][-1]
    if prior_log_prob is None:
        prior = path.prior_log_prob(x_noise, t_noise)
    else:
        prior = jnp.asarray(prior_log_prob(x_noise)).astype(dtype)
    num_steps = sol.stats["num_steps"]
    rhs_evals = (stages - int(fsal)) * num_steps + int(fsal)
    return LikelihoodResult(prior + delta, prior, delta, x_noise, rhs_evals * per_rhs, rhs_evals, num_steps)


# -- bits per dimension ---------------------------------------------------------------------------


__all__ = ["LikelihoodResult", "log_likelihood", "divergence_exact", "divergence_hutchinson",
           "value_and_divergence_exact", "value_and_divergence_hutchinson", "sample_probes", "DIVERGENCES", "PROBES"]
