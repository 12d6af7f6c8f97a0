"""Every error shoprec raises on purpose.

ShoprecError                 base; ``retriable`` says whether trying again may help
├── ConfigError              a setting is missing or wrong (fix the environment)
├── StackError               the local stack could not start, or a part is unhealthy
├── InvalidEvent             an input record breaks the contract (goes to the DLQ)
├── DependencyUnavailable    Redis, Kafka or Triton did not answer (retriable)
│   └── RankerUnavailable    Triton's ranker failed; recommendations degrade
├── DatasetError             a dataset folder is missing or malformed
├── ReplayError              a replay, rebuild, diff or re-injection cannot run as asked
└── Interrupted              a long job was asked to stop (SIGINT/SIGTERM) and left nothing behind
"""

from __future__ import annotations

import threading


class ShoprecError(Exception):
    """Base of every shoprec error."""

    retriable: bool = False


class ConfigError(ShoprecError):
    """A setting is missing or inconsistent."""


class StackError(ShoprecError):
    """The embedded stack (Kafka/Tansu, Redis, Triton) failed to start or is unhealthy."""


class InvalidEvent(ShoprecError):
    """An input record that breaks the event contract.

    ``reason`` is a short machine-readable code (e.g. ``not_json``,
    ``missing_field``); ``detail`` is the human explanation.  Both travel
    with the original bytes to the dead-letter topic.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class DependencyUnavailable(ShoprecError):
    """A service on the hot path did not answer in time."""

    retriable = True


class RankerUnavailable(DependencyUnavailable):
    """Triton's ranker could not score a batch; the caller falls back to retrieval scores."""


class DatasetError(ShoprecError):
    """A dataset folder does not hold the canonical ``items.jsonl.gz``/``events.jsonl.gz``."""


class ReplayError(ShoprecError):
    """An operator tool (replay, rebuild-state, diff, dlq replay) cannot run as asked;
    the message says what to change."""


class Interrupted(ShoprecError):
    """A long job (a learner round, ``train --from-topics``) saw its stop flag at one of its
    checkpoints and gave up; it removed what it had half written."""

    @classmethod
    def check(cls, stop: threading.Event | None, doing: str) -> None:
        """Raise if ``stop`` is set: the job was ``doing`` this when it stopped."""
        if stop is not None and stop.is_set():
            raise cls(f"stopped while {doing}")


def describe(exc: BaseException) -> str:
    """``Type: message`` of an infrastructure error, for a log line or an error message.

    redis-py 8's ``repr`` of its errors is only a category (``network:ConnectionError``),
    which hides the endpoint that failed; on-call needs that.  Not for errors raised while
    processing an event, whose messages may quote it (:func:`shoprec.redact.exception_ref`).
    """
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
