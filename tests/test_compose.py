"""`docker compose up --scale client=N` against a real Docker engine, as a user runs it.

The images are built once (the first test uses the README's own `up --build`); later projects
reuse them, each with its own project name, its own volumes, and its own edited .env.
`pytest -m "not compose"` leaves these out where no Docker engine runs (CI always has one).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from datetime import datetime
from pathlib import Path

import pytest

from bench.compose import BUILT, Project, build_images, docker, env_file_with, image_size_mb
from bench.compose import images as project_images
from compose_checks import docker_available, leftovers
from conftest import MEASUREMENTS, REPO

pytestmark = pytest.mark.compose


@pytest.fixture(scope="module", autouse=True)
def images() -> None:
    """Both images, built through Compose from the repository (cached layers make rebuilds quick)."""
    assert docker_available(), "the Compose tests need a running Docker engine with Compose v2"
    MEASUREMENTS["compose build (both images)"] = f"{build_images():.1f} s"
    for kind, image in BUILT.items():
        MEASUREMENTS[f"image size flowerpot-{kind}"] = f"{image_size_mb(image):.0f} MB"


@pytest.fixture
def project(tmp_path: Path):
    """A project whose .env is the committed one with changes: project(NUM_ROUNDS="2")."""
    made: list[Project] = []

    def make(**settings: str) -> Project:
        made.append(Project(env_file_with(tmp_path / f"p{len(made)}", **settings) if settings else None))
        return made[-1]

    yield make
    for p in made:
        p.down()
        assert leftovers(p) == {"container": [], "network": [], "volume": [], "image": []}


def history(p: Project, tmp_path: Path) -> list[dict]:
    results = p.copy_results(tmp_path / f"results-{p.name}")
    return json.loads((results / "history.json").read_text())


def test_compose_file_validates() -> None:
    result = docker("compose", "-f", str(REPO / "docker-compose.yml"), "config", "--quiet", check=False)
    assert result.returncode == 0, result.stderr


def config(*args: str) -> dict:
    out = docker("compose", "-f", str(REPO / "docker-compose.yml"), *args, "config", "--format", "json").stdout
    return json.loads(out)


def test_every_project_has_images_of_its_own() -> None:
    """Two checkouts (two Compose projects) never re-tag and run each other's code."""
    seen = {}
    for name in ("fpt-one", "fpt-two"):
        services = config("-p", name, "--profile", "tools")["services"]
        expected = project_images(name)
        built = {s.get("image") for s in services.values() if "build" in s}
        assert built == {expected["server"], expected["client"]}
        for service in ("server", "certs"):
            assert services[service]["image"] == expected["server"]
        for service in ("prepare", "client", "client-slow", "predict"):
            assert services[service]["image"] == expected["client"]
        seen[name] = built
    assert not seen["fpt-one"] & seen["fpt-two"]


def test_the_slow_client_is_never_built_for_itself() -> None:
    """client-slow (scale 0 unless asked for) runs the client's image: a build makes nothing for it."""
    dry = docker("compose", "--dry-run", "-f", str(REPO / "docker-compose.yml"), "-p", "fpt-dry", "build")
    planned = dry.stdout + dry.stderr
    built = {line.split()[-2] for line in planned.splitlines() if line.rstrip().endswith(" Built")}
    assert built == {"prepare", "server", "client"}, planned


def test_clients_only_read_their_data_and_credentials() -> None:
    config = json.loads(docker("compose", "-f", str(REPO / "docker-compose.yml"), "config", "--format", "json").stdout)
    mounts = {m["target"]: m.get("read_only", False) for m in config["services"]["client"]["volumes"]}
    assert mounts == {"/data": True, "/results": False, "/certs": True, "/etc/flowerpot/.env": True, "/task": True,
                      "/privacy": False}  # fmt: skip  # DP=record's ledgers: written before an update leaves
    assert {m["target"]: m.get("read_only", False) for m in config["services"]["server"]["volumes"]}["/certs"]
    for service in ("prepare", "server", "client"):
        assert config["services"][service]["init"] is True


