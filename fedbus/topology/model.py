"""Config dataclasses for the sections of a topology (DESIGN.md section 4).

Each class is frozen, keyword-only and validates itself (STYLE.md section 5):
it collects every problem of its own fields, with paths relative to itself,
and raises one `TopologyError`. Build them from YAML with
`fedbus.topology.load_topology`, or directly in Python.

The node tree lives in `fedbus.topology.nodes`, the root `Topology` in
`fedbus.topology.root`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, Literal

from fedbus.config import DEFAULT_MAX_PAYLOAD_BYTES, BrokerConfig
from fedbus.topology.problems import Checked

__all__ = [
    "DATASETS",
    "FACTORY_RE",
    "MODEL_KINDS",
    "PARTITION_KINDS",
    "AggregatorSpec",
    "BrokerSpec",
    "ChurnFault",
    "CrashFault",
    "DataConfig",
    "DropoutFault",
    "Fault",
    "ModelConfig",
    "NpzConfig",
    "PartitionConfig",
    "StragglerFault",
    "SyntheticConfig",
    "TrainingConfig",
]

DATASETS: Final = ("digits", "synthetic", "npz")
PARTITION_KINDS: Final = ("iid", "dirichlet", "shards", "natural")
MODEL_KINDS: Final = ("logreg", "mlp", "cnn")
FACTORY_RE: Final = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
"""``package.module:attribute`` as in entry points; checked here, imported only at run time."""
_NAME_RE: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _choice(name: str, value: object, choices: tuple[str, ...]) -> Iterator[tuple[str, str]]:
    if value not in choices:
        yield name, f"must be one of {', '.join(choices)}; got {value!r}"


def _fraction(name: str, value: float) -> Iterator[tuple[str, str]]:
    if not 0.0 < value <= 1.0:
        yield name, f"must be in (0, 1], got {value}"


def _probability(name: str, value: float) -> Iterator[tuple[str, str]]:
    if not 0.0 <= value <= 1.0:
        yield name, f"must be in [0, 1], got {value}"


def _positive(name: str, value: float) -> Iterator[tuple[str, str]]:
    if not (value > 0 and math.isfinite(value)):
        yield name, f"must be a positive number, got {value}"


def _at_least(name: str, value: int, low: int) -> Iterator[tuple[str, str]]:
    if value < low:
        yield name, f"must be at least {low}, got {value}"


@dataclass(frozen=True, slots=True, kw_only=True)
class BrokerSpec(Checked):
    """Which broker a federation (or an edge group) uses.

    Attributes:
        kind: ``embedded`` (started by ``fedbus run``), ``memory`` (the
            in-process bus, no broker) or ``url`` (an existing broker).
        config: the connection settings when ``kind`` is ``url``.
        max_payload_bytes: largest PUBLISH; bigger messages are chunked.
            For ``url`` it equals ``config.max_payload_bytes``.
        client: the MQTT client nodes started by ``fedbus run`` use: ``lean``
            (`fedbus.transport.lean.LeanMqttTransport`, MQTT 3.1.1), ``paho``
            (`fedbus.transport.mqtt.MqttTransport`, MQTT 5 with a 3.1.1
            fallback) or ``auto``: lean to the embedded broker, paho to a URL.
    """

    kind: Literal["embedded", "memory", "url"] = "embedded"
    config: BrokerConfig | None = None
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    client: Literal["auto", "lean", "paho"] = "auto"

    @property
    def lean(self) -> bool:
        """Whether MQTT nodes connect with `LeanMqttTransport` (see ``client``)."""
        return self.client == "lean" or (self.client == "auto" and self.kind == "embedded")

    def _problems(self) -> Iterator[tuple[str, str]]:
        yield from _choice("", self.kind, ("embedded", "memory", "url"))
        yield from _choice("client", self.client, ("auto", "lean", "paho"))
        if self.client == "lean" and self.config is not None and self.config.protocol == "5":
            yield "client", "the lean client speaks MQTT 3.1.1 only"
        if (self.kind == "url") != (self.config is not None):
            yield "url", "a broker URL goes with kind 'url' and only with it"
        if self.config is not None and self.config.max_payload_bytes != self.max_payload_bytes:
            yield "max_payload_bytes", "differs from the URL config's max_payload_bytes"
        yield from _at_least("max_payload_bytes", self.max_payload_bytes, 1024)

    @classmethod
    def from_url(cls, url: str, **overrides: Any) -> BrokerSpec:
        """A ``url`` spec via `BrokerConfig.from_url` (raises `ConfigError` on a bad URL)."""
        config = BrokerConfig.from_url(url, **overrides)
        return cls(kind="url", config=config, max_payload_bytes=config.max_payload_bytes)

    @property
    def url(self) -> str:
        """``embedded``, ``memory`` or the broker URL without credentials (for summaries)."""
        return self.config.url if self.config is not None else self.kind


@dataclass(frozen=True, slots=True, kw_only=True)
class SyntheticConfig(Checked):
    """LEAF / FedProx Synthetic(alpha, beta): one device per data-holding node.

    Attributes:
        alpha: variance of the per-device model mean (0 allowed: identical models).
        beta: variance of the per-device input mean (0 allowed).
        samples_per_client: fixed sample count; None draws floor(lognormal(4, 2)) + 50.
    """

    alpha: float = 1.0
    beta: float = 1.0
    samples_per_client: int | None = None

    def _problems(self) -> Iterator[tuple[str, str]]:
        for name, value in (("alpha", self.alpha), ("beta", self.beta)):
            if not (value >= 0 and math.isfinite(value)):
                yield name, f"must be a number >= 0, got {value}"
        if self.samples_per_client is not None:
            yield from _at_least("samples_per_client", self.samples_per_client, 1)


@dataclass(frozen=True, slots=True, kw_only=True)
class NpzConfig(Checked):
    """An ``.npz`` file with arrays ``x`` and ``y``.

    Attributes:
        path: the file; relative paths are relative to the topology file.
    """

    path: str

    def _problems(self) -> Iterator[tuple[str, str]]:
        if not self.path:
            yield "path", "must not be empty"


@dataclass(frozen=True, slots=True, kw_only=True)
class PartitionConfig(Checked):
    """How the dataset is split among data-holding nodes (seeded by the topology seed).

    Attributes:
        kind: ``iid``, ``dirichlet`` (label skew), ``shards`` (sorted by label,
            cut into shards) or ``natural`` (the dataset's own devices; synthetic).
        alpha: Dirichlet concentration (dirichlet only); smaller is more skewed.
        shards_per_client: shards each node gets (shards only).
    """

    kind: Literal["iid", "dirichlet", "shards", "natural"] = "iid"
    alpha: float = 0.5
    shards_per_client: int = 2

    def _problems(self) -> Iterator[tuple[str, str]]:
        yield from _choice("kind", self.kind, PARTITION_KINDS)
        yield from _positive("alpha", self.alpha)
        yield from _at_least("shards_per_client", self.shards_per_client, 1)


@dataclass(frozen=True, slots=True, kw_only=True)
class DataConfig(Checked):
    """The dataset and how it is partitioned.

    Attributes:
        dataset: ``digits``, ``synthetic`` or ``npz``.
        synthetic: parameters when ``dataset`` is synthetic.
        npz: the file when ``dataset`` is npz (required then).
        partition: how samples are spread over data-holding nodes. The YAML
            default is ``natural`` for synthetic and ``iid`` otherwise.
        test_fraction: share held out as the central test split.
    """

    dataset: Literal["digits", "synthetic", "npz"] = "digits"
    synthetic: SyntheticConfig | None = None
    npz: NpzConfig | None = None
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    test_fraction: float = 0.2

    def _problems(self) -> Iterator[tuple[str, str]]:
        yield from _choice("dataset", self.dataset, DATASETS)
        if self.synthetic is not None and self.dataset != "synthetic":
            yield "synthetic", "given but dataset is not 'synthetic'"
        if self.npz is not None and self.dataset != "npz":
            yield "npz", "given but dataset is not 'npz'"
        if self.dataset == "npz" and self.npz is None:
            yield "npz", "dataset 'npz' needs npz: {path: FILE}"
        if self.partition.kind == "natural" and self.dataset != "synthetic":
            yield (
                "partition.kind",
                "'natural' needs dataset 'synthetic' (it has devices of its own)",
            )
        if not 0.0 < self.test_fraction < 1.0:
            yield "test_fraction", f"must be in (0, 1), got {self.test_fraction}"


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelConfig(Checked):
    """The model every node trains: a built-in family or a user factory.

    Attributes:
        kind: ``logreg``, ``mlp`` or ``cnn``; None when ``factory`` is given.
        hidden: hidden layer widths of the mlp.
        factory: ``"package.module:function"`` returning the model (torch).
    """

    kind: Literal["logreg", "mlp", "cnn"] | None = "mlp"
    hidden: tuple[int, ...] = (32,)
    factory: str | None = None

    def _problems(self) -> Iterator[tuple[str, str]]:
        if (self.kind is None) == (self.factory is None):
            yield "", "give exactly one of kind and factory"
        if self.kind is not None:
            yield from _choice("kind", self.kind, MODEL_KINDS)
        if self.factory is not None and not FACTORY_RE.match(self.factory):
            yield "factory", f"must look like 'package.module:function', got {self.factory!r}"
        for i, width in enumerate(self.hidden):
            yield from _at_least(f"hidden[{i}]", width, 1)


@dataclass(frozen=True, slots=True, kw_only=True)
class TrainingConfig(Checked):
    """Local training on each node.

    Attributes:
        epochs: local epochs per round (E).
        batch_size: minibatch size (B).
        lr: learning rate.
        mu: FedProx proximal coefficient; 0 is plain FedAvg.
    """

    epochs: int = 1
    batch_size: int = 16
    lr: float = 0.05
    mu: float = 0.0

    def _problems(self) -> Iterator[tuple[str, str]]:
        yield from _at_least("epochs", self.epochs, 1)
        yield from _at_least("batch_size", self.batch_size, 1)
        yield from _positive("lr", self.lr)
        if not (self.mu >= 0 and math.isfinite(self.mu)):
            yield "mu", f"must be a number >= 0, got {self.mu}"


@dataclass(frozen=True, slots=True, kw_only=True)
class AggregatorSpec(Checked):
    """Which aggregator combines updates, by name or by factory.

    The names are checked against the aggregator registry by whoever owns it
    (see the ``check_aggregator`` hook of `load_topology`); here only the shape.

    Attributes:
        kind: a registered aggregator name (``fedavg``); None with ``factory``.
        factory: ``"package.module:function"`` building the aggregator.
        params: keyword parameters for the aggregator (``{beta: 0.9}``).
    """

    kind: str | None = "fedavg"
    factory: str | None = None
    params: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        # A read-only view: the spec is shared by every node that aggregates.
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))
        Checked.__post_init__(self)

    def _problems(self) -> Iterator[tuple[str, str]]:
        if (self.kind is None) == (self.factory is None):
            yield "", "give exactly one of kind and factory"
        if self.kind is not None and not _NAME_RE.match(self.kind):
            yield "kind", f"must be an identifier such as 'fedavg', got {self.kind!r}"
        if self.factory is not None and not FACTORY_RE.match(self.factory):
            yield "factory", f"must look like 'package.module:function', got {self.factory!r}"
        for key in self.params:
            if not isinstance(key, str) or not _NAME_RE.match(key):
                yield "", f"parameter name {key!r} must be an identifier"

    def as_dict(self) -> dict[str, Any]:
        """The YAML mapping form, ``{kind|factory: ..., **params}``, as the aggregator registry takes it."""
        head = {"kind": self.kind} if self.kind is not None else {"factory": self.factory}
        return {**head, **self.params}

    @property
    def name(self) -> str:
        """The kind, or the factory string (for logs and summaries)."""
        return self.kind if self.kind is not None else str(self.factory)


@dataclass(frozen=True, slots=True, kw_only=True)
class CrashFault(Checked):
    """``nodes`` stop for good when ``at_round`` starts."""

    nodes: tuple[str, ...]
    at_round: int = 1

    def _problems(self) -> Iterator[tuple[str, str]]:
        if not self.nodes:
            yield "nodes", "must name at least one node"
        yield from _at_least("at_round", self.at_round, 1)


@dataclass(frozen=True, slots=True, kw_only=True)
class DropoutFault(Checked):
    """Each selected client skips a round with ``probability``."""

    probability: float

    def _problems(self) -> Iterator[tuple[str, str]]:
        yield from _probability("probability", self.probability)


@dataclass(frozen=True, slots=True, kw_only=True)
class StragglerFault(Checked):
    """Each selected client answers ``delay_s`` late with ``probability``."""

    probability: float
    delay_s: float

    def _problems(self) -> Iterator[tuple[str, str]]:
        yield from _probability("probability", self.probability)
        yield from _positive("delay_s", self.delay_s)


@dataclass(frozen=True, slots=True, kw_only=True)
class ChurnFault(Checked):
    """Each round a node leaves with ``probability`` and returns ``down_rounds`` later."""

    probability: float
    down_rounds: int = 1

    def _problems(self) -> Iterator[tuple[str, str]]:
        yield from _probability("probability", self.probability)
        yield from _at_least("down_rounds", self.down_rounds, 1)


Fault = CrashFault | DropoutFault | StragglerFault | ChurnFault
"""A fault injected in simulation; ``match`` on the class."""
