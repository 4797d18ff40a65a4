"""Attacks for simulation: data poisoning and model poisoning (never used by a real node).

They exist so that defenses are measured, not assumed: `benchmarks/attack_matrix.py`
runs each attack against each aggregator, and every attack has tests showing
it does what it claims (a broken attack makes every defense look good).
"""

from __future__ import annotations

from fedbus.attacks.data import backdoor_test_set, flip_labels, poison_backdoor, stamp_trigger
from fedbus.attacks.model import alie, alie_z, free_rider, gaussian, ipm, scale_update, sign_flip
from fedbus.attacks.registry import ATTACKS, Attack, AttackContext, make_attack, make_attacks

__all__ = [
    "ATTACKS",
    "Attack",
    "AttackContext",
    "alie",
    "alie_z",
    "backdoor_test_set",
    "flip_labels",
    "free_rider",
    "gaussian",
    "ipm",
    "make_attack",
    "make_attacks",
    "poison_backdoor",
    "scale_update",
    "sign_flip",
    "stamp_trigger",
]
