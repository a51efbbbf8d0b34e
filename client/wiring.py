"""The client's Flower wiring: one gRPC stream to the server in Flower's grpc-bidi protocol.

Flower 1.42's `start_client` presents no client certificate, gives up about 3 s after starting
when the server is not up yet, and dies with StopIteration when the server refuses it. This
module keeps Flower's protocol and message conversion (the `flwr.proto` stub, `flwr.common.serde`,
a `Client` made from a NumPyClient) and adds bounded retries with backoff, a clear refusal, and
TLS with an optional client certificate (mutual TLS: the key never leaves this process). It is
the only client module that knows about gRPC.

Streams are grpc.aio, on one event loop per process: every logical client of a process
(CLIENTS_PER_PROCESS) is a task of that loop, and a stream waiting for its next instruction
costs nothing. gRPC's synchronous client wakes every 0.1 s in each waiting call (its
MAXIMUM_WAIT_TIMEOUT), so 999 idle logical clients used 39 % of a core and 10,000 filled both
cores of the machine. What an instruction asks for (the user's fit or evaluate, which may take
minutes) runs in a thread of its own, so that the loop stays free for the other streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import socket
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypeVar

import grpc
from flwr.common import Code, EvaluateRes, FitRes, Parameters, Status, serde
from flwr.compat.client.client import Client
from flwr.proto.transport_pb2 import ClientMessage, Reason, ServerMessage
from flwr.proto.transport_pb2_grpc import FlowerServiceStub

from client.retry import Backoff
from shared.errors import BadInput, Refused, Unreachable
from shared.keepalive import keepalive_options
from shared.protocol import CLIENT_NAME_KEY, JOIN_KEY, RUN_COMPLETED
from shared.tls_files import client_certificate_problems

log = logging.getLogger("flowerpot.client")

ATTEMPT_SECONDS = 10.0  # the longest one attempt waits for the channel to become ready
# A closing channel lets its stream deliver what was written last (the answer to the server's
# final instruction) for this long before cancelling it.
CLOSE_GRACE_SECONDS = 1.0
T = TypeVar("T")
REFUSAL_CODES = {
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
}

# ServerMessage field -> (decode, Client method, encode, ClientMessage field)
_HANDLERS: dict[str, tuple[Callable[[Any], Any], str, Callable[[Any], Any], str]] = {
    "get_properties_ins": (
        serde.get_properties_ins_from_proto,
        "get_properties",
        serde.get_properties_res_to_proto,
        "get_properties_res",
    ),
    "get_parameters_ins": (
        serde.get_parameters_ins_from_proto,
        "get_parameters",
        serde.get_parameters_res_to_proto,
        "get_parameters_res",
    ),
    "fit_ins": (serde.fit_ins_from_proto, "fit", serde.fit_res_to_proto, "fit_res"),
    "evaluate_ins": (
        serde.evaluate_ins_from_proto,
        "evaluate",
        serde.evaluate_res_to_proto,
        "evaluate_res",
    ),
}


class AnswerFailed(Exception):
    """Raised by a client's fit or evaluate whose work failed (the task's train raised): the
    server is sent a failed answer with this message, and the client goes on serving."""


# Flower's legacy protocol has no status for "failed": any code but OK makes the server count the
# answer as a failure (async mode logs its message); the message says what happened.
_FAILED: dict[str, Callable[[str], FitRes | EvaluateRes]] = {
    "fit_ins": lambda message: FitRes(Status(Code.FIT_NOT_IMPLEMENTED, message), Parameters([], ""), 0, {}),
    "evaluate_ins": lambda message: EvaluateRes(Status(Code.EVALUATE_NOT_IMPLEMENTED, message), 0.0, 0, {}),
}


@dataclass(frozen=True)
class Endpoint:
    """Where the server is and how to talk to it."""

    address: str
    name: str
    max_message_bytes: int
    connect_timeout: float
    root_certificates: bytes | None = None  # TLS when set: the CA of the server's certificate
    private_key: bytes | None = None  # mutual TLS: this client's key and certificate (PEM)
    certificate_chain: bytes | None = None
    keepalive_seconds: float = 20  # ping the server this often; a silent server is dropped after 2x
    join: str = ""  # the JOIN_KEY metadata (shared/protocol.py): site, shard, version, input

    @property
    def tls(self) -> bool:
        return self.root_certificates is not None


def run(client: Client, endpoint: Endpoint) -> bool:
    """`serve` one client on an event loop of its own (see `block_on`)."""
    return block_on(serve(client, endpoint))


async def serve(client: Client, endpoint: Endpoint) -> bool:
    """Serve the server's instructions until it ends the run; True when the server said, before
    it ended the run, that the run completed (its final instruction, RUN_COMPLETED).

    Raises Unreachable when no connection is made within `connect_timeout` (counted afresh
    after every lost connection), Refused when the server turns this client away.
    """
    backoff, handshake_failures = Backoff(endpoint.connect_timeout), 0
    told = Told()
    while True:
        channel = _open_channel(endpoint)
        try:
            wait = max(0.1, min(ATTEMPT_SECONDS, backoff.remaining()))
            if await _ready(channel, wait):
                end = await _serve(client, channel, endpoint, told)
                if end is StreamEnd.RUN_ENDED:
                    return told.completed
                if end is StreamEnd.LOST:
                    log.warning("lost the connection to the server at %s; reconnecting", endpoint.address)
                    backoff.restart()
                    handshake_failures = 0
                    continue
                # Cut before its first instruction (a busy server's queue): joining again at
                # once would only add to what is queued, so the client waits as if unreachable.
                problem: str | None = "it ended the stream before its first instruction"
                details = ""
            else:
                problem = await in_thread(_tcp_problem, endpoint.address)
                details = await _failure_details(channel) if problem is None else ""
        finally:
            await channel.close(grace=CLOSE_GRACE_SECONDS)
        if problem is None:  # the port answers, yet no gRPC channel: TLS or protocol mismatch
            handshake_failures += 1
            if handshake_failures >= 2:
                raise Refused(_handshake_message(endpoint, details))
            problem = f"it accepts connections, but the handshake failed: {details or 'no gRPC answer'}"
        else:
            handshake_failures = 0
        delay = backoff.next_delay()
        if delay is None:
            raise Unreachable(
                f"the server at SERVER_ADDRESS={endpoint.address} was not reachable within "
                f"CONNECT_TIMEOUT={endpoint.connect_timeout:g} s ({problem}): "
                "start the server first, or check SERVER_ADDRESS and the network"
            )
        log.info(
            "server at %s not reachable yet (%s); retrying in %.1f s",
            endpoint.address,
            problem,
            delay,
        )
        await asyncio.sleep(delay)


def block_on(main: Coroutine[Any, Any, T]) -> T:
    """Run `main` to its end on a new event loop in a daemon thread, and return what it returns.

    The calling thread only waits, so that the main thread stays free to take SIGTERM (the
    process then exits at once, its streams and claims with it, as a stopped client should)."""
    outcome: list[Any] = []

    def loop() -> None:
        try:
            outcome.append((True, asyncio.run(main)))
        except BaseException as exc:  # handed to the waiting thread, which raises it
            outcome.append((False, exc))

    thread = threading.Thread(target=loop, name="streams", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
    finished, value = outcome[0]
    if not finished:
        raise value
    return value


async def in_thread(work: Callable[..., T], *args: Any) -> T:
    """`work(*args)` in a daemon thread of its own, in the calling task's context (a logical
    client's log prefix goes with it). Not a pool: no instruction waits for another client's
    fit to end, and a stop never waits for one (concurrent.futures joins its threads at exit)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[T] = loop.create_future()
    context = contextvars.copy_context()

    def settle(result: Any, error: BaseException | None) -> None:
        if done.cancelled():
            return
        if error is None:
            done.set_result(result)
        else:
            done.set_exception(error)

    def body() -> None:
        try:
            result, error = context.run(work, *args), None
        except BaseException as exc:  # the awaiting task raises it
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits any more
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=body, name="answer", daemon=True).start()
    return await done


