r"""Weights of the FID Inception network: read pytorch-fid's ``.pth`` without PyTorch, convert to ``.npz``, load.

The weights are pytorch-fid's port of TensorFlow's ``inception-2015-12-05`` graph,
``pt_inception-2015-12-05-6726825d.pth`` (95 MB), published at :data:`FID_WEIGHTS_URL`. jaxgen never downloads
anything at run time: fetch the file once, then pass its path (or that of the ``.npz`` made by
:func:`convert_inception_weights`) to :func:`load_inception`, or set the environment variable
``JAXGEN_INCEPTION_WEIGHTS``::

    curl -LO https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
    python -m jaxgen.evaluation.inception_weights pt_inception-2015-12-05-6726825d.pth fid_inception.npz

:func:`read_torch_state_dict` reads both of ``torch.save``'s formats, the zip archive (``<name>/data.pkl`` and one file
per storage, ``<name>/data/<key>``; PyTorch >= 1.6) and the legacy stream (magic number, protocol, system info, the
pickle, the storage keys, then each storage's raw bytes). Pickles are loaded by a restricted unpickler that builds
only ``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2`` and ``torch.*Storage`` (as NumPy arrays) and
refuses every other global, so a weights file cannot run code.

Key mapping (:func:`torch_key`), for every parameter of :class:`~jaxgen.evaluation.inception.FIDInceptionV3` (module
names follow the PyTorch state dict): ``<m>.conv.weight`` (OIHW) -> ``<m>/conv/kernel`` (HWIO);
``<m>.bn.weight / bias / running_mean / running_var`` -> ``<m>/bn/scale / bias / mean / var`` (batch-norm statistics are
kept, not folded); ``fc.weight`` ``(out, in)`` -> ``fc/kernel`` ``(in, out)``; ``fc.bias`` -> ``fc/bias``;
``*.num_batches_tracked`` is ignored.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import io
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import jax.numpy as jnp
from flax import nnx

from jaxgen.evaluation.inception import FIDInceptionV3

__all__ = ["FID_WEIGHTS_URL", "WEIGHTS_ENV", "read_torch_state_dict", "convert_state_dict", "convert_inception_weights",
           "load_inception_arrays", "load_inception", "torch_key", "expected_torch_shapes"]

#: Where pytorch-fid publishes the FID Inception weights (downloaded by the user, never by jaxgen).
FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
#: Environment variable holding the path of the weights (``.pth`` or ``.npz``).
WEIGHTS_ENV = "JAXGEN_INCEPTION_WEIGHTS"

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_STORAGE_DTYPES = {"FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
                   "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
                   "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool"}


# ---------------------------------------------------------------------------
# Reading torch.save files without torch
# ---------------------------------------------------------------------------


class _StorageType:
    """Stands for ``torch.<Name>Storage`` in the pickle: just its NumPy dtype."""

    def __init__(self, name: str):
        self.name = name
        kind = _STORAGE_DTYPES[name]
        if kind == "bfloat16":
            import ml_dtypes

            self.dtype = np.dtype(ml_dtypes.bfloat16)
        else:
            self.dtype = np.dtype(kind)


class _Storage:
    """A storage whose bytes are read after the pickle (``data`` is filled in then); ``offset``/``numel`` in elements
    describe a view of a root storage (legacy format)."""

    def __init__(self, dtype: np.dtype, numel: int, root: _Storage | None = None, offset: int = 0):
        self.dtype, self.numel, self.root, self.offset = dtype, int(numel), root, int(offset)
        self.data: np.ndarray | None = None

    def array(self) -> np.ndarray:
        if self.root is not None:
            return self.root.array()[self.offset: self.offset + self.numel]
        if self.data is None:
            raise ValueError("corrupt weights file: a tensor refers to a storage whose data is missing.")
        return self.data


class _Tensor:
    """A tensor to be materialised once its storage is read: ``storage[offset + sum_i idx_i stride_i]``."""

    def __init__(self, storage, offset, size, stride):
        if not isinstance(storage, _Storage):
            raise ValueError("corrupt weights file: a tensor without a storage.")
        self.storage, self.offset, self.size, self.stride = storage, int(offset), tuple(size), tuple(stride)

    def numpy(self) -> np.ndarray:
        data = self.storage.array()
        if len(self.size) != len(self.stride) or any(s < 0 for s in self.size + self.stride) or self.offset < 0:
            raise ValueError(f"corrupt weights file: tensor of size {self.size} with strides {self.stride}.")
        if 0 in self.size:
            return np.zeros(self.size, data.dtype)
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride))
        if last >= data.shape[0]:
            raise ValueError(f"corrupt weights file: a tensor of size {self.size} reads past its storage "
                             f"({data.shape[0]} elements).")
        view = np.lib.stride_tricks.as_strided(data[self.offset:], shape=self.size,
                                               strides=[s * data.itemsize for s in self.stride], writeable=False)
        return np.array(view)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    return _Tensor(storage, storage_offset, size, stride)


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds only a state dict's objects: ``OrderedDict``, ``_rebuild_tensor_v2`` and ``torch.*Storage``."""

    def __init__(self, file, persistent_load=None):
        super().__init__(file)
        self._persistent = persistent_load

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor_v2
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a weights file: only the tensors of a "
                                     "state dict (OrderedDict, _rebuild_tensor_v2, torch.*Storage) are read.")

    def persistent_load(self, pid):
        if self._persistent is None:
            raise pickle.UnpicklingError("unexpected persistent id in a weights file header.")
        return self._persistent(pid)


