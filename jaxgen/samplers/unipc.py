r"""UniPC: the unified predictor-corrector sampler (Zhao, Bai, Rao, Zhou, Lu 2023), data-prediction form.

Same setting as :mod:`jaxgen.samplers.ddim` (read its module docstring first): a Gaussian path
``x_t = alpha_t z + beta_t eps`` with t=0 noise and t=1 data, any field parameterisation decoded into the
data prediction ``z_hat`` by :meth:`jaxgen.samplers.Model.denoise`, and the probability-flow ODE solved in
the half log-SNR ``lambda_t = log(alpha_t / beta_t)``. Its exact solution from ``s`` to ``t`` in data-prediction
form (Lu et al. 2022b, eq. 8), Taylor-expanded in ``lambda`` around ``lambda_s`` with ``h = lambda_t - lambda_s``,
is

.. math:: x_t = \frac{\beta_t}{\beta_s} x_s + \beta_t \int_{\lambda_s}^{\lambda_t} e^{\lambda} \hat z\, d\lambda
          = \frac{\beta_t}{\beta_s} x_s + \alpha_t (1 - e^{-h}) \hat z_s
          + \alpha_t \sum_{n \ge 1} \frac{h^n}{n!} \psi_n(h)\, \hat z^{(n)}_s,
   \qquad \psi_n(h) = h^{-n} \int_0^h e^{-u} (h - u)^n\, du = n!\, h\, \varphi_{n+1}(-h),

(``z^{(n)}`` the ``n``-th derivative in ``lambda``, ``varphi`` the exponential-integrator functions,
``psi_n(h) = h / (n + 1) + O(h^2)``). The first term alone is DDIM.

UniP and UniC (Zhao et al. 2023, Sec. 3: UniC-p, Theorem 3.1; UniP-p, Corollary 3.2) replace the Taylor
sum by ``alpha_t B(h) sum_m a_m D_m / r_m`` over model outputs at ``K`` other log-SNR nodes
``lambda_s + r_m h``, with ``D_m = z_hat(lambda_s + r_m h) - z_hat_s``. Expanding ``D_m / r_m`` shows that the
step has local error ``O(h^{K+2})`` when the coefficients meet the **order conditions**

.. math:: B(h) \sum_{m=1}^{K} a_m\, r_m^{\,n-1} = \psi_n(h), \qquad n = 1, \dots, K

(a Vandermonde system, solved here in Lagrange form, :func:`unipc_order_weights`). Any ``B(h) = h + O(h^2)``
is allowed: the paper's ``B_1(h) = h`` (``variant="bh1"``) and ``B_2(h) = e^h - 1`` (``variant="bh2"``; in
the data-prediction form, where the paper's step is ``-h``, it reads ``1 - e^{-h}`` here). For ``K >= 2`` the
system is solved exactly and ``B`` cancels; for ``K = 1`` (the only case where the variants differ) UniPC
uses the constant ``a_1 = 1/2``, the ``h -> 0`` limit of ``psi_1(h) / B(h)``, which meets the condition to
the ``O(h)`` that order ``K + 1`` needs, giving the increment ``alpha_t B(h) D_1 / (2 r_1)``. (The other
coefficients must meet it to ``O(h^K)``, hence the exact solve.)

UniPC-p multistep (one field evaluation per step). On the grid ``t_0 < ... < t_N``, with ``x~`` the
predicted and ``x^c`` the corrected states and ``z_hat_i = z_hat(x~_i, t_i)``:

* **UniP-p** (predictor) for the step ``i -> i+1``: the nodes are the ``p - 1`` previous points,
  ``r_k = (lambda_{i-k} - lambda_i) / h_i < 0`` (``k = 1 .. p-1``), so ``K = p - 1``: order ``p``.
  UniP-1 is DDIM; UniP-2 with ``bh2`` is DPM-Solver++(2M).
* **UniC-p** (corrector), once ``z_hat_{i+1}`` has been evaluated at the predicted ``x~_{i+1}``: the same
  step recomputed from ``x^c_i`` with the extra node ``r = 1`` (``D = z_hat_{i+1} - z_hat_i``), so
  ``K = p``: order ``p + 1``. The next predictor starts from ``x^c_{i+1}`` but reuses ``z_hat_{i+1}`` (taken
  at ``x~_{i+1}``), so the corrector costs no evaluation. It is skipped after the last step, which keeps
  NFE = ``steps``.

Warm-up: step ``i`` has order ``min(order, i + 1)`` (only ``i`` previous outputs exist), and with
``lower_order_final`` ``min(order, N - i)`` (the last step is DDIM, the one before at most second order).

The coefficients depend on the log-SNR grid only (:func:`unipc_weights`). When the grid is known at trace
time (``steps`` with Python-float ``t0``/``t1``, or a concrete ``ts``: the usual case) they are computed once
in float64 NumPy and enter the program as constants; for a traced grid (a ``ts`` passed to a jitted
function, or differentiated) the same formulas run inside the program in float32 (float64 for a float64 grid).

The ends of the path: a step starting where ``alpha = 0`` or ending where ``beta = 0`` has ``h = inf`` and
is taken with DDIM and not corrected, as in DPM-Solver++(2M); an output at ``lambda = -inf`` is never used as
a node (the next step is then first order with its UniC-1 corrector). These cases are detected from the
grid's values, also for a traced ``ts``. No formula divides by ``alpha`` or by ``beta_t``: the only division
is by ``beta_s`` at a step's start, which is positive. (As ``t0 -> 0+`` on such a path the first step's
corrector does not vanish: its weight tends to ``1/2`` with ``bh2`` and grows like ``h`` with ``bh1``, so
UniPC's samples are not continuous in ``t0`` at ``alpha = 0``; prefer ``bh2`` for long first steps.)

Global error (``tests/test_unipc.py``, against the exact flow map of Gaussian data): UniPC-1 and UniPC-2 are of
order 2 and 3 on a grid with finite log-SNR at both ends (measured 1.9 and 2.9 on VP with an eps field);
UniPC-3 is of order 4 away from the start, but its warm-up step (UniP-1 + UniC-1, local error ``O(h^3)``)
makes it 3 asymptotically (measured 3.3 on VP, 2.8 on the linear path: the warm-up starts at low SNR, where
``z_hat`` hardly changes). The predictor alone (``corrector=False``) is one order lower (UniP-2: 1.9). Two
first-order steps cap every order at 2: a DDIM step at an open end (``[0, 1]`` of the linear path; measured
2.05), and the final DDIM step of ``lower_order_final=True`` (local error ``O(h^2)``), whose constant is small
where ``z_hat`` varies slowly near the data end (no visible effect on the measured slopes above).

Gradients. :class:`UniPC` can be differentiated (``jax.grad``) with respect to the field's parameters, ``x0``
and the time grid (a traced ``ts``), also where an end has ``alpha = 0`` or ``beta = 0``, as the samplers of
:mod:`jaxgen.samplers.ddim`: the infinite log-SNR there is a constant (derivative 0, no ``0 * inf = NaN``),
the coefficients are kept non-negative with derivative 1 where they vanish (``jnp.maximum``'s is 1/2), and the
DDIM weight ``1 - e^{-h}`` of a step with infinite ``h`` is differentiated as
``1 - alpha_s beta_t / (beta_s alpha_t)``, its exact value as a function of the path's coefficients
(:func:`jaxgen.samplers.ddim.ddim_weight`). The
derivative with respect to the last time where ``beta = 0`` is then the one-sided derivative of the samples,
when the last step is first order on either side of that end (``lower_order_final=True``, the default, or
``order=1``; tested against differences in ``tests/test_unipc.py``); with ``lower_order_final=False`` and
``order >= 2`` the predictor's weight of ``z_hat_{N-2} - z_hat_{N-1}`` grows like ``h`` as the end approaches
``beta = 0``, and the samples are not continuous there. Nor are they continuous in ``t_0`` at ``alpha = 0``
(the first step's corrector, above; the second step's predictor also depends on ``1 / log(t_0)``): the
gradient with respect to such a first time is that of the first DDIM step, not a derivative in the ordinary
sense. (The field's own derivative in ``t`` at an end is the field's business.)
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar

import numpy as np
import jax
import jax.numpy as jnp

from jaxgen._checks import is_concrete
from jaxgen.paths.gaussian import log_snr, log_snr_from_coefficients
from jaxgen.samplers.base import register
from jaxgen.samplers.ddim import DiffusionSolver, check_order, ddim_weight

Array = jax.Array

_VARIANTS = ("bh1", "bh2")
_PSI_SERIES_BELOW = 1.0  # psi_n by its Taylor series for h below this, by the recursion above it
_PSI_SERIES_TERMS = 14   # truncation error < h^14 / 14! < 1e-11 for h < 1


def _xp(a):
    """NumPy for NumPy arrays and Python numbers (coefficients computed at trace time), else jax.numpy."""
    return np if isinstance(a, (np.ndarray, np.generic, float, int)) else jnp


def _check_variant(variant) -> str:
    if variant not in _VARIANTS:
        raise ValueError(f"unknown UniPC variant {variant!r}; use 'bh1' (B(h) = h) or 'bh2' (B(h) = e^h - 1, "
                         "the paper's recommendation for few steps).")
    return variant


def _check_flag(value, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}.")
    return value


# ---------------------------------------------------------------------------------------------------------
# Coefficients (functions of the log-SNR grid only; computed once, outside the scan over steps).
# ---------------------------------------------------------------------------------------------------------


def unipc_psi(h: Array, n_max: int) -> list[Array]:
    r"""``[psi_1(h), ..., psi_{n_max}(h)]``, the Taylor weights of the exact data-prediction step:

    .. math:: \psi_n(h) = h^{-n} \int_0^h e^{-u} (h - u)^n du = n!\, h\, \varphi_{n+1}(-h)
              = n!\, h \sum_{k \ge 0} \frac{(-h)^k}{(n + k + 1)!},
              \qquad \psi_n = 1 - \frac{n}{h} \psi_{n-1},\ \psi_0 = 1 - e^{-h}

    (integration by parts). The recursion loses ``~log10(n!/h^n)`` digits to cancellation for small ``h``,
    so ``h < 1`` uses the series; both branches are evaluated at safe arguments, so gradients stay
    finite. ``h > 0`` of any shape (``+inf`` gives the limit ``psi_n = 1``); a NumPy ``h`` is computed in
    NumPy, anything else in JAX.
    """
    xp = _xp(h)
    h = xp.asarray(h)
    small = h < _PSI_SERIES_BELOW
    h_small = xp.where(small, h, 0.0)
    h_big = xp.where(small, _PSI_SERIES_BELOW, h)
    out, rec = [], -xp.expm1(-h_big)
    for n in range(1, n_max + 1):
        rec = 1.0 - n / h_big * rec
        series = xp.zeros_like(h_small)
        for k in reversed(range(_PSI_SERIES_TERMS)):  # Horner in -h
            series = series * (-h_small) + 1.0 / math.factorial(n + k + 1)
        out.append(xp.where(small, math.factorial(n) * h_small * series, rec))
    return out


def unipc_b(h: Array, variant: str) -> Array:
    r"""The paper's ``B(h)`` in the data-prediction form (Zhao et al. 2023, Sec. 3; both ``h + O(h^2)``):
    ``B_1(h) = h`` (``"bh1"``) and ``B_2(h) = 1 - e^{-h}`` (``"bh2"``, the paper's ``e^h - 1`` at its step
    ``-h``, sign absorbed)."""
    _check_variant(variant)
    return h if variant == "bh1" else -_xp(h).expm1(-h)


def unipc_order_weights(nodes: list[Array], psi: list[Array], b: Array) -> list[Array]:
    r"""``B(h) a_m / r_m`` for the nodes ``r_1 .. r_K``: UniPC's order conditions (Theorem 3.1)

    .. math:: B(h) \sum_{m=1}^{K} a_m r_m^{\,n-1} = \psi_n(h), \quad n = 1..K,

    solved in Lagrange form: with ``L_m(x) = prod_{j != m} (x - r_j) / (r_m - r_j) = sum_n c_{mn} x^{n-1}``,
    ``B a_m = sum_n c_{mn} psi_n``. For ``K = 1`` UniPC's constant ``a_1 = 1/2`` (the ``h -> 0`` limit of
    ``psi_1 / B``) is used instead (the only place where ``B`` matters; the step is then
    ``alpha_t B(h) D_1 / (2 r_1)``).
    The weight multiplies ``alpha_t (z_hat(r_m) - z_hat_s)`` in the step. ``nodes``, ``psi`` and ``b``
    broadcast together; nodes must be distinct and non-zero.
    """
    k = len(nodes)
    if k == 1:
        return [0.5 * b / nodes[0]]
    out = []
    for m in range(k):
        poly = [_xp(nodes[m]).ones_like(nodes[m])]  # coefficients of prod_{j != m} (x - r_j), ascending
        den = _xp(nodes[m]).ones_like(nodes[m])
        for j in range(k):
            if j == m:
                continue
            poly = [(poly[i - 1] if i > 0 else 0.0) - (nodes[j] * poly[i] if i < len(poly) else 0.0)
                    for i in range(len(poly) + 1)]
            den = den * (nodes[m] - nodes[j])
        b_a = sum(c * p for c, p in zip(poly, psi)) / den
        out.append(b_a / nodes[m])
    return out


def unipc_weights(lambdas: Array, *, order: int, variant: str = "bh2", lower_order_final: bool = True,
                  corrector: bool = True) -> dict[str, Array]:
    r"""Per-step coefficients of UniPC-``order`` on the log-SNR grid ``lambdas`` (``N + 1`` values, increasing;
    ``-inf`` / ``+inf`` allowed at the ends).

    Step ``i`` (from ``lambda_i`` to ``lambda_{i+1}``, ``h_i = lambda_{i+1} - lambda_i``) has order
    ``q_i = min(order, 1 + #usable previous outputs[, N - i with lower_order_final])``, ``q_i = 1`` where
    ``h_i`` is infinite; a previous output at ``lambda_{i-k}`` is usable when it exists and is finite. Its
    nodes are ``r_k = (lambda_{i-k} - lambda_i) / h_i`` for ``k < q_i``, and (corrector) ``r = 1``.

    A NumPy ``lambdas`` is computed in float64 NumPy (what :func:`unipc` does for a grid known at trace time,
    so that its program holds constants), anything else in float32 JAX, or float64 for float64 ``lambdas`` (jit-able,
    differentiable).

    Returns ``{"h", "ddim", "pred", "corr", "corr_new"}`` with ``ddim_i = 1 - e^{-h_i}``; ``pred[i, k-1]``,
    ``corr[i, k-1]`` the weights (:func:`unipc_order_weights`) of ``z_hat_{i-k} - z_hat_i`` in UniP and UniC,
    and ``corr_new[i]`` that of ``z_hat_{i+1} - z_hat_i`` in UniC (zero where a node is unused). Where the
    corrector is off (after the last step, at an infinite ``h``, or ``corrector=False``) ``corr = pred`` and
    ``corr_new = 0``, so that the corrected state is the predicted one. So

    .. math:: \tilde x_{i+1} = \frac{\beta_{i+1}}{\beta_i} x^c_i + \alpha_{i+1}\Big[(1 - e^{-h_i}) \hat z_i
              + \sum_k w^P_{ik} (\hat z_{i-k} - \hat z_i)\Big],

    and ``x^c_{i+1}`` the same with ``w^C`` plus ``w^C_{new} (z_hat_{i+1} - z_hat_i)``.
    """
    order = check_order(order, (1, 2, 3), "unipc")
    _check_variant(variant)
    xp = _xp(lambdas)
    lam = xp.asarray(lambdas, np.float64 if xp is np else jnp.promote_types(jnp.result_type(lambdas), jnp.float32))
    n = lam.shape[0] - 1
    i = xp.arange(n)
    lam_s = lam[:-1]
    h = lam[1:] - lam_s
    step_ok = xp.isfinite(h)
    h_safe = xp.where(step_ok, h, 1.0)
    lam_s_safe = xp.where(step_ok, lam_s, 0.0)

    nodes, usable = [], []
    for k in range(1, order):
        lam_k = lam[xp.maximum(i - k, 0)]
        ok = (i - k >= 0) & xp.isfinite(lam_k) & step_ok
        usable.append(ok)
        # an unusable node gets a placeholder below the previous node (nodes stay distinct, no division
        # by zero in the unselected formulas, so no NaN in gradients either)
        placeholder = (nodes[-1] if nodes else 0.0) - 1.0
        nodes.append(xp.where(ok, (xp.where(ok, lam_k, 0.0) - lam_s_safe) / h_safe, placeholder))
    q = xp.full((n,), order)
    if usable:
        q = xp.minimum(q, 1 + sum(u.astype(q.dtype) for u in usable))
    if lower_order_final:
        q = xp.minimum(q, n - i)
    q = xp.where(step_ok, q, 1)

    psi = unipc_psi(h_safe, order)
    b = unipc_b(h_safe, variant)
    zeros = xp.zeros((n,), lam.dtype)
    pred = [zeros] * (order - 1)
    corr = [zeros] * (order - 1)
    corr_new = zeros
    for p in range(1, order + 1):  # steps of order p: K = p - 1 predictor nodes, K = p corrector nodes
        sel = q == p
        if p > 1:
            w = unipc_order_weights(nodes[:p - 1], psi, b)
            pred = [xp.where(sel, w[k], pred[k]) if k < p - 1 else pred[k] for k in range(order - 1)]
        w = unipc_order_weights(nodes[:p - 1] + [xp.ones_like(h_safe)], psi, b)
        corr = [xp.where(sel, w[k], corr[k]) if k < p - 1 else corr[k] for k in range(order - 1)]
        corr_new = xp.where(sel, w[-1], corr_new)
    use_corr = step_ok & (i < n - 1) if corrector else xp.zeros((n,), bool)
    corr = [xp.where(use_corr, c, w_p) for c, w_p in zip(corr, pred)]  # no corrector: x^c = x~
    corr_new = xp.where(use_corr, corr_new, 0.0)
    stack = lambda ws: xp.stack(ws, axis=1) if ws else xp.zeros((n, 0), lam.dtype)
    return {"h": h, "ddim": -xp.expm1(-h), "pred": stack(pred), "corr": stack(corr), "corr_new": corr_new}


# ---------------------------------------------------------------------------------------------------------
# The sampler.
# ---------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _host_log_snr(path, times: bytes, n: int) -> np.ndarray:
    """``lambda`` of a concrete grid in float64 NumPy (one small compiled program, cached per grid)."""
    with jax.ensure_compile_time_eval():
        t = jnp.asarray(np.frombuffer(times, np.float32).reshape(n))
        return np.asarray(jax.jit(lambda s: log_snr(path, s))(t), np.float64)


def _grid_log_snr(path, times: Array) -> np.ndarray | None:
    """The grid's log-SNR as float64 NumPy when the grid is known at trace time, else ``None``."""
    if not is_concrete(times):
        return None
    arr = np.asarray(times, np.float32)
    try:
        return _host_log_snr(path, arr.tobytes(), arr.shape[0])
    except TypeError:  # an unhashable path
        with jax.ensure_compile_time_eval():
            return np.asarray(log_snr(path, jnp.asarray(arr)), np.float64)


@dataclasses.dataclass(frozen=True)
class UniPC(DiffusionSolver):
    r"""UniPC-``order`` multistep sampler (Zhao et al. 2023), data-prediction form, on any Gaussian path.

    Each step ``i`` evaluates the field once, at the predicted state ``x~_i``, decodes ``z_hat_i``, applies
    the corrector UniC to the step that ended at ``t_i`` (no evaluation: it uses ``z_hat_i``), and predicts
    the next state with UniP from the corrected ``x^c_i``:

    .. math:: x^c_i = \frac{\beta_i}{\beta_{i-1}} x^c_{i-1} + \alpha_i\Big[(1 - e^{-h}) \hat z_{i-1}
              + \sum_{m} \frac{B(h) a^C_m}{r_m} \big(\hat z(r_m) - \hat z_{i-1}\big)\Big],\qquad
              \tilde x_{i+1} = \frac{\beta_{i+1}}{\beta_i} x^c_i + \alpha_{i+1}\Big[(1 - e^{-h_i}) \hat z_i
              + \sum_{k} \frac{B(h_i) a^P_k}{r_k} \big(\hat z_{i-k} - \hat z_i\big)\Big]

    (coefficients and nodes in :func:`unipc_weights` and the module docstring). The last step is not
    corrected: NFE = ``steps``, and the result is ``x~_N``. ``order=1`` with ``corrector=False`` is DDIM;
    ``corrector=False`` with ``variant="bh2"`` is DPM-Solver++(2M) for ``order=2`` and (3M) for ``order=3``
    (:class:`~jaxgen.samplers.DPMSolverPP`). The trajectory holds the corrected states at ``t_0 .. t_{N-1}`` and the
    result at ``t_N``.

    Args:
      order: ``p`` in 1..3: UniP-p predictor (order ``p``) + UniC-p corrector (order ``p + 1``).
      variant: ``"bh2"`` (``B(h) = e^h - 1``, default) or ``"bh1"`` (``B(h) = h``).
      lower_order_final: lower the order of the final steps to the number of steps left (the last one is
        DDIM), whatever the number of steps. It keeps few-step sampling stable where the last steps are long in
        ``lambda`` (on the VP path's default grid, whose last of 5-10 steps spans ~6 in ``lambda``, UniPC-2's error on
        a Gaussian mixture is 5x (``bh2``) to 40x (``bh1``) larger without it) but caps the global order at 2 (module
        docstring).
      corrector: apply UniC (default). ``False`` gives the predictor UniP-p alone (global order ``p``).
      spacing: as :class:`~jaxgen.samplers.ddim.DiffusionSolver`.
    """

    name: ClassVar[str] = "unipc"
    default_steps: ClassVar[int] = 20
    order: int = 2
    variant: str = "bh2"
    lower_order_final: bool = True
    corrector: bool = True

    def __post_init__(self):
        super().__post_init__()
        check_order(self.order, (1, 2, 3), "unipc")
        _check_variant(self.variant)
        _check_flag(self.lower_order_final, "lower_order_final")
        _check_flag(self.corrector, "corrector")

    def init(self, model, x0, grid):
        return x0, tuple(jnp.zeros_like(x0) for _ in range(int(self.order)))  # z_hat_{i-1} .. z_hat_{i-order}

    def step_inputs(self, model, grid):
        path = model.path
        times = grid.times
        # path.coefficients' values, with derivative 1 (not 1/2) where alpha or beta is 0 (module docstring)
        alpha, beta = path.schedule.values(times)
        lam = _grid_log_snr(path, times)
        w = unipc_weights(log_snr_from_coefficients(alpha, beta) if lam is None else lam, order=self.order,
                          variant=self.variant, lower_order_final=self.lower_order_final, corrector=self.corrector)
        # a traced grid: DDIM's weight with the derivative of e^{-h} at an infinite h (a grid known at trace time is
        # not differentiated: its weights are constants)
        ddim = w["ddim"] if lam is not None else ddim_weight(w["h"], alpha[:-1], beta[:-1], alpha[1:], beta[1:])
        shift = lambda a: jnp.concatenate([jnp.zeros_like(a[:1]), a[:-1]])  # step i-1's coefficients at step i
        return {
            "t": times[:-1],
            "alpha_s": alpha[:-1],
            "ratio": beta[1:] / beta[:-1],          # beta_i > 0 at every step's start
            "alpha_t": alpha[1:],
            "ddim": jnp.asarray(ddim),
            "pred": jnp.asarray(w["pred"]),
            "corr_prev": jnp.concatenate([shift(jnp.asarray(w["corr_new"]))[:, None],
                                          shift(jnp.asarray(w["corr"] - w["pred"]))], axis=1),
        }

    def step(self, model, carry, inp, key):
        x_pred, hist = carry
        c = {k: v if k == "t" else jnp.asarray(v).astype(x_pred.dtype) for k, v in inp.items()}
        z, _ = model.denoise(x_pred, c["t"])
        # UniC-p for the step that ended at t_i (all weights zero at i = 0 or where the corrector is off)
        z_last = hist[0]
        dc = c["corr_prev"][0] * (z - z_last)
        for k in range(1, int(self.order)):
            dc = dc + c["corr_prev"][k] * (hist[k] - z_last)
        x_corr = x_pred + c["alpha_s"] * dc
        # UniP-p from t_i to t_{i+1}
        dp = c["ddim"] * z
        for k in range(int(self.order) - 1):
            dp = dp + c["pred"][k] * (hist[k] - z)
        x_next = c["ratio"] * x_corr + c["alpha_t"] * dp
        return (x_next, (z,) + hist[:-1]), x_corr

    def finish(self, model, carry):
        return carry[0]

    def trajectory(self, x0, records, x):
        corrected = jnp.concatenate(records, axis=0)[1:]  # x^c_0 = x0 comes first
        return jnp.concatenate([x0[None], corrected, x[None]], axis=0)


register(UniPC.name, UniPC)

__all__ = ["UniPC", "unipc_psi", "unipc_b", "unipc_order_weights", "unipc_weights"]
