"""What a Flowerpot client and server exchange besides the model: the gRPC metadata a client
joins with, the fit and evaluate config the server sends, and the metrics a client reports.
Both sides read every key from here, so a key is spelled once.

VERSION is the protocol's: bump it whenever the join metadata, the fit config or the server's
final instruction changes (a key added, removed, or its meaning changed). A server refuses a
client of another protocol version, naming both versions, before it trains.
"""

from __future__ import annotations

import json
import re
from typing import Any

VERSION = 5  # 1: no "protocol" key; 2: no task in the input; 3: the task (name, layout, METRICS);
# 4: the server tells its clients that a run completed (RUN_COMPLETED); 5: secure aggregation's stages
# Flowerpot's version (pyproject.toml's, a test keeps them equal): named in a refusal, so that the
# operator knows which side to update.
FLOWERPOT_VERSION = "0.1.0"

# In every refusal or failed answer whose numbers are not finite: the server rolls back on it.
NOT_FINITE = "NaN or Inf"

# The task TASK= (empty) runs, client/tasks/builtin.py: its name, as joins, model files and refusals spell it.
BUILTIN_TASK = "builtin"

CLIENT_NAME_KEY = "flowerpot-client"  # the name the client gives itself (a certificate's name wins)
# What the server checks before a client trains: one JSON object, ASCII-escaped (gRPC metadata
# values are ASCII) with the keys of `join_value`. A plain Flower client sends none of it.
JOIN_KEY = "flowerpot-join"

# The fit config (sync rounds and async versions; the evaluate config has the first two).
SERVER_ROUND = "server_round"  # the round (async: the version) the answer is for
NUM_ROUNDS = "num_rounds"  # the client keeps the model it evaluates when SERVER_ROUND is NUM_ROUNDS
LOCAL_EPOCHS = "local_epochs"
BATCH_SIZE = "batch_size"
LEARNING_RATE = "learning_rate"
PROXIMAL_MU = "proximal_mu"  # FedProx's mu; async mode sends it (Flower's FedProx adds it in sync)
MODEL_VERSION = "model_version"  # async: the version the client trains on (or evaluates)
FIT_ID = "fit_id"  # async: a number per fit, which seeds the client's shuffling

# The server's final instruction of a run that completed: a get_properties whose config holds
# RUN_COMPLETED (a plain Flower client answers it with no properties). A Flowerpot client that
# is told to leave without it knows that the run failed, and exits with RUN_INCOMPLETE.
RUN_COMPLETED = "flowerpot_run_completed"

# Secure aggregation (SECURE_AGGREGATION, shared/secure_aggregation.py): a round's four stages.
# ADVERTISE, SHARE_KEYS and UNMASK are get_properties instructions, MASKED_INPUT a fit; each
# carries SECAGG_STAGE, SECAGG_PLAN (the round's parameters, JSON) and SECAGG_ID (the client's
# number in the round, 1..n). Every other value is bytes, JSON inside.
SECAGG_STAGE = "secagg_stage"
ADVERTISE, SHARE_KEYS, MASKED_INPUT, UNMASK = "advertise", "share_keys", "masked_input", "unmask"
SECAGG_PLAN = "secagg_plan"
SECAGG_ID = "secagg_id"
SECAGG_KEYS = "secagg_keys"  # ADVERTISE's answer: this client's two public keys, signed
SECAGG_PEERS = "secagg_peers"  # SHARE_KEYS: the neighbours' advertised keys, as they advertised them
SECAGG_COMMITMENT = "secagg_commitment"  # SHARE_KEYS' answer: a hash of the self-mask seed
SECAGG_CIPHERTEXTS = "secagg_ciphertexts"  # SHARE_KEYS' answer, and MASKED_INPUT's: shares, encrypted
SECAGG_SURVIVORS = "secagg_survivors"  # UNMASK: who sent a masked input (their self-mask shares)
SECAGG_DROPPED = "secagg_dropped"  # UNMASK: who shared keys and sent none (their mask key's shares)
SECAGG_SHARES = "secagg_shares"  # UNMASK's answer
SECAGG_PROBLEM = "secagg_problem"  # any stage's answer when the client refuses it: why

