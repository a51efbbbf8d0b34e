"""What an image of a data set looks like, and how to turn any image file into one."""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class ImageSpec:
    """Shape, classes and normalisation of a data set; stored with shards and models."""

    dataset: str
    channels: int
    height: int
    width: int
    classes: tuple[str, ...]
    mean: tuple[float, ...]  # per channel, on the 0..1 scale
    std: tuple[float, ...]
    # Digits and MNIST draw bright ink on black; photos of such images are usually the reverse.
    bright_on_dark: bool = False

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> tuple[str, ...]:
        """The classes in label order: the name a task's spec gives them (client/tasks/)."""
        return self.classes

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ImageSpec:
        fields = dict(data)
        for key in ("classes", "mean", "std"):
            fields[key] = tuple(fields[key])
        return cls(**fields)


def load_image(path: Path, spec: ImageSpec, invert: str = "auto") -> np.ndarray:
    """Read an image file as the data set's images are stored: uint8 (C, H, W).

    Converts to the spec's channels, resizes to its size, and for bright-on-dark data sets
    inverts dark-on-bright pictures (`invert`: auto, yes or no).
    """
    from PIL import Image, UnidentifiedImageError  # only predict and the folder data set need it

    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that: a bomb either way
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                img = opened.convert("L" if spec.channels == 1 else "RGB")
                img = img.resize((spec.width, spec.height), Image.Resampling.LANCZOS)
                array = np.asarray(img, dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ValueError(
            f"{path} is too large an image ({exc.__class__.__name__}: more than {Image.MAX_IMAGE_PIXELS} pixels)"
        ) from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{path} is not a readable image ({exc.__class__.__name__})") from None
    array = array[None] if spec.channels == 1 else array.transpose(2, 0, 1)
    if spec.bright_on_dark and _should_invert(array, invert):
        array = 255 - array
    return np.ascontiguousarray(array)


def _should_invert(array: np.ndarray, invert: str) -> bool:
    if invert in ("yes", "no"):
        return invert == "yes"
    border = np.concatenate([array[:, 0], array[:, -1], array[:, :, 0], array[:, :, -1]], axis=None)
    return float(border.mean()) > 127.5