def _storage_type(value) -> _StorageType:
    if not isinstance(value, _StorageType):
        raise ValueError(f"corrupt weights file: unsupported storage type {value!r}.")
    return value


def _read_zip(path: Path) -> Any:
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        pickles = sorted(n for n in names if n.endswith("data.pkl") and n.count("/") == 1)
        if not pickles:
            raise ValueError(f"{path} is a zip file but not a torch.save archive (no <name>/data.pkl).")
        prefix = pickles[0][: -len("data.pkl")]
        order = zf.read(prefix + "byteorder").decode().strip() if prefix + "byteorder" in names else "little"
        storages: dict[str, _Storage] = {}

        def persistent_load(pid):
            if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage")):
                raise ValueError(f"corrupt weights file: unexpected persistent id {pid!r}.")
            _, kind, key, _location, numel = pid
            key = key.decode() if isinstance(key, bytes) else str(key)
            if key not in storages:
                storages[key] = _Storage(_storage_type(kind).dtype, numel)
            return storages[key]

        obj = _RestrictedUnpickler(io.BytesIO(zf.read(pickles[0])), persistent_load).load()
        for key, st in storages.items():
            name = f"{prefix}data/{key}"
            if name not in names:
                raise ValueError(f"corrupt weights file: storage {name} is missing from {path}.")
            raw = zf.read(name)
            dtype = st.dtype.newbyteorder("<" if order == "little" else ">")
            if len(raw) < st.numel * dtype.itemsize:
                raise ValueError(f"corrupt weights file: storage {name} is truncated.")
            st.data = np.frombuffer(raw, dtype, count=st.numel).astype(st.dtype)
    return obj


def _read_legacy(path: Path) -> Any:
    with open(path, "rb") as f:
        try:
            magic = _RestrictedUnpickler(f).load()
        except Exception as err:  # any parse failure means "not this format"
            raise ValueError(f"{path} is neither a torch.save zip archive nor a legacy torch.save file "
                             f"({err}).") from err
        if magic != _LEGACY_MAGIC:
            raise ValueError(f"{path} is not a torch.save file (bad magic number); expected pytorch-fid's "
                             f"pt_inception-2015-12-05-6726825d.pth or a .npz from convert_inception_weights.")
        if _RestrictedUnpickler(f).load() != _LEGACY_PROTOCOL:
            raise ValueError(f"{path}: unsupported legacy torch.save protocol version.")
        sys_info = _RestrictedUnpickler(f).load()
        little = bool(sys_info.get("little_endian", True)) if isinstance(sys_info, dict) else True
        roots: dict[str, _Storage] = {}

        def persistent_load(pid):
            if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] in ("storage", b"storage")):
                raise ValueError(f"corrupt weights file: unexpected persistent id {pid!r}.")
            _, kind, key, _location, numel, view = pid
            key = key.decode() if isinstance(key, bytes) else str(key)
            if key not in roots:
                roots[key] = _Storage(_storage_type(kind).dtype, numel)
            if view is not None:
                _view_key, offset, view_numel = view
                return _Storage(roots[key].dtype, view_numel, roots[key], offset)
            return roots[key]

        obj = _RestrictedUnpickler(f, persistent_load).load()
        keys = _RestrictedUnpickler(f).load()
        for key in keys:
            key = key.decode() if isinstance(key, bytes) else str(key)
            if key not in roots:
                raise ValueError(f"corrupt weights file: unknown storage key {key!r}.")
            st = roots[key]
            dtype = st.dtype.newbyteorder("<" if little else ">")
            numel = int.from_bytes(f.read(8), "little" if little else "big")
            raw = f.read(numel * dtype.itemsize)
            if numel != st.numel or len(raw) != numel * dtype.itemsize:
                raise ValueError(f"corrupt weights file: storage {key} has {numel} elements on disk, expected "
                                 f"{st.numel} (truncated file?).")
            st.data = np.frombuffer(raw, dtype).astype(st.dtype)
    return obj


