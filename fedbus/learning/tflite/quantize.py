"""Per-channel symmetric int8 quantization of weight matrices (numpy only).

The quantized models are *weight-only*: each weight is stored as int8 with one
float32 scale per output channel (zero point 0, values in [-127, 127]) and a
``DEQUANTIZE`` operator turns it back into float32 inside the model; every
activation and every kernel stays float. TFLite evaluates a ``DEQUANTIZE`` of
a constant once, when the model is prepared, so inference runs at float speed
while the file (and what a round ships) shrinks by about 4x on the weights.

Why not dynamic-range (hybrid) kernels: a per-channel hybrid
``FULLY_CONNECTED`` needs op versions that tflite-runtime 2.14, the only
runtime for armv7l boards, refuses or, worse, runs silently wrong
(docs/tflite.md). ``DEQUANTIZE`` of per-channel int8 works in both runtimes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["QMAX", "dequantize", "quantize_per_channel"]

QMAX = 127
"""Symmetric int8 range [-127, 127]: -128 is left out so that ``-q`` always exists."""


def quantize_per_channel(
    stored: npt.NDArray[Any],
) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float32]]:
    """Quantize ``stored`` per slice along axis 0 (the output channel in TFLite layouts).

    Args:
        stored: float weights in their TFLite layout (``[out, in]`` for
            ``FULLY_CONNECTED``, ``[out, h, w, in]`` for ``CONV_2D``).

    Returns:
        The int8 values (same shape) and one positive float32 scale per
        channel, so that ``q * scale`` approximates the weights to within
        half a step. An all-zero channel gets scale 1 (its values are 0).
    """
    w = np.asarray(stored, dtype=np.float32)
    flat = w.reshape(w.shape[0], -1)
    absmax = np.abs(flat).max(axis=1) if flat.size else np.zeros(w.shape[0], np.float32)
    scales = (absmax / QMAX).astype(np.float32)
    scales[scales == 0] = 1.0  # TFLite wants positive scales; the channel's data is all 0
    q = np.rint(flat / scales[:, None])
    np.clip(q, -QMAX, QMAX, out=q)
    return q.astype(np.int8).reshape(w.shape), scales


def dequantize(q: npt.NDArray[np.int8], scales: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """The float weights a runtime computes from ``q`` and per-channel ``scales``."""
    shape = (len(scales),) + (1,) * (q.ndim - 1)
    return (q.astype(np.float32) * scales.reshape(shape)).astype(np.float32)
