"""Model files: the weights as NumPy .npz (arrays in model order) beside a JSON sidecar.

Both sides use it: the server writes the global model after each round and at the end, a
client keeps the final global model, and `predict` reads either. No torch needed here.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from shared.errors import BadInput


def sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def save_model(path: Path, arrays: list[np.ndarray], meta: dict[str, Any]) -> None:
    """Write both files atomically (a reader never sees half a model)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**meta, "arrays": [{"shape": list(a.shape), "dtype": str(a.dtype)} for a in arrays]}
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        np.savez(fh, *arrays)
    os.replace(tmp, path)
    write_json(sidecar(path), meta)


def load_model(path: Path) -> tuple[list[np.ndarray], dict[str, Any]]:
    if not path.is_file():
        raise BadInput(f"no model at {path}: train first, or point --model at a .npz model file")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = [data[f"arr_{i}"] for i in range(len(data.files))]
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        raise BadInput(f"{path} is not a readable model file ({exc.__class__.__name__}): train again") from None
    meta_path = sidecar(path)
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return arrays, meta


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
