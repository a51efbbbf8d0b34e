"""One client's Join stream on the server: the place it takes, its entry in the client manager,
and the instructions relayed over it, none of which may outlive the stream.

Flower's own servicer registers a client and relies on gRPC's termination callback to remove it,
without checking that `add_callback` succeeded: it returns False for a call that has already
ended, e.g. a client that cancels its stream within milliseconds. Such a stream left a place
taken and a ghost client registered forever; a few thousand of them filled the server and the
run then waited on clients that did not exist. Here everything a stream takes is held by one
`Seat`, given back exactly once by whichever comes first: gRPC's termination callback, or the
handler's own `finally`. A stream whose call has already ended takes nothing.

Every request to a client is bounded as well (`BoundedBridge`): Flower's bridge waits for an
answer without a limit when the stream cannot deliver the instruction (a peer that stopped
reading), so ROUND_TIMEOUT alone did not end the wait.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable, Iterator

import grpc
from flwr.proto.transport_pb2 import ClientMessage, ServerMessage
from flwr.server.client_manager import ClientManager
from flwr.server.superlink.fleet.grpc_bidi.grpc_bridge import (
    GrpcBridge,
    GrpcBridgeClosed,
    InsWrapper,
    ResWrapper,
    Status,
)
from flwr.server.superlink.fleet.grpc_bidi.grpc_client_proxy import GrpcClientProxy
from iterators import TimeoutIterator

from server.transport.admission import Admission
from server.transport.churn_log import ChurnLog

log = logging.getLogger("flowerpot.server")

# A request's wait ends this long after its own timeout (the stream's timeout fires first when
# the client is merely slow; this one when the instruction could not even be delivered).
REQUEST_SLACK_SECONDS = 5.0
UNTIMED_REQUEST_SECONDS = 600.0  # the bound of a request that came without a timeout


class Oversized:
    """What the request deserializer gives instead of a message it refused to decode."""

    def __init__(self, size: int, limit: int) -> None:
        self.size, self.limit = size, limit


class NotDelivered(GrpcBridgeClosed):
    """The stream ended before it took the instruction: the client never saw the request."""


class BoundedBridge(GrpcBridge):
    """Flower's bridge between a client proxy and its stream, with a bound on every request.

    A request that gets no answer in time closes the bridge and cancels the stream (the client
    is gone for this run: it reconnects if it still can), so nothing waits on it again.
    """

    def __init__(self, on_stuck: Callable[[], None]) -> None:
        super().__init__()
        self._on_stuck = on_stuck

    def request(self, ins_wrapper: InsWrapper) -> ResWrapper:
        with self._cv:
            if self._status == Status.CLOSED:
                raise NotDelivered()
            if self._status != Status.AWAITING_INS_WRAPPER:
                raise GrpcBridgeClosed()  # a request is already pending: the stream is stuck
            self._ins_wrapper = ins_wrapper
            self._transition(Status.INS_WRAPPER_AVAILABLE)
        limit = UNTIMED_REQUEST_SECONDS if ins_wrapper.timeout is None else ins_wrapper.timeout
        with self._cv:
            answered = self._cv.wait_for(
                lambda: self._status in (Status.CLOSED, Status.RES_WRAPPER_AVAILABLE),
                timeout=limit + REQUEST_SLACK_SECONDS,
            )
            if not answered:
                self._transition(Status.CLOSED)
            else:
                if self._status == Status.CLOSED:
                    raise NotDelivered() if self._ins_wrapper is not None else GrpcBridgeClosed()
                res_wrapper = self._res_wrapper
                self._res_wrapper = None
                self._transition(Status.AWAITING_INS_WRAPPER)
        if not answered:
            self._on_stuck()
            raise TimeoutError(f"no answer within {limit:g} s")
        if res_wrapper is None:
            raise GrpcBridgeClosed()
        return res_wrapper


class NamedClientProxy(GrpcClientProxy):
    """Flower's proxy for one connected client, carrying the name it is known by in logs."""

    def __init__(self, cid: str, bridge: GrpcBridge, name: str) -> None:
        super().__init__(cid=cid, bridge=bridge)
        self.name = name
        self.site, self.shard = name, ""  # a Flowerpot client's site and shard (server/transport/sites.py)
        self.refusal: str | None = None  # set by `refuse`: the stream then ends with this reason
        self.release: Callable[[], None] | None = None  # its Seat's close, once seated
        # Under client certificates: the certificate's name and serial. The unit of participation
        # (one seat bound, one vote, one share of a round's completion) is the certificate, else
        # the site the client says it is (a plain Flower client: the name it gives).
        self.certificate, self.serial = "", 0
        self.alive: Callable[[], bool] = lambda: True  # its stream is still active (gRPC's view)
        self.cancel: Callable[[], None] = lambda: None  # end its stream now, even mid-request

    @property
    def participant(self) -> str:
        return self.certificate or self.site

    def refuse(self, reason: str) -> None:
        """End this client's stream from any thread; its handler tells the client `reason` with
        PERMISSION_DENIED (a Flowerpot client exits 4). Its place and client-manager entry are
        given back now, not when its handler gets to run: a replacement may need the place."""
        self.refusal = reason
        (self.release or self.bridge.close)()