PROBE_METHOD = "/flowerpot.Probe/Handshake"  # served by no one: see _failure_details


def _open_channel(endpoint: Endpoint) -> grpc.aio.Channel:
    options = [
        ("grpc.max_send_message_length", endpoint.max_message_bytes),
        ("grpc.max_receive_message_length", endpoint.max_message_bytes),
        *keepalive_options(endpoint.keepalive_seconds),
    ]
    if not endpoint.tls:
        return grpc.aio.insecure_channel(endpoint.address, options=options)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=endpoint.root_certificates,
        private_key=endpoint.private_key,
        certificate_chain=endpoint.certificate_chain,
    )
    return grpc.aio.secure_channel(endpoint.address, credentials, options=options)


_SETTLED = (grpc.ChannelConnectivity.READY, grpc.ChannelConnectivity.TRANSIENT_FAILURE)


async def _ready(channel: grpc.aio.Channel, timeout: float) -> bool:
    """Connect; True once the channel is ready, False at its first failure or at the timeout."""

    async def settled() -> grpc.ChannelConnectivity:
        state = channel.get_state(try_to_connect=True)
        while state not in _SETTLED:
            await channel.wait_for_state_change(state)
            state = channel.get_state()
        return state

    try:
        return await asyncio.wait_for(settled(), timeout) == grpc.ChannelConnectivity.READY
    except TimeoutError:
        return False


