"""Tests for knob_grpo.evaluation: report rows from hand-built outcomes, the lookup table through the
evaluation code path, a real budget sweep on a tiny Qwen3-VL-MoE, the CLI and input errors."""

import json
import math
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest
import torch

from knob_grpo.adaptive import AdaptiveModel
from knob_grpo.controller import TwoStageController
from knob_grpo.evaluation import (
    METHODS,
    EvaluationResult,
    RowOutcome,
    StaticSweep,
    _row_id,
    evaluate_budgets,
    exact_match_score,
    main,
)
from knob_grpo.knobs import Knobs
from knob_grpo.latency import (DECODE_FEATURES, REPORT_COLUMNS, TTFT_FEATURES, LatencyMeter, LatencyProfile, current_device_name,
                               markdown_table, percentile, write_markdown_table)
from tiny import tiny_image, tiny_vlm

QUESTIONS = ["what colour is the circle ?", "how many dots are there ?", "what shape is the red one ?", "is the square blue ?"]
FAST, MID, SLOW = Knobs("low", 1, 2, 5), Knobs("medium", 1, 3, 6), Knobs("high", 1, 4, 6)
THREADS = 1  # timings on a shared CPU are far steadier with one intra-op thread


@pytest.fixture(scope="module")
def vlm():
    model, processor = tiny_vlm(moe=True)
    return AdaptiveModel(model, processor)


def make_rows(adaptive, seed0, n=4):
    """Rows whose answer is the full model's own greedy answer (so the full model scores 1.0)."""
    rows = []
    for i in range(n):
        question, image = QUESTIONS[i % len(QUESTIONS)], tiny_image(seed0 + i, 48 + 16 * i)
        out = adaptive.generate(question, [image], max_new_tokens=3, do_sample=False)
        prompt_len = adaptive.prepare_inputs(question, [image])["input_ids"].shape[-1]
        answer = adaptive.tokenizer.decode(out[0, prompt_len:], skip_special_tokens=True)
        rows.append({"question": question, "image": image, "answer": answer})
    return rows


@pytest.fixture(scope="module")
def data(vlm):
    return make_rows(vlm, 0), make_rows(vlm, 100, n=3)


def outcome(score, latency, knobs=FAST, total=None):
    return RowOutcome(score=score, ttft_ms=latency, total_ms=latency * 2 if total is None else total, knobs=knobs)


# --------------------------------------------------------------------------- hand-built numbers
def test_rows_from_hand_built_outcomes():
    latencies, scores = [50.0, 90.0, 100.0, 150.0, 200.0], [1, 1, 0, 1, 0]
    ctrl = [outcome(s, t, FAST if i < 3 else SLOW) for i, (s, t) in enumerate(zip(scores, latencies))]
    result = EvaluationResult(budgets=[100.0], outcomes={("controller", 100.0): ctrl})
    (row,) = result.rows
    assert set(REPORT_COLUMNS) <= set(row)
    assert row["accuracy"] == pytest.approx(0.6)
    assert row["mean_latency_ms"] == pytest.approx(118.0)
    assert row["p95_latency_ms"] == pytest.approx(190.0)  # numpy's linear percentile: 150 + 0.8 * 50
    assert row["violation_rate"] == pytest.approx(0.4)  # 100 ms fits a 100 ms budget
    assert row["accuracy_within_budget"] == pytest.approx(0.4)  # the correct 150 ms row was late
    assert row["knobs"] == f"{FAST} (3/5 rows)"
    assert row["knob_distribution"] == {str(FAST): 0.6, str(SLOW): 0.4}
    # the end-to-end target reads total_ms (= 2 x ttft here)
    assert markdown_table(result.rows) in result.to_markdown()
    e2e = EvaluationResult(budgets=[250.0], outcomes={("controller", 250.0): ctrl}, latency_target="end_to_end").rows[0]
    assert e2e["p95_latency_ms"] == pytest.approx(380.0) and e2e["violation_rate"] == pytest.approx(0.4)


def test_markdown_table_matches_the_writer(tmp_path):
    rows = EvaluationResult(budgets=[50.0], outcomes={("oracle", 50.0): [outcome(1, 40.0), outcome(0, 60.0)]}).rows
    assert markdown_table(rows) == write_markdown_table(rows, tmp_path / "t.md").read_text()


