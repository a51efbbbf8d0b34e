"""`flowerpot predict`: classify image files, or shards' test splits, with a saved global model."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.data.images import ImageSpec, load_image
from client.data.shards import MANIFEST, SHARD_META, load_shard, shard_dirs
from client.tasks import Task, get_weights, predict_proba, set_weights, to_input
from shared.errors import BadInput
from shared.modelfile import load_model, save_model, sidecar, task_of


def find_spec(meta: dict[str, Any], data_dir: Path, model_path: Path | None = None) -> ImageSpec:
    """The model's own spec (a client-kept model has one), else the data set's in DATA_DIR."""
    if "spec" in meta:
        where = str(sidecar(model_path)) if model_path else "the model's .json sidecar"
        return _spec(lambda: meta["spec"], where, "delete it, or copy it again with its model")
    for candidate in (data_dir / MANIFEST, data_dir / SHARD_META, *sorted(data_dir.glob(f"shard_*/{SHARD_META}"))):
        if candidate.is_file():
            return _spec(partial(_spec_in, candidate), str(candidate), "run `flowerpot prepare` again")
    raise BadInput(
        f"the model has no image spec and DATA_DIR={data_dir} holds no shards to take it from: "
        "pass --data-dir with the shards the model was trained on, or use a client's final_model.npz"
    )


def _spec_in(path: Path) -> Any:
    return json.loads(path.read_text())["spec"]


def _spec(read: Callable[[], Any], where: str, fix: str) -> ImageSpec:
    """An image spec from JSON that may be corrupt or lack keys: BadInput naming the file."""
    try:
        spec = ImageSpec.from_json(read())
        if not (spec.channels in (1, 3) and 0 < spec.height <= 4096 and 0 < spec.width <= 4096 and spec.classes):
            raise ValueError("impossible image spec")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BadInput(f"{where} has no usable image spec ({exc.__class__.__name__}): {fix}") from None
    return spec


def load_predictor(
    model_path: Path, data_dir: Path, task: Task, device: str = "cpu"
) -> tuple[torch.nn.Module, ImageSpec]:
    """The saved model, in the task that made it: a model of another task is refused by name."""
    arrays, meta = load_model(model_path)
    made_by = task_of(meta)
    if made_by != task.name:
        old = " (no task recorded: Flowerpot's built-in CNN, from before tasks)" if "task" not in meta else ""
        how = "leave TASK empty" if made_by == "builtin" else f"set TASK={made_by} (and its TASK_DIR)"
        raise BadInput(
            f"{model_path} is a model of TASK={made_by}{old}, not of TASK={task.name}: to predict with it "
            f"{how}, or pass --model of a TASK={task.name} run"
        )
    spec = find_spec(meta, data_dir, model_path)
    model = task.new_model(spec, seed=0, device=device)
    try:
        set_weights(model, arrays)
    except ValueError as exc:
        raise BadInput(
            f"{model_path} does not fit TASK={task.name}'s model for {spec.dataset} ({exc}): use the data and the "
            "version of the task it was trained with"
        ) from None
    return model, spec


def predict_files(
    model_path: Path, data_dir: Path, images: list[Path], invert: str, task: Task, device: str = "cpu"
) -> list[dict[str, Any]]:
    model, spec = load_predictor(model_path, data_dir, task, device)
    inputs = task_inputs(task, images, spec) if task.predict_transform else None
    if inputs is None:
        batch = []
        for path in images:
            try:
                batch.append(load_image(path, spec, invert=invert))
            except (ValueError, FileNotFoundError) as exc:
                raise BadInput(f"{exc}: pass PNG or JPEG image files") from None
        inputs = to_input(np.stack(batch), spec)
    proba = predict_proba(model, inputs)
    return [
        {"image": str(path), "label": spec.classes[int(p.argmax())], "confidence": float(p.max())}
        for path, p in zip(images, proba)
    ]


def task_inputs(task: Task, images: list[Path], spec: ImageSpec) -> torch.Tensor:
    """The task's predict_transform of the image files (opened with PIL, as they are), checked."""
    from PIL import Image, UnidentifiedImageError

    opened = []
    for path in images:
        try:
            with Image.open(path) as img:
                img.load()
                opened.append(img.copy())
        except (UnidentifiedImageError, OSError) as exc:
            raise BadInput(
                f"{path} is not a readable image ({exc.__class__.__name__}): pass PNG or JPEG files"
            ) from None
    assert task.predict_transform is not None
    try:
        inputs = task.predict_transform(opened)
    except Exception as exc:
        raise BadInput(
            f"TASK={task.name}: predict_transform raised {exc.__class__.__name__}: {exc}: fix the task"
        ) from None
    expected = (len(images), *spec.shape)
    if not isinstance(inputs, torch.Tensor) or tuple(inputs.shape) != expected:
        got = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else type(inputs).__name__
        raise BadInput(
            f"TASK={task.name}: predict_transform returned {got} for {len(images)} images, not a tensor of shape "
            f"{expected}: return the images as the model's input, normalised like data.x"
        )
    return inputs.float()


