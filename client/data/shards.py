"""Client shards on disk: the prepare step that writes them, and the reads that check them.

Layout of DATA_DIR after `prepare`:
    manifest.json            data set, partition settings, spec, per-shard sizes and checksums
                             (file checksums, and each shard's data checksum: see data_checksum)
    shard_000/shard.json     the shard's own part of the manifest (a lone shard is self-describing)
    shard_000/train.npz      x: uint8 (N, C, H, W), y: int64 (N,)
    shard_000/test.npz
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from client.data import partition
from client.data.images import ImageSpec
from shared.errors import BadInput
from shared.modelfile import write_json
from shared.settings import Settings

if TYPE_CHECKING:
    from client.data.datasets import Source

log = logging.getLogger("flowerpot.prepare")

FORMAT = 1
MANIFEST = "manifest.json"
SHARD_META = "shard.json"
SPLITS = ("train", "test")
# Written only with VALIDATION_FRACTION above 0; a shard without it is read as it always was.
VALIDATION = "validation"


def shard_name(index: int) -> str:
    return f"shard_{index:03d}"


OFFICIAL_TEST_SETS = ("mnist", "fashion-mnist", "cifar10")  # test splits from the official test set
NORMALISATION_VERSION = 2  # 1: from the site's pixels (no key in the manifest); 2: fixed per data set


def data_settings(settings: Settings) -> dict[str, Any]:
    """The settings that decide what the shards contain (marked on the fields), leaving out those
    these settings do not use; a change means other shards."""
    names = [n for n in Settings.names_defining("data") if settings.applies(n)]
    wanted = settings.fingerprint(tuple(names))
    version = partition.SCHEME_VERSIONS.get(settings.partition)
    if version is not None:  # a changed scheme of the same name makes other shards
        wanted["partition_scheme"] = version
    if settings.dataset != "digits" or settings.max_examples:
        # Normalisation is a constant per data set now; earlier shards took it from the site's
        # own pixels, which differs except for the whole digits set (the same values then)
        wanted["normalisation"] = NORMALISATION_VERSION
    if settings.dataset in OFFICIAL_TEST_SETS:
        # Earlier shards split the merged training and test sets alike: other shards now
        wanted["test_set"] = "official"
    return wanted


def prepare(settings: Settings, force: bool = False) -> dict[str, Any]:
    """Write this site's shards (SITE_SHARDS of NUM_SHARDS; all by default) and the manifest into
    DATA_DIR; idempotent. Every site partitions the whole data set alike (same SEED), so sites
    with disjoint SITE_SHARDS hold disjoint data.

    Returns the manifest. Shards that already match the settings and their checksums are kept;
    shards made with other settings are replaced only with `force`.
    """
    from client.data.datasets import load_source  # the heavy imports only when shards are written

    root = settings.data_dir
    wanted = data_settings(settings)
    site_shards = settings.site_shard_indices
    if settings.site_shards:  # recorded only when set: manifests of all shards stay as they were
        wanted["site_shards"] = list(site_shards)
    existing = _read_json(root / MANIFEST) if (root / MANIFEST).exists() else None
    if existing is not None:
        if existing.get("settings") == wanted:
            problems = [p for s in existing["shards"] for p in verify_shard(root / s["name"], s)]
            if not problems:
                log.info("%s already holds these %d shards; nothing to do", root, len(existing["shards"]))
                return existing
            log.warning("rewriting damaged shards in %s: %s", root, "; ".join(problems))
        elif not force:
            changed = sorted(
                k
                for k in set(wanted) | set(existing.get("settings", {}))
                if wanted.get(k) != existing.get("settings", {}).get(k)
            )
            raise BadInput(
                f"DATA_DIR={root} holds shards made with other settings ({', '.join(c.upper() for c in changed)} "
                "differ): use another DATA_DIR, or run prepare with --force to replace them"
            )
    elif root.is_dir() and any(root.glob("shard_*")) and not force:
        raise BadInput(
            f"DATA_DIR={root} holds shard folders but no {MANIFEST}: use another DATA_DIR, "
            "or run prepare with --force to replace them"
        )

    log.info("loading %s%s", settings.dataset, "" if settings.dataset in ("digits", "folder") else
             f" (downloaded into {settings.raw_dir} unless it is there)")  # fmt: skip
    source = load_source(settings)
    splits = shard_splits(source, settings)
    every = max(1, len(splits) // 10)  # about ten progress lines, however many shards
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".prepare-", dir=root))
    try:
        entries = []
        for index, split in enumerate(splits):
            if index not in site_shards:
                continue
            entries.append(_write_shard(staging, index, split, source.x, source.y, source.spec, wanted))
            if (index + 1) % every == 0 or index + 1 == len(splits):
                log.info("wrote shard %d of %d", index + 1, len(splits))
        manifest = {
            "format": FORMAT,
            "settings": wanted,
            "spec": source.spec.to_json(),
            "total_examples": int(sum(len(s["train"]) + len(s["test"]) for s in splits)),
            "shards": entries,
        }
        write_json(staging / MANIFEST, manifest)
        _replace_shards(root, staging, [e["name"] for e in entries])
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("wrote %d shards of %s (%s) to %s", len(entries), settings.dataset, settings.partition, root)
    return manifest


def log_coverage(labels: np.ndarray, parts: list[np.ndarray], settings: Settings) -> None:
    """What each shard covers, examples left unused, classes dropped (a warning), and for
    Dirichlet the label skew achieved against the skew DIRICHLET_ALPHA asks for (a warning when
    MIN_SHARD_SIZE's redraws made the shards clearly less skewed)."""
    classes, unused, dropped = partition.coverage(labels, parts)
    shown = len(classes) if len(classes) <= 20 else 10  # a long list: the first ten
    for index, shard_classes in enumerate(classes[:shown]):
        log.info("%s: %d examples, classes %s", shard_name(index), len(parts[index]), shard_classes)
    if shown < len(classes):
        log.info("... and %d more shards", len(classes) - shown)
    log.info("%d of %d examples unused", unused, len(labels))
    if dropped:
        log.warning(
            "PARTITION=%s drops classes %s: no shard holds them; the federation cannot learn them",
            settings.partition, dropped,
        )  # fmt: skip
    if settings.partition == "dirichlet" and len(parts) > 1:
        achieved = partition.mean_label_entropy(labels, parts)
        expected, p5, p95 = partition.dirichlet_expected_entropy(
            labels, len(parts), settings.dirichlet_alpha, np.random.default_rng([settings.seed, 2])
        )
        log.info(
            "label skew: mean label entropy per shard %.3f nats, DIRICHLET_ALPHA=%g expects %.3f",
            achieved, settings.dirichlet_alpha, expected,
        )  # fmt: skip
        if not p5 <= achieved <= p95:
            log.warning(
                "the shards are %s skewed than DIRICHLET_ALPHA=%g asks (mean label entropy %.3f, expected %.3f, "
                "90%% of unconstrained draws within %.3f..%.3f): MIN_SHARD_SIZE=%d kept only some draws; lower "
                "MIN_SHARD_SIZE or NUM_SHARDS to get the asked skew",
                "less" if achieved > p95 else "more", settings.dirichlet_alpha, achieved, expected, p5, p95,
                settings.min_shard_size,
            )  # fmt: skip


def shard_splits(source: Source, settings: Settings) -> list[dict[str, np.ndarray]]:
    """Every shard's train and test indices into the source, the same on every site (same SEED).
    A data set with an official test set: the training set is partitioned and the official test
    set divided among the shards like their training data (`partition.split_like`); without one
    (digits, a folder), each shard keeps TEST_FRACTION of its own examples for testing."""
    parts = _partition(source.train_y, settings)
    log_coverage(source.train_y, parts, settings)
    log.info("writing %d shards (%s) of %d examples", len(parts), settings.partition, len(source.y))
    if source.test_from is not None:
        assert source.test_y is not None
        rng = np.random.default_rng([settings.seed, 2])
        tests = partition.split_like(source.train_y, parts, source.test_y, rng)
        splits = [{"train": part, "test": test + source.test_from} for part, test in zip(parts, tests)]
    else:
        rng = np.random.default_rng([settings.seed, 1])
        splits = []
        for part in parts:
            order = rng.permutation(part)
            n_test = max(1, round(len(order) * settings.test_fraction))
            splits.append({"train": np.sort(order[n_test:]), "test": np.sort(order[:n_test])})
    if settings.validation_fraction > 0:
        # From the training part only, with a stream of its own: the test splits stay the same
        # examples as without a validation split, so test accuracies remain comparable.
        rng = np.random.default_rng([settings.seed, 3])
        for split in splits:
            order = rng.permutation(split["train"])
            n_val = max(1, round(len(order) * settings.validation_fraction))
            split["train"], split[VALIDATION] = np.sort(order[n_val:]), np.sort(order[:n_val])
    return splits


def _partition(labels: np.ndarray, settings: Settings) -> list[np.ndarray]:
    rng = np.random.default_rng([settings.seed, 0])
    k, min_size = settings.num_shards, settings.min_shard_size
    if settings.partition == "iid":
        return partition.iid(len(labels), k, min_size, rng)
    if settings.partition == "dirichlet":
        return partition.dirichlet(labels, k, settings.dirichlet_alpha, min_size, rng)
    return partition.pathological(labels, k, settings.labels_per_client, min_size, rng)


def _write_shard(
    staging: Path,
    index: int,
    split: dict[str, np.ndarray],
    x: np.ndarray,
    y: np.ndarray,
    spec: ImageSpec,
    settings: dict[str, Any],
) -> dict[str, Any]:
    name = shard_name(index)
    folder = staging / name
    folder.mkdir()
    files = {}
    for part, idx in split.items():
        path = folder / f"{part}.npz"
        np.savez(path, x=x[idx], y=y[idx])
        files[path.name] = sha256(path)
    arrays = {part: (x[idx], y[idx]) for part, idx in split.items()}
    labels, counts = np.unique(y[np.concatenate(list(split.values()))], return_counts=True)
    entry = {
        "name": name,
        "index": index,
        "train": len(split["train"]),
        "test": len(split["test"]),
        **({VALIDATION: len(split[VALIDATION])} if VALIDATION in split else {}),
        "label_histogram": {str(int(label)): int(c) for label, c in zip(labels, counts)},
        "files": files,
        "data_checksum": data_checksum(arrays),
    }
    write_json(folder / SHARD_META, {**entry, "format": FORMAT, "settings": settings, "spec": spec.to_json()})
    return entry


def _replace_shards(root: Path, staging: Path, names: list[str]) -> None:
    """Move the new shards in place of any old ones; the manifest goes last."""
    (root / MANIFEST).unlink(missing_ok=True)
    for old in root.glob("shard_*"):
        shutil.rmtree(old)
    for name in names:
        (staging / name).rename(root / name)
    (staging / MANIFEST).rename(root / MANIFEST)


# Reading shards -------------------------------------------------------------------------------


@dataclass
class Shard:
    """A shard loaded and checked: what a client trains and evaluates on."""

    name: str
    path: Path
    spec: ImageSpec
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    data_checksum: str = ""  # of the images and labels (see data_checksum): the same data, the same value
    x_val: np.ndarray | None = None  # the validation split, when the shard has one
    y_val: np.ndarray | None = None


def no_validation_split(shard: Shard) -> str:
    """What EVALUATE_SPLIT=validation says of a shard prepared without a validation split."""
    return (
        f"EVALUATE_SPLIT=validation: {shard.name} has no validation split: run `flowerpot prepare` "
        "with VALIDATION_FRACTION above 0"
    )


def data_checksum(arrays: dict[str, tuple[np.ndarray, np.ndarray]]) -> str:
    """A checksum of a shard's images and labels, not of its files: .npz files carry the time
    they were written, so the same shard prepared on two sites has other file checksums but
    this same value. The server compares it to refuse two clients training one shard."""
    digest = hashlib.sha256()
    for split in (*SPLITS, VALIDATION):
        if split not in arrays:  # no validation split: the checksum of a shard from before it existed
            continue
        x, y = arrays[split]
        for array in (np.ascontiguousarray(x, dtype=np.uint8), np.ascontiguousarray(y, dtype=np.int64)):
            digest.update(f"{split}{array.shape}{array.dtype.str}".encode())
            digest.update(array.data)
    return digest.hexdigest()


def shard_dirs(data_dir: Path) -> list[Path]:
    """The shard folders in DATA_DIR; DATA_DIR itself when it is a single shard."""
    if not data_dir.is_dir():
        raise BadInput(f"DATA_DIR={data_dir} does not exist: run `flowerpot prepare` or mount the shards there")
    if (data_dir / SHARD_META).is_file():
        return [data_dir]
    found = sorted(p.parent for p in data_dir.glob(f"shard_*/{SHARD_META}"))
    if not found:
        raise BadInput(f"DATA_DIR={data_dir} holds no shards ({SHARD_META} files): run `flowerpot prepare` first")
    return found


def verify_shard(folder: Path, meta: dict[str, Any]) -> list[str]:
    """Problems with a shard folder's files (missing, checksum mismatch); empty when sound."""
    problems = []
    for filename, digest in meta.get("files", {}).items():
        path = folder / filename
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif sha256(path) != digest:
            problems.append(f"{path} is corrupt (checksum mismatch)")
    return problems


def load_shard(folder: Path) -> Shard:
    """Read a shard and check it against its own metadata; BadInput names what is wrong."""
    meta_path = folder / SHARD_META
    meta = _read_json(meta_path)
    try:
        spec = ImageSpec.from_json(meta["spec"])
        files = meta["files"]
    except (KeyError, TypeError) as exc:
        raise BadInput(f"{meta_path} lacks {exc}: run `flowerpot prepare --force` to rebuild the shards") from None
    splits = [*SPLITS, *([VALIDATION] if f"{VALIDATION}.npz" in files else [])]
    if set(files) != {f"{s}.npz" for s in splits}:
        raise BadInput(
            f"{meta_path} lists {sorted(files)}, not train.npz and test.npz (and validation.npz): rebuild the shards"
        )
    problems = verify_shard(folder, meta)
    if problems:
        raise BadInput(f"{problems[0]}: run `flowerpot prepare` again to rebuild the shards")
    arrays = {}
    for split in splits:
        path = folder / f"{split}.npz"
        try:
            with np.load(path, allow_pickle=False) as data:
                x, y = data["x"], data["y"]
        except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
            raise BadInput(f"{path} cannot be read ({exc}): rebuild the shards") from None
        if x.dtype != np.uint8 or x.shape[1:] != spec.shape or y.shape != (len(x),) or len(x) == 0:
            raise BadInput(
                f"{path} holds {len(x)} images of {x.shape[1:]} {x.dtype}, expected a non-empty "
                f"set of {spec.shape} uint8: rebuild the shards"
            )
        if y.min() < 0 or y.max() >= spec.num_classes:
            raise BadInput(f"{path} has labels outside 0..{spec.num_classes - 1}: rebuild the shards")
        arrays[split] = (x, y.astype(np.int64))
    checksum = data_checksum(arrays)  # shards written before it was recorded: computed here alike
    if meta.get("data_checksum", checksum) != checksum:
        raise BadInput(f"{folder} holds other data than its {SHARD_META} records: rebuild the shards")
    return Shard(
        name=meta.get("name", folder.name),
        path=folder,
        spec=spec,
        x_train=arrays["train"][0],
        y_train=arrays["train"][1],
        x_test=arrays["test"][0],
        y_test=arrays["test"][1],
        data_checksum=checksum,
        x_val=arrays[VALIDATION][0] if VALIDATION in arrays else None,
        y_val=arrays[VALIDATION][1] if VALIDATION in arrays else None,
    )


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BadInput(f"{path} is missing: run `flowerpot prepare` to write the shards") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadInput(f"{path} is corrupt ({exc.__class__.__name__}): run `flowerpot prepare --force`") from None
    if not isinstance(data, dict):
        raise BadInput(f"{path} is corrupt (not a JSON object): run `flowerpot prepare --force`")
    return data
