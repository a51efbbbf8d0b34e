"""The prepare step: deterministic, disjoint shards with a manifest; idempotent; careful with old data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from client.data.shards import MANIFEST, load_shard, prepare, shard_dirs
from conftest import run_cli
from shared.datasets import SIZES
from shared.errors import BadInput
from shared.settings import Settings


def digits(tmp_path: Path, **values: object) -> Settings:
    return Settings(data_dir=tmp_path / "data", **values)


def test_prepare_writes_disjoint_shards_with_manifest(tmp_path: Path) -> None:
    manifest = prepare(digits(tmp_path))
    shards = [load_shard(d) for d in shard_dirs(tmp_path / "data")]
    assert [s.name for s in shards] == ["shard_000", "shard_001", "shard_002"]
    assert manifest["total_examples"] == 1797 == SIZES["digits"]  # what the server bounds counts by
    assert sum(len(s.y_train) + len(s.y_test) for s in shards) == 1797
    for entry, shard in zip(manifest["shards"], shards):
        assert entry["train"] == len(shard.y_train) and entry["test"] == len(shard.y_test)
        assert sum(entry["label_histogram"].values()) == len(shard.y_train) + len(shard.y_test)
        assert abs(len(shard.y_test) / (len(shard.y_train) + len(shard.y_test)) - 0.2) < 0.01
        assert set(entry["files"]) == {"train.npz", "test.npz"}
    on_disk = json.loads((tmp_path / "data" / MANIFEST).read_text())
    assert on_disk == manifest
    assert manifest["settings"]["partition"] == "iid"
    assert manifest["spec"]["classes"] == [str(d) for d in range(10)]


def test_shards_are_disjoint_by_index(tmp_path: Path) -> None:
    """Label every image with its position, so overlap between shards would show."""
    prepare(digits(tmp_path, num_shards=4, partition="dirichlet", dirichlet_alpha=0.3))
    from sklearn.datasets import load_digits

    originals = np.rint(load_digits().images * (255 / 16)).astype(np.uint8).reshape(-1, 64)
    index = {}
    for i, row in enumerate(originals):
        index.setdefault(row.tobytes(), []).append(i)
    used: list[int] = []
    for shard in (load_shard(d) for d in shard_dirs(tmp_path / "data")):
        for row in np.concatenate([shard.x_train, shard.x_test]).reshape(-1, 64):
            used.append(index[row.tobytes()].pop())
    assert len(used) == len(set(used)) == 1797


def test_same_seed_same_shards_other_seed_other_shards(tmp_path: Path) -> None:
    a = prepare(digits(tmp_path / "a", seed=7))
    b = prepare(digits(tmp_path / "b", seed=7))
    c = prepare(digits(tmp_path / "c", seed=8))
    files = lambda m: [s["files"] for s in m["shards"]]  # noqa: E731
    assert files(a) == files(b)
    assert files(a) != files(c)


def test_prepare_is_idempotent(tmp_path: Path) -> None:
    prepare(digits(tmp_path))
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "data").rglob("*.npz")}
    prepare(digits(tmp_path))
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "data").rglob("*.npz")} == stamps


def test_prepare_refuses_shards_made_with_other_settings(tmp_path: Path) -> None:
    prepare(digits(tmp_path))
    with pytest.raises(BadInput, match=r"other settings \(DIRICHLET_ALPHA, NUM_SHARDS, PARTITION differ\).*--force"):
        prepare(digits(tmp_path, num_shards=4, partition="dirichlet"))
    assert len(shard_dirs(tmp_path / "data")) == 3  # nothing lost
    prepare(digits(tmp_path, num_shards=4, partition="dirichlet"), force=True)
    assert len(shard_dirs(tmp_path / "data")) == 4


def test_prepare_rewrites_a_damaged_shard(tmp_path: Path) -> None:
    prepare(digits(tmp_path))
    victim = tmp_path / "data" / "shard_001" / "train.npz"
    good = victim.read_bytes()
    victim.write_bytes(good[:100])
    prepare(digits(tmp_path))
    assert victim.read_bytes() == good


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "train.npz").write_bytes(b"garbage"), "train.npz is corrupt"),
        (lambda d: (d / "test.npz").unlink(), "test.npz is missing"),
        (lambda d: (d / "shard.json").write_text("{not json"), "shard.json is corrupt"),
    ],
    ids=["corrupt", "missing", "bad-metadata"],
)
def test_loading_a_damaged_shard_names_the_problem(tmp_path: Path, damage, message: str) -> None:
    prepare(digits(tmp_path))
    folder = tmp_path / "data" / "shard_000"
    damage(folder)
    with pytest.raises(BadInput, match=message):
        load_shard(folder)


def test_empty_or_missing_data_dir_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="does not exist: run `flowerpot prepare`"):
        shard_dirs(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BadInput, match="holds no shards"):
        shard_dirs(tmp_path / "empty")


@pytest.mark.process
def test_prepare_command_refuses_then_forces(tmp_path: Path) -> None:
    assert run_cli(["prepare"], cwd=tmp_path).returncode == 0
    refused = run_cli(["prepare"], cwd=tmp_path, NUM_SHARDS="5")
    assert refused.returncode == 2
    assert "holds shards made with other settings (NUM_SHARDS differ)" in refused.stderr
    forced = run_cli(["prepare", "--force"], cwd=tmp_path, NUM_SHARDS="5")
    assert forced.returncode == 0, forced.stderr
    assert len(list((tmp_path / "data").glob("shard_*"))) == 5


def test_pathological_digits_keeps_every_class_and_logs_what_each_shard_covers(tmp_path: Path, caplog) -> None:
    """3 clients x 2 labels on digits: the earlier scheme kept 6 of 10 classes (1,080 of 1,797 examples)."""
    caplog.set_level("INFO", logger="flowerpot.prepare")
    manifest = prepare(digits(tmp_path, partition="pathological", labels_per_client=2))
    assert manifest["total_examples"] == 1797
    held = {label for entry in manifest["shards"] for label in entry["label_histogram"]}
    assert len(held) == 10
    assert "shard_000: " in caplog.text and "classes [" in caplog.text
    assert "0 of 1797 examples unused" in caplog.text and "drops classes" not in caplog.text


def test_shards_of_the_earlier_pathological_scheme_are_refused(tmp_path: Path) -> None:
    settings = digits(tmp_path, partition="pathological")
    prepare(settings)
    path = tmp_path / "data" / MANIFEST
    old = json.loads(path.read_text())
    del old["settings"]["partition_scheme"]  # as the earlier scheme wrote it
    path.write_text(json.dumps(old))
    with pytest.raises(BadInput, match=r"PARTITION_SCHEME differ.*--force"):
        prepare(settings)
    assert prepare(settings, force=True)["settings"]["partition_scheme"] == 2


def test_dirichlet_logs_the_skew_it_achieved_and_warns_when_it_misses(tmp_path: Path, caplog) -> None:
    caplog.set_level("INFO", logger="flowerpot.prepare")
    prepare(digits(tmp_path, partition="dirichlet", dirichlet_alpha=0.1, num_shards=10, min_shard_size=80))
    assert "label skew: mean label entropy per shard" in caplog.text
    # 10 shards of at least 80: only the milder draws pass (entropy 1.27 nats, 90% of draws 0.77..1.15)
    assert "less skewed than DIRICHLET_ALPHA=0.1 asks" in caplog.text


def test_shards_normalised_by_the_sites_own_pixels_are_refused_not_reused(tmp_path: Path) -> None:
    """Earlier shards took their normalisation from the site's own pixels (e.g. of MAX_EXAMPLES
    digits); such a manifest has no `normalisation` key and must not pass for today's."""
    settings = digits(tmp_path, max_examples=400)
    manifest_path = tmp_path / "data" / MANIFEST
    assert prepare(settings)["settings"]["normalisation"] == 2
    old = json.loads(manifest_path.read_text())
    del old["settings"]["normalisation"]  # as the earlier version wrote it
    manifest_path.write_text(json.dumps(old))
    with pytest.raises(BadInput, match=r"NORMALISATION differ.*--force"):
        prepare(settings)
    assert "normalisation" not in prepare(digits(tmp_path / "whole"))["settings"]  # the whole set: as before


def test_a_shard_with_a_validation_split_is_read_and_one_without_is_read_as_before(tmp_path: Path) -> None:
    plain = digits(tmp_path / "a")
    prepare(plain)
    shard = load_shard(shard_dirs(plain.data_dir)[0])
    assert shard.x_val is None and shard.y_val is None
    held = digits(tmp_path / "b", validation_fraction=0.2)
    prepare(held)
    folder = shard_dirs(held.data_dir)[0]
    with_val = load_shard(folder)
    assert (
        with_val.y_val is not None
        and len(with_val.y_val) == json.loads((folder / "shard.json").read_text())["validation"]
    )
    assert np.array_equal(with_val.y_test, shard.y_test)  # the same test examples
    assert len(with_val.y_train) + len(with_val.y_val) == len(shard.y_train)
    assert with_val.data_checksum != shard.data_checksum  # other data: two sites cannot mix them
