"""Tests for knob_grpo.latency: measurement, profiles, sweep statistics and reports."""

import dataclasses
import json
import os
import random
import re
import types

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
import transformers

from knob_grpo.latency import (
    DECODE_FEATURES,
    TTFT_FEATURES,
    LatencyMeasurement,
    LatencyMeter,
    LatencyProfile,
    ProfileRecord,
    current_device_name,
    lookup_table,
    oracle_choice,
    pareto_series,
    percentile,
    plot_pareto,
    profile_features,
    split_records,
    violation_rate,
    write_json,
    write_markdown_table,
)

# ----------------------------------------------------------------------------- measurement


@pytest.fixture(scope="module")
def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    return transformers.LlamaForCausalLM(config).eval()


def test_meter_on_real_generate(tiny_llama):
    input_ids = torch.tensor([[2, 5, 9, 11, 17, 23]])
    new_tokens = 6

    def generate(streamer):
        with torch.no_grad():
            return tiny_llama.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                streamer=streamer,
            )

    meter = LatencyMeter(warmup=1, repeats=3, device="cpu")
    m = meter.measure(generate)
    assert m.num_new_tokens == new_tokens
    assert meter.last_output.shape[1] == input_ids.shape[1] + new_tokens
    assert 0 < m.ttft_ms <= m.total_ms
    assert m.decode_ms >= 0
    # per-token decode is the decode time over the steps after the first (prefill) token
    assert m.decode_ms_per_token == pytest.approx(m.decode_ms / (new_tokens - 1), rel=1e-6)
    assert m.for_target("ttft") == m.ttft_ms
    assert m.for_target("end_to_end") == m.total_ms
    assert meter.budget_latency(m) == m.ttft_ms

    single = meter.measure_once(generate)
    assert single.total_ms == pytest.approx(single.ttft_ms + single.decode_ms)


def test_meter_rejects_a_generate_that_ignores_the_streamer():
    meter = LatencyMeter(warmup=0, repeats=1)
    with pytest.raises(RuntimeError, match="streamer"):
        meter.measure(lambda streamer: None)


def test_meter_with_fake_clock():
    # A scripted clock makes the arithmetic exact. Reads, in order: start, first token (stamped
    # twice: first and last), three more tokens, end(), stop after generate_fn returns.
    ticks = iter([0.0, 0.1, 0.1, 0.2, 0.3, 0.35, 0.38, 0.4])

    def generate(streamer):
        streamer.put(torch.tensor([[1, 2, 3]]))  # the prompt
        for token in range(4):
            streamer.put(torch.tensor([token]))
        streamer.end()

    meter = LatencyMeter(warmup=0, repeats=1, clock=lambda: next(ticks))
    m = meter.measure(generate)
    assert m.ttft_ms == pytest.approx(100.0)
    assert m.total_ms == pytest.approx(400.0)
    assert m.decode_ms == pytest.approx(300.0)
    assert m.decode_ms_per_token == pytest.approx(300.0 / 3)  # 4 tokens: 3 decode steps after the first
    assert m.num_new_tokens == 4


def test_meter_argument_errors():
    with pytest.raises(ValueError, match="repeats=0"):
        LatencyMeter(repeats=0)
    with pytest.raises(ValueError, match="'prefill'"):
        LatencyMeter(budget_target="prefill")
    with pytest.raises(ValueError, match="'p95'"):
        LatencyMeasurement(1.0, 1.0, 1.0, 2.0, 2).for_target("p95")


# ----------------------------------------------------------------------------- profile

TRUE_TTFT = dict(zip(TTFT_FEATURES, (5.0, 0.02, 1.5e-3, 4e-4, 2e-7)))
TRUE_DECODE = dict(zip(DECODE_FEATURES, (3.0, 0.8, 0.1, 5e-5)))


