r"""Score matching without a known target: sliced score matching, and NCSN (noise-conditional score networks).

* :func:`sliced_score_matching_loss`: Hyvärinen's objective ``E[tr(grad_x s(x)) + 1/2 ||s(x)||^2]`` (Hyvärinen
  2005, eq. 4), which equals the Fisher divergence ``1/2 E||s - grad log p_data||^2`` up to a data-only constant,
  with the trace replaced by random projections ``v^T grad_x s(x) v`` (Song, Garg, Shi & Ermon 2019, "Sliced Score
  Matching: A Scalable Approach to Density and Score Estimation", eq. 8); each projection is one ``jax.jvp``.
* NCSN (Song & Ermon 2019, "Generative Modeling by Estimating Gradients of the Data Distribution"): a score network
  ``s(x, sigma)`` trained by denoising score matching over geometric noise levels ``sigma_max = sigma_1 > ... >
  sigma_L = sigma_min`` with ``lambda(sigma) = sigma^2`` (their eq. 6), and sampled by annealed Langevin dynamics
  (their Algorithm 1). In jaxgen this is the VE path (``alpha_t = 1``, ``beta_t = sigma(t)``, t=0 noise, t=1 data;
  :func:`ncsn_path`), the library's :func:`jaxgen.losses.denoising_score_matching_loss` (whose default weighting is
  ``beta_t^2 = sigma^2``) on the levels' times (:func:`ncsn_loss`), and the library's
  :class:`jaxgen.samplers.Langevin` along those times (:func:`annealed_langevin`).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxgen._checks import check_key, check_number, expand_like, safe_divide
from jaxgen.fields import tweedie_data
from jaxgen.losses.regression import denoising_score_matching_loss, split_batch, uniform_time
from jaxgen.paths import GaussianPath, as_path, custom, ve
from jaxgen.samplers import Langevin, sample

Array = jax.Array

PROJECTIONS = ("gaussian", "rademacher", "sphere")


def _projections(key: Array, shape: tuple[int, ...], kind: str, dtype) -> Array:
    """Random directions ``v`` with ``E[v v^T] = I``: standard normal, Rademacher (+-1), or uniform on the sphere of
    radius ``sqrt(D)`` (``D`` the per-sample dimension)."""
    if kind == "gaussian":
        return jax.random.normal(key, shape, dtype)
    if kind == "rademacher":
        return jax.random.rademacher(key, shape, dtype)
    v = jax.random.normal(key, shape, dtype)
    flat = v.reshape(shape[0], -1)
    norm = jnp.sqrt(jnp.maximum(jnp.sum(flat**2, -1), 1e-30))
    return v * expand_like(math.sqrt(flat.shape[1]) / norm, v)


def sliced_score_matching_objective(field: Callable, x: Array, t: Array, key: Array, *, projection: str = "gaussian",
                                    num_projections: int = 1, variance_reduction: bool = True,
                                    cond: dict | None = None) -> Array:
    r"""The per-sample sliced score matching objective (Song et al. 2019, eq. 8), ``(B,)``:

    .. math:: J(x) = \frac1M \sum_{m=1}^M \Big[ v_m^\top \nabla_x s(x)\, v_m + \tfrac12 (v_m^\top s(x))^2 \Big],

    or with ``variance_reduction`` (SSM-VR, Song et al. 2019, sec. 3) the second term replaced by its expectation
    ``1/2 ||s(x)||^2``, exact since ``E[v v^T] = I``. Each ``v^T grad s v`` is one ``jax.jvp`` of ``x -> s(x, t)`` in
    the direction ``v``, which also returns ``s(x)``. Sums run over every coordinate of a sample (not means), so
    ``E_v[J]`` is Hyvärinen's ``tr(grad s) + 1/2 ||s||^2`` exactly.
    """
    n = x.shape[0]
    f = lambda y: field(y, t, **(cond or {}))
    total = jnp.zeros((n,), x.dtype)
    for m in range(num_projections):
        v = _projections(jax.random.fold_in(key, m), x.shape, projection, x.dtype)
        s, jv = jax.jvp(f, (x,), (v,))
        if s.shape != x.shape:
            raise ValueError(f"the score field returned shape {s.shape} for x of shape {tuple(x.shape)}; a score field "
                             "must return an array of x's shape.")
        vjv = jnp.sum(jnp.reshape(v * jv, (n, -1)), -1)
        if variance_reduction:
            quad = 0.5 * jnp.sum(jnp.reshape(s**2, (n, -1)), -1)
        else:
            quad = 0.5 * jnp.sum(jnp.reshape(v * s, (n, -1)), -1) ** 2
        total = total + vjv + quad
    return total / num_projections


def sliced_score_matching_loss(
    *,
    projection: str = "gaussian",
    num_projections: int = 1,
    variance_reduction: bool | None = None,
    t: float = 1.0,
    noise_std: float = 0.0,
    path: GaussianPath | str | None = None,
    time_sampler: Callable[[Array, int], Array] | None = None,
    weighting: Callable[[Array], Array] | None = None,
) -> Callable:
    r"""Sliced score matching (Song et al. 2019, eq. 8; SSM-VR) for a score field ``model(x, t, **cond)``:
    ``loss(model, batch, key) -> scalar``, the batch mean of :func:`sliced_score_matching_objective`.

    Two forms:

    * fixed time (``path=None``): the field is evaluated at ``t`` (e.g. a score network of one noise level) on the
      data, perturbed as ``x = z + noise_std * eps`` when ``noise_std > 0`` (then the minimiser is the score of the
      smoothed data ``p_data * N(0, noise_std^2 I)``, which is finite and defined off the data's support);
    * noise-conditional (``path`` given): ``t ~ time_sampler`` (default uniform on the path's domain),
      ``x_t = alpha_t z + beta_t eps``, and the objective at ``(x_t, t)`` weighted by ``lambda(t) = weighting(t)``,
      by default ``beta_t^2`` (NCSN's ``lambda(sigma) = sigma^2``; Song & Ermon 2019, eq. 6). Its minimiser is the
      marginal score ``grad log p_t`` at every ``t``, as denoising score matching's, without the conditional target.

    Args:
      projection: ``"gaussian"``, ``"rademacher"`` or ``"sphere"`` (all with ``E[v v^T] = I``).
      num_projections: projections per sample (``M``); each costs one ``jvp`` of the field.
      variance_reduction: use ``1/2 ||s||^2`` for ``1/2 (v^T s)^2`` (SSM-VR). Default: True for Gaussian projections
        (the paper's SSM-VR), False otherwise.
      t, noise_std: the fixed-time form's time and data perturbation.
      path, time_sampler, weighting: the noise-conditional form's.
    """
    owner = "sliced_score_matching_loss"
    if projection not in PROJECTIONS:
        raise ValueError(f"{owner}: projection must be one of {PROJECTIONS}, got {projection!r}.")
    if isinstance(num_projections, bool) or not isinstance(num_projections, int) or num_projections < 1:
        raise ValueError(f"{owner}: num_projections must be a positive int, got {num_projections!r}.")
    vr = projection == "gaussian" if variance_reduction is None else bool(variance_reduction)
    check_number(noise_std, lambda v: v >= 0, name="noise_std", owner=owner, what="a number >= 0")
    check_number(t, lambda v: 0 <= v <= 1, name="t", owner=owner, what="a time in [0, 1] (t=1 data)")
    if path is None and (time_sampler is not None or weighting is not None):
        raise ValueError(f"{owner}: time_sampler and weighting belong to the noise-conditional form; pass path=... "
                         "(e.g. ncsn_path(0.01, 50.0)) or drop them.")
    if path is not None:
        path = as_path(path)
        time_sampler = time_sampler or uniform_time(path.schedule.t_min, path.schedule.t_max)

    def loss(field, batch, key: Array) -> Array:
        z, cond = split_batch(batch, owner=owner)
        check_key(key, owner=owner)
        n = z.shape[0]
        k_t, k_eps, k_v = jax.random.split(key, 3)
        eps = jax.random.normal(k_eps, z.shape, z.dtype)
        if path is None:
            x = z + noise_std * eps if noise_std > 0 else z
            tt = jnp.full((n,), t, z.dtype)
            return jnp.mean(sliced_score_matching_objective(field, x, tt, k_v, projection=projection,
                                                            num_projections=num_projections,
                                                            variance_reduction=vr, cond=cond))
        tt = time_sampler(k_t, n).astype(z.dtype)
        x = path.sample(z, eps, tt)
        per = sliced_score_matching_objective(field, x, tt, k_v, projection=projection,
                                              num_projections=num_projections, variance_reduction=vr, cond=cond)
        w = path.coefficients(tt).beta.astype(z.dtype) ** 2 if weighting is None else weighting(tt)
        return jnp.mean(w * per)

    return loss


# ---------------------------------------------------------------------------------------------------------
# NCSN: noise levels on the VE path, the noise-conditional parameterisation, annealed Langevin.
# ---------------------------------------------------------------------------------------------------------


def ncsn_path(sigma_min: float = 0.01, sigma_max: float = 50.0) -> GaussianPath:
    r"""The VE path of NCSN's noise levels: ``x_t = z + sigma(t) eps`` with ``sigma(t) = sigma_min (sigma_max /
    sigma_min)^{1 - t}`` (Song et al. 2021, eq. 31, mapped to jaxgen time: t=0 ``sigma_max``, t=1 ``sigma_min``).
    The library's :func:`jaxgen.paths.ve` schedule, whose boundary check asks ``sigma_min <= 0.05`` and
    ``sigma_max >= 20``; outside that range the same formula as a custom schedule named ``"ve"`` (for small data such
    as 2-D targets, where ``sigma_max`` of the order of the data's diameter suffices, Song & Ermon 2020, technique 1)."""
    owner = "ncsn_path"
    check_number(sigma_min, lambda v: v > 0, name="sigma_min", owner=owner, what="a number > 0")
    check_number(sigma_max, lambda v: v > sigma_min, name="sigma_max", owner=owner, what="a number > sigma_min")
    if sigma_min <= 0.05 and sigma_max >= 20.0:
        return GaussianPath(ve(sigma_min, sigma_max))
    log_ratio = math.log(sigma_max / sigma_min)
    tol = max(sigma_min, 1.0 / sigma_max) * (1.0 + 1e-6)
    return GaussianPath(custom(lambda t: jnp.ones_like(t), lambda t: sigma_min * jnp.exp((1.0 - t) * log_ratio),
                               name="ve", boundary="approximate", boundary_tol=tol))


def ncsn_times(num_levels: int) -> Array:
    r"""The times ``t_i = i / (L - 1)``, ``i = 0..L-1``, of ``L`` geometric noise levels on :func:`ncsn_path`:
    ``sigma(t_i) = sigma_max (sigma_min / sigma_max)^{i / (L - 1)}`` (Song & Ermon 2019, sec. 4.2), from
    ``sigma_max`` (t=0) to ``sigma_min`` (t=1). One level is ``t = 1`` (``sigma_min``)."""
    if isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 1:
        raise ValueError(f"num_levels must be a positive int, got {num_levels!r}.")
    if num_levels == 1:
        return jnp.ones((1,), jnp.float32)
    return jnp.linspace(0.0, 1.0, num_levels, dtype=jnp.float32)


def level_time_sampler(num_levels: int) -> Callable[[Array, int], Array]:
    """``t ~ U{t_0, ..., t_{L-1}}`` (:func:`ncsn_times`): NCSN's training draws one of its ``L`` levels per sample."""
    times = ncsn_times(num_levels)
    return lambda key, n: times[jax.random.randint(key, (n,), 0, times.shape[0])]


def ncsn_loss(path: GaussianPath | str, num_levels: int | None = 10, **kwargs) -> Callable:
    r"""NCSN's objective (Song & Ermon 2019, eq. 6): ``1/L sum_i sigma_i^2 E|| s(z + sigma_i eps, sigma_i) + eps /
    sigma_i ||^2``, which is :func:`jaxgen.losses.denoising_score_matching_loss` on the VE ``path`` (default weight
    ``beta_t^2 = sigma^2``) with ``t`` drawn from the ``num_levels`` level times (``None``: continuous ``t``,
    uniform in ``log sigma``, as NCSN++ / score_sde). ``kwargs`` go to the DSM loss."""
    if num_levels is not None:
        kwargs.setdefault("time_sampler", level_time_sampler(num_levels))
    return denoising_score_matching_loss(path, **kwargs)


PRECONDITIONINGS = ("ncsn", "edm")


def noise_conditional_score(net: Callable, path: GaussianPath | str, *, sigma_data: float = 1.0,
                            preconditioning: str = "ncsn") -> Callable:
    r"""A score field ``s(x, t)`` from a network ``net(x, t, **cond)`` (``MLPField``, ``UNetField``) that sees and
    predicts unit-scale quantities at every noise level. Both forms scale the input to unit variance,
    ``c_in = 1 / sqrt(alpha_t^2 sigma_data^2 + beta_t^2)`` (EDM's ``c_in``, Karras et al. 2022, Table 1):

    * ``"ncsn"``: ``s = net(c_in x, t) / beta_t``, the output scaled by ``1 / sigma`` (Song & Ermon 2020, "Improved
      Techniques for Training Score-Based Generative Models", technique 3); :func:`ncsn_loss` is then
      ``E|| net + eps ||^2``, noise prediction, at every level;
    * ``"edm"``: the network is the denoiser's residual, ``D = c_skip x/alpha + c_out net`` with ``c_skip =
      sigma_d^2 / (sigma^2 + sigma_d^2)``, ``c_out = sigma sigma_d / sqrt(sigma^2 + sigma_d^2)``, ``sigma = beta /
      alpha`` (Karras et al. 2022, Table 1), and the score is Tweedie's ``(alpha D - x) / beta^2``, i.e.
      ``s = alpha sigma_d net / (beta sqrt(beta^2 + alpha^2 sigma_d^2)) - x / (beta^2 + alpha^2 sigma_d^2)``: at small
      noise the network predicts the data (a skip connection carries ``x``) instead of extracting the tiny noise.

    ``beta_t`` is floored at ``1e-6``.
    """
    path = as_path(path)
    check_number(sigma_data, lambda v: v > 0, name="sigma_data", owner="noise_conditional_score", what="a number > 0")
    if preconditioning not in PRECONDITIONINGS:
        raise ValueError(f"preconditioning must be one of {PRECONDITIONINGS}, got {preconditioning!r}.")

    def field(x: Array, t: Array, **cond: Any) -> Array:
        tb = jnp.broadcast_to(jnp.asarray(t, x.dtype), (x.shape[0],))
        c = path.coefficients(tb)
        alpha, beta = expand_like(c.alpha.astype(x.dtype), x), expand_like(c.beta.astype(x.dtype), x)
        var = alpha**2 * sigma_data**2 + beta**2
        out = net(jax.lax.rsqrt(var) * x, tb, **cond)
        if preconditioning == "ncsn":
            return safe_divide(out, beta)
        return safe_divide(alpha * sigma_data * out, beta * jnp.sqrt(var)) - x / var

    return field


def annealed_langevin(field: Callable, x0: Array, key: Array, path: GaussianPath | str, *, num_levels: int = 10,
                      steps_per_level: int = 10, snr: float | None = 0.16, step_size: float | None = None,
                      denoise: bool = True, cond: dict | None = None) -> tuple[Array, int]:
    r"""Annealed Langevin dynamics (Song & Ermon 2019, Algorithm 1) of a score field on NCSN's levels.

    From ``x0`` (draw it from the prior ``N(0, sigma_max^2 I)``: ``path.sample_prior``), ``steps_per_level``
    Langevin steps ``x <- x + eta_i s(x, sigma_i) + sqrt(2 eta_i) xi`` at each level ``sigma_1 > ... > sigma_L``:

    * ``snr`` (default): ``eta_i`` from the target signal-to-noise ratio (Song et al. 2021, Algorithm 4), which makes
      ``eta_i`` proportional to ``sigma_i^2`` as Algorithm 1's: one call of
      ``sample(field, x0, Langevin(snr=snr, steps_per_level=...), ts=levels, prediction="score")``;
    * ``step_size`` ``epsilon`` (and ``snr=None``): Algorithm 1's ``eta_i = alpha_i / 2 = epsilon sigma_i^2 /
      (2 sigma_L^2)``. The :class:`~jaxgen.samplers.Langevin` solver takes one fixed step size, so each level is
      its own ``sample(..., Langevin(step_size=eta_i, t=t_i))`` call, the levels run by a ``lax.scan``.

    ``denoise`` ends with Tweedie's step ``x + sigma_L^2 s(x, sigma_L)`` (the posterior mean of the data; Song &
    Ermon 2020, sec. 4 / Jolicoeur-Martineau et al. 2021), one more evaluation.

    Returns:
      ``(x, nfe)`` with ``nfe = num_levels * steps_per_level (+ 1 with denoise)`` evaluations of the field.
    """
    path = as_path(path)
    if (snr is None) == (step_size is None):
        raise ValueError("annealed_langevin needs exactly one of snr (the SNR step rule) and step_size (Song & "
                         f"Ermon's epsilon), got snr={snr!r}, step_size={step_size!r}.")
    times = ncsn_times(num_levels)
    if snr is not None:
        ts = jnp.concatenate([times, times[-1:]])  # the last grid time ends the sweep and is not evaluated
        res = sample(field, x0, Langevin(snr=snr, steps_per_level=steps_per_level), path=path, prediction="score",
                     ts=ts, key=key, cond=cond)
        x, nfe = res.x, int(res.nfe)
    else:
        check_number(step_size, lambda v: v > 0, name="step_size", owner="annealed_langevin", what="a number > 0")
        sig = path.coefficients(times).beta
        etas = 0.5 * step_size * (sig / sig[-1]) ** 2
        count = [0]

        def level(x, inp):
            i, t, eta = inp
            res = sample(field, x, Langevin(step_size=eta, t=t), steps=steps_per_level, prediction="score",
                         key=jax.random.fold_in(key, i), cond=cond)
            count[0] = int(res.nfe)
            return res.x, None

        x, _ = jax.lax.scan(level, x0, (jnp.arange(num_levels), times, etas))
        nfe = count[0] * num_levels
    if denoise:
        t_last = jnp.full((x.shape[0],), times[-1], x.dtype)
        x = tweedie_data(path, field(x, t_last, **(cond or {})), x, t_last)
        nfe += 1
    return x, nfe


__all__ = ["sliced_score_matching_loss", "sliced_score_matching_objective", "ncsn_path", "ncsn_times",
           "level_time_sampler", "ncsn_loss", "noise_conditional_score", "annealed_langevin", "PROJECTIONS",
           "PRECONDITIONINGS"]