class Seat:
    """What one stream holds: a place in Admission (and one of its name's connections, see
    MAX_CONNECTIONS_PER_CLIENT) and a client-manager entry, until `close`."""

    def __init__(
        self, admission: Admission, client_manager: ClientManager, name: str, who: str, churn: ChurnLog | None = None
    ) -> None:
        self.admission, self.client_manager, self.name, self.who = admission, client_manager, name, who
        self.churn = churn or ChurnLog(lambda: admission.connected, lines=1_000_000)
        self.proxy: NamedClientProxy | None = None
        self._lock = threading.Lock()
        self._closed = self._placed = False

    def take(self, proxy: NamedClientProxy) -> str | None:
        """Take a place and register the client; why not when it cannot (None: seated).
        A seat closed meanwhile (the stream ended) takes nothing."""
        with self._lock:
            if self._closed:
                return "the stream ended before the client joined"
            refusal = self.admission.take_place()
            if refusal is not None:
                return refusal
            refusal = self.admission.take_name(self.name)
            if refusal is not None:
                self.admission.release()
                return refusal
            self._placed, self.proxy = True, proxy
            proxy.release = self.close
            self.client_manager.register(proxy)
        self.churn.note(self.who, "joined")
        return None

    def close(self) -> None:
        """Give everything back; idempotent, safe from any thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self.proxy is not None:
                self.proxy.bridge.close()
                self.client_manager.unregister(self.proxy)
            if self._placed:
                self.admission.release_name(self.name)
                self.admission.release()
        if self._placed:
            self.churn.note(self.who, "left")


def open_seat(
    context: grpc.ServicerContext,
    admission: Admission,
    client_manager: ClientManager,
    name: str,
    who: str,
    churn: ChurnLog | None = None,
) -> Seat | None:
    """A seat whose release is tied to the end of the call; None when the call has already ended."""
    seat = Seat(admission, client_manager, name, who, churn)
    if not context.add_callback(seat.close) or not context.is_active():
        seat.close()
        log.debug("stream from %s ended before it joined", who)
        return None
    return seat


def new_proxy(context: grpc.ServicerContext, name: str) -> NamedClientProxy:
    # A unique id, not the peer: behind a proxy many clients share one peer address (as in Flower).
    proxy = NamedClientProxy(uuid.uuid4().hex, BoundedBridge(on_stuck=context.cancel), name)
    proxy.alive, proxy.cancel = context.is_active, context.cancel
    return proxy


def relay(
    seat: Seat, request_iterator: Iterator[ClientMessage], context: grpc.ServicerContext
) -> Iterator[ServerMessage]:
    """Flower's instruction loop (FlowerServiceServicer.Join): send the bridge's next instruction,
    wait for the answer within the instruction's timeout; ends when either side goes."""
    assert seat.proxy is not None
    bridge = seat.proxy.bridge
    answers = TimeoutIterator(iterator=request_iterator, reset_on_next=True)
    instructions = bridge.ins_wrapper_iterator()
    try:
        while True:
            ins_wrapper = next(instructions)
            yield ins_wrapper.server_message
            if ins_wrapper.timeout is not None:
                answers.set_timeout(ins_wrapper.timeout)
            answer = next(answers)
            if answer is answers.get_sentinel():
                context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, f"Timeout of {ins_wrapper.timeout}sec was exceeded.")
            if isinstance(answer, Oversized):
                reason = (
                    f"a message of {answer.size / 2**20:.1f} MiB is far larger than this model's updates "
                    f"(at most {answer.limit / 2**20:.1f} MiB): refused without reading it"
                )
                log.warning("refused a message from client %s: %s", seat.who, reason)
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, reason)
            bridge.set_res_wrapper(ResWrapper(client_message=answer))
    except (StopIteration, GrpcBridgeClosed, grpc.RpcError):  # the client or the server ended the stream
        return
    finally:
        answers.interrupt()
