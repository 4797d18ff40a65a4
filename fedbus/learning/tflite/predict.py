"""``fedbus predict``: run a ``.tflite`` file on a board's local data, without the framework.

The smallest on-board inference entry point: a results folder's
``model.tflite`` (``fedbus run --export-tflite``) or a ``fedbus export``
file, an ``.npz`` with ``x`` (and optionally ``y``), and a TFLite runtime.
It needs neither torch nor the schema module: only numpy and the runtime,
which is all an armv7l board with tflite-runtime has (docs/boards.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

__all__ = ["add_command", "run"]


def add_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``fedbus predict`` on the CLI's sub-parsers."""
    parser = sub.add_parser(
        "predict",
        help="run a .tflite model on local data (.npz with x, optional y) through TFLite",
        description="Run MODEL.tflite through ai-edge-litert or tflite-runtime on the examples "
        "in --data (an .npz with x and, optionally, labels y). Prints the predicted classes of "
        "the first examples, the accuracy when y is given, and the time per example. Exit 0 on "
        "success, 2 for unreadable input, 1 without a TFLite runtime (docs/boards.md).",
    )
    parser.add_argument("model", metavar="MODEL.tflite", help="the model file")
    parser.add_argument("--data", required=True, metavar="FILE.npz", help="x [n, ...], y [n]")
    parser.add_argument("--threads", type=int, default=1, help="interpreter threads (default 1)")
    parser.add_argument(
        "--out", metavar="FILE.npy", help="also write the logits [n, classes] there"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Handle ``fedbus predict``; returns the exit status."""
    from fedbus.learning.tflite.runtime import TfliteUnavailable, load_interpreter

    try:
        model = Path(args.model).read_bytes()
        with np.load(args.data) as npz:
            x = np.asarray(npz["x"], dtype=np.float32)
            y = np.asarray(npz["y"]).astype(np.int64) if "y" in npz.files else None
    except (OSError, ValueError, KeyError) as exc:
        print(f"fedbus predict: {exc}", file=sys.stderr)
        return 2
    try:
        interpreter = load_interpreter(model, num_threads=args.threads)
    except TfliteUnavailable as exc:
        print(f"fedbus predict: {exc}", file=sys.stderr)
        return 1
    except (ValueError, RuntimeError) as exc:  # the runtime refuses the file
        print(f"fedbus predict: {args.model}: {exc}", file=sys.stderr)
        return 2
    inp = interpreter.get_input_details()[0]
    width = int(np.prod(inp["shape"][1:]))
    n = len(x)
    if n == 0 or x.size != n * width:
        print(f"fedbus predict: {args.data}: x must be [n, {width}] with n > 0", file=sys.stderr)
        return 2
    interpreter.resize_tensor_input(inp["index"], [n, width])
    interpreter.allocate_tensors()
    started = time.perf_counter()
    interpreter.set_tensor(inp["index"], x.reshape(n, width))
    interpreter.invoke()
    elapsed = time.perf_counter() - started
    logits = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
    labels = np.argmax(logits, axis=1)
    shown = " ".join(str(int(v)) for v in labels[:10]) + (" ..." if n > 10 else "")
    print(f"{n} examples; predicted classes: {shown}")
    if y is not None and len(y) == n:
        print(f"accuracy {float(np.mean(labels == y)):.4f}")
    print(f"{1e6 * elapsed / n:.2f} us per example (batch {n}, {args.threads} thread(s))")
    if args.out:
        np.save(args.out, logits)
    return 0
