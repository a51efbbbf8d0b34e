"""A plain Flower NumPyClient with nothing of Flowerpot's (any model: here one weight matrix),
for the tests that show which servers such a client can join.

    python tests/plain_client.py ADDRESS [--ca CA_PEM] [--odd-metrics]

--ca trusts a TLS server's CA (Flower's start_client presents no client certificate);
--odd-metrics reports metrics the server does not know.
"""

import argparse
from pathlib import Path

import numpy as np
from flwr.compat.client.app import start_client
from flwr.compat.client.numpy_client import NumPyClient

ODD_FIT_METRICS = {"favourite_colour": "green", "steps": 3, "blob": b"x"}
ODD_EVALUATE_METRICS = {"weird": "yes"}


class Plain(NumPyClient):
    def __init__(self, odd_metrics: bool) -> None:
        self.odd = odd_metrics

    def get_parameters(self, config):
        return [np.ones((4, 3), np.float32)]

    def fit(self, parameters, config):
        return [parameters[0] * 0.5], 7, dict(ODD_FIT_METRICS) if self.odd else {}

    def evaluate(self, parameters, config):
        return float(parameters[0].mean()), 5, {"accuracy": 0.5, **(ODD_EVALUATE_METRICS if self.odd else {})}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("address")
    parser.add_argument("--ca", type=Path, default=None)
    parser.add_argument("--odd-metrics", action="store_true")
    args = parser.parse_args()
    roots = args.ca.read_bytes() if args.ca else None
    start_client(server_address=args.address, client=Plain(args.odd_metrics).to_client(), root_certificates=roots)
