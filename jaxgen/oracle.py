r"""Analytic oracle: exact marginal fields of a Gaussian path for Gaussian-mixture data.

For data ``p_data = sum_k pi_k N(mu_k, Sigma_k)`` and a Gaussian path ``x_t = alpha_t z + beta_t eps``
every quantity of the notes has a closed form. The marginal (eq. 3.1.3) is

.. math:: p_t(x) = \sum_k \pi_k \, \mathcal N(x;\ \alpha_t \mu_k,\ C_k(t)), \qquad C_k(t) = \alpha_t^2 \Sigma_k + \beta_t^2 I,

and with posterior weights ``w_k(x) = pi_k N(x; alpha mu_k, C_k) / p_t(x)`` and ``r_k = x - alpha mu_k``:

* marginal score (eq. 3.3.1): ``grad log p_t(x) = -sum_k w_k C_k^{-1} r_k``;
* posterior means: ``E[z|x] = sum_k w_k (mu_k + alpha Sigma_k C_k^{-1} r_k)`` (Tweedie) and
  ``E[eps|x] = sum_k w_k beta C_k^{-1} r_k``;
* marginal vector field (eq. 3.2.2, the posterior-weighted average of ``u_t(x|z)``):
  ``u_t(x) = d_alpha E[z|x] + d_beta E[eps|x]``.

All are finite on ``[0, 1]`` because ``C_k`` is positive definite when the covariances are.
``C_k^{-1}`` is applied through a batched Cholesky factorisation of every ``C_k(t_i)`` (cost
``O(B K d^3)``: meant for the low-dimensional problems where an oracle is useful), which keeps every
quantity differentiable with respect to the mixture's parameters as well.

The oracle is a teaching and testing tool: its fields have jaxgen's field signature
``field(x, t)`` and plug into every loss and sampler.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import jax
import jax.numpy as jnp

from jaxgen._checks import batch_time
from jaxgen.paths.gaussian import GaussianPath

Array = jax.Array


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True, eq=False)
class GaussianMixture:
    """A Gaussian mixture ``sum_k weights_k N(means_k, covs_k)`` in ``R^d``.

    Build it with :meth:`isotropic` (per-component std), :meth:`diagonal` or the full-covariance
    constructor ``GaussianMixture(means (K, d), covs (K, d, d), weights (K,))``.
    """

    means: Array
    covs: Array
    weights: Array

    def __post_init__(self):
        means, covs, weights = self.means, self.covs, self.weights
        if any(isinstance(v, jax.core.Tracer) for v in (means, covs, weights)):
            return  # inside jit/grad/vmap (e.g. differentiating w.r.t. the mixture): values unknown
        means, covs, weights = np.asarray(means), np.asarray(covs), np.asarray(weights)
        if means.ndim != 2:
            raise ValueError(f"means must have shape (K, d), got {means.shape}.")
        k, d = means.shape
        if covs.shape != (k, d, d):
            raise ValueError(f"covs must have shape (K, d, d) = ({k}, {d}, {d}), got {covs.shape}.")
        if weights.shape != (k,):
            raise ValueError(f"weights must have shape (K,) = ({k},), got {weights.shape}.")
        if np.any(weights < 0) or not np.isclose(weights.sum(), 1.0, atol=1e-5):
            raise ValueError(f"weights must be non-negative and sum to 1, got {weights} (sum {weights.sum():.6g}).")
        if not np.allclose(covs, np.swapaxes(covs, -1, -2), atol=1e-6):
            raise ValueError("covs must be symmetric.")
        if np.min(np.linalg.eigvalsh(covs)) <= 0:
            raise ValueError("covs must be positive definite (the oracle's fields are then finite on [0, 1]); "
                             "use a small positive variance instead of a point mass.")

    # pytree protocol: arrays are leaves, so a mixture can be passed through jit.
    def tree_flatten(self):
        return (self.means, self.covs, self.weights), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        object.__setattr__(obj, "means", children[0])
        object.__setattr__(obj, "covs", children[1])
        object.__setattr__(obj, "weights", children[2])
        return obj

    # -- constructors ------------------------------------------------------------------------
    @classmethod
    def isotropic(cls, means, stds, weights=None) -> "GaussianMixture":
        """Components ``N(mu_k, std_k^2 I)``; ``stds`` is a scalar or shape ``(K,)``; uniform weights by default."""
        means = jnp.asarray(means, jnp.float32)
        k, d = means.shape
        stds = jnp.broadcast_to(jnp.asarray(stds, jnp.float32), (k,))
        covs = stds[:, None, None] ** 2 * jnp.eye(d, dtype=jnp.float32)
        weights = jnp.full((k,), 1.0 / k, jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
        return cls(means, covs, weights)

    @classmethod
    def diagonal(cls, means, variances, weights=None) -> "GaussianMixture":
        """Components with diagonal covariances ``variances`` of shape ``(K, d)``."""
        means = jnp.asarray(means, jnp.float32)
        k, d = means.shape
        variances = jnp.broadcast_to(jnp.asarray(variances, jnp.float32), (k, d))
        covs = jax.vmap(jnp.diag)(variances)
        weights = jnp.full((k,), 1.0 / k, jnp.float32) if weights is None else jnp.asarray(weights, jnp.float32)
        return cls(means, covs, weights)

    @classmethod
    def eight_gaussians(cls, radius: float = 5.0, std: float = 0.5) -> "GaussianMixture":
        """Eight isotropic Gaussians evenly spaced on a circle (a tractable twin of the toy data)."""
        ang = jnp.arange(8) * (2 * jnp.pi / 8)
        means = radius * jnp.stack([jnp.cos(ang), jnp.sin(ang)], -1)
        return cls.isotropic(means, std)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    # -- the data distribution ---------------------------------------------------------------
    def sample(self, key: Array, n: int) -> Array:
        """Draw ``n`` samples, shape ``(n, d)``."""
        kc, kn = jax.random.split(key)
        comp = jax.random.categorical(kc, jnp.log(self.weights), shape=(n,))
        chol = jnp.linalg.cholesky(self.covs)
        noise = jax.random.normal(kn, (n, self.dim), self.means.dtype)
        return self.means[comp] + jnp.einsum("nij,nj->ni", chol[comp], noise)

    def mean(self) -> Array:
        return jnp.sum(self.weights[:, None] * self.means, 0)

    def covariance(self) -> Array:
        """Total covariance ``sum_k pi_k (Sigma_k + mu_k mu_k^T) - m m^T``."""
        m = self.mean()
        second = jnp.sum(self.weights[:, None, None] * (self.covs + self.means[:, :, None] * self.means[:, None, :]), 0)
        return second - m[:, None] * m[None, :]

    def log_prob(self, x: Array) -> Array:
        """``log p_data(x)`` per sample, shape ``(B,)``."""
        return _mixture_terms(self, x, jnp.ones(x.shape[0], x.dtype), jnp.zeros(x.shape[0], x.dtype))[0]

    # -- the marginal path -------------------------------------------------------------------
    def marginal_log_prob(self, path: GaussianPath, x: Array, t: Array) -> Array:
        """``log p_t(x)`` of the marginal path (eq. 3.1.3), shape ``(B,)``."""
        a, b, _, _ = _path_coeffs(path, x, t)
        return _mixture_terms(self, x, a, b)[0]

    def posterior_means(self, path: GaussianPath, x: Array, t: Array) -> tuple[Array, Array]:
        """``(E[z | x_t = x], E[eps | x_t = x])``; note ``alpha_t E[z|x] + beta_t E[eps|x] = x``."""
        a, b, _, _ = _path_coeffs(path, x, t)
        _, w, cinv_r = _mixture_terms(self, x, a, b)
        # E[z|x,k] = mu_k + a Sigma_k C_k^{-1} r_k ; E[eps|x,k] = b C_k^{-1} r_k
        sig_cinv_r = jnp.einsum("kij,bkj->bki", self.covs, cinv_r)
        ez = jnp.einsum("bk,bki->bi", w, self.means[None] + a[:, None, None] * sig_cinv_r)
        ee = jnp.einsum("bk,bki->bi", w, b[:, None, None] * cinv_r)
        return ez, ee

    def marginal_score(self, path: GaussianPath, x: Array, t: Array) -> Array:
        r"""``grad log p_t(x) = -sum_k w_k(x) C_k^{-1} (x - alpha_t mu_k)``."""
        a, b, _, _ = _path_coeffs(path, x, t)
        _, w, cinv_r = _mixture_terms(self, x, a, b)
        return -jnp.einsum("bk,bki->bi", w, cinv_r)

    def marginal_velocity(self, path: GaussianPath, x: Array, t: Array) -> Array:
        r"""``u_t(x) = d_alpha_t E[z|x] + d_beta_t E[eps|x]`` (eq. 3.2.2)."""
        _, _, da, db = _path_coeffs(path, x, t)
        ez, ee = self.posterior_means(path, x, t)
        return da[:, None] * ez + db[:, None] * ee

    def marginal_eps(self, path: GaussianPath, x: Array, t: Array) -> Array:
        """Optimal noise prediction ``E[eps | x_t = x]``."""
        return self.posterior_means(path, x, t)[1]

    def marginal_data(self, path: GaussianPath, x: Array, t: Array) -> Array:
        """Optimal data prediction ``E[z | x_t = x]`` (Tweedie)."""
        return self.posterior_means(path, x, t)[0]

    # -- fields with jaxgen's signature -------------------------------------------------------
    def velocity_field(self, path: GaussianPath) -> Callable[[Array, Array], Array]:
        """The exact marginal vector field as ``field(x, t)``."""
        return lambda x, t, **_: self.marginal_velocity(path, x, t)

    def score_field(self, path: GaussianPath) -> Callable[[Array, Array], Array]:
        """The exact marginal score as ``field(x, t)``."""
        return lambda x, t, **_: self.marginal_score(path, x, t)

    def field(self, path: GaussianPath, prediction: str = "velocity") -> Callable[[Array, Array], Array]:
        """The exact field of any parameterisation (``velocity``, ``score``, ``eps``, ``data``, ``v``)."""
        from jaxgen.fields import canonical_prediction, from_data_and_noise

        prediction = canonical_prediction(prediction)
        if prediction == "score":
            return self.score_field(path)

        def f(x, t, **_):
            t = batch_time(t, x)
            ez, ee = self.posterior_means(path, x, t)
            return from_data_and_noise(path, ez, ee, t, prediction)

        return f


def _path_coeffs(path: GaussianPath, x: Array, t: Array):
    if x.ndim != 2:
        raise ValueError(f"the oracle works on flat points x of shape (B, d), got {tuple(x.shape)}; reshape to (B, -1).")
    t = batch_time(t, x)
    c = path.coefficients(t)
    return tuple(v.astype(x.dtype) for v in c)


def _mixture_terms(gm: GaussianMixture, x: Array, a: Array, b: Array):
    """Return ``(log p, posterior weights (B, K), C_k^{-1} r_k (B, K, d))`` for ``C_k = a^2 Sigma_k + b^2 I``.

    Uses a batched Cholesky factorisation of every ``C_k(t_i)``: differentiable with respect to the
    mixture's parameters too (an eigendecomposition is not, for repeated eigenvalues).
    """
    if x.ndim != 2 or x.shape[1] != gm.dim:
        raise ValueError(f"x must have shape (B, {gm.dim}) for this {gm.dim}-D mixture, got {tuple(x.shape)}.")
    d = x.shape[1]
    covs = gm.covs.astype(x.dtype)
    r = x[:, None, :] - a[:, None, None] * gm.means[None].astype(x.dtype)  # (B, K, d)
    c = a[:, None, None, None] ** 2 * covs[None] + b[:, None, None, None] ** 2 * jnp.eye(d, dtype=x.dtype)
    chol = jnp.linalg.cholesky(c)  # (B, K, d, d)
    y = jax.scipy.linalg.solve_triangular(chol, r[..., None], lower=True)  # L^{-1} r
    cinv_r = jax.scipy.linalg.solve_triangular(chol, y, lower=True, trans=1)[..., 0]
    maha = jnp.sum(y[..., 0] ** 2, -1)
    logdet = 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol, axis1=-2, axis2=-1)), -1)
    logn = -0.5 * (maha + logdet + d * jnp.log(2 * jnp.pi))
    logits = jnp.log(gm.weights.astype(x.dtype))[None] + logn
    logp = jax.scipy.special.logsumexp(logits, axis=-1)
    w = jax.nn.softmax(logits, axis=-1)
    return logp, w, cinv_r