def read_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The state dict saved by ``torch.save(model.state_dict(), path)``, as NumPy arrays, without importing torch.

    Reads the zip archive format (PyTorch >= 1.6) and the legacy format; the pickle may build nothing but an
    ``OrderedDict`` of tensors (see the module docstring).

    Raises:
      ValueError: for a file of another kind, a corrupt file, or a pickle that asks for other objects.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no weights file at {path}.")
    try:
        obj = _read_zip(path) if zipfile.is_zipfile(path) else _read_legacy(path)
    except pickle.UnpicklingError as err:
        raise ValueError(f"cannot read {path}: {err}") from err
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict; save model.state_dict().")
    out = {}
    for key, value in obj.items():
        if not isinstance(value, _Tensor):
            raise ValueError(f"{path}: entry {key!r} of the state dict is not a tensor.")
        out[str(key)] = value.numpy()
    return out


# ---------------------------------------------------------------------------
# Key mapping and conversion
# ---------------------------------------------------------------------------

_PARAM_TO_TORCH = {("conv", "kernel"): "conv.weight", ("bn", "scale"): "bn.weight", ("bn", "bias"): "bn.bias",
                   ("bn", "mean"): "bn.running_mean", ("bn", "var"): "bn.running_var",
                   ("fc", "kernel"): "fc.weight", ("fc", "bias"): "fc.bias"}


def torch_key(path: tuple[str, ...]) -> str:
    """The pytorch-fid state-dict key of a parameter path of :class:`FIDInceptionV3`
    (``("Mixed_5b", "branch1x1", "conv", "kernel")`` -> ``"Mixed_5b.branch1x1.conv.weight"``)."""
    path = tuple(str(p) for p in path)
    tail = _PARAM_TO_TORCH.get(path[-2:])
    if tail is None:
        raise ValueError(f"no PyTorch key for parameter path {path}.")
    return ".".join(path[:-2] + (tail,))


