"""The MQTT topic scheme. Build and parse topics only through these helpers.

Two forms, both with the node ids as whole topic levels so that broker ACLs
(mosquitto's ``%c``/``%u`` patterns, EMQX's ``${clientid}``) can confine each
node to its own topics::

    {prefix}/{run}/out/{sender}/{channel}    published by sender for whoever subscribes
                                             (model broadcasts, joins, heartbeats, wills)
    {prefix}/{run}/to/{recipient}/{sender}   directed at one node (updates, chunk
                                             requests, credits, acks)

A node may publish only topics whose sender level is its own id and must read
only ``{prefix}/{run}/to/{its id}/+`` plus the ``out`` topics it needs. The
receiver checks that the envelope's ``sender`` equals the topic's sender level.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Final, Literal

from fedbus.errors import ConfigError

__all__ = [
    "DEFAULT_PREFIX",
    "Topic",
    "broadcast",
    "broadcast_filter",
    "directed",
    "inbox_filter",
    "parse",
    "validate_id",
]

DEFAULT_PREFIX: Final = "fedbus"
_ID_RE: Final = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,63}$")
_PREFIX_RE: Final = re.compile(r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)*$")


_CACHED_TOPICS: Final = 8192
"""Topics parsed and built are cached (pure functions, immutable results).

Why: every message is parsed on arrival and every directed send builds its
topic, each a few regular-expression checks; a simulation of 1,000 clients
repeats the same few thousand topics every round.
"""


def validate_id(value: str, *, what: str = "node id") -> str:
    """Check that ``value`` can be one whole topic level and an MQTT client id.

    1 to 64 characters from ``[A-Za-z0-9_.-]``, not starting with ``.`` or
    ``-``: no ``/``, ``+``, ``#``, spaces or ``$`` (MQTT reserves ``$`` topics).

    Raises:
        ConfigError: the id is not usable.
    """
    if not isinstance(value, str) or not _ID_RE.match(value):
        raise ConfigError(
            f"{what} {value!r} must be 1-64 characters of A-Z a-z 0-9 _ . - "
            "and not start with '.' or '-'"
        )
    return value


def _check_prefix(prefix: str) -> str:
    if not _PREFIX_RE.match(prefix):
        raise ConfigError(
            f"topic prefix {prefix!r} must be '/'-separated levels of A-Z a-z 0-9 _ . -"
        )
    return prefix


def broadcast(run: str, sender: str, channel: str, *, prefix: str = DEFAULT_PREFIX) -> str:
    """Topic on which ``sender`` publishes ``channel`` (e.g. "model") for all subscribers."""
    return "/".join(
        (
            _check_prefix(prefix),
            validate_id(run, what="run id"),
            "out",
            validate_id(sender),
            validate_id(channel, what="channel"),
        )
    )


@functools.lru_cache(maxsize=_CACHED_TOPICS)
def directed(run: str, recipient: str, sender: str, *, prefix: str = DEFAULT_PREFIX) -> str:
    """Topic on which ``sender`` publishes to ``recipient`` alone."""
    return "/".join(
        (
            _check_prefix(prefix),
            validate_id(run, what="run id"),
            "to",
            validate_id(recipient),
            validate_id(sender),
        )
    )


def inbox_filter(run: str, recipient: str, *, prefix: str = DEFAULT_PREFIX) -> str:
    """Subscription filter for everything directed at ``recipient``."""
    return (
        f"{_check_prefix(prefix)}/{validate_id(run, what='run id')}/to/{validate_id(recipient)}/+"
    )


def broadcast_filter(
    run: str, sender: str | None = None, channel: str | None = None, *, prefix: str = DEFAULT_PREFIX
) -> str:
    """Subscription filter for broadcasts of one sender (or ``+`` all) on one channel (or all)."""
    s = "+" if sender is None else validate_id(sender)
    c = "#" if channel is None else validate_id(channel, what="channel")
    return f"{_check_prefix(prefix)}/{validate_id(run, what='run id')}/out/{s}/{c}"


@dataclass(frozen=True, slots=True)
class Topic:
    """A parsed fedbus topic."""

    prefix: str
    run: str
    form: Literal["out", "to"]
    sender: str
    recipient: str | None = None
    channel: str | None = None


@functools.lru_cache(maxsize=_CACHED_TOPICS)
def parse(topic: str, *, prefix: str = DEFAULT_PREFIX) -> Topic | None:
    """Parse a topic of the fedbus scheme, or return None if it is not one.

    A message on a topic that does not parse is not fedbus traffic and is
    dropped (and counted) by the receiver.
    """
    if not topic.startswith(prefix + "/"):
        return None
    levels = topic[len(prefix) + 1 :].split("/")
    if len(levels) != 4:
        return None
    run, form, a, b = levels
    if not (_ID_RE.match(run) and _ID_RE.match(a) and _ID_RE.match(b)):
        return None
    if form == "out":
        return Topic(prefix=prefix, run=run, form="out", sender=a, channel=b)
    if form == "to":
        return Topic(prefix=prefix, run=run, form="to", sender=b, recipient=a)
    return None
