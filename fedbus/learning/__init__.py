"""Learning: datasets, partitions, models and trainers.

The only package that may import torch (lazily, in `fedbus.learning.torch`);
the protocols and the bus know weights only as named numpy arrays. Importing
this package pulls numpy only: scikit-learn loads when digits is asked for,
torch when a torch model is.
"""

from fedbus.learning.data import Dataset
from fedbus.learning.partition import FederationData, build_federation_data, load_node_data
from fedbus.learning.seeds import derive_seed, fit_seed, init_seed
from fedbus.learning.trainer import EvalResult, FitConfig, FitResult, NamedArrays, Trainer
from fedbus.learning.trainers import NumpyTrainer, make_trainer

__all__ = [
    "Dataset",
    "EvalResult",
    "FederationData",
    "FitConfig",
    "FitResult",
    "NamedArrays",
    "NumpyTrainer",
    "Trainer",
    "build_federation_data",
    "derive_seed",
    "fit_seed",
    "init_seed",
    "load_node_data",
    "make_trainer",
]
