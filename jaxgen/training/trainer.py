r"""Training: one trainer whose step, or N fused steps, is one XLA program, and one loop around it.

The model is split once into ``(graphdef, params, rest)`` (Flax NNX); the compiled step is a pure function of a
:class:`TrainState` pytree, so it can be ``jit``-ed, ``lax.scan``-ned over many steps, sharded, and checkpointed
with orbax as plain arrays. Data can be sampled *inside* the compiled step (``data(key) -> batch``, e.g. a synthetic
distribution or a dataset held on device), which removes all host traffic, or passed in per step.

Every objective plugs into the same step:

* a loss ``loss(model, batch, key) -> scalar`` (any :mod:`jaxgen.losses` loss);
* a loss that asks for more by keyword: ``step=`` (the step number, for curricula), ``target=`` (the EMA model
  ``theta^-`` under ``stopgrad``, e.g. consistency models; ``None`` without EMA) and ``state=`` (the objective's own
  state carried in :attr:`TrainState.aux`, e.g. an EBM's replay buffer of Langevin negatives; the loss then returns
  ``(value, new_state)`` and provides ``loss.init_state(key)``);
* several :class:`Update` s taking turns in one step, each with its own loss, parameters and optimizer (a GAN's
  critic and generator).

Randomness is reproducible and resumable: step ``k`` uses ``fold_in(state.key, k)``, so a run restarted from a
checkpoint at step ``k`` continues exactly as an uninterrupted run.

Example::

    model = MLPField(2, rngs=nnx.Rngs(0))
    trainer = Trainer(model, flow_matching_loss("linear"), optax.adam(1e-3),
                      data=lambda key: moons(key, 256), ema_decay=0.999)
    state, losses = trainer.fit(trainer.init(0), 5000)     # fused chunks + progress bar + NaN guard
    model = trainer.model(state, ema=True)
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxgen._checks import check_key, checkified, raise_failed_check
from jaxgen.training.finite import nonfinite_leaves
from jaxgen.training.parallel import (check_mesh, global_from_local_copy, parameter_shardings, replicated,
                                      shard_batch)

Array = jax.Array

_CONTEXT = ("step", "target", "state")


class TrainState(NamedTuple):
    """Everything a run needs to continue: a pytree of arrays.

    Attributes:
      step: number of optimizer steps taken (int32 scalar).
      params: the model's ``nnx.Param`` state.
      rest: the model's other state (e.g. dropout RNG counters, batch statistics).
      opt_state: the optax state (a dict of states, one per :class:`Update`, for several updates).
      ema_params: exponential moving average of ``params`` (same structure), or ``None``.
      key: the run's base PRNG key (step ``k`` uses ``fold_in(key, k)``).
      aux: the objective's own state (e.g. a replay buffer), or ``None``.
    """

    step: Array
    params: Any
    rest: Any
    opt_state: Any
    ema_params: Any
    key: Array
    aux: Any = None


def ema_update(ema: Any, params: Any, decay: float | Array) -> Any:
    r"""``ema <- decay * ema + (1 - decay) * params`` (Polyak averaging of weights), computed as
    ``ema + (1 - decay) (params - ema)``: a parameter that does not move (a frozen base) keeps its EMA bit-identical."""
    return jax.tree.map(lambda e, p: e + (1.0 - decay) * (p - e), ema, params)


@dataclasses.dataclass(frozen=True)
class Update:
    """One gradient update of a training step: minimise ``loss`` over the parameters that ``params`` selects (an NNX
    filter, e.g. ``nnx.PathContains("critic")``) with the optimizer named ``optimizer`` (a key of the trainer's
    optimizer dict), ``repeats`` times. Updates run in order, each on the parameters the previous ones left (e.g.
    five critic updates, then one generator update: WGAN's ``n_critic = 5``). The loss takes the same keywords as a
    single objective's."""

    loss: Callable
    params: Any = nnx.Param
    optimizer: str = "default"
    repeats: int = 1
    name: str | None = None


def _accepts(fn: Callable) -> frozenset:
    """The context keywords (``step``, ``target``, ``state``) that a loss accepts."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return frozenset()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return frozenset(_CONTEXT)
    return frozenset(k for k in _CONTEXT if k in params)


class Trainer:
    """Compiled training of a Flax NNX model with any objective.

    Args:
      model: an ``nnx.Module`` (its current values are the initial parameters).
      objective: a loss ``loss(model, batch, key, **context) -> scalar`` (module docstring), or a sequence of
        :class:`Update` s.
      optimizer: an ``optax.GradientTransformation`` (compose clipping and schedules with ``optax.chain``), or a dict
        ``{name: transformation}`` for the updates' optimizers.
      data: optional ``data(key) -> batch`` sampled inside the compiled step.
      ema_decay: decay of the EMA of the weights: a float in ``[0, 1)``, a function ``step -> decay`` (e.g. a
        consistency model's target schedule), or ``None`` for no EMA. The EMA is updated after the optimizer step,
        with the new parameters.
      ema_warmup: if True (and ``ema_decay`` is a float), use ``min(decay, (1 + step) / (10 + step))`` so early
        averages are not dominated by the random initialisation.
      compute_dtype: mixed precision, e.g. ``jnp.bfloat16``: the forward and backward passes run with parameters
        (the EMA target's too) and floating-point inputs cast to this dtype, while the master weights, the optimizer
        state, the EMA and the loss stay in float32.
      fuse_steps: run :meth:`steps` as one ``lax.scan`` program (default). With ``False`` it dispatches the jitted
        single step ``num_steps`` times (asynchronously, without host syncs); both give the same result. Fusing is
        the faster form, with one caveat on CPU: XLA:CPU runs native convolutions (``lax.conv_general_dilated``)
        inside a loop body through a much slower path (a digits U-Net with them trained at 0.21 steps/s fused
        against 4.3 unfused). :class:`jaxgen.models.UNetField` therefore computes its convolutions as matrix
        products on CPU (7-8 steps/s fused); pass ``False`` for other convolutional models on CPU.
      microbatches: split each batch into this many equal microbatches and accumulate their gradients in a
        ``lax.scan`` inside the step (gradient accumulation): the update is the one of the full batch, since every
        jaxgen loss is a mean over equal-size microbatches, with the loss's randomness drawn per microbatch
        (``fold_in(key, i)``). Use it to fit a large batch in memory (activations are kept for one microbatch at a
        time). The batch size must be divisible by ``microbatches``.
      mesh: a device mesh with a ``"data"`` axis (:func:`jaxgen.training.data_mesh`) for data parallelism: the state
        is replicated on every device of the mesh and each batch is split over the data axis inside the one compiled
        step (XLA adds the gradient all-reduce); the same seed and global batch give the same losses as on one
        device. The batch size must be divisible by the data axis. Works across processes (``jax.distributed``).
        Parameters annotated with NNX partitioning metadata (:func:`jaxgen.models.shard_parameters`,
        ``UNetField(shard_axis="data")``) are instead kept split over their mesh axis, with their optimizer moments
        and EMA (parameter sharding, FSDP style; :func:`jaxgen.training.parallel.parameter_shardings`).
      checked: trace the steps in jaxgen's checked mode (:func:`jaxgen.checked`): every batch the step draws is
        checked on the device (finite data, labels in ``[0, num_classes]``, leading sizes) and a failed check
        raises ``ValueError`` naming it before the state moves on. Off by default: the checks are not in the
        compiled step unless asked for.
      donate: donate the state's buffers to :meth:`step` and :meth:`steps` (``jax.jit(donate_argnums=0)``): the new
        state is written over the old one, so a step holds one copy of the parameters, optimizer state and EMA
        instead of two (the difference between fitting and not fitting a large model). The state passed in is
        deleted: keep using the returned one. :meth:`fit` still checks every chunk for NaN/inf, but the state
        before the bad chunk is gone, so the error's ``state`` is None (resume from the last checkpoint). Not
        with ``checked=True``, which keeps the old state when a check fails.
    """

    def __init__(
        self,
        model: nnx.Module,
        objective: Callable | Sequence[Update],
        optimizer: optax.GradientTransformation | dict[str, optax.GradientTransformation],
        *,
        data: Callable[[Array], Any] | None = None,
        ema_decay: float | Callable[[Array], Array] | None = None,
        ema_warmup: bool = True,
        compute_dtype: Any = None,
        fuse_steps: bool = True,
        microbatches: int = 1,
        checked: bool = False,
        mesh: Any = None,
        donate: bool = False,
    ):
        if isinstance(microbatches, bool) or not isinstance(microbatches, int) or microbatches < 1:
            raise ValueError(f"microbatches must be a positive int, got {microbatches!r}.")
        if ema_decay is not None and not callable(ema_decay) and not 0.0 <= ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) (or a function step -> decay), got {ema_decay}.")
        if compute_dtype is not None and not jnp.issubdtype(jnp.dtype(compute_dtype), jnp.floating):
            raise ValueError(f"compute_dtype must be a floating-point dtype (e.g. jnp.bfloat16), got {compute_dtype!r}.")
        for name, opt in (optimizer.items() if isinstance(optimizer, dict) else [("optimizer", optimizer)]):
            if not (callable(getattr(opt, "init", None)) and callable(getattr(opt, "update", None))):
                raise TypeError(f"{'optimizer' if name == 'optimizer' else f'optimizer[{name!r}]'} must be an optax "
                                f"GradientTransformation such as optax.adam(1e-3), got {type(opt).__name__}"
                                + (f" {opt!r}" if isinstance(opt, (int, float, str)) else "") + ".")
        self.updates = self._updates(objective, optimizer)
        self.optimizers = optimizer if isinstance(optimizer, dict) else {"default": optimizer}
        self.multi = (len(self.updates) > 1 or isinstance(optimizer, dict)
                      or any(u.params is not nnx.Param for u in self.updates))
        self.graphdef, self._params, self._rest = nnx.split(model, nnx.Param, ...)
        self.loss_fn = self.updates[0].loss if len(self.updates) == 1 else None
        self.data = data
        self.ema_decay = ema_decay
        self.ema_warmup = ema_warmup
        self.compute_dtype = compute_dtype
        self.fuse_steps = fuse_steps
        self.microbatches = microbatches
        if mesh is not None:
            check_mesh(mesh)
        self.mesh = mesh
        self._sharding_cache = None
        self.checked = bool(checked)
        self.donate = bool(donate)
        if self.checked and self.donate:
            raise ValueError("checked=True keeps the state when a check fails, which donate=True would delete: "
                             "use one or the other.")
        donated = (0,) if self.donate else ()
        if self.checked:
            self.step = self._checked(jax.jit(lambda s, b=None: checkified(self._step)(s, b)), "a training step")
            self._steps = self._checked(jax.jit(lambda s, n: checkified(lambda x: self._scan(x, n))(s),
                                                static_argnums=1), "fused training steps")
        else:
            self.step = jax.jit(self._step, donate_argnums=donated)
            self._steps = jax.jit(self._scan, static_argnums=1, donate_argnums=donated)

    @staticmethod
    def _checked(program: Callable, what: str) -> Callable:
        def run(state, *args):
            error, out = program(state, *args)
            raise_failed_check(error, f"checked mode, in {what} from step {int(state.step)}; the state was not "
                                      "updated")
            return out

        return run

    @staticmethod
    def _updates(objective, optimizer) -> tuple[Update, ...]:
        if callable(objective) and not isinstance(objective, Update):
            updates = (Update(objective),)
        else:
            updates = tuple(objective)
            if not updates or not all(isinstance(u, Update) for u in updates):
                raise ValueError("objective must be a loss loss(model, batch, key) or a non-empty sequence of "
                                 "jaxgen.training.Update.")
        names = set(optimizer) if isinstance(optimizer, dict) else {"default"}
        used = [u.optimizer for u in updates]
        if len(set(used)) != len(used):
            raise ValueError(f"every update needs its own optimizer (its own optimizer state), got {used}: pass "
                             "optimizer={name: optax transformation, ...} with one name per update.")
        for u in updates:
            if u.optimizer not in names:
                raise ValueError(f"an update uses the optimizer {u.optimizer!r}, but the trainer has {sorted(names)}: "
                                 "pass optimizer={name: optax transformation, ...} with every update's optimizer.")
            if isinstance(u.repeats, bool) or not isinstance(u.repeats, int) or u.repeats < 1:
                raise ValueError(f"an update's repeats must be a positive int, got {u.repeats!r}.")
        stateful = [u for u in updates if "state" in _accepts(u.loss)]
        if len(stateful) > 1:
            raise ValueError("at most one update's loss may carry the objective state (state=...).")
        return updates

    # -- state -------------------------------------------------------------------------------------------
    def _subset(self, params, update: Update):
        return nnx.filter_state(params, update.params) if update.params is not nnx.Param else params

    def init(self, key: Array | int) -> TrainState:
        """Initial state from the model's parameters and a PRNG key (or an integer seed); with a mesh, replicated on
        every device of it."""
        state = self._init(key)
        if self.mesh is None or any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(state)):
            return state
        sharding = self._state_sharding()
        if jax.process_count() == 1:
            return jax.device_put(state, sharding)
        # several processes: every process holds the same values (same seed, same initialisation); each one places
        # the parts its own devices hold (no transfer between processes, no compiled program)
        return jax.tree.map(global_from_local_copy, state, self._per_leaf(sharding, state))

    def abstract_state(self, key: Array | int = 0) -> TrainState:
        """The shapes, dtypes and shardings of :meth:`init`'s state, allocating nothing: the template to restore a
        checkpoint onto this trainer's devices (``checkpointer.restore(trainer.abstract_state())``)."""
        shapes = jax.eval_shape(self._init, key)
        if self.mesh is None:
            return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), shapes)
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                            self._per_leaf(self._state_sharding(), shapes))

    @staticmethod
    def _per_leaf(sharding, state):
        """``sharding`` (one for the whole state, or a tree of them) as a tree matching ``state`` leaf for leaf."""
        return jax.tree.map(lambda _: sharding, state) if isinstance(sharding, jax.sharding.Sharding) else sharding

    def _state_sharding(self):
        """Where the state lives on the mesh: one replicated sharding for the whole state, or (when parameters carry
        partitioning annotations) a TrainState of shardings: annotated parameters, their optimizer moments and EMA
        split, everything else replicated."""
        if self._sharding_cache is not None:
            return self._sharding_cache
        rep = replicated(self.mesh)
        params = parameter_shardings(self._params, self.mesh)
        if params is None:
            self._sharding_cache = rep
            return rep
        shapes = jax.eval_shape(self._init, 0)
        everywhere = lambda tree: jax.tree.map(lambda _: rep, tree)

        def moments(optimizer, subset, state):  # optimizer-state leaves shaped like the parameters follow them
            return optax.tree_map_params(optimizer, lambda _, sh: sh, state, subset, transform_non_params=lambda _: rep,
                                         is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))

        if self.multi:
            opt = {name: moments(self.optimizers[name], self._subset(params, next(u for u in self.updates
                                                                                if u.optimizer == name)), st)
                   for name, st in shapes.opt_state.items()}
        else:
            opt = moments(self.optimizers["default"], params, shapes.opt_state)
        self._sharding_cache = TrainState(rep, params, everywhere(shapes.rest), opt,
                                          params if shapes.ema_params is not None else None, rep,
                                          everywhere(shapes.aux))
        return self._sharding_cache

    def _init(self, key: Array | int) -> TrainState:
        seed = isinstance(key, (int, np.integer)) or (jnp.ndim(key) == 0
                                                     and jnp.issubdtype(jnp.result_type(key), jnp.integer))
        if seed:
            key = jax.random.key(key)  # a seed, also a traced one (jax.eval_shape(trainer.init, 0))
        check_key(key, owner="Trainer.init")
        params = jax.tree.map(jnp.asarray, self._params)
        ema = jax.tree.map(jnp.copy, params) if self.ema_decay is not None else None
        if self.multi:
            opt_state = {}
            for u in self.updates:
                if u.optimizer not in opt_state:
                    opt_state[u.optimizer] = self.optimizers[u.optimizer].init(self._subset(params, u))
        else:
            opt_state = self.optimizers["default"].init(params)
        aux = None
        for u in self.updates:
            if "state" in _accepts(u.loss):
                if not hasattr(u.loss, "init_state"):
                    raise ValueError("a loss that takes state= must provide loss.init_state(key) -> initial state.")
                aux = u.loss.init_state(jax.random.fold_in(key, 0xFFFFFFFF))  # a key no step k uses
        return TrainState(jnp.zeros((), jnp.int32), params, self._rest, opt_state, ema, key, aux)

    def model(self, state: TrainState, *, ema: bool = False) -> nnx.Module:
        """The NNX module holding the state's parameters (or their EMA)."""
        if ema and state.ema_params is None:
            raise ValueError("this trainer keeps no EMA (ema_decay=None); call model(state) without ema=True.")
        return nnx.merge(self.graphdef, state.ema_params if ema else state.params, state.rest)

    # -- the loss -----------------------------------------------------------------------------------------
    def _cast(self, tree):
        if self.compute_dtype is None:
            return tree
        cast = lambda v: v.astype(self.compute_dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v
        return jax.tree.map(cast, tree)

    def _gathered(self, params):
        """Split parameters gathered whole for the forward and backward passes (their gradients are reduce-scattered
        back onto the split state at the end of the step); unchanged when nothing is split."""
        if self.mesh is None or isinstance(self._state_sharding(), jax.sharding.Sharding):
            return params
        return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, replicated(self.mesh)), params)

    def loss(self, params: Any, rest: Any, batch: Any, key: Array, *, loss_fn: Callable | None = None,
             step: Array | None = None, ema_params: Any = None, aux: Any = None) -> tuple[Array, tuple[Any, Any]]:
        """The loss at ``params``: ``(value, (the module's updated non-parameter state, the new objective state))``."""
        loss_fn = self.loss_fn if loss_fn is None else loss_fn
        wants = _accepts(loss_fn)
        params, batch = self._gathered(self._cast(params)), self._cast(batch)
        model = nnx.merge(self.graphdef, params, rest)
        kwargs = {}
        if "step" in wants:
            kwargs["step"] = jnp.zeros((), jnp.int32) if step is None else step
        if "target" in wants:
            # Built at this trace level: a stateful network (dropout RNG counters) may only be mutated where it was
            # traced. Its own copy of `rest`: the same dropout masks as the online call.
            kwargs["target"] = None if ema_params is None else nnx.merge(
                self.graphdef, self._gathered(self._cast(jax.lax.stop_gradient(ema_params))),
                jax.tree.map(lambda v: v, rest))
        if "state" in wants:
            kwargs["state"] = aux
        out = loss_fn(model, batch, key, **kwargs)
        value, new_aux = out if "state" in wants else (out, aux)
        _, _, new_rest = nnx.split(model, nnx.Param, ...)
        return jnp.asarray(value).astype(jnp.float32), (new_rest, new_aux)

    # -- compiled steps ----------------------------------------------------------------------------------
    def _batch_and_loss_key(self, state: TrainState, batch: Any) -> tuple[Any, Array]:
        """The step's batch (sampled with ``data`` when not given) and the loss's key, from ``fold_in(key, step)``."""
        key = jax.random.fold_in(state.key, state.step)
        k_data, k_loss = jax.random.split(key)
        if batch is None:
            if self.data is None:
                raise ValueError("no batch given and the trainer has no data sampler: pass step(state, batch) "
                                 f"or build {type(self).__name__}(..., data=lambda key: ...).")
            batch = self.data(k_data)
        if self.mesh is not None:
            batch = shard_batch(batch, self.mesh)
        return batch, k_loss

    def _value_and_grad(self, update: Update, params, rest, batch, key, step, ema_params, aux):
        """Loss, updated ``rest``/``aux`` and the gradient with respect to the update's parameters."""
        whole = update.params is nnx.Param

        def f(train, rest, b, k, aux):
            full = train if whole else nnx.merge_state(params, train)
            return self.loss(full, rest, b, k, loss_fn=update.loss, step=step, ema_params=ema_params, aux=aux)

        # Differentiate with respect to (params, rest) and keep the params' gradient: stateful modules (dropout RNG
        # counters) must be traced at the level where they are mutated, which a closed-over `rest` is not.
        # Integer/key leaves get float0 gradients (allow_int), which XLA drops.
        vg = jax.value_and_grad(lambda pr, b, k, a: f(pr[0], pr[1], b, k, a), has_aux=True, allow_int=True)
        train = params if whole else nnx.filter_state(params, update.params)
        if self.microbatches == 1:
            (value, (rest, aux)), (grads, _) = vg((train, rest), batch, key, aux)
            return value, rest, aux, grads
        return self._accumulate(vg, train, rest, batch, key, aux)

    def _accumulate(self, vg, train, rest, batch, key, aux):
        """Mean loss and gradient over ``self.microbatches`` equal slices of ``batch`` (a ``lax.scan``)."""
        k = self.microbatches
        sizes = {jnp.shape(a)[0] if jnp.ndim(a) else None for a in jax.tree.leaves(batch)}
        if len(sizes) != 1 or None in sizes or next(iter(sizes)) % k:
            raise ValueError(f"microbatches={k} needs batch arrays with one leading batch size divisible by {k}; "
                             f"got leading sizes {sorted(sizes, key=str)}.")
        split = jax.tree.map(lambda a: a.reshape((k, a.shape[0] // k) + a.shape[1:]), batch)

        def body(carry, inputs):
            rest, aux, value_sum, grad_sum = carry
            micro, i = inputs
            (value, (rest, aux)), (grads, _) = vg((train, rest), micro, jax.random.fold_in(key, i), aux)
            return (rest, aux, value_sum + value, jax.tree.map(jnp.add, grad_sum, grads)), None

        zeros = jax.tree.map(jnp.zeros_like, train)
        (rest, aux, value_sum, grad_sum), _ = jax.lax.scan(
            body, (rest, aux, jnp.zeros((), jnp.float32), zeros), (split, jnp.arange(k)))
        return value_sum / k, rest, aux, jax.tree.map(lambda g: g / k, grad_sum)

    def _ema_decay(self, step: Array):
        if callable(self.ema_decay):
            return self.ema_decay(step)
        decay = self.ema_decay
        if self.ema_warmup:
            s = step.astype(jnp.float32)
            decay = jnp.minimum(decay, (1.0 + s) / (10.0 + s))
        return decay

    def _step(self, state: TrainState, batch: Any = None) -> tuple[TrainState, Array]:
        batch, k_loss = self._batch_and_loss_key(state, batch)
        ema_params = state.ema_params
        params, rest, opt_state, aux = state.params, state.rest, state.opt_state, state.aux
        values = []
        for u_index, update in enumerate(self.updates):
            opt = self.optimizers[update.optimizer]
            for r in range(update.repeats):
                key = k_loss if (u_index, r) == (0, 0) else jax.random.fold_in(k_loss, 1000 * u_index + r)
                value, rest, aux, grads = self._value_and_grad(update, params, rest, batch, key, state.step,
                                                               ema_params, aux)
                if self.multi:
                    train = params if update.params is nnx.Param else nnx.filter_state(params, update.params)
                    updates, new_opt = opt.update(grads, opt_state[update.optimizer], train)
                    train = optax.apply_updates(train, updates)
                    params = train if update.params is nnx.Param else nnx.merge_state(params, train)
                    opt_state = {**opt_state, update.optimizer: new_opt}
                else:
                    updates, opt_state = opt.update(grads, opt_state, params)
                    params = optax.apply_updates(params, updates)
            values.append(value)
        if ema_params is not None:
            ema_params = ema_update(ema_params, params, self._ema_decay(state.step))
        value = values[0] if len(values) == 1 else jnp.stack(values)
        new = TrainState(state.step + 1, params, rest, opt_state, ema_params, state.key, aux)
        if self.mesh is not None:  # the state keeps its sharding (and the scan's carry keeps one sharding)
            new = jax.lax.with_sharding_constraint(new, self._state_sharding())
        return new, value

    def _scan(self, state: TrainState, num_steps: int) -> tuple[TrainState, Array]:
        return jax.lax.scan(lambda s, _: self._step(s), state, None, length=num_steps)

    def steps(self, state: TrainState, num_steps: int) -> tuple[TrainState, Array]:
        """``num_steps`` steps, fused into one XLA program (``lax.scan``) unless ``fuse_steps=False``; returns the
        per-step losses (shape ``(num_steps,)``, or ``(num_steps, len(updates))`` for several updates). Both forms
        give the same result."""
        if self.data is None:
            raise ValueError("fused steps sample their batches inside the program: build Trainer(..., data=...).")
        if self.fuse_steps:
            return self._steps(state, int(num_steps))
        losses = []
        for _ in range(int(num_steps)):
            state, value = self.step(state)
            losses.append(value)
        if not losses:
            return state, jnp.zeros((0,) + ((len(self.updates),) if len(self.updates) > 1 else ()), jnp.float32)
        return state, jnp.stack(losses)

    def _first_nonfinite(self, state: TrainState, n: int, chunk_losses: np.ndarray) -> str:
        """What first went wrong in a chunk that started at the finite ``state``: replays it one step at a time
        (bitwise the fused steps) and names the first step whose loss is not finite, or whose update made the
        training state (parameters, optimizer state, EMA) non-finite, with its first bad leaf."""
        for _ in range(n):
            step = int(state.step)
            state, value = self.steps(state, 1)
            value = np.asarray(value)
            if not np.all(np.isfinite(value)):
                return f"the loss became {value[~np.isfinite(value)][0]} at step {step}"
            leaves = nonfinite_leaves(state)
            if leaves:
                return (f"the update of step {step} made the training state non-finite (its loss was finite; first "
                        f"bad leaf {leaves[0]}, {len(leaves)} in all)")
        bad = ~np.isfinite(chunk_losses.reshape(n, -1)).all(-1)  # not reproduced step by step
        return (f"the loss became non-finite at step {int(state.step) - n + int(np.argmax(bad))}" if bad.any()
                else f"the training state became non-finite in steps {int(state.step) - n}-{int(state.step) - 1}")

    # -- the loop ---------------------------------------------------------------------------------------
    def fit(
        self,
        state: TrainState,
        num_steps: int | None = None,
        *,
        until_step: int | None = None,
        chunk: int = 500,
        callbacks: Sequence[Any] = (),
        progress: bool = True,
        desc: str = "train",
    ) -> tuple[TrainState, np.ndarray]:
        """Train ``num_steps`` more steps, or until ``state.step == until_step``, in fused chunks, with a progress
        bar, a NaN guard and callbacks.

        Chunks end at the absolute step numbers that are multiples of ``chunk`` and of every callback's ``every``
        (so a run resumed from a checkpoint executes the same programs on the same inputs as an uninterrupted one,
        and reaches bitwise the same parameters). After each chunk the losses come back to the host and the state
        (parameters, optimizer state, EMA) is checked for NaN/inf; a non-finite loss or state stops training with a
        ``FloatingPointError`` that names the step (and the first bad leaf), keeping the last good state in
        ``error.state``: callbacks never see, and checkpoints never hold, a non-finite state. ``until_step`` at or
        below the current step trains nothing (a finished run).

        Callbacks (:mod:`jaxgen.training.callbacks`; or plain functions ``f(state, chunk_losses)``, called after every
        chunk) run in the order given: ``on_losses`` after each chunk, ``on_chunk`` after each chunk (those with
        ``every`` only at its multiples and at the end), ``on_end`` after the last, and ``close`` always, also when
        training stops with an error.

        Returns:
          ``(state, losses)``: the final state and the losses of the steps run by this call.
        """
        from tqdm.auto import tqdm

        from jaxgen.training.callbacks import as_callback

        if (num_steps is None) == (until_step is None):
            raise ValueError("pass either num_steps (steps to train now) or until_step (the step to reach).")
        for name, v in (("num_steps", num_steps), ("until_step", until_step), ("chunk", chunk)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer))):
                raise ValueError(f"{name} must be an int, got {v!r}.")
        if num_steps is not None and num_steps < 0:
            raise ValueError(f"num_steps must be >= 0, got {num_steps}.")
        if until_step is not None and until_step < 0:
            raise ValueError(f"until_step must be >= 0 (the step count to reach), got {until_step}.")
        if chunk < 1:
            raise ValueError(f"chunk must be >= 1, got {chunk}.")
        callbacks = [as_callback(c) for c in callbacks]
        start = int(state.step)
        target = start + int(num_steps) if num_steps is not None else max(int(until_step), start)
        intervals = [int(chunk)] + [int(c.every) for c in callbacks if getattr(c, "every", None)]
        losses: list[np.ndarray] = []
        bar = tqdm(total=target, initial=start, desc=desc, disable=not progress or jax.process_index() != 0,
                   unit="step", dynamic_ncols=True)  # one bar: process 0's
        step = start
        try:
            for c in callbacks:
                c.on_start(self, state)
            while step < target:
                nxt = min([target] + [(step // n + 1) * n for n in intervals])
                n = nxt - step
                new_state, chunk_losses = self.steps(state, n)
                chunk_losses = np.asarray(chunk_losses)
                if not np.all(np.isfinite(chunk_losses)) or nonfinite_leaves(new_state):
                    if self.donate:  # the state before the chunk was donated to it: no replay, no last good state
                        bad = ~np.isfinite(chunk_losses.reshape(n, -1)).all(-1)
                        what = (f"the loss became non-finite at step {step + int(np.argmax(bad))}" if bad.any()
                                else f"the training state became non-finite in steps {step}-{nxt - 1}")
                        kept = ("the state before it was donated to the step (donate=True), so resume from the last "
                                "checkpoint")
                    else:
                        what = self._first_nonfinite(state, n, chunk_losses)
                        kept = f"the last good state (step {step}) is kept"
                    err = FloatingPointError(f"{what}; training stopped and {kept}. Lower the learning rate, add "
                                             "gradient clipping (optax.clip_by_global_norm), or check the data and "
                                             "the loss for NaN/inf.")
                    err.state = None if self.donate else state
                    raise err
                state, step = new_state, nxt
                losses.append(chunk_losses)
                bar.update(n)
                recent = chunk_losses[-min(50, n):]
                bar.set_postfix(loss=" ".join(f"{v:.4f}" for v in np.atleast_1d(recent.mean(0))))
                for c in callbacks:
                    c.on_losses(self, state, chunk_losses)
                    every = getattr(c, "every", None)
                    if not every or step % every == 0 or step == target:
                        c.on_chunk(self, state, chunk_losses)
            for c in callbacks:
                c.on_end(self, state)
        finally:
            bar.close()
            for c in callbacks:
                c.close()
        empty = np.zeros((0,) + ((len(self.updates),) if len(self.updates) > 1 else ()), np.float32)
        return state, (np.concatenate(losses) if losses else empty)


__all__ = ["TrainState", "Trainer", "Update", "ema_update"]
