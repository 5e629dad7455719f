r"""Flow-map sampling: jumps along the probability-flow ODE with a flow-map field ``u(x, r, t)`` (the average
velocity from ``r`` to ``t``; :mod:`jaxgen.losses.flow_map`):

.. math:: x_{t_{i+1}} = x_{t_i} + (t_{i+1} - t_i)\, u(x_{t_i}, t_i, t_{i+1})

on the grid ``t_0 < ... < t_N`` (MeanFlow's one-step ``x_1 = x_0 + u(x_0, 0, 1)`` for ``N = 1``; Geng et al. 2025,
eq. 5 / Algorithm 2). NFE = ``N`` exactly. With the exact flow map every grid gives the exact ODE solution; a
learned one trades steps for accuracy like any solver.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from jaxgen.samplers.base import Solver, register


@dataclasses.dataclass(frozen=True)
class FlowMap(Solver):
    """Flow-map jumps (module docstring), for a field called as ``field(x, r, t, **cond)`` that predicts the average
    velocity (``prediction="velocity"``). ``steps`` (default 1) uniform jumps from ``t0`` to ``t1`` (the path's
    domain, or ``[0, 1]``), or any increasing ``ts``. NFE = ``steps``."""

    name: ClassVar[str] = "flow_map"
    default_steps: ClassVar[int] = 1
    decodes_data: ClassVar[bool] = False

    def check(self, model, grid):
        if model.prediction != "velocity":
            raise ValueError(f"the flow_map sampler jumps with an average velocity u(x, r, t): the field's prediction "
                             f"must be 'velocity', got {model.prediction!r}.")

    def step(self, model, x, inp, key):
        h = (inp["t_next"] - inp["t"]).astype(x.dtype)
        x = x + h * model.average_velocity(x, inp["t"], inp["t_next"])
        return x, x


register(FlowMap.name, FlowMap)

__all__ = ["FlowMap"]
