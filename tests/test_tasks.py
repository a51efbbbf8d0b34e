"""The user's own model as a task plug-in (TASK, TASK_DIR): the contract module of the docs, copied
unchanged into a folder outside the repository, federates and predicts; the examples run end to
end; a site or a model of another task is refused by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_live_metrics import Scraper, value

from conftest import REPO, free_address, run_cli
from flowerpot.launcher import Process, clean_env, free_port

# Every test here runs real clients or the CLI as processes.
pytestmark = pytest.mark.process

CONTRACT = REPO / "tests" / "contract_task.py.txt"  # the module of docs/own-model.md, byte for byte
# Two rounds, one local epoch: enough to see a task learn, quick on two cores. Adam wants a
# smaller learning rate than the built-in task's SGD.
QUICK = {"NUM_ROUNDS": "2", "LOCAL_EPOCHS": "1", "LEARNING_RATE": "0.005", "METRICS_PORT": "0"}


# Appended to the contract module: a predict_transform that notes what it was given.
TRANSFORM = """

def predict_transform(images):
    from pathlib import Path
    Path(__file__).with_name("seen.txt").write_text(" ".join(f"{{i.mode}} {{i.size}}" for i in images))
    return torch.{out}
"""


def user_task(tmp_path: Path, name: str = "my_task", text: str | None = None) -> Path:
    """A folder of the user's (outside the repository) holding NAME.py."""
    folder = tmp_path / "user" / name
    folder.mkdir(parents=True)
    (folder / f"{name}.py").write_text(CONTRACT.read_text() if text is None else text)
    return folder


def history(tmp_path: Path) -> list[dict]:
    return json.loads((tmp_path / "results" / "history.json").read_text())


def test_the_contract_module_federates_predicts_and_makes_its_initial_model(tmp_path: Path) -> None:
    folder = user_task(tmp_path)
    task = {"TASK": "my_task", "TASK_DIR": str(folder)}
    result = run_cli(["run-local"], cwd=tmp_path, timeout=300, **QUICK, **task)
    assert result.returncode == 0, result.stderr[-3000:]
    rounds = history(tmp_path)
    assert len(rounds) == 2 and rounds[-1]["clients_evaluated"] == 3
    assert rounds[-1]["eval_accuracy"] >= 0.8, rounds[-1]
    assert rounds[-1]["train_loss"] > 0
    meta = json.loads((tmp_path / "results" / "final_model.json").read_text())
    assert meta["task"] == "my_task"
    assert [a["shape"] for a in meta["arrays"]] == [[128, 64], [128], [10, 128], [10]]

    predicted = run_cli(["predict", "--test-split", "--json"], cwd=tmp_path, **task)
    assert predicted.returncode == 0, predicted.stderr
    assert json.loads(predicted.stdout)["accuracy"] == pytest.approx(rounds[-1]["eval_accuracy"], abs=0.02)

    # The same module with a predict_transform: `predict` on image files hands it the opened files.
    png = tmp_path / "drawn.png"
    Image.new("L", (32, 32), color=200).save(png)
    with_transform = user_task(
        tmp_path / "t", text=CONTRACT.read_text() + TRANSFORM.format(out="zeros(len(images), 1, 8, 8)")
    )
    used = run_cli(["predict", "--json", str(png)], cwd=tmp_path, TASK="my_task", TASK_DIR=str(with_transform))
    assert used.returncode == 0, used.stderr
    assert json.loads(used.stdout)[0]["label"] in [str(d) for d in range(10)]
    assert (with_transform / "seen.txt").read_text() == "L (32, 32)"  # as the file was, not resized
    wrong = user_task(tmp_path / "w", text=CONTRACT.read_text() + TRANSFORM.format(out="zeros(2, 3)"))
    refused = run_cli(["predict", str(png)], cwd=tmp_path, TASK="my_task", TASK_DIR=str(wrong))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
    assert "TASK=my_task: predict_transform returned (2, 3) for 1 images, not a tensor of shape (1, 1, 8, 8)" in (
        refused.stderr
    )

    # A model of task my_task, under another task (the built-in one): refused by name.
    refused = run_cli(["predict", "--test-split"], cwd=tmp_path)
    assert refused.returncode == 2, refused.stderr
    assert "is a model of TASK=my_task, not of TASK=builtin: to predict with it set TASK=my_task" in refused.stderr
    assert "Traceback" not in refused.stderr

    made = run_cli(["init-model", "--out", "start.npz"], cwd=tmp_path, **task)
    assert made.returncode == 0, made.stderr
    start = json.loads((tmp_path / "start.json").read_text())
    assert start["task"] == "my_task" and start["arrays"] == meta["arrays"]
    again = run_cli(["init-model", "--out", "again.npz"], cwd=tmp_path, **task)
    assert again.returncode == 0, again.stderr
    with np.load(tmp_path / "start.npz") as a, np.load(tmp_path / "again.npz") as b:
        assert all(np.array_equal(a[k], b[k]) for k in a.files)  # seeded: every client's starting model


