"""The numpy trainer and `make_trainer`, which turns ``model:`` into a `Trainer`.

Local training is plain minibatch SGD: each epoch visits the node's examples
in a fresh order drawn from ``numpy.random.default_rng(config.seed)``, in
batches of ``batch_size`` (the last one may be smaller), and steps by
``lr * (grad + mu * (w - w_global) + correction)``; ``mu`` is FedProx's
proximal term and 0 gives FedAvg; ``correction`` is SCAFFOLD's c - c_i
(`FitConfig.correction`), absent otherwise. The same seed gives bit-identical
weights, which is what lets the framework be checked against the serial
reference loop.

``model:`` kinds: ``logreg``, ``mlp`` (``hidden``, default ``[32]``), ``cnn``
(torch; without torch, only its head trains, in numpy, on the frozen conv
layers' features: `fedbus.learning.numpy_cnn`) and ``{factory:
"pkg.mod:fn", params: {...}}``. A factory is called with ``params`` plus
those of ``num_features``, ``num_classes``, ``train``, ``eval`` and
``seed`` that its signature names; it may return a torch
``nn.Module`` (wrapped in `TorchTrainer`, calling the factory again for every
fresh model) or a `Trainer` instance or class (used as is).
"""

from __future__ import annotations

import importlib
import inspect
import logging
import sys
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import numpy.typing as npt

from fedbus.errors import ConfigError
from fedbus.learning.data import Dataset
from fedbus.learning.numpy_models import DenseNetwork
from fedbus.learning.trainer import EvalResult, FitConfig, FitResult, NamedArrays, Trainer

__all__ = ["CNN_TRAINERS", "MODEL_KINDS", "NumpyTrainer", "make_trainer"]

log = logging.getLogger(__name__)

MODEL_KINDS = ("cnn", "logreg", "mlp")
CNN_TRAINERS = ("auto", "torch", "numpy-head")
"""How a ``cnn`` trains: torch when it imports (``auto``), torch, or the numpy head only."""
_EVAL_BATCH = 2048


class NumpyTrainer:
    """Trains a numpy `DenseNetwork` with minibatch SGD (module docstring).

    Subclass and override `sgd_step` to change the update (momentum, clipping)
    while keeping shuffling, batching and bookkeeping.

    Args:
        model: the network.
        train: this node's training data; None for a trainer that only
            evaluates (the server's).
        eval: data that `evaluate` scores; None means the training data
            (a node that brought only its own file evaluates on it).
    """

    def __init__(
        self, model: DenseNetwork, train: Dataset | None, eval: Dataset | None = None
    ) -> None:
        self.model = model
        self.train = train
        self.eval = eval
        self._shapes = model.shapes()
        for name, data in (("train", train), ("eval", eval)):
            if data is not None and data.num_features != model.sizes[0]:
                raise ConfigError(
                    f"{name} data has {data.num_features} features, the model takes {model.sizes[0]}"
                )

    def initial_weights(self, seed: int) -> NamedArrays:
        """Fresh weights (He/Glorot), deterministic for ``seed``."""
        return self.model.init(seed)

    def _params(self, weights: Mapping[str, Any], *, copy: bool) -> list[npt.NDArray[np.float32]]:
        """The weights as float32 arrays in model order, checked against the model."""
        missing = [n for n in self._shapes if n not in weights]
        if missing or len(weights) != len(self._shapes):
            raise ValueError(
                f"weights do not fit the model: expected {list(self._shapes)}, got {list(weights)}"
            )
        out = []
        for name, shape in self._shapes.items():
            # asarray, not array(copy=False): numpy 2 raises when a cast needs a copy.
            raw = weights[name]
            arr = np.array(raw, dtype=np.float32) if copy else np.asarray(raw, dtype=np.float32)
            if arr.shape != shape:
                raise ValueError(f"{name}: expected shape {shape}, got {arr.shape}")
            out.append(arr)
        return out

    def fit(self, weights: Mapping[str, np.ndarray[Any, Any]], config: FitConfig) -> FitResult:
        """Run ``config.epochs`` epochs of SGD from ``weights`` on the training data.

        Returns:
            New weights (not a delta), the number of training examples, and
            ``train_loss``: the mean minibatch loss of the last epoch.

        Raises:
            RuntimeError: the trainer has no training data.
            ValueError: ``weights`` do not fit the model.
        """
        if self.train is None:
            raise RuntimeError("this trainer has no training data")
        params = self._params(weights, copy=True)
        anchor = self._params(weights, copy=False) if config.mu > 0 else None
        x = self.train.x.reshape(len(self.train), self.train.num_features)
        y = self.train.y
        n = len(y)
        rng = np.random.default_rng(config.seed)
        epoch_loss = 0.0
        for _ in range(config.epochs):
            order = rng.permutation(n)
            xs, ys = x[order], y[order]  # one gather per epoch; batches are then views
            epoch_loss = 0.0
            for start in range(0, n, config.batch_size):
                xb = xs[start : start + config.batch_size]
                yb = ys[start : start + config.batch_size]
                epoch_loss += self.sgd_step(params, anchor, xb, yb, config) * len(yb)
        names = list(self._shapes)
        metrics = {"train_loss": epoch_loss / n} if n and config.epochs else {}
        return FitResult(
            weights=dict(zip(names, params, strict=True)), num_examples=n, metrics=metrics
        )

    def sgd_step(
        self,
        params: list[npt.NDArray[np.float32]],
        anchor: list[npt.NDArray[np.float32]] | None,
        xb: npt.NDArray[np.float32],
        yb: npt.NDArray[np.int64],
        config: FitConfig,
    ) -> float:
        """Update ``params`` in place on one minibatch and return its loss.

        Args:
            params: the weights being trained, in model order.
            anchor: the global weights the round started from when
                ``config.mu > 0`` (FedProx), else None.
            xb: the batch's features, flattened.
            yb: its labels.
            config: the round's training config.
        """
        loss, grads = self.model.loss_and_grads(params, xb, yb)
        lr = np.float32(config.lr)
        mu = np.float32(config.mu)
        corr = config.correction
        for i, (name, p, g) in enumerate(zip(self._shapes, params, grads, strict=True)):
            if anchor is not None:
                g += mu * (p - anchor[i])
            if corr is not None:
                g += np.asarray(corr[name], dtype=np.float32)
            g *= lr
            p -= g
        return loss

    def evaluate(self, weights: Mapping[str, np.ndarray[Any, Any]]) -> EvalResult:
        """Mean cross-entropy and accuracy of ``weights`` on the evaluation data.

        An empty evaluation set gives loss and accuracy 0 with ``num_examples``
        0, which a sample-weighted mean ignores.
        """
        data = self.eval if self.eval is not None else self.train
        if data is None:
            raise RuntimeError("this trainer has no data to evaluate on")
        params = self._params(weights, copy=False)
        x = data.x.reshape(len(data), data.num_features)
        loss_sum, correct = 0.0, 0
        for start in range(0, len(data), _EVAL_BATCH):
            ls, c = self.model.loss_and_correct(
                params, x[start : start + _EVAL_BATCH], data.y[start : start + _EVAL_BATCH]
            )
            loss_sum += ls
            correct += c
        n = len(data)
        if n == 0:
            return EvalResult(loss=0.0, accuracy=0.0, num_examples=0)
        return EvalResult(loss=loss_sum / n, accuracy=correct / n, num_examples=n)


