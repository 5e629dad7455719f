"""Conditioning beyond class labels in the image experiment: captions, ControlNet, and inverse problems at sampling.

:class:`experiments.images.ImageConfig`'s ``conditioning`` chooses what a run is conditioned on:

* ``"label"`` (default): the class label, guided by classifier-free guidance (the main job);
* ``"caption[:p_attribute=0.3,dim=64,depth=2,heads=4]"``: a caption of each training digit's own measured attributes
  (its label, stroke thickness from the ink mass, slant from image moments; :mod:`jaxgen.data.captions`), e.g.
  ``"seven, thick, slanted right"``, encoded by a token encoder trained from scratch and read by cross-attention
  (:class:`jaxgen.models.TextConditionedField`); each attribute is dropped from a training caption with probability
  ``p_attribute`` (so partial captions such as ``"seven"`` or ``"seven, slanted left"`` are in-distribution; the
  parts keep the order label, thickness, slant) and the whole
  caption with ``label_dropout`` (the null caption, for classifier-free guidance over the caption);
* ``"control[:kind=edges]"``: a ControlNet (:class:`jaxgen.models.ControlNet`) on the frozen label-conditioned run
  ``base_run``, trained to follow an edge map of the image (``kind=lowres``: its 4x4 average-pooled version,
  ``kind=mask``: the image with a random half hidden, and the mask).

``jaxgen sample`` reaches each of them (``--caption``, ``--control``), and solves inverse problems with any image run,
training-free (``--inpaint``, ``--superres``; :mod:`jaxgen.inverse`).
"""

from __future__ import annotations

import functools
import os

import numpy as np

from experiments import common

CONDITIONINGS = {
    "label": {},
    "caption": {"p_attribute": 0.3, "dim": 64, "depth": 2, "heads": 4},
    "control": {"kind": "edges"},
}
CONTROL_KINDS = ("edges", "lowres", "mask")
# the fields a ControlNet run takes from its base run (the frozen network and what it was trained on)
BASE_FIELDS = ("dataset", "schedule", "prediction", "objective", "network", "channels", "channel_mult",
               "num_res_blocks", "attention_resolutions", "num_heads", "dropout", "num_classes")


def options(cfg) -> tuple[str, dict]:
    """The conditioning's name and options (:data:`CONDITIONINGS`)."""
    from experiments.images import _spec

    return _spec(cfg.conditioning, CONDITIONINGS, "conditioning", "caption:p_attribute=0.3")


def guided_key(cfg) -> tuple[str, int]:
    """The conditioning input that classifier-free guidance drops, and its null value: the label ``y`` (null: the
    extra class ``num_classes``) or a caption's ``tokens`` (null: the all-padding caption)."""
    if options(cfg)[0] != "caption":
        return "y", cfg.num_classes
    from jaxgen.data.captions import PAD

    return "tokens", PAD


def check_config(cfg) -> None:
    """Clear errors for a conditioning that cannot run, before any work."""
    kind, opt = options(cfg)
    if kind != "control" and cfg.base_run:
        raise ValueError(f"base_run is the frozen base of conditioning=control; got base_run={cfg.base_run!r} with "
                         f"conditioning={cfg.conditioning!r} (remove base_run, or set conditioning=control).")
    if kind == "label":
        return
    from experiments.images import objective_options

    if objective_options(cfg)[0] != "flow_matching":
        raise ValueError(f"conditioning={kind} trains with objective=flow_matching (got objective={cfg.objective!r}).")
    if kind == "caption":
        if cfg.dataset != "digits":
            raise ValueError("conditioning=caption captions the digits by their measured attributes: set "
                             f"dataset=digits (got {cfg.dataset!r}); for other data, feed your own text encoder's "
                             "embeddings to TextConditionedField (see jaxgen.models.text).")
        if not 0 <= opt["p_attribute"] < 1 or min(opt["dim"], opt["depth"], opt["heads"]) < 1 \
                or opt["dim"] % opt["heads"]:
            raise ValueError(f"conditioning caption needs 0 <= p_attribute < 1 and positive dim, depth, heads with "
                             f"heads dividing dim; got {opt}.")
        return
    if opt["kind"] not in CONTROL_KINDS:
        raise ValueError(f"conditioning control: unknown kind {opt['kind']!r}; choose from {', '.join(CONTROL_KINDS)}.")
    if not cfg.base_run:
        raise ValueError("conditioning=control trains a ControlNet on a frozen base run: pass --set base_run=RUN_DIR "
                         "(a finished `jaxgen train digits_cfm` run).")
    base = base_config(cfg.base_run)
    if base.get("conditioning", "label") != "label" or base.get("objective", "flow_matching") != "flow_matching" \
            or base.get("network", "unet") != "unet":
        raise ValueError(f"the ControlNet's base run {cfg.base_run} must be a label-conditioned flow-matching U-Net run "
                         f"(conditioning=label, objective=flow_matching, network=unet); it has "
                         f"conditioning={base.get('conditioning')!r}, objective={base.get('objective')!r}, "
                         f"network={base.get('network')!r}.")
    differ = [k for k in BASE_FIELDS if k in base and _as_cfg_value(base[k]) != getattr(cfg, k)]
    if differ:
        raise ValueError(f"a ControlNet run takes its network from the base run {cfg.base_run}; these fields differ: "
                         + ", ".join(f"{k}={getattr(cfg, k)!r} (base: {base[k]!r})" for k in differ)
                         + ". Remove those overrides (jaxgen train digits_control copies them from the base run).")


