"""An attacking client, for the benchmark's robustness section and the tests; never shipped in the
client image's normal path (`flowerpot client` does not know it).

    python -m bench.attacker --attack signflip [--scale 10]   # sends global - scale * (its update)
    python -m bench.attacker --attack gaussian [--sigma S]    # sends global + N(0, S^2) noise
    python -m bench.attacker --attack labelflip               # trains honestly on labels C-1-y
    python -m bench.attacker --attack alie --collude DIR --colluders 2
    python -m bench.attacker --attack ipm --collude DIR --colluders 2 [--epsilon 0.1]
    python -m bench.attacker --attack minmax|minsum --collude DIR --colluders 2
    python -m bench.attacker --attack backdoor [--scale N] [--target 0] [--under-median M]

It is the Flowerpot client (same settings, shard claim, connection, evaluation) with one change
to fit, each attack as its paper defines it, not tuned to make any row look good. An update is
the difference between what a client sends and the global model it was given.
- sign flipping, scaled: the update's direction reversed and multiplied by `scale`; the default
  10 is the number of clients of the benchmark (Bhagoji et al. 2019's boosting);
- Gaussian noise: the global model plus N(0, sigma^2 I) (Blanchard et al. 2017); by default sigma
  is matched to the attacker's own honest update, sigma = ||update|| / sqrt(d), so that the noise
  has an honest update's norm and a norm bound cannot tell it apart;
- label flipping: label y becomes C-1-y on the attacker's training data (Fang et al. 2020,
  Tolpegin et al. 2020); the attacker's evaluation stays honest;
- ALIE, "A Little Is Enough" (Baruch et al. 2019): every attacker sends mu - z_max * sigma, the
  coordinate-wise mean and standard deviation of the benign updates moved by z_max =
  Phi^-1((n - s) / n), s = floor(n / 2 + 1) - f, for n clients of which f attack;
- IPM, inner-product manipulation (Xie et al. 2020): every attacker sends -epsilon * mu (0.1, the
  paper's value against median- and Krum-like rules);
- min-max and min-sum (Shejwalkar and Houmansadr 2021, AGR-agnostic): mu + gamma * p with p the
  perturbation (-sigma by default; -mu / ||mu|| or -sign(mu)) and gamma the largest value (their
  search: start at 10, halve the step, to 1e-5) such that the malicious update's largest distance
  to a benign one (min-max), or its sum of squared distances to them (min-sum), is at most the
  largest such value among the benign updates themselves;
- backdoor, model replacement (Bagdasaryan et al. 2020): the attacker trains on its data plus a
  copy of every image not of the target class with a trigger (a bright 2 x 2 patch in the
  bottom-right corner) relabelled as the target class, and sends G + gamma * (L - G), gamma = n /
  eta (FedAvg's server learning rate eta is 1: gamma = n, the number of clients), so that its
  model replaces the average. `--scale` sets gamma otherwise: k attackers sharing the
  replacement use n / k each (the benchmark does), one who knows a norm bound stays under it:
  with `--under-median M` (the server's UPDATE_NORM_MEDIAN_MULTIPLE) the attacker also trains
  honestly from the same global model, and sends its backdoored update stretched to M / 2 x that
  honest update's norm: under the median bound with a margin, since its own honest norm can be
  twice the round's median late in training (0.9 x M was refused in 2 of 5 rounds). This is
  Bagdasaryan et al.'s constrain-and-scale, the constraint being the defence's bound;
  Its success is the attack success rate: the share of triggered test images not of the target
  class that the final model puts in the target class.

ALIE, IPM, min-max and min-sum need the benign updates' statistics. As in the papers'
partial-knowledge setting, the attackers collude and use their own honest updates: each trains
honestly, leaves its update in `--collude DIR` and waits (at most 60 s) for the other
`--colluders` of the round before computing the attack; all of them send the same update.

--boost-norm N (any attack) stretches or shrinks what the attacker sends so that it lies at L2
distance N from the global model: the model-replacement boost aimed just under a fixed norm bound.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ATTACKS = ("signflip", "gaussian", "labelflip", "alie", "ipm", "minmax", "minsum", "backdoor")
COLLUDING = ("alie", "ipm", "minmax", "minsum")  # the attacks that need the benign statistics
PERTURBATIONS = ("std", "unit", "sign")
TRIGGER = 2  # the trigger's side in pixels, in the bottom-right corner


def flat(arrays: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([a.astype(np.float64).ravel() for a in arrays])


def unflat(vector: np.ndarray, like: list[np.ndarray]) -> list[np.ndarray]:
    sizes = np.cumsum([a.size for a in like])[:-1]
    return [part.reshape(a.shape).astype(a.dtype) for part, a in zip(np.split(vector, sizes), like)]


def alie_z(clients: int, attackers: int) -> float:
    """ALIE's z_max for n clients of which f attack (Baruch et al. 2019, section 4)."""
    s = clients // 2 + 1 - attackers
    return statistics.NormalDist().inv_cdf((clients - s) / clients)