def test_summary_gap_closed():
    budgets = [100.0, 300.0]
    per = {  # accuracy per (method, budget) over 4 rows, all within budget
        ("controller", 100.0): [1, 1, 0, 0], ("lookup table", 100.0): [1, 0, 0, 0], ("oracle", 100.0): [1, 1, 1, 0],
        ("controller", 300.0): [1, 1, 1, 0], ("lookup table", 300.0): [1, 1, 1, 1], ("oracle", 300.0): [1, 1, 1, 1],
        ("full model", 100.0): [1, 1, 1, 1], ("full model", 300.0): [1, 1, 1, 1],
        ("best static", 100.0): [1, 0, 1, 0], ("best static", 300.0): [1, 1, 1, 1],
    }
    result = EvaluationResult(budgets=budgets, outcomes={k: [outcome(s, 50.0) for s in v] for k, v in per.items()})
    s100, s300 = result.summary
    assert s100["controller_minus_lookup"] == pytest.approx(0.25)
    assert s100["gap_closed"] == pytest.approx(0.5)  # (0.5 - 0.25) / (0.75 - 0.25)
    assert s300["controller_minus_lookup"] == pytest.approx(-0.25)
    assert s300["gap_closed"] is None  # the oracle is no better than the lookup table: no gap
    assert s100["controller_minus_best_static"] == 0.0 and s300["controller_minus_best_static"] == pytest.approx(-0.25)
    assert [(r["method"], r["budget_ms"]) for r in result.rows] == [(m, b) for m in METHODS for b in budgets]
    assert result.row("controller", 100.0)["gap_closed"] == pytest.approx(0.5)
    md = result.to_markdown()
    assert "| method | budget_ms | accuracy |" in md and "+0.5000" in md and "gap closed" in md


def test_lookup_table_from_a_hand_built_sweep():
    rows = lambda acc, lat: [outcome(a, t, None) for a, t in zip(acc, lat)]  # noqa: E731
    sweep = StaticSweep(
        executor="x", device="d", configs=[FAST, MID, SLOW],
        outcomes=[rows([1, 0, 0, 0], [8, 9, 10, 30]), rows([1, 1, 1, 0], [40, 45, 50, 55]), rows([1, 1, 1, 1], [300, 310, 320, 330])],
    )
    table = {k: (a, t) for k, a, t in sweep.table("ttft", "p95")}
    assert table[FAST] == (0.25, pytest.approx(27.0))
    assert {k: t for k, _, t in sweep.table("ttft", "mean")}[FAST] == pytest.approx(14.25)
    assert {k: t for k, _, t in sweep.table("ttft", "max")}[MID] == 55
    assert {k: t for k, _, t in sweep.table("end_to_end", "max")}[MID] == 110
    per_sample = sweep.per_sample()
    assert len(per_sample) == 4 and per_sample[3][0] == (FAST, 0.0, 30.0)
    with pytest.raises(ValueError, match="'median'"):
        sweep.table("ttft", "median")
    assert StaticSweep.from_dict(json.loads(json.dumps(sweep.to_dict()))) == sweep


# --------------------------------------------------------------------------- a real sweep on a tiny model
@pytest.fixture(scope="module")
def evaluation(vlm, data, tmp_path_factory):
    eval_rows, profile_rows = data
    meter = LatencyMeter(warmup=1, repeats=3)
    inputs = vlm.prepare_inputs(eval_rows[0]["question"], [eval_rows[0]["image"]])
    full_ms = meter.measure(lambda s: vlm.generate(**inputs, max_new_tokens=3, streamer=s)).ttft_ms
    budgets = [round(0.6 * full_ms, 1), round(1.2 * full_ms, 1), round(4 * full_ms, 1)]
    controller = TwoStageController.for_executor(vlm, stage2_mode="prompt", budget_range=(budgets[0], budgets[-1]))
    out = tmp_path_factory.mktemp("evaluation")
    result = evaluate_budgets(vlm, controller, eval_rows, budgets, profile_dataset=profile_rows, max_new_tokens=3,
                              output_dir=out, num_threads=THREADS, progress=False)
    return result, budgets, out


