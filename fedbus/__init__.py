"""fedbus: federated learning over MQTT for IoT topologies.

The package is layered (DESIGN.md section 2): the wire format (`fedbus.codec`,
`fedbus.messages`, `fedbus.topics`) at the bottom, then `fedbus.transport`,
`fedbus.broker`, and above them protocols, nodes and topologies.
"""

from __future__ import annotations

from fedbus.errors import (
    BrokerError,
    ConfigError,
    ConnectError,
    DecodeError,
    FedbusError,
    IncompatibleVersion,
    TransferError,
    TransportClosed,
    TransportError,
)

__all__ = [
    "BrokerError",
    "ConfigError",
    "ConnectError",
    "DecodeError",
    "FedbusError",
    "IncompatibleVersion",
    "TransferError",
    "TransportClosed",
    "TransportError",
    "__version__",
]

__version__ = "0.1.0.dev0"
