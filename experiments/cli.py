"""The ``jaxgen`` command line: ``list``, ``train``, ``sample`` and ``evaluate`` for every experiment.

Examples::

    jaxgen list
    jaxgen train digits_cfm --out runs/digits                      # resumes if runs/digits has checkpoints
    jaxgen train digits_cfm --out runs/quick --set steps=500 --set channels=16
    jaxgen train my_config.py --set sampler=dpm_solver_pp:order=3  # a config file defining get_config()
    jaxgen train toy2d_8gaussians_to_moons --out runs/toy2d         # the 2-D experiment
    jaxgen train digits_cd --set teacher=runs/digits --out runs/digits_cd   # a one-step consistency model of it
    jaxgen sample --checkpoint runs/digits --label 3 --guidance 2 --sampler dpm_solver_pp --steps 8 --out grid.png
    jaxgen evaluate --checkpoint runs/digits --sampler unipc --steps 10

``python -m experiments ...`` is the same command. Errors are printed in one line (``--debug``: with the traceback).
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys

EXPERIMENTS = ("images", "toy2d", "distill", "differentiable", "generative", "compare")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxgen", description="Generative models as vector fields, in JAX.")
    p.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("list", help="list the named experiment configs and the samplers")

    t = sub.add_parser("train", help="train an experiment (resumes from the latest checkpoint in --out)")
    t.add_argument("config", help="a named config (see `jaxgen list`) or a Python file defining get_config()")
    t.add_argument("--out", default=None, help="run directory (default: runs/<config name>)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                   help="override a config field, e.g. --set steps=1000 (repeatable)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors")

    for name, text in (("sample", "sample a trained run with any sampler"),
                       ("evaluate", "evaluate a trained run (report; with any sampler)")):
        s = sub.add_parser(name, help=text)
        s.add_argument("--checkpoint", required=True, help="run directory of `jaxgen train` (or its checkpoints/)")
        s.add_argument("--sampler", default=None,
                       help="a sampler by name, with options as name:key=value,... (e.g. dpm_solver_pp:order=3); "
                            "default: the run's. `jaxgen list` shows them")
        s.add_argument("--steps", type=int, default=None, help="sampler steps (default: the run's)")
        s.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
        s.add_argument("--out", default=None, help="output: a PNG for sample, a folder for evaluate (default: the "
                                                    "run directory)")
        s.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors")
        if name == "sample":
            s.add_argument("--label", type=int, action="append", default=None,
                           help="class label(s) to generate (repeatable; default: every class)")
            s.add_argument("--guidance", type=float, default=None, help="guidance scale w in (1-w) u(x|null) + w u(x|y)")
            s.add_argument("--num", type=int, default=16, help="samples per label (2-D runs: samples)")
            s.add_argument("--seed", type=int, default=0)
            g = s.add_argument_group("conditioning and inverse problems (image runs)")
            g.add_argument("--caption", default=None, metavar="TEXT",
                           help='a caption run: generate for this caption, e.g. "seven, thick, slanted right"')
            g.add_argument("--control", default=None, metavar="FILE",
                           help="a ControlNet run: the control (edge map, low-resolution or masked image) as a PNG or "
                                ".npy of the image size, or test:N for the control of held-out digit N")
            g.add_argument("--inpaint", default=None, metavar="MASK",
                           help="complete the unobserved part of --image (default: held-out digits): MASK is left, "
                                "right, top, bottom or centre (the part that is KEPT), or a PNG/.npy mask (1 = kept)")
            g.add_argument("--superres", type=int, default=None, metavar="FACTOR",
                           help="super-resolve --image (default: held-out digits) downsampled by FACTOR (e.g. 2)")
            g.add_argument("--method", default=None,
                           help="how to solve --inpaint / --superres: projection, repaint, dps or pigdm (default: "
                                "repaint for --inpaint, pigdm for --superres)")
            g.add_argument("--infer-label", nargs="?", const="denoising", default=None, metavar="HOW",
                           help="with --inpaint / --superres on a class-conditional run: infer each image's class from "
                                "the measurement with the network itself, then complete conditioned on it. HOW: "
                                "denoising (default; the class whose denoiser best reproduces the measurement) or "
                                "evidence (the class whose own samples best explain it)")
            g.add_argument("--evidence-samples", type=int, default=None, metavar="N",
                           help="with --infer-label evidence: the network's samples per class whose measurements "
                                "estimate each class's evidence (default 1000; more: a sharper estimate, drawn once "
                                "per call, about 4 minutes for the digits' 10 classes on 2 CPU cores)")
            g.add_argument("--image", default=None, metavar="FILE",
                           help="the observed images for --inpaint / --superres: a PNG or .npy in [-1, 1] "
                                "(default: the first held-out digits, whose labels score the completions)")
    return p


def _module(experiment: str):
    if experiment not in EXPERIMENTS:
        raise ValueError(f"unknown experiment {experiment!r} in the run's config.json; known: {', '.join(EXPERIMENTS)}.")
    return importlib.import_module(f"experiments.{experiment}")


def _list() -> None:
    from experiments import configs
    from jaxgen.samplers import SOLVERS

    for name in configs.names():
        cfg = configs.load(name)
        d = {k: getattr(cfg, k) for k in ("family", "data", "steps", "batch_size", "sampler", "schedule", "teacher", "source",
                                          "target")
             if hasattr(cfg, k)}
        print(f"{name:32s} [{cfg.experiment}] " + " ".join(f"{k}={v}" for k, v in d.items()))
    print("\nsamplers (--sampler NAME[:key=value,...]): " + ", ".join(sorted(SOLVERS)))


def _compilation_cache() -> None:
    """Keep compiled XLA programs between runs (JAX's persistent compilation cache) in ``$JAXGEN_CACHE/xla`` (default
    ``~/.cache/jaxgen/xla``): a resumed or repeated run skips most compilation. A cache the user configured for JAX
    (``JAX_COMPILATION_CACHE_DIR``) is left as it is; ``JAXGEN_COMPILATION_CACHE=0`` turns it off."""
    import jax

    if os.environ.get("JAXGEN_COMPILATION_CACHE", "1") == "0" or os.environ.get("JAX_COMPILATION_CACHE_DIR") \
            or jax.config.jax_compilation_cache_dir:
        return
    root = os.environ.get("JAXGEN_CACHE") or os.path.join("~", ".cache", "jaxgen")
    path = os.path.join(os.path.expanduser(root), "xla")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:  # a read-only home: compile every time, as without the cache
        return
    jax.config.update("jax_compilation_cache_dir", path)


def _run(args) -> int:
    from experiments import common, configs

    if args.command == "list":
        _list()
        return 0
    from jaxgen.training import initialize

    initialize()  # one process of several (from the environment): join them before any device is touched
    _compilation_cache()
    if args.command == "train":
        cfg = configs.get_config(args.config, args.overrides)
        out = args.out or os.path.join("runs", cfg.name)
        module = _module(cfg.experiment)
        module.train(cfg, out, progress=not args.no_progress)
        if not common.writes():  # process 0 of several reports
            return 0
        report = os.path.join(out, "report.md")
        if os.path.exists(report):
            with open(report) as fh:
                print(fh.read())
        print(f"[jaxgen] {cfg.name}: outputs in {os.path.abspath(out)}")
        return 0
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be a positive integer, got {args.steps}.")
    if getattr(args, "num", 1) < 1:
        raise ValueError(f"--num must be a positive integer, got {args.num}.")
    if getattr(args, "guidance", None) is not None and not math.isfinite(args.guidance):
        raise ValueError(f"--guidance must be a finite number, got {args.guidance}.")
    if args.sampler:
        common.check_sampler(args.sampler)
    run_dir = common.run_dir_of(args.checkpoint)
    experiment = common.read_config(run_dir)["experiment"]
    used = [f"--{k}" for k in ("caption", "control", "inpaint", "superres", "method", "image")
            if getattr(args, k, None) is not None]
    if used and experiment != "images":
        raise ValueError(f"{', '.join(used)} work on image runs (jaxgen train digits_cfm, digits_caption, ...); "
                         f"{run_dir} is a {experiment} run.")
    module = _module(experiment)
    command = module.sample_command if args.command == "sample" else module.evaluate_command
    text = command(run_dir, args)
    if common.writes():
        print(text)
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except Exception as err:  # noqa: BLE001 - one line for the user; the traceback with --debug
        if args.debug:
            raise
        kind = "" if isinstance(err, (ValueError, FileNotFoundError)) else f"{type(err).__name__}: "
        print(f"jaxgen {args.command}: error: {kind}{err} (--debug shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