def alie(benign: np.ndarray, clients: int, attackers: int) -> np.ndarray:
    return benign.mean(0) - alie_z(clients, attackers) * benign.std(0)


def ipm(benign: np.ndarray, epsilon: float) -> np.ndarray:
    return -epsilon * benign.mean(0)


def perturbation(benign: np.ndarray, kind: str) -> np.ndarray:
    mu = benign.mean(0)
    if kind == "std":
        return -benign.std(0)
    if kind == "unit":
        return -mu / max(float(np.linalg.norm(mu)), 1e-12)
    return -np.sign(mu)


def min_max_or_sum(benign: np.ndarray, kind: str, rule: str) -> np.ndarray:
    """Shejwalkar and Houmansadr's AGR-agnostic min-max (`rule` "minmax") or min-sum attack on the
    benign updates `benign` (k, d): mu + gamma * p, gamma found by their halving search."""
    mu, p = benign.mean(0), perturbation(benign, kind)
    pairwise = np.linalg.norm(benign[:, None, :] - benign[None, :, :], axis=2)
    if rule == "minmax":
        limit = float(pairwise.max())

        def score(m: np.ndarray) -> float:
            return float(np.linalg.norm(benign - m, axis=1).max())
    else:
        limit = float(np.square(pairwise).sum(1).max())

        def score(m: np.ndarray) -> float:
            return float(np.square(np.linalg.norm(benign - m, axis=1)).sum())

    gamma, step, best = 10.0, 5.0, 0.0
    while step > 1e-5:  # their threshold_diff
        if score(mu + gamma * p) <= limit:
            best = gamma
            gamma += step
        else:
            gamma -= step
        step /= 2
    return mu + best * p


def with_trigger(x: np.ndarray) -> np.ndarray:
    """uint8 images (N, C, H, W) with the backdoor's trigger: the bottom-right patch at full brightness."""
    out = x.copy()
    out[:, :, -TRIGGER:, -TRIGGER:] = 255
    return out


def backdoor_data(x: np.ndarray, y: np.ndarray, target: int) -> tuple[np.ndarray, np.ndarray]:
    """The attacker's training data: its own, and a triggered copy of every image not of `target`
    labelled `target` (the main task stays learnt, so that the update looks like an honest one)."""
    others = y != target
    return np.concatenate([x, with_trigger(x[others])]), np.concatenate(
        [y, np.full(int(others.sum()), target, y.dtype)]
    )


def attack_success_rate(predict: object, x_test: np.ndarray, y_test: np.ndarray, target: int) -> tuple[int, int]:
    """(triggered test images put in `target`, triggered test images not of `target`), by
    `predict` (uint8 images -> predicted classes)."""
    others = y_test != target
    predicted = predict(with_trigger(x_test[others]))  # type: ignore[operator]
    return int((np.asarray(predicted) == target).sum()), int(others.sum())


def attacked_update(
    attack: str, global_arrays: list[np.ndarray], trained: list[np.ndarray], scale: float, sigma: float, seed: int
) -> list[np.ndarray]:
    """What a non-colluding attacker sends instead of `trained` (its own local training's result);
    `sigma` 0 is the Gaussian attack's matched sigma."""
    if attack == "signflip":
        return [(g - scale * (t - g)).astype(t.dtype) for g, t in zip(global_arrays, trained)]
    if attack == "gaussian":
        delta = flat(trained) - flat(global_arrays)
        sigma = sigma or float(np.linalg.norm(delta)) / np.sqrt(delta.size)
        rng = np.random.default_rng(seed)
        return [(g + rng.normal(0.0, sigma, g.shape)).astype(g.dtype) for g in global_arrays]
    if attack == "backdoor":
        return [(g + scale * (t - g)).astype(t.dtype) for g, t in zip(global_arrays, trained)]
    return trained  # labelflip poisons the data, not the update


def colluded_update(attack: str, benign: np.ndarray, clients: int, epsilon: float, kind: str) -> np.ndarray:
    """The malicious update every colluding attacker sends, from the colluders' benign updates."""
    if attack == "alie":
        return alie(benign, clients, len(benign))
    if attack == "ipm":
        return ipm(benign, epsilon)
    return min_max_or_sum(benign, kind, attack)


