"""The built-in task's CNN adapts to each data set's shape; parameters round-trip through get/set."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client.app import FlowerpotClient
from client.data.images import ImageSpec
from client.data.shards import load_shard, shard_dirs
from client.tasks import get_weights, load_task, set_weights
from shared.errors import BadInput
from shared.settings import Settings

BUILTIN = load_task()


def build_model(spec: ImageSpec, seed: int) -> torch.nn.Module:
    return BUILTIN.new_model(spec, seed)


SPECS = {
    "digits": ImageSpec("digits", 1, 8, 8, tuple("0123456789"), (0.3,), (0.4,)),
    "mnist": ImageSpec("mnist", 1, 28, 28, tuple("0123456789"), (0.1,), (0.3,)),
    "cifar10": ImageSpec("cifar10", 3, 32, 32, tuple("abcdefghij"), (0.5,) * 3, (0.25,) * 3),
    "folder": ImageSpec("folder", 3, 20, 20, ("cats", "dogs", "fish"), (0.5,) * 3, (0.25,) * 3),
}


@pytest.mark.parametrize("name", SPECS)
def test_model_fits_the_data_set_shape(name: str) -> None:
    spec = SPECS[name]
    logits = build_model(spec, seed=0)(torch.zeros(5, *spec.shape))
    assert logits.shape == (5, spec.num_classes)


def test_same_seed_same_initial_model() -> None:
    a, b, c = (get_weights(build_model(SPECS["digits"], seed=s)) for s in (1, 1, 2))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c))


def test_parameters_round_trip_through_the_numpy_client(data_dir) -> None:
    shard = load_shard(shard_dirs(data_dir)[0])
    settings = Settings(seed=3)
    sender, receiver = FlowerpotClient(shard, settings, data_dir), FlowerpotClient(shard, Settings(seed=4), data_dir)
    weights = sender.get_parameters({})
    assert all(w.dtype == np.float32 for w in weights)
    receiver.set_parameters(weights)
    assert all(np.array_equal(x, y) for x, y in zip(weights, receiver.get_parameters({})))
    updated, examples, metrics = receiver.fit(weights, {"local_epochs": 1, "server_round": 1})
    assert examples == len(shard.y_train) and metrics["train_loss"] > 0
    assert not all(np.array_equal(x, y) for x, y in zip(weights, updated))


def test_wrong_parameters_are_a_clear_error(data_dir) -> None:
    client = FlowerpotClient(load_shard(shard_dirs(data_dir)[0]), Settings(), data_dir)
    weights = client.get_parameters({})
    with pytest.raises(
        BadInput, match=r"does not fit this client.s TASK=builtin on data set digits .*same TASK and DATASET"
    ):
        client.set_parameters(weights[:-1])
    with pytest.raises(BadInput, match="has shape"):
        client.set_parameters([np.zeros((2, 2), np.float32), *weights[1:]])
    with pytest.raises(ValueError, match="got 1 arrays"):
        set_weights(build_model(SPECS["digits"], 0), weights[:1])


def test_fedprox_reports_the_data_loss_and_its_proximal_term_apart() -> None:
    """One full batch, two epochs: the loss is the mean cross-entropy at w0 and w1, the proximal
    term (mu/2)·||w1 - w0||² is reported on its own (before, it was added into the loss)."""
    import torch.nn.functional as F

    from client.tasks import to_input, train_arrays

    def train(model: torch.nn.Module, *args: object, lr: float, **kwargs: object) -> dict[str, float]:
        return train_arrays(BUILTIN, model, *args, lr=lr, **kwargs)  # type: ignore[arg-type]

    spec, rng = SPECS["digits"], np.random.default_rng(0)
    x, y = rng.integers(0, 256, (64, 1, 8, 8), dtype=np.uint8), rng.integers(0, 10, 64)
    mu, knobs = 10.0, {"batch_size": 64, "lr": 0.5, "seed": 1}
    outcome = train(build_model(spec, seed=3), x, y, spec, epochs=2, proximal_mu=mu, **knobs)

    model = build_model(spec, seed=3)
    w0 = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        ce0 = F.cross_entropy(model(to_input(x, spec)), torch.from_numpy(y)).item()
    train(model, x, y, spec, epochs=1, proximal_mu=mu, **knobs)
    with torch.no_grad():
        ce1 = F.cross_entropy(model(to_input(x, spec)), torch.from_numpy(y)).item()
        drift = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), w0)).item()
    assert drift > 0
    assert outcome["loss"] == pytest.approx((ce0 + ce1) / 2, rel=1e-4)
    assert outcome["proximal_term"] == pytest.approx(0.5 * mu * drift / 2, rel=1e-3)
    assert "proximal_term" not in train(build_model(spec, seed=3), x, y, spec, epochs=2, **knobs)
