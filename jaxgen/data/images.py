"""Image datasets and input pipelines: host-side loaders and on-device samplers.

Conventions (shared by every loader here):

* Images are ``float32`` arrays of shape ``(N, H, W, C)`` (channels-last, as
  Flax convolutions expect), scaled to ``[-1, 1]``. 8-bit images map
  ``0 -> -1`` and ``255 -> 1`` through ``x / 127.5 - 1``
  (:func:`uint8_to_float`); scikit-learn's 4-bit digits map ``0 -> -1`` and
  ``16 -> 1`` through ``x / 8 - 1``. Both maps are exact in float32.
* Labels are ``int32`` arrays of shape ``(N,)`` with values in
  ``[0, num_classes)``.
* Batches are dicts ``{"x": images, "y": labels}``.

Two ways to feed a training loop:

* Small datasets (digits, MNIST, CIFAR-10 fit in accelerator memory) can live
  on device: :func:`device_sampler` returns a pure ``sample(key) -> batch``
  that draws a minibatch inside the compiled step, with zero host traffic::

      data = images.load_digits("train")
      trainer = Trainer(..., data=images.device_sampler(data, 256))

* Otherwise iterate host-side numpy batches with :class:`ImageLoader`
  (epoch-wise shuffling, per-host sharding, exact resume through
  ``state()``/``restore()``) and overlap host-to-device copies with compute
  through :func:`prefetch_to_device`::

      loader = images.ImageLoader(data, batch_size=128, seed=0)
      for batch in images.prefetch_to_device(loader, size=2, sharding=sharding):
          state, metrics = step(state, batch)

TFDS datasets are read without TensorFlow through ``tfds.data_source``, which
needs the dataset already prepared in ArrayRecord format in ``data_dir``;
nothing is ever downloaded here (see :func:`load_tfds`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import operator
from typing import Any, Callable, Iterable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "ImageDataset",
    "load_digits",
    "load_tfds",
    "ImageLoader",
    "prefetch_to_device",
    "device_sampler",
    "uint8_to_float",
    "float_to_uint8",
]

Batch = dict[str, Any]

_SPLITS = ("train", "test", "all")


# ---------------------------------------------------------------------------
# Dataset container and scaling
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class ImageDataset:
    """An in-memory labelled image dataset (host numpy arrays).

    It is also a random-access source: ``len(ds)`` is the number of examples
    and ``ds[i]`` (``i`` an int or an index array) is ``{"x": images[i],
    "y": labels[i]}``.

    Attributes:
      images: ``(N, H, W, C)`` float32 array in ``[-1, 1]``.
      labels: ``(N,)`` int32 array in ``[0, num_classes)``.
      num_classes: number of classes.
      name: dataset name, e.g. ``"digits"`` or ``"mnist"``.
    """

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    name: str = ""

    def __post_init__(self):
        if self.images.ndim != 4:
            raise ValueError(
                f"`images` must have shape (N, H, W, C), got {self.images.shape}."
            )
        if self.labels.shape != self.images.shape[:1]:
            raise ValueError(
                f"`labels` must have shape ({self.images.shape[0]},) to match "
                f"`images` of shape {self.images.shape}, got {self.labels.shape}."
            )
        if not np.issubdtype(self.images.dtype, np.floating):
            raise ValueError(
                f"`images` must be floating point in [-1, 1], got dtype {self.images.dtype}; "
                "convert uint8 images with jaxgen.data.images.uint8_to_float."
            )
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, (int, np.integer)) \
                or self.num_classes < 1:
            raise ValueError(f"`num_classes` must be a positive integer, got {self.num_classes!r}.")
        if self.labels.size and (self.labels.dtype.kind not in "iu" or self.labels.min() < 0
                                 or self.labels.max() >= self.num_classes):
            raise ValueError(
                f"`labels` must be integers in [0, {self.num_classes}) (num_classes={self.num_classes}), got "
                f"dtype {self.labels.dtype} with values in [{self.labels.min()}, {self.labels.max()}]."
            )
        # Checked once, here, where the data is loaded: NaN/inf images would only show up later as a NaN loss.
        finite = np.isfinite(self.images.reshape(self.images.shape[0], -1)).all(axis=1)
        if not finite.all():
            bad = np.flatnonzero(~finite)
            raise ValueError(
                f"dataset {self.name or '(unnamed)'}: {bad.size} of {finite.size} images hold NaN or inf "
                f"(first at index {bad[0]}); clean or drop them before training."
            )

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape ``(H, W, C)`` of one image."""
        return tuple(self.images.shape[1:])

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index) -> Batch:
        return {"x": self.images[index], "y": self.labels[index]}

    def __repr__(self) -> str:
        return (
            f"ImageDataset(name={self.name!r}, num_examples={len(self)}, "
            f"shape={self.shape}, num_classes={self.num_classes})"
        )