def _to_torch_layout(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    if path[-2:] == ("conv", "kernel"):  # HWIO -> OIHW
        return (shape[3], shape[2], shape[0], shape[1])
    if path[-2:] == ("fc", "kernel"):  # (in, out) -> (out, in)
        return (shape[1], shape[0])
    return tuple(shape)


def _from_torch_layout(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    if path[-2:] == ("conv", "kernel"):
        return np.ascontiguousarray(value.transpose(2, 3, 1, 0))
    if path[-2:] == ("fc", "kernel"):
        return np.ascontiguousarray(value.T)
    return value


def _param_shapes(network: FIDInceptionV3) -> dict[tuple[str, ...], tuple[int, ...]]:
    return {tuple(str(p) for p in path): tuple(np.shape(v.get_value())) for path, v in nnx.state(network).flat_state()}


@functools.lru_cache(maxsize=8)
def _shapes_of(width: float, num_classes: int) -> dict[tuple[str, ...], tuple[int, ...]]:
    return _param_shapes(FIDInceptionV3(width=width, num_classes=num_classes))


def expected_torch_shapes(width: float = 1.0, num_classes: int = 1008) -> dict[str, tuple[int, ...]]:
    """Every key of pytorch-fid's ``FIDInceptionV3`` state dict (``num_batches_tracked`` aside) with its shape, for a
    network of this ``width`` (1 = the real one) and ``num_classes``."""
    return {torch_key(p): _to_torch_layout(p, s) for p, s in _shapes_of(float(width), int(num_classes)).items()}


def _infer_size(state_dict: dict[str, np.ndarray]) -> tuple[float, int]:
    for key in ("Conv2d_1a_3x3.conv.weight", "fc.weight"):
        if key not in state_dict:
            raise ValueError(f"the state dict has no {key!r}: it is not pytorch-fid's FID Inception-v3 (keys such as "
                             f"{sorted(state_dict)[:3]}).")
    return state_dict["Conv2d_1a_3x3.conv.weight"].shape[0] / 32.0, int(state_dict["fc.weight"].shape[0])


def _convert(state_dict: dict[str, np.ndarray], shapes: dict[tuple[str, ...], tuple[int, ...]],
             width: float, num_classes: int) -> dict[str, np.ndarray]:
    given = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    wanted = {torch_key(p): p for p in shapes}
    missing, unexpected = sorted(set(wanted) - set(given)), sorted(set(given) - set(wanted))
    if missing or unexpected:
        raise ValueError(f"the state dict does not match the FID Inception-v3 (width {width:g}, {num_classes} "
                         f"classes): missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}, unexpected keys "
                         f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}.")
    out = {}
    for key, path in wanted.items():
        value = np.asarray(given[key])
        want = _to_torch_layout(path, shapes[path])
        if value.shape != want:
            raise ValueError(f"{key} has shape {value.shape}, the FID Inception-v3 of width {width:g} expects {want}.")
        out["/".join(path)] = _from_torch_layout(path, value).astype(np.float32)
    return out


def convert_state_dict(state_dict: dict[str, np.ndarray], *, width: float | None = None) -> dict[str, np.ndarray]:
    """Map a pytorch-fid FID Inception state dict to :class:`FIDInceptionV3` parameters: ``{"a/b/conv/kernel": HWIO,
    ...}`` (float32). Every expected key must be present with the expected shape, and no other key (aside from
    ``num_batches_tracked``) may be; ``width`` defaults to ``Conv2d_1a_3x3``'s channels / 32.

    Raises:
      ValueError: naming missing, unexpected or mis-shaped keys.
    """
    inferred, num_classes = _infer_size(state_dict)
    width = inferred if width is None else float(width)
    return _convert(state_dict, _shapes_of(width, num_classes), width, num_classes)


def _check_hash(path: Path) -> None:
    """torch.hub's convention: a file named ``<name>-<hex>.pth`` must have a SHA-256 starting with ``<hex>``."""
    m = re.search(r"-([0-9a-f]{8,})\.pth$", path.name)
    if m is None:
        return
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if not h.hexdigest().startswith(m.group(1)):
        raise ValueError(f"{path} is corrupt or incomplete: its SHA-256 {h.hexdigest()[:16]}... does not start with "
                         f"{m.group(1)} as its name says; download it again from {FID_WEIGHTS_URL}.")


def _resolve(weights: str | os.PathLike | None) -> Path:
    source = "the argument"
    if weights is None:
        weights, source = os.environ.get(WEIGHTS_ENV) or None, WEIGHTS_ENV
    if weights is None:
        raise ValueError(
            f"no Inception weights given: pass the path of pytorch-fid's weights file (weights=...) or set "
            f"{WEIGHTS_ENV}=/path/to/pt_inception-2015-12-05-6726825d.pth (or a .npz made by "
            f"convert_inception_weights). Download it once from {FID_WEIGHTS_URL} (95 MB); jaxgen downloads nothing "
            "at run time.")
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no Inception weights file at {path} (from {source}); download {FID_WEIGHTS_URL} "
                                "and pass its path.")
    return path


def _read_weights(path: Path, verify_hash: bool) -> tuple[str, dict[str, np.ndarray]]:
    """``("npz", converted arrays)`` or ``("pth", the raw state dict)``."""
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            return "npz", {k: np.asarray(data[k]) for k in data.files}
    if verify_hash:
        _check_hash(path)
    return "pth", read_torch_state_dict(path)


def load_inception_arrays(weights: str | os.PathLike | None = None, *, verify_hash: bool = True,
                          width: float | None = None) -> dict[str, np.ndarray]:
    """The converted parameters ``{"a/b/conv/kernel": array, ...}`` from a ``.npz`` (:func:`convert_inception_weights`)
    or pytorch-fid's ``.pth`` (path, or ``JAXGEN_INCEPTION_WEIGHTS``); ``verify_hash`` checks a ``-<hex>.pth`` name
    against the file's SHA-256 as torch.hub does."""
    kind, arrays = _read_weights(_resolve(weights), verify_hash)
    return arrays if kind == "npz" else convert_state_dict(arrays, width=width)


def convert_inception_weights(pth_path: str | os.PathLike, npz_path: str | os.PathLike, *,
                              verify_hash: bool = True) -> Path:
    """Convert pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` into a ``.npz`` of :class:`FIDInceptionV3`
    parameters named by path (``Mixed_5b/branch1x1/conv/kernel``, HWIO kernels, float32), loadable by
    :func:`load_inception` without reading the pickle again. Returns the ``.npz`` path."""
    arrays = load_inception_arrays(pth_path, verify_hash=verify_hash)
    npz_path = Path(npz_path).expanduser()
    npz_path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(npz_path, **arrays)
    return npz_path


def load_inception(weights: str | os.PathLike | None = None, *, resize_to: int | None = 299,
                   input_range: tuple[float, float] = (-1.0, 1.0), precision=None, verify_hash: bool = True,
                   width: float | None = None) -> FIDInceptionV3:
    """The FID Inception-v3 with pytorch-fid's weights, from a ``.pth`` or converted ``.npz`` path (or the
    ``JAXGEN_INCEPTION_WEIGHTS`` environment variable). The network is built without initialisation and filled with
    the file's arrays; its width and number of classes come from their shapes.

    Args:
      weights: path of the weights; ``None`` reads ``JAXGEN_INCEPTION_WEIGHTS``.
      resize_to, input_range, precision: as :class:`FIDInceptionV3`.
      verify_hash: check a ``-<hex>.pth`` file name against the file's SHA-256.
      width: the channel multiplier, if it cannot be inferred (``Conv2d_1a_3x3`` channels / 32).

    Raises:
      ValueError: no path given (with where to get the file), or arrays that do not fit the network.
      FileNotFoundError: the path does not exist.
    """
    kind, arrays = _read_weights(_resolve(weights), verify_hash)
    if kind == "pth":
        inferred, num_classes = _infer_size(arrays)
    else:
        for key in ("Conv2d_1a_3x3/conv/kernel", "fc/kernel"):
            if key not in arrays:
                raise ValueError(f"the .npz has no {key!r}: convert pytorch-fid's .pth with convert_inception_weights.")
        inferred, num_classes = arrays["Conv2d_1a_3x3/conv/kernel"].shape[-1] / 32.0, arrays["fc/kernel"].shape[1]
    width = inferred if width is None else float(width)
    network = FIDInceptionV3(width=width, num_classes=int(num_classes), resize_to=resize_to, input_range=input_range,
                             precision=precision)  # zero kernels, no random initialisation
    shapes = _param_shapes(network)
    if kind == "pth":
        arrays = _convert(arrays, shapes, width, num_classes)
    named = {"/".join(path): shape for path, shape in shapes.items()}
    if set(arrays) != set(named):
        missing, extra = sorted(set(named) - set(arrays)), sorted(set(arrays) - set(named))
        raise ValueError(f"the weights do not match the FID Inception-v3 of width {width:g}: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}.")
    pure: dict[str, Any] = {}
    for name, shape in named.items():
        if tuple(arrays[name].shape) != shape:
            raise ValueError(f"{name} has shape {arrays[name].shape}, the network expects {shape}.")
        *parents, leaf = name.split("/")
        node = pure
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jnp.asarray(arrays[name], jnp.float32)
    graphdef, state = nnx.split(network)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def _main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Convert pytorch-fid's FID Inception weights (.pth) to a .npz.")
    parser.add_argument("pth", help=f"the weights file, from {FID_WEIGHTS_URL}")
    parser.add_argument("npz", help="where to write the .npz")
    args = parser.parse_args(argv)
    print(convert_inception_weights(args.pth, args.npz))


if __name__ == "__main__":
    _main()
