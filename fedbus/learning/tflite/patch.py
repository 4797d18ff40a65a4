"""Templates and weight patching, with numpy alone.

A `Template` is a ``.tflite`` file compiled once for an `Architecture`
(`fedbus.learning.tflite.template.compile_template`) plus, for each framework
weight, a `Slot`: where its bytes sit in the file and how the framework's
array maps to TFLite's layout. `patch` copies the file and overwrites those
bytes with new weights: no flatbuffers, no schema, no converter, no
interpreter, so a board that has only numpy and tflite-runtime can apply each
round's global model to a template it was sent (`Template.manifest` /
`Template.from_manifest`).

A layout is "reshape to ``view``, then transpose by ``perm``": ``[in, out]``
dense matrices become TFLite's ``[out, in]``; torch's OIHW conv filters
become OHWI; the classifier after a flatten is re-ordered from torch's
(C, H, W) flatten to TFLite's (H, W, C) one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from fedbus.errors import ConfigError
from fedbus.learning.tflite.arch import Architecture
from fedbus.learning.tflite.quantize import quantize_per_channel

__all__ = ["Slot", "Template", "check_slots", "patch", "patch_slots", "to_tflite_layout"]


@dataclass(frozen=True, slots=True)
class Slot:
    """Where one framework weight lives in a template.

    Attributes:
        name: the framework weight's name (``dense0.w``, ``conv1.weight``...).
        shape: its framework shape.
        view: the shape it is reshaped to before ``perm``.
        perm: the transpose from ``view`` to TFLite's layout.
        dtype: ``float32``, or ``int8`` (weight-only quantized).
        tensor: the TFLite tensor index (for validation and debugging).
        offset: byte offset of the tensor's data in the file.
        scale_offset: byte offset of its float32 per-channel scales (int8 only).
    """

    name: str
    shape: tuple[int, ...]
    view: tuple[int, ...]
    perm: tuple[int, ...]
    dtype: str
    tensor: int
    offset: int
    scale_offset: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The slot as a manifest entry (`from_json` reads it back)."""
        return {
            "name": self.name,
            "shape": list(self.shape),
            "view": list(self.view),
            "perm": list(self.perm),
            "dtype": self.dtype,
            "tensor": self.tensor,
            "offset": self.offset,
            "scale_offset": self.scale_offset,
        }

    @classmethod
    def from_json(cls, entry: Mapping[str, Any], *, dtype: str | None = None) -> Slot:
        """A slot from a manifest entry; ``dtype`` overrides the entry's.

        Raises:
            KeyError, TypeError, ValueError: a malformed entry (callers turn
            them into one `ConfigError`).
        """
        scale = entry.get("scale_offset")
        return cls(
            name=str(entry["name"]),
            shape=tuple(int(d) for d in entry["shape"]),
            view=tuple(int(d) for d in entry["view"]),
            perm=tuple(int(d) for d in entry["perm"]),
            dtype=str(entry["dtype"]) if dtype is None else dtype,
            tensor=int(entry["tensor"]),
            offset=int(entry["offset"]),
            scale_offset=None if scale is None else int(scale),
        )

    @property
    def size(self) -> int:
        """Number of elements."""
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        """Bytes of its data in the file."""
        return self.size * np.dtype(self.dtype).itemsize

    @property
    def channels(self) -> int:
        """Output channels: axis 0 of the TFLite layout, one scale each when int8."""
        return self.view[self.perm[0]]


def to_tflite_layout(
    array: npt.NDArray[Any], view: tuple[int, ...], perm: tuple[int, ...]
) -> npt.NDArray[np.float32]:
    """``array`` as float32 in TFLite's layout: C-contiguous, axis 0 the output channel."""
    return np.ascontiguousarray(np.asarray(array, dtype=np.float32).reshape(view).transpose(perm))


