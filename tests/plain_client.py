"""A plain Flower NumPyClient with nothing of Flowerpot's (any model: here one weight matrix),
for the tests that show which servers such a client can join.

    python tests/plain_client.py ADDRESS [--ca CA_PEM] [--odd-metrics] [--boost-from ROUND]

--ca trusts a TLS server's CA (Flower's start_client presents no client certificate);
--odd-metrics reports metrics the server does not know; --boost-from makes it an attacker of
any model: until that round it sends the global model back unchanged, from it the global model
plus a random direction of L2 norm --boost-norm (950: under the old fixed bound of 1000).
"""

import argparse
from pathlib import Path

import numpy as np
from flwr.compat.client.app import start_client
from flwr.compat.client.numpy_client import NumPyClient

ODD_FIT_METRICS = {"favourite_colour": "green", "steps": 3, "blob": b"x"}
ODD_EVALUATE_METRICS = {"weird": "yes"}


class Plain(NumPyClient):
    def __init__(self, odd_metrics: bool, boost_from: int | None = None, boost_norm: float = 950.0) -> None:
        self.odd, self.boost_from, self.boost_norm = odd_metrics, boost_from, boost_norm
        self.fits = 0
        self.random = np.random.default_rng(0)

    def get_parameters(self, config):
        return [np.ones((4, 3), np.float32)]

    def fit(self, parameters, config):
        self.fits += 1
        if self.boost_from is None:
            return [parameters[0] * 0.5], 7, dict(ODD_FIT_METRICS) if self.odd else {}
        if int(config.get("server_round", self.fits)) < self.boost_from:
            return parameters, 100, {}
        directions = [self.random.standard_normal(p.shape) for p in parameters]
        scale = self.boost_norm / np.sqrt(sum(float((d**2).sum()) for d in directions))
        return [(p + scale * d).astype(p.dtype) for p, d in zip(parameters, directions)], 100, {}

    def evaluate(self, parameters, config):
        return float(parameters[0].mean()), 5, {"accuracy": 0.5, **(ODD_EVALUATE_METRICS if self.odd else {})}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("address")
    parser.add_argument("--ca", type=Path, default=None)
    parser.add_argument("--odd-metrics", action="store_true")
    parser.add_argument("--boost-from", type=int, default=None)
    parser.add_argument("--boost-norm", type=float, default=950.0)
    args = parser.parse_args()
    roots = args.ca.read_bytes() if args.ca else None
    client = Plain(args.odd_metrics, args.boost_from, args.boost_norm).to_client()
    start_client(server_address=args.address, client=client, root_certificates=roots)
