"""Model files: the weights as NumPy .npz (arrays in model order) beside a JSON sidecar.

Both sides use it: the server writes the global model after each round and at the end, a
client keeps the final global model, and `predict` reads either. No torch needed here.
"""

from __future__ import annotations

import functools
import io
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from shared.errors import BadInput
from shared.protocol import BUILTIN_TASK

FINAL_MODEL = "final_model.npz"  # the model after the last round: in RESULTS_DIR and each client's folder
PREVIOUS = "previous"  # earlier runs' results in RESULTS_DIR, moved aside when a new run starts


def sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def to_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def npy_view(blob: bytes) -> np.ndarray:
    """The array in .npy bytes (Flower's tensor format), read-only and without copying the data.
    ValueError when the bytes are not a plain numeric .npy array."""
    if len(blob) < 12 or blob[:6] != b"\x93NUMPY":
        raise ValueError("not .npy bytes (no .npy magic)")
    size_bytes = 2 if blob[6] == 1 else 4  # the header's length: 2 bytes in version 1.0, 4 later
    end = 8 + size_bytes + int.from_bytes(blob[8 : 8 + size_bytes], "little")
    shape, fortran_order, dtype = _npy_header(bytes(blob[:end]))
    count = int(np.prod(shape, dtype=np.int64))
    flat = np.frombuffer(blob, dtype=dtype, count=count, offset=end)
    return flat.reshape(shape, order="F" if fortran_order else "C")


@functools.lru_cache(maxsize=256)
def _npy_header(header: bytes) -> tuple[tuple[int, ...], bool, np.dtype]:
    """Shape, order and dtype from a .npy header. NumPy parses it with a Python literal parser,
    which cost more than the rest of writing a model file; a model's headers are the same every
    round, so each is parsed once."""
    stream = io.BytesIO(header)
    version = np.lib.format.read_magic(stream)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran_order, dtype = read_header(stream)
    if dtype.hasobject:
        raise ValueError("object arrays are not allowed")
    return shape, fortran_order, dtype


def write_npz(path: Path, entries: dict[str, bytes], durable: bool = False) -> None:
    """An .npz (a zip of .npy files) from .npy bytes, replaced atomically. `durable` also flushes
    it to the disk before and after the rename, so that it survives a crash of the machine, not
    only of the process."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED) as archive:
            for name, blob in entries.items():
                archive.writestr(f"{name}.npy", blob)
        if durable:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)
    if durable:
        fsync_folder(path.parent)


def fsync_folder(folder: Path) -> None:
    """Make a rename or a new file in `folder` durable (the directory entry itself)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


def task_of(meta: dict[str, Any]) -> str:
    """The task (TASK) a model file's sidecar names. Files written before tasks existed name
    none: they all hold the built-in CNN."""
    return str(meta.get("task") or BUILTIN_TASK)


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
    """The one JSON writer (model sidecars, history, shard manifests): written beside the target
    and renamed over it, so a reader, or a process killed mid-write, never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
