"""The topic scheme: build and parse only through fedbus.topics."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedbus import topics
from fedbus.errors import ConfigError

ID_CHARS = "ABCXYZabcxyz0189_.-"
node_ids = st.text(alphabet=ID_CHARS, min_size=1, max_size=64).filter(lambda s: s[0] not in ".-")
prefixes = st.lists(st.text(alphabet=ID_CHARS, min_size=1, max_size=8), min_size=1, max_size=3).map(
    "/".join
)


def test_broadcast_and_directed_forms() -> None:
    assert topics.broadcast("run-1", "server", "model") == "fedbus/run-1/out/server/model"
    assert topics.directed("run-1", "server", "client-0") == "fedbus/run-1/to/server/client-0"
    assert topics.inbox_filter("run-1", "client-0") == "fedbus/run-1/to/client-0/+"
    assert topics.broadcast_filter("run-1") == "fedbus/run-1/out/+/#"
    assert topics.broadcast_filter("run-1", "server") == "fedbus/run-1/out/server/#"
    assert topics.broadcast_filter("run-1", "server", "model") == "fedbus/run-1/out/server/model"
    assert topics.broadcast_filter("run-1", channel="join") == "fedbus/run-1/out/+/join"
    assert topics.broadcast("r", "a", "b", prefix="lab/fl") == "lab/fl/r/out/a/b"


def test_parse_both_forms() -> None:
    out = topics.parse("fedbus/run-1/out/server/model")
    assert out == topics.Topic(
        prefix="fedbus", run="run-1", form="out", sender="server", channel="model"
    )
    to = topics.parse("fedbus/run-1/to/server/client-0")
    assert to == topics.Topic(
        prefix="fedbus", run="run-1", form="to", sender="client-0", recipient="server"
    )
    assert topics.parse("lab/fl/r/to/a/b", prefix="lab/fl") is not None


def test_parse_depends_on_the_prefix_it_is_asked_with() -> None:
    # parse is cached: the same topic under another prefix must not hit the same entry.
    topic = "lab/fl/r/to/a/b"
    assert topics.parse(topic) is None
    assert topics.parse(topic, prefix="lab/fl") == topics.Topic(
        prefix="lab/fl", run="r", form="to", sender="b", recipient="a"
    )
    assert topics.parse(topic) is None
    assert topics.parse("fedbus/r/out/s/c") is topics.parse("fedbus/r/out/s/c")


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "fedbus",
        "fedbus/",
        "other/run-1/out/server/model",
        "fedbusX/run-1/out/server/model",
        "fedbus/run-1/out/server",
        "fedbus/run-1/out/server/model/extra",
        "fedbus/run-1/sideways/server/model",
        "fedbus/run-1/out/+/model",
        "fedbus/run-1/out/server/#",
        "fedbus/run 1/out/server/model",
        "fedbus/run-1/to//client-0",
        "fedbus/run-1/to/.hidden/client-0",
        "$SYS/broker/uptime",
    ],
)
def test_foreign_topics_parse_to_none(topic: str) -> None:
    assert topics.parse(topic) is None


@pytest.mark.parametrize(
    "bad",
    ["", "a/b", "+", "#", "a+", "a#b", "$SYS", "with space", ".dot", "-dash", "x" * 65, "é", "a\0"],
)
def test_invalid_ids_are_config_errors(bad: str) -> None:
    with pytest.raises(ConfigError):
        topics.validate_id(bad)
    with pytest.raises(ConfigError):
        topics.broadcast("run", bad, "model")
    with pytest.raises(ConfigError):
        topics.broadcast("run", "server", bad)
    with pytest.raises(ConfigError):
        topics.directed(bad, "a", "b")
    with pytest.raises(ConfigError):
        topics.directed("run", bad, "b")
    with pytest.raises(ConfigError):
        topics.directed("run", "a", bad)
    with pytest.raises(ConfigError):
        topics.inbox_filter("run", bad)
    with pytest.raises(ConfigError):
        topics.broadcast_filter("run", bad)


def test_validate_id_accepts_and_returns() -> None:
    for ok in ("a", "client-0", "edge_b.1", "X" * 64, "_x", "0"):
        assert topics.validate_id(ok) == ok


def test_validate_id_names_what_was_wrong() -> None:
    with pytest.raises(ConfigError, match="run id"):
        topics.validate_id("a/b", what="run id")


def test_non_str_id_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        topics.validate_id(3)  # type: ignore[arg-type]


@pytest.mark.parametrize("prefix", ["", "/fedbus", "fedbus/", "a//b", "a/+", "a/#", "a b"])
def test_invalid_prefixes(prefix: str) -> None:
    with pytest.raises(ConfigError):
        topics.broadcast("run", "a", "b", prefix=prefix)
    with pytest.raises(ConfigError):
        topics.inbox_filter("run", "a", prefix=prefix)


@settings(max_examples=300, deadline=None)
@given(prefix=prefixes, run=node_ids, a=node_ids, b=node_ids)
def test_round_trip(prefix: str, run: str, a: str, b: str) -> None:
    out = topics.parse(topics.broadcast(run, a, b, prefix=prefix), prefix=prefix)
    assert out == topics.Topic(prefix=prefix, run=run, form="out", sender=a, channel=b)
    to = topics.parse(topics.directed(run, a, b, prefix=prefix), prefix=prefix)
    assert to == topics.Topic(prefix=prefix, run=run, form="to", sender=b, recipient=a)
    # the inbox filter matches exactly the directed topics of its recipient
    assert (
        topics.inbox_filter(run, a, prefix=prefix)[:-1]
        == topics.directed(run, a, b, prefix=prefix)[: -len(b)]
    )


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80))
def test_parse_never_raises(topic: str) -> None:
    parsed = topics.parse(topic)
    if parsed is not None:
        assert topic.split("/")[2] == parsed.form
