"""The server's Flower wiring: a gRPC server running Flower's grpc-bidi servicer.

Built from flwr's own pieces (FlowerServiceServicer, GrpcClientProxy, the protobuf messages of
the FlowerService) instead of `start_server`, which cannot require client certificates (mutual
TLS), cannot refuse a client with a reason (or log who it refused), and lets gRPC share a busy
port (SO_REUSEPORT). It is the only server module that knows about gRPC.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
from cryptography import x509
from flwr.proto.transport_pb2 import ClientMessage, ServerMessage
from flwr.server.client_manager import ClientManager
from flwr.server.superlink.fleet.grpc_bidi.flower_service_servicer import FlowerServiceServicer

from server.transport.admission import Admission
from server.transport.churn_log import ChurnLog
from server.transport.sites import Sites
from server.transport.stream import NamedClientProxy as NamedClientProxy  # re-exported: the strategies' tests use it
from server.transport.stream import Oversized, new_proxy, open_seat, relay
from shared.errors import BadInput
from shared.keepalive import keepalive_options
from shared.protocol import CLIENT_NAME_KEY, JOIN_KEY, clean_text
from shared.revocation import RevocationList
from shared.tls_files import common_name

log = logging.getLogger("flowerpot.server")

FLOWER_SERVICE = "flwr.proto.FlowerService"  # the gRPC service name in Flower's transport.proto
# Transport limits. Keepalive: the server pings every KEEPALIVE_SECONDS and drops a
# peer that does not answer within as long again, so a client that vanished without closing its
# connection frees its place within 2 x KEEPALIVE_SECONDS. It accepts clients' pings down to
# MIN_PING_SECONDS apart (the lowest KEEPALIVE_SECONDS allows), else gRPC would cut them off.
MIN_PING_SECONDS = 5
# Streams beyond the places: refused or cancelled joins hold a handler only briefly.
SPARE_STREAMS = 16
# An update may be this many times the model's serialized size (plus METADATA_BYTES for the
# metrics and framing) before it is refused unread: honest updates are the model's size.
UPDATE_SIZE_FACTOR = 2
METADATA_BYTES = 1 << 20
HANDSHAKE_SECONDS = 10
PENDING_SECONDS = 300  # the longest a stream waits in gRPC's queue for a worker (seconds)
# A connected client whose certificate is revoked meanwhile loses its stream within this bound.
REVOCATION_CHECK_SECONDS = 2.0


@dataclass(frozen=True)
class TlsFiles:
    """PEM bytes: the server's certificate and key, and (CLIENT_AUTH=certificate) the CA that
    every client's certificate must come from: TLS then refuses any other client in the handshake."""

    certificate: bytes
    private_key: bytes
    client_ca: bytes | None = None


