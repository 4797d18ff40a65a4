"""Write a ``.tflite`` flatbuffer directly, without TensorFlow or a converter.

The graph is described by a tiny IR (`Graph`: tensors and operators) and
serialised with the ``flatbuffers`` package and the TFLite schema's generated
Python module: ``ai_edge_litert.schema_py_generated`` (shipped with the
runtime), else the pure-Python ``tflite`` package (for boards whose runtime is
tflite-runtime). Neither is vendored here.

Writing the file ourselves avoids the converters' traps (docs/tflite.md): a
zero bias is still written (converters drop it), every constant gets its own
buffer (converters merge equal ones), and each constant's data is 16-byte
aligned at an offset we know, so a template can later be patched in place
with numpy alone. `write` returns those offsets with the bytes.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np
import numpy.typing as npt

from fedbus.errors import ConfigError

__all__ = ["Graph", "OpDef", "TensorDef", "Written", "schema", "write"]

_ALIGN = 16
_DTYPES = {"float32": "FLOAT32", "int32": "INT32", "int8": "INT8"}
# DEQUANTIZE of per-channel int8 is version 5 in TFLite's op versioning; the rest is float v1.
_VERSIONS = {"DEQUANTIZE": 5}


@cache
def schema() -> Any:
    """The TFLite schema's generated module: ai-edge-litert's, else the ``tflite`` package.

    Raises:
        ConfigError: neither is installed (``pip install 'fedbus[tflite]'``).
    """
    for name in ("ai_edge_litert.schema_py_generated", "tflite"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "ModelStart"):
            return module
    raise ConfigError(
        "writing .tflite files needs ai-edge-litert or the 'tflite' package "
        "(pip install 'fedbus[tflite]')",
        path="model",
    )


@dataclass(slots=True)
class TensorDef:
    """One tensor of the graph.

    Attributes:
        name: for humans and debugging only (never used to find weights).
        shape: the static shape, batch 1 for activations.
        dtype: ``float32``, ``int32`` or ``int8``.
        data: the constant's value (any array of that dtype); None for activations.
        batched: the first dimension is the batch (shape signature -1), so the
            input can be resized.
        scales: per-channel scales along axis 0 of an int8 constant.
    """

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"
    data: npt.NDArray[Any] | None = None
    batched: bool = False
    scales: npt.NDArray[np.float32] | None = None


@dataclass(frozen=True, slots=True)
class OpDef:
    """One operator: a builtin name (``FULLY_CONNECTED``...), tensor indices, options."""

    op: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Graph:
    """A single-subgraph model under construction."""

    tensors: list[TensorDef] = field(default_factory=list)
    ops: list[OpDef] = field(default_factory=list)
    inputs: list[int] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)

    def add(self, tensor: TensorDef) -> int:
        """Append ``tensor``; returns its index."""
        self.tensors.append(tensor)
        return len(self.tensors) - 1

    def const(self, name: str, data: npt.NDArray[Any], **kw: Any) -> int:
        """Append a constant holding ``data``; returns its index."""
        return self.add(TensorDef(name, tuple(data.shape), str(data.dtype), data, **kw))

    def op(self, op: str, inputs: list[int], output: TensorDef, **options: Any) -> int:
        """Append ``op`` with a new activation tensor ``output``; returns that tensor's index."""
        out = self.add(output)
        self.ops.append(OpDef(op, tuple(inputs), (out,), options))
        return out


@dataclass(frozen=True, slots=True)
class Written:
    """A serialised model and where each constant's bytes landed.

    Attributes:
        model: the ``.tflite`` file.
        data_offsets: per tensor, the byte offset of its data (None: no data).
        scale_offsets: per tensor, the offset of its float32 scale vector (None: not quantized).
    """

    model: bytes
    data_offsets: tuple[int | None, ...]
    scale_offsets: tuple[int | None, ...]


