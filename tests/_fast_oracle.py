"""Test helpers shared by several test files: a cheap exact oracle score (test_score_sde, test_ddpm) and a
field that counts its evaluations (test_fast_samplers, test_unipc)."""

import jax
import jax.numpy as jnp


def fast_score(gm, path):
    """The oracle's marginal score for an isotropic mixture without its per-sample Cholesky factorisations:
    ``C_k = (alpha^2 s_k^2 + beta^2) I`` (10x cheaper; checked equal to ``GaussianMixture.marginal_score``)."""
    var_k = gm.covs[:, 0, 0]

    def score(x, t, **_):
        c = path.coefficients(t)
        a, b = c.alpha[:, None], c.beta[:, None]
        var = a**2 * var_k[None] + b**2                                   # (B, K)
        r = x[:, None, :] - a[:, :, None] * gm.means[None]                # (B, K, d)
        logits = jnp.log(gm.weights)[None] - 0.5 * jnp.sum(r**2, -1) / var - 0.5 * x.shape[1] * jnp.log(var)
        w = jax.nn.softmax(logits, -1)
        return -jnp.einsum("bk,bkd->bd", w / var, r)

    return score


def counting(field):
    """The field, plus a host-side counter of its evaluations (one per call on the whole batch)."""
    count = [0]

    def f(x, t):
        jax.debug.callback(lambda: count.__setitem__(0, count[0] + 1))
        return field(x, t)

    return f, count
