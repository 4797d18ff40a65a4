"""Readers shared by the top level and the edges: brokers and aggregators."""

from __future__ import annotations

from fedbus.config import DEFAULT_MAX_PAYLOAD_BYTES
from fedbus.errors import ConfigError
from fedbus.topology.model import AggregatorSpec, BrokerSpec
from fedbus.topology.reader import Context, Section, plain_data, type_name
from fedbus.topology.yamlpos import Located

__all__ = ["read_aggregator", "read_broker"]

_BROKER_KEYS = (
    "url",
    "username",
    "password_env",
    "ca_file",
    "cert_file",
    "key_file",
    "max_payload_bytes",
    "client",
)
_URL_ONLY_KEYS = _BROKER_KEYS[1:-2]


def read_broker(ctx: Context, node: Located | None, path: str, *, top_level: bool) -> BrokerSpec:
    """``embedded`` | ``memory`` | URL | mapping with ``url`` and connection settings."""
    if node is None or node.value is None:
        return BrokerSpec()
    if isinstance(node.value, str):
        section = None
        url = node.value
    elif node.is_mapping:
        section = Section(ctx, node, path, _BROKER_KEYS)
        url = section.text("url", "embedded")
    else:
        ctx.add(path, f"must be embedded, memory, a URL or a mapping, got {type_name(node.value)}")
        return BrokerSpec()
    size = (
        section.integer("max_payload_bytes", DEFAULT_MAX_PAYLOAD_BYTES)
        if section
        else DEFAULT_MAX_PAYLOAD_BYTES
    )
    client = section.text("client", "auto") if section else "auto"
    url_path = f"{path}.url" if section is not None else path
    if url in ("embedded", "memory"):
        if section is not None:
            for key in _URL_ONLY_KEYS:
                if section.has(key):
                    ctx.add(section.at(key), f"applies only to a broker URL, not {url!r}")
        if url == "memory" and not top_level:
            ctx.add(url_path, "an edge broker is a URL or 'embedded'")
            return BrokerSpec()
        return ctx.build(path, BrokerSpec, kind=url, max_payload_bytes=size, client=client)
    extras: dict[str, object] = {"max_payload_bytes": size}
    if section is not None:
        for key in _URL_ONLY_KEYS:
            value = section.text(key, None)
            if value is not None:
                extras[key] = value
    try:
        spec = BrokerSpec.from_url(url, **extras)
    except ConfigError as exc:  # BrokerConfig names its field: broker.url, broker.cert_file
        field_name = (exc.path or "broker.url").rpartition(".")[2]
        ctx.add(url_path if field_name == "url" else f"{path}.{field_name}", exc.message)
        return BrokerSpec()
    return ctx.build(
        path, BrokerSpec, kind="url", config=spec.config, max_payload_bytes=size, client=client
    )


def read_aggregator(ctx: Context, node: Located | None, path: str) -> AggregatorSpec | None:
    """A name, ``{kind: name, <params>}`` or ``{factory: "pkg.mod:fn", <params>}``; None if absent."""
    if node is None or node.value is None:
        return None
    if isinstance(node.value, str):
        return ctx.build(path, AggregatorSpec, kind=node.value)
    if not node.is_mapping:
        ctx.add(
            path, f"must be a name or a mapping with kind or factory, got {type_name(node.value)}"
        )
        return AggregatorSpec()
    sec = Section(ctx, node, path, (), open_keys=True)
    factory = sec.text("factory", None)
    kind = sec.text("kind", None)
    params = {k: plain_data(v) for k, v in node.value.items() if k not in ("kind", "factory")}
    return ctx.build(path, AggregatorSpec, kind=kind, factory=factory, params=params)