@dataclass(frozen=True, slots=True)
class Template:
    """A compiled model whose weights can be replaced by `patch`.

    Attributes:
        arch: the architecture it computes.
        model: the ``.tflite`` bytes (holding the compile-time weights).
        slots: one per framework weight, in model order.
        int8: whether weights are stored int8 (module `quantize`).
    """

    arch: Architecture
    model: bytes
    slots: tuple[Slot, ...]
    int8: bool = False

    def manifest(self) -> dict[str, Any]:
        """A JSON-able description of the slots, to ship beside ``model``."""
        return {
            "arch": {
                "kind": self.arch.kind,
                "num_features": self.arch.num_features,
                "num_classes": self.arch.num_classes,
                "hidden": list(self.arch.hidden),
                "image_shape": None
                if self.arch.image_shape is None
                else list(self.arch.image_shape),
            },
            "int8": self.int8,
            "slots": [s.to_json() for s in self.slots],
        }

    @classmethod
    def from_manifest(cls, model: bytes, manifest: Mapping[str, Any]) -> Template:
        """Rebuild a template from its bytes and `manifest` (checks the slots fit the file).

        Raises:
            ConfigError: the manifest is malformed or points outside the file.
        """
        try:
            a = manifest["arch"]
            shape = a.get("image_shape")
            arch = Architecture(
                a["kind"],
                int(a["num_features"]),
                int(a["num_classes"]),
                tuple(int(h) for h in a.get("hidden", ())),
                None if shape is None else (int(shape[0]), int(shape[1]), int(shape[2])),
            )
            slots = tuple(Slot.from_json(s) for s in manifest["slots"])
            template = cls(arch, bytes(model), slots, bool(manifest.get("int8", False)))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ConfigError(f"malformed template manifest: {exc!r}", path="model") from exc
        template.check_bounds()
        return template

    def check_bounds(self) -> None:
        """Raise `ConfigError` if a slot's bytes overlap another's or leave the file."""
        check_slots(self.model, self.slots)


def check_slots(model: bytes, slots: tuple[Slot, ...]) -> None:
    """Raise `ConfigError` if a slot's bytes overlap another's or leave ``model``."""
    spans = []
    for s in slots:
        if s.dtype not in ("float32", "int8") or (s.dtype == "int8") != (
            s.scale_offset is not None
        ):
            raise ConfigError(f"slot {s.name}: bad dtype {s.dtype}", path="model")
        spans.append((s.offset, s.offset + s.nbytes, s.name))
        if s.scale_offset is not None:
            spans.append((s.scale_offset, s.scale_offset + 4 * s.channels, s.name))
    spans.sort()
    for (start, end, name), nxt in zip(spans, [*spans[1:], None], strict=True):
        if start < 0 or end > len(model) or start % 4:
            raise ConfigError(f"slot {name} lies outside the model file", path="model")
        if nxt is not None and nxt[0] < end:
            raise ConfigError(f"slots {name} and {nxt[2]} overlap", path="model")


def patch(template: Template, weights: Mapping[str, Any]) -> bytes:
    """A copy of ``template.model`` holding ``weights`` instead of the compile-time ones.

    Args:
        template: the compiled template.
        weights: every framework weight by name, in framework shapes and any
            float dtype (cast to float32, then quantized when the template is int8).

    Raises:
        ConfigError: a weight is missing, extra or of the wrong shape.
    """
    return patch_slots(template.model, template.slots, weights)


def patch_slots(
    model: bytes,
    slots: tuple[Slot, ...],
    weights: Mapping[str, Any],
    *,
    ignored: frozenset[str] = frozenset(),
) -> bytes:
    """`patch` for any model and slots; names in ``ignored`` may be in ``weights`` and are skipped.

    Raises:
        ConfigError: a weight is missing, extra or of the wrong shape.
    """
    names = {s.name for s in slots}
    if set(weights) - ignored != names:
        raise ConfigError(
            f"weights do not fit the template: expected {sorted(names)}, got {sorted(weights)}",
            path="model",
        )
    out = bytearray(model)
    for s in slots:
        arr = np.asarray(weights[s.name])
        if arr.shape != s.shape:
            raise ConfigError(f"{s.name}: expected shape {s.shape}, got {arr.shape}", path="model")
        stored = to_tflite_layout(arr, s.view, s.perm)
        if s.scale_offset is not None:
            q, scales = quantize_per_channel(stored)
            out[s.offset : s.offset + s.nbytes] = q.tobytes()
            out[s.scale_offset : s.scale_offset + 4 * len(scales)] = scales.astype("<f4").tobytes()
        else:
            out[s.offset : s.offset + s.nbytes] = stored.astype("<f4", copy=False).tobytes()
    return bytes(out)
