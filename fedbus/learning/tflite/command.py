"""``fedbus export``: a results folder's ``model.msgpack`` as a ``.tflite`` file.

Registered by `fedbus.cli` through `add_command`, which imports nothing
heavy: the model file reader, the topology loader and the writer load only
when the command runs. Those two readers belong to higher layers
(`fedbus.nodes.modelfile`, `fedbus.topology`); importing them here, inside
the command's handler, keeps `fedbus.learning.tflite` itself free of them.

The file is the architecture's template patched with the weights (exactly
what a node serving the model runs); ``--manifest`` also writes the
template's slots as JSON, so a board can patch later rounds itself with numpy.
A ``model: {factory: ...}`` topology goes through litert-torch instead
(`fedbus.learning.tflite.torch_route`, the ``litert`` extra): without it the
command says what to install and exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from fedbus.errors import ConfigError, DecodeError

__all__ = ["add_command", "run"]

_DIGITS_IMAGE = (1, 8, 8)


def add_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``fedbus export`` on the CLI's sub-parsers."""
    parser = sub.add_parser(
        "export",
        help="write a model.msgpack as a .tflite file (logreg, mlp, cnn; factory models with "
        "the litert extra)",
        description="Write the built-in model in MODEL.msgpack (a results folder's global model) "
        "as a .tflite file for TFLite runtimes (ai-edge-litert, tflite-runtime). The model family "
        "is read from the weights and checked against --topology or --model-spec. A topology's "
        "factory (torch) model is converted with litert-torch (pip install 'fedbus[litert]'). "
        "Exit 0 on success, 2 for an invalid model or topology, 1 when the file cannot be "
        "written or litert-torch is missing (docs/tflite.md).",
    )
    parser.add_argument("model", metavar="MODEL.msgpack", help="the weights (results folder)")
    spec = parser.add_mutually_exclusive_group()
    spec.add_argument("--topology", metavar="TOPOLOGY.yaml", help="the run's topology file")
    spec.add_argument(
        "--model-spec",
        metavar="SPEC",
        help="a model: value, e.g. mlp or '{kind: mlp, hidden: [64, 32]}' (YAML)",
    )
    parser.add_argument(
        "--image-shape",
        metavar="C,H,W",
        help="the cnn's input (default: 1,8,8 for digits, else the smallest square that fits)",
    )
    parser.add_argument("--out", required=True, metavar="FILE.tflite", help="where to write")
    parser.add_argument(
        "--int8", action="store_true", help="int8 weights, per channel (about 4x smaller)"
    )
    parser.add_argument("--manifest", metavar="FILE.json", help="also write the patch manifest")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Handle ``fedbus export``; returns the exit status."""
    from fedbus.learning.tflite.arch import architecture_of
    from fedbus.learning.tflite.patch import patch
    from fedbus.learning.tflite.template import TemplateError, compile_template
    from fedbus.learning.tflite.torch_route import LitertUnavailable
    from fedbus.nodes.modelfile import decode_model

    try:
        weights = decode_model(Path(args.model).read_bytes())
        factory = _factory_topology(args)
        if factory is not None:
            model, manifest, what = _export_factory(args, factory, weights)
        else:
            spec, image_shape = _spec(args)
            arch = architecture_of(weights, spec, image_shape=image_shape)
            template = compile_template(arch, int8=args.int8)
            model, manifest = patch(template, weights), template.manifest()
            sizes = "-".join(str(n) for n in (arch.num_features, *arch.hidden, arch.num_classes))
            what = f"{arch.kind} {sizes}, {'int8 weights' if args.int8 else 'float32'}"
    except (OSError, LitertUnavailable) as exc:
        print(f"fedbus export: {exc}", file=sys.stderr)
        return 1
    except (ConfigError, DecodeError, TemplateError) as exc:
        print(f"fedbus export: {args.model}: {exc}", file=sys.stderr)
        return 2
    try:
        Path(args.out).write_bytes(model)
        if args.manifest:
            Path(args.manifest).write_text(json.dumps(manifest, indent=1) + "\n")
    except OSError as exc:
        print(f"fedbus export: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {what}, {len(model)} bytes")
    return 0


def _factory_topology(args: argparse.Namespace) -> Any:
    """The topology when ``--topology`` names a factory model, else None."""
    if not args.topology:
        return None
    from fedbus.topology import load_topology

    topology = load_topology(args.topology)
    return topology if topology.model.factory is not None else None


def _export_factory(
    args: argparse.Namespace, topology: Any, weights: Any
) -> tuple[bytes, dict[str, Any], str]:
    """Convert the topology's factory module once with litert-torch and patch ``weights`` in.

    The module is built the way the run's server builds it (its data fixes
    the input width and classes), so the factory is called exactly as in the run.

    Raises:
        LitertUnavailable: litert-torch is not installed (checked first, before any data loads).
        ConfigError: ``--int8``, or the factory gives no torch module.
        TemplateError: the converted model cannot be patched safely.
    """
    from fedbus.learning.tflite.torch_route import compile_torch_template, litert_torch

    if args.int8:
        raise ConfigError("--int8 is for the built-in families only", path="--int8")
    litert_torch()
    from fedbus.launch.build import build_data, server_trainer

    data = build_data(topology, Path(args.topology).parent)
    module = getattr(server_trainer(topology, data), "module", None)
    if module is None:
        raise ConfigError(
            "the factory gives a Trainer, not a torch nn.Module: nothing to convert",
            path="model.factory",
        )
    input_shape = (1, *data.test.x.shape[1:])
    template = compile_torch_template(module, input_shape)
    what = f"factory {topology.model.factory} via litert-torch, input {list(input_shape)}, float32"
    return template.patch(weights), template.manifest(), what


def _spec(args: argparse.Namespace) -> tuple[Any, tuple[int, int, int] | None]:
    """The ``model:`` spec and cnn image shape the arguments give (None: infer)."""
    image_shape = _parse_shape(args.image_shape) if args.image_shape else None
    if args.topology:
        from fedbus.topology import load_topology

        topology = load_topology(args.topology)
        model = topology.model
        spec: Any = {"kind": model.kind}
        if model.kind == "mlp":
            spec["hidden"] = list(model.hidden)
        if image_shape is None and model.kind == "cnn" and _is_digits(topology):
            image_shape = _DIGITS_IMAGE
        return spec, image_shape
    if args.model_spec:
        import yaml

        try:
            spec = yaml.safe_load(args.model_spec)
        except yaml.YAMLError as exc:
            raise ConfigError(f"not YAML: {exc}", path="--model-spec") from exc
        if not isinstance(spec, str | dict):
            raise ConfigError("expected a kind or a mapping", path="--model-spec")
        return spec, image_shape
    return None, image_shape


def _is_digits(topology: Any) -> bool:
    return topology.data is not None and topology.data.dataset == "digits"


def _parse_shape(text: str) -> tuple[int, int, int]:
    try:
        c, h, w = (int(p) for p in text.split(","))
    except ValueError as exc:
        raise ConfigError(f"expected C,H,W, got {text!r}", path="--image-shape") from exc
    return c, h, w