def test_readme_command_runs_the_whole_job(project, tmp_path: Path) -> None:
    p = project()  # the repository's own .env, as README's `docker compose up --build --scale client=3`
    result, seconds = p.up("--build", "--scale", "client=3", timeout=900)
    MEASUREMENTS["compose up --build --scale client=3 (images cached)"] = f"{seconds:.1f} s"
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    codes = (p.exit_codes("server"), p.exit_codes("client"), p.exit_codes("prepare"))
    assert codes == ([0], [0, 0, 0], [0]), (codes, p.logs("server")[-3000:], p.logs("client")[-2000:])
    assert p.exit_codes("client-slow") == []  # scale 0: started only when asked for
    ran = {c["Service"]: c["Image"] for c in p.containers()}
    assert ran == {"prepare": p.images["client"], "server": p.images["server"], "client": p.images["client"]}

    server_log = p.logs("server")
    assert "round 5/5: 3 trained, 0 failed" in server_log
    assert "finished 5 rounds: final accuracy" in server_log
    assert f"by site/shard: {p.name}/shard_0" in server_log  # the project's name, not a container id
    claimed = sorted(
        line.split("claimed ")[1].split()[0] for line in p.logs("client").splitlines() if "claimed shard" in line
    )
    assert claimed == ["shard_000", "shard_001", "shard_002"]

    results = p.copy_results(tmp_path / "results")
    rounds = json.loads((results / "history.json").read_text())
    assert len(rounds) == 5 and rounds[-1]["eval_accuracy"] >= 0.95
    for name in ("final_model.npz", "global_model.npz", "history.csv", "history.png"):
        assert (results / name).is_file()
    assert sorted(d.name for d in results.glob("client_shard_*")) == [
        "client_shard_000",
        "client_shard_001",
        "client_shard_002",
    ]


def training_span(p: Project) -> float:
    """Seconds from the server's "starting" line to its line of the last round or version, by
    Docker's timestamps (the log's own are whole seconds): the training, without containers
    starting or stopping and without writing the report."""
    lines = p.compose("logs", "--no-color", "--no-log-prefix", "--timestamps", "server", check=True).stdout.splitlines()

    def at(pattern: str) -> float:
        line = next(line for line in lines if re.search(pattern, line))
        return datetime.fromisoformat(line.split()[0].replace("Z", "+00:00")).timestamp()

    return at(r"server: (round|version) (\d+)/\2:") - at(r"server: starting \d+ ")


def test_async_with_a_slow_client_service_is_clearly_faster_than_sync(project, tmp_path: Path) -> None:
    """README's async example: two clients and one on an emulated slow device (client-slow), the
    committed .env with only MODE changed. Async does not wait for the slow client: measured
    here, 1.4 s of training against sync's 3.3 s; the bound leaves room for a loaded machine."""
    spans = {}
    for mode in ("sync", "async"):
        p = project(MODE=mode)
        result, _ = p.up("--scale", "client=2", "--scale", "client-slow=1", timeout=900)
        assert result.returncode == 0, result.stdout[-4000:]
        assert p.exit_codes("server") == [0], p.logs("server")
        assert p.exit_codes("client") == [0, 0] and p.exit_codes("client-slow") == [0]
        spans[mode] = training_span(p)
    MEASUREMENTS["compose training span, 2 clients + client-slow, sync / async"] = (
        f"{spans['sync']:.1f} s / {spans['async']:.1f} s"
    )
    assert spans["async"] < 0.75 * spans["sync"], spans
    slow = next(c["Name"] for c in p.containers() if c["Service"] == "client-slow")
    environment = docker("inspect", "-f", "{{json .Config.Env}}", slow).stdout
    assert "CLIENT_SLOWDOWN=4" in environment  # SLOW_CLIENT_SLOWDOWN's default, from .env
    rounds = history(p, tmp_path)
    assert [r["round"] for r in rounds] == list(range(1, 6))
    assert all(r["staleness_max"] is not None for r in rounds)
    assert rounds[-1]["clients_evaluated"] == 3 and rounds[-1]["eval_accuracy"] >= 0.9
    assert "version 5/5:" in p.logs("server")


def test_env_changes_are_honoured(project, tmp_path: Path) -> None:
    p = project(NUM_ROUNDS="2", FRACTION_FIT="0.5", MIN_FIT_CLIENTS="1")
    result, _ = p.up("--scale", "client=3")
    assert result.returncode == 0, result.stdout[-4000:]
    rounds = history(p, tmp_path)
    # Flower samples max(int(3 x 0.5), MIN_FIT_CLIENTS=1) = 1 client per round
    assert [(r["round"], r["clients_trained"]) for r in rounds] == [(1, 1), (2, 1)]
    assert "round 2/2: 1 trained, 0 failed" in p.logs("server")


