"""Exit statuses and the one error type that carries them to the command line."""

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    CRASH = 1  # an unexpected error: a bug, with its traceback
    BAD_INPUT = 2  # a bad setting, a missing or corrupt file, an unusable path or port
    NO_FREE_SHARD = 3
    REFUSED = 4  # capacity, allow-list, authentication, TLS handshake
    UNREACHABLE = 5  # server not reachable within CONNECT_TIMEOUT
    CLIENTS_TIMEOUT = 6  # too few clients within the wait timeout
    RUN_FAILED = 7  # the server ran every round, but its last rounds all failed or its final model is unusable
    RUN_INCOMPLETE = 8  # a client: the server ended the run it took part in before the run completed


class FlowerpotError(Exception):
    """An expected failure: printed as one line, exits with `code`."""

    code: ExitCode = ExitCode.BAD_INPUT

    def __init__(self, message: str, code: ExitCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class BadInput(FlowerpotError):
    code = ExitCode.BAD_INPUT


class NoFreeShard(FlowerpotError):
    code = ExitCode.NO_FREE_SHARD


class Refused(FlowerpotError):
    code = ExitCode.REFUSED


class Unreachable(FlowerpotError):
    code = ExitCode.UNREACHABLE


class ClientsTimeout(FlowerpotError):
    code = ExitCode.CLIENTS_TIMEOUT


class RunFailed(FlowerpotError):
    code = ExitCode.RUN_FAILED


class RunIncomplete(FlowerpotError):
    code = ExitCode.RUN_INCOMPLETE
