"""An attacking client, for the benchmark's robustness section and the tests; never shipped in the
client image's normal path (`flowerpot client` does not know it).

    python -m bench.attacker --attack signflip [--scale 10]   # sends global - scale * (its update)
    python -m bench.attacker --attack gaussian [--sigma 200]  # sends global + N(0, sigma^2) noise
    python -m bench.attacker --attack labelflip               # trains honestly on labels C-1-y
    python -m bench.attacker --attack labelflip --boost-norm 950  # ... its update stretched to L2 norm 950

It is the Flowerpot client (same settings, shard claim, connection, evaluation) with one change
to fit, as the literature defines the attacks, not tuned to make any row look good:
- sign flipping, scaled: the update's direction reversed and multiplied by `scale`; the default
  10 is the number of clients of the benchmark, the boost that survives averaging over them
  (Bagdasaryan et al. 2020's model-replacement scaling, Bhagoji et al. 2019's boosting);
- Gaussian noise: an update drawn from N(0, sigma^2 I), sigma 200 as Blanchard et al. 2017
  (Krum's paper) use for their Gaussian Byzantine workers;
- label flipping: label y becomes C-1-y on the attacker's training data (Fang et al. 2020,
  Tolpegin et al. 2020); the attacker's evaluation stays honest.

--boost-norm N (any attack) stretches or shrinks what the attacker sends so that it lies at L2
distance N from the global model: the model-replacement boost (Bagdasaryan et al. 2020) aimed
just under a fixed norm bound, as an attacker who knows the bound would.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

ATTACKS = ("signflip", "gaussian", "labelflip")


def attacked_update(
    attack: str, global_arrays: list[np.ndarray], trained: list[np.ndarray], scale: float, sigma: float, seed: int
) -> list[np.ndarray]:
    """What the attacker sends instead of `trained` (the honest result of local training)."""
    if attack == "signflip":
        return [(g - scale * (t - g)).astype(t.dtype) for g, t in zip(global_arrays, trained)]
    if attack == "gaussian":
        rng = np.random.default_rng(seed)
        return [(g + rng.normal(0.0, sigma, g.shape)).astype(g.dtype) for g in global_arrays]
    return trained  # labelflip poisons the data, not the update


def boosted(global_arrays: list[np.ndarray], sent: list[np.ndarray], norm: float) -> list[np.ndarray]:
    """`sent` moved along its own direction from the global model to L2 distance `norm`."""
    delta = [s.astype(np.float64) - g for g, s in zip(global_arrays, sent)]
    length = float(np.sqrt(sum(np.square(d).sum() for d in delta)))
    factor = norm / length if length > 0 else 0.0
    return [(g + factor * d).astype(s.dtype) for g, s, d in zip(global_arrays, sent, delta)]


def flipped_labels(y: np.ndarray, num_classes: int) -> np.ndarray:
    return (num_classes - 1 - y).astype(y.dtype)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.attacker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--attack", choices=ATTACKS, required=True)
    parser.add_argument("--scale", type=float, default=10.0, help="signflip: the update's multiplier (default 10)")
    parser.add_argument("--sigma", type=float, default=200.0, help="gaussian: the noise's std (default 200)")
    parser.add_argument("--boost-norm", type=float, default=0.0, help="send at this L2 distance (default 0: as is)")
    args = parser.parse_args(argv)
    from shared.logs import prepare_flower_environment

    prepare_flower_environment()  # before flwr is imported
    from client import app
    from shared import protocol
    from shared.errors import FlowerpotError
    from shared.logs import setup_logging
    from shared.settings import Settings

    class AttackingClient(app.FlowerpotClient):
        def __init__(self, shard, settings: Settings, model_dir: Path, task=None) -> None:  # type: ignore[no-untyped-def]
            if args.attack == "labelflip":
                shard = dataclasses.replace(shard, y_train=flipped_labels(shard.y_train, shard.spec.num_classes))
            super().__init__(shard, settings, model_dir, task)  # the run's task, attacked like any other

        def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list[np.ndarray], int, dict]:
            trained, examples, metrics = super().fit(parameters, config)
            seed = self.settings.seed * 100_003 + int(config.get(protocol.SERVER_ROUND, 0))
            sent = attacked_update(args.attack, parameters, trained, args.scale, args.sigma, seed)
            if args.boost_norm > 0:
                sent = boosted(parameters, sent, args.boost_norm)
            return sent, examples, metrics

    try:
        settings = Settings.load(Path(".env") if Path(".env").is_file() else None)
        setup_logging(settings.log_level)
        # run_client builds app.FlowerpotClient: pointing the name at the attacker reuses the whole
        # client (claim, connection, evaluation) without a hook in the shipped code.
        app.FlowerpotClient = AttackingClient  # type: ignore[misc]
        app.run_client(settings)
    except FlowerpotError as exc:
        print(f"bench.attacker: error: {exc}", file=sys.stderr)
        return exc.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
