"""Training-free inverse problems on held-out digits, and PF-ODE inversion round trips, in one run.

Part 1 (``--run RUN``, a label-conditioned flow-matching run such as ``jaxgen train digits_cfm``'s): the held-out digits
observed through a measurement -- one half kept (``left``, ``right``, ``top``, ``bottom``), a centre box missing
(``centre``), or averaged 2x2 blocks (``sr2``: 4x4 -> 8x8) -- are completed by the run's network used unconditionally
(the null class: the label is never given) with each method of :mod:`jaxgen.inverse` (projection = score_sde's
replacement, RePaint with resampling, DPS, PiGDM) through :func:`experiments.conditioning.solve_inverse`, the sampler
interface of ``jaxgen sample --inpaint / --superres``. Scored: the fraction of completions the digits classifier labels
as the held-out digit's true label, the mean absolute error on the unobserved part (pixels, or for super-resolution
the whole image), the measurement's consistency ``|A x - y|``, NFE and seconds (one call each, compilation included).

Each problem also lists reference classifiers of the measurement itself (``reference: ...`` rows: 1-NN on ``A x``, the
Bayes classifier of the smoothed training digits observed through ``A``, an SVM trained on ``A x`` with fixed and with
cross-validated ``C`` and ``gamma``): how much of the label the measurement carries at all. For a kept half they score
0.89-0.94 on the digits (the tuned SVM 0.905 with the top half kept), so a completion's label accuracy has little room
above 0.9 whatever the solver.

With ``--infer-label`` each method also runs in two passes: the unconditional completion, the class the network
itself finds likeliest for the measurement (:func:`jaxgen.inverse.infer_labels`, a diffusion classifier on the
observed part), and a completion conditioned on that class. ``--infer-label evidence`` (or ``denoising,evidence``
for both) infers the class instead from the Monte Carlo evidence of the network's own samples, ``--evidence-samples``
per class (default 1,000; :func:`jaxgen.inverse.infer_labels_by_evidence`; one pool, drawn once for all the problems,
its time in the first evidence row) and completes once, conditioned on it.

Part 2 (``--inversion``): the round trip data -> noise -> data with each deterministic solver at several step counts,
``mean |sample(invert(x)) - x|`` per pixel on the held-out digits, for (a) the *oracle* field -- the exact marginal
velocity of the training digits smoothed by a small Gaussian (a mixture with one component per training digit,
``jaxgen.GaussianMixture``), and (b) the run's network (null class).

Usage: python benchmarks/bench_inverse.py --run runs/digits_cfm [--num 359] [--out runs/bench_inverse] [--inversion]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PROBLEMS = ("left", "right", "top", "bottom", "centre", "sr2")
METHODS = {"inpaint": ("projection", "repaint", "dps", "pigdm"), "superres": ("dps", "pigdm")}


def inverse_table(run: str, num: int, steps: int, resample: int, problems, methods, dps_scale: float,
                  infer=(), evidence_samples: int | None = None) -> list[dict]:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from experiments import conditioning, images
    from jaxgen.evaluation import guided_label_accuracy
    from jaxgen.inverse import MaskOperator

    cfg, trainer, state, shape = images.load_run(run)
    model = trainer.model(state, ema=True)
    test = images.load_dataset(cfg, "test")
    x_true, labels = np.asarray(test.images[:num]), np.asarray(test.labels[:num])
    train = images.load_dataset(cfg, "train")
    clf = images._digits_classifier()[0]
    rows = []
    pool = []  # the evidence pool: drawn once (with the first evidence row's time), shared by every problem
    for problem in problems:
        kind = "superres" if problem.startswith("sr") else "inpaint"
        operator = conditioning.inverse_operator(kind, int(problem[2:]) if kind == "superres" else problem, shape)
        unknown = (1.0 - np.asarray(operator.mask)) if isinstance(operator, MaskOperator) else np.ones(shape[:2] + (1,))
        for name, acc in measurement_references(operator, train, x_true, labels).items():
            row = {"problem": problem, "method": name, "accuracy": acc, "num": int(len(x_true))}
            print(json.dumps(row), flush=True)
            rows.append(row)
        for method in METHODS[kind]:
            if methods and method not in methods:
                continue
            scale = dps_scale if method == "dps" else 1.0
            for inferred in (False, *infer):
                t0 = time.perf_counter()  # with the compilation: each configuration runs once
                if inferred == "evidence" and not pool:
                    pool.append(conditioning.draw_evidence_pool(cfg, model, shape,
                                                                evidence_samples or conditioning.EVIDENCE_SAMPLES))
                x, nfe = conditioning.solve_inverse(cfg, model, x_true, operator, method, key=jax.random.key(1),
                                                    steps=steps, resample=resample, scale=scale, infer_label=inferred,
                                                    evidence_pool=pool[0] if inferred == "evidence" else None)
                seconds = time.perf_counter() - t0
                err = np.abs(x - x_true) * unknown
                consistency = float(jnp.mean(jnp.abs(operator(jnp.asarray(x)) - operator(jnp.asarray(x_true)))))
                row = {"problem": problem, "method": method, "inferred_label": inferred,
                       "accuracy": float(guided_label_accuracy(clf, x, labels)),
                       "mae_unobserved": float(err.sum() / (unknown.sum() * len(x) * shape[-1])),
                       "consistency": consistency, "nfe": nfe, "seconds": round(seconds, 2),
                       "resample": resample if method == "repaint" else 1, "steps": steps, "num": int(len(x))}
                print(json.dumps(row), flush=True)
                rows.append(row)
    base = float(guided_label_accuracy(clf, x_true, labels))
    rows.append({"problem": "none (the held-out digits themselves)", "method": "-", "accuracy": base})
    return rows


def measurement_references(operator, train, x_true, labels, sigma: float = 0.2) -> dict:
    """How well the label can be read off the measurement ``y = A x`` at all, by classifiers of ``y`` itself (the
    reference for an inverse solver's label accuracy): the label of the training digit nearest in ``A x`` (1-NN),
    the most probable class of the training digits smoothed by ``N(0, sigma^2 I)`` observed through ``A``
    (the Bayes classifier of that density: ``argmax_k log mean_{i in k} N(y; A x_i, sigma^2 I) + log p(k)``,
    :func:`jaxgen.inverse.infer_labels_by_evidence` with the training digits as the samples), and an
    RBF support-vector machine trained on the training digits' measurements (a discriminative classifier, trained
    for this one operator -- not training-free), once with fixed ``C = 10`` and once with ``C`` and ``gamma`` chosen
    by 5-fold cross-validation on the training digits (0.928 / 0.930 / 0.905 / 0.905 of the held-out labels with the
    left / right / top / bottom half kept; with the top half kept no classifier we tried did better)."""
    import jax.numpy as jnp
    import numpy as np
    from sklearn.model_selection import GridSearchCV
    from sklearn.svm import SVC

    from jaxgen.inverse import infer_labels_by_evidence

    def measure(x):
        return np.asarray(operator(jnp.asarray(x, jnp.float32))).reshape(len(x), -1)

    a, b, ytr = measure(train.images), measure(x_true), np.asarray(train.labels)
    d2 = np.sum(b * b, 1)[:, None] - 2 * b @ a.T + np.sum(a * a, 1)[None]
    k = int(ytr.max()) + 1
    bayes = infer_labels_by_evidence(jnp.asarray(train.images, jnp.float32), jnp.asarray(ytr), operator,
                                     operator(jnp.asarray(x_true, jnp.float32)), num_classes=k, sigma=sigma,
                                     log_prior=jnp.log(jnp.bincount(jnp.asarray(ytr), length=k) / len(ytr)))
    svm = SVC(C=10.0, gamma="scale").fit(a, ytr)
    grid = {"C": [1.0, 3.0, 10.0, 30.0, 100.0], "gamma": ["scale", 0.3, 1.0, 3.0]}
    tuned = GridSearchCV(SVC(), grid, cv=5).fit(a, ytr)
    return {"reference: 1-NN on A x": float(np.mean(ytr[np.argmin(d2, axis=1)] == labels)),
            f"reference: Bayes classifier of the training digits * N(0, {sigma:g}^2) on A x":
                float(np.mean(np.asarray(bayes) == labels)),
            "reference: RBF SVM trained on A x": float(np.mean(svm.predict(b) == labels)),
            "reference: RBF SVM trained on A x, C and gamma by 5-fold CV": float(np.mean(tuned.predict(b) == labels))}


def inversion_table(run: str | None, num: int, solvers, step_counts, sigma: float) -> list[dict]:
    import functools

    import jax
    import jax.numpy as jnp
    from flax import nnx

    from experiments import images
    from jaxgen.data.images import load_digits
    from jaxgen.inverse import round_trip_error
    from jaxgen.paths import GaussianPath

    test = load_digits("test")
    x = jnp.asarray(test.images[:num])
    path = GaussianPath.from_name("linear")
    train = jnp.asarray(load_digits("train").images).reshape(-1, x[0].size)

    def oracle(z, t, **_):
        """The exact marginal velocity of the mixture of N(x_k, sigma^2 I) over the training digits x_k on the linear
        path, in closed form: per component E[x1 | x_t, k] = mu_k + a s^2 (x - a mu_k) / v and E[eps | x_t, k] =
        b (x - a mu_k) / v with v = a^2 s^2 + b^2, weighted by the responsibilities (finite at t = 0 and t = 1)."""
        flat = z.reshape(z.shape[0], -1)
        c = path.coefficients(t[:1])
        a, b, da, db = (v[0] for v in c)
        v = a * a * sigma * sigma + b * b
        d2 = jnp.sum(flat * flat, 1)[:, None] - 2 * a * flat @ train.T + a * a * jnp.sum(train * train, 1)[None]
        r = jax.nn.softmax(-d2 / (2 * v), axis=1)  # (B, K)
        mean_mu = r @ train
        x1 = mean_mu + a * sigma * sigma * (flat - a * mean_mu) / v
        eps = b * (flat - a * mean_mu) / v
        return (da * x1 + db * eps).reshape(z.shape)

    fields = [("oracle (training digits * N(0, %g^2))" % sigma, oracle, "linear", "velocity", {})]
    if run:
        cfg, trainer, state, _ = images.load_run(run)
        model = trainer.model(state, ema=True)
        model.eval()
        null = jnp.full((num,), cfg.num_classes, jnp.int32)
        fields.append((f"network ({cfg.name}, null class)", model, cfg.schedule, cfg.prediction, {"y": null}))
    rows = []
    for name, field, schedule, prediction, cond in fields:
        for solver in solvers:
            for steps in step_counts:
                def rt(f, z, c, solver=solver, steps=steps, schedule=schedule, prediction=prediction):
                    return round_trip_error(f, z, solver, steps, path=schedule, prediction=prediction, cond=c)

                t0 = time.perf_counter()
                if isinstance(field, nnx.Module):  # the network's parameters as arguments, not constants
                    err = float(jax.jit(rt)(field, x, cond))
                else:
                    err = float(jax.jit(functools.partial(rt, field))(x, cond))
                row = {"field": name, "solver": solver, "steps": steps, "round_trip_mae_per_pixel": err,
                       "seconds": round(time.perf_counter() - t0, 2), "num": int(num)}
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def markdown(inverse_rows, inversion_rows) -> str:
    lines = []
    if inverse_rows:
        lines += ["| problem | method | label accuracy | MAE unobserved | consistency |A x - y| | NFE | seconds |",
                  "|---|---|---|---|---|---|---|"]
        for r in inverse_rows:
            if r["method"] == "-" or r["method"].startswith("reference"):
                lines.append(f"| {r['problem']} | {r['method']} | {r['accuracy']:.3f} | | | | |")
                continue
            m = r["method"] + (f" (x{r['resample']})" if r["method"] == "repaint" else "") \
                + (f" + inferred label ({r['inferred_label']})" if r.get("inferred_label") else "")
            lines.append(f"| {r['problem']} | {m} | {r['accuracy']:.3f} | {r['mae_unobserved']:.3f} | "
                         f"{r['consistency']:.4f} | {r['nfe']} | {r['seconds']} |")
    if inversion_rows:
        steps = sorted({r["steps"] for r in inversion_rows})
        lines += ["", "| field | solver | " + " | ".join(f"{s} steps" for s in steps) + " |",
                  "|---|---|" + "---|" * len(steps)]
        keys = []
        for r in inversion_rows:
            if (r["field"], r["solver"]) not in keys:
                keys.append((r["field"], r["solver"]))
        for f, s in keys:
            vals = {r["steps"]: r["round_trip_mae_per_pixel"] for r in inversion_rows if (r["field"], r["solver"]) == (f, s)}
            lines.append(f"| {f} | {s} | " + " | ".join(f"{vals[k]:.2e}" if k in vals else "" for k in steps) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", default=None, help="a digits flow-matching run (jaxgen train digits_cfm --out RUN)")
    p.add_argument("--num", type=int, default=359, help="held-out digits (all 359 by default)")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--resample", type=int, default=5, help="RePaint's repeats per step")
    p.add_argument("--dps-scale", type=float, default=1.0)
    p.add_argument("--problems", default=",".join(PROBLEMS))
    p.add_argument("--methods", default="", help="comma-separated subset of projection,repaint,dps,pigdm")
    p.add_argument("--infer-label", nargs="?", const="denoising", default="", metavar="HOW[,HOW]",
                   help="also each method with the label inferred from the measurement: denoising (default; "
                        "jaxgen.inverse.infer_labels), evidence (jaxgen.inverse.infer_labels_by_evidence), or both")
    p.add_argument("--evidence-samples", type=int, default=None, metavar="N",
                   help="the evidence pool's samples per class (default: experiments.conditioning.EVIDENCE_SAMPLES)")
    p.add_argument("--inversion", action="store_true", help="also the inversion round-trip table")
    p.add_argument("--inversion-only", action="store_true")
    p.add_argument("--solvers", default="euler,heun,rk4,ddim")
    p.add_argument("--inversion-steps", default="10,25,50,100,200")
    p.add_argument("--sigma", type=float, default=0.5, help="the oracle's smoothing of the training digits")
    p.add_argument("--out", default=None, help="folder for results.json and results.md")
    a = p.parse_args(argv)
    inv = []
    if not a.inversion_only:
        if not a.run:
            p.error("--run is needed for the inverse problems (or pass --inversion-only)")
        inv = inverse_table(a.run, a.num, a.steps, a.resample, a.problems.split(","),
                            [m for m in a.methods.split(",") if m], a.dps_scale,
                            tuple(h for h in a.infer_label.split(",") if h), a.evidence_samples)
    rt = []
    if a.inversion or a.inversion_only:
        rt = inversion_table(a.run, a.num, a.solvers.split(","), [int(s) for s in a.inversion_steps.split(",")],
                             a.sigma)
    text = markdown(inv, rt)
    print(text)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "results.json"), "w") as fh:
            json.dump({"inverse": inv, "inversion": rt, "args": vars(a)}, fh, indent=2)
        with open(os.path.join(a.out, "results.md"), "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
