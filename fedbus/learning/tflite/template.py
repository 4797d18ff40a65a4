"""Graphs for the built-in families, templates compiled from them, and their validation.

`export_model` writes a ``.tflite`` file holding given weights; `compile_template`
writes one per architecture (cached) from random, pairwise distinct weights
and records each weight's `Slot`, then proves the template patchable before
returning it (`validate_template`): no buffer shared, no bias missing, every
slot's offset pointing at that tensor's data, and patching the compile-time
weights back reproducing the file byte for byte.

The graphs mirror the framework's forward passes exactly:

* logreg / mlp (`fedbus.learning.numpy_models.DenseNetwork`): one
  ``FULLY_CONNECTED`` per layer, ReLU fused into the hidden ones;
* cnn (`fedbus.learning.torch.DigitsCNN`): the flat input reshaped to NHWC
  (through NCHW and a ``TRANSPOSE`` when there is more than one channel),
  two ``CONV_2D`` (3x3, SAME, ReLU) each followed by a 2x2 ``MAX_POOL_2D``
  (VALID: torch's floor mode), a flatten to ``[n, h/4 * w/4 * 32]`` in NHWC
  order and the classifier, whose columns are permuted to that order.

Activations have a batch dimension of 1 whose shape signature is -1, so
`fedbus.learning.tflite.runtime.TfliteModel` can resize it for batches.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import numpy as np
import numpy.typing as npt

from fedbus.errors import FedbusError
from fedbus.learning.tflite.arch import CNN_CHANNELS, Architecture, architecture_of
from fedbus.learning.tflite.patch import Slot, Template, patch, to_tflite_layout
from fedbus.learning.tflite.quantize import quantize_per_channel
from fedbus.learning.tflite.writer import Graph, TensorDef, schema, write

__all__ = [
    "TemplateError",
    "compile_template",
    "export_model",
    "layouts",
    "template_weights",
    "validate_template",
]

_TEMPLATE_SEED = 20240917


class TemplateError(FedbusError):
    """A written template is not safely patchable: a bug in the writer, never a user error."""


_WEIGHT_OPS = ("FULLY_CONNECTED", "CONV_2D")


def layouts(arch: Architecture) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Each weight's ``(view, perm)`` from the framework layout to TFLite's (module `patch`)."""
    out: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
    for name, shape in arch.weight_shapes().items():
        if len(shape) == 1:  # biases
            out[name] = (shape, (0,))
        elif name.startswith("dense"):  # [in, out] -> [out, in]
            out[name] = (shape, (1, 0))
        elif name.startswith("conv"):  # OIHW -> OHWI
            out[name] = (shape, (0, 2, 3, 1))
        else:  # fc after a (C, H, W) flatten -> columns in (H, W, C) order
            assert arch.image_shape is not None
            _, h, w = arch.image_shape
            out[name] = ((shape[0], CNN_CHANNELS[1], h // 4, w // 4), (0, 2, 3, 1))
    return out


def template_weights(
    arch: Architecture, seed: int = _TEMPLATE_SEED
) -> dict[str, npt.NDArray[np.float32]]:
    """Random, pairwise distinct, nonzero weights to compile a template from.

    Distinct values make a misplaced offset visible; nonzero biases keep the
    file honest about having them (a converter would drop zero ones).
    """
    rng = np.random.default_rng(seed)
    shapes = arch.weight_shapes()
    total = sum(int(np.prod(s)) for s in shapes.values())
    values = (rng.permutation(total) + 1).astype(np.float32) / total * rng.choice([-1, 1], total)
    out, start = {}, 0
    for name, shape in shapes.items():
        n = int(np.prod(shape))
        out[name] = values[start : start + n].reshape(shape).astype(np.float32) * np.float32(0.3)
        start += n
    return out


def _build(
    arch: Architecture, weights: Mapping[str, Any], int8: bool
) -> tuple[Graph, dict[str, int]]:
    """The graph of ``arch`` holding ``weights``; also each weight's tensor index."""
    g = Graph()
    where: dict[str, int] = {}
    lay = layouts(arch)

    def param(name: str) -> int:
        view, perm = lay[name]
        stored = to_tflite_layout(weights[name], view, perm)
        if name.endswith(("b", "bias")):
            where[name] = g.const(name, stored)
            return where[name]
        stored = stored.reshape(stored.shape[0], -1) if not name.startswith("conv") else stored
        if not int8:
            where[name] = g.const(name, stored)
            return where[name]
        q, scales = quantize_per_channel(stored)
        where[name] = g.const(f"{name}/int8", q, scales=scales)
        return g.op("DEQUANTIZE", [where[name]], TensorDef(name, tuple(q.shape)))

    x = g.add(TensorDef("input", (1, arch.num_features), batched=True))
    g.inputs.append(x)
    if arch.image_shape is None:
        n_layers = len(arch.hidden) + 1
        for i, width in enumerate((*arch.hidden, arch.num_classes)):
            w, b = param(f"dense{i}.w"), param(f"dense{i}.b")
            act = "RELU" if i < n_layers - 1 else "NONE"
            out = TensorDef(f"dense{i}" if i < n_layers - 1 else "logits", (1, width), batched=True)
            x = g.op("FULLY_CONNECTED", [x, w, b], out, activation=act)
    else:
        c, h, wd = arch.image_shape
        if c == 1:  # NCHW and NHWC flatten alike
            x = _reshape(g, x, (h, wd, 1))
        else:
            x = _reshape(g, x, (c, h, wd))
            perm = g.const("nchw_to_nhwc", np.array([0, 2, 3, 1], np.int32))
            x = g.op("TRANSPOSE", [x, perm], TensorDef("nhwc", (1, h, wd, c), batched=True))
        for i, width in enumerate(CNN_CHANNELS, start=1):
            w, b = param(f"conv{i}.weight"), param(f"conv{i}.bias")
            out = TensorDef(f"conv{i}", (1, h, wd, width), batched=True)
            x = g.op("CONV_2D", [x, w, b], out, activation="RELU", padding="SAME")
            h, wd = h // 2, wd // 2
            x = g.op(
                "MAX_POOL_2D", [x], TensorDef(f"pool{i}", (1, h, wd, width), batched=True), size=2
            )
        x = _reshape(g, x, (h * wd * CNN_CHANNELS[1],))
        w, b = param("fc.weight"), param("fc.bias")
        out = TensorDef("logits", (1, arch.num_classes), batched=True)
        x = g.op("FULLY_CONNECTED", [x, w, b], out)
    g.outputs.append(x)
    return g, where


def _reshape(g: Graph, x: int, shape: tuple[int, ...]) -> int:
    target = (-1, *shape)
    const = g.const(f"shape{len(g.tensors)}", np.array(target, np.int32))
    out = TensorDef(f"reshape{len(g.tensors)}", (1, *shape), batched=True)
    return g.op("RESHAPE", [x, const], out, shape=target)


def export_model(
    weights: Mapping[str, Any],
    model_spec: Mapping[str, Any] | str | None = None,
    *,
    int8: bool = False,
    image_shape: tuple[int, int, int] | None = None,
) -> bytes:
    """A ``.tflite`` file computing the built-in model ``weights`` belong to.

    Args:
        weights: the framework's named weights (numpy or torch ``state_dict`` as arrays).
        model_spec: the topology's ``model:``, checked against the weights.
        int8: store weights int8 per channel (module `quantize`).
        image_shape: the cnn's ``(c, h, w)`` (see `architecture_of`).

    Raises:
        ConfigError: not a built-in model, or the schema module is missing.
    """
    arch = architecture_of(weights, model_spec, image_shape=image_shape)
    graph, _ = _build(arch, weights, int8)
    return write(graph, f"fedbus {arch.kind}").model


@lru_cache(maxsize=32)
def compile_template(arch: Architecture, *, int8: bool = False) -> Template:
    """The validated template of ``arch``, compiled once per process and flavour.

    Raises:
        ConfigError: the schema module is missing.
        TemplateError: the written file fails `validate_template` (a bug here).
    """
    seed_weights = template_weights(arch)
    graph, where = _build(arch, seed_weights, int8)
    written = write(graph, f"fedbus {arch.kind} template")
    slots = []
    for name, (view, perm) in layouts(arch).items():
        t = where[name]
        offset = written.data_offsets[t]
        assert offset is not None
        slots.append(
            Slot(
                name=name,
                shape=arch.weight_shapes()[name],
                view=view,
                perm=perm,
                dtype=graph.tensors[t].dtype,
                tensor=t,
                offset=offset,
                scale_offset=written.scale_offsets[t],
            )
        )
    template = Template(arch, written.model, tuple(slots), int8)
    validate_template(template, seed_weights)
    return template


def validate_template(template: Template, seed_weights: Mapping[str, Any]) -> None:
    """Check that ``template`` is safely patchable (module docstring).

    Raises:
        TemplateError: a shared or deduplicated buffer, a weight op without
            bias, a slot not at its tensor's data, or a patch that does not
            reproduce the file.
    """
    s = schema()
    model = s.Model.GetRootAs(template.model, 0)
    graph = model.Subgraphs(0)
    owners: dict[int, int] = {}
    for t in range(graph.TensorsLength()):
        buf = graph.Tensors(t).Buffer()
        if buf and model.Buffers(buf).DataLength():
            _require(buf not in owners, f"tensors {owners.get(buf)} and {t} share buffer {buf}")
            owners[buf] = t
    codes = [model.OperatorCodes(i).BuiltinCode() for i in range(model.OperatorCodesLength())]
    weight_ops = {getattr(s.BuiltinOperator, name) for name in _WEIGHT_OPS}
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        if codes[op.OpcodeIndex()] in weight_ops:
            inputs = op.InputsAsNumpy()
            _require(len(inputs) == 3 and inputs[2] >= 0, f"operator {i} has no bias")
            bias = graph.Tensors(int(inputs[2])).Buffer()
            _require(
                bool(bias and model.Buffers(bias).DataLength()), f"operator {i}: bias has no data"
            )
    for slot in template.slots:
        tensor = graph.Tensors(slot.tensor)
        buf = model.Buffers(tensor.Buffer())
        start = buf._tab.Vector(buf._tab.Offset(4))  # Buffer.data is the table's first field
        _require(start == slot.offset, f"{slot.name}: offset {slot.offset}, data at {start}")
        _require(buf.DataLength() == slot.nbytes, f"{slot.name}: {buf.DataLength()} bytes")
        if slot.scale_offset is not None:
            scales = np.frombuffer(template.model, "<f4", slot.channels, slot.scale_offset)
            _require(
                np.array_equal(scales, tensor.Quantization().ScaleAsNumpy()),
                f"{slot.name}: scales not at {slot.scale_offset}",
            )
    _require(patch(template, seed_weights) == template.model, "patching does not round-trip")


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise TemplateError(message)
