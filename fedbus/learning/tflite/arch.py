"""Which built-in network a set of weights belongs to, and its exact shapes.

A `Architecture` is all a template depends on: two models with the same
architecture share one compiled `.tflite` template and differ only in the
weight bytes patched into it. It is inferred from the weights' names and
shapes (``dense<i>.w``/``dense<i>.b`` for the numpy families, DigitsCNN's
``state_dict`` names for ``cnn``), because those are what a node or the
``fedbus export`` command actually holds; a topology's ``model:`` spec is only
checked against it.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from fedbus.errors import ConfigError

__all__ = ["CNN_CHANNELS", "Architecture", "architecture_of"]

CNN_CHANNELS = (16, 32)
"""DigitsCNN's conv widths (`fedbus.learning.torch.DigitsCNN`; a test checks they agree)."""

_DENSE = re.compile(r"dense(\d+)\.([wb])")
_CNN_NAMES = ("conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "fc.weight", "fc.bias")

Kind = Literal["logreg", "mlp", "cnn"]


@dataclass(frozen=True, slots=True)
class Architecture:
    """A built-in model family with its sizes (hashable: templates are cached by it).

    Attributes:
        kind: ``logreg``, ``mlp`` or ``cnn``.
        num_features: flat input width (``c * h * w`` for the cnn).
        num_classes: output width (logits).
        hidden: the mlp's hidden widths; empty otherwise.
        image_shape: the cnn's ``(channels, height, width)``; None otherwise.
    """

    kind: Kind
    num_features: int
    num_classes: int
    hidden: tuple[int, ...] = ()
    image_shape: tuple[int, int, int] | None = None

    def __post_init__(self) -> None:
        if self.num_features < 1 or self.num_classes < 2 or any(h < 1 for h in self.hidden):
            raise ConfigError(f"bad sizes for a {self.kind} model: {self}", path="model")
        if (self.kind == "mlp") != bool(self.hidden):
            raise ConfigError("an mlp needs hidden layers, the others none", path="model.hidden")
        if (self.kind == "cnn") != (self.image_shape is not None):
            raise ConfigError("the cnn (only) needs an image shape", path="model.kind")
        if self.image_shape is not None:
            c, h, w = self.image_shape
            if c * h * w != self.num_features or h < 4 or w < 4:
                raise ConfigError(
                    f"image shape {self.image_shape} does not fit {self.num_features} features",
                    path="model.kind",
                )

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each framework weight's name and shape, in model order."""
        if self.image_shape is not None:
            c, h, w = self.image_shape
            c1, c2 = CNN_CHANNELS
            return {
                "conv1.weight": (c1, c, 3, 3),
                "conv1.bias": (c1,),
                "conv2.weight": (c2, c1, 3, 3),
                "conv2.bias": (c2,),
                "fc.weight": (self.num_classes, c2 * (h // 4) * (w // 4)),
                "fc.bias": (self.num_classes,),
            }
        sizes = (self.num_features, *self.hidden, self.num_classes)
        out: dict[str, tuple[int, ...]] = {}
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
            out[f"dense{i}.w"] = (fan_in, fan_out)
            out[f"dense{i}.b"] = (fan_out,)
        return out

    def check(self, weights: Mapping[str, Any]) -> None:
        """Raise `ConfigError` unless ``weights`` has exactly this model's names and shapes."""
        expected = self.weight_shapes()
        if set(weights) != set(expected):
            raise ConfigError(
                f"weights do not fit the {self.kind} model: expected {list(expected)}, "
                f"got {list(weights)}",
                path="model",
            )
        for name, shape in expected.items():
            got = tuple(getattr(weights[name], "shape", ()))
            if got != shape:
                raise ConfigError(f"{name}: expected shape {shape}, got {got}", path="model")


def architecture_of(
    weights: Mapping[str, Any],
    model_spec: Mapping[str, Any] | str | None = None,
    *,
    image_shape: tuple[int, int, int] | None = None,
) -> Architecture:
    """Infer the architecture of ``weights`` and check it against ``model_spec``.

    Args:
        weights: named arrays as the trainers produce them.
        model_spec: a topology's ``model:`` value (``"mlp"``, ``{kind: mlp,
            hidden: [64]}``...); None accepts whatever the weights are.
        image_shape: the cnn's input ``(c, h, w)``. The weights fix only the
            channels and ``(h // 4) * (w // 4)``, so None assumes the smallest
            square image that fits (8x8 for digits' 2x2 after pooling).

    Raises:
        ConfigError: the weights are no built-in family, or not the one
            ``model_spec`` names (a factory model cannot be exported here).
    """
    spec: Mapping[str, Any] = (
        {}
        if model_spec is None
        else {"kind": model_spec}
        if isinstance(model_spec, str)
        else model_spec
    )
    if "factory" in spec:
        raise ConfigError(
            "a factory model is exported from its topology (--topology) with litert-torch "
            "(pip install 'fedbus[litert]'), not from a model spec",
            path="model.factory",
        )
    arch = _infer(weights, image_shape)
    kind = spec.get("kind")
    if kind is not None and kind != arch.kind:
        raise ConfigError(f"the weights are a {arch.kind} model, not {kind!r}", path="model.kind")
    hidden = spec.get("hidden")
    if arch.kind == "mlp" and hidden is not None and tuple(hidden) != arch.hidden:
        raise ConfigError(
            f"the weights have hidden widths {list(arch.hidden)}, not {list(hidden)}",
            path="model.hidden",
        )
    arch.check(weights)
    return arch


def _infer(weights: Mapping[str, Any], image_shape: tuple[int, int, int] | None) -> Architecture:
    names = list(weights)
    if set(names) == set(_CNN_NAMES):
        conv = tuple(weights["conv1.weight"].shape)
        fc = tuple(weights["fc.weight"].shape)
        if len(conv) != 4 or len(fc) != 2:
            raise ConfigError("cnn weights of unexpected rank", path="model")
        if image_shape is None:
            cells = fc[1] // CNN_CHANNELS[1]  # (h // 4) * (w // 4)
            side = round(cells**0.5)
            if side * side != cells:
                raise ConfigError("cannot guess the cnn's image shape; give it", path="model")
            image_shape = (conv[1], 4 * side, 4 * side)
        c, h, w = image_shape
        return Architecture("cnn", c * h * w, fc[0], image_shape=image_shape)
    layers = sorted({int(m.group(1)) for n in names if (m := _DENSE.fullmatch(n))})
    if not layers or layers != list(range(len(layers))) or len(names) != 2 * len(layers):
        raise ConfigError(f"not a built-in model (logreg, mlp, cnn): weights {names}", path="model")
    shapes = [tuple(weights[f"dense{i}.w"].shape) for i in layers]
    if any(len(s) != 2 for s in shapes):
        raise ConfigError("dense weights must be matrices", path="model")
    hidden = tuple(s[1] for s in shapes[:-1])
    return Architecture("mlp" if hidden else "logreg", shapes[0][0], shapes[-1][1], hidden=hidden)
