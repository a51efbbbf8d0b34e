"""flowerpot: federated image classification over Flower's gRPC transport.

Every setting comes from the environment (and `--env-file`, by default ./.env when present);
see README.md for the table. Exit statuses: 0 success, 2 bad setting or input, 3 no free
shard, 4 refused by the server, 5 server unreachable, 6 timed out waiting for clients, 7 (the
server) the run failed: its last rounds failed or its model is unusable, 8 (a client) the server
ended the run before it completed.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from shared.errors import BadInput, ExitCode, FlowerpotError
from shared.logs import prepare_flower_environment, setup_logging
from shared.modelfile import FINAL_MODEL, PREVIOUS
from shared.settings import Settings, check_env_keys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowerpot", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--env-file",
        type=Path,
        default=None,
        help="settings file to read under the environment (default: ./.env if present)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    prepare = sub.add_parser("prepare", help="split the data set into NUM_SHARDS client shards in DATA_DIR")
    prepare.add_argument("--force", action="store_true", help="replace shards made with other settings")

    sub.add_parser("server", help="run the federation: admit clients, play NUM_ROUNDS rounds, write RESULTS_DIR")

    client = sub.add_parser("client", help="claim a shard and train on it with the server at SERVER_ADDRESS")
    client.add_argument(
        "--restarts", type=int, default=None, help="restart a crashed client up to N times (default: CLIENT_RESTARTS)"
    )

    predict = sub.add_parser("predict", help="classify images, or the shards' test splits, with a saved model")
    predict.add_argument("images", nargs="*", type=Path, help="PNG or JPEG files to classify")
    predict.add_argument("--model", type=Path, default=None, help=f"model .npz (default: RESULTS_DIR/{FINAL_MODEL})")
    predict.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="shards to take the image spec and test splits from (default: DATA_DIR)",
    )
    predict.add_argument(
        "--test-split", action="store_true", help="classify every shard's test split and print the accuracy"
    )
    predict.add_argument(
        "--invert",
        choices=("auto", "yes", "no"),
        default="auto",
        help="invert dark-on-light pictures for bright-on-dark data sets such as digits",
    )
    predict.add_argument("--show", type=int, default=10, help="with --test-split, how many single predictions to print")
    predict.add_argument("--json", action="store_true", help="print JSON")

    init_model = sub.add_parser(
        "init-model", help="write TASK's seeded starting model for the data set in DATA_DIR, for INITIAL_MODEL"
    )
    init_model.add_argument("--out", type=Path, default=Path("initial_model.npz"), help="the .npz to write")

    certs = sub.add_parser("certs", help="create a CA, the server's certificate and client credentials in CERTS_DIR")
    certs.add_argument(
        "--client", action="append", default=[], metavar="NAME", help="issue credentials for client NAME (repeatable)"
    )
    certs.add_argument("--renew", action="store_true", help="re-issue the server's and the named clients' certificates")
    certs.add_argument(
        "--owner",
        default=None,
        metavar="UID:GID",
        help="give the server's and clients' files (never ca/) to this user, e.g. 10001:10001 for the containers",
    )
    certs.add_argument(
        "--request",
        default=None,
        metavar="NAME",
        help="at a site: make client NAME's key (kept in clients/NAME/) and a certificate request requests/NAME.csr",
    )
    certs.add_argument(
        "--sign", type=Path, default=None, metavar="FILE", help="at the CA: sign a request, write FILE's .pem beside it"
    )
    certs.add_argument(
        "--revoke",
        action="append",
        default=[],
        metavar="NAME",
        help="revoke every certificate issued to NAME (server/revoked.json; before any --renew)",
    )

    bench = sub.add_parser("bench", help="measure accuracy, overhead against bare Flower, scale and deployment cost")
    bench.add_argument(
        "--out", type=Path, default=Path("bench-results"), help="folder for results.json, report.md, plots"
    )
    bench.add_argument("--quick", action="store_true", help="a small version of every measurement (about a minute)")
    bench.add_argument("--no-compose", action="store_true", help="skip the Docker Compose measurements")
    bench.add_argument("--docs", type=Path, default=None, help="also write the report there (e.g. docs/benchmarks.md)")
    bench.add_argument(
        "--only",
        metavar="SECTION",
        default=None,
        help="run one section alone: accuracy, overhead, round-cost, scale, deployment, scale-compose, robustness, "
        "async, cross-device, cross-device-learning, privacy, client-privacy or secure-aggregation",
    )

    local = sub.add_parser("run-local", help="prepare, then run the server and N clients as local processes")
    local.add_argument("--clients", type=int, default=None, help="number of clients (default: NUM_SHARDS)")
    for action in sub._choices_actions:  # `flowerpot COMMAND --help` opens with what the command does
        command = sub.choices[action.dest]
        text = action.help or ""
        command.description = command.description or text[:1].upper() + text[1:] + "."
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prepare_flower_environment(server=args.command == "server")
    env_file = args.env_file or (Path(".env") if Path(".env").is_file() else None)
    try:
        if env_file is not None:
            env_file = usable_env_file(env_file)
        if env_file is not None:
            check_env_keys(env_file)  # before any work: a misspelt name would be ignored
        mounted = Path(os.environ.get("FLOWERPOT_CHECK_ENV_FILE", "/nonexistent"))
        if mounted.is_file():  # Compose's .env, whose keys the container sees only mixed with others
            check_env_keys(mounted, shown=".env")
    except BadInput as exc:
        print(f"flowerpot: error: {exc}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    # A stop (docker stop, Ctrl-C) ends the process through `finally` blocks: ports and claims are released.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        settings = Settings.load(env_file)
        setup_logging(settings.log_level)
        return run(args, settings, env_file)
    except FlowerpotError as exc:
        print(f"flowerpot {args.command}: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] == "bench":
            print(
                f"flowerpot {args.command}: error: the benchmark is a tool of the repository, not part of the images: "
                "run `flowerpot bench` from a checkout (pip install -r requirements-dev.txt -e .)",
                file=sys.stderr,
            )
            return ExitCode.BAD_INPUT
        if (exc.name or "").split(".")[0] not in CLIENT_SIDE:
            raise
        print(
            f"flowerpot {args.command}: error: this installation has no {exc.name} (the server image holds no "
            f"client code and no torch): run `flowerpot {args.command}` with the client image or a full install",
            file=sys.stderr,
        )
        return ExitCode.BAD_INPUT


# What only the client side installs (the client image, or a full install): commands that need it
# say so in one line where it is missing, e.g. `prepare` run with the server image.
CLIENT_SIDE = {"client", "torch", "torchvision", "sklearn", "PIL"}


def run(args: argparse.Namespace, settings: Settings, env_file: Path | None) -> int:
    if args.command == "prepare":
        from client.data.shards import prepare

        prepare(settings, force=args.force)
    elif args.command == "server":
        from server.app import run_server

        run_server(settings)
    elif args.command == "client":
        restarts = settings.client_restarts if args.restarts is None else args.restarts
        if restarts > 0:
            from client.supervise import supervise

            return supervise(_with_env_file(["client", "--restarts", "0"], env_file), restarts)
        from client.app import run_client

        run_client(settings)
    elif args.command == "predict":
        if elsewhere := os.environ.get("FLOWERPOT_PREDICT_WITH"):  # set in Compose's client service
            raise BadInput(
                f"predict: the client service starts a server and sees no files of this folder: run "
                f"`{elsewhere} IMAGE...` (or `{elsewhere} --test-split`), then `docker compose stop server`"
            )
        from client import predict
        from client.tasks import load_task

        predict.main(
            model_path=args.model or last_finished_model(settings.results_dir),
            data_dir=args.data_dir or settings.data_dir,
            images=args.images,
            test_split=args.test_split,
            invert=args.invert,
            as_json=args.json,
            show=args.show,
            task=load_task(settings.task, settings.task_dir),
            device=settings.device,
        )
    elif args.command == "init-model":
        from client.predict import write_initial_model
        from client.tasks import load_task

        print(
            write_initial_model(settings.data_dir, settings.seed, args.out, load_task(settings.task, settings.task_dir))
        )
    elif args.command == "certs":
        run_certs(args, settings)
    elif args.command == "bench":
        from bench.main import run as run_bench

        command = "flowerpot " + " ".join(sys.argv[1:])
        report = run_bench(
            args.out, quick=args.quick, compose=not args.no_compose, command=command, docs=args.docs, only=args.only
        )
        print(f"benchmark report: {report}")
    elif args.command == "run-local":
        from flowerpot.launcher import run_local

        if args.clients is not None and args.clients < 1:
            raise BadInput(f"--clients {args.clients}: run at least 1 client (default: NUM_SHARDS)")
        return run_local(settings, args.clients or settings.num_shards, env_file)
    return ExitCode.OK


def last_finished_model(results_dir: Path) -> Path:
    """RESULTS_DIR's final model; while a later run goes on (it moved the finished one aside),
    the newest in RESULTS_DIR/previous/."""
    current = results_dir / FINAL_MODEL
    earlier = sorted((results_dir / PREVIOUS).glob(f"*/{FINAL_MODEL}"))
    if current.is_file() or not earlier:
        return current  # when missing, predict says so with this path
    print(f"predict: the model of the last finished run, {earlier[-1]}", file=sys.stderr)
    return earlier[-1]


def run_certs(args: argparse.Namespace, settings: Settings) -> None:
    """`certs`: every input is checked before the first file is written."""
    from flowerpot import certs

    owner = certs.parse_owner(args.owner)
    hosts = certs.parse_hosts(settings.cert_hosts)
    for name in [*args.client, *args.revoke, *([args.request] if args.request else [])]:
        certs.check_name(name)
    if args.request or args.sign:
        if (args.request and args.sign) or args.client or args.revoke:
            raise BadInput("certs: --request and --sign each go alone (one site's request, or one signature)")
        if args.request:
            written = certs.request(settings.certs_dir, args.request, owner, renew=args.renew)
            print("\n".join(str(p) for p in written))
            print(f"send {written[-1]} to the CA's operator (`flowerpot certs --sign FILE`); the key stays here")
        else:
            signed = certs.sign(settings.certs_dir, args.sign, settings.ca_passphrase)
            print(signed)
            print(
                f"send {signed} and {settings.certs_dir / 'ca' / 'ca.pem'} back to the site: they go to its "
                f"CERTS_DIR/clients/{signed.stem}/ as client.pem and ca.pem"
            )
        return
    if args.revoke:
        path, serials = certs.revoke(settings.certs_dir, args.revoke)
        print(f"{path}: revoked {', '.join(serials)} (the server reads it at every join: copy it to its certs)")
        if not args.client:
            return
    written = certs.make_certs(
        settings.certs_dir,
        args.client or [settings.client_name],
        extra_hosts=hosts,
        owner=owner,
        renew=args.renew,
        passphrase=settings.ca_passphrase,
    )
    print("\n".join(str(p) for p in written) or f"{settings.certs_dir}: nothing to do")


ENV_FILE_LIMIT = 1024 * 1024  # a settings file is small; anything larger is not one


def usable_env_file(path: Path) -> Path | None:
    """The settings file to read, after checking that it can be read as text; None for an empty
    file that is not a regular one (/dev/null: no settings). BadInput with the reason otherwise."""
    if not path.exists():
        raise BadInput(f"--env-file {path} does not exist: pass a settings file such as .env")
    if path.is_dir():
        raise BadInput(f"--env-file {path} is a folder: pass a settings file such as .env")
    try:
        with open(path, "rb") as fh:
            content = fh.read(ENV_FILE_LIMIT + 1)
    except OSError as exc:
        raise BadInput(f"--env-file {path} cannot be read ({exc.strerror}): check its permissions") from None
    if len(content) > ENV_FILE_LIMIT:
        raise BadInput(f"--env-file {path} is larger than 1 MiB: pass a settings file such as .env")
    try:
        content.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = content[: exc.start].count(b"\n") + 1
        raise BadInput(f"--env-file {path} is not UTF-8 text (line {line}): save it as UTF-8") from None
    if not path.is_file():
        if content.strip():
            raise BadInput(f"--env-file {path} is not a regular file: copy the settings into a file")
        return None
    return path


def _with_env_file(argv: list[str], env_file: Path | None) -> list[str]:
    return ["--env-file", os.fspath(env_file), *argv] if env_file else argv


if __name__ == "__main__":
    sys.exit(main())