def evaluate_test_splits(
    model_path: Path, data_dir: Path, show: int, task: Task, device: str = "cpu"
) -> dict[str, Any]:
    """Accuracy on the test split of every shard in DATA_DIR (or of DATA_DIR, if it is one),
    with the first `show` single predictions."""
    model, spec = load_predictor(model_path, data_dir, task, device)
    per_shard, correct, total = [], 0, 0
    examples: list[dict[str, Any]] = []
    for folder in shard_dirs(data_dir):
        shard = load_shard(folder)
        proba = predict_proba(model, to_input(shard.x_test, spec))
        hits = int((proba.argmax(1) == shard.y_test).sum())
        per_shard.append({"shard": shard.name, "examples": len(shard.y_test), "accuracy": hits / len(shard.y_test)})
        correct, total = correct + hits, total + len(shard.y_test)
        examples += [
            {
                "shard": shard.name,
                "index": i,
                "true": spec.classes[int(y)],
                "label": spec.classes[int(p.argmax())],
                "confidence": float(p.max()),
            }
            for i, (y, p) in enumerate(zip(shard.y_test[: show - len(examples)], proba))
        ]
    return {"accuracy": correct / total, "examples": total, "shards": per_shard, "predictions": examples}


def main(
    model_path: Path,
    data_dir: Path,
    images: list[Path],
    test_split: bool,
    invert: str,
    as_json: bool,
    show: int,
    task: Task,
    device: str = "cpu",
) -> None:
    if not images and not test_split:
        raise BadInput("give image files to classify, or --test-split to classify the shards' test splits")
    if images:
        rows = predict_files(model_path, data_dir, images, invert, task, device)
        lines = [f"{r['image']}\t{r['label']}\t{r['confidence']:.4f}" for r in rows]
        _emit(rows, lines, as_json)
    if test_split:
        report = evaluate_test_splits(model_path, data_dir, show, task, device)
        lines = [
            *(
                f"{p['shard']}[{p['index']}]\t{p['label']}\t{p['confidence']:.4f}\t(true: {p['true']})"
                for p in report["predictions"]
            ),
            *(
                f"{s['shard']}: accuracy {s['accuracy']:.4f} over {s['examples']} test examples"
                for s in report["shards"]
            ),
            f"all shards: accuracy {report['accuracy']:.4f} over {report['examples']} test examples",
        ]
        _emit(report, lines, as_json)


def _emit(data: Any, lines: list[str], as_json: bool) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n" if as_json else "".join(f"{line}\n" for line in lines))


def write_initial_model(data_dir: Path, seed: int, out: Path, task: Task) -> Path:
    """`flowerpot init-model`: the model of TASK every client would build from SEED, for the
    server's INITIAL_MODEL (pinned starting weights; written where torch is, read by the torch-free
    server)."""
    spec = find_spec({}, data_dir)
    model = task.check(spec, seed)
    meta = {"seed": seed, "spec": spec.to_json(), "task": task.name, "initial": True}
    save_model(out, get_weights(model), meta)
    return out