def test_a_builtin_model_is_refused_under_another_task(tmp_path: Path, digits_shards: Path) -> None:
    """Model files from before tasks existed hold the built-in CNN and name no task."""
    from client.data.shards import load_shard
    from client.tasks import get_weights, load_task
    from shared.modelfile import save_model

    shutil.copytree(digits_shards, tmp_path / "data")
    spec = load_shard(tmp_path / "data" / "shard_000").spec
    save_model(tmp_path / "old.npz", get_weights(load_task().new_model(spec, 42)), {})  # no "task": an old file
    folder = user_task(tmp_path)
    result = run_cli(["predict", "--test-split", "--model", "old.npz"], cwd=tmp_path, TASK="my_task",
                     TASK_DIR=str(folder))  # fmt: skip
    assert result.returncode == 2
    assert "old.npz is a model of TASK=builtin (no task recorded" in result.stderr
    assert "to predict with it leave TASK empty" in result.stderr
    read = run_cli(["predict", "--test-split", "--model", "old.npz"], cwd=tmp_path)
    assert read.returncode == 0, read.stderr  # the built-in task reads it as it always did


@pytest.mark.parametrize("mode", [{"MODE": "async"}, {"STRATEGY": "fedprox"}], ids=["async", "fedprox"])
def test_the_contract_module_federates_in_async_mode_and_with_fedprox(tmp_path: Path, mode: dict) -> None:
    folder = user_task(tmp_path)
    result = run_cli(["run-local"], cwd=tmp_path, timeout=300, **QUICK, **mode, TASK="my_task", TASK_DIR=str(folder))
    assert result.returncode == 0, result.stderr[-3000:]
    rounds = history(tmp_path)
    assert len(rounds) == 2 and rounds[-1]["eval_accuracy"] >= 0.6, rounds[-1]


def test_the_digits_example_with_adam_reports_its_declared_metric(tmp_path: Path) -> None:
    """f1, declared in the example's METRICS, reaches the history, the per-site view and the live
    metrics (the server learns it from the clients' declaration at join; it never imports the task)."""
    port = free_port()
    env = {**QUICK, "TASK": "wide_cnn", "TASK_DIR": str(REPO / "examples" / "digits_adam"), "NUM_SHARDS": "2"}
    env.update(MIN_AVAILABLE_CLIENTS="2", MIN_FIT_CLIENTS="2", MIN_EVALUATE_CLIENTS="2", STRATEGY="fedprox")
    env.update(METRICS_PORT=str(port), METRICS_LINGER="60")  # the final values stay until scraped
    scraper = Scraper(port)
    result = run_cli(["run-local"], cwd=tmp_path, timeout=300, **env)
    scrapes = [s for s in scraper.stop() if value(s, "flowerpot_round") == 2]
    assert result.returncode == 0, result.stderr[-3000:]
    final = history(tmp_path)[-1]
    assert scrapes, "the final values were never scraped"
    live = scrapes[-1]
    assert value(live, "flowerpot_task_metric", phase="evaluate", name="f1") == final["eval_metrics"]["f1"]
    for client in (c for c in final["clients"] if c["phase"] == "evaluate"):
        labels = {"site": client["site"], "shard": client["shard"], "phase": "evaluate", "name": "f1"}
        assert value(live, "flowerpot_client_task_metric", **labels) == client["metrics"]["f1"]
    assert final["eval_accuracy"] >= 0.8, final
    assert 0.5 <= final["eval_metrics"]["f1"] <= 1  # declared in METRICS: kept, averaged
    evaluated = [c for c in final["clients"] if c["phase"] == "evaluate"]
    assert all(0 <= c["metrics"]["f1"] <= 1 for c in evaluated)
    sites = json.loads((tmp_path / "results" / "sites.json").read_text())
    assert all(0 <= c["metrics"]["f1"] <= 1 for c in sites["clients"])
    assert "dropped metrics" not in result.stderr


