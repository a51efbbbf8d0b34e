"""Model files: the weights as NumPy .npz (arrays in model order) beside a JSON sidecar.

Both sides use it: the server writes the global model after each round and at the end, a
client keeps the final global model, and `predict` reads either. No torch needed here.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from shared.errors import BadInput


def sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def to_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def npy_view(blob: bytes) -> np.ndarray:
    """The array in .npy bytes (Flower's tensor format), read-only and without copying the data.
    ValueError when the bytes are not a plain numeric .npy array."""
    stream = io.BytesIO(blob)
    version = np.lib.format.read_magic(stream)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(stream)
    if dtype.hasobject:
        raise ValueError("object arrays are not allowed")
    count = int(np.prod(shape, dtype=np.int64))
    flat = np.frombuffer(blob, dtype=dtype, count=count, offset=stream.tell())
    return flat.reshape(shape, order="F" if fortran_order else "C")


def write_npz(path: Path, entries: dict[str, bytes]) -> None:
    """An .npz (a zip of .npy files) from .npy bytes, replaced atomically."""
    tmp = path.with_name(f".{path.name}.tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, blob in entries.items():
            archive.writestr(f"{name}.npy", blob)
    os.replace(tmp, path)


def save_model(path: Path, arrays: list[np.ndarray] | list[bytes], meta: dict[str, Any]) -> None:
    """Write both files atomically (a reader never sees half a model). Arrays may come as .npy
    bytes (the server's Flower tensors), which are written as they are."""
    path.parent.mkdir(parents=True, exist_ok=True)
    blobs = [a if isinstance(a, bytes) else to_npy(a) for a in arrays]
    views = [npy_view(b) for b in blobs]
    meta = {**meta, "arrays": [{"shape": list(v.shape), "dtype": str(v.dtype)} for v in views]}
    write_npz(path, {f"arr_{i}": blob for i, blob in enumerate(blobs)})
    write_json(sidecar(path), meta)


def load_model(path: Path) -> tuple[list[np.ndarray], dict[str, Any]]:
    if not path.is_file():
        raise BadInput(f"no model at {path}: train first, or point --model at a .npz model file")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = [data[f"arr_{i}"] for i in range(len(data.files))]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise BadInput(f"{path} is not a readable model file ({exc.__class__.__name__}): train again") from None
    return arrays, load_meta(sidecar(path))


def load_meta(meta_path: Path) -> dict[str, Any]:
    """A model's JSON sidecar ({} when there is none); BadInput when it is not a JSON object."""
    if not meta_path.is_file():
        return {}
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise BadInput(
            f"{meta_path} is corrupt ({exc.__class__.__name__}): delete it, or copy it again with its model"
        ) from None
    if not isinstance(meta, dict):
        raise BadInput(f"{meta_path} is corrupt (not a JSON object): delete it, or copy it again with its model")
    return meta


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
