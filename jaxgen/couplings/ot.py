r"""Minibatch optimal-transport couplings (OT-CFM: Tong et al. 2024, "Improving and generalizing flow-based generative
models with minibatch optimal transport", TMLR; Pooladian et al. 2023, "Multisample flow matching", ICML).

A coupling re-pairs a minibatch of source points ``x0`` (t = 0, noise) and data points ``x1`` (t = 1) inside the
compiled training step: ``coupling.indices(key, x0, x1, labels) -> (i, j)``, pair ``k`` being ``(x0[i[k]], x1[j[k]])``
(the loss gathers the data's conditioning with ``j``), for the cost ``C_ij = ||x0_i - x1_j||^2`` between flattened
points, under ``stop_gradient``. :class:`IndependentCoupling` keeps the batch as drawn; :class:`ExactOT` takes the
optimal permutation (Birkhoff: for two uniform sets of equal size an optimal plan is a permutation); :class:`SinkhornOT`
samples pairs from the entropic plan (Cuturi 2013). The solvers, shared with the W2 metric, are
:func:`jaxgen.metrics.transport.solve_assignment` and :func:`~jaxgen.metrics.transport.sinkhorn_potentials`.
``blocks=k`` couples ``k`` contiguous sub-batches independently (vmapped); the default ``blocks=1`` couples the global
batch. On a batch sharded over devices, :class:`OnMesh` couples
each device's shard in ``shard_map`` (or the all-gathered batch) without communication inside the solvers' loops.
``label_key="y"`` couples within classes: the source points get the labels of a random permutation of the data labels
within each block (:meth:`Coupling.source_labels`), and the cost between different classes is raised by
``2 m max(C) + 1`` (``m`` points per block), more than any class-respecting matching costs.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from jaxgen._checks import check_finite, is_concrete
from jaxgen.metrics.transport import _relative_eps, sinkhorn_potentials, solve_assignment, squared_distances

Array = jax.Array

_SAMPLES = ("without_replacement", "with_replacement", "conditional", "argmax", "permutation")
_BACKENDS = ("kernel", "ott")


def _inverse_cdf(p: Array, u: Array) -> Array:
    """Indices ``i ~ p / sum(p)`` of a 1-D ``p >= 0`` for the uniforms ``u``, by a two-level inverse CDF (choose a group
    of ``~sqrt(n)`` entries from the group sums, then the entry within it): two short cumulative sums in place of one of
    length ``n`` (markedly faster on CPU); an index of zero probability is never returned."""
    n = p.shape[0]
    g = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    blocks = p.reshape(n // g, g)
    ctot = jnp.cumsum(jnp.sum(blocks, 1))

    def pick(cdf, t, positive):  # #{cdf <= t}, clipped to the last entry of positive mass (round-off at the end)
        last = positive.shape[-1] - 1 - jnp.argmax(jnp.flip(positive, -1), -1)
        return jnp.minimum(jnp.sum(cdf <= t[:, None], -1), last)

    t = u * ctot[-1]
    grp = pick(ctot[None, :], t, jnp.sum(blocks, 1) > 0)
    t = t - jnp.where(grp > 0, ctot[jnp.maximum(grp - 1, 0)], 0.0)
    return (grp * g + pick(jnp.cumsum(blocks[grp], 1), t, blocks[grp] > 0)).astype(jnp.int32)


def _sample_plan(key: Array, log_p: Array, how: str) -> tuple[Array, Array]:
    """``n`` pairs ``(i, j)`` from the plan ``exp(log_p)`` (rows: sources; see :class:`SinkhornOT`'s ``sample``)."""
    n, m = log_p.shape
    cols = jnp.arange(m, dtype=jnp.int32)
    if how == "argmax":
        return jnp.argmax(log_p, 0).astype(jnp.int32), cols
    if how == "without_replacement":  # Gumbel top-k: n distinct cells, drawn one after another proportionally to P
        cells = jax.lax.top_k(log_p.reshape(-1) + jax.random.gumbel(key, (n * m,), log_p.dtype), m)[1]
        return (cells // m).astype(jnp.int32), (cells % m).astype(jnp.int32)
    if how == "with_replacement":  # n i.i.d. cells ~ P by the inverse CDF (TorchCFM's OTPlanSampler)
        cells = _inverse_cdf(jnp.exp(log_p - jnp.max(log_p)).reshape(-1), jax.random.uniform(key, (m,), log_p.dtype))
        return cells // m, cells % m
    p = jnp.exp(log_p - jnp.max(log_p, 0, keepdims=True))  # P(i | j) up to a factor, per column
    if how == "conditional":  # every data point j once, its source i ~ P(i | j) by the inverse CDF of column j
        draws = jax.random.uniform(key, (m, 1), p.dtype)
        return jax.vmap(_inverse_cdf, in_axes=(1, 0))(p, draws)[:, 0], cols
    # permutation: data points in random order each draw a source ~ P(i | j) among the unused ones
    k_order, k_draw = jax.random.split(key)
    order, draws = jax.random.permutation(k_order, m), jax.random.uniform(k_draw, (m,), p.dtype)

    def take(step, s):
        used, src = s
        col = order[step]
        w = jnp.where(used, 0.0, p[:, col])
        row = jnp.sum(jnp.cumsum(w) <= draws[step] * jnp.sum(w))  # < n: a source of positive weight, so unused
        best = jnp.argmax(jnp.where(used, -jnp.inf, log_p[:, col]))  # no weight left (underflow): the likeliest one
        row = jnp.where(row < n, row, best).astype(jnp.int32)
        return used.at[row].set(True), src.at[col].set(row)

    return jax.lax.fori_loop(0, m, take, (jnp.zeros((n,), bool), jnp.zeros((m,), jnp.int32)))[1], cols


@dataclasses.dataclass(frozen=True, kw_only=True)
class Coupling:
    """A minibatch coupling: ``indices(key, x0, x1, labels=None) -> (i, j)``; see the module docstring."""

    label_key: str | None = None  # class-conditional couplings: the data's label under this conditioning key

    def __post_init__(self):
        _require(self.label_key is None or (isinstance(self.label_key, str) and self.label_key),
                 f"label_key must be a conditioning key such as 'y' or None, got {self.label_key!r}.")
        _require(_is_int(getattr(self, "blocks", 1), 1), f"blocks must be an integer >= 1 (the number of sub-batches, "
                 f"e.g. the device count), got {getattr(self, 'blocks', 1)!r}.")

    def indices(self, key: Array, x0: Array, x1: Array, labels: Array | None = None) -> tuple[Array, Array]:
        """``(i, j)``, int32 arrays of shape ``(n,)``: pair ``k`` is ``(x0[i[k]], x1[j[k]])``, for ``x0, x1`` of shape
        ``(n, ...)``.
        ``labels`` (``(n,)`` integers, the classes of ``x1``; required when ``label_key`` is set) restricts the pairs to
        within classes."""
        n = _check_inputs(self, x0, x1, labels)
        x0, x1 = jax.lax.stop_gradient(x0), jax.lax.stop_gradient(x1)
        k = getattr(self, "blocks", 1)
        m = n // k
        cost = jax.vmap(squared_distances)(x0.reshape((k, m, -1)), x1.reshape((k, m, -1)))
        penalty = None
        if labels is not None:
            src = self.source_labels(key, labels).reshape((k, m))
            penalty = src[:, :, None] != jnp.reshape(labels, (k, m))[:, None, :]
        k_pair = jax.random.split(key)[1]
        if k == 1:  # unbatched: a vmapped while loop of one problem is markedly slower on CPU
            return self._pair(k_pair, cost[0], None if penalty is None else penalty[0])
        # the blocks one after another (lax.map): the solvers' while loops stay unbatched, which checkify (the
        # Trainer's checked mode) requires, and costs about the same as vmap on CPU (1.6 vs 1.2 ms at 8 x 32 points)
        i, j = jax.lax.map(lambda a: self._pair(*a), (jax.random.split(k_pair, k), cost, penalty))
        offset = (jnp.arange(k, dtype=jnp.int32) * m)[:, None]
        return (i + offset).reshape(n), (j + offset).reshape(n)

    def source_labels(self, key: Array, labels: Array) -> Array:
        """The classes that :meth:`indices` (same ``key``) gives the source points of a class-conditional coupling: a
        random permutation of the data ``labels`` within each block, so that every class has as many sources as data
        points there; every returned pair ``(i, j)`` has ``source_labels[i] == labels[j]``."""
        k = getattr(self, "blocks", 1)
        lab = jnp.reshape(labels, (k, -1))
        keys = jax.random.split(jax.random.split(key)[0], k)
        return jax.vmap(jax.random.permutation)(keys, lab).reshape(jnp.shape(labels))

    def _pair(self, key: Array, cost: Array, mismatch: Array | None) -> tuple[Array, Array]:
        """``(i, j)`` within one block from its ``(m, m)`` cost and class mismatch mask (or ``None``)."""
        raise NotImplementedError

    def __call__(self, key: Array, x0: Array, x1: Array) -> tuple[Array, Array]:
        """The ``coupling(key, x0, x1) -> (x0[i], x1[j])`` hook form; it cannot re-order conditioning, so it is for
        unconditional models (with conditioning, gather it with ``j`` from :meth:`indices`)."""
        if self.label_key is not None:
            raise ValueError(f"{type(self).__name__}(label_key={self.label_key!r}) needs the data's labels: call "
                             "indices(key, x0, x1, labels) (regression_loss does) instead of the (key, x0, x1) hook.")
        i, j = self.indices(key, x0, x1)
        return jnp.asarray(x0)[i], jnp.asarray(x1)[j]


def _penalised(cost: Array, mismatch: Array | None) -> Array:
    """``cost`` raised by ``2 m max(C) + 1`` between different classes (no class-respecting matching costs more)."""
    if mismatch is None:
        return cost
    return jnp.where(mismatch, 2.0 * cost.shape[0] * jnp.max(cost) + 1.0, cost)


@dataclasses.dataclass(frozen=True, kw_only=True)
class IndependentCoupling(Coupling):
    """The independent coupling ``i = j = arange(n)`` (the minibatch is used as drawn)."""

    def indices(self, key, x0, x1, labels=None):
        n = _check_inputs(self, x0, x1, labels)
        return jnp.arange(n, dtype=jnp.int32), jnp.arange(n, dtype=jnp.int32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExactOT(Coupling):
    r"""Exact minibatch OT: ``i = sigma^*(j)``, the optimal permutation for ``sum_j ||x0_{sigma(j)} - x1_j||^2``.

    ``j = arange(n)`` keeps the data order (and its labels); ``i`` is the source assigned to each data point
    (:func:`solve_assignment`). ``blocks`` (default 1, the global batch) solves that many contiguous sub-batches
    independently and must divide the batch size. ``warm_start`` (default 60; 0 starts cold) starts the solver from
    the duals of that many Sinkhorn iterations (``epsilon = 0.02`` relative): the same optimum, found ~3x faster at
    ``n = 256``. The solver's ``while`` loops synchronise all devices under ``jit`` sharding: on a sharded batch, wrap it in :class:`OnMesh`.
    """

    blocks: int = 1
    warm_start: int = 60

    def __post_init__(self):
        super().__post_init__()
        _require(_is_int(self.warm_start, 0), f"warm_start must be a number of Sinkhorn iterations >= 0, got "
                 f"{self.warm_start!r}.")

    def _pair(self, key, cost, mismatch):
        del key
        eps = _relative_eps(cost, 0.02)
        cost = _penalised(cost, mismatch).T  # rows = data points, columns = sources
        duals = sinkhorn_potentials(cost, eps, self.warm_start)[1] if self.warm_start else None
        return solve_assignment(cost, duals), jnp.arange(cost.shape[0], dtype=jnp.int32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SinkhornOT(Coupling):
    r"""Pairs sampled from the entropic OT plan (Cuturi 2013, "Sinkhorn distances"; TorchCFM's ``OTPlanSampler``).

    Args (keywords):
      epsilon: entropic regularisation; with ``relative_epsilon`` (default) in units of the mean cost of the block,
        ``eps = epsilon * mean(C)`` (scale-free), else absolute. Smaller is closer to exact OT and needs more
        iterations (roughly ``1 / epsilon``): a plan cut off far from convergence has a wrong source marginal (the
        pairs crowd onto the nearest sources; their cost can then fall below the exact OT cost).
      max_iterations: cap on Sinkhorn iterations (a fixed-cost program); threshold: stop earlier once the source
        marginal's L1 error is below it (0 never stops early). The data marginal is exact after every iteration.
      sample: ``"conditional"`` (default; ``j = arange``, each data point's source drawn from ``P(i | j)``: ``n``
        distinct cells whose pairs follow ``P``, stratified over the data, so every data point is used once; the
        fastest), ``"without_replacement"`` (``n`` distinct cells of the flattened plan by Gumbel top-k on
        ``log P``; ``j`` is not ``arange`` and ~1/3 of the data goes unused), ``"with_replacement"`` (``n`` i.i.d.
        cells, TorchCFM's way), ``"argmax"`` (``j = arange``, ``i = argmax_i P_ij``: deterministic, the sources
        collapse onto a few) or ``"permutation"`` (``j = arange``, ``i`` a permutation: data points in random order
        draw from ``P(i | j)`` among the unused sources; both marginals exact, the plan only approximately).
      blocks: as :class:`ExactOT`. backend: ``"kernel"`` (default; our stabilised kernel-domain Sinkhorn, the
        fast one on CPU) or ``"ott"`` (ott-jax's log-domain ``Sinkhorn``).
    """

    epsilon: float = 0.05
    relative_epsilon: bool = True
    max_iterations: int = 30
    threshold: float = 1e-3
    sample: str = "conditional"
    blocks: int = 1
    backend: str = "kernel"

    def __post_init__(self):
        super().__post_init__()
        _require(isinstance(self.epsilon, (int, float)) and math.isfinite(self.epsilon) and self.epsilon > 0,
                 f"epsilon must be a finite number > 0, got {self.epsilon!r} (e.g. 0.05 relative to the mean cost).")
        _require(_is_int(self.max_iterations, 1), f"max_iterations must be an integer >= 1, got "
                 f"{self.max_iterations!r}.")
        _require(isinstance(self.threshold, (int, float)) and self.threshold >= 0,
                 f"threshold must be >= 0 (0 runs all max_iterations), got {self.threshold!r}.")
        _require(self.sample in _SAMPLES, f"unknown sample {self.sample!r}; use one of {_SAMPLES}.")
        _require(self.backend in _BACKENDS, f"unknown backend {self.backend!r}; use one of {_BACKENDS}.")

    def _pair(self, key, cost, mismatch):
        eps = _relative_eps(cost, self.epsilon, self.relative_epsilon)
        cost = _penalised(cost, mismatch)
        f, g = sinkhorn_potentials(cost, eps, self.max_iterations, self.threshold, self.backend)
        return _sample_plan(key, (f[:, None] + g[None, :] - cost) / eps, self.sample)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OnMesh(Coupling):
    """``coupling`` on a batch sharded over ``mesh``'s ``axis`` (the Trainer's ``"data"``), without communication in its
    loops.

    ``per_device=True`` (the OT-CFM paper's local minibatch OT): each device couples its own shard inside
    ``shard_map``, with its own key (``fold_in`` of the device index); the indices come back global and sharded. This
    is what ``blocks=D`` means on one device; under plain ``jit`` sharding, :class:`ExactOT`'s vmapped blocks instead
    synchronise all devices at every step of the solver's ``while`` loops (an all-reduce of the loop condition).
    ``per_device=False``: the batch is all-gathered once and every device solves the same global problem (under plain
    ``jit`` XLA would otherwise partition the solver's loop state and communicate inside the loops).
    """

    coupling: Coupling
    mesh: jax.sharding.Mesh
    axis: str = "data"
    per_device: bool = True

    def __post_init__(self):
        _require(isinstance(self.coupling, Coupling) and not isinstance(self.coupling, OnMesh),
                 f"OnMesh wraps one coupling (ExactOT, SinkhornOT, ...), got {self.coupling!r}.")
        _require(self.axis in self.mesh.axis_names, f"axis {self.axis!r} is not an axis of the mesh "
                 f"{self.mesh.axis_names}.")
        object.__setattr__(self, "label_key", self.coupling.label_key)

    def indices(self, key, x0, x1, labels=None):
        from jax.sharding import NamedSharding, PartitionSpec

        if not self.per_device:
            whole = NamedSharding(self.mesh, PartitionSpec())
            x0, x1, labels = (a if a is None else jax.lax.with_sharding_constraint(a, whole) for a in (x0, x1, labels))
            return self.coupling.indices(key, x0, x1, labels)
        d = self.mesh.shape[self.axis]
        _require(jnp.shape(x0)[0] % d == 0, f"OnMesh(per_device=True) needs a batch divisible by the {d} devices of "
                 f"axis {self.axis!r}, got n={jnp.shape(x0)[0]}.")

        def local(key, x0, x1, labels):
            dev = jax.lax.axis_index(self.axis)
            i, j = self.coupling.indices(jax.random.fold_in(key, dev), x0, x1, labels)
            return i + dev * x0.shape[0], j + dev * x0.shape[0]

        shard = PartitionSpec(self.axis)
        specs = (PartitionSpec(), shard, shard, None if labels is None else shard)
        return jax.shard_map(local, mesh=self.mesh, in_specs=specs, out_specs=(shard, shard),
                             check_vma=False)(key, x0, x1, labels)


def _require(ok, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _is_int(value, lo: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= lo


def _check_inputs(coupling: Coupling, x0: Array, x1: Array, labels: Array | None) -> int:
    name, s0, s1 = type(coupling).__name__, jnp.shape(x0), jnp.shape(x1)
    _require(len(s0) >= 1 and len(s1) >= 1 and s0[0] == s1[0], f"{name}: x0 and x1 must be batches with the same "
             f"leading size n, got shapes {s0} and {s1}.")
    _require(math.prod(s0[1:]) == math.prod(s1[1:]), f"{name}: x0 and x1 points must have the same size to compare "
             f"them, got shapes {s0} and {s1}.")
    n, blocks = s0[0], getattr(coupling, "blocks", 1)
    _require(n > 0 and n % blocks == 0, f"{name}(blocks={blocks}) needs a batch size divisible by blocks, got n={n}; "
             f"use a batch size that is a multiple of {blocks} or change blocks.")
    _require(coupling.label_key is None or labels is not None, f"{name}(label_key={coupling.label_key!r}) couples "
             f"within classes and needs labels=: the data's labels batch[{coupling.label_key!r}].")
    _require(labels is None or (jnp.shape(labels) == (n,) and jnp.issubdtype(jnp.result_type(labels), jnp.integer)),
             f"{name}: labels must be integers of shape ({n},), got {jnp.result_type(labels)} {jnp.shape(labels)}.")
    if not isinstance(coupling, IndependentCoupling):
        for arr, nm in ((x0, "x0"), (x1, "x1")):
            if is_concrete(arr):
                check_finite(arr, name=f"{name}'s {nm}", hint="OT costs between NaN/inf points are undefined.")
    return n


_COUPLINGS = {"independent": IndependentCoupling, "exact": ExactOT, "sinkhorn": SinkhornOT}
_ALIASES = {"none": "independent", "identity": "independent", "ot": "exact", "exact_ot": "exact", "emd": "exact"}


def get_coupling(spec: str | Coupling | None) -> Coupling:
    """A coupling from a config string ``"name"`` or ``"name:key=value,key=value"``.

    Names: ``independent`` (also ``none``), ``exact`` (also ``ot``, ``exact_ot``), ``sinkhorn``; keys are the class's
    fields, e.g. ``"exact:blocks=4"``, ``"sinkhorn:epsilon=0.05,max_iterations=30"``, ``"exact:label_key=y"``. A
    :class:`Coupling` is returned as is; ``None`` is the independent coupling.
    """
    if spec is None or isinstance(spec, Coupling):
        return IndependentCoupling() if spec is None else spec
    _require(isinstance(spec, str), f"a coupling spec is a string such as 'exact' or 'sinkhorn:epsilon=0.05', got "
             f"{spec!r}.")
    name, _, options = spec.strip().partition(":")
    name = _ALIASES.get(name.strip().lower(), name.strip().lower())
    _require(name in _COUPLINGS, f"unknown coupling {spec!r}; use one of {sorted(_COUPLINGS)} (e.g. 'exact:blocks=4').")
    fields = {f.name: f.default for f in dataclasses.fields(_COUPLINGS[name])}
    kwargs = {}
    for item in filter(None, (s.strip() for s in options.split(","))):
        key, eq, value = (s.strip() for s in item.partition("="))
        _require(eq and key in fields, f"bad option {item!r} in coupling spec {spec!r}: {name} takes key=value options "
                 f"among {sorted(fields)}.")
        default, low = fields[key], value.lower()
        try:
            if isinstance(default, bool):
                kwargs[key] = {"true": True, "1": True, "false": False, "0": False}[low]
            elif isinstance(default, (int, float)):
                kwargs[key] = type(default)(value)
            else:
                kwargs[key] = None if low == "none" else value
        except (KeyError, ValueError):
            raise ValueError(f"bad value {value!r} for {key} in coupling spec {spec!r} (expected "
                             f"{type(default).__name__}).") from None
    return _COUPLINGS[name](**kwargs)


__all__ = ["Coupling", "IndependentCoupling", "ExactOT", "SinkhornOT", "OnMesh", "get_coupling", "solve_assignment",
           "squared_distances"]
