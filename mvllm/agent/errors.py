"""Why a lifecycle operation failed, each with the HTTP status the agent answers with."""

from __future__ import annotations

from mvllm.agent.loadphase import retry_after_s


class AgentError(Exception):
    status = 500
    retry_after: float | None = None
    code: str | None = None  # the OpenAI error `code`; None: the status

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UnknownModel(AgentError):
    status = 404


class BadRequest(AgentError):
    status = 400


class Conflict(AgentError):
    """The operation does not apply to the instance's state (sleep a stopped model, ...)."""

    status = 409


class NoRoom(AgentError):
    """Not enough GPU memory even after evicting every idle, unpinned model (or after waiting
    load_timeout for the busy ones in the way). The router reads the code: no room here."""

    status = 503
    retry_after = 10.0
    code = "no_room"


class Draining(NoRoom):
    """The model is draining on this agent to make room for another one (max_switch_wait passed):
    its new requests are refused with the "no room" code, which tells the router to try another
    node; its requests in flight finish."""

    retry_after = 2.0


class LoadFailed(AgentError):
    """The engine did not come up (crashed, timed out, or the model is `failed`)."""

    status = 503
    retry_after = 30.0


class Busy(AgentError):
    """Too many requests already wait for this model, or the load outlasted load_timeout."""

    status = 503
    retry_after = 5.0

    @classmethod
    def waiting_on_load(cls, message: str, remaining_s: float | None) -> Busy:
        """A request that waited on a load or wake: Retry-After from the time it should still take
        (mvllm.agent.loadphase.retry_after_s), the default without a prediction."""
        err = cls(message)
        err.retry_after = float(retry_after_s(remaining_s, cls.retry_after))
        return err


class EngineError(AgentError):
    """The engine answered a control call (sleep, wake, LoRA) with an error."""

    status = 502


class EngineExited(Exception):
    """The engine process ended while we waited for it (a crash during start)."""

    def __init__(self, code: int | None, message: str | None = None) -> None:
        super().__init__(message or f"engine exited with code {code}")
        self.code = code
