r"""Training objectives on Gaussian paths: conditional flow matching and its siblings.

Each constructor returns a pure loss function ``loss(field, batch, key) -> scalar`` that composes
with ``jit``, ``vmap`` and ``grad``:

* ``field`` is any callable with jaxgen's field signature ``field(x, t, **cond)``. A Flax NNX module
  is both the field and its parameters (modules are pytrees), so ``jax.grad(loss)(model, batch, key)``
  and ``nnx.grad`` work directly; for a pure ``apply(params, x, t)`` use :func:`with_params`.
* ``batch`` is an array of data ``z`` of shape ``(B, ...)`` or a dict ``{"x": z, **cond}`` whose other
  entries (e.g. ``"y"`` labels) are passed to the field by keyword.
* ``key`` is a PRNG key; the loss draws ``t``, the noise (or source sample) and any coupling from it.

All losses regress the network output onto the target of their parameterisation (see
:mod:`jaxgen.fields`) at ``x_t = alpha_t z + beta_t eps``:

=====================================  ==================  ======================================
loss                                    target              reference
=====================================  ==================  ======================================
:func:`flow_matching_loss` (CFM)        ``da z + db eps``   notes eq. 4.1.2-4.1.3; Lipman et al. 2023
:func:`denoising_score_matching_loss`   ``-eps / beta``     notes sec. 4.2.2; Vincent 2011; Song 2021
:func:`noise_prediction_loss` (DDPM)    ``eps``             notes sec. 4.2.2; Ho et al. 2020
:func:`data_prediction_loss` (x0)       ``z``               Karras et al. 2022 (denoiser)
:func:`v_prediction_loss`               ``a eps - b z``     Salimans & Ho 2022
=====================================  ==================  ======================================

The squared error is averaged over the feature dimensions of each sample, multiplied by an
optional time weighting ``weighting(t) -> (B,)``, and averaged over the batch.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from jaxgen.fields import canonical_prediction, from_data_and_noise
from jaxgen.paths.gaussian import GaussianPath, as_path
from jaxgen.paths.interpolants import StochasticInterpolant
from jaxgen._checks import check_data, check_key, expand_like, safe_divide

Array = jax.Array
LossFn = Callable[[Any, Any, Array], Array]
Source = Callable[[Array, int], Array]


def split_batch(batch, *, owner: str = "loss") -> tuple[Array, dict]:
    """Split a batch into the data ``z`` and the conditioning keywords, checking that ``z`` is a non-empty floating
    batch (finite when concrete) and that every conditioning array has the batch's leading size."""
    if isinstance(batch, dict):
        if "x" not in batch:
            raise ValueError(f"a dict batch must hold the data under key 'x'; got keys {sorted(batch)}.")
        z, cond = batch["x"], {k: v for k, v in batch.items() if k != "x"}
    else:
        z, cond = batch, {}
    check_data(z, owner=owner)
    n = jnp.shape(z)[0]
    for k, v in cond.items():
        shape = jnp.shape(v)
        if len(shape) >= 1 and shape[0] != n:
            raise ValueError(f"{owner}: batch[{k!r}] has leading size {shape[0]} but the data batch has {n}; each "
                             f"conditioning array needs one entry per sample, shape ({n}, ...).")
    return z, cond


def uniform_time(lo: float = 0.0, hi: float = 1.0) -> Callable[[Array, int], Array]:
    """``t ~ U(lo, hi)``."""
    return lambda key, n: jax.random.uniform(key, (n,), minval=lo, maxval=hi)


def logit_normal_time(mean: float = 0.0, std: float = 1.0, lo: float = 0.0, hi: float = 1.0):
    """``t = sigmoid(N(mean, std^2))`` rescaled to ``[lo, hi]`` (Esser et al. 2024, SD3)."""
    return lambda key, n: lo + (hi - lo) * jax.nn.sigmoid(mean + std * jax.random.normal(key, (n,)))


def _check_output(out, z, prediction):
    if getattr(out, "shape", None) != z.shape:
        raise ValueError(
            f"the field returned shape {getattr(out, 'shape', None)} for data of shape {tuple(z.shape)}; "
            f"a {prediction} field must return an array of the same shape as x (field(x, t) with t of shape (B,))."
        )