def test_real_sweep_writes_the_reports(evaluation, vlm):
    result, budgets, out = evaluation
    rows = json.loads((out / "evaluation.json").read_text())
    assert sorted((r["method"], r["budget_ms"]) for r in rows) == sorted((m, float(b)) for m in METHODS for b in budgets)
    for r in rows:
        assert set(REPORT_COLUMNS) <= set(r)
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["violation_rate"] <= 1
        assert r["mean_latency_ms"] > 0 and r["p95_latency_ms"] > 0 and r["num_rows"] == 4
    md = (out / "evaluation.md").read_text()
    assert md.count("\n| controller |") == len(budgets) and "## Controller against the baselines" in md
    png = (out / "pareto.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    # the lookup table was chosen on the calibration rows, and its configuration ran on the evaluation rows
    assert result.profile_sweep.num_rows == 3 and len(result.profile_sweep.configs) == 27
    assert result.evaluation_sweep.num_rows == 4
    for budget in budgets:
        choice = result.lookup_choices[budget]
        assert result.outcomes[("lookup table", budget)] == result.evaluation_sweep.results(choice.config_key)
        for o in result.outcomes[("controller", budget)]:
            vlm.knob_space.validate(o.knobs)


def test_real_sweep_invariants(evaluation):
    result, budgets, _ = evaluation
    for budget in budgets:
        full, lookup, oracle = (result.row(m, budget) for m in ("full model", "lookup table", "oracle"))
        assert full["accuracy"] == 1.0  # the answers are the full model's own greedy outputs
        assert oracle["accuracy_within_budget"] >= lookup["accuracy_within_budget"] >= 0
        if lookup["violation_rate"] == 0:  # then every lookup row was open to the oracle too
            assert oracle["accuracy"] >= lookup["accuracy"] >= 0
        # the oracle never takes a configuration that overruns when one fits
        per_sample = result.evaluation_sweep.per_sample("ttft")
        for i, o in enumerate(result.outcomes[("oracle", budget)]):
            if any(lat <= budget for _, _, lat in per_sample[i]):
                assert o.ttft_ms <= budget
    for s in result.summary:
        assert s["controller_minus_lookup"] == pytest.approx(
            result.row("controller", s["budget_ms"])["accuracy"] - result.row("lookup table", s["budget_ms"])["accuracy"]
        )


def test_best_static_is_the_lookup_rule_applied_to_the_evaluation_rows(evaluation):
    """Per budget, the most accurate configuration whose p95 latency on the evaluation rows fits
    (the fastest when none fits): at least as accurate as the lookup table's pick whenever that
    one fits on these rows too."""
    result, budgets, _ = evaluation
    sweep = result.evaluation_sweep
    table = sweep.table("ttft", "p95")
    for budget in budgets:
        outcomes = result.outcomes[("best static", budget)]
        config = next(k for k in sweep.configs if sweep.results(k) == outcomes)
        accuracy, p95 = next((a, t) for k, a, t in table if k == config)
        fitting = [(a, t) for _, a, t in table if t <= budget]
        if fitting:
            assert p95 <= budget and accuracy == max(a for a, _ in fitting)
            lookup = result.lookup_choices[budget].config_key
            if next(t for k, _, t in table if k == lookup) <= budget:
                assert accuracy >= next(a for k, a, _ in table if k == lookup)
        else:
            assert p95 == min(t for _, _, t in table)
        summary = next(s for s in result.summary if s["budget_ms"] == budget)
        assert summary["controller_minus_best_static"] == pytest.approx(result.row("controller", budget)["accuracy"] - accuracy)


def test_latency_token_controller_rows_record_its_own_decisions(vlm, data):
    """In latency-token mode stage 2 runs inside the timed generate; each row records the tuple the
    controller's one-call inference chooses for that request and budget (tier included)."""
    eval_rows, profile_rows = data
    torch.manual_seed(3)
    controller = TwoStageController.for_executor(vlm, stage2_mode="latency_token", budget_range=(10.0, 100.0))
    budgets = [10.0, 100.0]
    result = evaluate_budgets(vlm, controller, eval_rows, budgets, profile_dataset=profile_rows, configs=[FAST, MID, SLOW],
                              max_new_tokens=3, num_threads=THREADS, progress=False, include_oracle=False)
    for budget in budgets:
        for row, outcome in zip(eval_rows, result.outcomes[("controller", budget)]):
            _, (knobs,) = controller.decide_and_generate(vlm, row["question"], [row["image"]], budget, max_new_tokens=3, do_sample=False)
            assert outcome.knobs == knobs
    assert "outside the controller's training range" not in result.to_markdown()  # both budgets are its range's ends


def test_latency_profile_sets_the_controller_scale_from_the_lookup_tables_own_runs(vlm, data, monkeypatch):
    """Given the profile and margin the controller trained with, the evaluation sets its latency scale
    from the runs the lookup table is chosen on: with a profile that predicts 0.5 ms for everything,
    the scale is those runs' p95 time to first token / 0.5 ms / (1 + margin). Every controller
    decision reads it; afterwards (also after a failure) the controller's own scale is as it was."""
    import knob_grpo.evaluation as evaluation

    eval_rows, profile_rows = data
    torch.manual_seed(3)
    controller = TwoStageController.for_executor(vlm, stage2_mode="latency_token", budget_range=(10.0, 100.0))
    controller.latency_scale = 1.7  # whatever the caller had set comes back
    seen = []
    decide_for_request = controller.decide_for_request
    monkeypatch.setattr(controller, "decide_for_request",
                        lambda *a, **k: seen.append(controller.latency_scale) or decide_for_request(*a, **k))
    flat = LatencyProfile(device="another device", executor=vlm.name_or_path, ttft_coef={**dict.fromkeys(TTFT_FEATURES, 0.0), "intercept": 0.5},
                          decode_coef=dict.fromkeys(DECODE_FEATURES, 0.0))
    budgets = [10.0, 100.0]
    result = evaluate_budgets(vlm, controller, eval_rows, budgets, profile_dataset=profile_rows, configs=[FAST, MID, SLOW],
                              max_new_tokens=3, num_threads=THREADS, progress=False, include_oracle=False,
                              latency_profile=flat, latency_margin=0.25)
    sweep = result.profile_sweep
    calibration_ttft = [o.ttft_ms for outcomes in sweep.outcomes for o in outcomes]
    assert [r.ttft_ms for r in sweep.timing_records] == calibration_ttft  # the records are the lookup table's own runs
    assert [(r.knobs, r.sample_index) for r in sweep.timing_records] == [(k, i) for k in sweep.configs for i in range(len(profile_rows))]
    for r in sweep.timing_records:  # with the features the profile predicts from
        inputs = vlm.prepare_inputs(profile_rows[r.sample_index]["question"], [profile_rows[r.sample_index]["image"]], tier=r.knobs.tier)
        assert (r.vision_tokens, r.text_tokens) == (vlm.num_vision_tokens(inputs), inputs["input_ids"].shape[-1] - vlm.num_vision_tokens(inputs))
    scale = percentile(calibration_ttft, 95) / 0.5 / 1.25
    assert f"- controller latency scale: {scale:.3f} (" in result.to_markdown() and "25.0% latency margin" in result.to_markdown()
    assert seen and all(s == pytest.approx(scale) for s in seen)  # every decision, warm-up and timed, read the scale
    assert (f"- budgets outside the controller's training range: 10 ({10 / scale:.1f} after the latency scale, "
            "below the range: the cheapest configuration)") in result.to_markdown()
    assert controller.latency_scale == 1.7
    for budget in budgets:
        for row, outcome in zip(eval_rows, result.outcomes[("controller", budget)]):
            _, (knobs,) = controller.decide_and_generate(vlm, row["question"], [row["image"]], budget * 1.7 / scale, max_new_tokens=3, do_sample=False)
            assert outcome.knobs == knobs
    # a failure during the timed runs leaves the caller's scale too
    monkeypatch.setattr(evaluation, "run_timed_jobs", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("machine gone")))
    with pytest.raises(RuntimeError, match="machine gone"):
        evaluate_budgets(vlm, controller, eval_rows, budgets, profile_dataset=profile_rows, configs=[FAST], max_new_tokens=2,
                         progress=False, include_oracle=False, latency_profile=flat)
    assert controller.latency_scale == 1.7
    # the scale needs runs timed now, a valid margin and a profile of this executor; a margin alone would be ignored
    with pytest.raises(ValueError, match="pass profile_dataset="):
        evaluate_budgets(vlm, controller, eval_rows, budgets, profile_records=sweep, latency_profile=flat, progress=False)
    with pytest.raises(ValueError, match=r"latency_margin=1\.0 must be a fraction in \[0, 1\)"):
        evaluate_budgets(vlm, controller, eval_rows, budgets, profile_dataset=profile_rows, latency_profile=flat, latency_margin=1.0)
    with pytest.raises(ValueError, match=r"latency_margin=0\.2 is only used with latency_profile"):
        evaluate_budgets(vlm, controller, eval_rows, budgets, profile_dataset=profile_rows, latency_margin=0.2)
    with pytest.raises(ValueError, match="latency_profile is a str; give a LatencyProfile"):
        evaluate_budgets(vlm, controller, eval_rows, budgets, profile_dataset=profile_rows, latency_profile="latency_profile.json")
    other = LatencyProfile(device=flat.device, executor="someone/other-vlm", ttft_coef=flat.ttft_coef, decode_coef=flat.decode_coef)
    with pytest.raises(ValueError, match="someone/other-vlm"):
        evaluate_budgets(vlm, controller, eval_rows, budgets, profile_dataset=profile_rows, latency_profile=other)
    assert StaticSweep.from_dict(sweep.to_dict()).timing_records is None  # timings of another moment are not kept