def _synthetic_records(n, seed, noise=0.005):
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        p = rng.randint(1, 5)
        record = ProfileRecord(
            vision_tokens=rng.choice([432, 1008, 1872]),
            text_tokens=rng.randint(10, 150),
            num_active_blocks=rng.randint(max(12, p + 11), 16),
            top_k=rng.randint(4, 8),
            insertion_position=p,
            default_top_k=8,
            output_tokens=rng.choice([4, 16, 32]),
        )
        f = profile_features(record)
        ttft = sum(TRUE_TTFT[k] * v for k, v in f["ttft"].items())
        per_token = sum(TRUE_DECODE[k] * v for k, v in f["decode"].items())
        record.ttft_ms = ttft * (1 + rng.gauss(0, noise))
        record.decode_ms_per_token = per_token * (1 + rng.gauss(0, noise))
        records.append(record)
    return records


def test_profile_recovers_known_coefficients():
    fit_part, holdout = split_records(_synthetic_records(300, seed=1), holdout_fraction=0.25, seed=0)
    assert len(holdout) == 75 and len(fit_part) == 225
    profile = LatencyProfile.fit(fit_part, device="test-device", executor="tiny/v1")
    for name, true in TRUE_TTFT.items():
        assert profile.ttft_coef[name] == pytest.approx(true, rel=0.15), name
    for name, true in TRUE_DECODE.items():
        assert profile.decode_coef[name] == pytest.approx(true, rel=0.15), name
    errors = profile.holdout_error(holdout)
    assert errors["ttft"] < 1.0 and errors["end_to_end"] < 1.0  # percent; noise is 0.5%


def test_holdout_excess_is_the_percentile_of_how_far_runs_exceed_the_prediction():
    records = _synthetic_records(60, seed=3, noise=0.0)
    profile = LatencyProfile.fit(records, device="d", executor="e")
    # the same configurations measured 0%, 2%, ... 38% slower than predicted (20 runs), and one 10% faster
    slower = []
    for i, r in enumerate(records[:21]):
        factor = 0.9 if i == 20 else 1 + 0.02 * i
        slower.append(dataclasses.replace(r, ttft_ms=r.ttft_ms * factor, end_to_end_ms=None, decode_ms_per_token=r.decode_ms_per_token))
    excess = profile.holdout_excess(slower, 95)
    expected = percentile([2.0 * i for i in range(20)] + [-10.0], 95)
    assert excess["ttft"] == pytest.approx(expected, abs=1e-6)
    assert profile.holdout_excess(slower, 50)["ttft"] == pytest.approx(18.0, abs=1e-6)
    assert profile.holdout_excess(records, 95)["end_to_end"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="got no records"):
        profile.holdout_excess([])


def test_profile_exact_without_noise_and_prediction_shape():
    records = _synthetic_records(60, seed=2, noise=0.0)
    profile = LatencyProfile.fit(records, device="d", executor="e")
    assert profile.holdout_error(records)["ttft"] == pytest.approx(0.0, abs=1e-6)
    r = records[0]
    pred = profile.predict({k: getattr(r, k) for k in ("vision_tokens", "text_tokens", "num_active_blocks",
                                                     "top_k", "insertion_position", "default_top_k", "output_tokens")})
    assert pred["end_to_end_ms"] == pytest.approx(pred["ttft_ms"] + (r.output_tokens - 1) * pred["decode_ms_per_token"])
    assert profile.predict_for_target(r, "end_to_end") == pred["end_to_end_ms"]
    assert all(v >= 0 for v in list(profile.ttft_coef.values()) + list(profile.decode_coef.values()))