def uint8_to_float(images: np.ndarray) -> np.ndarray:
    """Maps 8-bit images to float32 in ``[-1, 1]``: ``x / 127.5 - 1`` (exact)."""
    return np.asarray(images, dtype=np.float32) / np.float32(127.5) - np.float32(1.0)


def float_to_uint8(images: Any) -> np.ndarray:
    """Inverse of :func:`uint8_to_float`: clips to ``[-1, 1]`` and rounds to uint8.

    Useful to save or display generated samples.
    """
    x = np.clip(np.asarray(images, dtype=np.float32), -1.0, 1.0)
    return np.round((x + 1.0) * 127.5).astype(np.uint8)


# ---------------------------------------------------------------------------
# scikit-learn digits
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn import datasets  # Imported lazily: scikit-learn is slow to import.

    d = datasets.load_digits()
    images = np.asarray(d.images, dtype=np.float32)  # (1797, 8, 8), values 0..16
    labels = np.asarray(d.target, dtype=np.int32)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _stratified_split(
    labels: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class random split; returns sorted (train_idx, test_idx)."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(test_fraction * idx.size))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def load_digits(
    split: str = "train", *, test_fraction: float = 0.2, seed: int = 0
) -> ImageDataset:
    """scikit-learn's handwritten digits: 1,797 real 8x8 grayscale images, 10 classes.

    The data ships inside scikit-learn (UCI optdigits test set), so this
    needs no download. Pixel values ``0..16`` are scaled to ``[-1, 1]`` as
    ``x / 8 - 1`` (so ``0 -> -1``, ``8 -> 0``, ``16 -> 1``, exactly).

    The train/test split is **stratified** and deterministic: within each
    class, the examples are permuted with ``np.random.default_rng(seed)``
    (classes visited in increasing order) and the first
    ``round(test_fraction * class_size)`` go to the test split. Each split
    keeps the original dataset order; the defaults give 1,438 train and 359
    test images. ``"all"`` returns every image (``test_fraction`` and
    ``seed`` are then unused).

    Args:
      split: ``"train"``, ``"test"`` or ``"all"``.
      test_fraction: fraction of each class held out for ``"test"``, in
        ``(0, 1)``.
      seed: seed of the split (non-negative int).

    Returns:
      An :class:`ImageDataset` with images of shape ``(N, 8, 8, 1)``.

    Raises:
      ValueError: unknown ``split`` or ``test_fraction`` outside ``(0, 1)``.
    """
    if split not in _SPLITS:
        raise ValueError(f"Unknown split {split!r} for digits; expected one of {_SPLITS}.")
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"`test_fraction` must be in (0, 1), got {test_fraction}.")
    images, labels = _raw_digits()
    if split == "all":
        idx = np.arange(labels.size)
    else:
        train_idx, test_idx = _stratified_split(labels, test_fraction, operator.index(seed))
        idx = train_idx if split == "train" else test_idx
    x = images[idx, :, :, None] / np.float32(8.0) - np.float32(1.0)
    return ImageDataset(
        images=x.astype(np.float32), labels=labels[idx].copy(), num_classes=10, name="digits"
    )


