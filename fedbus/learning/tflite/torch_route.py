"""Factory torch models (``model: {factory: ...}``) to ``.tflite`` through litert-torch.

The built-in families are written directly (module `template`); an arbitrary
``nn.Module`` needs a converter, and litert-torch is the one that needs
neither TensorFlow nor ONNX (docs/tflite.md; the optional ``litert`` extra,
about 1.3 GB on top of torch, meant for the server or a dev machine, never a
board). It is run **once** per model: `compile_torch_template` converts the
module into a template, and each round's weights are then patched into a
copy with numpy alone (`TorchTemplate.patch`, the same byte patching as the
built-in templates), so a run does not pay seconds of conversion per round.

The converter's traps (hands-on notes, docs/tflite.md) decide how the
template is made and how its weights are found:

* it drops zero biases and merges equal constants, so the module is
  converted holding **random, pairwise distinct, nonzero** weights;
* tensor names are unreliable and layouts change (a conv becomes
  ``DEPTHWISE_CONV_2D`` with IHWO filters, a linear layer may be stored as
  is or transposed), so each framework tensor is found **by value**: the one
  float32 constant buffer holding the same multiset of numbers, then the one
  axis permutation that reproduces its bytes;
* the correspondence is then **verified**: no buffer serves two tensors,
  patching the compile-time weights back reproduces the file byte for byte,
  and a model patched with other random weights computes the module's
  forward pass (torch) on a random input. A template that fails any check
  raises `TemplateError` rather than serve a wrong model.

A tensor the converter folded into something else (batch-norm statistics
merged into a conv, a weight scaled at compile time) has no buffer of its
own and cannot be patched: such a module is refused with the tensor's name.
litert-torch exports static shapes, so the template takes exactly
``input_shape`` (batch 1 by default).
"""

from __future__ import annotations

import copy
import importlib
import itertools
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from fedbus.errors import ConfigError, FedbusError
from fedbus.learning.tflite.patch import Slot, check_slots, patch_slots
from fedbus.learning.tflite.template import TemplateError

__all__ = [
    "LITERT_HINT",
    "LitertUnavailable",
    "TorchTemplate",
    "compile_torch_template",
    "litert_torch",
    "torch_template_from_manifest",
]

LITERT_HINT: Final = (
    "pip install 'fedbus[litert]' (litert-torch 0.10 with torch 2.13 pinned, e.g. "
    "-c constraints.txt; about 1.3 GB on top of torch, for the server or a dev machine)"
)

_SEED: Final = 20240917
_MAX_REL_ERROR: Final = 1e-4
"""Verification tolerance, relative to the largest output: a misplaced weight is off by O(1)."""


class LitertUnavailable(FedbusError, ImportError):
    """litert-torch (or torch) is not installed: factory models cannot be exported."""


def litert_torch() -> Any:
    """The ``litert_torch`` module.

    Raises:
        LitertUnavailable: it (or torch) does not import; the message says what to install.
    """
    try:
        return importlib.import_module("litert_torch")
    except ImportError as exc:
        raise LitertUnavailable(
            f"exporting a factory (torch) model to .tflite needs litert-torch: {LITERT_HINT} "
            f"[{type(exc).__name__}: {exc}]"
        ) from exc


@dataclass(frozen=True, slots=True)
class TorchTemplate:
    """A converted factory model whose weights `patch` replaces.

    Attributes:
        model: the ``.tflite`` bytes (holding the compile-time weights).
        slots: one per floating-point ``state_dict`` tensor, in its order.
        input_shape: the static input shape the model was converted for.
        ignored: non-float ``state_dict`` entries (``num_batches_tracked``),
            accepted in the weights and not stored.
    """

    model: bytes
    slots: tuple[Slot, ...]
    input_shape: tuple[int, ...]
    ignored: frozenset[str] = frozenset()

    def patch(self, weights: Mapping[str, Any]) -> bytes:
        """A copy of the model holding ``weights`` (the module's ``state_dict`` as arrays).

        Raises:
            ConfigError: a weight is missing, extra or of the wrong shape.
        """
        return patch_slots(self.model, self.slots, weights, ignored=self.ignored)

    def manifest(self) -> dict[str, Any]:
        """A JSON-able description of the slots (`fedbus export --manifest`)."""
        return {
            "kind": "torch",
            "input_shape": list(self.input_shape),
            "ignored": sorted(self.ignored),
            "slots": [s.to_json() for s in self.slots],
        }


