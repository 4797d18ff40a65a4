"""The exception tree, as drawn in the fedbus.errors docstring."""

from __future__ import annotations

import pytest

from fedbus import errors
from fedbus.errors import (
    BrokerError,
    ConfigError,
    ConnectError,
    DecodeError,
    EncodeError,
    FedbusError,
    IncompatibleVersion,
    LocalProtocolError,
    PayloadTooLargeError,
    ProtocolError,
    RemoteProtocolError,
    TransferError,
    TransportClosed,
    TransportError,
    WireError,
)

PARENTS: dict[type[BaseException], tuple[type[BaseException], ...]] = {
    FedbusError: (Exception,),
    ConfigError: (FedbusError, ValueError),
    WireError: (FedbusError,),
    DecodeError: (WireError,),
    IncompatibleVersion: (DecodeError,),
    EncodeError: (WireError,),
    PayloadTooLargeError: (FedbusError, ValueError),
    ProtocolError: (FedbusError,),
    LocalProtocolError: (ProtocolError,),
    RemoteProtocolError: (ProtocolError,),
    TransportError: (FedbusError, ConnectionError),
    ConnectError: (TransportError,),
    TransportClosed: (TransportError,),
    TransferError: (FedbusError,),
    BrokerError: (FedbusError,),
}


@pytest.mark.parametrize("cls", list(PARENTS), ids=lambda c: c.__name__)
def test_hierarchy(cls: type[BaseException]) -> None:
    assert cls.__bases__ == PARENTS[cls]


def test_every_exported_error_is_in_the_tree() -> None:
    assert {getattr(errors, n) for n in errors.__all__} == set(PARENTS)


def test_every_error_is_drawn_in_the_docstring() -> None:
    doc = errors.__doc__ or ""
    for cls in PARENTS:
        if cls is not FedbusError:
            assert f"── {cls.__name__}" in doc, cls.__name__


def test_protocol_error_is_abstract() -> None:
    with pytest.raises(TypeError, match="abstract"):
        ProtocolError("who broke it?")
    local = LocalProtocolError("we did")
    remote = RemoteProtocolError("they did")
    assert isinstance(local, ProtocolError)
    assert isinstance(remote, ProtocolError)
    assert str(local) == "we did"
    with pytest.raises(ProtocolError):
        raise remote


def test_config_error_str_with_path_and_line() -> None:
    assert str(ConfigError("must be positive", path="protocol.rounds", line=12)) == (
        "protocol.rounds (line 12): must be positive"
    )
    assert str(ConfigError("must be positive", path="protocol.rounds")) == (
        "protocol.rounds: must be positive"
    )
    assert str(ConfigError("bad", line=3)) == "line 3: bad"
    assert str(ConfigError("bad")) == "bad"
    err = ConfigError("x", path="a.b", line=1)
    assert (err.message, err.path, err.line) == ("x", "a.b", 1)
    assert err.args == ("a.b (line 1): x",)
    with pytest.raises(ValueError, match=r"a\.b"):
        raise err


def test_incompatible_version_keeps_the_version() -> None:
    err = IncompatibleVersion("v9", version=9)
    assert err.version == 9
    assert IncompatibleVersion("unknown").version is None
    assert isinstance(err, DecodeError)


def test_transport_errors_are_connection_errors() -> None:
    with pytest.raises(ConnectionError):
        raise TransportClosed("closed")

    def connect() -> None:
        try:
            raise OSError("refused")
        except OSError as exc:
            raise ConnectError("cannot reach broker") from exc

    with pytest.raises(ConnectError) as info:
        connect()
    assert isinstance(info.value.__cause__, OSError)
