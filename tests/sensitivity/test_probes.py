"""The type-aware α from single-unit probes: it recovers each type's scale of the measured ΔJ."""

import types

import numpy as np
import pytest

from lampq_jax import LampQConfig
from lampq_jax.sensitivity import FisherTraces
from lampq_jax.sensitivity.probes import probe_alpha, probe_width

TRUE_SCALE = {"qkv": 0.1, "fc2": 4.0}  # measured ΔJ = scale[type] × predicted ΔL: fc2 above qkv, unlike ΔL


def _setup(blocks=4):
    layers, w_term = [], []
    rng = np.random.default_rng(0)
    for b in range(blocks):
        for name, type_ in (("query", "qkv"), ("key", "qkv"), ("fc2", "fc2")):
            group = f"block{b}/qkv" if type_ == "qkv" else f"block{b}/fc2"
            layers.append(types.SimpleNamespace(path=f"block{b}/{name}", type=type_, group=group))
            w_term.append(rng.uniform(1.0, 2.0) * np.array([8.0, 4.0, 1.0]))  # candidates 2, 4, 8
    w_term = np.array(w_term)
    fisher = FisherTraces({l.path: 1.0 for l in layers}, {l.path: 1.0 for l in layers}, 16)
    return layers, w_term, np.zeros_like(w_term), fisher


def _measure_alone(layers, w_term):
    index = {l.path: j for j, l in enumerate(layers)}

    def measure(bits):
        return sum(TRUE_SCALE[layers[index[p]].type] * w_term[index[p], 0] for p in bits)  # probes at 2 bits

    return measure


@pytest.mark.parametrize("alpha", ["probe", "layer"])
def test_probes_recover_the_scale_of_each_type(alpha):
    layers, w_term, a_term, fisher = _setup()
    config = LampQConfig(candidates=(2, 4, 8), alpha=alpha, metric_check=True, progress=False)
    probed = probe_alpha(layers, w_term, a_term, fisher, config, _measure_alone(layers, w_term), 2)
    assert probed.alpha == pytest.approx(TRUE_SCALE)
    np.testing.assert_allclose(probed.layer_alpha, [TRUE_SCALE[l.type] for l in layers])
    assert probed.unit_keys == [f"block{b}/{t}" for b in range(4) for t in ("qkv", "fc2")]
    assert sorted(probed.measured) == list(range(8))  # the metric check measures every unit
    assert probed.spearman["probe"] == pytest.approx(1.0)  # α × predicted = measured: same order
    assert probed.spearman["none"] < 0.0  # unscaled, every qkv unit ranks above every fc2 unit: the wrong order


def test_probe_count_per_type_without_the_metric_check():
    layers, w_term, a_term, fisher = _setup(blocks=6)
    config = LampQConfig(candidates=(2, 4, 8), alpha="probe", probes=2, metric_check=False, progress=False)
    probed = probe_alpha(layers, w_term, a_term, fisher, config, _measure_alone(layers, w_term), 2)
    assert len(probed.measured) == 4 and probed.spearman == {}  # 2 units of each of the 2 types
    assert probed.alpha == pytest.approx(TRUE_SCALE)


@pytest.mark.parametrize(
    "budget, kind, expected",
    [
        (4.0, "avg_bits", 3),  # one candidate below the budget's whole bits
        (4.5, "avg_bits", 3),
        (6.0, "avg_bits", 5),
        (8.0, "avg_bits", 6),  # 7 is no candidate: the largest below 8
        (3.0, "avg_bits", 2),
        (2.5, "avg_bits", 2),  # no candidate below 2: the lowest
        (4.0, "bops", 3),
        (4.0e6, "model_bytes", 2),  # bytes, not bits: the lowest candidate
    ],
)
def test_probe_width_is_one_candidate_below_the_budget(budget, kind, expected):
    assert probe_width((2, 3, 4, 5, 6, 8), None, budget, kind) == expected


def test_probe_width_takes_the_users_bits():
    assert probe_width((2, 3, 4, 5, 6, 8), 4, 6.0, "avg_bits") == 4


def test_the_metric_check_measures_every_unit_but_leaves_alpha_alone():
    """α = 'probe' comes from its P units per type, with or without the metric check measuring the rest."""
    layers, w_term, a_term, fisher = _setup(blocks=6)
    index = {l.path: j for j, l in enumerate(layers)}
    skew = np.linspace(0.5, 3.0, len(layers))  # each unit off its type's scale by its own factor

    def measure(bits):
        return sum(TRUE_SCALE[layers[index[p]].type] * skew[index[p]] * w_term[index[p], 0] for p in bits)

    figures = {}
    for check in (False, True):
        config = LampQConfig(candidates=(2, 4, 8), alpha="probe", probes=2, metric_check=check, progress=False)
        figures[check] = probe_alpha(layers, w_term, a_term, fisher, config, measure, 2)
    assert len(figures[False].measured) == 4 and len(figures[True].measured) == 12
    assert figures[True].alpha == pytest.approx(figures[False].alpha)
    np.testing.assert_allclose(figures[True].layer_alpha, figures[False].layer_alpha)
    assert set(figures[True].spearman) == {"none", "mean", "probe"}