# ---------------------------------------------------------------------------
# TFDS (TensorFlow-free)
# ---------------------------------------------------------------------------


def _read_all(source: Any, chunk: int = 4096) -> list[Any]:
    """Reads every record of a TFDS data source, batched where supported."""
    n = len(source)
    getitems = getattr(source, "__getitems__", None)
    if getitems is not None and n:
        try:
            out = list(getitems(list(range(min(chunk, n)))))
        except Exception:  # e.g. mocked sources do not support batched reads: read one record at a time
            out = None
        if out is not None:
            for start in range(len(out), n, chunk):
                out.extend(getitems(list(range(start, min(start + chunk, n)))))
            return out
    return [source[i] for i in range(n)]


def load_tfds(name: str, split: str = "train", *, data_dir: str | None = None) -> ImageDataset:
    """Loads a TFDS image-classification split into memory, without TensorFlow.

    Works for ``"mnist"``, ``"fashion_mnist"``, ``"cifar10"``, ``"cifar100"``
    and any TFDS dataset with a fixed-shape ``'image'`` feature and a
    ``'label'`` ``ClassLabel`` feature. Reading goes through
    ``tfds.data_source`` (random-access ArrayRecord files), which needs no
    TensorFlow but does need the dataset **already prepared locally in
    ArrayRecord format**; this function never downloads. Prepare it once on a
    machine with internet access, e.g.::

        tfds.data_source("mnist", split="train", data_dir=...)  # download=True
        # or
        tfds.builder("mnist", data_dir=..., file_format="array_record").download_and_prepare()

    and copy ``data_dir`` over. uint8 images become float32 in ``[-1, 1]``
    (:func:`uint8_to_float`), labels int32. Under
    ``tfds.testing.mock_data(...)`` random examples with the right specs are
    returned instead.

    Args:
      name: TFDS name, optionally with config/version (``"mnist:3.0.1"``).
      split: TFDS split string; slicing works, e.g. ``"train[:10%]"``.
      data_dir: TFDS data directory (default: ``$TFDS_DATA_DIR`` or
        ``~/tensorflow_datasets``).

    Returns:
      An :class:`ImageDataset` (e.g. ``(60000, 28, 28, 1)`` for MNIST train,
      ``(50000, 32, 32, 3)`` for CIFAR-10 train).

    Raises:
      FileNotFoundError: the dataset is not prepared in ``data_dir``.
      ValueError: unknown dataset, or one without fixed-shape ``'image'`` and
        ``ClassLabel`` ``'label'`` features.
      TypeError: ``split`` is not a string.
    """
    import tensorflow_datasets as tfds  # Lazy: ~0.5 s, and only needed here.

    if not isinstance(split, str):
        raise TypeError(f"`split` must be a string such as 'train', got {split!r}.")
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(
            f"Unknown TFDS dataset {name!r} ({str(e).splitlines()[0]}). See "
            "https://www.tensorflow.org/datasets/catalog for the available names."
        ) from None
    features = builder.info.features
    image_feature = features["image"] if "image" in features else None
    label_feature = features["label"] if "label" in features else None
    if not isinstance(image_feature, tfds.features.Image) or not isinstance(
        label_feature, tfds.features.ClassLabel
    ):
        raise ValueError(
            f"TFDS dataset {name!r} is not an image-classification dataset with an "
            f"'image' Image feature and a 'label' ClassLabel feature; its features "
            f"are {features}."
        )
    image_shape = tuple(image_feature.shape)
    if any(d is None for d in image_shape):
        raise ValueError(
            f"TFDS dataset {name!r} has variable-size images {image_shape}; only "
            "fixed-size images can be stacked into an ImageDataset."
        )
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:
        if not builder.is_prepared():
            raise FileNotFoundError(
                f"TFDS dataset {name!r} is not available locally (looked in "
                f"{builder.data_dir}) and jaxgen never downloads at run time. Download "
                f"and prepare it first, in ArrayRecord format, on a machine with "
                f"internet access, e.g.\n"
                f"    tfds.builder({name!r}, data_dir=..., "
                f"file_format='array_record').download_and_prepare()\n"
                f"then pass that `data_dir` (or set $TFDS_DATA_DIR)."
            ) from e
        raise

    records = _read_all(source)
    if records:
        images = np.stack([np.asarray(r["image"]) for r in records])
        labels = np.asarray([r["label"] for r in records])
    else:
        images = np.zeros((0, *image_shape), np.uint8)
        labels = np.zeros((0,), np.int32)
    if images.ndim == 3:  # Defensive: (N, H, W) grayscale.
        images = images[..., None]
    return ImageDataset(
        images=uint8_to_float(images),
        labels=labels.astype(np.int32),
        num_classes=int(label_feature.num_classes),
        name=builder.name,
    )