class Traffic:
    """Bytes of Flower messages (serialized protobuf, without gRPC framing or TLS) both ways,
    counted where gRPC serializes them, so counting costs nothing."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sent = self.received = 0
        self.message_limit = 0  # bytes; 0 until the model is known

    def limit_to_model(self, model_bytes: int) -> None:
        """From now on a client message much larger than the model is refused before decoding:
        decoding a message costs several times its size in memory."""
        self.message_limit = UPDATE_SIZE_FACTOR * model_bytes + METADATA_BYTES

    def add(self, sent: int = 0, received: int = 0) -> None:
        with self._lock:
            self.sent += sent
            self.received += received

    def take(self) -> tuple[int, int]:
        """(sent, received) since the last take."""
        with self._lock:
            counts = (self.sent, self.received)
            self.sent = self.received = 0
        return counts

    def deserialize(self, data: bytes) -> ClientMessage | Oversized:
        self.add(received=len(data))
        if self.message_limit and len(data) > self.message_limit:
            return Oversized(len(data), self.message_limit)  # the stream refuses it, naming the client
        return ClientMessage.FromString(data)

    def serialize(self, message: ServerMessage) -> bytes:
        data = message.SerializeToString()
        self.add(sent=len(data))
        return data


class AdmittingServicer(FlowerServiceServicer):
    """Flower's servicer, with a say on who joins: refused clients get a gRPC status and a reason."""

    def __init__(
        self,
        client_manager: ClientManager,
        admission: Admission,
        revocations: RevocationList | None = None,
        sites: Sites | None = None,
    ) -> None:
        super().__init__(client_manager)
        self.admission, self.revocations = admission, revocations
        self.sites = sites or Sites()
        self.churn = ChurnLog(lambda: admission.connected)

    def Join(  # noqa: N802 (gRPC's method name)
        self, request_iterator: Iterator[ClientMessage], context: grpc.ServicerContext
    ) -> Iterator[ServerMessage]:
        serial = 0
        if self.revocations is None:
            name, who = identify(context)
        else:  # CLIENT_AUTH=certificate: TLS checked CA and dates; the name is the certificate's
            name, who, serial = self._certified(context)
        refusal = self.admission.not_allowed(name)
        if refusal is not None:
            _refuse(context, who, grpc.StatusCode.PERMISSION_DENIED, refusal)
        seat = open_seat(context, self.admission, self.client_manager, name, who, self.churn)
        if seat is None:  # the call ended already (a cancelled stream): it takes nothing
            return
        proxy = new_proxy(context, name)
        if serial:  # the certificate is the unit of participation (NamedClientProxy.participant)
            proxy.certificate, proxy.serial = name, serial
        context.add_callback(lambda: self.sites.leave(proxy))  # the shard is free when the stream ends
        try:
            refusal = self.sites.enter(join_metadata(context), who, proxy, context.peer())  # version, input, shard
            if refusal is not None:
                _refuse(context, who, grpc.StatusCode.PERMISSION_DENIED, refusal)
            refusal = seat.take(proxy)
            if refusal is not None:
                _refuse(context, who, grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)
            yield from relay(seat, request_iterator, context)
            if seat.proxy is not None and seat.proxy.refusal is not None:  # the run refused it meanwhile
                _refuse(context, who, grpc.StatusCode.PERMISSION_DENIED, seat.proxy.refusal)
        finally:  # also when gRPC's callback did not run yet: the place and the entry go now
            self.sites.leave(proxy)
            seat.close()

    def _certified(self, context: grpc.ServicerContext) -> tuple[str, str, int]:
        """The name in the client certificate of this TLS session, a description for logs and
        its serial; refused when it is revoked."""
        cert = peer_certificate(context)
        if cert is None:  # cannot happen with require_client_auth; refuse rather than trust
            _refuse(context, context.peer(), grpc.StatusCode.UNAUTHENTICATED, "no client certificate in TLS")
        assert cert is not None and self.revocations is not None
        # Cut and cleaned: the name reaches the log, sites.json and metric labels.
        name = clean_text(common_name(cert.subject) or cert.subject.rfc4514_string())
        who = f"{name} (certificate, serial {cert.serial_number:x}, {context.peer()})"
        reason = self.revocations.reason(cert.serial_number)
        if reason is not None:
            _refuse(context, who, grpc.StatusCode.PERMISSION_DENIED, reason)
        return name, who, cert.serial_number


def evict_revoked(client_manager: ClientManager, revocations: RevocationList, stop: threading.Event) -> None:
    """Every REVOCATION_CHECK_SECONDS: end the streams of connected clients whose certificate is
    now revoked. This is how an operator evicts a participant mid-run (`flowerpot certs --revoke`):
    its stream ends within the bound, even mid-fit, and its next join is refused."""
    while not stop.wait(REVOCATION_CHECK_SECONDS):
        for proxy in list(client_manager.all().values()):
            serial = getattr(proxy, "serial", 0)
            reason = revocations.reason(serial) if serial else None
            if reason is not None and isinstance(proxy, NamedClientProxy):
                log.warning("evicted client %s: %s", proxy.name, reason)
                client_manager.unregister(proxy)  # never sampled again, also before its stream has ended
                proxy.refuse(reason)
                proxy.cancel()  # a stream waiting for an answer (a fit) ends now, not when the fit does


def _refuse(context: grpc.ServicerContext, who: str, code: grpc.StatusCode, reason: str) -> None:
    log.warning("refused client %s: %s", who, reason)
    context.abort(code, reason)  # raises: the stream ends with this status


def identify(context: grpc.ServicerContext) -> tuple[str, str]:
    """The name the client gives itself, and a description for logs."""
    given = dict(context.invocation_metadata() or ()).get(CLIENT_NAME_KEY, "")
    name = clean_text(given) or context.peer()  # the peer: gRPC's own address text
    return name, f"{name} ({context.peer()})"


