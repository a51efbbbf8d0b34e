"""Data set loaders on small files written here in each data set's own on-disk format.

Nothing downloads: torchvision finds the MNIST files present, and CIFAR-10 batches are read
directly when present. Every present file is checked against the published checksums first
(client/data/checksums.py); the tests name their small files' own sums in FLOWERPOT_TEST_CHECKSUMS,
and check that any other file is refused before it is read.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from client.data.checksums import TEST_OVERRIDE
from client.data.datasets import load_source
from client.data.images import ImageSpec, load_image
from client.data.shards import load_shard, prepare, shard_dirs
from shared.errors import BadInput
from shared.settings import Settings


def settings_for(tmp_path: Path, **values: object) -> Settings:
    return Settings(data_dir=tmp_path / "data", download_dir=tmp_path / "raw", num_shards=2, min_shard_size=5, **values)


def trust(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *files: Path) -> None:
    """Make these files' own MD5 sums the expected ones (as the published ones are for the real files)."""
    sums = {f.name: hashlib.md5(f.read_bytes()).hexdigest() for f in files}
    (tmp_path / "sums.json").write_text(json.dumps(sums))
    monkeypatch.setenv(TEST_OVERRIDE, str(tmp_path / "sums.json"))


def write_idx(path: Path, array: np.ndarray) -> None:
    """The IDX format of the MNIST files: magic (0, 0, 0x08 = uint8, ndim), big-endian sizes, bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize(("dataset", "folder"), [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_mnist_family_loads_idx_files(tmp_path: Path, dataset: str, folder: str, monkeypatch) -> None:
    raw = tmp_path / "raw" / folder / "raw"
    gen = np.random.default_rng(0)
    parts = {"train": 40, "t10k": 10}
    images = {p: gen.integers(0, 256, (n, 28, 28), dtype=np.uint8) for p, n in parts.items()}
    labels = {p: np.arange(n) % 10 for p, n in parts.items()}
    for part in parts:
        write_idx(raw / f"{part}-images-idx3-ubyte", images[part])
        write_idx(raw / f"{part}-labels-idx1-ubyte", labels[part])
    trust(monkeypatch, tmp_path, *raw.iterdir())

    source = load_source(settings_for(tmp_path, dataset=dataset))
    assert source.x.shape == (50, 1, 28, 28) and source.x.dtype == np.uint8
    assert np.array_equal(source.x[:40, 0], images["train"])
    assert np.array_equal(source.y, np.concatenate([labels["train"], labels["t10k"]]))
    assert source.spec.shape == (1, 28, 28) and source.spec.num_classes == 10
    assert source.spec.classes[0] == ("0" if dataset == "mnist" else "T-shirt/top")


def test_cifar10_loads_python_batches(tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "raw" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    gen = np.random.default_rng(1)
    written = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = gen.integers(0, 256, (6, 3072), dtype=np.uint8)
        batch = {"data": data, "labels": list(gen.integers(0, 10, 6)), "batch_label": name}
        (folder / name).write_bytes(pickle.dumps(batch))
        written.append(data)
    trust(monkeypatch, tmp_path, *folder.iterdir())

    source = load_source(settings_for(tmp_path, dataset="cifar10"))
    assert source.x.shape == (36, 3, 32, 32)
    assert np.array_equal(source.x.reshape(36, 3072), np.concatenate(written))
    assert source.spec.classes[0] == "airplane" and source.spec.channels == 3


def test_cifar10_corrupt_batch_is_a_clear_error(tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "raw" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(b"not a pickle")
    trust(monkeypatch, tmp_path, *folder.iterdir())
    with pytest.raises(Exception, match="is not a CIFAR-10 batch"):
        load_source(settings_for(tmp_path, dataset="cifar10"))


def make_folder_dataset(root: Path, per_class: int = 8) -> None:
    for label, colour in (("cats", (250, 30, 30)), ("dogs", (30, 30, 250))):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (40 + i, 30), colour).save(root / label / f"{i}.png")


def test_folder_dataset_reads_one_subfolder_per_class(tmp_path: Path) -> None:
    make_folder_dataset(tmp_path / "pictures")
    settings = settings_for(tmp_path, dataset="folder", folder_path=tmp_path / "pictures", image_size=16)
    source = load_source(settings)
    assert source.x.shape == (16, 3, 16, 16)
    assert source.spec.classes == ("cats", "dogs")
    assert list(np.bincount(source.y)) == [8, 8]
    cats = source.x[source.y == 0]
    assert cats[:, 0].mean() > 200 and cats[:, 2].mean() < 60  # red stays red


def test_folder_dataset_prepares_into_shards(tmp_path: Path) -> None:
    make_folder_dataset(tmp_path / "pictures", per_class=10)
    settings = settings_for(
        tmp_path, dataset="folder", folder_path=tmp_path / "pictures", image_size=12, image_channels=1
    )
    manifest = prepare(settings)
    assert manifest["spec"]["classes"] == ["cats", "dogs"]
    shards = [load_shard(d) for d in shard_dirs(settings.data_dir)]
    assert [s.x_train.shape[1:] for s in shards] == [(1, 12, 12)] * 2


def test_folder_without_classes_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "pictures").mkdir()
    settings = settings_for(tmp_path, dataset="folder", folder_path=tmp_path / "pictures")
    with pytest.raises(Exception, match="has 0 class folder"):
        load_source(settings)


def test_load_image_matches_the_data_set_look(tmp_path: Path) -> None:
    """A dark digit on white paper becomes bright-on-dark 8x8, like sklearn's digits."""
    spec = ImageSpec("digits", 1, 8, 8, tuple("0123456789"), (0.3,), (0.4,), bright_on_dark=True)
    picture = np.full((32, 32), 255, dtype=np.uint8)
    picture[4:28, 12:20] = 0  # a dark vertical stroke, two pixels wide at 8x8
    Image.fromarray(picture).save(tmp_path / "one.png")
    image = load_image(tmp_path / "one.png", spec)
    assert image.shape == (1, 8, 8) and image.dtype == np.uint8
    assert image[0, :, 3:5].mean() > 150 and image[0, :, 0].mean() < 20
    assert load_image(tmp_path / "one.png", spec, invert="no")[0, 0, 0] > 200


