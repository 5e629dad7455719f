"""Every family of generative models on the same data, in one table (lecture 1's "four frameworks compared").

``jaxgen train compare_families`` trains each family of :attr:`CompareConfig.families` on each dataset of
:attr:`CompareConfig.datasets` through :mod:`experiments.generative` (one run directory per pair under
``out/<data>/<family>``, each resumable: run the command again after a kill and finished pairs are only re-read), then
writes ``comparison.md`` (a Markdown table per dataset), ``comparison.json`` (every report) and
``samples_<data>.png`` (the families' samples side by side).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, ClassVar

import numpy as np

from experiments import common


@dataclasses.dataclass
class CompareConfig:
    """Families x datasets (:mod:`experiments.compare`); each pair runs the ``generative`` experiment."""

    experiment: ClassVar[str] = "compare"
    name: str = "compare_families"
    # flow matching's U-Net at 16 base channels (the recipe's default is 32): 59 instead of 126 ms a step on 2 CPU cores,
    # which keeps the whole comparison within 20 minutes there (2,000 steps: classifier FD 7.7, confidence 0.95)
    families: tuple[str, ...] = ("flow_matching:channels=16", "vae", "beta_vae", "hvae", "vqvae", "latent_fm", "realnvp",
                                 "glow", "ffjord", "gan", "wgan", "wgan_gp", "sngan", "ebm", "ncsn", "ssm")
    datasets: tuple[str, ...] = ("8gaussians", "digits")
    steps_2d: int = 2000
    steps_digits: int = 2000
    batch_size: int = 128
    learning_rate: float = 1e-3
    seed: int = 0
    num_samples: int = 1000
    likelihood_samples: int = 256


FREE_FIELDS = frozenset({"families", "datasets", "num_samples", "likelihood_samples"})


def check_config(cfg: CompareConfig) -> None:
    from experiments.generative import check_config as check_one

    if not cfg.families or not cfg.datasets:
        raise ValueError("families and datasets must each name at least one entry (e.g. --set families=vae,gan).")
    for data in cfg.datasets:
        for family in cfg.families:
            check_one(_run_config(cfg, family, data))


def _run_config(cfg: CompareConfig, family: str, data: str):
    from experiments.generative import GenerativeConfig

    return GenerativeConfig(name=f"{data}_{family.split(':')[0]}", family=family, data=data,
                            steps=cfg.steps_digits if data == "digits" else cfg.steps_2d, batch_size=cfg.batch_size,
                            learning_rate=cfg.learning_rate, seed=cfg.seed, num_samples=cfg.num_samples,
                            likelihood_samples=cfg.likelihood_samples, checkpoint_every=max(cfg.steps_2d,
                                                                                             cfg.steps_digits))


def train(cfg: CompareConfig, out: str, *, progress: bool = True) -> dict:
    from experiments import generative

    check_config(cfg)
    out = os.path.abspath(out)
    common.check_resume(out, cfg, FREE_FIELDS)
    common.write_config(out, cfg)
    reports: dict[str, dict[str, Any]] = {}
    for data in cfg.datasets:
        reports[data] = {}
        for family in cfg.families:
            run_cfg = _run_config(cfg, family, data)
            run_out = os.path.join(out, data, family.split(":")[0])
            done = os.path.join(run_out, "report.json")
            if os.path.exists(done):
                with open(done) as fh:
                    previous = json.load(fh)
                if previous.get("step") == run_cfg.steps and previous.get("family") == family:
                    reports[data][family] = previous  # finished before (a resumed comparison)
                    continue
            if progress and common.writes():
                print(f"[compare] {family} on {data} ({run_cfg.steps} steps)", flush=True)
            reports[data][family] = generative.train(run_cfg, run_out, progress=progress)
    if common.writes():
        common.write_json(os.path.join(out, "comparison.json"), reports)
        with open(os.path.join(out, "comparison.md"), "w") as fh:
            fh.write(markdown(reports))
        for data in cfg.datasets:
            _figure(out, data, list(cfg.families), reports[data])
        with open(os.path.join(out, "report.md"), "w") as fh:
            fh.write(markdown(reports))
    return reports


def _get(d: dict, *keys, default=None):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def _fmt(v, digits=3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


def markdown(reports: dict[str, dict[str, dict]]) -> str:
    """The comparison tables: one per dataset, one row per family."""
    lines = ["# Generative model families compared", ""]
    for data, rows in reports.items():
        lines += [f"## {data}", ""]
        if data == "digits":
            head = ["family", "NLL bits/dim", "classifier FD", "class TV from uniform", "confidence",
                    "classifier IS", "precision", "recall", "density", "coverage", "NFE", "samples/s", "train s"]
        else:
            head = ["family", "NLL nats", "sliced W2", "energy dist.", "precision", "recall", "density", "coverage",
                    "modes (hq)", "NFE", "samples/s", "train s"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        floor = None
        for family, r in rows.items():
            q = r.get("quality", {})
            nll = _get(r, "nll", "bits_per_dim") if data == "digits" else _get(r, "nll", "nats_per_point")
            common_tail = [_fmt(r.get("nfe")), _fmt(r.get("samples_per_second"), 0), _fmt(_get(r, "train", "seconds"), 0)]
            if data == "digits":
                row = [family, _fmt(nll), _fmt(q.get("frechet_distance"), 2), _fmt(q.get("class_tv_from_uniform")),
                       _fmt(q.get("mean_confidence")), _fmt(q.get("classifier_score"), 2), _fmt(q.get("precision")),
                       _fmt(q.get("recall")), _fmt(q.get("density")), _fmt(q.get("coverage"))] + common_tail
                floor = floor or q.get("frechet_distance_floor")
            else:
                modes = _get(q, "modes")
                mtxt = (f"{modes['modes_covered']:.0f}/8 ({modes['high_quality']:.2f})" if modes else "-")
                row = [family, _fmt(nll), _fmt(q.get("sliced_w2")), _fmt(q.get("energy_distance")),
                       _fmt(q.get("precision")), _fmt(q.get("recall")), _fmt(q.get("density")),
                       _fmt(q.get("coverage")), mtxt] + common_tail
                floor = floor or q.get("floor_two_target_sets")
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        if data != "digits" and floor:
            lines.append(f"Floor (two independent target sets): sliced W2 {_fmt(floor.get('sliced_w2'))}, precision "
                         f"{_fmt(floor.get('precision'))}, recall {_fmt(floor.get('recall'))}.")
        if data == "digits" and floor:
            lines.append(f"Fréchet distance floor (classifier features, train vs test digits): {_fmt(floor, 2)}.")
        any_row = next(iter(rows.values()), {})
        lines += ["", f"Extractor: {_get(any_row, 'quality', 'extractor', default='-')}; "
                      f"{_get(any_row, 'num_samples', default='-')} samples per family; NLL on "
                      f"{_get(any_row, 'nll', 'num_points', default='-')} held-out points "
                      "(each family's kind of likelihood is in comparison.json). Sampler per family:", ""]
        lines += [f"- {family}: {r.get('sampler', '-')}; NLL: {_get(r, 'nll', 'kind', default='none')}"
                  for family, r in rows.items()]
        lines.append("")
    return "\n".join(lines)


def _figure(out: str, data: str, families: list[str], rows: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(families)
    cols = min(n, 4 if data == "digits" else 6)
    nrows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(3.0 * cols, 3.1 * nrows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, family in zip(axes.ravel(), families):
        path = os.path.join(out, data, family.split(":")[0], "samples.npy")
        if not os.path.exists(path):
            continue
        x = np.load(path)
        if data == "digits":
            tiles = (np.clip(x[:36], -1, 1) + 1) / 2
            h, w = tiles.shape[1:3]
            tiles = np.pad(tiles.reshape(-1, h, w), ((0, 36 - min(len(tiles), 36)), (0, 1), (0, 1)),
                           constant_values=1.0)  # a white line between the digits (they fill their 8 x 8 frames)
            grid = tiles.reshape(6, 6, h + 1, w + 1).transpose(0, 2, 1, 3).reshape(6 * (h + 1), 6 * (w + 1))
            ax.imshow(grid, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        else:
            ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.5)
            ax.set_aspect("equal")
            ax.axis("on")
            ax.set_xticks([])
            ax.set_yticks([])
        ax.set_title(f"{family.split(':')[0]} (NFE {rows.get(family, {}).get('nfe', '-')})", fontsize=9)
    fig.suptitle(f"samples on {data}", fontsize=11)
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"samples_{data}.png"), dpi=100)
    plt.close(fig)


def sample_command(run_dir: str, args) -> str:
    raise ValueError("a comparison run holds one run per family: pass one of them, e.g. --checkpoint "
                     f"{os.path.join(run_dir, 'digits', 'vae')}.")


def evaluate_command(run_dir: str, args) -> str:
    path = os.path.join(common.run_dir_of(run_dir), "comparison.md")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist yet: run `jaxgen train` on this comparison first.")
    with open(path) as fh:
        return fh.read()
