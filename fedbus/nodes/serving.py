"""On-board TFLite serving for a client: the newest global model, evaluated on local data.

A board runs inference with a TFLite runtime, not with the framework; what it
serves should be checked with the same runtime. `TfliteServing` keeps a
`fedbus.learning.tflite.TfliteModel` patched with each global model the
client receives (a patch and a fresh interpreter, about 0.1 ms), so
`ClientNode.predict` always answers with the newest model, and the client
reports the interpreter's accuracy on its local data as ``tflite_accuracy``
in its update metrics (the server averages it into ``metrics.jsonl``).

`tflite_serving` returns None, after one warning line, when no TFLite runtime
(or schema module) is installed: serving is an extra, and training must go on
without it. Lower layers never import this module; it loads the TFLite
package only when serving is asked for.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from fedbus.errors import ConfigError, FedbusError

if TYPE_CHECKING:
    from fedbus.learning.tflite import TfliteModel

__all__ = ["TfliteServing", "tflite_serving"]

log = logging.getLogger(__name__)


class TfliteServing:
    """The newest global model as a TFLite interpreter, and its accuracy on local data.

    Not thread-safe (an interpreter is not): `ClientNode` calls it on its
    event loop only.

    Args:
        spec: the topology's ``model:`` value, checked against the weights.
        x: local features ``[n, ...]`` (evaluated at each update).
        y: local labels ``[n]``.
        image_shape: the cnn's ``(c, h, w)``; None for the dense families.
        int8: serve int8 weights (docs/tflite.md); float32 by default.
    """

    def __init__(
        self,
        spec: Mapping[str, Any] | str | None,
        x: npt.ArrayLike,
        y: npt.ArrayLike,
        *,
        image_shape: tuple[int, int, int] | None = None,
        int8: bool = False,
    ) -> None:
        self.spec = spec
        self.x = np.asarray(x, dtype=np.float32)
        self.y = np.asarray(y)
        self.image_shape = image_shape
        self.int8 = int8
        self.model: TfliteModel | None = None
        self.accuracy: float | None = None
        """Accuracy of the model now served on the local data (None before the first)."""
        self.failed = ""
        """Why serving stopped (a model that cannot be served); empty while it works."""

    def update(self, weights: Mapping[str, Any]) -> None:
        """Serve ``weights`` and evaluate them on the local data.

        A failure (weights no template fits) is logged once and stops
        serving; it never reaches training.
        """
        if self.failed:
            return
        from fedbus.learning.tflite import TfliteModel

        try:
            if self.model is None:
                self.model = TfliteModel.from_weights(
                    self.spec, weights, int8=self.int8, image_shape=self.image_shape
                )
            else:
                self.model.update(weights)
            self.accuracy = self.model.accuracy(self.x, self.y) if len(self.y) else None
        except (FedbusError, ValueError, RuntimeError) as exc:
            self.failed = f"{type(exc).__name__}: {exc}"
            self.model, self.accuracy = None, None
            log.warning("TFLite serving stopped (training continues): %s", self.failed)

    def predict(self, x: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """Logits ``[n, num_classes]`` of the newest global model for ``x``.

        Raises:
            RuntimeError: no model received yet, or serving stopped.
        """
        if self.model is None:
            raise RuntimeError(self.failed or "no global model received yet")
        return self.model.predict(x)


def tflite_serving(
    spec: Mapping[str, Any] | str | None,
    x: npt.ArrayLike,
    y: npt.ArrayLike,
    *,
    image_shape: tuple[int, int, int] | None = None,
    int8: bool = False,
) -> TfliteServing | None:
    """A `TfliteServing`, or None after a one-line warning when it cannot run here.

    Why a warning and not an error: a board without a TFLite runtime can
    still train and take part in the run; it only cannot serve inference.

    Raises:
        ConfigError: ``spec`` is a factory model (served per round only for the
            built-in families; factory models export with ``fedbus export``).
    """
    if isinstance(spec, Mapping) and "factory" in spec:
        raise ConfigError(
            "per-round TFLite serving needs a built-in model (logreg, mlp, cnn); a factory "
            "model exports with `fedbus export MODEL --topology FILE` and the litert extra "
            "(docs/tflite.md)",
            path="model.factory",
        )
    from fedbus.learning.tflite import TfliteUnavailable, interpreter_class
    from fedbus.learning.tflite.writer import schema

    try:
        interpreter_class()
        schema()  # templates are compiled here, from the first global model
    except (TfliteUnavailable, ImportError, ConfigError) as exc:
        log.warning("TFLite serving off, training continues: %s", exc)
        return None
    return TfliteServing(spec, x, y, image_shape=image_shape, int8=int8)