def test_lookup_table_through_evaluate_budgets(vlm, data):
    """Hand-built profile records: the evaluation must run the configuration the table picks."""
    eval_rows, _ = data
    records = StaticSweep(
        executor=vlm.name_or_path, device=current_device_name(vlm.device), configs=[FAST, MID, SLOW],
        outcomes=[[outcome(0.0, 10.0, None), outcome(1.0, 10.0, None)], [outcome(1.0, 50.0, None)] * 2, [outcome(1.0, 900.0, None)] * 2],
        row_ids=[_row_id(eval_rows[1]), "another row"],  # one calibration row is also an evaluation row
    )
    controller = TwoStageController.for_executor(vlm, stage2_mode="latency_token", budget_range=(10, 100))
    with pytest.warns(UserWarning, match="1 evaluation row"):
        result = evaluate_budgets(vlm, controller, eval_rows[:2], [20.0, 100.0], profile_records=records.to_dict(),
                                  max_new_tokens=2, include_oracle=False, num_threads=THREADS, progress=False)
    assert result.lookup_choices[20.0].config_key == FAST  # the only one that fits 20 ms
    assert result.lookup_choices[100.0].config_key == MID  # better than FAST, and SLOW does not fit
    assert result.row("lookup table", 20.0)["knobs"] == str(FAST)
    assert result.row("lookup table", 100.0)["knobs"] == str(MID)
    assert {r["method"] for r in result.rows} == {"controller", "lookup table", "full model"}
    assert result.evaluation_sweep.configs == [vlm.knob_space.full(), FAST, MID]  # no oracle: only what is reported
    assert result.summary == []  # no oracle, no gap
    for o in result.outcomes[("controller", 20.0)]:  # latency-token mode ran and was scored
        assert o.score in (0.0, 1.0) and o.ttft_ms > 0 and o.knobs.tier in vlm.knob_space.tiers


