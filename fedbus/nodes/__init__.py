"""Node runtimes: asyncio drivers of the protocol machines over a transport.

`ServerNode` and `ClientNode` run the FedAvg machines (`fedbus.protocols.fedavg`)
over any `fedbus.transport.base.Transport` through a `Messenger`; the same
code runs inside ``fedbus run`` and as a ``fedbus node`` agent. `Driver` is
the generic loop (events in, commands out, deadlines as ticks);
`ResultsWriter` writes the results folder of DESIGN.md section 3.
"""

from fedbus.nodes.client import ClientNode, ClientOutcome, ClientSettings, Connect
from fedbus.nodes.driver import Driver, Executor
from fedbus.nodes.faults import FaultPlan
from fedbus.nodes.modelfile import (
    Checkpoint,
    decode_model,
    encode_model,
    read_checkpoint,
    write_checkpoint,
)
from fedbus.nodes.results import ResultsWriter
from fedbus.nodes.server import ServerNode, ServerObserver, ServerOutcome, ServerSettings

__all__ = [
    "Checkpoint",
    "ClientNode",
    "ClientOutcome",
    "ClientSettings",
    "Connect",
    "Driver",
    "Executor",
    "FaultPlan",
    "ResultsWriter",
    "ServerNode",
    "ServerObserver",
    "ServerOutcome",
    "ServerSettings",
    "decode_model",
    "encode_model",
    "read_checkpoint",
    "write_checkpoint",
]