def _as_cfg_value(v):
    return tuple(v) if isinstance(v, list) else v


def base_config(base_run: str) -> dict:
    """The config record of a ControlNet's base run (``FileNotFoundError`` naming the fix when there is none)."""
    run_dir = common.run_dir_of(base_run)
    if not os.path.exists(os.path.join(run_dir, "config.json")):
        raise FileNotFoundError(f"base_run {base_run}: no run there (config.json is missing); train it first, e.g. "
                                f"`jaxgen train digits_cfm --out {base_run}`.")
    record = common.read_config(run_dir)
    if record.get("experiment") != "images":
        raise ValueError(f"base_run {base_run} is a {record.get('experiment')} run; a ControlNet needs an image run.")
    return record


def with_base(cfg):
    """A ControlNet config with its network fields taken from its base run (other configs unchanged)."""
    import dataclasses

    kind, opt = options(cfg)
    if kind != "control" or not cfg.base_run or opt["kind"] not in CONTROL_KINDS:
        return cfg  # nothing to take (check_config explains a bad control)
    base = base_config(cfg.base_run)
    return dataclasses.replace(cfg, **{k: _as_cfg_value(base[k]) for k in BASE_FIELDS if k in base})


# -- networks --------------------------------------------------------------------------------------------------------

def caption_field(model, opt: dict, rngs):
    """The caption-conditioned field: a token encoder trained from scratch feeding ``model``'s cross-attention."""
    from jaxgen.data.captions import MAX_LEN, VOCAB
    from jaxgen.models import TextConditionedField, TokenEncoder

    encoder = TokenEncoder(len(VOCAB), opt["dim"], depth=opt["depth"], heads=opt["heads"], max_len=MAX_LEN,
                           rngs=rngs)
    return TextConditionedField(model, encoder)


def control_channels(kind: str) -> int:
    return 2 if kind == "mask" else 1


def build_controlled(cfg, image_shape, seed: int):
    """A ControlNet around the base run's network: the base's EMA weights (frozen in training) when the base run is
    there, and a trainable copy of its encoder."""
    import dataclasses

    from flax import nnx

    from experiments import images
    from jaxgen.models import ControlledField, ControlNet

    base_cfg = dataclasses.replace(cfg, conditioning="label", base_run="")
    base = images.build_model(base_cfg, image_shape, seed)
    if cfg.base_run and os.path.exists(os.path.join(common.run_dir_of(cfg.base_run), "checkpoints")):
        _, trainer, state, _ = images.load_run(cfg.base_run)
        nnx.update(base, nnx.state(trainer.model(state, ema=trainer.ema_decay is not None)))
    _, opt = options(cfg)
    return ControlledField(base, ControlNet(base, control_channels(opt["kind"]), rngs=nnx.Rngs(seed + 1)))


def objective(cfg, loss):
    """The trainer's objective: the loss, or for a ControlNet one update of the ControlNet's parameters only (the base
    stays frozen)."""
    if options(cfg)[0] != "control":
        return loss
    from jaxgen.models import ControlledField
    from jaxgen.training import Update

    return [Update(loss, params=ControlledField.trainable)]


# -- data ------------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=2)
def caption_data(dataset: str = "digits"):
    """The digits' attribute bins (fitted on the training digits) and every training digit's full caption tokens."""
    import jax.numpy as jnp

    from jaxgen.data.captions import AttributeBins, caption_tokens
    from jaxgen.data.images import load_digits

    train = load_digits("train")
    bins = AttributeBins.fit(train.images, train.labels)
    thickness, slant = bins.classify(jnp.asarray(train.images), jnp.asarray(train.labels))
    tokens = caption_tokens(jnp.asarray(train.labels), thickness, slant)
    return bins, np.asarray(tokens)


