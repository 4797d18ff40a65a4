"""``--export-tflite`` and ``--serve-tflite``: TFLite files for a run's server and clients.

The server's results folder gets ``model.tflite``, the newest global model,
after each completed round; a client agent serves each global model it
receives through a TFLite interpreter and reports ``tflite_accuracy``
(`fedbus.nodes.serving`). Both use one template per architecture, compiled
once per process from the run's first weights, then only patched
(docs/tflite.md). Only the built-in families (logreg, mlp, cnn) have
templates; a factory model is refused up front, with the reason, rather
than after the first round.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fedbus.errors import ConfigError
from fedbus.learning.data import Dataset
from fedbus.learning.trainer import Trainer
from fedbus.nodes.serving import TfliteServing, tflite_serving
from fedbus.topology import Topology

__all__ = [
    "FACTORY_REASON",
    "TfliteOptions",
    "add_tflite_arguments",
    "client_serving",
    "exporter",
    "model_spec",
]

FACTORY_REASON = (
    "TFLite export needs a built-in model (logreg, mlp, cnn): factory models need the "
    "litert-torch route, which is not supported yet"
)


@dataclass(frozen=True, slots=True)
class TfliteOptions:
    """What a run does with TFLite (the command-line flags).

    Attributes:
        export: the server writes ``model.tflite`` after each round.
        serve: clients serve each global model and report ``tflite_accuracy``.
        int8: int8 weights in both (weight-only, per channel; docs/tflite.md).
    """

    export: bool = False
    serve: bool = False
    int8: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TfliteOptions:
        """The options the parsed flags give (absent flags: off)."""
        return cls(
            export=bool(getattr(args, "export_tflite", False)),
            serve=bool(getattr(args, "serve_tflite", False)),
            int8=bool(getattr(args, "tflite_int8", False)),
        )


def add_tflite_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``--export-tflite``, ``--serve-tflite`` and ``--tflite-int8``."""
    parser.add_argument(
        "--export-tflite",
        action="store_true",
        help="server: write model.tflite (the newest global model) to the results after each "
        "round (logreg, mlp, cnn; docs/boards.md)",
    )
    parser.add_argument(
        "--serve-tflite",
        action="store_true",
        help="clients: serve each global model through a TFLite runtime and report its local "
        "accuracy as tflite_accuracy (needs the tflite extra; without it a warning, and "
        "training continues)",
    )
    parser.add_argument(
        "--tflite-int8", action="store_true", help="int8 weights for both (about 4x smaller)"
    )


def model_spec(topology: Topology) -> dict[str, Any]:
    """The ``model:`` section as `fedbus.learning.tflite.architecture_of` checks it.

    Raises:
        ConfigError: a factory model (no template; the litert-torch route is not supported yet).
    """
    m = topology.model
    if m.factory is not None:
        raise ConfigError(FACTORY_REASON, path="model.factory")
    spec: dict[str, Any] = {"kind": m.kind}
    if m.kind == "mlp":
        spec["hidden"] = list(m.hidden)
    return spec


def exporter(
    topology: Topology,
    weights: Mapping[str, Any],
    *,
    image_shape: tuple[int, int, int] | None,
    int8: bool = False,
) -> Callable[[Mapping[str, Any]], bytes]:
    """Weights -> ``.tflite`` bytes, with the template compiled now from ``weights``.

    Compiling before the first round makes a missing schema module or a
    model without a template fail the start, not the end of round one.

    Raises:
        ConfigError: a factory model, weights no template fits, or no schema
            module (``pip install 'fedbus[tflite]'``).
    """
    from fedbus.learning.tflite import architecture_of, compile_template, patch

    arch = architecture_of(weights, model_spec(topology), image_shape=image_shape)
    template = compile_template(arch, int8=int8)

    def export(new: Mapping[str, Any]) -> bytes:
        return patch(template, new)

    return export


def client_serving(
    topology: Topology, trainer: Trainer, *, int8: bool = False
) -> TfliteServing | None:
    """The TFLite serving of a client on its trainer's local data (None: cannot run here).

    Raises:
        ConfigError: a factory model, or a trainer without local data.
    """
    spec = model_spec(topology)
    data = getattr(trainer, "train", None)
    if not isinstance(data, Dataset):
        raise ConfigError("--serve-tflite needs a built-in trainer with local data", path="model")
    return tflite_serving(spec, data.x, data.y, image_shape=data.image_shape, int8=int8)