class Planted:
    """A pickle that runs code when it is loaded: it creates the file `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_a_planted_cifar10_batch_is_refused_before_it_is_unpickled(tmp_path: Path) -> None:
    """The published checksums, no override: a batch that is not CIFAR-10's own never reaches pickle."""
    folder = tmp_path / "raw" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    marker = tmp_path / "code-ran"
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(pickle.dumps(Planted(marker)))
    with pytest.raises(BadInput, match=r"data_batch_1 does not match its published checksum .*: delete it so that"):
        load_source(settings_for(tmp_path, dataset="cifar10"))
    assert not marker.exists()


def test_mnist_files_are_checked_against_their_archives(tmp_path: Path, monkeypatch) -> None:
    raw = tmp_path / "raw" / "MNIST" / "raw"
    write_idx(raw / "train-images-idx3-ubyte", np.zeros((4, 28, 28), np.uint8))
    # an extracted file without its archive cannot be checked: refused, nothing is read
    with pytest.raises(BadInput, match=r"cannot be checked: its archive train-images-idx3-ubyte.gz"):
        load_source(settings_for(tmp_path, dataset="mnist"))
    # an archive that is not the published one is refused
    (raw / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"something else"))
    with pytest.raises(BadInput, match=r"train-images-idx3-ubyte.gz does not match its published checksum"):
        load_source(settings_for(tmp_path, dataset="mnist"))
    # a trusted archive whose extracted file was changed afterwards is refused too
    trust(monkeypatch, tmp_path, raw / "train-images-idx3-ubyte.gz")
    with pytest.raises(BadInput, match=r"train-images-idx3-ubyte is not the contents of train-images-idx3-ubyte.gz"):
        load_source(settings_for(tmp_path, dataset="mnist"))


