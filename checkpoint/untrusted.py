"""Read a torch.save file written by other code (a pytorch-template checkpoint) without running anything in it.

torch.load(weights_only=True) refuses such files: they pickle objects of the writer's own classes
(pytorch-template's ConfigParser, pathlib paths, NumPy scalars). torch.load(weights_only=False) would
import and call whatever the file names. The unpickler here imports nothing the file names: its
find_class hands out only
- for tensors, rebuild functions of its own, which view the bytes of the archive's data/ records
  (persistent_load) and check offset, sizes and strides against them;
- for NumPy scalars and dtypes, stand-ins that decode the scalar's bytes with struct;
- OrderedDict, set, frozenset, complex, and bytearray and `_codecs.encode` for latin-1 text only (how
  protocol 2 spells bytes): builtins that run nothing of the file's;
- for any other class, an inert stand-in (`Inert`) that records the name, the arguments and the state
  the object was pickled with, and does nothing else.
The opcodes that call something (REDUCE, NEWOBJ, BUILD, SETITEM, APPEND) reach only those. A file naming
a module whose functions run code (builtins, os, subprocess, ...) is refused outright as a payload: no
checkpoint needs them. Any other torch or NumPy name (a whole pickled model, an array) is refused as not read.
"""
from __future__ import annotations

import _compat_pickle
import pickle
import struct
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any, BinaryIO

import torch

from checkpoint.archive import ZIP_MAGIC, ArchiveError, verify_archive

# The storage classes torch.save names (torch.FloatStorage, ...), by the dtype of their elements.
STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
    "ComplexDoubleStorage": torch.complex128, "ComplexFloatStorage": torch.complex64, "UntypedStorage": torch.uint8,
}
DTYPES = {str(dtype).removeprefix("torch."): dtype for dtype in STORAGE_DTYPES.values()}
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of a torch.save file in the format before torch 1.6
# NumPy scalar types by dtype code: the struct format of their bytes.
NUMPY_FORMATS = {"b1": "?", "i1": "b", "u1": "B", "i2": "h", "u2": "H", "i4": "i", "u4": "I", "i8": "q", "u8": "Q",
                 "f2": "e", "f4": "f", "f8": "d", "c8": "ff", "c16": "dd"}
# Modules whose functions run code or touch the system when called: a file naming one is a payload.
RUNS_CODE = {"builtins", "__builtin__", "os", "posix", "nt", "subprocess", "sys", "shutil", "importlib", "runpy",
             "pickle", "_pickle", "marshal", "types", "ctypes", "socket", "code", "codeop", "pty", "webbrowser",
             "operator", "functools", "io", "_io", "codecs", "_codecs", "commands", "platform", "pdb", "timeit",
             "multiprocessing", "threading", "asyncio", "signal", "tempfile", "pathlib_abc", "copyreg", "inspect",
             "ast", "dill", "cloudpickle", "joblib", "yaml", "zipimport", "pkgutil", "site", "sysconfig"}


class UntrustedFileError(Exception):
    """What is wrong with the file, in a few words; the caller names the file."""


class Inert:
    """An object of a class the file names, which is never imported: `qualname`, the arguments it was built
    with (`args`, `kwargs`), its pickled `state` and the items a dict or list subclass was filled with."""

    qualname = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> "Inert":
        self = object.__new__(cls)
        self.args, self.kwargs, self.state, self.items = args, kwargs, None, []
        return self

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass  # __new__ recorded everything

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __setitem__(self, key: Any, value: Any) -> None:
        self.items.append((key, value))

    def append(self, value: Any) -> None:
        self.items.append(value)

    def extend(self, values: Any) -> None:
        self.items.extend(values)

    def add(self, value: Any) -> None:
        self.items.append(value)

    def __repr__(self) -> str:
        return f"<inert {self.qualname}>"


class TensorRecord:
    """A tensor of the file, kept in a box until loading ends: a BUILD aimed at it (which would reach
    Tensor.__setstate__ and its set_) is refused."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError("a state given to a tensor")


class Storage:
    """A storage of the file: the bytes of one data/ record as a 1-D tensor of its dtype."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError("a state given to a storage")


class StorageType:
    __slots__ = ("dtype",)

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError("a state given to a storage type")


class NumpyDtype:
    """numpy.dtype('f8') and the byte order its state names; only read by _numpy_scalar."""

    def __init__(self, code: Any, align: Any = False, copy: Any = True):
        self.code, self.byteorder = code, "<"

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) > 1 and state[1] in ("<", ">", "|", "="):
            self.byteorder = state[1]


def _numpy_scalar(dtype: Any, data: Any = None) -> bool | int | float | complex:
    """The Python number of a pickled NumPy scalar (np.float64(0.5) -> 0.5), decoded from its bytes."""
    code = getattr(dtype, "code", None) if isinstance(dtype, NumpyDtype) else None
    form = NUMPY_FORMATS.get(code) if isinstance(code, str) else None
    if form is None or type(data) is not bytes or struct.calcsize(form) != len(data):
        raise pickle.UnpicklingError(f"a NumPy scalar of dtype {code!r} (only numbers and booleans are read)")
    values = struct.unpack((">" if dtype.byteorder == ">" else "<") + form, data)
    return complex(*values) if len(values) == 2 else values[0]