# ---------------------------------------------------------------------------
# Host-side loader
# ---------------------------------------------------------------------------


def _as_batch(items: list[Any]) -> Batch:
    """Stacks records of a generic source into ``{"x": ..., "y": ...}``."""
    first = items[0]
    if isinstance(first, Mapping):
        for kx, ky in (("x", "y"), ("image", "label")):
            if kx in first:
                batch = {"x": np.stack([np.asarray(r[kx]) for r in items])}
                if ky in first:
                    batch["y"] = np.asarray([r[ky] for r in items])
                return batch
        raise ValueError(
            "Records of a dict source must have an 'x' (and 'y') or an 'image' "
            f"(and 'label') key, got keys {sorted(first)}."
        )
    if isinstance(first, tuple) and len(first) == 2:
        return {
            "x": np.stack([np.asarray(r[0]) for r in items]),
            "y": np.asarray([r[1] for r in items]),
        }
    return {"x": np.stack([np.asarray(r) for r in items])}


def _non_negative_int(value: Any, what: str) -> int:
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"`{what}` must be an int, got {type(value).__name__}.") from None
    if value < 0:
        raise ValueError(f"`{what}` must be non-negative, got {value}.")
    return value


class ImageLoader:
    """Shuffling, batching, per-host sharded iterator of numpy batches.

    Each epoch ``e`` draws a permutation of all ``N`` examples from
    ``np.random.default_rng([seed, e])`` (identity if ``shuffle=False``), the
    same on every host; host ``process_index`` reads the contiguous chunk
    ``perm[p * n : (p + 1) * n]`` with ``n = N // process_count``, so hosts
    read disjoint slices that together cover the epoch. All hosts get the same
    number of examples (hence of batches) to stay in lock-step; the
    ``N % process_count`` examples at the end of the permutation are skipped
    for that epoch (different ones each epoch when shuffling). Each host then
    yields batches of ``batch_size`` examples in order; the global batch is
    ``batch_size * process_count``. With ``drop_remainder=True`` a last
    incomplete batch is dropped, otherwise it is yielded short.

    The loader is its own iterator and runs for ``num_epochs`` epochs
    (forever if None). Its position is ``state() = {"epoch", "position"}``
    (``position`` = batches already yielded in that epoch), plain ints to
    store in a checkpoint; ``restore(state)`` resumes the exact same batch
    sequence. Batches are pure functions of ``(seed, epoch, position)``.

    Note that :func:`prefetch_to_device` reads ahead: while prefetching
    ``size`` batches, ``state()`` is up to ``size`` batches ahead of the
    batch being consumed. For an exact resume, checkpoint the state recorded
    when the consumed batch was produced, e.g. by wrapping the loader in a
    generator yielding ``(loader.state(), next(loader))`` pairs.

    Args:
      source: an :class:`ImageDataset`, a numpy array, or any random-access
        source with ``__len__``/``__getitem__`` (e.g. a ``tfds.data_source``)
        whose records are dicts with ``'x'``/``'y'`` or ``'image'``/``'label'``
        keys, ``(x, y)`` tuples, or arrays (then batches have only ``"x"``).
        Other record keys are dropped. Sources with ``__getitems__`` are read
        one batch per call.
      batch_size: examples per batch **per host**.
      shuffle: reshuffle every epoch.
      seed: shuffling seed (non-negative int); must be equal on all hosts.
      drop_remainder: drop the last incomplete batch of each epoch.
      num_epochs: number of epochs to iterate, or None for no end.
      process_index: this host's index (default ``jax.process_index()``).
      process_count: number of hosts (default ``jax.process_count()``).
      transform: optional host-side ``fn(batch) -> batch`` applied to each
        batch (e.g. :func:`uint8_to_float` on raw TFDS images).

    Raises:
      ValueError: empty per-host shard, ``batch_size`` not positive or larger
        than the per-host shard with ``drop_remainder=True``, bad
        ``process_index``/``process_count``.
    """

    def __init__(
        self,
        source: Any,
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_remainder: bool = True,
        num_epochs: int | None = None,
        process_index: int | None = None,
        process_count: int | None = None,
        transform: Callable[[Batch], Batch] | None = None,
    ):
        if not (hasattr(source, "__len__") and hasattr(source, "__getitem__")):
            raise TypeError(
                "`source` must support len() and indexing (an ImageDataset, a numpy "
                f"array or a random-access data source), got {type(source).__name__}."
            )
        self.source = source
        self.batch_size = _non_negative_int(batch_size, "batch_size")
        if self.batch_size == 0:
            raise ValueError("`batch_size` must be positive, got 0.")
        self.shuffle = bool(shuffle)
        self.seed = _non_negative_int(seed, "seed")
        self.drop_remainder = bool(drop_remainder)
        self.num_epochs = None if num_epochs is None else _non_negative_int(num_epochs, "num_epochs")
        self.process_count = _non_negative_int(
            jax.process_count() if process_count is None else process_count, "process_count"
        )
        self.process_index = _non_negative_int(
            jax.process_index() if process_index is None else process_index, "process_index"
        )
        if not self.process_index < self.process_count:
            raise ValueError(
                f"`process_index` must be in [0, process_count={self.process_count}), "
                f"got {self.process_index}."
            )
        self.transform = transform

        self.num_examples_total = len(source)
        self.num_examples = self.num_examples_total // self.process_count
        if self.num_examples == 0:
            raise ValueError(
                f"The source has {self.num_examples_total} examples, too few to give "
                f"every one of {self.process_count} hosts at least one."
            )
        if self.drop_remainder and self.batch_size > self.num_examples:
            raise ValueError(
                f"`batch_size`={self.batch_size} is larger than the {self.num_examples} "
                f"examples per host (dataset of {self.num_examples_total} over "
                f"{self.process_count} host(s)), so drop_remainder=True would yield no "
                "batch. Use a smaller batch_size or drop_remainder=False."
            )
        if self.drop_remainder:
            self.steps_per_epoch = self.num_examples // self.batch_size
        else:
            self.steps_per_epoch = -(-self.num_examples // self.batch_size)

        self._epoch = 0
        self._position = 0
        self._cache: tuple[int, np.ndarray] | None = None
        self._use_getitems = hasattr(source, "__getitems__")

    # -- indices -------------------------------------------------------------

    def indices(self, epoch: int) -> np.ndarray:
        """This host's example indices for ``epoch``, in the order they are read."""
        epoch = _non_negative_int(epoch, "epoch")
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        n = self.num_examples_total
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(n)
        else:
            order = np.arange(n)
        start = self.process_index * self.num_examples
        idx = order[start : start + self.num_examples]
        self._cache = (epoch, idx)
        return idx

    def _gather(self, idx: np.ndarray) -> Batch:
        src = self.source
        if isinstance(src, ImageDataset):
            return src[idx]
        if isinstance(src, np.ndarray):
            return {"x": src[idx]}
        keys = [int(i) for i in idx]
        items = None
        if self._use_getitems:
            try:
                items = list(src.__getitems__(keys))
            except Exception:  # e.g. mocked TFDS sources: read one record at a time.
                self._use_getitems = False
        if items is None:
            items = [src[i] for i in keys]
        return _as_batch(items)

    # -- iteration -------------------------------------------------------------

    def __len__(self) -> int:
        """Batches per epoch on this host."""
        return self.steps_per_epoch

    def __iter__(self) -> "ImageLoader":
        return self

    def __next__(self) -> Batch:
        if self._position >= self.steps_per_epoch:
            self._epoch += 1
            self._position = 0
        if self.num_epochs is not None and self._epoch >= self.num_epochs:
            raise StopIteration
        idx = self.indices(self._epoch)
        start = self._position * self.batch_size
        batch = self._gather(idx[start : start + self.batch_size])
        self._position += 1
        if self.transform is not None:
            batch = self.transform(batch)
        return batch

    @property
    def epoch(self) -> int:
        """Epoch of the next batch."""
        return self.state()["epoch"]

    def state(self) -> dict[str, int]:
        """``{"epoch": e, "position": b}``: the next batch is batch ``b`` of epoch ``e``."""
        if self._position >= self.steps_per_epoch:
            return {"epoch": self._epoch + 1, "position": 0}
        return {"epoch": self._epoch, "position": self._position}

    def restore(self, state: Mapping[str, Any]) -> "ImageLoader":
        """Resumes from a :meth:`state`; returns ``self``.

        The loader must be built with the same source, ``batch_size``,
        ``seed``, ``shuffle``, ``drop_remainder`` and host layout as the one
        that produced ``state`` for the sequence to be identical.
        """
        try:
            epoch, position = state["epoch"], state["position"]
        except (KeyError, TypeError):
            raise ValueError(
                f"`state` must be a mapping with 'epoch' and 'position', got {state!r}."
            ) from None
        epoch = _non_negative_int(int(np.asarray(epoch)), "epoch")
        position = _non_negative_int(int(np.asarray(position)), "position")
        if position > self.steps_per_epoch:
            raise ValueError(
                f"`position`={position} exceeds the {self.steps_per_epoch} batches per "
                "epoch of this loader; was the state saved with a different batch_size "
                "or dataset?"
            )
        self._epoch, self._position = epoch, position
        return self

    def __repr__(self) -> str:
        return (
            f"ImageLoader(num_examples={self.num_examples}/{self.num_examples_total}, "
            f"batch_size={self.batch_size}, steps_per_epoch={self.steps_per_epoch}, "
            f"process={self.process_index}/{self.process_count}, state={self.state()})"
        )


# ---------------------------------------------------------------------------
# Device transfer
# ---------------------------------------------------------------------------


def prefetch_to_device(
    iterator: Iterable[Any], size: int = 2, sharding: Any = None
) -> Iterator[Any]:
    """Yields the batches of ``iterator`` on device, ``size`` transfers ahead.

    Thread-free: ``jax.device_put`` is asynchronous, so copying the next
    batches overlaps with the step running on the current one. The number of
    batches held on device is at most ``size + 1`` (the one in use).

    Args:
      iterator: iterable of pytrees of host arrays (e.g. an
        :class:`ImageLoader`).
      size: number of batches transferred ahead (``>= 1``).
      sharding: where to put each leaf: None (default device), a
        ``jax.Device``, or a ``jax.sharding.Sharding`` such as
        ``NamedSharding(mesh, P("data"))`` (batch axis split across devices).
        With several processes and a ``Sharding``, each host's batch is its
        local part of the global batch and the global array is built with
        ``jax.make_array_from_process_local_data``.

    Yields:
      The same pytrees with ``jax.Array`` leaves.
    """
    size = operator.index(size)
    if size < 1:
        raise ValueError(f"`size` must be at least 1, got {size}.")
    iterator = iter(iterator)
    if isinstance(sharding, jax.sharding.Sharding) and jax.process_count() > 1:

        def put(batch):
            return jax.tree.map(
                lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), batch
            )

    else:

        def put(batch):
            return jax.device_put(batch, sharding)

    queue: collections.deque = collections.deque()

    def enqueue(n: int) -> None:
        for batch in itertools.islice(iterator, n):
            queue.append(put(batch))

    enqueue(size)
    while queue:
        batch = queue.popleft()
        enqueue(1)
        yield batch