def test_the_official_test_set_is_kept_apart_and_divided_like_the_training_data() -> None:
    """MNIST, Fashion-MNIST and CIFAR-10 merged their official test sets into the pool that was
    partitioned: no accuracy compared with a published one. On the arrays a loader returns (the
    training part, then the official test part), every shard trains on training examples only and
    tests on official test examples only, all of them used once, with its own label mix."""
    from client.data.datasets import Source
    from client.data.images import ImageSpec
    from client.data.shards import shard_splits

    gen = np.random.default_rng(3)
    train_y, test_y = gen.integers(0, 10, 600), gen.integers(0, 10, 200)
    y = np.concatenate([train_y, test_y])
    spec = ImageSpec("mnist", 1, 28, 28, tuple(str(d) for d in range(10)), (0.1,), (0.3,))
    source = Source(x=np.zeros((800, 1, 28, 28), np.uint8), y=y, spec=spec, test_from=600)
    for partition, extra in (("iid", {}), ("dirichlet", {"dirichlet_alpha": 0.5})):
        settings = Settings(dataset="mnist", num_shards=4, min_shard_size=5, partition=partition, **extra)
        splits = shard_splits(source, settings)
        train = np.concatenate([s["train"] for s in splits])
        test = np.concatenate([s["test"] for s in splits])
        assert np.array_equal(np.sort(train), np.arange(600))  # the training part, each example once
        assert np.array_equal(np.sort(test), np.arange(600, 800))  # the official test part, each once
        for split in splits:
            trained, tested = np.bincount(y[split["train"]], minlength=10), np.bincount(y[split["test"]], minlength=10)
            # the shard is tested on the labels it trains on (none it never saw, when it lacks one)
            assert all(t == 0 for t, n in zip(tested, trained) if n == 0)
            assert np.abs(tested / tested.sum() - trained / trained.sum()).max() < 0.25
        assert shard_splits(source, settings)[0]["test"].tolist() == splits[0]["test"].tolist()  # every site alike


def test_digits_has_no_official_test_set_and_each_shard_splits_its_own(tmp_path: Path) -> None:
    source = load_source(settings_for(tmp_path))
    assert source.test_from is None
    from client.data.shards import shard_splits

    splits = shard_splits(source, settings_for(tmp_path, test_fraction=0.25))
    for split in splits:
        assert abs(len(split["test"]) / (len(split["test"]) + len(split["train"])) - 0.25) < 0.01


def test_a_validation_split_comes_from_the_training_part_and_leaves_the_test_split_alone(tmp_path: Path) -> None:
    """VALIDATION_FRACTION holds out part of each shard's training examples for tuning; the test
    splits, which are reported, are the same examples as without it; 0 writes what it always did."""
    from client.data.shards import VALIDATION, shard_splits

    source = load_source(settings_for(tmp_path))
    before = shard_splits(source, settings_for(tmp_path))
    assert all(set(split) == {"train", "test"} for split in before)  # 0 (the default): as it always was
    after = shard_splits(source, settings_for(tmp_path, validation_fraction=0.1))
    for old, new in zip(before, after):
        assert np.array_equal(old["test"], new["test"])
        assert np.array_equal(np.sort(np.concatenate([new["train"], new[VALIDATION]])), old["train"])
        assert abs(len(new[VALIDATION]) / len(old["train"]) - 0.1) < 0.01
        assert not set(new[VALIDATION]) & set(new["train"])


def test_the_synthetic_set_is_the_same_for_a_seed_balanced_and_as_normalised_as_declared(tmp_path: Path) -> None:
    from client.data.datasets import NORMALISATION

    first = load_source(settings_for(tmp_path, dataset="synthetic", synthetic_examples=3000))
    again = load_source(settings_for(tmp_path, dataset="synthetic", synthetic_examples=3000))
    other = load_source(settings_for(tmp_path, dataset="synthetic", synthetic_examples=3000, seed=7))
    assert first.x.shape == (3000, 1, 8, 8) and first.x.dtype == np.uint8 and first.test_from is None
    assert np.array_equal(first.x, again.x) and np.array_equal(first.y, again.y)
    assert not np.array_equal(first.x, other.x)
    assert np.bincount(first.y).tolist() == [300] * 10
    (mean,), (std,) = NORMALISATION["synthetic"]
    assert abs(first.x.mean() / 255 - mean) < 0.03 and abs(first.x.std() / 255 - std) < 0.03


def test_a_thousand_synthetic_shards_prepare_offline(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", download_dir=tmp_path / "raw", dataset="synthetic", num_shards=1000)
    prepare(settings)
    folders = shard_dirs(tmp_path / "data")
    assert len(folders) == 1000
    shard = load_shard(folders[-1])
    assert len(shard.y_train) + len(shard.y_test) == 60 and shard.spec.dataset == "synthetic"
    assert not (tmp_path / "raw").exists()  # nothing to download, nothing kept