def regression_loss(
    path: GaussianPath | StochasticInterpolant | str,
    prediction: str = "velocity",
    *,
    source: Source | None = None,
    coupling: Callable[[Array, Array, Array], tuple[Array, Array]] | None = None,
    weighting: Callable[[Array], Array] | None = None,
    time_sampler: Callable[[Array, int], Array] | str = "uniform",
    t_range: tuple[float, float] | None = None,
    label_dropout: float = 0.0,
    null_label: int | None = None,
    label_key: str = "y",
) -> LossFn:
    r"""The generic objective ``E_{t, z, eps} [ w(t) || f_theta(x_t, t) - target(z, eps, t) ||^2 ]``.

    Args:
      path: the Gaussian path (or a schedule name), or a :class:`~jaxgen.paths.StochasticInterpolant`
        ``x_t = alpha_t z + beta_t x_source + gamma_t xi`` (Albergo et al. 2023, eq. 2.1; Schrödinger-bridge CFM).
        With ``gamma != 0`` the targets are the interpolant's: velocity ``d_alpha z + d_beta x_source + d_gamma xi``
        (eq. 2.10) and score ``-xi / gamma_t`` (eq. 2.14, regressed as ``|| gamma_t s_theta + xi ||^2``, valid for any
        source and coupling); other predictions are refused.
      prediction: what the field predicts: ``velocity``, ``score``, ``eps``, ``data`` or ``v`` (aliases allowed).
      source: sampler ``source(key, n) -> (n, ...)`` of the noise ``eps``; ``None`` draws
        ``eps ~ N(0, I)``. The t=0 distribution is then that of ``alpha_0 z + beta_0 eps``, so sample
        from ``beta_0 * source`` (``beta_0 = 1`` except for VE/EDM). A non-Gaussian source (e.g. 8 Gaussians -> moons) makes
        ``x_t = alpha_t z + beta_t x_source`` an interpolant rather than a Gaussian path; velocity,
        data, eps (= the source point) and v targets stay valid, the score target does not.
      coupling: how the source points are paired with the data minibatch (default: independently). A
        :mod:`jaxgen.couplings` object (``ExactOT()``, ``SinkhornOT(...)``: minibatch OT, OT-CFM; Tong et al. 2024)
        returns index pairs ``(i, j)``: the loss trains on ``(x_source[i], z[j])`` and gathers the conditioning with
        ``j`` (a class-conditional coupling receives the labels ``batch[coupling.label_key]``). A plain
        ``coupling(key, x_source, z) -> (x_source, z)`` (e.g. :func:`jaxgen.couplings.reflow_coupling`) returns the
        pairs themselves and must keep the data's order when the batch has conditioning.
      weighting: optional ``w(t) -> (B,)`` time weighting. For ``score`` the default is
        ``w = beta_t^2`` (Song et al. 2021's ``lambda(t) = sigma^2``), computed as
        ``|| beta_t s_theta + eps ||^2`` so that it stays finite at ``beta_t = 0``.
      time_sampler: ``"uniform"``, ``"logit_normal"`` or ``sampler(key, n) -> (n,)``.
      t_range: ``(lo, hi)`` for the built-in time samplers; default is the schedule's domain
        (``[0, 1 - 1e-5]`` for VP, as score_sde's ``eps``).
      label_dropout: probability with which each sample's label ``batch[label_key]`` is replaced by
        ``null_label`` (classifier-free guidance training, Ho & Salimans 2022; notes sec. 5.2.2), so one
        network learns both ``u(x|y)`` and ``u(x|null)``.
    """
    interpolant = path if isinstance(path, StochasticInterpolant) and path.has_noise else None
    path = path.path if isinstance(path, StochasticInterpolant) else as_path(path)
    prediction = canonical_prediction(prediction)
    if interpolant is not None and prediction not in ("velocity", "score"):
        raise ValueError(f"a stochastic interpolant (gamma != 0) has velocity and score targets; got prediction="
                         f"{prediction!r}. Use 'velocity' or 'score' (or gamma='zero').")
    if source is not None and prediction == "score" and interpolant is None:
        raise ValueError("the score target -eps/beta_t assumes a Gaussian source; with a custom source use "
                         "prediction='velocity', 'data', 'eps' or 'v', or a StochasticInterpolant (gamma != 0), "
                         "whose score target -xi/gamma_t holds for any source.")
    if coupling is not None and not callable(coupling) and not hasattr(coupling, "indices"):
        raise TypeError(f"coupling must be a jaxgen coupling (e.g. jaxgen.couplings.ExactOT()) or a callable "
                        f"coupling(key, x_source, z) -> (x_source, z), got {type(coupling).__name__}.")
    lo, hi = t_range if t_range is not None else (path.schedule.t_min, path.schedule.t_max)
    if not 0.0 <= lo < hi <= 1.0:
        raise ValueError(f"t_range must satisfy 0 <= lo < hi <= 1, got {(lo, hi)}.")
    if not 0.0 <= label_dropout < 1.0:
        raise ValueError(f"label_dropout must be in [0, 1), got {label_dropout}.")
    if label_dropout > 0 and null_label is None:
        raise ValueError("label_dropout > 0 needs the null label: pass null_label=num_classes (the extra class "
                         "of a guidance-ready network).")
    if isinstance(time_sampler, str):
        if time_sampler == "uniform":
            time_sampler = uniform_time(lo, hi)
        elif time_sampler == "logit_normal":
            time_sampler = logit_normal_time(lo=lo, hi=hi)
        else:
            raise ValueError(f"unknown time_sampler {time_sampler!r}; use 'uniform', 'logit_normal' or a callable.")

    def loss(field, batch, key: Array) -> Array:
        z, cond = split_batch(batch, owner=f"{prediction} regression loss")
        check_key(key, owner="the loss")
        n = z.shape[0]
        k_t, k_eps, k_c = jax.random.split(key, 3)
        if source is None:
            eps = jax.random.normal(k_eps, z.shape, z.dtype)
        else:
            eps = source(k_eps, n).astype(z.dtype)
            if eps.shape != z.shape:
                raise ValueError(f"source returned shape {tuple(eps.shape)}, expected the data's shape {tuple(z.shape)}.")
        if hasattr(coupling, "indices"):
            label = getattr(coupling, "label_key", None)
            if label is not None and label not in cond:
                raise ValueError(f"the class-conditional coupling needs labels in the batch under key {label!r}; got "
                                 f"keys {sorted(['x', *cond])}.")
            i, j = coupling.indices(k_c, eps, z, labels=None if label is None else cond[label])
            eps, z = eps[i], z[j]
            cond = {k: (v[j] if jnp.ndim(v) >= 1 else v) for k, v in cond.items()}
        elif coupling is not None:
            eps, z = coupling(k_c, eps, z)
        if label_dropout > 0:
            if label_key not in cond:
                raise ValueError(f"label_dropout needs labels in the batch under key {label_key!r}; got keys "
                                 f"{sorted(['x', *cond])}.")
            labels = cond[label_key]
            drop = jax.random.bernoulli(jax.random.fold_in(k_c, 1), label_dropout, (n,))
            drop = jnp.reshape(drop, (n,) + (1,) * (jnp.ndim(labels) - 1))  # a token sequence drops as a whole
            cond = {**cond, label_key: jnp.where(drop, jnp.asarray(null_label, labels.dtype), labels)}
        t = time_sampler(k_t, n).astype(z.dtype)
        if interpolant is not None:
            xi = jax.random.normal(jax.random.fold_in(k_eps, 1), z.shape, z.dtype)
            xt = interpolant.sample(z, eps, xi, t)
            out = field(xt, t, **cond)
            _check_output(out, z, prediction)
            if prediction == "velocity":
                per = jnp.mean(jnp.reshape((out - interpolant.conditional_velocity(z, eps, xi, t)) ** 2, (n, -1)), -1)
                return jnp.mean(per if weighting is None else weighting(t) * per)
            # w/gamma^2 * || gamma s + xi ||^2, with w = gamma^2 by default.
            g = interpolant.coefficients(t).gamma.astype(z.dtype)
            per = jnp.mean(jnp.reshape((expand_like(g, z) * out + xi) ** 2, (n, -1)), -1)
            if weighting is not None:
                per = safe_divide(weighting(t) * per, g**2, floor=1e-12)
            return jnp.mean(per)
        xt = path.sample(z, eps, t)
        out = field(xt, t, **cond)
        _check_output(out, z, prediction)
        if prediction == "score":
            # w/beta^2 * || beta s + eps ||^2, with w = beta^2 by default.
            beta = expand_like(path.coefficients(t).beta.astype(z.dtype), z)
            resid = beta * out + eps
            per = jnp.mean(jnp.reshape(resid**2, (n, -1)), -1)
            if weighting is not None:
                b2 = path.coefficients(t).beta.astype(z.dtype) ** 2
                per = safe_divide(weighting(t) * per, b2, floor=1e-12)
            return jnp.mean(per)
        target = from_data_and_noise(path, z, eps, t, prediction)
        per = jnp.mean(jnp.reshape((out - target) ** 2, (n, -1)), -1)
        if weighting is not None:
            per = weighting(t) * per
        return jnp.mean(per)

    return loss