def test_a_replica_beyond_the_shards_fails_clearly_and_the_others_finish(project, tmp_path: Path) -> None:
    p = project(NUM_ROUNDS="3")
    p.up("--scale", "client=4")
    assert p.exit_codes("server") == [0], p.logs("server")
    assert sorted(p.exit_codes("client")) == [0, 0, 0, 3]
    failed = next(c for c in p.containers() if c["Service"] == "client" and int(c["ExitCode"]) == 3)
    assert docker("inspect", "-f", "{{.RestartCount}}", failed["Name"]).stdout.strip() == "0"
    log = docker("logs", failed["Name"]).stderr
    assert "flowerpot client: error: all 3 shards in DATA_DIR=/data are claimed by other clients" in log
    assert "Traceback" not in log
    assert [r["clients_trained"] for r in history(p, tmp_path)] == [3, 3, 3]


def test_a_second_up_trains_again_and_the_outcome_form_returns_its_status(project, tmp_path: Path) -> None:
    p = project(NUM_ROUNDS="2")
    first, _ = p.up("--scale", "client=3")
    assert first.returncode == 0 and p.exit_codes("server") == [0]
    assert p.compose("up", "-d", "--scale", "client=3").returncode == 0
    waited = p.compose("wait", "server", timeout=300)
    assert waited.returncode == 0, waited.stdout + waited.stderr
    assert p.logs("prepare").count("nothing to do") >= 1  # the shards of the first run were kept
    assert p.logs("server").count("finished 2 rounds") == 2
    assert p.exit_codes("client") == [0, 0, 0]


def test_the_outcome_form_returns_the_servers_failure(project) -> None:
    # 30 s: three client containers connect well within it even on a loaded 2-core machine
    p = project(MIN_AVAILABLE_CLIENTS="4", START_TIMEOUT="30")
    assert p.compose("up", "-d", "--scale", "client=3").returncode == 0
    waited = p.compose("wait", "server", timeout=300)
    assert waited.returncode == 6
    assert "only 3 of MIN_AVAILABLE_CLIENTS=4 clients connected within START_TIMEOUT=30 s" in p.logs("server")


def test_images_run_as_non_root_and_the_server_has_no_torch() -> None:
    server, client = BUILT["server"], BUILT["client"]
    for image in (server, client):
        assert docker("run", "--rm", "--entrypoint", "id", image, "-u").stdout.strip() == "10001"
    no_torch = docker("run", "--rm", "--entrypoint", "python", server, "-c", "import torch", check=False)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
    no_client = docker("run", "--rm", "--entrypoint", "python", server, "-c", "import client", check=False)
    assert no_client.returncode != 0 and "No module named 'client'" in no_client.stderr
    # shared/ is what both sides import: nothing in it needs torch, torchvision, scikit-learn or PIL
    shared = docker("run", "--rm", "--entrypoint", "python", server, "-c",
                    "import pkgutil, importlib, shared; "
                    "[importlib.import_module('shared.' + m.name) for m in pkgutil.iter_modules(shared.__path__)]",
                    check=False)  # fmt: skip
    assert shared.returncode == 0, shared.stderr
    # the torch wheel is in the build context for one layer only, never copied into the image
    wheels = docker("run", "--rm", "--entrypoint", "ls", client, "/app/client/wheels", check=False)
    assert wheels.returncode != 0
    telemetry = docker("run", "--rm", "--entrypoint", "printenv", client, "FLWR_TELEMETRY_ENABLED").stdout
    assert telemetry.strip() == "0"


KILL_THE_CLIENT = (
    "import os, signal\n"
    "for pid in set(filter(str.isdigit, os.listdir('/proc'))) - {str(os.getpid())}:\n"
    "    if b'--restarts' in open(f'/proc/{pid}/cmdline', 'rb').read():\n"
    "        os.kill(int(pid), signal.SIGKILL); print('killed', pid)\n"
)


def test_a_crashed_client_comes_back_and_the_run_completes(project, tmp_path: Path) -> None:
    p = project(NUM_ROUNDS="8", LOCAL_EPOCHS="20")
    assert p.compose("up", "-d", "--scale", "client=3").returncode == 0
    deadline = time.monotonic() + 120
    while "round 2/8" not in p.logs("server"):
        assert time.monotonic() < deadline, p.logs("server")
        time.sleep(0.5)
    victim = next(c["Name"] for c in p.containers() if c["Service"] == "client")
    killed = docker("exec", victim, "python", "-c", KILL_THE_CLIENT)
    assert "killed" in killed.stdout  # the training process inside, not the container
    assert p.compose("wait", "server", timeout=300).returncode == 0, p.logs("server")
    assert p.exit_codes("client") == [0, 0, 0]
    log = docker("logs", victim).stderr
    assert "client crashed (killed by SIGKILL); restarting it (1 of 3)" in log
    assert log.count("claimed shard_") == 2
    rounds = history(p, tmp_path)
    assert rounds[-1]["clients_evaluated"] == 3  # the restarted client is back for the end