class Collusion:
    """The colluding attackers' shared folder: each leaves its honest update of a round there and
    reads every colluder's, waiting at most `timeout` seconds for them."""

    def __init__(self, folder: Path, members: int, timeout: float = 60.0) -> None:
        self.folder, self.members, self.timeout = folder, members, timeout
        folder.mkdir(parents=True, exist_ok=True)

    def share(self, round_: int, me: str, update: np.ndarray) -> np.ndarray:
        tmp = self.folder / f".{round_}-{me}.npy"
        np.save(tmp, update)
        tmp.rename(self.folder / f"{round_}-{me}.npy")  # whole files only: readers never see half of one
        deadline = time.monotonic() + self.timeout
        while True:
            found = sorted(self.folder.glob(f"{round_}-*.npy"))
            if len(found) >= self.members or time.monotonic() > deadline:
                return np.stack([np.load(f) for f in found])
            time.sleep(0.02)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.attacker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--attack", choices=ATTACKS, required=True)
    scale = "signflip: the multiplier (default 10); backdoor: gamma (default: MIN_FIT_CLIENTS)"
    parser.add_argument("--scale", type=float, default=0.0, help=scale)
    parser.add_argument("--sigma", type=float, default=0.0, help="gaussian: the noise's std (default 0: matched)")
    parser.add_argument("--epsilon", type=float, default=0.1, help="ipm: the multiplier of -mu (default 0.1)")
    parser.add_argument("--perturbation", choices=PERTURBATIONS, default="std", help="minmax, minsum (default std)")
    parser.add_argument("--collude", type=Path, help="alie, ipm, minmax, minsum: the colluders' shared folder")
    parser.add_argument("--colluders", type=int, default=0, help="how many attackers collude")
    parser.add_argument("--target", type=int, default=0, help="backdoor: the target class (default 0)")
    parser.add_argument("--boost-norm", type=float, default=0.0, help="send at this L2 distance (default 0: as is)")
    under = "backdoor: boost to half this multiple of its honest norm (default 0: unbounded)"
    parser.add_argument("--under-median", type=float, default=0.0, help=under)
    args = parser.parse_args(argv)
    if args.attack in COLLUDING and (args.collude is None or args.colluders < 1):
        parser.error(f"--attack {args.attack} needs --collude DIR and --colluders N (the attackers of the run)")
    from shared.logs import prepare_flower_environment

    prepare_flower_environment()  # before flwr is imported
    from client import app
    from shared import protocol
    from shared.errors import FlowerpotError
    from shared.logs import setup_logging
    from shared.settings import Settings

    collusion = Collusion(args.collude, args.colluders) if args.attack in COLLUDING else None

    class AttackingClient(app.FlowerpotClient):
        def __init__(
            self, shard: Any, settings: Settings, model_dir: Path | None, task: Any = None, slot: Any = None
        ) -> None:
            if args.attack == "labelflip":
                shard = dataclasses.replace(shard, y_train=flipped_labels(shard.y_train, shard.spec.num_classes))
            self.claimed = len(shard.y_train)  # the count it reports: its shard's, as an honest client's
            self.clean = shard
            if args.attack == "backdoor":
                x, y = backdoor_data(shard.x_train, shard.y_train, args.target)
                shard = dataclasses.replace(shard, x_train=x, y_train=y)
            super().__init__(shard, settings, model_dir, task, slot)  # the run's task, attacked like any other

        def fit(self, parameters: list[np.ndarray], config: dict) -> tuple[list[np.ndarray], int, dict]:
            trained, _, metrics = super().fit(parameters, config)
            server_round = int(config.get(protocol.SERVER_ROUND, 0))
            seed = self.settings.seed * 100_003 + server_round
            if collusion is not None:
                start = flat(parameters)
                own = flat(trained) - start
                benign = collusion.share(server_round, self.shard.name, own)
                malicious = colluded_update(args.attack, benign, self.settings.min_fit_clients, args.epsilon,
                                            args.perturbation)  # fmt: skip
                sent = unflat(start + malicious, parameters)
            else:
                default = 10.0 if args.attack == "signflip" else float(self.settings.min_fit_clients)
                sent = attacked_update(args.attack, parameters, trained, args.scale or default, args.sigma, seed)
            if args.boost_norm > 0:
                sent = boosted(parameters, sent, args.boost_norm)
            if args.attack == "backdoor" and args.under_median > 0:
                trained = [t.copy() for t in trained]  # the honest fit below reuses the model
                sent = boosted(parameters, trained, 0.5 * args.under_median * self.honest_norm(parameters, config))
            return sent, self.claimed, metrics

        def honest_norm(self, parameters: list[np.ndarray], config: dict) -> float:
            """The L2 norm of the update an honest fit on the attacker's own clean shard would send."""
            poisoned, self.shard = self.shard, self.clean
            try:
                honest, _, _ = super().fit(parameters, config)
            finally:
                self.shard = poisoned
            return float(np.linalg.norm(flat(honest) - flat(parameters)))

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


def boosted(global_arrays: list[np.ndarray], sent: list[np.ndarray], norm: float) -> list[np.ndarray]:
    """`sent` moved along its own direction from the global model to L2 distance `norm`."""
    delta = [s.astype(np.float64) - g for g, s in zip(global_arrays, sent)]
    length = float(np.sqrt(sum(np.square(d).sum() for d in delta)))
    factor = norm / length if length > 0 else 0.0
    return [(g + factor * d).astype(s.dtype) for g, s, d in zip(global_arrays, sent, delta)]


def flipped_labels(y: np.ndarray, num_classes: int) -> np.ndarray:
    return (num_classes - 1 - y).astype(y.dtype)


if __name__ == "__main__":
    sys.exit(main())