# The metrics a Flowerpot client reports, with their types; the server drops any other.
RATIO, NUMBER, TEXT, NAME = "ratio", "number", "text", "name"  # a name: a short text
TRAIN_LOSS = "train_loss"
TRAIN_ACCURACY = "train_accuracy"
TRAIN_SECONDS = "train_seconds"
TRAIN_PROXIMAL_TERM = "train_proximal_term"  # FedProx's term, on its own (not in TRAIN_LOSS)
SHARD = "shard"  # the shard's name, in both phases
ACCURACY = "accuracy"
# Set by the server on an evaluation it lists but does not count (the client's update of that
# round was refused): its reason.
NOT_COUNTED = "not_counted"
EVAL_SECONDS = "eval_seconds"
# DP=record: what the shard's privacy ledger holds after the fit (client/privacy/): epsilon at
# delta, this run's mechanism (noise multiplier, clip norm, sample rate), the ledger's steps and
# the ledger itself as JSON [[noise multiplier, sample rate, steps], ...] when it fits in MAX_TEXT.
PRIVACY_EPSILON = "privacy_epsilon"
PRIVACY_DELTA = "privacy_delta"
PRIVACY_NOISE_MULTIPLIER = "privacy_noise_multiplier"
PRIVACY_CLIP_NORM = "privacy_clip_norm"
PRIVACY_SAMPLE_RATE = "privacy_sample_rate"
PRIVACY_STEPS = "privacy_steps"
PRIVACY_LEDGER = "privacy_ledger"
PRIVACY_ACCOUNTANT = "privacy_accountant"  # its name and version, e.g. "opacus 1.6.0 RDP"
PRIVACY_METRICS = {PRIVACY_EPSILON: NUMBER, PRIVACY_DELTA: NUMBER, PRIVACY_NOISE_MULTIPLIER: NUMBER,
                   PRIVACY_CLIP_NORM: NUMBER, PRIVACY_SAMPLE_RATE: RATIO, PRIVACY_STEPS: NUMBER,
                   PRIVACY_LEDGER: TEXT, PRIVACY_ACCOUNTANT: TEXT}  # fmt: skip
FIT_METRICS = {TRAIN_LOSS: NUMBER, TRAIN_ACCURACY: RATIO, TRAIN_SECONDS: NUMBER, SHARD: NAME,
               TRAIN_PROXIMAL_TERM: NUMBER, **PRIVACY_METRICS}  # fmt: skip
# LOCAL_BASELINE: in the last evaluation's config, asks for the local-only model's accuracy,
# which the client reports as LOCAL_ACCURACY.
LOCAL_BASELINE = "local_baseline"
# EVALUATE_SPLIT: in every evaluation's config, the split the clients score ("test" or
# "validation"); absent (an older server): the test split.
EVALUATE_SPLIT = "evaluate_split"
LOCAL_ACCURACY = "local_accuracy"
EVALUATE_METRICS = {ACCURACY: RATIO, EVAL_SECONDS: NUMBER, SHARD: NAME, LOCAL_ACCURACY: RATIO}

# A task's METRICS (client/tasks/): declared at join, inside the input ("metrics"), since the
# server never imports a task. Both sides check a declaration by these rules.
MAX_TASK_METRICS = 16
TASK_METRIC_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
TASK_METRIC_TYPES = (RATIO, NUMBER)  # ratio: a number in [0, 1]


def join_value(site: str, shard: str, shard_checksum: str, input_fingerprint: dict[str, Any]) -> str:
    """The JOIN_KEY value: protocol and Flowerpot versions, site, shard (name and data checksum), and what defines the
    client's input (classes, image size, channels, normalisation, and its task: name, model
    layout and METRICS)."""
    fields = {
        "protocol": VERSION,
        "version": FLOWERPOT_VERSION,
        "site": site,
        "shard": shard,
        "shard_checksum": shard_checksum,
        "input": input_fingerprint,
    }
    return json.dumps(fields, sort_keys=True)  # ASCII: json escapes everything else


def compatible(protocol: int) -> bool:
    """The same protocol version as this side."""
    return protocol == VERSION


# Every text a client sends (its name, site, shard, checksum, metric texts) reaches the server's
# log, history.json, sites.json and metric labels: it is cut to a short length and its control
# characters (newlines that would forge log lines, escapes that would drive a terminal) replaced.
# 64: the longest X.509 common name; SITE_NAME and CLIENT_NAME are held to it at the client's start.
MAX_NAME = 64
MAX_TEXT = 256  # a text metric


def clean_text(value: object, limit: int = MAX_NAME) -> str:
    """`value` as printable text of at most `limit` characters ("?" for each unprintable one)."""
    text = str(value)
    cut = text[:limit]
    return "".join(ch if ch.isprintable() else "?" for ch in cut) + ("..." if len(text) > limit else "")


def text_problem(value: str, limit: int = MAX_NAME) -> str | None:
    """Why a name a client would send is refused at its start, or None."""
    if len(value) > limit:
        return f"{len(value)} characters, more than {limit}"
    if not value.isprintable():
        return "it holds control characters"
    return None