def test_a_replica_beyond_max_clients_is_refused_once(project, tmp_path: Path) -> None:
    p = project(NUM_ROUNDS="3", NUM_SHARDS="4", MAX_CLIENTS="3", LOCAL_EPOCHS="10")
    p.up("--scale", "client=4")
    assert p.exit_codes("server") == [0], p.logs("server")
    assert sorted(p.exit_codes("client")) == [0, 0, 0, 4]
    refused = next(c for c in p.containers() if c["Service"] == "client" and int(c["ExitCode"]) == 4)
    assert docker("inspect", "-f", "{{.RestartCount}}", refused["Name"]).stdout.strip() == "0"
    log = docker("logs", refused["Name"]).stderr
    assert log.count("error: the server at server:8080 refused this client: the server is full: MAX_CLIENTS=3") == 1
    assert "restarting" not in log
    assert "refused client" in p.logs("server")


def test_a_task_folder_in_task_dir_is_mounted_into_the_clients(project, tmp_path: Path) -> None:
    """The docs' contract module, copied unchanged into a folder of the user's: TASK_DIR mounts it
    read-only into the client containers; no image rebuild."""
    folder = tmp_path / "my_task"
    folder.mkdir()
    (folder / "my_task.py").write_text((REPO / "tests" / "contract_task.py.txt").read_text())
    folder.chmod(0o755)  # the containers' user (uid 10001) reads it
    (folder / "my_task.py").chmod(0o644)
    p = project(TASK="my_task", TASK_DIR=str(folder), NUM_ROUNDS="2", LOCAL_EPOCHS="1", LEARNING_RATE="0.005")
    result, _ = p.up("--scale", "client=3")
    assert result.returncode == 0, result.stdout[-4000:]
    rounds = history(p, tmp_path)
    assert len(rounds) == 2 and rounds[-1]["eval_accuracy"] >= 0.8, rounds[-1]
    meta = json.loads((tmp_path / f"results-{p.name}" / "final_model.json").read_text())
    assert meta["task"] == "my_task"


