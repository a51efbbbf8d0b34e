"""A client that trains nothing, so that a round is pure framework time.

The equivalent of the NumPyClient of Flower's end-to-end tests (framework/e2e/e2e-bare in
Flower's repository, which is not in the flwr wheel): it sends back the parameters it got,
rescaled, and evaluates by comparing their mean with an objective. Its arrays have the shapes of
Flowerpot's CNN for the digits data set, so the messages have the real model's size. It connects
with flwr's own client API, so it joins Flowerpot's server and bare Flower's alike.
Run as `python -m bench.trivial_client`; it dials SERVER_ADDRESS.
"""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

import numpy as np
from flwr.compat.client.app import start_client
from flwr.compat.client.numpy_client import NumPyClient

# client/tasks/builtin.py's Net for 8x8 grayscale digits, 10 classes: conv 1->32, conv 32->64, 256->128->10.
SHAPES = [(32, 1, 3, 3), (32,), (64, 32, 3, 3), (64,), (128, 256), (128,), (10, 128), (10,)]
OBJECTIVE = 5.0


class TrivialClient(NumPyClient):
    def __init__(self) -> None:
        self.parameters = [np.ones(shape, dtype=np.float32) for shape in SHAPES]

    def get_parameters(self, config: dict) -> list[np.ndarray]:
        return self.parameters

    def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list[np.ndarray], int, dict]:
        self.parameters = [(p * (OBJECTIVE / np.mean(p))).astype(np.float32) for p in parameters]
        return self.parameters, 1, {}

    def evaluate(self, parameters: list[np.ndarray], config: dict) -> tuple[float, int, dict]:
        loss = float(min(abs(1 - np.mean([np.mean(p) for p in parameters]) / OBJECTIVE), 1.0))
        return loss, 1, {"accuracy": 1.0 - loss}


def main() -> None:
    start_client(server_address=os.environ["SERVER_ADDRESS"], client=TrivialClient().to_client(), insecure=True)


if __name__ == "__main__":
    main()
