"""Each attack does what it claims: exact math on small arrays, effect on real digits runs."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fedbus.aggregation import ClientUpdate, FedAvg, MultiKrum, make_aggregator
from fedbus.attacks import (
    AttackContext,
    alie,
    alie_z,
    backdoor_test_set,
    flip_labels,
    free_rider,
    gaussian,
    ipm,
    make_attack,
    poison_backdoor,
    scale_update,
    sign_flip,
    stamp_trigger,
)
from fedbus.attacks.simulate import SimConfig, simulate
from fedbus.errors import ConfigError
from fedbus.learning import FitConfig, fit_seed, init_seed, make_trainer
from fedbus.learning.data import load_digits
from fedbus.learning.partition import build_federation_data

G = {"w": np.array([1.0, 2.0], np.float32)}
H = {"w": np.array([2.0, 1.0], np.float32)}  # honest delta (1, -1)
FAST = SimConfig(rounds=10)
MEDIUM = SimConfig(rounds=20)


def test_sign_flip_sends_minus_four_times_the_delta() -> None:
    np.testing.assert_array_equal(sign_flip(H, G)["w"], [1.0 - 4.0, 2.0 + 4.0])
    assert sign_flip(H, G)["w"].dtype == np.float32
    np.testing.assert_array_equal(sign_flip(H, G, scale=-1.0)["w"], [0.0, 3.0])


def test_gaussian_sends_standard_normal_deltas_reproducibly() -> None:
    big = {"w": np.zeros(20_000)}
    out = gaussian(big, rng=np.random.default_rng(7))["w"]
    assert abs(out.mean()) < 0.03
    assert abs(out.std() - 1.0) < 0.03
    again = gaussian(big, rng=np.random.default_rng(7))["w"]
    assert out.tobytes() == again.tobytes()
    assert gaussian(big, rng=np.random.default_rng(7), std=0.1)["w"].std() < 0.11


def test_alie_z_follows_baruch_et_al() -> None:
    assert alie_z(20, 4) == pytest.approx(0.3853, abs=1e-4)  # s = 7, Phi^-1(0.65)
    assert alie_z(50, 12) == pytest.approx(0.5828, abs=1e-4)  # s = 14, Phi^-1(0.72)
    with pytest.raises(ValueError, match="pass z"):
        alie_z(4, 4)


def test_alie_ipm_free_rider_and_scaling_math() -> None:
    peers = [{"w": np.array([1.0, 2.0])}, {"w": np.array([3.0, 2.0])}]  # deltas (0, 0), (2, 0)
    g = {"w": np.array([1.0, 2.0])}
    np.testing.assert_allclose(alie(peers, g, z=1.0)["w"], [1.0 + 1.0 - 1.0, 2.0])
    np.testing.assert_allclose(ipm(peers, g)["w"], [1.0 - 0.1, 2.0])
    np.testing.assert_allclose(ipm(peers, g, epsilon=100)["w"], [1.0 - 100.0, 2.0])
    assert free_rider(g)["w"].tolist() == [1.0, 2.0]
    noisy = free_rider(g, rng=np.random.default_rng(0), noise_std=1e-3)["w"]
    assert 0 < np.abs(noisy - g["w"]).max() < 1e-2
    np.testing.assert_allclose(scale_update(H, G, scale=20.0)["w"], [21.0, -18.0])


def test_model_replacement_scale_replaces_the_global_model_under_fedavg() -> None:
    attack = make_attack({"kind": "scaling"})
    g = {"w": np.zeros(2)}
    target = {"w": np.array([5.0, -5.0])}
    others = [ClientUpdate(sender=f"h{i}", weights={"w": np.zeros(2)}, num_examples=30)
              for i in range(3)]  # fmt: skip
    ctx = AttackContext(honest=target, global_weights=g, num_clients=4, own_examples=10,
                        total_examples=100)  # fmt: skip
    assert attack.scale(ctx) == 10.0  # sum n / n_k, eta 1
    bad = ClientUpdate(sender="x", weights=attack.poison_update(ctx), num_examples=10)
    np.testing.assert_allclose(FedAvg().aggregate(g, [*others, bad], round=1)["w"], target["w"])


def test_registry_fills_defaults_describes_and_validates() -> None:
    a = make_attack("sign_flip")
    assert a.fraction == 0.2
    assert a.params["scale"] == -4.0
    assert a.describe() == "sign_flip(fraction=0.2, period=1, scale=-4.0)"
    assert "z=z_max(n, f)" in make_attack("alie").describe()
    assert "scale=n/eta" in make_attack("model_replacement").describe()
    mr = make_attack({"kind": "model_replacement", "fraction": 0.05})
    assert [r for r in range(1, 31) if mr.active(r)] == [10, 20, 30]
    ids = [f"client-{i}" for i in range(20)]
    chosen = a.attackers(ids, seed=3)
    assert len(chosen) == 4
    assert chosen == a.attackers(list(reversed(ids)), seed=3)
    for spec, path in [({"kind": "nope"}, "attacks[0].kind"),
                       ({"kind": "ipm", "fraction": 2}, "attacks[0].fraction"),
                       ({"kind": "ipm", "params": {"eps": 1}}, "attacks[0].params"),
                       ({"kind": "ipm", "epsilon": 1}, "attacks[0]"),
                       ({"kind": "ipm", "params": {"period": 0}}, "attacks[0].params.period")]:  # fmt: skip
        with pytest.raises(ConfigError) as info:
            make_attack(spec)
        assert info.value.path == path


def test_label_flipping_moves_predictions_to_c_minus_1_minus_y() -> None:
    data = load_digits()
    flipped = flip_labels(data)
    assert (flipped.y == 9 - data.y).all()
    train, test = flipped.subset(slice(0, 1400)), data.subset(slice(1400, None))
    trainer = make_trainer("logreg", train, test, num_features=64, num_classes=10)
    w = trainer.fit(trainer.initial_weights(0), FitConfig(epochs=10, lr=0.1)).weights
    assert trainer.evaluate(w).accuracy < 0.1  # true labels: almost never right
    flipped_eval = make_trainer("logreg", None, flip_labels(test), num_features=64, num_classes=10)
    assert flipped_eval.evaluate(w).accuracy > 0.85  # it predicts 9 - y


def test_backdoor_stamps_the_corner_and_relabels_a_fraction() -> None:
    data = load_digits().subset(slice(0, 200))
    x = stamp_trigger(data.x, data.image_shape)
    assert (x.reshape(-1, 8, 8)[:, 6:, 6:] == 1.0).all()
    assert (x.reshape(-1, 8, 8)[:, :6, :] == data.x.reshape(-1, 8, 8)[:, :6, :]).all()
    poisoned = poison_backdoor(data, target=3, poison_fraction=0.25, rng=np.random.default_rng(0))
    changed = np.flatnonzero((poisoned.x != data.x).any(axis=1))
    assert len(changed) <= 50
    assert (poisoned.y[changed] == 3).all()
    assert int((poisoned.y != data.y).sum()) > 30
    test = backdoor_test_set(data, target=3)
    assert (test.y == 3).all()
    assert len(test) == int((data.y != 3).sum())


def _one_round() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    ids = [f"client-{i}" for i in range(20)]
    data = build_federation_data("digits", {}, "dirichlet", {"alpha": 0.5}, ids,
                                 test_fraction=0.2, seed=0)  # fmt: skip
    model = {"kind": "mlp", "hidden": [32]}
    t = {c: make_trainer(model, data.train[c], None, num_features=64, num_classes=10) for c in ids}
    g = t[ids[0]].initial_weights(init_seed(0))
    for rnd in (1, 2):  # a few FedAvg rounds so updates are not just the first steps
        ups = [ClientUpdate(sender=c, weights=t[c].fit(g, FitConfig(seed=fit_seed(0, rnd, c))).weights,
                            num_examples=len(data.train[c])) for c in ids]  # fmt: skip
        g = FedAvg().aggregate(g, ups, round=rnd)
    return g, [t[c].fit(g, FitConfig(seed=fit_seed(0, 3, c))).weights for c in ids]


def test_alie_hides_inside_the_honest_spread_and_wins_krum() -> None:
    g, honest = _one_round()
    bad = alie(honest, g, z=alie_z(20, 4))
    stack = np.stack([h["dense0.w"] for h in honest])
    tol = 1e-6  # pixels that are 0 everywhere give identical honest values, up to rounding
    inside = (bad["dense0.w"] >= stack.min(axis=0) - tol) & (
        bad["dense0.w"] <= stack.max(axis=0) + tol
    )
    assert inside.mean() > 0.95  # outside only where one client differs from 19 identical
    ups = [
        ClientUpdate(sender=f"h{i:02d}", weights=h, num_examples=1)
        for i, h in enumerate(honest[:16])
    ]
    ups += [ClientUpdate(sender=f"x{i}", weights=bad, num_examples=1) for i in range(4)]
    krum = MultiKrum(f=4, m=4)
    krum.aggregate(g, ups, round=3)
    assert krum.last_selected == ["x0", "x1", "x2", "x3"]  # Krum prefers the attackers


def test_ipm_with_epsilon_100_reverses_the_aggregate_direction() -> None:
    g, honest = _one_round()
    names = list(g)

    def flat(w: Any) -> Any:
        return np.concatenate([(np.asarray(w[n], np.float64) - g[n]).ravel() for n in names])

    true_dir = flat(FedAvg().aggregate(g, [ClientUpdate(sender=str(i), weights=h, num_examples=1)
                                            for i, h in enumerate(honest)], round=3))  # fmt: skip
    for eps, sign in ((100.0, -1), (0.1, 1)):
        bad = ipm(honest, g, epsilon=eps)
        ups = [
            ClientUpdate(sender=f"h{i:02d}", weights=h, num_examples=1)
            for i, h in enumerate(honest[:16])
        ]
        ups += [ClientUpdate(sender=f"x{i}", weights=bad, num_examples=1) for i in range(4)]
        got = flat(FedAvg().aggregate(g, ups, round=3))
        cos = got @ true_dir / np.linalg.norm(got) / np.linalg.norm(true_dir)
        assert np.sign(cos) == sign


def test_twenty_percent_byzantine_attacks_break_fedavg_but_not_robust_aggregators() -> None:
    clean = simulate(FedAvg(), None, MEDIUM).final_accuracy
    assert clean > 0.75
    for kind in ("sign_flip", "gaussian"):
        attacked = simulate(FedAvg(), make_attack(kind), MEDIUM).final_accuracy
        assert attacked < clean - 0.3, kind
        for spec in (
            "median",
            {"kind": "trimmed_mean", "beta": 0.2},
            {"kind": "multi_krum", "f": 4},
        ):
            robust = simulate(make_aggregator(spec), make_attack(kind), MEDIUM).final_accuracy
            assert robust > attacked + 0.1, (kind, spec)


def test_model_replacement_backdoor_succeeds_and_norm_clipping_stops_it() -> None:
    attack = make_attack({"kind": "model_replacement", "fraction": 0.05, "params": {"epochs": 10}})
    plain = simulate(FedAvg(), attack, FAST)
    assert len(plain.attackers) == 1
    assert plain.backdoor_success[-1] > 0.8  # attack round 10 is the last one
    assert plain.backdoor_success[0] < 0.2  # before the attack the trigger does nothing
    clipped = simulate(make_aggregator("norm_clipping"), attack, FAST)
    assert clipped.backdoor_success[-1] < 0.2
