"""The weight store: initializer name -> read-only numpy array, kept beside the graph, never as graph nodes.

Arrays are read-only so that a pass cannot change a weight behind the pass manager's back: a pass that
rewrites a weight stores a new array (``store[name] = new``), and every store assignment bumps a per-entry
version token that the structural hash uses instead of hashing gigabytes of data. External-data tensors are
memory-mapped, and tensors embedded in a model we loaded ourselves are viewed in place, so that a 1 GB model
is never held twice.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator, MutableMapping
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

_TOKENS = itertools.count(1)

# ONNX element types whose raw_data is a plain little-endian array of the numpy dtype (zero-copy view).
_PLAIN_DTYPES: dict[int, np.dtype] = {
    onnx.TensorProto.FLOAT: np.dtype("<f4"),
    onnx.TensorProto.DOUBLE: np.dtype("<f8"),
    onnx.TensorProto.FLOAT16: np.dtype("<f2"),
    onnx.TensorProto.INT8: np.dtype("i1"),
    onnx.TensorProto.UINT8: np.dtype("u1"),
    onnx.TensorProto.INT16: np.dtype("<i2"),
    onnx.TensorProto.UINT16: np.dtype("<u2"),
    onnx.TensorProto.INT32: np.dtype("<i4"),
    onnx.TensorProto.UINT32: np.dtype("<u4"),
    onnx.TensorProto.INT64: np.dtype("<i8"),
    onnx.TensorProto.UINT64: np.dtype("<u8"),
    onnx.TensorProto.BOOL: np.dtype("?"),
}


def _freeze(array: np.ndarray) -> np.ndarray:
    if array.flags.writeable:
        array = array.view()
        array.flags.writeable = False
    return array


def tensor_to_array(tensor: onnx.TensorProto, base_dir: Path | None = None) -> np.ndarray:
    """Read a TensorProto without copying where possible (memory map for external data, a view of raw_data)."""
    shape = tuple(tensor.dims)
    plain = _PLAIN_DTYPES.get(tensor.data_type)
    if tensor.data_location == onnx.TensorProto.EXTERNAL:
        info = {e.key: e.value for e in tensor.external_data}
        location = Path(info["location"])
        path = location if location.is_absolute() or base_dir is None else base_dir / location
        if plain is not None and path.exists():
            offset = int(info.get("offset", 0))
            count = int(np.prod(shape, dtype=np.int64)) if shape else 1
            if count == 0:
                return _freeze(np.zeros(shape, plain))
            return np.memmap(path, dtype=plain, mode="r", offset=offset, shape=shape)
        loaded = onnx.TensorProto()
        loaded.CopyFrom(tensor)
        onnx.external_data_helper.load_external_data_for_tensor(loaded, str(path.parent))
        return _freeze(numpy_helper.to_array(loaded))
    if plain is not None and tensor.HasField("raw_data"):
        return _freeze(np.frombuffer(tensor.raw_data, dtype=plain).reshape(shape))
    return _freeze(numpy_helper.to_array(tensor))


def array_to_tensor(name: str, array: np.ndarray) -> onnx.TensorProto:
    """Write a numpy array (ml_dtypes bfloat16/float8/int4 included) as a TensorProto."""
    return numpy_helper.from_array(np.asarray(array), name)


class WeightStore(MutableMapping[str, np.ndarray]):
    """name -> read-only array, with a version token per entry and cached content digests."""

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}
        self._tokens: dict[str, int] = {}
        self._digests: dict[int, str] = {}
        self._doc: dict[str, str] = {}
        self._encoded: dict[str, tuple[int, onnx.TensorProto]] = {}

    def __getitem__(self, name: str) -> np.ndarray:
        return self._arrays[name]

    def __setitem__(self, name: str, array: np.ndarray) -> None:
        self._arrays[name] = _freeze(np.asarray(array))
        self._tokens[name] = next(_TOKENS)

    def __delitem__(self, name: str) -> None:
        del self._arrays[name]
        self._tokens.pop(name, None)
        self._doc.pop(name, None)

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)

    def token(self, name: str) -> int:
        """A number that changes whenever the entry is replaced; the structural hash uses it."""
        return self._tokens[name]

    def digest(self, name: str) -> str:
        """A short content digest (cached per version) used by IR dumps, so that diffs show changed weights."""
        token = self._tokens[name]
        if token not in self._digests:
            data = np.ascontiguousarray(self._arrays[name])
            self._digests[token] = hashlib.blake2b(data.view(np.uint8).data, digest_size=6).hexdigest()
        return self._digests[token]

    def nbytes(self, name: str | None = None) -> int:
        if name is not None:
            return int(self._arrays[name].nbytes)
        return int(sum(a.nbytes for a in self._arrays.values()))

    def keep_encoding(self, name: str, tensor: onnx.TensorProto) -> None:
        """Remember a small tensor imported in typed fields (not raw_data), to write it back the same way
        while unchanged (byte-identical round trips)."""
        if not tensor.HasField("raw_data") and tensor.data_location != onnx.TensorProto.EXTERNAL:
            kept = onnx.TensorProto()
            kept.CopyFrom(tensor)  # a copy: a reference would keep the whole imported model alive
            self._encoded[name] = (self._tokens[name], kept)

    def encoded(self, name: str) -> onnx.TensorProto | None:
        entry = self._encoded.get(name)
        return entry[1] if entry is not None and entry[0] == self._tokens.get(name) else None

    def set_doc(self, name: str, doc: str) -> None:
        self._doc[name] = doc

    def doc(self, name: str) -> str:
        return self._doc.get(name, "")
