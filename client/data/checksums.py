"""Published checksums of the downloaded data sets, checked before a file is read.

A raw file is read by a parser (CIFAR-10's batches by pickle, which runs code) on the strength of
being there, so a planted or damaged file must never reach one. The MD5 sums are the ones
torchvision publishes (torchvision/datasets/mnist.py and cifar.py), copied here so that the check
does not depend on torchvision's version or on its checking only what it downloads itself.
MNIST's published sums are of the .gz archives: an extracted file passes when it is exactly the
contents of its archive, which passes first.

FLOWERPOT_TEST_CHECKSUMS (tests only) names a JSON file {file name: MD5} that replaces the
published sums, so that tests can use small files in the real formats without a download.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path

from shared.errors import BadInput

TEST_OVERRIDE = "FLOWERPOT_TEST_CHECKSUMS"

MNIST = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
FASHION_MNIST = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
CIFAR10 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
}
PUBLISHED = {"mnist": MNIST, "fashion-mnist": FASHION_MNIST, "cifar10": CIFAR10}


def expected(dataset: str) -> dict[str, str]:
    override = os.environ.get(TEST_OVERRIDE)
    if override:
        return json.loads(Path(override).read_text())
    return PUBLISHED[dataset]


def md5(path: Path, opener=open) -> str:  # opener: open, or gzip.open
    digest = hashlib.md5(usedforsecurity=False)
    with opener(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_file(path: Path, want: str) -> None:
    """BadInput, naming the file and the fix, unless `path` has the MD5 `want`."""
    got = md5(path)
    if got != want:
        raise BadInput(
            f"{path} does not match its published checksum (MD5 {got}, expected {want}): "
            "delete it so that `flowerpot prepare` downloads it again"
        )


def check_cifar10(folder: Path) -> None:
    """Every present batch of cifar-10-batches-py, before any is unpickled."""
    sums = expected("cifar10")
    for name in CIFAR10:
        if (folder / name).is_file():
            check_file(folder / name, sums[name])


def check_mnist(raw: Path, dataset: str) -> None:
    """The present .gz archives against the published sums, and the present extracted files
    against their archive (or their own sum where one is given)."""
    sums = expected(dataset)
    for archive_name in PUBLISHED[dataset]:
        archive, extracted = raw / archive_name, raw / archive_name.removesuffix(".gz")
        if archive.is_file() and archive_name in sums:
            check_file(archive, sums[archive_name])
        if not extracted.is_file():
            continue
        if extracted.name in sums:
            check_file(extracted, sums[extracted.name])
        elif archive.is_file():
            try:
                same = md5(archive, gzip.open) == md5(extracted)
            except (OSError, EOFError):
                same = False
            if not same:
                raise BadInput(
                    f"{extracted} is not the contents of {archive.name}: delete it so that `flowerpot prepare` "
                    "extracts it again"
                )
        else:
            raise BadInput(
                f"{extracted} cannot be checked: its archive {archive.name} with the published checksum is not "
                "there; delete it so that `flowerpot prepare` downloads the data set again"
            )
