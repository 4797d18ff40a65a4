"""The TFLite interpreter on a node, and `TfliteModel`: inference on the newest global model.

Runtimes: ``ai-edge-litert`` (Python 3.10+, numpy 2, x86_64 and aarch64),
else ``tflite-runtime`` 2.14 (the only one with armv7l wheels; it needs
``numpy<2``). Both expose the same ``Interpreter`` API, so one shim serves.

Two rules from docs/tflite.md shape this module. A model is always loaded
with ``model_content`` from a private copy: ``model_path`` maps
the file read-only, and the runtime may write into the buffer it was given,
which must not be bytes someone else holds. And weights are never written
through the interpreter (``set_tensor`` on a constant crashes, or is silently
ignored under XNNPACK): a new model is a patched copy of the template and a
fresh interpreter, which takes well under a millisecond for these models.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from functools import cache
from typing import Any

import numpy as np
import numpy.typing as npt

from fedbus.errors import FedbusError
from fedbus.learning.tflite.arch import Architecture, architecture_of
from fedbus.learning.tflite.patch import Template, patch

__all__ = ["TfliteModel", "TfliteUnavailable", "interpreter_class", "load_interpreter"]

_RUNTIMES = (
    ("ai_edge_litert.interpreter", "ai-edge-litert"),
    ("tflite_runtime.interpreter", "tflite-runtime"),
)


class TfliteUnavailable(FedbusError, ImportError):
    """No TFLite runtime can be imported (``pip install 'fedbus[tflite]'``)."""


@cache
def interpreter_class() -> tuple[Any, str]:
    """The ``Interpreter`` class of the first runtime installed, and that runtime's name.

    Raises:
        TfliteUnavailable: neither ai-edge-litert nor tflite-runtime imports.
    """
    problems = []
    for module_name, runtime in _RUNTIMES:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            problems.append(f"{runtime}: {exc}")
            continue
        return module.Interpreter, runtime
    raise TfliteUnavailable(
        "no TFLite runtime: install ai-edge-litert (pip install 'fedbus[tflite]'), or "
        "tflite-runtime with numpy<2 on armv7l (" + "; ".join(problems) + ")"
    )


def load_interpreter(model: bytes | bytearray, *, num_threads: int = 1) -> Any:
    """An interpreter over a private copy of ``model``, tensors allocated.

    Args:
        model: the ``.tflite`` bytes; never handed to the runtime itself.
        num_threads: 1 by default: boards have few cores, and at batch 1
            threads cost more than they save.
    """
    interpreter_type, _ = interpreter_class()
    # A fresh bytes object nobody else holds (the wrapper refuses a bytearray; bytes(b) of
    # bytes is b itself); the interpreter keeps it referenced for its lifetime.
    content = bytes(bytearray(model))
    interpreter = interpreter_type(model_content=content, num_threads=num_threads)
    interpreter.allocate_tensors()
    return interpreter


class TfliteModel:
    """Serves inference for one built-in model, updated in place each round.

    Not thread-safe (the interpreter is not): give each thread its own.

    Args:
        template: the compiled template (`compile_template`, or
            `Template.from_manifest` on a board without the schema).
        weights: the framework weights to load.
        num_threads: the interpreter's threads.
    """

    def __init__(
        self, template: Template, weights: Mapping[str, Any], *, num_threads: int = 1
    ) -> None:
        self.template = template
        self.num_threads = num_threads
        self._interpreter: Any = None
        self._model = b""
        self.update(weights)

    @classmethod
    def from_weights(
        cls,
        spec: Architecture | Mapping[str, Any] | str | None,
        weights: Mapping[str, Any],
        *,
        int8: bool = False,
        image_shape: tuple[int, int, int] | None = None,
        num_threads: int = 1,
    ) -> TfliteModel:
        """Compile (or reuse) the template for ``weights`` and load them.

        Args:
            spec: an `Architecture`, or a topology's ``model:`` value checked
                against the weights (None: whatever they are).
            weights: the framework weights.
            int8: weight-only int8 quantization (module `quantize`).
            image_shape: the cnn's ``(c, h, w)`` when ``spec`` is no `Architecture`.
            num_threads: the interpreter's threads.

        Raises:
            ConfigError: not a built-in model, or no schema module to compile with.
            TfliteUnavailable: no runtime.
        """
        from fedbus.learning.tflite.template import compile_template  # needs flatbuffers

        if isinstance(spec, Architecture):
            arch = spec
            arch.check(weights)
        else:
            arch = architecture_of(weights, spec, image_shape=image_shape)
        return cls(compile_template(arch, int8=int8), weights, num_threads=num_threads)

    @property
    def arch(self) -> Architecture:
        """The architecture served."""
        return self.template.arch

    @property
    def model_bytes(self) -> bytes:
        """The ``.tflite`` file now loaded (the template patched with the latest weights)."""
        return self._model

    def update(self, weights: Mapping[str, Any]) -> None:
        """Patch the template with ``weights`` and load a fresh interpreter on it.

        Raises:
            ConfigError: the weights do not fit the template.
        """
        model = patch(self.template, weights)
        interpreter = load_interpreter(model, num_threads=self.num_threads)
        self._interpreter, self._model = interpreter, model
        self._input = interpreter.get_input_details()[0]["index"]
        self._output = interpreter.get_output_details()[0]["index"]
        self._batch = 1

    def predict(self, x: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """Logits ``[n, num_classes]`` for a batch of flat (or image) inputs ``[n, ...]``."""
        arr = np.asarray(x, dtype=np.float32)
        n = arr.shape[0] if arr.ndim > 1 else 1
        arr = arr.reshape(n, self.template.arch.num_features)
        interpreter = self._interpreter
        if n != self._batch:
            if n == 0:
                return np.zeros((0, self.template.arch.num_classes), np.float32)
            interpreter.resize_tensor_input(self._input, [n, self.template.arch.num_features])
            interpreter.allocate_tensors()
            self._batch = n
        interpreter.set_tensor(self._input, arr)
        interpreter.invoke()
        out: npt.NDArray[np.float32] = interpreter.get_tensor(self._output)
        return out

    def accuracy(self, x: npt.ArrayLike, y: npt.ArrayLike) -> float:
        """Share of ``x`` whose arg-max logit is the label in ``y`` (0 when empty)."""
        labels = np.asarray(y)
        if labels.size == 0:
            return 0.0
        return float(np.mean(np.argmax(self.predict(x), axis=1) == labels))