def _latin1(text: Any, encoding: Any = None) -> bytes:
    # Protocol 2 pickles bytes as _codecs.encode(text, "latin1"); that call and no other.
    if type(text) is not str or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("_codecs.encode called other than for bytes")
    return text.encode("latin1")


def _bytearray(data: Any = b"", encoding: Any = None) -> bytearray:
    # bytearray(n) would allocate n bytes: only the contents pickle writes (bytes, or text and its codec).
    if type(data) is bytes and encoding is None:
        return bytearray(data)
    return bytearray(_latin1(data, encoding))


def _ints(values: Any) -> bool:
    return isinstance(values, (tuple, list)) and all(type(v) is int for v in values)


def _rebuild_tensor(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False,
                    hooks: Any = None, metadata: Any = None, dtype: torch.dtype | None = None) -> TensorRecord:
    if not (isinstance(storage, Storage) and type(offset) is int and _ints(size) and _ints(stride)
            and len(size) == len(stride)):
        raise pickle.UnpicklingError("a malformed tensor record")
    if metadata:  # the conjugate and negative bits of a view: not written for a state_dict's tensors
        raise pickle.UnpicklingError(f"a tensor with metadata {metadata!r}")
    base = storage.tensor
    try:
        if dtype is not None and dtype != base.dtype:
            base = base.view(torch.uint8).view(dtype)
        # as_strided checks that every element lies inside the storage.
        return TensorRecord(torch.as_strided(base, tuple(size), tuple(stride), offset))
    except RuntimeError as exc:
        raise pickle.UnpicklingError(f"a tensor outside its storage ({str(exc).splitlines()[0]})") from None


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    if not isinstance(dtype, torch.dtype):
        raise pickle.UnpicklingError("a malformed tensor record")
    return _rebuild_tensor(storage, offset, size, stride, requires_grad, hooks, metadata, dtype)


def _rebuild_parameter(data: Any, requires_grad: Any = False, hooks: Any = None, state: Any = None) -> TensorRecord:
    if not isinstance(data, TensorRecord):
        raise pickle.UnpicklingError("a malformed parameter record")
    return data


def _device(*args: Any) -> str:
    if not args or not all(type(a) in (str, int) for a in args):
        raise pickle.UnpicklingError("a malformed torch.device")
    return ":".join(map(str, args))


SAFE_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "bytearray"): _bytearray,
    ("builtins", "complex"): complex, ("_codecs", "encode"): _latin1,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor, ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch", "Size"): tuple, ("torch", "device"): _device,
    ("numpy", "dtype"): NumpyDtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar, ("numpy._core.multiarray", "scalar"): _numpy_scalar,
}


class RestrictedUnpickler(pickle.Unpickler):
    """A pickle.Unpickler whose find_class never imports: see the module's docstring.

    Storages come from `records` (a zip archive's data/ records by key) or, for the legacy format, are
    allocated here (at most `legacy_bytes` in all) and filled from the file once the pickle is read."""

    def __init__(self, file: BinaryIO, records: "dict[str, bytes] | None" = None, legacy_bytes: int = 0):
        super().__init__(file)
        self.records, self.legacy_bytes = records, legacy_bytes
        self.loaded: dict[str, Storage] = {}
        self.inert: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if not (type(module) is str and type(name) is str):
            raise pickle.UnpicklingError("a malformed global")
        # Protocol 2 spells builtins the Python 2 way (__builtin__.set): pickle's own renaming tables.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) in SAFE_GLOBALS:
            return SAFE_GLOBALS[(module, name)]
        if module in ("torch", "torch.storage") and name in STORAGE_DTYPES:
            return StorageType(STORAGE_DTYPES[name])
        if module == "torch" and name in DTYPES:
            return DTYPES[name]
        top = module.split(".")[0]
        if top in RUNS_CODE:
            raise UntrustedFileError(f"refused: it names {module}.{name}, which is not data: loading it with "
                                     f"torch.load(weights_only=False) would call it (a pickle payload?); nothing in "
                                     f"it was run")
        if top in ("torch", "numpy"):  # a whole pickled model, a NumPy array, or a gadget: not read
            raise UntrustedFileError(f"it holds {module}.{name}, which this reader does not rebuild (it reads "
                                     f"tensors, NumPy scalars and plain data)")
        if (module, name) not in self.inert:
            self.inert[(module, name)] = type(name, (Inert,), {"qualname": f"{module}.{name}"})
        return self.inert[(module, name)]

    def persistent_load(self, pid: Any) -> Storage:
        # zip: ("storage", type, key, location, numel); legacy: the same and (view key, offset, numel) or None
        if isinstance(pid, tuple) and pid[:1] in (("module",), (b"module",)):
            raise UntrustedFileError("a pickled model (torch.save(model)), not a state_dict checkpoint")
        legacy = self.records is None
        if not (isinstance(pid, tuple) and len(pid) == 5 + legacy and pid[0] in ("storage", b"storage")
                and isinstance(pid[1], StorageType) and type(pid[2]) is str and type(pid[4]) is int and pid[4] >= 0):
            raise pickle.UnpicklingError(f"an unexpected persistent id {str(pid)[:60]}")
        kind, key, numel, view = pid[1], pid[2], pid[4], pid[5] if legacy else None
        itemsize = torch.empty((), dtype=kind.dtype).element_size()
        if key not in self.loaded:
            if legacy:
                self.legacy_bytes -= numel * itemsize
                if self.legacy_bytes < 0:
                    raise pickle.UnpicklingError("storages larger than the file")
                buffer = bytearray(numel * itemsize)  # filled by _read_legacy
            else:
                data = self.records.get(key)
                if data is None or len(data) != numel * itemsize:
                    raise pickle.UnpicklingError(f"storage {key!r} is missing or not {numel} x {itemsize} bytes")
                buffer = bytearray(data)
            self.loaded[key] = Storage(torch.frombuffer(buffer, dtype=kind.dtype) if buffer
                                       else torch.empty(0, dtype=kind.dtype))
        base = self.loaded[key].tensor
        if base.dtype != kind.dtype:  # one record seen through two dtypes
            base = base.view(torch.uint8).view(kind.dtype)
        if view is not None:
            if not (isinstance(view, tuple) and len(view) == 3 and _ints(view[1:]) and view[1] >= 0
                    and view[2] >= 0 and view[1] + view[2] <= base.numel()):
                raise pickle.UnpicklingError("a malformed storage view")
            base = base[view[1]:view[1] + view[2]]
        return Storage(base)