def torch_template_from_manifest(model: bytes, manifest: Mapping[str, Any]) -> TorchTemplate:
    """Rebuild a `TorchTemplate` from its file and `TorchTemplate.manifest` (numpy only).

    What a board needs to patch later rounds of a factory model itself,
    without torch or litert-torch.

    Raises:
        ConfigError: the manifest is malformed or its slots do not fit the file.
    """
    try:
        if manifest.get("kind") != "torch":
            raise ValueError("not a factory (torch) model's manifest")
        slots = tuple(Slot.from_json(s, dtype="float32") for s in manifest["slots"])
        shape = tuple(int(d) for d in manifest["input_shape"])
        ignored = frozenset(str(n) for n in manifest.get("ignored", ()))
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"malformed template manifest: {exc!r}", path="model") from exc
    check_slots(bytes(model), slots)
    return TorchTemplate(bytes(model), slots, shape, ignored)


def _distinct_weights(
    state: Mapping[str, npt.NDArray[Any]], seed: int
) -> dict[str, npt.NDArray[np.float32]]:
    """Random, pairwise distinct, nonzero values for every tensor, scaled by ``1/sqrt(fan_in)``.

    Distinct values let each tensor be found by value (and its layout by
    position); the scale keeps activations in range for deep models.
    """
    rng = np.random.default_rng(seed)
    total = sum(a.size for a in state.values())
    values = (rng.permutation(total) + 1).astype(np.float64) / total * rng.choice([-1, 1], total)
    out, start = {}, 0
    for name, arr in state.items():
        fan_in = int(np.prod(arr.shape[1:])) if arr.ndim > 1 else max(arr.size, 1)
        chunk = values[start : start + arr.size] / np.sqrt(fan_in)
        out[name] = chunk.reshape(arr.shape).astype(np.float32)
        start += arr.size
    return out


