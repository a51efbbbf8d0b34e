"""The same local federation run by earlier commits and by this checkout, side by side: for a
refactor that must change nothing a user measures (final accuracy, seconds per round).

    python -m bench.before_after 02f87cc 7e5cd1f --seeds 1 2 3 4 5 --out /tmp/before-after

Each commit is checked out with `git worktree` and run as `flowerpot run-local` with its own code
(PYTHONPATH) in the same virtual environment, the trees alternating seed by seed so that the
machine's load falls on all of them alike. The settings are given explicitly (an empty .env), so
that a default changed between the commits does not count as a difference. Prints a Markdown
table; nothing else heavy may run meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
SETTINGS = {"NUM_ROUNDS": "5", "LOCAL_EPOCHS": "3", "NUM_SHARDS": "3", "STRATEGY": "fedavg", "METRICS_PORT": "0"}


def worktree(ref: str, root: Path) -> Path:
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", ref], capture_output=True, text=True)
    if commit.returncode != 0:
        sys.exit(f"before_after: error: {ref} is not a commit of {REPO}: give a commit, a tag or a branch")
    tree = root / f"tree-{commit.stdout.strip()}"
    if not tree.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), ref], check=True,
                       capture_output=True)  # fmt: skip
    return tree


def run(tree: Path, seed: int, place: Path) -> dict[str, Any]:
    place.mkdir(parents=True)
    (place / ".env").write_text("")
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), "PYTHONPATH": str(tree)}
    env.update(SETTINGS, SEED=str(seed))
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "flowerpot", "run-local"], cwd=place, env=env, capture_output=True,
                          text=True, timeout=900)  # fmt: skip
    wall = time.monotonic() - started
    (place / "run.log").write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        sys.exit(f"before_after: error: {tree.name} seed {seed} exited {done.returncode}: see {place / 'run.log'}")
    rounds = json.loads((place / "results" / "history.json").read_text())
    return {
        "accuracy": rounds[-1]["eval_accuracy"],
        "round_s": statistics.median(r["seconds"] for r in rounds[1:]),  # the first round warms up
        "wall_s": wall,
        "model": place / "results" / "final_model.npz",
    }


def same_model(a: Path, b: Path) -> bool:
    with np.load(a) as x, np.load(b) as y:
        return x.files == y.files and all(np.array_equal(x[k], y[k]) for k in x.files)


def spread(values: list[float], digits: int) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("refs", nargs="+", help="earlier commits to run beside this checkout")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    parser.add_argument("--out", type=Path, default=Path("/tmp/before-after"))
    args = parser.parse_args(argv)
    trees = {ref: worktree(ref, args.out) for ref in args.refs}
    trees["this checkout"] = REPO
    found: dict[str, list[dict[str, Any]]] = {name: [] for name in trees}
    try:
        for seed in args.seeds:
            for name, tree in trees.items():
                found[name].append(run(tree, seed, args.out / "runs" / f"{tree.name}-{seed}"))
                print(f"{name} seed {seed}: {found[name][-1]}", file=sys.stderr)
    finally:  # the runs stay in --out; the checkouts of the commits go
        for ref in args.refs:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(trees[ref])], check=False)
    first = found[args.refs[0]]
    settings = ", ".join(f"{k}={v}" for k, v in SETTINGS.items())
    print(f"`flowerpot run-local` ({settings}), seeds {args.seeds}; mean ± std over the seeds.\n")
    print(f"| code | final accuracy | median round s (rounds 2-N) | run wall s | final model = {args.refs[0]}'s |")
    print("|---|---|---|---|---|")
    for name, runs in found.items():
        acc, rnd, wall = ([r[k] for r in runs] for k in ("accuracy", "round_s", "wall_s"))
        same = sum(same_model(r["model"], f["model"]) for r, f in zip(runs, first))
        print(f"| {name} | {spread(acc, 4)} | {spread(rnd, 3)} | {spread(wall, 1)} | {same} of {len(runs)} seeds |")
    for name, runs in found.items():
        print(f"\n{name}, per seed: " + ", ".join(f"{r['accuracy']:.4f}" for r in runs))


if __name__ == "__main__":
    main()