def write(graph: Graph, description: str = "fedbus") -> Written:
    """Serialise ``graph`` to ``.tflite`` bytes (module docstring).

    Buffer 0 is the schema's empty sentinel; every constant tensor gets a
    buffer of its own, activations share buffer 0.
    """
    s = schema()
    b = _builder()
    # Flatbuffers are built back to front: constants' data first, so they sit at the file's end.
    data_vecs: dict[int, int] = {}
    for i, t in enumerate(graph.tensors):
        if t.data is not None:
            data_vecs[i] = _aligned_bytes(b, _le_bytes(t.data))
    scale_vecs: dict[int, int] = {}
    quant: dict[int, int] = {}
    for i, t in enumerate(graph.tensors):
        if t.scales is not None:
            scale_vecs[i] = _aligned_bytes(b, _le_bytes(t.scales.astype(np.float32)), len(t.scales))
            zeros = b.CreateNumpyVector(np.zeros(len(t.scales), np.int64))
            s.QuantizationParametersStart(b)
            s.QuantizationParametersAddScale(b, scale_vecs[i])
            s.QuantizationParametersAddZeroPoint(b, zeros)
            s.QuantizationParametersAddQuantizedDimension(b, 0)
            quant[i] = s.QuantizationParametersEnd(b)
    buffers = [_buffer(s, b, None)]
    buffer_of: dict[int, int] = {}
    for i in sorted(data_vecs):
        buffer_of[i] = len(buffers)
        buffers.append(_buffer(s, b, data_vecs[i]))
    tensors = [
        _tensor(s, b, t, buffer_of.get(i, 0), quant.get(i)) for i, t in enumerate(graph.tensors)
    ]
    codes = sorted({op.op for op in graph.ops}, key=[op.op for op in graph.ops].index)
    operators = [_operator(s, b, op, codes.index(op.op)) for op in graph.ops]
    op_codes = [_op_code(s, b, name) for name in codes]

    name = b.CreateString("main")
    tensors_vec = _offsets(b, s.SubGraphStartTensorsVector, tensors)
    ops_vec = _offsets(b, s.SubGraphStartOperatorsVector, operators)
    ins = b.CreateNumpyVector(np.array(graph.inputs, np.int32))
    outs = b.CreateNumpyVector(np.array(graph.outputs, np.int32))
    s.SubGraphStart(b)
    s.SubGraphAddTensors(b, tensors_vec)
    s.SubGraphAddInputs(b, ins)
    s.SubGraphAddOutputs(b, outs)
    s.SubGraphAddOperators(b, ops_vec)
    s.SubGraphAddName(b, name)
    subgraph = s.SubGraphEnd(b)

    desc = b.CreateString(description)
    codes_vec = _offsets(b, s.ModelStartOperatorCodesVector, op_codes)
    subgraphs_vec = _offsets(b, s.ModelStartSubgraphsVector, [subgraph])
    buffers_vec = _offsets(b, s.ModelStartBuffersVector, buffers)
    s.ModelStart(b)
    s.ModelAddVersion(b, 3)
    s.ModelAddOperatorCodes(b, codes_vec)
    s.ModelAddSubgraphs(b, subgraphs_vec)
    s.ModelAddDescription(b, desc)
    s.ModelAddBuffers(b, buffers_vec)
    b.Finish(s.ModelEnd(b), file_identifier=b"TFL3")
    model = bytes(b.Output())
    # An offset counts from the buffer's end to a vector's length prefix; its data follows.
    size = len(model)
    return Written(
        model=model,
        data_offsets=tuple(
            size - data_vecs[i] + 4 if i in data_vecs else None for i in range(len(graph.tensors))
        ),
        scale_offsets=tuple(
            size - scale_vecs[i] + 4 if i in scale_vecs else None for i in range(len(graph.tensors))
        ),
    )


def _le_bytes(data: npt.NDArray[Any]) -> bytes:
    """The array's bytes, C order, little-endian as flatbuffers and TFLite store them."""
    return np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("<")).tobytes()


def _builder() -> Any:
    # Through importlib: flatbuffers ships no type information, so it stays Any here.
    return importlib.import_module("flatbuffers").Builder(4096)


def _aligned_bytes(b: Any, raw: bytes, count: int | None = None) -> int:
    """A vector of ``raw`` whose data starts 16-byte aligned (kernels may load it directly)."""
    count = len(raw) if count is None else count
    elem = len(raw) // count if count else 1
    b.StartVector(elem, count, _ALIGN)
    b.head = b.head - len(raw)
    b.Bytes[b.head : b.head + len(raw)] = raw
    return int(b.EndVector())


def _offsets(b: Any, start: Any, items: list[int]) -> int:
    start(b, len(items))
    for item in reversed(items):
        b.PrependUOffsetTRelative(item)
    return int(b.EndVector())


def _buffer(s: Any, b: Any, data: int | None) -> int:
    s.BufferStart(b)
    if data is not None:
        s.BufferAddData(b, data)
    return int(s.BufferEnd(b))