def velocity_and_score_loss(path: GaussianPath | StochasticInterpolant | str, *, score_weight: float = 1.0,
                            **kwargs) -> LossFn:
    r"""Velocity and score regressed together from the same draws: ``L_u(model.velocity) + w L_s(model.score)``.

    For the SDE of a stochastic interpolant or of Schrödinger-bridge CFM (SF2M, Tong et al. 2024, eq. 20), whose
    velocity and score are two fields (:func:`jaxgen.fields.interpolant_drift`). ``model`` is any object with
    ``velocity`` and ``score`` fields, e.g. :class:`jaxgen.models.VelocityAndScore`; both losses see the same times,
    source points, coupling and noise (one key). Options as :func:`regression_loss`.
    """
    if not (isinstance(score_weight, (int, float)) and score_weight >= 0):
        raise ValueError(f"score_weight must be a number >= 0, got {score_weight!r}.")
    velocity = regression_loss(path, "velocity", **kwargs)
    score = regression_loss(path, "score", **kwargs)

    def loss(model, batch, key: Array) -> Array:
        if not (hasattr(model, "velocity") and hasattr(model, "score")):
            raise TypeError(f"velocity_and_score_loss trains a model with .velocity and .score fields (e.g. "
                            f"jaxgen.models.VelocityAndScore), got {type(model).__name__}.")
        return velocity(model.velocity, batch, key) + score_weight * score(model.score, batch, key)

    return loss


