"""One participant's update within a fixed bound must not wreck the model while the run reports
success: real processes on loopback, digits in 4 shards, 5 rounds, FedAvg, three honest
Flowerpot clients and bench.attacker's boosted label flip (its update stretched to L2 norm 950,
under the old fixed UPDATE_NORM_LIMIT=1000). The true accuracy is `flowerpot predict --test-split`'s."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli
from flowerpot.launcher import CLIENT, LocalFederation

# Every test here runs servers and clients (or the CLI) as processes.
pytestmark = pytest.mark.process

BOOSTED = ["-m", "bench.attacker", "--attack", "labelflip", "--boost-norm", "950"]


@pytest.fixture(scope="module")
def four_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("bounds") / "data"
    assert run_cli(["prepare"], cwd=data.parent, DATA_DIR=str(data), NUM_SHARDS="4").returncode == 0
    return data


def run(
    data: Path, place: Path, attacker: bool, attack: list[str] = BOOSTED, **settings: str
) -> tuple[int, str, float | None]:
    """(the server's exit status, its output, the final model's true accuracy on every test split),
    client 4 running `attack` when there is an `attacker`."""
    env = {"DATA_DIR": data, "NUM_SHARDS": 4, "NUM_ROUNDS": 5, "MIN_AVAILABLE_CLIENTS": 4, "MIN_FIT_CLIENTS": 4,
           "MIN_EVALUATE_CLIENTS": 4, "RESULTS_DIR": place / "results", "START_TIMEOUT": 120,
           "ROUND_TIMEOUT": 120, **settings}  # fmt: skip
    with LocalFederation(env, cwd=place) as federation:
        federation.start_server()
        for i in range(4):
            federation.start_client(i + 1, args=attack if attacker and i == 3 else CLIENT, SHARD_ID=i)
        code = federation.wait(timeout=600, client_grace=60)
        output = federation.server.output if federation.server else ""
    model = place / "results" / "final_model.npz"
    if not model.is_file():
        return code, output, None
    predicted = run_cli(["predict", "--test-split", "--json", "--model", str(model), "--data-dir", str(data)], place)
    return code, output, float(json.loads(predicted.stdout)["accuracy"])


@pytest.fixture(scope="module")
def honest(four_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> float:
    code, output, accuracy = run(four_shards, tmp_path_factory.mktemp("honest"), attacker=False)
    assert code == 0, output
    assert "refused" not in output  # the new bounds refuse no honest update
    assert accuracy is not None
    return accuracy


@pytest.mark.parametrize("mode", [{}, {"MODE": "async", "BUFFER_SIZE": "3"}], ids=["sync", "async"])
def test_a_boosted_update_under_the_old_bound_is_refused_and_the_model_stays_sound(
    four_shards: Path, honest: float, tmp_path: Path, mode: dict[str, str]
) -> None:
    code, output, accuracy = run(four_shards, tmp_path, True, **mode)
    assert "the automatic UPDATE_NORM_LIMIT" in output or "UPDATE_NORM_LIMIT empty" in output, output
    assert code == 0, output
    # The honest run is synchronous; an async run's result depends on the order updates arrive in
    # (a point or two between runs, more on a loaded machine), so it gets a wider margin. The
    # wrecked model this guards against scored 0.02-0.09.
    margin = 0.03 if not mode else 0.08
    assert accuracy is not None and accuracy >= honest - margin, (accuracy, honest)


# Async: roll-backs cost versions (each is a failed one), so the run gets twice as many.
ASYNC_LONGER = {"MODE": "async", "BUFFER_SIZE": "3", "NUM_ROUNDS": "10"}


@pytest.mark.parametrize("mode", [{}, ASYNC_LONGER], ids=["sync", "async"])
def test_with_the_old_fixed_bound_the_wrecked_model_is_rolled_back_or_the_run_fails(
    four_shards: Path, honest: float, tmp_path: Path, mode: dict[str, str]
) -> None:
    """The operator's override (the old bound, no median bound): the attacker's update gets in,
    but the unusable model is rolled back, and a run that never recovers does not exit 0. In
    async mode the attacker's own finite updates on the wrecked model once vouched for it (every
    other update was NaN): the model stayed wrecked (0.056) and the run exited 0."""
    settings = {"UPDATE_NORM_LIMIT": "1000", "UPDATE_NORM_MEDIAN_MULTIPLE": "0", **mode}
    code, output, accuracy = run(four_shards, tmp_path, True, **settings)
    assert "the global model is unusable" in output and "rolled back to that of" in output, output
    if code == 0 and not mode:
        assert accuracy is not None and accuracy >= honest - 0.03, (accuracy, honest)
    elif code == 0:
        # The attacker strikes every version it trains, and in async mode its update gets in
        # whenever it lands in a buffer: each time a version is rolled back, so fewer train.
        # A sound model, not the honest run's: the wrecked ones scored 0.05-0.16.
        assert accuracy is not None and accuracy >= 0.6, (accuracy, honest, output)
    else:
        assert code == 7, output
        assert "the run FAILED" in output


def test_a_backdoor_boosted_only_up_to_the_median_bound_gets_past_it(four_shards: Path, tmp_path: Path) -> None:
    """The benchmark's bounded backdoor, an attacker who knows UPDATE_NORM_MEDIAN_MULTIPLE as
    shipped (4): model replacement's full boost (gamma = n = 4) is refused every round; stretched
    to 4 / 2 x its own honest update's norm, the same backdoor is let through (measured: 5
    refusals against 0)."""
    backdoor = ["-m", "bench.attacker", "--attack", "backdoor"]
    (tmp_path / "full").mkdir(), (tmp_path / "bounded").mkdir()
    _, full, _ = run(four_shards, tmp_path / "full", True, backdoor)
    _, bounded, _ = run(four_shards, tmp_path / "bounded", True, [*backdoor, "--under-median", "4"])
    refused = "more than UPDATE_NORM_MEDIAN_MULTIPLE"
    assert full.count(refused) == 5, full
    assert bounded.count(refused) <= 1, bounded