def _constants(model: bytes) -> list[tuple[int, int, int, npt.NDArray[np.float32]]]:
    """Every float32 constant of subgraph 0: ``(tensor, buffer, byte offset, values)``."""
    from fedbus.learning.tflite.writer import schema

    s = schema()
    root = s.Model.GetRootAs(model, 0)
    graph = root.Subgraphs(0)
    found = []
    for t in range(graph.TensorsLength()):
        tensor = graph.Tensors(t)
        index = tensor.Buffer()
        if not index or tensor.Type() != s.TensorType.FLOAT32:
            continue
        buf = root.Buffers(index)
        if buf.DataLength():
            offset, nbytes = buf._tab.Vector(buf._tab.Offset(4)), buf.DataLength()
        elif buf.Offset() > 1:  # data stored after the flatbuffer (large models)
            offset, nbytes = int(buf.Offset()), int(buf.Size())
        else:
            continue
        values = np.frombuffer(model, "<f4", nbytes // 4, offset).astype(np.float32)
        found.append((t, index, offset, values))
    return found


def _find_slot(
    name: str,
    arr: npt.NDArray[np.float32],
    constants: list[tuple[int, int, int, npt.NDArray[np.float32]]],
) -> tuple[Slot, int]:
    """The slot holding ``arr`` (by value, then by layout) and its buffer index."""
    want = np.sort(arr.ravel())
    matches = [
        c for c in constants if c[3].size == arr.size and np.array_equal(np.sort(c[3]), want)
    ]
    if not matches:
        raise TemplateError(
            f"{name}: no constant of the converted model holds its values (the converter "
            "folded it into another tensor, e.g. batch-norm into a conv); such a module "
            "cannot be patched per round"
        )
    if len({m[1] for m in matches}) > 1:
        raise TemplateError(f"{name}: {len(matches)} constants hold its values")
    tensor, buffer, offset, stored = matches[0]
    for perm in itertools.permutations(range(arr.ndim)):
        if np.array_equal(arr.transpose(perm).ravel(), stored):
            slot = Slot(
                name=name,
                shape=tuple(arr.shape),
                view=tuple(arr.shape),
                perm=tuple(perm),
                dtype="float32",
                tensor=tensor,
                offset=offset,
            )
            return slot, buffer
    raise TemplateError(f"{name}: stored in a layout that is no transpose of {arr.shape}")


def compile_torch_template(
    module: Any, input_shape: tuple[int, ...], *, seed: int = _SEED
) -> TorchTemplate:
    """Convert ``module`` once with litert-torch into a verified, patchable template.

    Args:
        module: the ``nn.Module`` (not modified: a copy is converted).
        input_shape: the static input shape, e.g. ``(1, 64)``.
        seed: seeds the compile-time and verification weights.

    Raises:
        LitertUnavailable: litert-torch is not installed.
        TemplateError: a tensor cannot be found or mapped, or the patched
            model does not compute the module's forward pass.
    """
    converter = litert_torch()
    import torch

    net = copy.deepcopy(module).eval()
    state = {k: v.detach().cpu().numpy() for k, v in net.state_dict().items()}
    floats = {k: v for k, v in state.items() if np.issubdtype(v.dtype, np.floating)}
    seed_weights = _distinct_weights(floats, seed)
    net.load_state_dict(
        {k: torch.from_numpy(v.copy()) for k, v in seed_weights.items()}, strict=False
    )
    example = torch.from_numpy(
        np.random.default_rng(seed).standard_normal(input_shape).astype(np.float32)
    )
    with tempfile.TemporaryDirectory(prefix="fedbus-litert-") as tmp:
        path = Path(tmp) / "model.tflite"
        converter.convert(net, (example,)).export(str(path))
        model = path.read_bytes()
    constants = _constants(model)
    slots, buffers = [], set()
    for name, arr in seed_weights.items():
        slot, buffer = _find_slot(name, arr, constants)
        if buffer in buffers:
            raise TemplateError(f"{name}: its buffer {buffer} also holds another tensor")
        buffers.add(buffer)
        slots.append(slot)
    try:
        check_slots(model, tuple(slots))
    except ConfigError as exc:
        raise TemplateError(str(exc)) from exc
    template = TorchTemplate(
        model, tuple(slots), tuple(input_shape), frozenset(set(state) - set(floats))
    )
    if template.patch(seed_weights) != model:
        raise TemplateError("patching the compile-time weights does not reproduce the file")
    _verify(template, net, _distinct_weights(floats, seed + 1), seed)
    return template


def _verify(template: TorchTemplate, net: Any, weights: Mapping[str, Any], seed: int) -> None:
    """The template patched with ``weights`` computes ``net``'s forward pass with them."""
    import torch

    from fedbus.learning.tflite.runtime import load_interpreter

    net.load_state_dict(
        {k: torch.from_numpy(np.array(v)) for k, v in weights.items()}, strict=False
    )
    x = np.random.default_rng(seed + 1).standard_normal(template.input_shape).astype(np.float32)
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    interpreter = load_interpreter(template.patch(weights))
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    got = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    scale = max(float(np.abs(want).max()), 1.0)
    if got.shape != want.shape or float(np.abs(got - want).max()) > _MAX_REL_ERROR * scale:
        raise TemplateError(
            "the patched model does not compute the module's forward pass "
            f"(shape {got.shape} vs {want.shape}); the weight mapping is wrong"
        )
