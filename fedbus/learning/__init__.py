"""Learning: datasets, partitions, models and trainers.

The only package that may import torch (lazily, in `fedbus.learning.torch`);
the protocols and the bus know weights only as named numpy arrays.
"""