class StreamEnd(Enum):
    """How one stream ended."""

    RUN_ENDED = "the server ended the run"
    LOST = "lost after at least one instruction"
    CUT = "cut before its first instruction"


@dataclass
class Told:
    """What the server said about the run, over all of this client's streams."""

    completed: bool = False


async def _serve(client: Client, channel: grpc.aio.Channel, endpoint: Endpoint, told: Told) -> StreamEnd:
    """Answer instructions on one stream until it ends; how it ended."""
    call = FlowerServiceStub(channel).Join(metadata=_metadata(endpoint))
    received = 0
    try:
        while (message := await call.read()) is not grpc.aio.EOF:
            received += 1
            kind = message.WhichOneof("msg")
            if kind == "reconnect_ins":
                await call.write(ClientMessage(disconnect_res=ClientMessage.DisconnectRes(reason=Reason.ACK)))
                return StreamEnd.RUN_ENDED
            if kind == "get_properties_ins" and RUN_COMPLETED in message.get_properties_ins.config:
                told.completed = True  # the server's, not the user's client's: answered here
                await call.write(ClientMessage(get_properties_res=_NO_PROPERTIES))
                continue
            await call.write(await in_thread(_answer, client, kind, message))
    except grpc.RpcError as err:
        if "larger than max" in (err.details() or ""):
            raise BadInput(
                f"a message between this client and the server is larger than MAX_MESSAGE_MB allows "
                f"({err.details()}): set the same, larger MAX_MESSAGE_MB on the server and the clients"
            ) from None
        if err.code() in REFUSAL_CODES:
            raise Refused(f"the server at {endpoint.address} refused this client: {err.details()}") from None
        log.debug("stream ended: %s %s", err.code(), err.details())
        return StreamEnd.LOST if received else StreamEnd.CUT
    except asyncio.InvalidStateError:  # the server ended the stream while this client answered
        log.debug("stream ended while answering")
        return StreamEnd.LOST
    finally:
        with contextlib.suppress(grpc.RpcError, asyncio.InvalidStateError):
            await call.done_writing()  # ends the request stream
    if received == 0:  # a plain Flower server ends the stream without a word when it refuses
        raise Refused(
            f"the server at {endpoint.address} closed the connection before sending any instruction: "
            "it refused this client (at capacity?)"
        )
    return StreamEnd.LOST