def device_sampler(
    dataset: ImageDataset,
    batch_size: int,
    *,
    replace: bool = True,
    with_labels: bool = True,
    sharding: Any = None,
) -> Callable[[jax.Array], Batch]:
    """Keeps a (small) dataset on device; returns a pure ``sample(key) -> batch``.

    ``sample(key)`` draws ``batch_size`` indices with ``jax.random`` and
    returns ``{"x": (B, H, W, C) float32, "y": (B,) int32}`` (the labels
    serve as conditioning ``y`` for class-conditional fields). It is a pure
    function of the key, meant to run inside a compiled step, e.g.
    ``jaxgen.training.Trainer(..., data=device_sampler(ds, 256))``; the data
    arrays are captured by the closure (passed to XLA as buffers, not
    embedded as constants), so there is no host traffic per step. Memory:
    ``N * H * W * C * 4`` bytes (digits 0.5 MB, MNIST 188 MB, CIFAR-10 614 MB).

    Args:
      dataset: an :class:`ImageDataset` (or anything with ``images`` and
        ``labels`` arrays).
      batch_size: ``B``, static.
      replace: if True (default), indices are i.i.d. uniform
        (``jax.random.randint``, cheap); if False, distinct within a batch
        (``jax.random.choice(..., replace=False)``, O(N) per draw).
      with_labels: if False, batches are ``{"x": ...}`` only. jaxgen losses
        pass every batch key but ``"x"`` to the field as conditioning
        (``field(x, t, y=...)``), so use False for unconditional fields.
      sharding: optional ``jax.Device`` or ``Sharding`` for the stored arrays
        (e.g. replicated ``NamedSharding(mesh, P())``).

    Raises:
      ValueError: empty dataset, non-positive ``batch_size``, or
        ``batch_size`` larger than the dataset with ``replace=False``.
    """
    try:
        images, labels = dataset.images, dataset.labels
    except AttributeError:
        raise TypeError(
            "`dataset` must have `images` and `labels` arrays (an ImageDataset), got "
            f"{type(dataset).__name__}."
        ) from None
    batch_size = _non_negative_int(batch_size, "batch_size")
    n = int(np.shape(images)[0])
    if n == 0:
        raise ValueError("`dataset` is empty.")
    if batch_size == 0:
        raise ValueError("`batch_size` must be positive, got 0.")
    if not replace and batch_size > n:
        raise ValueError(
            f"`batch_size`={batch_size} is larger than the dataset ({n} examples); "
            "sampling without replacement is impossible. Use replace=True or a "
            "smaller batch_size."
        )
    images = jax.device_put(np.asarray(images, dtype=np.float32), sharding)
    labels = jax.device_put(np.asarray(labels, dtype=np.int32), sharding)

    def sample(key: jax.Array) -> Batch:
        if replace:
            idx = jax.random.randint(key, (batch_size,), 0, n)
        else:
            idx = jax.random.choice(key, n, (batch_size,), replace=False)
        batch = {"x": jnp.take(images, idx, axis=0)}
        if with_labels:
            batch["y"] = jnp.take(labels, idx, axis=0)
        return batch

    return sample
