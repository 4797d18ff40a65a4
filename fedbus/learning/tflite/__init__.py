"""Export of the built-in models to ``.tflite``, weight patching and on-board inference.

No TensorFlow and no converter: `export_model` and `compile_template` write
the flatbuffer directly (module `writer`; needs ``flatbuffers`` and the TFLite
schema module that ai-edge-litert ships, or the ``tflite`` package). A
template is compiled once per `Architecture` and each round's weights are
patched into a copy with numpy alone (`patch`); `TfliteModel` serves
inference on the patched file through ai-edge-litert or tflite-runtime.
Factory (torch) models are converted once with litert-torch instead (module
`torch_route`, the optional ``litert`` extra; not imported here) and patched
the same way.
docs/tflite.md explains the layouts, the traps avoided and measured figures.

Importing this package loads numpy only; the writer's and runtime's
dependencies load when first used. Lower layers never import it.
"""

from fedbus.learning.tflite.arch import Architecture, architecture_of
from fedbus.learning.tflite.patch import Slot, Template, patch
from fedbus.learning.tflite.quantize import dequantize, quantize_per_channel
from fedbus.learning.tflite.runtime import (
    TfliteModel,
    TfliteUnavailable,
    interpreter_class,
    load_interpreter,
)
from fedbus.learning.tflite.template import (
    TemplateError,
    compile_template,
    export_model,
    validate_template,
)

__all__ = [
    "Architecture",
    "Slot",
    "Template",
    "TemplateError",
    "TfliteModel",
    "TfliteUnavailable",
    "architecture_of",
    "compile_template",
    "dequantize",
    "export_model",
    "interpreter_class",
    "load_interpreter",
    "patch",
    "quantize_per_channel",
    "validate_template",
]