def _read_legacy(handle: BinaryIO, size: int) -> Any:
    """torch.save's format before torch 1.6: three small pickles (magic number, protocol, system info), the
    object's pickle, the list of storage keys, then each storage: its element count (int64) and its bytes."""
    try:
        magic, protocol, info = (RestrictedUnpickler(handle).load() for _ in range(3))
    except UntrustedFileError:
        raise
    except Exception:  # noqa: BLE001 - not even the header: some other pickle
        magic = protocol = info = None
    if magic != LEGACY_MAGIC or protocol != 1001 or not isinstance(info, dict):
        raise UntrustedFileError("a pickle, but not a torch.save file")
    if info.get("little_endian") is not True:
        raise UntrustedFileError("written on a big-endian machine (not supported)")
    unpickler = RestrictedUnpickler(handle, None, legacy_bytes=size)
    result = unpickler.load()
    keys = RestrictedUnpickler(handle).load()
    if not (isinstance(keys, list) and set(keys) == set(unpickler.loaded)):
        raise pickle.UnpicklingError("the storage list does not match the storages")
    for key in keys:
        target = unpickler.loaded[key].tensor.view(torch.uint8)
        count = handle.read(8)
        if len(count) != 8 or struct.unpack("<q", count)[0] != unpickler.loaded[key].tensor.numel():
            raise pickle.UnpicklingError(f"storage {key!r} has the wrong size")
        data = handle.read(target.numel())
        if len(data) != target.numel():
            raise pickle.UnpicklingError(f"storage {key!r} is truncated")
        if data:
            target.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    return result


def _read_zip(handle: BinaryIO) -> Any:
    try:
        verify_archive(handle)  # structure and CRC-32s first: a damaged file is reported as such
    except ArchiveError as exc:
        raise UntrustedFileError(f"corrupt or truncated ({exc})") from None
    handle.seek(0)
    with zipfile.ZipFile(handle) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise UntrustedFileError("a zip archive without the data.pkl record torch.save writes")
        prefix = pickles[0][: -len("data.pkl")]
        order = archive.read(prefix + "byteorder").strip() if prefix + "byteorder" in names else b"little"
        if order != b"little":
            raise UntrustedFileError("written on a big-endian machine (not supported)")
        records = {n[len(prefix) + 5:]: archive.read(n) for n in names if n.startswith(prefix + "data/")}
        with archive.open(pickles[0]) as data:
            return RestrictedUnpickler(data, records).load()


def read_untrusted(path: str | Path) -> Any:
    """The object a torch.save file holds (zip archive or the legacy format), built from inert parts (see
    the module's docstring). Raises UntrustedFileError with the reason in a few words."""
    with open(path, "rb") as handle:
        zipped = handle.read(4) == ZIP_MAGIC
        size = handle.seek(0, 2)
        handle.seek(0)
        try:
            return _read_zip(handle) if zipped else _read_legacy(handle, size)
        except UntrustedFileError:
            raise
        except Exception as exc:  # noqa: BLE001 - whatever a malformed pickle makes the unpickler raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UntrustedFileError(f"corrupt or truncated ({first})") from None