def test_metadata_says_how_the_controller_reads_budgets_outside_its_range(vlm, data, monkeypatch):
    """A budget the latency scale moves below the training range gets the cheapest configuration
    (below_range="cheapest", the default), one above it is read as the range's upper end
    (clamp_budget, the default); with below_range="decide" one below is read as the lower end, and
    without clamp_budget both are extrapolated. Below the range the timed request is a plain generate
    (no stage 2 to run at block p)."""
    eval_rows, _ = data
    records = StaticSweep(executor=vlm.name_or_path, device=current_device_name(vlm.device), configs=[FAST],
                          outcomes=[[outcome(1.0, 10.0, None)]], row_ids=["a calibration row"])
    run = dict(profile_records=records, max_new_tokens=1, include_oracle=False, num_threads=THREADS, progress=False)
    default = TwoStageController.for_executor(vlm, stage2_mode="latency_token", budget_range=(10, 100))
    default.latency_scale = 2.0
    with monkeypatch.context() as patched:
        patched.setattr(vlm, "generate_with_decision", lambda *a, **k: pytest.fail("a split generate below the range"))
        below = evaluate_budgets(vlm, default, eval_rows[:1], [10.0], **run)
    assert [o.knobs for o in below.outcomes[("controller", 10.0)]] == [vlm.knob_space.cheapest()]
    result = evaluate_budgets(vlm, default, eval_rows[:1], [10.0, 150.0, 300.0], **run)
    assert result.metadata["budgets outside the controller's training range"] == (
        "10 (5.0 after the latency scale, below the range: the cheapest configuration), "
        "300 (150.0 after the latency scale, read as 100, the range's upper end); range 10-100 ms")
    assert [o.knobs for o in result.outcomes[("controller", 10.0)]] == [vlm.knob_space.cheapest()]
    clamped = TwoStageController.for_executor(vlm, stage2_mode="latency_token", budget_range=(10, 100), below_range="decide")
    clamped.latency_scale = 2.0
    metadata = evaluate_budgets(vlm, clamped, eval_rows[:1], [10.0, 150.0, 300.0], **run).metadata
    assert metadata["budgets outside the controller's training range"] == (
        "10 (5.0 after the latency scale, read as 10, the range's lower end), "
        "300 (150.0 after the latency scale, read as 100, the range's upper end); range 10-100 ms")
    raw = TwoStageController.for_executor(vlm, stage2_mode="latency_token", budget_range=(10, 100), clamp_budget=False,
                                          below_range="decide")
    metadata = evaluate_budgets(vlm, raw, eval_rows[:1], [5.0, 50.0], **run).metadata
    assert metadata["budgets outside the controller's training range"] == (
        "5 (extrapolated below the range, clamp_budget=False); range 10-100 ms")