def make_trainer(
    model_spec: Mapping[str, Any] | str,
    train: Dataset | None,
    eval: Dataset | None,
    *,
    num_features: int,
    num_classes: int,
    seed: int = 0,
    cnn_trainer: str = "auto",
) -> Trainer:
    """Build the trainer a topology's ``model:`` asks for.

    Args:
        model_spec: ``"logreg"``, ``"mlp"``, ``"cnn"``, ``{kind: mlp, hidden:
            [64, 32]}`` or ``{factory: "pkg.mod:fn", params: {...}}``.
        train: the node's training data (None on the server).
        eval: the data `Trainer.evaluate` scores (None: the training data).
        num_features: model input width.
        num_classes: model output width.
        seed: handed to a factory that takes a ``seed`` argument.
        cnn_trainer: for ``cnn``: ``auto`` trains with torch when it imports
            and otherwise only the head in numpy (logged once per trainer);
            ``torch`` insists on torch; ``numpy-head`` never imports it.

    Raises:
        ConfigError: unknown kind or key, a bad value, a factory that cannot
            be imported or returns neither an ``nn.Module`` nor a `Trainer`;
            the error's path points into ``model``.
    """
    spec: Mapping[str, Any] = {"kind": model_spec} if isinstance(model_spec, str) else model_spec
    if not isinstance(spec, Mapping):
        raise ConfigError(
            f"expected a kind name or a mapping, got {type(model_spec).__name__}", path="model"
        )
    if "factory" in spec:
        _known(spec, ("factory", "params"), "model")
        params = spec.get("params") or {}
        if not isinstance(params, Mapping):
            raise ConfigError("must be a mapping", path="model.params")
        available = {
            "num_features": num_features,
            "num_classes": num_classes,
            "train": train,
            "eval": eval,
            "seed": seed,
        }
        return _from_factory(spec["factory"], dict(params), available, train, eval)
    kind = spec.get("kind")
    if kind == "logreg":
        _known(spec, ("kind",), "model")
        return NumpyTrainer(DenseNetwork(num_features, num_classes), train, eval)
    if kind == "mlp":
        _known(spec, ("kind", "hidden"), "model")
        hidden = spec.get("hidden", [32])
        if (
            not isinstance(hidden, list | tuple)
            or not hidden
            or not all(isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in hidden)
        ):
            raise ConfigError(
                f"must be a non-empty list of positive integers, got {hidden!r}",
                path="model.hidden",
            )
        return NumpyTrainer(DenseNetwork(num_features, num_classes, tuple(hidden)), train, eval)
    if kind == "cnn":
        _known(spec, ("kind",), "model")
        return _cnn_trainer(cnn_trainer, train, eval, num_features, num_classes)
    raise ConfigError(
        f"unknown model kind {kind!r}; expected one of {MODEL_KINDS} or a factory",
        path="model.kind",
    )


