"""An authenticated participant that misbehaves: COUNT connections on one client certificate.

    python cert_attacker.py ADDRESS CERTS_DIR NAME BEHAVIOUR COUNT [JOIN]

BEHAVIOUR: `idle` opens Join streams that never answer anything; `huge` answers every request
like a client whose starting weights and updates are 1e30 everywhere (the shapes of the
digits model). JOIN: a Flowerpot join value (shared/protocol.py) to claim a site and shard with.
Prints one line per stream: "open", or "refused: <details>" / "ended: <code>".
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import grpc
import numpy as np
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays, serde
from flwr.common.typing import Code, EvaluateRes, FitRes, GetParametersRes, Status
from flwr.proto.transport_pb2 import ClientMessage
from flwr.proto.transport_pb2_grpc import FlowerServiceStub

address, certs, name, behaviour, count = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
join = sys.argv[6] if len(sys.argv) > 6 else ""
bundle = certs / "clients" / name
credentials = grpc.ssl_channel_credentials(
    (bundle / "ca.pem").read_bytes(), (bundle / "client.key").read_bytes(), (bundle / "client.pem").read_bytes()
)
SHAPES = [(32, 64), (32,), (10, 32), (10,)]  # only the shapes matter to the server's checks
OK = Status(code=Code.OK, message="")


def huge(parameters_like: list[np.ndarray] | None = None) -> list[np.ndarray]:
    if parameters_like:
        return [np.full_like(a, 1e30) for a in parameters_like]
    return [np.full(shape, 1e30, np.float32) for shape in SHAPES]


def answer(message) -> ClientMessage:
    kind = message.WhichOneof("msg")
    if kind == "get_parameters_ins":
        res = GetParametersRes(status=OK, parameters=ndarrays_to_parameters(huge()))
        return ClientMessage(get_parameters_res=serde.get_parameters_res_to_proto(res))
    if kind == "fit_ins":
        ins = serde.fit_ins_from_proto(message.fit_ins)
        res = FitRes(OK, ndarrays_to_parameters(huge(parameters_to_ndarrays(ins.parameters))), 100, {})
        return ClientMessage(fit_res=serde.fit_res_to_proto(res))
    if kind == "evaluate_ins":
        res = EvaluateRes(OK, loss=1.0, num_examples=1, metrics={})
        return ClientMessage(evaluate_res=serde.evaluate_res_to_proto(res))
    raise SystemExit(f"not answering {kind}")


def stream(channel: grpc.Channel, index: int) -> None:
    outbox: list[ClientMessage] = []
    ready = threading.Condition()
    forever = threading.Event()

    def requests():
        while not forever.is_set():
            with ready:
                ready.wait_for(lambda: outbox or forever.is_set())
                if outbox:
                    yield outbox.pop(0)

    metadata = [("flowerpot-client", name)] + ([("flowerpot-join", join)] if join else [])
    call = FlowerServiceStub(channel).Join(requests(), metadata=metadata)
    print(f"{index} open", flush=True)
    try:
        for message in call:
            if behaviour == "huge":
                with ready:
                    outbox.append(answer(message))
                    ready.notify()
    except grpc.RpcError as err:
        code = err.code()
        what = "refused" if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED) else "ended"
        print(f"{index} {what}: {code.name} {err.details()}", flush=True)
    finally:
        forever.set()
        with ready:
            ready.notify()


channels = [grpc.secure_channel(address, credentials) for _ in range(count)]
threads = [threading.Thread(target=stream, args=(c, i)) for i, c in enumerate(channels)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