def rgb_folder(root: Path, per_class: int = 24, size: int = 20) -> Path:
    """Three classes of RGB pictures: noisy red, green and blue squares."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for index, name in enumerate(("red", "green", "blue")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 90, (size, size, 3))
            pixels[..., index] += 120 + rng.integers(0, 40)
            Image.fromarray(pixels.astype(np.uint8), "RGB").save(root / name / f"{i}.png")
    return root


def test_the_folder_example_trains_a_residual_network_on_rgb_images(tmp_path: Path) -> None:
    pictures = rgb_folder(tmp_path / "pictures")
    env = {
        **QUICK,
        "LEARNING_RATE": "0.05",
        "DATASET": "folder",
        "FOLDER_PATH": str(pictures),
        "IMAGE_SIZE": "16",
        "IMAGE_CHANNELS": "3",
        "MAX_CLIENT_EXAMPLES": "100",
        "MIN_SHARD_SIZE": "5",
        "NUM_SHARDS": "2",
        "MIN_AVAILABLE_CLIENTS": "2",
        "MIN_FIT_CLIENTS": "2",
        "MIN_EVALUATE_CLIENTS": "2",
        "TASK": "small_resnet",
        "TASK_DIR": str(REPO / "examples" / "folder_resnet"),
    }
    result = run_cli(["run-local"], cwd=tmp_path, timeout=300, **env)
    assert result.returncode == 0, result.stderr[-3000:]
    final = history(tmp_path)[-1]
    assert final["clients_trained"] == 2 and final["eval_accuracy"] >= 0.6, final
    meta = json.loads((tmp_path / "results" / "final_model.json").read_text())
    assert "int64" in {a["dtype"] for a in meta["arrays"]}  # batch norm's counters travel too
    predicted = run_cli(["predict", str(pictures / "blue" / "0.png"), "--json"], cwd=tmp_path, **env)
    assert predicted.returncode == 0, predicted.stderr
    assert json.loads(predicted.stdout)[0]["label"] in ("red", "green", "blue")


def test_the_private_example_trains_under_dp_sgd_and_reports_its_epsilon(tmp_path: Path) -> None:
    """examples/digits_private has no train, so DP=record trains it with Flowerpot's DP-SGD loop."""
    env = {"NUM_ROUNDS": "3", "LOCAL_EPOCHS": "2", "METRICS_PORT": "0", "DP": "record", "DP_NOISE_MULTIPLIER": "1"}
    env.update(TASK="small_mlp", TASK_DIR=str(REPO / "examples" / "digits_private"))
    result = run_cli(["run-local"], cwd=tmp_path, timeout=300, **env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert history(tmp_path)[-1]["eval_accuracy"] >= 0.7, history(tmp_path)[-1]
    report = json.loads((tmp_path / "results" / "privacy.json").read_text())
    assert report["mode"] == "record" and len(report["sites"]) == 3
    assert all(0 < site["epsilon"] < 10 for site in report["sites"])
    meta = json.loads((tmp_path / "results" / "final_model.json").read_text())
    assert meta["task"] == "small_mlp" and sum(np.prod(a["shape"]) for a in meta["arrays"]) == 2410


OTHER_SHAPE = CONTRACT.read_text().replace("128", "64")  # the same module name, another network


@pytest.mark.parametrize(
    ("second", "difference"),
    [
        ({"TASK": ""}, "it runs TASK=builtin, the run TASK=my_task"),
        ({"TEXT": OTHER_SHAPE}, "the task's model 4 arrays, 4810 values"),
    ],
    ids=["other-task", "other-model"],
)
def test_a_site_with_another_task_is_refused_by_name(tmp_path: Path, data_dir: Path, second: dict,
                                                      difference: str) -> None:  # fmt: skip
    address = free_address()
    env = {
        "DATA_DIR": str(data_dir),
        "RESULTS_DIR": str(tmp_path / "results"),
        "SERVER_LISTEN_ADDRESS": address,
        "SERVER_ADDRESS": address,
        "MIN_AVAILABLE_CLIENTS": "2",
        "CONNECT_TIMEOUT": "30",
        "TASK": "my_task",
        "TASK_DIR": str(user_task(tmp_path)),
    }
    procs = []
    try:
        procs.append(server := Process("server", ["-m", "flowerpot", "server"], clean_env(**env), tmp_path))
        server.wait_for("listening on")
        procs.append(first := Process("site-a", ["-m", "flowerpot", "client"], clean_env(**env), tmp_path))
        server.wait_for(r"\(1 connected\)", timeout=120)
        other = dict(env, SITE_NAME="site-b")
        if "TASK" in second:
            other["TASK"] = second["TASK"]
        else:
            other["TASK_DIR"] = str(user_task(tmp_path / "b", text=second["TEXT"]))
        procs.append(late := Process("site-b", ["-m", "flowerpot", "client"], clean_env(**other), tmp_path))
        assert late.wait(timeout=180) == 4, late.output
        assert difference in late.output, late.output
        assert "Traceback" not in late.output
        assert difference in server.output
        assert first.returncode is None  # the first site waits for the run, untouched
    finally:
        for proc in procs:
            proc.stop()


FAILS_IN_ROUND_ONE = CONTRACT.read_text().replace(
    "    opt = torch.optim.Adam",
    '    if config.round == 1:\n        raise RuntimeError("boom")\n    opt = torch.optim.Adam',
)


def test_an_exception_in_train_is_a_failed_fit_not_a_crash(tmp_path: Path) -> None:
    folder = user_task(tmp_path, text=FAILS_IN_ROUND_ONE)
    result = run_cli(["run-local"], cwd=tmp_path, timeout=300, **QUICK, TASK="my_task", TASK_DIR=str(folder))
    assert result.returncode == 0, result.stderr[-3000:]
    first, second = history(tmp_path)
    assert first["clients_failed"] >= 2 and first["failed"], first  # no sound update: the model stays
    assert second["clients_trained"] >= 2 and second["eval_accuracy"] is not None
    assert "TASK=my_task's train raised RuntimeError: boom: the fit failed" in result.stderr
    assert "Traceback" not in result.stderr