def _cnn_trainer(
    choice: str, train: Dataset | None, eval: Dataset | None, num_features: int, num_classes: int
) -> Trainer:
    """The ``cnn`` trainer: torch's, or the numpy head-only one (``cnn_trainer``)."""
    if choice not in CNN_TRAINERS:
        raise ConfigError(f"expected one of {CNN_TRAINERS}, got {choice!r}", path="cnn_trainer")
    shape = _image_shape(train, eval, num_features)
    if choice != "numpy-head":
        try:
            from fedbus.learning.torch import TorchTrainer, cnn  # torch only when asked for
        except ImportError as exc:
            if choice == "torch":
                raise ConfigError(
                    f"the cnn needs torch (pip install 'fedbus[torch]'): {exc}", path="model.kind"
                ) from exc
            log.warning(
                "torch is not available (%s): the cnn trains its head only, in numpy, on "
                "features of the frozen conv layers (docs/boards.md)",
                exc,
            )
        else:
            return TorchTrainer(lambda: cnn(shape, num_classes), train, eval)
    from fedbus.learning.numpy_cnn import NumpyHeadTrainer

    if choice == "numpy-head":
        log.info("cnn: training the head only, in numpy (cnn_trainer=numpy-head)")
    return NumpyHeadTrainer(shape, num_classes, train, eval)


def _known(spec: Mapping[str, Any], allowed: tuple[str, ...], path: str) -> None:
    unknown = sorted(set(spec) - set(allowed))
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown}; allowed: {list(allowed)}", path=path)


def _image_shape(
    train: Dataset | None, eval: Dataset | None, num_features: int
) -> tuple[int, int, int]:
    for data in (train, eval):
        if data is not None and data.image_shape is not None:
            return data.image_shape
    side = round(num_features**0.5)
    if side * side == num_features:
        return (1, side, side)  # a square single-channel image is the only sensible guess
    raise ConfigError(
        f"cnn needs image data; {num_features} features have no image shape", path="model.kind"
    )


def _resolve(ref: Any) -> Callable[..., Any]:
    if not isinstance(ref, str) or ref.count(":") != 1 or not all(ref.split(":")):
        raise ConfigError(f"expected 'package.module:function', got {ref!r}", path="model.factory")
    module_name, attr = ref.split(":")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import {module_name!r}: {exc}", path="model.factory") from exc
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise ConfigError(
                f"{module_name!r} has no attribute {attr!r}", path="model.factory"
            ) from exc
    if not callable(obj):
        raise ConfigError(f"{ref} is not callable", path="model.factory")
    return obj  # type: ignore[no-any-return]


def _call(fn: Callable[..., Any], params: dict[str, Any], available: dict[str, Any]) -> Any:
    """Call ``fn`` with ``params`` and whichever ``available`` arguments it names."""
    kwargs = dict(params)
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins and C types have none
        return fn(**kwargs)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    for name, value in available.items():
        if name not in kwargs and (takes_any or name in sig.parameters):
            kwargs[name] = value
    return fn(**kwargs)


def _from_factory(
    ref: Any,
    params: dict[str, Any],
    available: dict[str, Any],
    train: Dataset | None,
    eval: Dataset | None,
) -> Trainer:
    fn = _resolve(ref)
    try:
        result = _call(fn, params, available)
        if isinstance(result, type) and _is_trainer_class(result):  # a factory returned a class
            result = _call(result, params, available)
    except ConfigError:
        raise
    except Exception as exc:  # a user's factory can fail in any way; say where
        raise ConfigError(
            f"{ref} failed: {type(exc).__name__}: {exc}", path="model.factory"
        ) from exc
    if isinstance(result, Trainer):
        return result
    torch = sys.modules.get("torch")  # an nn.Module means torch is already imported
    if torch is not None and isinstance(result, torch.nn.Module):
        from fedbus.learning.torch import TorchTrainer

        return TorchTrainer(lambda: _call(fn, params, available), train, eval)
    raise ConfigError(
        f"{ref} returned {type(result).__name__}; expected a torch nn.Module or a Trainer",
        path="model.factory",
    )


def _is_trainer_class(cls: type) -> bool:
    return all(callable(getattr(cls, m, None)) for m in ("initial_weights", "fit", "evaluate"))