def _metadata(endpoint: Endpoint) -> tuple[tuple[str, str], ...]:
    named = ((CLIENT_NAME_KEY, endpoint.name),)  # with a client certificate the server ignores it
    return (*named, (JOIN_KEY, endpoint.join)) if endpoint.join else named


_NO_PROPERTIES = ClientMessage.GetPropertiesRes(status=serde.status_to_proto(Status(Code.OK, "")))


def _answer(client: Client, kind: str | None, message: ServerMessage) -> ClientMessage:
    if kind not in _HANDLERS:
        raise ValueError(f"the server sent an instruction this client does not know: {kind}")
    decode, method, encode, field = _HANDLERS[kind]
    try:
        result = getattr(client, method)(decode(getattr(message, kind)))
    except AnswerFailed as failure:
        if kind not in _FAILED:
            raise
        result = _FAILED[kind](str(failure))
    return ClientMessage(**{field: encode(result)})


def _tcp_problem(address: str) -> str | None:
    """None when a TCP connection to the address succeeds, else what went wrong."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return None
    except socket.gaierror:
        return f"the name {host} does not resolve"
    except ConnectionRefusedError:
        return "connection refused"
    except OSError as exc:
        return exc.strerror or exc.__class__.__name__


async def _failure_details(channel: grpc.aio.Channel) -> str:
    """gRPC's own reason why the channel does not connect (e.g. an SSL handshake error). The probe
    calls a method no server has, so that a channel that does connect by now is answered
    UNIMPLEMENTED: a Join stream would be seated as a client for a moment (one without join
    metadata) and could be sampled into a round it then fails."""
    try:
        await channel.unary_unary(PROBE_METHOD)(b"", timeout=2)
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.UNIMPLEMENTED:
            return ""
        return err.details() or ""
    return ""


def _handshake_message(endpoint: Endpoint, details: str) -> str:
    # gRPC's details end with the most specific reason, sometimes followed by a status word:
    # "...: BAD_SIGNATURE: certificate signature failure: OK"
    parts = [part.strip() for part in details.split(": ") if part.strip() not in ("", "OK")]
    reason = parts[-1] if parts else "no gRPC answer"
    if endpoint.tls:
        # TLS tells a refused client nothing but a closed socket; list what this side can know.
        if any(
            sign in details for sign in ("Tls handshake failed", "CERTIFICATE_VERIFY_FAILED", "Hostname Verification")
        ):
            return (
                f"TLS handshake with the server at {endpoint.address} failed ({reason}): this client does not "
                "trust the server's certificate: give it the ca.pem of the `flowerpot certs` run that made the "
                "server's certificate, and dial a name in it (CERT_HOSTS when the certificates were made)"
            )
        if endpoint.certificate_chain is None:
            causes = [
                "the server requires a client certificate (CLIENT_AUTH=certificate) and this client presents none: "
                "set CLIENT_AUTH=certificate and CLIENT_NAME, with its bundle in CERTS_DIR/clients/NAME"
            ]
        else:
            own = client_certificate_problems(endpoint.certificate_chain, endpoint.root_certificates or b"")
            causes = own or [
                "the server does not accept this client's certificate: it was issued by another CA than the "
                "server's, or has expired (ask the server's operator for a new one)"
            ]
        causes.append("the server does not run with TLS_ENABLED=true, or this client does not trust its certificate")
        if not any(sign in details for sign in ("CERTIFICATE", "certificate", "alert")):
            # no certificate was named: a server out of connections closes sockets the same way
            causes.insert(0, "the server is out of capacity (too many open connections): retry later")
        causes_text = "; or ".join(causes)
        return f"TLS handshake with the server at {endpoint.address} failed ({reason}); likely causes: {causes_text}"
    return (
        f"the server at {endpoint.address} accepts connections but the plaintext gRPC handshake "
        f"failed ({reason}): the server requires TLS; set TLS_ENABLED=true and give this client "
        "the server's CA certificate"
    )