def control_of(kind: str, images, key=None):
    """The control input of images ``(B, H, W, C)`` in [-1, 1] (jit-able): their edge map, their 4x4 version, or the
    images with a random half hidden and the mask (:mod:`jaxgen.data.controls`)."""
    import jax
    import jax.numpy as jnp

    from jaxgen.data.controls import edge_map, low_resolution, masked_image
    from jaxgen.inverse import half_mask

    if kind == "edges":
        return edge_map(images)
    if kind == "lowres":
        return low_resolution(images, max(1, images.shape[1] // 4))
    halves = jnp.stack([half_mask(images.shape[1:3], side) for side in ("left", "right", "top", "bottom")])
    side = jax.random.randint(jax.random.key(0) if key is None else key, (images.shape[0],), 0, 4)
    return masked_image(images, halves[side])


def data_sampler(cfg, train_set):
    """``data(key) -> batch`` for the trainer: images and labels, plus the captions' tokens (with attributes dropped
    at random) or the ControlNet's control."""
    import jax
    import jax.numpy as jnp

    from jaxgen.data.images import device_sampler

    kind, opt = options(cfg)
    if kind == "label":
        return device_sampler(train_set, cfg.batch_size)
    if kind == "control":
        draw = device_sampler(train_set, cfg.batch_size)

        def with_control(key):
            k0, k1 = jax.random.split(key)
            batch = draw(k0)
            return {**batch, "control": control_of(opt["kind"], batch["x"], k1)}

        return with_control
    from jaxgen.data.captions import drop_caption_parts

    _, tokens = caption_data(cfg.dataset)
    images = jnp.asarray(train_set.images)
    tokens = jnp.asarray(tokens)
    n, p = images.shape[0], opt["p_attribute"]

    def with_captions(key):
        k0, k1 = jax.random.split(key)
        idx = jax.random.randint(k0, (cfg.batch_size,), 0, n)
        # the whole caption is dropped by the loss (label_dropout), attributes here
        return {"x": images[idx], "tokens": drop_caption_parts(k1, tokens[idx], p, 0.0)}

    return with_captions


def inputs_for_labels(cfg, labels, shape):
    """The guided input and the extra conditioning that generate ``labels``: the labels themselves, a caption run's
    one-word captions ("seven"), or with a ControlNet the labels and the controls of held-out digits of those labels."""
    import jax.numpy as jnp

    labels = np.asarray(labels)
    kind, opt = options(cfg)
    if kind == "caption":
        from jaxgen.data.captions import caption_tokens

        return np.asarray(caption_tokens(jnp.asarray(labels), None, None)), {}
    if kind == "control":
        test = _held_out(cfg)
        picks = _pick_by_label(test.labels, labels)
        return labels, {"control": np.asarray(control_of(opt["kind"], jnp.asarray(test.images[picks]),
                                                          _key(cfg.seed + 3)))}
    return labels, {}


def _key(seed: int):
    import jax

    return jax.random.key(seed)


def _held_out(cfg):
    from experiments.images import load_dataset

    return load_dataset(cfg, "test")


def _pick_by_label(pool_labels, labels) -> np.ndarray:
    """For each requested label, a different example of it from the pool (cycling through the pool's examples)."""
    pool_labels = np.asarray(pool_labels)
    out, seen = [], {}
    for y in np.asarray(labels):
        where = np.flatnonzero(pool_labels == y)
        if len(where) == 0:
            raise ValueError(f"no held-out example of label {y} to take a control from.")
        out.append(where[seen.get(int(y), 0) % len(where)])
        seen[int(y)] = seen.get(int(y), 0) + 1
    return np.asarray(out)


# -- evaluation ------------------------------------------------------------------------------------------------------

def evaluate(cfg, model, out: str, shape, report: dict) -> list[str]:
    """The conditioning's own evaluation, added to ``report``; returns the report's Markdown lines for it."""
    kind, _ = options(cfg)
    if kind == "caption":
        return _evaluate_captions(cfg, model, out, shape, report)
    if kind == "control":
        return _evaluate_control(cfg, model, out, shape, report)
    return []


def _evaluate_captions(cfg, model, out, shape, report) -> list[str]:
    """Do samples have the requested label, thickness and slant? Every caption of the 10 x 3 x 3 attribute grid,
    ``samples_per_class // 10`` samples each, from the full caption, from the label's word alone and from the null
    caption, measured by the digits classifier and the attribute bins of the training digits."""
    import jax

    from experiments import images
    from jaxgen.data.captions import caption_tokens
    from jaxgen.evaluation import attribute_agreement
    from jaxgen.data.captions import SLANT_PHRASES, THICKNESS_WORDS

    bins, _ = caption_data(cfg.dataset)
    k = max(1, cfg.samples_per_class // 10)
    labels = np.repeat(np.arange(10), 9 * k)
    thick = np.tile(np.repeat(np.arange(3), 3 * k), 10)
    slant = np.tile(np.repeat(np.arange(3), k), 30)
    full = np.asarray(caption_tokens(labels, thick, slant))
    asks = {"full caption": (full, cfg.eval_guidance),
            "label word only": (np.asarray(caption_tokens(labels)), cfg.eval_guidance),
            "null caption (unconditional)": (np.zeros_like(full), 1.0)}
    clf = images._digits_classifier()[0]
    rows, first = {}, None
    for name, (tokens, w) in asks.items():
        x, nfe = images.generate(model, cfg, tokens, w, jax.random.key(cfg.seed + 13), shape=shape)
        rows[name] = attribute_agreement(x, labels, thick, slant, bins=bins, classifier=clf)
        rows[name]["guidance"] = w
        first = x if first is None else first
    report["captions"] = {"samples_per_caption": k, "nfe": nfe, "rows": rows}
    if common.writes():
        pick = np.arange(0, len(labels), k)  # one sample of each caption: rows are digits, columns the 9 attributes
        common.save_grid(first[pick], os.path.join(out, "captions.png"), nrow=9, row_labels=list(range(10)),
                         title=f"columns: {' / '.join(THICKNESS_WORDS)}, each {' / '.join(SLANT_PHRASES)}")
    lines = ["", f"## Captions ({k} samples per caption, all 90 captions; requested label / thickness / slant)", "",
             "| conditioned on | w | label | thickness | slant | all three |", "|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['guidance']:g} | {r['label']:.3f} | {r['thickness']:.3f} | {r['slant']:.3f} | "
                     f"{r['all']:.3f} |")
    lines.append("\nChance is 0.1 for the label and 1/3 for each attribute (per-class tercile bins of the training "
                 "digits).")
    return lines


def _evaluate_control(cfg, model, out, shape, report) -> list[str]:
    """Do ControlNet samples follow their controls? Every held-out digit's control with its label: the ControlNet's
    samples against the base model's (the same noise and labels, no control), scored by the agreement of the
    samples with the controls (edges: correlation of edge maps; lowres: error of the samples' 4x4 version; mask:
    error on the kept half) and by the digits classifier."""
    import jax
    import jax.numpy as jnp

    from experiments import images
    from jaxgen.data.controls import edge_agreement, low_resolution
    from jaxgen.evaluation import guided_label_accuracy

    _, opt = options(cfg)
    kind = opt["kind"]
    test = _held_out(cfg)
    controls = control_of(kind, jnp.asarray(test.images), _key(cfg.seed + 3))
    key = jax.random.key(cfg.seed + 17)
    x_ctrl, nfe = images.generate(model, cfg, test.labels, cfg.eval_guidance, key, shape=shape,
                                  extra={"control": np.asarray(controls)})
    x_base, _ = images.generate(model, cfg, test.labels, cfg.eval_guidance, key, shape=shape)
    rng = np.random.default_rng(0)
    other = np.arange(len(test.labels))  # another held-out digit of the same class, for the real digits' reference
    for c in np.unique(test.labels):
        idx = np.flatnonzero(test.labels == c)
        other[idx] = rng.permutation(idx)

    def score(x, ctrl):
        x = jnp.asarray(x)
        if kind == "edges":
            return float(edge_agreement(x, ctrl))
        if kind == "lowres":
            return float(jnp.mean(jnp.abs(low_resolution(x, max(1, shape[0] // 4)) - ctrl)))
        mask = ctrl[..., -1:]
        return float(jnp.sum(jnp.abs(x * mask - ctrl[..., :-1])) / jnp.maximum(jnp.sum(mask) * x.shape[-1], 1.0))

    name = {"edges": "edge agreement (correlation, higher is better)",
            "lowres": "mean |4x4 of sample - control| (lower is better)",
            "mask": "mean |sample - kept pixels| (lower is better)"}[kind]
    clf = images._digits_classifier()[0]
    rows = {"ControlNet": (score(x_ctrl, controls), guided_label_accuracy(clf, x_ctrl, test.labels)),
            "base model (no control)": (score(x_base, controls), guided_label_accuracy(clf, x_base, test.labels)),
            "real digit of the same class": (score(test.images[other], controls), None),
            "the real digit itself": (score(test.images, controls), None)}
    report["control"] = {"kind": kind, "samples": int(len(test.labels)), "nfe": nfe, "score": name,
                         "rows": {k: {"score": v[0], "label_accuracy": None if v[1] is None else float(v[1])}
                                  for k, v in rows.items()}}
    if common.writes():
        k = min(12, len(test.labels))
        shown = np.asarray(controls[:k, ..., :1]) * (2.0 if kind != "lowres" else 1.0) - (1.0 if kind != "lowres" else 0.0)
        common.save_grid(np.concatenate([shown, x_ctrl[:k], x_base[:k], test.images[:k]]), os.path.join(out, "control.png"),
                         nrow=k, title=f"{kind} control / ControlNet / base model / held-out digit")
    lines = ["", f"## ControlNet ({kind} control, {len(test.labels)} held-out digits with their labels, w = "
             f"{cfg.eval_guidance:g})", "", f"| samples | {name} | label accuracy |", "|---|---|---|"]
    for k_, (sc, acc) in rows.items():
        lines.append(f"| {k_} | {sc:.3f} | {'-' if acc is None else f'{float(acc):.3f}'} |")
    return lines


# -- the sample command ----------------------------------------------------------------------------------------------

def is_inverse_problem(args) -> bool:
    return getattr(args, "inpaint", None) is not None or getattr(args, "superres", None) is not None


MASKS = ("left", "right", "top", "bottom", "centre")
METHODS = ("projection", "repaint", "dps", "pigdm")


def check_sample_args(args, record: dict) -> None:
    """Clear errors for ``jaxgen sample``'s conditioning and inverse-problem flags on the run of config ``record``,
    before any work."""
    for name in ("caption", "control", "inpaint", "superres", "method", "image", "evidence_samples"):  # built by hand
        if not hasattr(args, name):
            setattr(args, name, None)
    infer = getattr(args, "infer_label", None)
    args.infer_label = "denoising" if infer is True else (infer or None)  # namespaces built by hand may pass a bool
    if args.infer_label is not None and args.infer_label not in LABEL_INFERENCE:
        raise ValueError(f"--infer-label {args.infer_label}: unknown; choose {' or '.join(LABEL_INFERENCE)}.")
    modes = [f for f in ("caption", "control", "inpaint", "superres") if getattr(args, f, None) is not None]
    if len(modes) > 1:
        raise ValueError(f"pass one of --caption, --control, --inpaint, --superres at a time (got --{' --'.join(modes)}).")
    kind = str(record.get("conditioning", "label")).split(":")[0]
    if args.caption is not None:
        if kind != "caption":
            raise ValueError(f"--caption needs a caption run (jaxgen train digits_caption); this run is conditioned on "
                             f"{kind}.")
        from jaxgen.data.captions import encode

        encode(args.caption)  # unknown words: an error listing the vocabulary
    if args.control is not None:
        if kind != "control":
            raise ValueError(f"--control needs a ControlNet run (jaxgen train digits_control); this run is conditioned "
                             f"on {kind}.")
        if not args.control.startswith("test:") and not os.path.exists(args.control):
            raise FileNotFoundError(f"--control {args.control}: no such file (a PNG or .npy control, or test:N).")
    if args.evidence_samples is not None:
        if args.infer_label != "evidence":
            raise ValueError("--evidence-samples sizes the pool of --infer-label evidence; add --infer-label evidence, "
                             "or drop it.")
        if args.evidence_samples < 2:
            raise ValueError(f"--evidence-samples must be >= 2 samples per class (the kernel width is chosen leaving "
                             f"one out), got {args.evidence_samples}.")
    inverse = is_inverse_problem(args)
    if (args.method is not None or args.image is not None or args.infer_label) and not inverse:
        raise ValueError("--method, --image and --infer-label go with --inpaint or --superres.")
    if not inverse:
        return
    if kind != "label" or str(record.get("objective", "flow_matching")).split(":")[0] != "flow_matching":
        raise ValueError("--inpaint / --superres solve inverse problems with a label-conditioned (or unconditional) "
                         "flow-matching run such as digits_cfm's; this run has conditioning="
                         f"{record.get('conditioning')!r}, objective={record.get('objective')!r}.")
    if args.method is not None and args.method not in METHODS:
        raise ValueError(f"--method {args.method!r}: choose from {', '.join(METHODS)}.")
    if args.superres is not None:
        if args.superres < 2:
            raise ValueError(f"--superres FACTOR must be an integer >= 2, got {args.superres}.")
        if args.method in ("projection", "repaint"):
            raise ValueError(f"--method {args.method} replaces observed pixels (inpainting); super-resolution observes "
                             "averages of pixels: use --method pigdm or dps.")
    if args.inpaint is not None and args.inpaint not in MASKS and not os.path.exists(args.inpaint):
        raise ValueError(f"--inpaint {args.inpaint!r}: give the part to keep ({', '.join(MASKS)}) or a PNG/.npy mask "
                         "file (1 = observed).")
    if args.image is not None and not os.path.exists(args.image):
        raise FileNotFoundError(f"--image {args.image}: no such file (a PNG or .npy of images in [-1, 1]).")


def _read_images(path: str, shape, *, what: str, unit_range: bool) -> np.ndarray:
    """Images ``(N, H, W, C)`` from a ``.npy`` (taken as they are) or a PNG (grey levels; in [0, 1] when
    ``unit_range``, else mapped to [-1, 1]); a clear error for another size."""
    if path.endswith(".npy"):
        arr = np.load(path).astype(np.float32)
    else:
        import matplotlib.pyplot as plt

        arr = np.asarray(plt.imread(path), np.float32)
        if arr.ndim == 3:  # RGB(A) to grey
            arr = arr[..., :3].mean(-1)
        if arr.max() > 1.0:
            arr = arr / 255.0
        arr = arr if unit_range else arr * 2.0 - 1.0
    h, w, c = shape
    if arr.ndim == 2:
        arr = arr[None, :, :, None]
    elif arr.ndim == 3:
        arr = arr[None] if arr.shape == (h, w, arr.shape[-1]) and arr.shape[-1] in (1, 3) else arr[..., None]
    if arr.ndim != 4 or arr.shape[1:3] != (h, w):
        raise ValueError(f"{what} {path}: expected images of {h}x{w} pixels (an image, or an array (N, {h}, {w}[, C])), "
                         f"got shape {arr.shape}.")
    return arr


def cli_inputs(cfg, shape, args):
    """``jaxgen sample``'s ``--caption`` / ``--control``: ``(guided inputs, labels, extra conditioning, title)``."""
    import jax.numpy as jnp

    kind, opt = options(cfg)
    n = args.num
    if args.caption is not None:
        from jaxgen.data.captions import DIGIT_WORDS, encode

        tokens = np.tile(np.asarray(encode(args.caption))[None], (n, 1))
        words = args.caption.replace(",", " ").split()
        digit = next((DIGIT_WORDS.index(w) for w in words if w in DIGIT_WORDS), -1)
        return tokens, np.full((n,), digit), {}, f'"{args.caption}"'
    if args.control.startswith("test:"):
        test = _held_out(cfg)
        try:
            k = int(args.control[5:])
        except ValueError:
            raise ValueError(f"--control {args.control!r}: test:N takes a held-out digit's index N.") from None
        if not 0 <= k < len(test.labels):
            raise ValueError(f"--control test:{k}: the held-out set has {len(test.labels)} digits (0..{len(test.labels) - 1}).")
        control = np.asarray(control_of(opt["kind"], jnp.asarray(test.images[k:k + 1]), _key(args.seed)))
        label = int(test.labels[k]) if args.label is None else args.label[0]
    else:
        want = (shape[0], shape[1], control_channels(opt["kind"]))
        control = _read_images(args.control, want, what="--control", unit_range=opt["kind"] == "edges")
        if control.shape[-1] != want[-1]:
            raise ValueError(f"--control {args.control}: a {opt['kind']} control has {want[-1]} channel(s), got "
                             f"{control.shape[-1]}.")
        label = cfg.num_classes if args.label is None else args.label[0]  # no label: the null class
    if args.label is not None and not 0 <= args.label[0] < cfg.num_classes:
        raise ValueError(f"--label {args.label[0]} lies outside [0, {cfg.num_classes - 1}].")
    control = np.repeat(control[:1], n, axis=0)
    labels = np.full((n,), label)
    what = "no label" if label == cfg.num_classes else f"label {label}"
    return labels, labels, {"control": control}, f"{opt['kind']} control {args.control}, {what}"


# -- inverse problems ------------------------------------------------------------------------------------------------

def inverse_operator(problem: str, arg, shape):
    """The measurement of ``--inpaint MASK`` (``MaskOperator``; MASK the kept half, ``centre`` a kept centre box, or a
    mask file) or ``--superres FACTOR`` (``DownsampleOperator``)."""
    from jaxgen.inverse import DownsampleOperator, MaskOperator, box_mask, half_mask

    if problem == "superres":
        if shape[0] % arg or shape[1] % arg:
            raise ValueError(f"--superres {arg} must divide the image size {shape[0]}x{shape[1]}.")
        return DownsampleOperator(arg)
    if arg == "centre":
        return MaskOperator(1.0 - box_mask(shape[:2]))
    if arg in MASKS:
        return MaskOperator(half_mask(shape[:2], arg))
    mask = _read_images(arg, (shape[0], shape[1], 1), what="--inpaint mask", unit_range=True)[0, ..., :1]
    return MaskOperator((mask > 0.5).astype(np.float32))


def _operator_args(operator) -> tuple:
    """``(mask, factor)`` of a measurement, the static and traced arguments :func:`_traced_operator` rebuilds it from
    (factor 0 and the mask for inpainting; a scalar placeholder mask for super-resolution)."""
    import jax.numpy as jnp

    from jaxgen.inverse import MaskOperator

    if isinstance(operator, MaskOperator):
        return jnp.asarray(operator.mask, jnp.float32), 0
    return jnp.zeros(()), int(operator.factor)


def _traced_operator(mask, factor: int):
    """The measurement inside a compiled program: inpainting with the (traced) ``mask`` when ``factor`` is 0, else
    ``factor`` x super-resolution (the mask is then unused)."""
    from jaxgen.inverse import DownsampleOperator, MaskOperator

    return MaskOperator(mask) if factor == 0 else DownsampleOperator(factor)


@functools.lru_cache(maxsize=16)
def _compiled_inverse(schedule: str, prediction: str, factor: int, method: str, sampler: str, steps: int,
                      resample: int, scale: float):
    import jax

    from experiments.images import resolve_sampler
    from jaxgen.inverse import Inpaint, posterior_guided_field
    from jaxgen.paths import GaussianPath
    from jaxgen.samplers import sample

    path = GaussianPath.from_name(schedule)
    solver, t0 = resolve_sampler(sampler, prediction)
    if method in ("dps", "pigdm"):  # the guidance's coefficient grows like 1 / alpha_t: start where it is informative
        t0 = max(t0 or 0.0, GUIDED_T0)

    def solve(model, mask, images, labels, key):
        operator = _traced_operator(mask, factor)
        y = operator(images)
        k0, k1 = jax.random.split(key)
        x0 = path.sample_prior(k0, images.shape)
        cond = {"y": labels}
        if method in ("projection", "repaint"):
            res = sample(model, x0, Inpaint(operator.pinv(y), operator, solver, resample=resample), path=path,
                         prediction=prediction, steps=steps, t0=t0, key=k1, cond=cond)
        else:
            guided = posterior_guided_field(model, operator, y, path=path, prediction=prediction, method=method,
                                            scale=scale)
            res = sample(guided, x0, solver, path=path, prediction="velocity", steps=steps, t0=t0, key=k1, cond=cond)
        return res.x, res.nfe

    return jax.jit(solve)


DEFAULT_METHOD = {"inpaint": "repaint", "superres": "pigdm"}
LABEL_INFERENCE = ("denoising", "evidence")  # jaxgen.inverse.infer_labels / infer_labels_by_evidence
# the network's samples per class whose measurements estimate p(y | k) ("evidence"): with 1,000 instead of 200 the
# 6,000-step digits network infers the label of 0.905 / 0.936 / 0.900 / 0.914 / 0.958 of the held-out digits from the
# left / right / top / bottom half or the 4x4 averages (200: 0.905 / 0.925 / 0.886 / 0.886 / 0.933)
EVIDENCE_SAMPLES = 1000
# their kernel's width: chosen per operator by leave-one-out classification of the pool's own measurements
# (jaxgen.inverse.kernel_width_by_cross_validation; on the digits 0.18 for 4x4 averages, 0.43-0.47 for halves)
EVIDENCE_SIGMA = "auto"
GUIDED_T0 = 1e-2  # DPS / PiGDM start here (jaxgen.inverse.guidance: the correction carries no information at t ~ 0)


def solve_inverse(cfg, model, images, operator, method: str, *, key, sampler: str = "euler", steps: int = 100,
                  resample: int = 5, scale: float = 1.0, labels=None, infer_label: bool | str = False,
                  evidence_samples: int = EVIDENCE_SAMPLES, evidence_pool: tuple | None = None):
    """Complete ``images`` ``(N, H, W, C)`` observed through ``operator`` (a ``MaskOperator`` or a
    ``DownsampleOperator``; only ``A images`` enters) with the run's network, unconditionally (the null class) unless
    ``labels`` are given: ``(completions in [-1, 1], NFE)``. ``method``: projection (score_sde's replacement), repaint
    (``resample`` repeats per step), dps or pigdm (posterior-mean guidance). ``infer_label="denoising"``: complete
    unconditionally, infer each sample's class from how well the class-conditional network denoises the measurement
    (:func:`jaxgen.inverse.infer_labels`), and complete again conditioned on it (NFE: both passes and the
    ``num_classes x jaxgen.inverse.labels.DEFAULT_TIMES`` inference evaluations). ``infer_label="evidence"``: the
    class of largest Monte Carlo evidence ``p(y | k)`` over ``evidence_samples`` of the network's own samples per
    class (:func:`jaxgen.inverse.infer_labels_by_evidence`, kernel width :data:`EVIDENCE_SIGMA`: cross-validated on
    the pool for each operator), then one conditioned completion (NFE: the pool's sampler, one batched pass over all
    its samples, and the completion).
    The pool depends on the run and the image shape only: ``evidence_pool`` (from :func:`draw_evidence_pool`) reuses
    one across calls (several problems, or batches of one). ``True`` means ``"denoising"``."""
    from jaxgen.inverse import MaskOperator

    if method not in METHODS:
        raise ValueError(f"unknown inverse-problem method {method!r}; choose from {', '.join(METHODS)}.")
    inpaint = isinstance(operator, MaskOperator)
    if method in ("projection", "repaint") and not inpaint:
        raise ValueError(f"method {method} replaces observed pixels: it solves inpainting; use dps or pigdm.")
    if evidence_pool is not None and infer_label != "evidence":
        raise ValueError(f"evidence_pool serves infer_label='evidence' only (got infer_label={infer_label!r}); pass "
                         f"infer_label='evidence' with it, or drop it.")
    if infer_label:
        how = "denoising" if infer_label is True else infer_label
        if how not in LABEL_INFERENCE:
            raise ValueError(f"unknown label inference {how!r}; choose from {', '.join(LABEL_INFERENCE)}.")
        if labels is not None:
            raise ValueError("pass labels or infer_label, not both.")
        if how == "evidence":
            if evidence_pool is None:
                evidence_pool = draw_evidence_pool(cfg, model, tuple(np.shape(images)[1:]), evidence_samples)
            inferred, nfe_pool = _evidence_labels(cfg, images, operator, evidence_pool)
            x, nfe = solve_inverse(cfg, model, images, operator, method, key=key, sampler=sampler, steps=steps,
                                   resample=resample, scale=scale, labels=inferred)
            return x, nfe_pool + nfe
        first, nfe1 = solve_inverse(cfg, model, images, operator, method, key=key, sampler=sampler, steps=steps,
                                    resample=resample, scale=scale)
        inferred, nfe2 = _inferred_labels(cfg, model, first, operator, images)
        x, nfe3 = solve_inverse(cfg, model, images, operator, method, key=key, sampler=sampler, steps=steps,
                                resample=resample, scale=scale, labels=inferred)
        return x, nfe1 + nfe2 + nfe3
    import jax.numpy as jnp

    images = jnp.asarray(images, jnp.float32)
    labels = np.full((images.shape[0],), cfg.num_classes) if labels is None else np.asarray(labels)
    mask, factor = _operator_args(operator)
    run = _compiled_inverse(cfg.schedule, cfg.prediction, factor, method, sampler, int(steps),
                            int(resample if method == "repaint" else 1), float(scale))
    model.eval()
    x, nfe = run(model, mask, images, jnp.asarray(labels, jnp.int32), key)
    return np.clip(np.asarray(x), -1.0, 1.0), int(nfe)


def _inferred_labels(cfg, model, completion, operator, images):
    """The classes the run's network finds likeliest for the measurement (:func:`jaxgen.inverse.infer_labels`) and
    the network evaluations it took."""
    import jax
    import jax.numpy as jnp

    from jaxgen.inverse.labels import DEFAULT_TIMES

    mask, factor = _operator_args(operator)
    fn = _compiled_inference(cfg.schedule, cfg.prediction, cfg.num_classes, factor)
    labels = fn(model, mask, jnp.asarray(completion), jnp.asarray(images, jnp.float32), jax.random.key(cfg.seed + 29))
    return np.asarray(labels), cfg.num_classes * DEFAULT_TIMES


def draw_evidence_pool(cfg, model, shape: tuple, per_class: int = EVIDENCE_SAMPLES) -> tuple:
    """``per_class`` conditional samples (w = 1) of the run's network per class, drawn with the run's sampler in one
    batched pass: ``(samples (K * per_class, *shape), their labels, NFE)``, the pool whose measurements estimate
    ``p(y | k)`` for :func:`solve_inverse`'s ``infer_label="evidence"`` (any operator on images of ``shape``)."""
    import jax

    from experiments.images import generate

    if isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 2:
        raise ValueError(f"evidence_samples must be a number of samples per class >= 2 (the kernel width is chosen "
                         f"leaving one sample out), got {per_class!r}.")
    pool_labels = np.repeat(np.arange(cfg.num_classes), per_class)
    pool, nfe = generate(model, cfg, pool_labels, 1.0, jax.random.key(cfg.seed + 31), shape=tuple(shape))
    return np.asarray(pool), pool_labels, int(nfe)


def _evidence_labels(cfg, images, operator, pool: tuple):
    """The classes of largest Monte Carlo evidence for the measurement of ``images``
    (:func:`jaxgen.inverse.infer_labels_by_evidence`) over the samples of ``pool`` (:func:`draw_evidence_pool`), and
    the NFE of drawing them."""
    import jax.numpy as jnp

    from jaxgen.inverse import infer_labels_by_evidence

    samples, pool_labels, nfe = pool
    images = jnp.asarray(images, jnp.float32)
    if tuple(np.shape(samples)[1:]) != tuple(images.shape[1:]):
        raise ValueError(f"the evidence pool holds images of shape {tuple(np.shape(samples)[1:])}, the measured "
                         f"images are {tuple(images.shape[1:])}; draw the pool for this shape (draw_evidence_pool).")
    labels = infer_labels_by_evidence(jnp.asarray(samples), jnp.asarray(pool_labels), operator, operator(images),
                                      num_classes=cfg.num_classes, sigma=EVIDENCE_SIGMA)
    return np.asarray(labels), nfe


@functools.lru_cache(maxsize=4)
def _compiled_inference(schedule: str, prediction: str, num_classes: int, factor: int):
    import jax

    from jaxgen.inverse import infer_labels

    def run(model, mask, completion, images, key):
        operator = _traced_operator(mask, factor)
        return infer_labels(model, completion, operator, operator(images), path=schedule, prediction=prediction,
                            num_classes=num_classes, key=key)

    return jax.jit(run)


def inverse_command(cfg, model, shape, args) -> str:
    """``jaxgen sample --inpaint MASK`` / ``--superres FACTOR``: complete observed images (``--image``, or the first
    ``--num`` held-out digits, whose labels then score the completions with the digits classifier); writes a grid
    with the originals (when known), the observations and the completions."""
    import jax

    problem = "inpaint" if args.inpaint is not None else "superres"
    method = args.method or DEFAULT_METHOD[problem]
    operator = inverse_operator(problem, args.inpaint if problem == "inpaint" else args.superres, shape)
    if args.image is not None:
        images, truth = _read_images(args.image, shape, what="--image", unit_range=False), None
    else:
        test = _held_out(cfg)
        images, truth = test.images[:args.num], test.labels[:args.num]
    labels = None
    if args.label is not None:
        labels = np.resize(np.asarray(args.label), len(images))
    sampler = args.sampler or "euler"
    infer = getattr(args, "infer_label", None) or False
    if infer and labels is not None:
        raise ValueError("pass --label or --infer-label, not both.")
    x, nfe = solve_inverse(cfg, model, images, operator, method, key=jax.random.key(args.seed), sampler=sampler,
                           steps=args.steps or 100, labels=labels, infer_label=infer,
                           evidence_samples=getattr(args, "evidence_samples", None) or EVIDENCE_SAMPLES)
    shown = np.clip(np.asarray(operator.pinv(operator(jax.numpy.asarray(images)))), -1, 1)
    what = (f"{problem} {args.inpaint if problem == 'inpaint' else f'x{args.superres}'}, {method}"
            f"{f', label inferred ({infer})' if infer else ''}, {sampler}, NFE {nfe}")
    line = ""
    if truth is not None and cfg.dataset == "digits":
        from jaxgen.evaluation import guided_label_accuracy
        from experiments.images import _digits_classifier

        acc = float(guided_label_accuracy(_digits_classifier()[0], x, truth))
        line = f"; the digits classifier labels {acc:.1%} of the completions as the held-out digits' labels"
    rows = ([np.asarray(images)] if truth is not None else []) + [shown, x]
    k = min(len(images), 16)
    grid = np.concatenate([r[:k] for r in rows], axis=0)
    text = common.write_samples(grid, np.concatenate([np.asarray(truth if truth is not None else
                                                                  np.full(len(images), -1))[:k]] * len(rows)),
                                args.out, nrow=k, title=f"{what}: " + ("originals, " if truth is not None else "")
                                + "observed, completed", what=what)
    return text + line