def test_profile_save_load_round_trip_and_refusals(tmp_path):
    path = tmp_path / "profiles" / "latency.json"
    profile = LatencyProfile.fit(_synthetic_records(40, seed=3), device="gpu-A", executor="molmoe/v1")
    profile.save(path)
    other = LatencyProfile.fit(_synthetic_records(40, seed=4), device="gpu-B", executor="molmoe/v1")
    other.save(path)  # same file, second device: both kept

    loaded = LatencyProfile.load(path, device="gpu-A", executor="molmoe/v1")
    assert loaded.ttft_coef == pytest.approx(profile.ttft_coef)
    assert loaded.decode_coef == pytest.approx(profile.decode_coef)
    assert loaded.num_records == 40
    assert LatencyProfile.load(path, device="gpu-B").device == "gpu-B"  # the only executor is implied
    assert set(json.loads(path.read_text())["profiles"]) == {"gpu-A", "gpu-B"}

    with pytest.raises(ValueError, match=r"molmoe/v1.*qwen/v2"):
        LatencyProfile.load(path, device="gpu-A", executor="qwen/v2")
    with pytest.raises(ValueError, match="gpu-C"):
        LatencyProfile.load(path, device="gpu-C", executor="molmoe/v1")
    with pytest.warns(UserWarning, match="gpu-C"):
        borrowed = LatencyProfile.load(path, device="gpu-C", executor="molmoe/v1", strict=False)
    assert borrowed.device in {"gpu-A", "gpu-B"}


def test_profile_fit_errors():
    with pytest.raises(ValueError, match="no records"):
        LatencyProfile.fit([], device="d", executor="e")
    with pytest.raises(ValueError, match="ttft_ms"):
        LatencyProfile.fit([{"vision_tokens": 1, "text_tokens": 1, "num_active_blocks": 2}])
    bad = {"vision_tokens": 1, "text_tokens": 1, "num_active_blocks": 2, "ttft_ms": -3.0,
           "decode_ms_per_token": 1.0, "output_tokens": 4}
    with pytest.raises(ValueError, match="-3.0"):
        LatencyProfile.fit([bad], device="d", executor="e")
    with pytest.raises(ValueError, match="holdout_fraction=1.5"):
        split_records([1, 2, 3], 1.5, 0)


def test_current_device_name_is_stable():
    name = current_device_name("cpu")
    assert name.startswith("cpu:") and name == current_device_name("cpu")


# ----------------------------------------------------------------------------- sweep statistics


def test_violation_rate_and_percentile():
    assert violation_rate([100, 150, 200, 201, 300], 200) == pytest.approx(2 / 5)
    # sorted 10, 20, 30, 40; h = 3 * 0.95 = 2.85 -> 30 + 0.85 * 10 = 38.5
    assert percentile([40, 10, 30, 20], 95) == pytest.approx(38.5)
    assert percentile([5], 95) == 5
    assert percentile([1, 2, 3], 100) == 3 and percentile([1, 2, 3], 0) == 1
    assert percentile([1, 2, 3], 50) == 2


@pytest.mark.parametrize("budget", [0, -5, float("nan"), float("inf")])
def test_bad_budgets(budget):
    with pytest.raises(ValueError, match="budget"):
        violation_rate([1.0], budget)
    with pytest.raises(ValueError, match="budget"):
        lookup_table([("a", 0.5, 10.0)], [100, budget])


def test_bad_inputs():
    with pytest.raises(ValueError, match="empty"):
        lookup_table([("a", 0.5, 10.0)], [])
    with pytest.raises(ValueError, match="-1"):
        violation_rate([10, -1], 100)
    for flag in (True, np.False_, np.array(True), torch.tensor(False)):  # not read as 1 or 0 ms
        with pytest.raises(ValueError, match=re.escape(f"latency_ms={flag!r} is not a number")):
            violation_rate([10, flag], 100)
        with pytest.raises(ValueError, match=r"latency_ms of config 'a'=.* is not a number"):
            lookup_table([("a", 0.5, flag)], [100])
    with pytest.raises(ValueError, match="-4"):
        lookup_table([("a", 0.5, -4.0)], [100])


STATIC = [
    ("full", 0.80, 300.0),
    ("mid", 0.75, 200.0),
    ("mid-twin", 0.75, 180.0),  # same accuracy as "mid", faster: wins ties
    ("low", 0.60, 120.0),
    ("bad-slow", 0.50, 250.0),
]