# --------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "budgets,message",
    [([], "budget list is empty"), ([100, 0], "budget 1 = 0"), ([-5], "budget 0 = -5"), ([float("nan")], "nan"),
     ([float("inf")], "inf"), (["fast"], "'fast' is not a number"), ([100, 100], "repeat"),
     ([True], "budget 0 = True is a bool, not a number")],
)
def test_bad_budgets(vlm, data, budgets, message):
    controller = TwoStageController.for_executor(vlm, stage2_mode="prompt")
    with pytest.raises(ValueError, match=message):
        evaluate_budgets(vlm, controller, data[0], budgets, profile_dataset=data[1], progress=False)


def test_bad_inputs(vlm, data):
    eval_rows, profile_rows = data
    controller = TwoStageController.for_executor(vlm, stage2_mode="prompt")
    model, processor = tiny_vlm(moe=True, num_layers=4)
    smaller = AdaptiveModel(model, processor)
    with pytest.raises(ValueError, match="blocks: controller 6, executor 4"):
        evaluate_budgets(smaller, controller, eval_rows, [100], profile_dataset=profile_rows, progress=False)
    foreign = StaticSweep(executor="someone/other-vlm", device=current_device_name(), configs=[FAST], outcomes=[[outcome(1, 5)]])
    with pytest.raises(ValueError, match="someone/other-vlm"):
        evaluate_budgets(vlm, controller, eval_rows, [100], profile_records=foreign, progress=False)
    elsewhere = StaticSweep(executor=vlm.name_or_path, device="cuda:Some GPU", configs=[FAST], outcomes=[[outcome(1, 5)]])
    with pytest.raises(ValueError, match="cuda:Some GPU"):
        evaluate_budgets(vlm, controller, eval_rows, [100], profile_records=elsewhere, progress=False)
    with pytest.raises(ValueError, match="profile_dataset="):
        evaluate_budgets(vlm, controller, eval_rows, [100], progress=False)
    with pytest.raises(ValueError, match="disjoint"):
        evaluate_budgets(vlm, controller, eval_rows, [100], profile_dataset=eval_rows, progress=False)
    with pytest.raises(ValueError, match="latency_target='tpot'"):
        evaluate_budgets(vlm, controller, eval_rows, [100], profile_dataset=profile_rows, latency_target="tpot")
    with pytest.raises(ValueError, match="evaluation dataset is empty"):
        evaluate_budgets(vlm, controller, [], [100], profile_dataset=profile_rows)
    with pytest.raises(ValueError, match="not a knob controller"):
        evaluate_budgets(vlm, object(), eval_rows, [100], profile_dataset=profile_rows)
    with pytest.raises(ValueError, match="no 'answer'"):
        exact_match_score("red", {"question": "what colour ?"})
    assert exact_match_score("The Red.", {"question": "q", "answer": ["red", "crimson"]}) == 1.0