def _tensor(s: Any, b: Any, t: TensorDef, buffer: int, quant: int | None) -> int:
    if t.dtype not in _DTYPES:
        raise ConfigError(f"tensor {t.name}: unsupported dtype {t.dtype}", path="model")
    name = b.CreateString(t.name)
    shape = b.CreateNumpyVector(np.array(t.shape, np.int32))
    signature = None
    if t.batched:
        signature = b.CreateNumpyVector(np.array((-1, *t.shape[1:]), np.int32))
    s.TensorStart(b)
    s.TensorAddShape(b, shape)
    s.TensorAddType(b, getattr(s.TensorType, _DTYPES[t.dtype]))
    s.TensorAddBuffer(b, buffer)
    s.TensorAddName(b, name)
    if quant is not None:
        s.TensorAddQuantization(b, quant)
    if signature is not None:
        s.TensorAddShapeSignature(b, signature)
    return int(s.TensorEnd(b))


def _op_code(s: Any, b: Any, name: str) -> int:
    code = getattr(s.BuiltinOperator, name)
    s.OperatorCodeStart(b)
    s.OperatorCodeAddDeprecatedBuiltinCode(b, min(code, 127))  # 127: "see builtin_code"
    s.OperatorCodeAddBuiltinCode(b, code)
    s.OperatorCodeAddVersion(b, _VERSIONS.get(name, 1))
    return int(s.OperatorCodeEnd(b))


def _operator(s: Any, b: Any, op: OpDef, code_index: int) -> int:
    options_type, options = _options(s, b, op)
    ins = b.CreateNumpyVector(np.array(op.inputs, np.int32))
    outs = b.CreateNumpyVector(np.array(op.outputs, np.int32))
    s.OperatorStart(b)
    s.OperatorAddOpcodeIndex(b, code_index)
    s.OperatorAddInputs(b, ins)
    s.OperatorAddOutputs(b, outs)
    if options is not None:
        s.OperatorAddBuiltinOptionsType(b, options_type)
        s.OperatorAddBuiltinOptions(b, options)
    return int(s.OperatorEnd(b))


def _options(s: Any, b: Any, op: OpDef) -> tuple[int, int | None]:
    o = op.options
    act = getattr(s.ActivationFunctionType, o.get("activation", "NONE"))
    if op.op == "FULLY_CONNECTED":
        s.FullyConnectedOptionsStart(b)
        s.FullyConnectedOptionsAddFusedActivationFunction(b, act)
        return s.BuiltinOptions.FullyConnectedOptions, int(s.FullyConnectedOptionsEnd(b))
    if op.op == "CONV_2D":
        s.Conv2DOptionsStart(b)
        s.Conv2DOptionsAddPadding(b, getattr(s.Padding, o["padding"]))
        s.Conv2DOptionsAddStrideW(b, 1)
        s.Conv2DOptionsAddStrideH(b, 1)
        s.Conv2DOptionsAddDilationWFactor(b, 1)
        s.Conv2DOptionsAddDilationHFactor(b, 1)
        s.Conv2DOptionsAddFusedActivationFunction(b, act)
        return s.BuiltinOptions.Conv2DOptions, int(s.Conv2DOptionsEnd(b))
    if op.op == "MAX_POOL_2D":
        size = o["size"]
        s.Pool2DOptionsStart(b)
        s.Pool2DOptionsAddPadding(b, s.Padding.VALID)
        s.Pool2DOptionsAddStrideW(b, size)
        s.Pool2DOptionsAddStrideH(b, size)
        s.Pool2DOptionsAddFilterWidth(b, size)
        s.Pool2DOptionsAddFilterHeight(b, size)
        s.Pool2DOptionsAddFusedActivationFunction(b, act)
        return s.BuiltinOptions.Pool2DOptions, int(s.Pool2DOptionsEnd(b))
    if op.op == "RESHAPE":
        new_shape = b.CreateNumpyVector(np.array(o["shape"], np.int32))
        s.ReshapeOptionsStart(b)
        s.ReshapeOptionsAddNewShape(b, new_shape)
        return s.BuiltinOptions.ReshapeOptions, int(s.ReshapeOptionsEnd(b))
    if op.op == "TRANSPOSE":
        s.TransposeOptionsStart(b)
        return s.BuiltinOptions.TransposeOptions, int(s.TransposeOptionsEnd(b))
    if op.op == "DEQUANTIZE":
        return 0, None
    raise ConfigError(f"operator {op.op} is not supported by the writer", path="model")