def test_lookup_table_obvious_choices():
    table = lookup_table(STATIC, [100, 120, 190, 250, 400])
    assert [c.config_key for c in table] == ["low", "low", "mid-twin", "mid-twin", "full"]
    assert [c.fits for c in table] == [False, True, True, True, True]
    assert table[0].latency_ms == 120.0 and table[0].budget_ms == 100.0
    as_mapping = lookup_table({k: (a, l) for k, a, l in STATIC}, [400])
    assert as_mapping[0].config_key == "full"


def test_oracle_choice_per_sample():
    samples = [
        [("full", 1.0, 300.0), ("low", 1.0, 120.0), ("mid", 0.0, 200.0)],  # tie -> faster "low"
        [("full", 1.0, 300.0), ("low", 0.0, 120.0), ("mid", 1.0, 200.0)],  # only mid is right and fits
        [("full", 1.0, 300.0), ("low", 0.0, 120.0), ("mid", 0.0, 200.0)],  # right one too slow
        [("full", 1.0, 400.0), ("mid", 1.0, 260.0)],  # nothing fits -> fastest, flagged
    ]
    choices = oracle_choice(samples, budget=250)
    assert [c.config_key for c in choices] == ["low", "mid", "low", "mid"]
    assert [c.fits for c in choices] == [True, True, True, False]
    assert sum(c.accuracy for c in choices[:3]) / 3 == pytest.approx(2 / 3)


# ----------------------------------------------------------------------------- reports


def _rows():
    budgets = [170.0, 250.0, 380.0]
    rows = []
    curves = {
        "controller": [(150, 0.62), (220, 0.71), (300, 0.76)],
        "lookup table": [(160, 0.58), (240, 0.66), (330, 0.74)],
        "full model": [(310, 0.78)] * 3,
        "oracle": [(140, 0.80), (200, 0.86), (260, 0.89)],
    }
    for method, points in curves.items():
        for budget, (latency, accuracy) in zip(budgets, points):
            rows.append({
                "method": method,
                "budget_ms": budget,
                "accuracy": accuracy,
                "mean_latency_ms": float(latency),
                "p95_latency_ms": latency * 1.15,
                "violation_rate": violation_rate([latency * 0.9, latency, latency * 1.15], budget),
                "knobs": "(tier=low, top_k=4)" if method == "controller" else "per-sample | mixed",
            })
    return budgets, rows


