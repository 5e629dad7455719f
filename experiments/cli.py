"""The ``jaxgen`` command line: ``train``, ``sample``, ``evaluate``, ``distill`` and ``list``.

Examples::

    jaxgen list
    jaxgen train digits_cfm --out runs/digits                      # resumes if runs/digits has checkpoints
    jaxgen train digits_cfm --out runs/quick --set steps=500 --set channels=16
    jaxgen sample --checkpoint runs/digits --label 3 --guidance 2 --sampler heun --steps 20 --out grid.png
    jaxgen evaluate --checkpoint runs/digits
    jaxgen distill --teacher runs/digits --out runs/digits_cd       # a one-step consistency model of it
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxgen", description="Generative models as vector fields, in JAX.")
    sub = p.add_subparsers(dest="command", required=True)

    sub.add_parser("list", help="list the named experiments and their settings")

    t = sub.add_parser("train", help="train a named experiment (resumes from the latest checkpoint in --out)")
    t.add_argument("experiment", help="experiment name (see `jaxgen list`)")
    t.add_argument("--out", default=None, help="run directory (default: runs/<experiment>)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                   help="override a config field, e.g. --set steps=1000 (repeatable)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")

    s = sub.add_parser("sample", help="sample a trained run with classifier-free guidance")
    s.add_argument("--checkpoint", required=True, help="run directory of `jaxgen train` (or its checkpoints/)")
    s.add_argument("--label", type=int, action="append", default=None,
                   help="class label(s) to generate (repeatable; default: every class)")
    s.add_argument("--guidance", type=float, default=None, help="guidance scale w in (1-w) u(x|null) + w u(x|y)")
    s.add_argument("--sampler", default=None, help="euler | midpoint | heun | tsit5 | dopri5 | euler_maruyama")
    s.add_argument("--steps", type=int, default=None, help="sampler steps")
    s.add_argument("--num", type=int, default=16, help="images per label")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    s.add_argument("--out", default="samples.png", help="output PNG grid (raw arrays go next to it as .npy)")

    e = sub.add_parser("evaluate", help="evaluate a trained run (guided accuracy, Fréchet distance, sweep)")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--step", type=int, default=None)
    e.add_argument("--out", default=None, help="folder for the report (default: the run directory)")

    d = sub.add_parser("distill", help="consistency-distil a trained run into a one/few-step sampler "
                                       "(resumes from the latest checkpoint in --out)")
    d.add_argument("config", nargs="?", default="consistency", help="distillation config (default: consistency)")
    d.add_argument("--teacher", required=True, help="run directory of `jaxgen train` to distil")
    d.add_argument("--out", default=None, help="run directory (default: <teacher>_cd)")
    d.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                   help="override a config field, e.g. --set steps=500 or --set sample_ts='0|0,0.5' (repeatable)")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from experiments import configs

    if args.command == "list":
        for name, cfg in configs.CONFIGS.items():
            d = dataclasses.asdict(cfg)
            print(f"{name:20s} dataset={d['dataset']} steps={d['steps']} batch={d['batch_size']} "
                  f"channels={d['channels']} mult={d['channel_mult']} sampler={d['sampler']}-{d['sample_steps']}")
        for name, cfg in configs.DISTILL_CONFIGS.items():
            print(f"{name:20s} (jaxgen distill --teacher RUN {name}) steps={cfg.steps} batch={cfg.batch_size} "
                  f"N={cfg.num_scales} solver={cfg.solver} parameterization={cfg.parameterization}")
        return 0

    if args.command == "distill":
        from experiments import distill

        try:
            cfg = configs.get_distill_config(args.config, args.overrides)
        except ValueError as err:
            print(f"jaxgen distill: {err}", file=sys.stderr)
            return 2
        out = args.out or args.teacher.rstrip("/") + "_cd"
        report = distill.distill(cfg, args.teacher, out, progress=not args.no_progress)
        print(open(os.path.join(out, "report.md")).read())
        print(f"[jaxgen] distilled in {report.get('train_seconds_this_session', 0):.0f} s this session; outputs in "
              f"{os.path.abspath(out)}: samples_<NFE>step.png, loss.png, report.md/.json, samples.npy + labels.npy "
              "(one step), checkpoints/")
        return 0

    from experiments import images

    if args.command == "train":
        try:
            cfg = configs.get_config(args.experiment, args.overrides)
        except ValueError as err:
            print(f"jaxgen train: {err}", file=sys.stderr)
            return 2
        out = args.out or os.path.join("runs", args.experiment)
        report = images.train(cfg, out, progress=not args.no_progress)
        md = os.path.join(out, "report.md")
        print(open(md).read() if os.path.exists(md) else json.dumps(report, indent=2))
        print(f"[jaxgen] trained in {report.get('train_seconds_this_session', 0):.0f} s this session; outputs in "
              f"{os.path.abspath(out)}: samples_per_class.png, guidance_sweep.png, loss.png, report.md/.json, "
              f"samples.npy + labels.npy (w = {cfg.eval_guidance:g}), checkpoints/")
        return 0

    import jax
    import numpy as np

    cfg, trainer, state, shape = images.load_run(args.checkpoint, step=args.step)
    model = trainer.model(state, ema=trainer.ema_decay is not None)
    if args.command == "sample":
        labels = args.label if args.label is not None else list(range(cfg.num_classes))
        bad = [l for l in labels if not 0 <= l < cfg.num_classes]
        if bad:
            print(f"jaxgen sample: labels {bad} outside [0, {cfg.num_classes - 1}]", file=sys.stderr)
            return 2
        lab = np.repeat(np.asarray(labels), args.num)
        w = cfg.eval_guidance if args.guidance is None else args.guidance
        imgs, nfe = images.generate(model, cfg, lab, w, jax.random.key(args.seed), sampler=args.sampler,
                                    steps=args.steps, shape=shape)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        images.save_grid(imgs, args.out, nrow=min(args.num, 16),
                         title=f"labels {labels}, w = {w:g}, {args.sampler or cfg.sampler} (NFE {nfe})")
        stem = os.path.splitext(args.out)[0]
        np.save(stem + "_samples.npy", imgs)
        np.save(stem + "_labels.npy", lab.astype(np.int32))
        print(f"[jaxgen] wrote {args.out} ({len(lab)} images, NFE {nfe}) and {stem}_samples.npy")
        return 0

    out = args.out or os.path.abspath(args.checkpoint)
    os.makedirs(out, exist_ok=True)
    report = images.finalize(cfg, out, trainer, state, shape)
    with open(os.path.join(out, "report.json"), "w") as fh:
        json.dump(report, fh, indent=2)
    print(open(os.path.join(out, "report.md")).read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
