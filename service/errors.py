"""The service's exception tree: every exception class of `service/` is in it.

ServiceError
├── ConfigError          settings, a busy port or an unreachable Redis at start-up (exit 2)
├── AdminInputError      an operator's request that cannot be answered as asked (also a
│                        ValueError): 400 on /admin/, a bad parameter on the command line
├── WebhookError         a webhook request that must be refused (carries its HTTP status)
│   ├── InvalidSignature     401: missing or wrong signature/token, wrong strategy
│   ├── RequestTimeout       408: the body did not arrive in time
│   ├── PayloadTooLarge      413: body over the configured limit
│   └── InvalidPayload       400: not JSON, or not a Salla envelope
├── RuleError            a rule file that does not load (file, line and a sentence)
├── JobRefused           job data read from Redis that is not this service's format: never run
├── SallaError           the Admin API answered with an error (status and body attached)
│   ├── SallaAuthError       401/403: token invalid, expired or revoked (or a missing scope)
│   ├── SallaNotFound        404: the store has no such order (any more)
│   ├── SallaValidationError 422: Salla refused the request body
│   ├── SallaRateLimited     429: carries Retry-After
│   ├── SallaUnavailable     5xx: transient on Salla's side
│   └── OutcomeUnknown       no answer: the call may have applied (never resent blindly)
├── SandboxError         the development sandbox (service/sandbox/)
│   ├── SandboxStateError    its state file cannot be read
│   └── SandboxNotServing    a webhook must go out and no server loop runs (a RuntimeError)
└── (private) signals raised and caught inside one module; callers never see them:
        delivery.flush.StopFlush   nothing more can be sent for this store now
        app._Disconnected          the client left before its body arrived
        sandbox.control._BadRequest  a sandbox control request's 400
        supervisor.Stopped, supervisor.ChildExited   why `run` stops its children

`cli.Refused` is not in the tree on purpose: it is how the command line shows a `ConfigError`
(a `click.ClickException`, which click prints and turns into exit 2).
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Base of every error this service raises on purpose."""


class ConfigError(ServiceError):
    """The settings or the machine cannot be used: the message says which and why (one
    sentence), `hint` what to do about it. The command line prints both and exits 2."""

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class AdminInputError(ServiceError, ValueError):
    """An operator's request that cannot be answered as asked (a bad date, a bad range, a bad
    id); a ValueError too, as it was before it joined the tree."""


class WebhookError(ServiceError):
    status_code = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidSignature(WebhookError):
    status_code = 401


class PayloadTooLarge(WebhookError):
    status_code = 413


class RequestTimeout(WebhookError):
    status_code = 408


class InvalidPayload(WebhookError):
    status_code = 400


class JobRefused(ServiceError):
    """Job data in Redis that is not this service's msgpack (a pickle, say): it is not run."""


class RuleError(ServiceError):
    """One or more problems in rule files, each as `file:line: sentence`."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class SallaError(ServiceError):
    """Salla answered with a status this client does not treat as success."""

    def __init__(self, status: int, body: Any, message: str = "") -> None:
        self.status = status
        self.body = body
        super().__init__(message or f"Salla answered {status}: {body!r}")


class SallaAuthError(SallaError):
    pass


class SallaNotFound(SallaError):
    """404: what was asked for does not exist (an order Salla no longer has)."""


class SallaValidationError(SallaError):
    pass


class SallaRateLimited(SallaError):
    def __init__(self, status: int, body: Any, retry_after_s: float) -> None:
        super().__init__(status, body, f"Salla rate limit hit; retry after {retry_after_s:g}s")
        self.retry_after_s = retry_after_s


class SallaUnavailable(SallaError):
    pass


class OutcomeUnknown(SallaError):
    """The request may have reached Salla but no answer came (timeout, dropped connection).

    Never resend on this: the points may have been applied. Reconcile against the history.
    """


class SandboxError(ServiceError):
    """The development sandbox (service/sandbox/) cannot do what was asked."""


class SandboxStateError(SandboxError):
    """The state file cannot be read as the sandbox's state."""


class SandboxNotServing(SandboxError, RuntimeError):
    """A webhook must be sent, and the sandbox has no server loop to send it from."""
