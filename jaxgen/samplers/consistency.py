r"""Consistency sampling (Song et al. 2023, Algorithm 1), in jaxgen time: one jump to the data end, or several with
re-noising in between.

On the grid ``t_0 < ... < t_{N-1} < t_N = t_end``: ``x = f(x_0, t_0)``; then for each later time ``s = t_i`` re-noise
the estimate of ``x_{t_end} = alpha_e z + beta_e eps`` to time ``s`` and jump again:

.. math:: \hat x_s = \frac{\alpha_s}{\alpha_e} x + \sqrt{\beta_s^2 - (\alpha_s \beta_e / \alpha_e)^2}\ \xi,
   \quad \xi \sim \mathcal N(0, I), \qquad x \leftarrow f(\hat x_s, s)

(the paper's ``x + sqrt(tau^2 - eps^2) z`` for ``alpha = 1``; ``hat x_s = alpha_s x + beta_s xi`` on the linear path).
The jump ``f`` is the field itself when it predicts the data end (``prediction="data"``: a consistency function,
:class:`jaxgen.models.ConsistencyFunction`, or a denoiser), otherwise the one-step estimate decoded from any
parameterisation, ``f = alpha_e z_hat + beta_e eps_hat`` (so any model samples this way: with a flow-matching
model it is the denoise / re-noise sampler of its posterior means).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import jax
import jax.numpy as jnp

from jaxgen.fields.preconditioning import _end_time
from jaxgen.samplers.base import Grid, Segment, Solver, check_steps, explicit_grid, register

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ConsistencyMultistep(Solver):
    r"""One-step or multistep consistency sampling (module docstring). NFE = ``steps`` = ``len(ts) - 1``.

    The grid ends at the data end ``t_end`` (the path's ``t_max``, or the field's ``t_end`` for a
    :class:`~jaxgen.models.ConsistencyFunction`; the field is never evaluated there): ``ts = (0.0, 0.5, 1.0)`` jumps
    from the noise at ``t = 0``, re-noises to ``t = 0.5`` and jumps again. ``steps=k`` (default 1) spaces the
    ``k`` jump times uniformly in ``[t0, t_end)``. The path defaults to the field's own (``field.path``). Re-noising
    before jump ``i`` draws from ``fold_in(key, i - 1)``.

    Args:
      t_end: the data end; default the field's ``t_end`` or the path's ``t_max``.
    """

    name: ClassVar[str] = "consistency"
    default_steps: ClassVar[int] = 1
    decodes_data: ClassVar[bool] = True
    t_end: float | None = None

    def needs_key(self) -> bool:
        return False  # checked in grid(): only a multistep grid re-noises

    def default_path(self, field):
        return getattr(field, "path", None)

    def _end(self, model) -> float:
        if model.path is None:
            raise ValueError("consistency sampling needs the path for re-noising: pass sample(..., path=...) "
                             "(a ConsistencyFunction carries its own).")
        t_end = self.t_end if self.t_end is not None else getattr(model.field, "t_end", None)
        return _end_time(model.path, t_end)

    def grid(self, model, steps, t0, t1, ts):
        t_end = self._end(model)
        sched = model.path.schedule
        if ts is not None:
            if t0 is not None or t1 is not None:
                raise ValueError("pass either ts or t0, not both.")
            g = explicit_grid(ts, direction="increasing")
            if g.last is not None and abs(g.last - t_end) > 1e-6:
                raise ValueError(f"a consistency grid ends at the data end t_end={t_end:g} (where f is the identity, "
                                 f"never evaluated); got ts ending at {g.last:g}: append t_end, e.g. ts=(0.0, 0.5, "
                                 f"{t_end:g}).")
            times = g.times
        else:
            if t1 is not None and abs(float(t1) - t_end) > 1e-6:
                raise ValueError(f"a consistency grid ends at the data end t_end={t_end:g}; got t1={t1}.")
            n = check_steps(self.default_steps if steps is None else steps)
            start = float(getattr(model.field, "t_min", sched.t_min) if t0 is None else t0)
            times = jnp.asarray(np.append(np.linspace(start, t_end, n + 1)[:-1], t_end), jnp.float32)
            g = Grid(times, start, t_end)
        if g.first is not None and not sched.t_min <= g.first < t_end:
            raise ValueError(f"every jump time must lie in [t_min, t_end) = [{sched.t_min:g}, {t_end:g}) (f at t_end "
                             f"is the identity); got {g.first:g}.")
        return Grid(times, g.first, t_end)

    def segments(self, model, grid):
        path = model.path
        n = grid.steps
        end = path.coefficients(jnp.asarray(grid.last, jnp.float32))
        times = grid.times[:-1]
        c = path.coefficients(times)
        scale = c.alpha / end.alpha
        std = jnp.sqrt(jnp.maximum(c.beta**2 - (scale * end.beta) ** 2, 0.0))

        def jump(model, x, s):
            if model.prediction == "data":
                return model.raw(x, s)
            z, eps = model.denoise(x, s)
            return end.alpha.astype(x.dtype) * z + end.beta.astype(x.dtype) * eps

        def first(model, x, inp, key):
            x = jump(model, x, inp["t"])
            return x, x

        def renoise(model, x, inp, key):
            xi = jax.random.normal(jax.random.fold_in(key, inp["i"] - 1), x.shape, x.dtype)
            x_s = inp["scale"].astype(x.dtype) * x + inp["std"].astype(x.dtype) * xi
            x = jump(model, x_s, inp["t"])
            return x, x

        inp = {"i": jnp.arange(n), "t": times, "scale": scale, "std": std}
        # one segment per jump, unrolled (a few steps; each call of the field sees its own step's values)
        return [Segment(first if i == 0 else renoise, jax.tree.map(lambda a: a[i:i + 1], inp)) for i in range(n)]

    def solve(self, model, x0, grid, key, save_trajectory, unroll=1, gradient=None):
        if grid.steps > 1 and key is None:
            raise ValueError("multistep consistency sampling re-noises between steps: pass key=jax.random.key(...).")
        res = super().solve(model, x0, grid, key, save_trajectory, unroll, gradient)
        # the trajectory: the output of every jump (the estimates of the data end), one per evaluation time
        traj = None if res.trajectory is None else res.trajectory[1:]
        return res._replace(ts=grid.times[:-1], trajectory=traj)


register(ConsistencyMultistep.name, ConsistencyMultistep)

__all__ = ["ConsistencyMultistep"]