def test_a_task_folder_under_tasks_is_baked_into_the_image_with_its_requirements(tmp_path: Path) -> None:
    """Where the folder cannot be mounted (an EC2 site, a Swarm node): TASK_DIR=./tasks/NAME at build
    time copies the folder into the client image at /task and installs its requirements.txt. A
    folder elsewhere (./my_task, the docs' mounted case) is only mounted: `up --build` still builds."""

    def link_or_copy(source: str, target: str) -> object:
        try:
            return os.link(source, target)  # the torch wheel: hundreds of MB
        except OSError:
            return shutil.copy2(source, target)

    checkout = tmp_path / "checkout"  # a user's checkout with their task folders
    checkout.mkdir()
    for item in ("Dockerfile", ".dockerignore", "docker-compose.yml", ".env"):
        shutil.copy2(REPO / item, checkout / item)
    for folder in ("flowerpot", "shared", "server", "client", "examples"):
        shutil.copytree(REPO / folder, checkout / folder, copy_function=link_or_copy,
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    contract = (REPO / "tests" / "contract_task.py.txt").read_text()
    for folder in (checkout / "tasks" / "table_task", checkout / "my_task"):
        folder.mkdir(parents=True)
        (folder / f"{folder.name}.py").write_text("import tabulate  # from requirements.txt\n" + contract)
        (folder / "requirements.txt").write_text("tabulate==0.9.0\n")

    def build(task_dir: str) -> tuple[Project, subprocess.CompletedProcess[str]]:
        p = Project(checkout, files=(checkout / "docker-compose.yml",), env={"TASK_DIR": task_dir})
        return p, p.compose("--progress", "plain", "build", "client", timeout=1800)

    def in_image(p: Project, code: str) -> subprocess.CompletedProcess[str]:
        return docker("run", "--rm", "--entrypoint", "python", p.images["client"], "-c", code, check=False)

    load = "from pathlib import Path; from client.tasks import load_task; "
    load += "print(load_task('table_task', Path('/task')).name)"
    made: list[Project] = []
    try:
        p, built = build("./tasks/table_task")
        made.append(p)
        assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
        loaded = in_image(p, load + "; import tabulate; print(tabulate.__version__)")
        assert loaded.returncode == 0, loaded.stderr
        assert loaded.stdout.split() == ["table_task", "0.9.0"]

        p, built = build("./my_task")
        made.append(p)
        assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
        assert in_image(p, "import os; print(os.listdir('/task'))").stdout.strip() == "[]"

        p, built = build("./tasks/tabel_task")
        made.append(p)
        assert built.returncode != 0
        said = built.stdout + built.stderr  # a failed step is never cached: its message is always shown
        assert "error: TASK_DIR=./tasks/tabel_task: no such folder in the checkout: correct TASK_DIR" in said
    finally:
        for p in made:
            p.down()


def test_a_private_run_writes_its_report_and_a_second_continues_the_ledgers(project, tmp_path: Path) -> None:
    """DP=record in Compose: privacy.json from the run, and the shards' ledgers in their own
    volume, so that a second `up` on the same shards starts from the first one's spend."""
    p = project(DP="record", NUM_ROUNDS="2")
    first, _ = p.up("--scale", "client=3")
    assert first.returncode == 0 and p.exit_codes("server") == [0], p.logs("server")[-3000:]
    report = json.loads((p.copy_results(tmp_path / "r1") / "privacy.json").read_text())
    assert report["mode"] == "record" and len(report["sites"]) == 3
    assert all(0 < site["epsilon"] < 100 for site in report["sites"])
    assert "privacy spent (DP=record, per site" in p.logs("server")
    assert p.compose("up", "-d", "--scale", "client=3").returncode == 0
    assert p.compose("wait", "server", timeout=300).returncode == 0, p.logs("server")[-3000:]
    ledgers = tmp_path / "ledgers"
    p.compose("cp", "client:/privacy", str(ledgers), check=True)
    steps = {site["shard"]: site["steps"] for site in report["sites"]}
    files = sorted(ledgers.glob("shard_*.json"))
    assert len(files) == 3
    for ledger in files:
        data = json.loads(ledger.read_text())
        assert sum(n for _, _, n in data["spends"]) == 2 * steps[data["shard"]]


def test_a_secure_run_completes_in_compose(project, tmp_path: Path) -> None:
    """SECURE_AGGREGATION in Compose: every round's sum unmasked from three containers' inputs."""
    p = project(SECURE_AGGREGATION="true", MIN_FIT_CLIENTS="3", NUM_ROUNDS="2")
    result, _ = p.up("--scale", "client=3")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert p.exit_codes("server") == [0] and p.exit_codes("client") == [0] * 3, p.logs("server")[-3000:]
    assert p.logs("server").count("3 advertised keys, 3 shared them, 3 sent inputs") == 2, p.logs("server")[-3000:]
    assert [r["clients_trained"] for r in history(p, tmp_path)] == [3, 3]


def test_four_containers_of_25_logical_clients_federate_a_tenth_a_round(project, tmp_path: Path) -> None:
    """Cross-device on Compose: `--scale client=4` with CLIENTS_PER_PROCESS=25 is 100 clients on
    100 digits shards, about 10 of them trained a round; the global model is sensible on every
    shard's test split."""
    p = project(
        NUM_SHARDS="100", MIN_SHARD_SIZE="10", CLIENTS_PER_PROCESS="25", MAX_CLIENTS="100",
        MIN_AVAILABLE_CLIENTS="100", FRACTION_FIT="0.1", FRACTION_EVALUATE="0.1", NUM_ROUNDS="30",
        LOCAL_EPOCHS="5", BATCH_SIZE="10",
    )  # fmt: skip
    result, _ = p.up("--scale", "client=4", timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert p.exit_codes("server") == [0] and p.exit_codes("client") == [0] * 4, p.logs("server")[-3000:]
    server_log = p.logs("server")
    assert "starting 30 rounds of fedavg with 100 clients" in server_log
    assert re.search(r"round 1/30: 10 trained, 0 failed \|.*, 100 connected", server_log), server_log[-3000:]
    rounds = history(p, tmp_path)
    assert len(rounds) == 30 and all(r["clients_connected"] == 100 for r in rounds)
    # 10 sampled a round; the update checks may refuse an outlier of these tiny shards (14 images)
    assert all(r["clients_trained"] + r["updates_refused"] + r["clients_failed"] == 10 for r in rounds)
    assert sum(r["clients_trained"] for r in rounds) >= 8 * 30
    assert rounds[-1]["clients_evaluated"] == 100  # the last round, on every client
    clients_log = p.logs("client")
    assert clients_log.count("all 25 logical clients completed the run") == 4
    predicted = p.compose("run", "--rm", "predict", "--test-split", "--json", timeout=300)
    assert predicted.returncode == 0, predicted.stdout + predicted.stderr
    accuracy = json.loads(predicted.stdout)["accuracy"]
    assert accuracy >= 0.85, (accuracy, server_log[-3000:])
