"""The data sets Flowerpot can shard, each loaded as uint8 images (N, C, H, W) and int64 labels.

`digits` is bundled with scikit-learn and works offline. MNIST, Fashion-MNIST and CIFAR-10 come
through torchvision and download only here, in the prepare step. `folder` reads a user's images,
one sub-folder per class (the layout torchvision's ImageFolder reads). `synthetic` is generated
here from SEED: as many images as a load test with thousands of shards needs, offline.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np

from client.data.checksums import check_cifar10, check_mnist
from client.data.images import IMAGE_SUFFIXES, ImageSpec, load_image
from shared.errors import BadInput
from shared.settings import Settings

DIGIT_NAMES = tuple(str(d) for d in range(10))
FASHION_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
CIFAR10_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]

# Normalisation (per-channel mean and std on the 0..1 scale) is a constant of each data set, the
# same on every site: computed from one site's own pixels, two sites would feed the shared model
# differently scaled inputs. Built-in sets: the statistics of the whole published set (digits:
# scikit-learn's 1797 images; MNIST, Fashion-MNIST, CIFAR-10: the usual published values).
# A user's folder: 0.5 and 0.25, which maps 0..1 to -2..2 whatever the pictures look like.
NORMALISATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "digits": ((0.305309,), (0.375886,)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "synthetic": ((0.48,), (0.19,)),  # about what `_synthetic` gives at any SEED (0.47-0.49, 0.18-0.19)
}
FOLDER_MEAN, FOLDER_STD = 0.5, 0.25
# What a loader gives: images, labels, spec, and where the official test set starts (or None).
Loaded = tuple[np.ndarray, np.ndarray, ImageSpec, int | None]


@dataclass
class Source:
    """A whole data set before it is split into shards."""

    x: np.ndarray  # uint8 (N, C, H, W)
    y: np.ndarray  # int64 (N,)
    spec: ImageSpec
    # Examples from this index on are the data set's official test set (MNIST, Fashion-MNIST,
    # CIFAR-10), kept out of training so that reported accuracies compare with published ones;
    # None: the data set has no official split (digits, a folder), each shard splits its own.
    test_from: int | None = None

    @property
    def train_y(self) -> np.ndarray:
        return self.y if self.test_from is None else self.y[: self.test_from]

    @property
    def test_y(self) -> np.ndarray | None:
        return None if self.test_from is None else self.y[self.test_from :]


def load_source(settings: Settings) -> Source:
    loaders = {
        "digits": _digits,
        "mnist": _mnist,
        "fashion-mnist": _mnist,
        "cifar10": _cifar10,
        "folder": _folder,
        "synthetic": _synthetic,
    }
    x, y, spec, test_from = loaders[settings.dataset](settings)
    if settings.max_examples and settings.max_examples < len(y):
        # a sample of the whole, so the official test set keeps its share of it
        keep = np.sort(np.random.default_rng(settings.seed).permutation(len(y))[: settings.max_examples])
        x, y = x[keep], y[keep]
        if test_from is not None:
            test_from = int(np.searchsorted(keep, test_from))
    return Source(x=np.ascontiguousarray(x), y=y.astype(np.int64), spec=spec, test_from=test_from)


def _digits(settings: Settings) -> Loaded:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None]  # values 0..16
    mean, std = NORMALISATION["digits"]
    spec = ImageSpec("digits", 1, 8, 8, DIGIT_NAMES, mean, std, bright_on_dark=True)
    return x, bunch.target, spec, None  # no official test set: each shard splits its own


SYNTHETIC_SIDE = 8
SYNTHETIC_NAMES = tuple(f"pattern-{c}" for c in range(10))


def _synthetic(settings: Settings) -> Loaded:
    """SYNTHETIC_EXAMPLES images, the same for the same SEED on every machine: each class is a
    smooth random pattern, each image its class's pattern shifted by up to a pixel, scaled,
    offset and covered in noise, so that a small CNN learns it (about 0.9 test accuracy) but no
    single pixel gives the class away. Labels are balanced and in random order."""
    rng = np.random.default_rng([settings.seed, 0x5EED])
    side, n, classes = SYNTHETIC_SIDE, settings.synthetic_examples, len(SYNTHETIC_NAMES)
    pad = side + 2
    coarse = rng.uniform(-1, 1, size=(classes, 4, 4))  # a low-resolution pattern, smoothly enlarged
    fine = np.kron(coarse, np.ones((pad // 4 + 1, pad // 4 + 1)))[:, :pad, :pad]
    patterns = (fine + np.roll(fine, 1, 1) + np.roll(fine, 1, 2) + np.roll(fine, (1, 1), (1, 2))) / 4
    y = rng.permutation(np.arange(n) % classes).astype(np.int64)
    x = np.empty((n, side, side), dtype=np.float32)
    shifts = rng.integers(0, 3, size=(n, 2))
    for i in range(n):
        dy, dx = shifts[i]
        x[i] = patterns[y[i], dy : dy + side, dx : dx + side]
    contrast = rng.uniform(0.5, 1.0, size=(n, 1, 1))
    noisy = 0.5 + 0.35 * contrast * x + rng.normal(0, 0.12, size=x.shape) + rng.uniform(-0.1, 0.1, size=(n, 1, 1))
    images = np.clip(np.rint(noisy * 255), 0, 255).astype(np.uint8)[:, None]
    mean, std = NORMALISATION["synthetic"]
    spec = ImageSpec("synthetic", 1, side, side, SYNTHETIC_NAMES, mean, std)
    return images, y, spec, None  # no official test set: each shard splits its own


def _torchvision_datasets() -> ModuleType:
    try:
        from torchvision import datasets
    except ImportError:
        raise BadInput(
            "this data set needs torchvision, which is not installed here: install it, or build the "
            "client image with torchvision in TORCH_PACKAGES"
        ) from None
    return datasets


def _mnist(settings: Settings) -> Loaded:
    datasets = _torchvision_datasets()

    fashion = settings.dataset == "fashion-mnist"
    cls = datasets.FashionMNIST if fashion else datasets.MNIST
    root = _raw_root(settings)
    check_mnist(root / cls.__name__ / "raw", settings.dataset)  # what is there already, before it is read
    try:  # torchvision downloads only the files that are not already there (checking their MD5)
        parts = [cls(str(root), train=train, download=True) for train in (True, False)]
    except (OSError, RuntimeError) as exc:
        raise BadInput(
            f"cannot load {settings.dataset} into {root}: {exc}; check the internet connection "
            f"or put the raw files in {root}/{cls.__name__}/raw"
        ) from None
    x = np.concatenate([p.data.numpy() for p in parts])[:, None]
    y = np.concatenate([p.targets.numpy() for p in parts])
    mean, std = NORMALISATION[settings.dataset]
    names = FASHION_NAMES if fashion else DIGIT_NAMES
    spec = ImageSpec(settings.dataset, 1, 28, 28, names, mean, std, bright_on_dark=not fashion)
    return x, y, spec, len(parts[0].targets)  # the official test set (t10k) after the training one


def _cifar10(settings: Settings) -> Loaded:
    root = _raw_root(settings)
    folder = root / "cifar-10-batches-py"
    if not all((folder / name).is_file() for name in CIFAR10_FILES):
        datasets = _torchvision_datasets()
        try:  # downloads, checks the archive's MD5 and extracts it
            datasets.CIFAR10(str(root), train=True, download=True)
        except (OSError, RuntimeError) as exc:
            raise BadInput(
                f"cannot load cifar10 into {root}: {exc}; check the internet connection "
                f"or put the extracted python batches in {folder}"
            ) from None
    check_cifar10(folder)  # before anything is unpickled: pickle runs code
    xs, ys = [], []
    for name in CIFAR10_FILES:
        try:
            with open(folder / name, "rb") as fh:
                batch = pickle.load(fh, encoding="latin1")
            xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(batch["labels"], dtype=np.int64))
        except (OSError, pickle.UnpicklingError, KeyError, ValueError, EOFError) as exc:
            raise BadInput(
                f"{folder / name} is not a CIFAR-10 batch ({exc.__class__.__name__}): "
                f"delete {folder} and run prepare again to download it"
            ) from None
    x = np.concatenate(xs)
    mean, std = NORMALISATION["cifar10"]
    spec = ImageSpec("cifar10", 3, 32, 32, CIFAR10_NAMES, mean, std)
    return x, np.concatenate(ys), spec, len(x) - len(ys[-1])  # test_batch, the official test set, last


def _folder(settings: Settings) -> Loaded:
    """The folder's images, labelled in CLASSES order when set (every site the same), else in the
    sorted order of the sub-folders found (recorded in the manifest; the server compares it)."""
    root = settings.folder_path
    assert root is not None  # Settings (its model validator) guarantees it
    if not root.is_dir():
        raise BadInput(f"FOLDER_PATH={root} is not a folder: point it at your images")
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    classes = settings.class_names or tuple(found)
    unknown = [name for name in found if name not in classes]
    if unknown:
        raise BadInput(
            f"FOLDER_PATH={root} has class folder(s) {', '.join(unknown)} that are not in CLASSES={settings.classes}: "
            "add them to CLASSES on every site (in label order), or move them out of FOLDER_PATH"
        )
    if len(classes) < 2:
        raise BadInput(
            f"FOLDER_PATH={root} has {len(classes)} class folder(s): put each class's images "
            "in a sub-folder of its own, at least two classes"
        )
    size, channels = settings.image_size, settings.image_channels
    mean, std = (FOLDER_MEAN,) * channels, (FOLDER_STD,) * channels
    spec = ImageSpec("folder", channels, size, size, tuple(classes), mean, std)
    images, labels = [], []
    for label, name in enumerate(classes):
        if name not in found:  # a site may lack some classes: non-IID data, not an error
            continue
        files = sorted(p for p in (root / name).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        for path in files:
            try:
                images.append(load_image(path, spec, invert="no"))
            except ValueError as exc:
                raise BadInput(f"{exc}: remove or replace that file") from None
            labels.append(label)
    if not images:
        raise BadInput(f"FOLDER_PATH={root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return np.stack(images), np.asarray(labels, dtype=np.int64), spec, None


def _raw_root(settings: Settings) -> Path:
    root = settings.raw_dir
    root.mkdir(parents=True, exist_ok=True)
    return root