def join_metadata(context: grpc.ServicerContext) -> str | None:
    """The JOIN_KEY value a Flowerpot client sends (shared/protocol.py); None from a plain Flower client."""
    value = dict(context.invocation_metadata() or ()).get(JOIN_KEY)
    return None if value is None else str(value)


def peer_certificate(context: grpc.ServicerContext) -> x509.Certificate | None:
    """The client certificate TLS verified for this call (gRPC's auth context), or None."""
    pems = context.auth_context().get("x509_pem_cert") or []
    try:
        return x509.load_pem_x509_certificate(pems[0]) if pems else None
    except ValueError:
        return None


def start_grpc_server(
    client_manager: ClientManager,
    admission: Admission,
    traffic: Traffic,
    address: str,
    max_message_bytes: int,
    tls: TlsFiles | None = None,
    revocations: RevocationList | None = None,
    keepalive_seconds: float = 20,
    sites: Sites | None = None,
) -> grpc.Server:
    """Bind and start; BadInput when the address cannot be bound (e.g. the port is in use).
    With `tls.client_ca` (mutual TLS) pass `revocations`: the servicer then names clients by
    their certificates. `sites` checks Flowerpot clients' version, input and shard (server/transport/sites.py)."""
    if (tls is not None and tls.client_ca is not None) != (revocations is not None):
        raise ValueError("client certificates and a revocation list go together")
    # Every connected client holds one worker for its stream; refused ones only briefly. Calls
    # beyond that are refused by gRPC itself (RESOURCE_EXHAUSTED) instead of queueing.
    workers = admission.capacity + SPARE_STREAMS
    options = [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        *keepalive_options(keepalive_seconds),
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_PING_SECONDS * 1000),
        ("grpc.http2.min_time_between_pings_ms", MIN_PING_SECONDS * 1000),
        # One connection never needs more streams than there are places (behind a proxy many
        # clients share one), plus the client's probe of a failed handshake.
        ("grpc.max_concurrent_streams", admission.capacity + 1),
        ("grpc.so_reuseport", 0),  # a second server on a busy port must fail, not share it
        # A connection that has not finished its TLS handshake holds a file descriptor: idle
        # sockets of an unauthenticated peer are closed after this instead of gRPC's 120 s.
        ("grpc.server_handshake_timeout_ms", HANDSHAKE_SECONDS * 1000),
        # A join storm (thousands of logical clients at once) queues its streams in gRPC's core
        # until a Python worker takes each. gRPC cancels what queues beyond 1,000 (3,000 at
        # most) or longer than 30 s, and every cancelled client joined again at once: a storm of
        # 10,000 took 86 s and 125,882 cancelled joins. Every place may queue, for as long as
        # the storm takes to seat.
        ("grpc.server.max_pending_requests", workers),
        ("grpc.server.max_pending_requests_hard_limit", 2 * workers),
        ("grpc.server_max_unrequested_time_in_server", PENDING_SECONDS),
    ]
    server = grpc.server(
        concurrent.futures.ThreadPoolExecutor(max_workers=workers),
        options=options,
        maximum_concurrent_rpcs=workers,
    )
    # Flower's generated add_FlowerServiceServicer_to_server, with serializers that count bytes
    join = grpc.stream_stream_rpc_method_handler(
        AdmittingServicer(client_manager, admission, revocations, sites).Join,
        request_deserializer=traffic.deserialize,
        response_serializer=traffic.serialize,
    )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(FLOWER_SERVICE, {"Join": join}),))
    try:
        if tls is None:
            port = server.add_insecure_port(address)
        else:
            credentials = grpc.ssl_server_credentials(
                [(tls.private_key, tls.certificate)],
                root_certificates=tls.client_ca,
                require_client_auth=tls.client_ca is not None,
            )
            port = server.add_secure_port(address, credentials)
    except RuntimeError:
        port = 0
    if port == 0:
        raise BadInput(
            f"SERVER_LISTEN_ADDRESS={address} cannot be bound (the port is in use, or the address "
            "is not on this machine): stop what uses it or choose another port"
        )
    server.start()
    if revocations is not None:  # a daemon: it ends with the server's process
        threading.Thread(
            target=evict_revoked, args=(client_manager, revocations, threading.Event()), name="evict", daemon=True
        ).start()
    security = "plaintext" if tls is None else "TLS" + (", client certificates required" if tls.client_ca else "")
    log.info("listening on %s (%s)", address, security)
    return server