# --------------------------------------------------------------------------- command line
def test_cli(vlm, data, tmp_path):
    datasets = pytest.importorskip("datasets")
    eval_rows, profile_rows = data
    vlm.save_pretrained(tmp_path / "executor")
    controller = TwoStageController.for_executor(vlm, stage2_mode="prompt", budget_range=(10, 100))
    controller.save_pretrained(tmp_path / "controller")
    datasets.Dataset.from_list(eval_rows[:2]).save_to_disk(tmp_path / "eval")
    datasets.Dataset.from_list(profile_rows[:2]).save_to_disk(tmp_path / "calib")
    out = tmp_path / "report"
    code = main(["--executor", str(tmp_path / "executor"), "--controller", str(tmp_path / "controller"),
                 "--budgets", "15", "60", "--dataset", str(tmp_path / "eval"), "--profile_dataset", str(tmp_path / "calib"),
                 "--output_dir", str(out), "--max_new_tokens", "2", "--num_threads", "1", "--no_progress", "--no_oracle",
                 "--save_profile_records", str(tmp_path / "calib_sweep.json"), "--latency_scale", "1.5"])
    assert code == 0
    rows = json.loads((out / "evaluation.json").read_text())
    assert len(rows) == 3 * 2 and all(math.isfinite(r["mean_latency_ms"]) for r in rows)
    assert "- controller latency scale: 1.500 (" in (out / "evaluation.md").read_text()
    assert (out / "pareto.png").exists()
    with pytest.raises(ValueError, match="latency_scale=0.0"):
        main(["--executor", str(tmp_path / "executor"), "--controller", str(tmp_path / "controller"), "--budgets", "15",
              "--dataset", str(tmp_path / "eval"), "--profile_dataset", str(tmp_path / "calib"), "--output_dir", str(out),
              "--latency_scale", "0"])
    # the profile the controller trained with, from another device: the scale comes from the lookup table's runs
    LatencyProfile(device="another device", executor=str(tmp_path / "executor"), ttft_coef={**dict.fromkeys(TTFT_FEATURES, 0.0), "intercept": 2.0},
                   decode_coef=dict.fromkeys(DECODE_FEATURES, 0.0)).save(tmp_path / "latency_profile.json")
    calibrated = ["--executor", str(tmp_path / "executor"), "--controller", str(tmp_path / "controller"), "--budgets", "15",
                  "--dataset", str(tmp_path / "eval"), "--profile_dataset", str(tmp_path / "calib"), "--output_dir", str(tmp_path / "calibrated"),
                  "--max_new_tokens", "2", "--no_progress", "--no_oracle", "--latency_profile", str(tmp_path / "latency_profile.json"),
                  "--latency_margin", "0.1"]
    with pytest.warns(UserWarning, match="another device"):
        assert main(calibrated) == 0
    assert "the 10.0% latency margin" in (tmp_path / "calibrated" / "evaluation.md").read_text()
    with pytest.raises(ValueError, match="--latency_scale 1.5 and --latency_profile"):
        main(calibrated + ["--latency_scale", "1.5"])
    with pytest.raises(ValueError, match="--latency_profile needs --latency_margin"):
        main(calibrated[:-2])
    assert StaticSweep.load(tmp_path / "calib_sweep.json").num_rows == 2


def test_text_only_rows_run_without_a_tier(vlm, data):
    """A row without an image (a text question to the VLM) runs every method with no tier; the rows
    with images keep theirs, and the full model answers the text row as it does alone."""
    eval_rows, profile_rows = data
    question = "how many dots are there ?"
    out = vlm.generate(question, None, max_new_tokens=3, do_sample=False)
    prompt_len = vlm.prepare_inputs(question, None)["input_ids"].shape[-1]
    text_row = {"question": question, "image": None, "answer": vlm.tokenizer.decode(out[0, prompt_len:], skip_special_tokens=True)}
    rows = eval_rows[:2] + [text_row]
    torch.manual_seed(0)
    controller = TwoStageController.for_executor(vlm, stage2_mode="latency_token", budget_range=(10.0, 100.0))
    result = evaluate_budgets(vlm, controller, rows, [10.0, 100.0], profile_dataset=profile_rows, configs=[FAST, MID, SLOW],
                              max_new_tokens=3, num_threads=THREADS, progress=False)
    for (method, budget), outcomes in result.outcomes.items():
        assert [o.knobs.tier is None for o in outcomes] == [False, False, True], (method, budget)
        if method == "full model":
            assert outcomes[2].score == 1.0
    with_image = {o.knobs.tier for o in result.outcomes[("lookup table", 100.0)][:2]}
    assert with_image <= {"low", "medium", "high"} and with_image