def flow_matching_loss(path: GaussianPath | str, **kwargs) -> LossFn:
    r"""Conditional flow matching (notes eq. 4.1.2): ``|| u_theta(x_t, t) - (da_t z + db_t eps) ||^2``.

    For CondOT (the default) the target is ``z - eps`` (notes Algorithm 1). Its gradient equals that
    of the marginal flow-matching loss ``|| u_theta - u_t(x) ||^2`` (the two differ by a constant).
    """
    return regression_loss(path, "velocity", **kwargs)


def denoising_score_matching_loss(path: GaussianPath | str, **kwargs) -> LossFn:
    r"""Denoising score matching (notes sec. 4.2.2): ``lambda(t) || s_theta(x_t, t) + eps / beta_t ||^2``."""
    return regression_loss(path, "score", **kwargs)


def noise_prediction_loss(path: GaussianPath | str, **kwargs) -> LossFn:
    r"""DDPM's simple loss (notes sec. 4.2.2, Ho et al. 2020 eq. 14): ``|| eps_theta(x_t, t) - eps ||^2``."""
    return regression_loss(path, "eps", **kwargs)


def data_prediction_loss(path: GaussianPath | str, **kwargs) -> LossFn:
    r"""Data (x0) prediction: ``|| D_theta(x_t, t) - z ||^2``, the denoiser objective."""
    return regression_loss(path, "data", **kwargs)


def v_prediction_loss(path: GaussianPath | str, **kwargs) -> LossFn:
    r"""v-prediction (Salimans & Ho 2022): ``|| v_theta(x_t, t) - (alpha_t eps - beta_t z) ||^2``."""
    return regression_loss(path, "v", **kwargs)


def marginal_regression_loss(
    path: GaussianPath | str,
    target_field: Callable[[Array, Array], Array],
    prediction: str = "velocity",
    *,
    time_sampler: Callable[[Array, int], Array] | None = None,
) -> LossFn:
    r"""Regression onto a known *marginal* field: ``E_{t, x ~ p_t} || f_theta(x, t) - f_t(x) ||^2``.

    With the oracle's ``u_t(x)`` as ``target_field`` this is the marginal flow-matching loss
    ``L_FM`` of notes eq. 4.1.1 (tractable only when ``u_t`` is known). ``x ~ p_t`` is drawn as
    ``alpha_t z + beta_t eps`` from the data in ``batch``.
    """
    path = as_path(path)
    time_sampler = time_sampler or uniform_time(path.schedule.t_min, path.schedule.t_max)

    def loss(field, batch, key):
        z, cond = split_batch(batch, owner="marginal regression loss")
        check_key(key, owner="the loss")
        n = z.shape[0]
        k_t, k_eps, _ = jax.random.split(key, 3)  # the same draws as regression_loss for the same key
        t = time_sampler(k_t, n).astype(z.dtype)
        xt = path.sample(z, jax.random.normal(k_eps, z.shape, z.dtype), t)
        out = field(xt, t, **cond)
        _check_output(out, z, prediction)
        return jnp.mean(jnp.mean(jnp.reshape((out - target_field(xt, t)) ** 2, (n, -1)), -1))

    return loss


def with_params(apply_fn: Callable[..., Array]) -> Callable[[LossFn], Callable[[Any, Any, Array], Array]]:
    """Adapt a loss to a pure ``apply_fn(params, x, t, **cond)``: ``with_params(apply)(loss)(params, batch, key)``."""

    def adapt(loss: LossFn):
        def loss_params(params, batch, key):
            return loss(lambda x, t, **c: apply_fn(params, x, t, **c), batch, key)

        return loss_params

    return adapt