def test_report_writers(tmp_path):
    budgets, rows = _rows()
    json_path = write_json(rows, tmp_path / "out" / "sweep.json")
    assert json.loads(json_path.read_text()) == rows  # floats round-trip exactly through JSON

    md = write_markdown_table(rows, tmp_path / "out" / "sweep.md").read_text().splitlines()
    assert md[0].startswith("| method | budget_ms | accuracy")
    body = md[2:]
    assert len(body) == len(rows) == 4 * len(budgets)
    assert {(line.split("|")[1].strip(), line.split("|")[2].strip()) for line in body} == {
        (m, f"{b:.1f}") for m in ("controller", "lookup table", "full model", "oracle") for b in budgets
    }
    assert all(line.count(" | ") == 6 for line in body)  # the escaped pipe does not add a column

    png = plot_pareto(pareto_series(rows), budgets, tmp_path / "out" / "pareto.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    with pytest.raises(ValueError, match="knobs"):
        write_json([{k: v for k, v in rows[0].items() if k != "knobs"}], tmp_path / "x.json")
    with pytest.raises(ValueError, match="empty"):
        plot_pareto(pareto_series(rows), [], tmp_path / "y.png")


# ----------------------------------------------------------------------------- argument checks


def test_bool_budgets_are_refused():
    # float(True) == 1.0: a bool would otherwise pass as a 1 ms budget
    with pytest.raises(ValueError, match="budget_ms=True is a bool"):
        violation_rate([1.0], True)
    with pytest.raises(ValueError, match="budget_ms=False is a bool"):
        lookup_table([("a", 0.5, 10.0)], [100, False])
    with pytest.raises(ValueError, match="budget_ms=True is a bool"):
        oracle_choice([[("a", 1.0, 0.5)]], True)
    with pytest.raises(ValueError, match=r"budget_ms=np.True_ is a bool"):
        violation_rate([1.0], np.True_)


@pytest.mark.parametrize("name,value", [
    ("vision_tokens", float("nan")), ("text_tokens", -1), ("num_active_blocks", float("inf")), ("output_tokens", "many"),
    ("insertion_position", True), ("top_k", -3), ("top_k", 0), ("default_top_k", float("nan")),
])
def test_predict_and_fit_refuse_bad_features(name, value):
    records = _synthetic_records(20, seed=5, noise=0.0)
    profile = LatencyProfile.fit(records, device="d", executor="e")
    bad = dataclasses.replace(records[0], **{name: value})
    message = re.escape(f"{name}={value!r}")
    with pytest.raises(ValueError, match=message):
        profile.predict(bad)
    with pytest.raises(ValueError, match=message):
        LatencyProfile.fit(records[1:] + [bad], device="d", executor="e")
    assert profile.predict(dataclasses.replace(records[0], top_k=None, default_top_k=None))["ttft_ms"] > 0  # dense: fine


def test_profile_file_is_strict_json_with_unmeasured_metadata_as_null(tmp_path):
    path = tmp_path / "latency.json"
    metadata = {"holdout": {"ttft_mdape_pct": 1.5, "decode_per_token_mdape_pct": float("nan")}, "spread": [float("inf"), 2.0]}
    profile = LatencyProfile.fit(_synthetic_records(20, seed=6), device="d", executor="e", metadata=metadata)
    profile.save(path)
    LatencyProfile.fit(_synthetic_records(20, seed=7), device="d2", executor="e", metadata=metadata).save(path)  # an update too

    def refuse(token):
        raise ValueError(f"{token} is not JSON")

    data = json.loads(path.read_text(), parse_constant=refuse)
    assert data["profiles"]["d"]["e"]["metadata"] == {"holdout": {"ttft_mdape_pct": 1.5, "decode_per_token_mdape_pct": None},
                                                     "spread": [None, 2.0]}
    loaded = LatencyProfile.load(path, device="d", executor="e")
    assert loaded.ttft_coef == pytest.approx(profile.ttft_coef) and loaded.decode_coef == pytest.approx(profile.decode_coef)
    assert loaded.metadata["holdout"] == {"ttft_mdape_pct": 1.5, "decode_per_token_mdape_pct": None}


def test_fit_and_load_name_the_executors_device(tmp_path, monkeypatch):
    """Without device=, current_device_name() prefers CUDA whenever it is available; given the
    executor object, fit and load name its device (and its name_or_path) instead."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    assert current_device_name() == "cuda:Fake GPU"
    cpu = current_device_name("cpu")
    executor = types.SimpleNamespace(name_or_path="tiny/v1", device=torch.device("cpu"))
    records = _synthetic_records(20, seed=8)
    profile = LatencyProfile.fit(records, executor=executor)
    assert (profile.device, profile.executor) == (cpu, "tiny/v1")
    assert LatencyProfile.fit(records, device=torch.device("cpu"), executor="tiny/v1").device == cpu
    assert LatencyProfile.fit(records, executor="tiny/v1").device == "cuda:Fake GPU"  # a name alone: the documented default
    path = profile.save(tmp_path / "latency.json")
    loaded = LatencyProfile.load(path, executor=executor)  # strict: the executor's device must match
    assert (loaded.device, loaded.executor) == (cpu, "tiny/v1") and loaded.ttft_coef == pytest.approx(profile.ttft_coef)
    with pytest.raises(ValueError, match="cuda:Fake GPU"):
        LatencyProfile.load(path, executor="tiny/v1")
    with pytest.raises(ValueError, match=r"executor=42 must be the executor's name"):
        LatencyProfile.load(path, executor=42)
