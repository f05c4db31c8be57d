"""The budget sweep (DESIGN §6): the controller against the lookup table, the best static
configuration, the full model and the oracle.

For every budget, :func:`evaluate_budgets` reports per method the accuracy, the mean and p95
latency, the violation rate (latency > budget) and the knobs chosen. Every latency in the report
is **measured** on the evaluation rows, on the same clock and in the same way for every method:

* Inputs are tokenised and their images preprocessed (at every tier) before any timing; the clock
  covers what happens per request after that: the controller's decision (its features, both
  stages and, in latency-token mode, the partial prefill to block ``p``, which is then continued,
  not repeated) and the model's ``generate`` (vision, prefill, decode). The static methods have
  no decision to make, so only their ``generate`` is timed.
* One warm-up pass first (every prepared input at the full configuration and the controller once
  per budget), then every (method, row) run **once** (``repeats=1``, to keep the sweep affordable:
  the static configurations are each run on every row, the controller on every row per budget).
  All timed runs of the evaluation rows are shuffled together, so drift of a shared machine
  falls evenly on every method and budget. Single runs are noisy: read p95 and violation rates
  with that in mind.
* Decoding is greedy and stops at ``max_new_tokens`` or at the model's end-of-sequence token.

Methods:

* ``controller``: the controller's greedy decision per row and budget (:meth:`TwoStageController.decide`);
  given ``latency_profile``, at its latency scale from the lookup table's calibration runs.
* ``lookup table``: per budget, one static configuration, chosen on *other* data (a static sweep
  of ``profile_dataset``, or given ``profile_records``): the best accuracy among configurations
  whose latency there (``lookup_statistic`` over the rows, p95 by default) fits the budget
  (:func:`~knob_grpo.latency.lookup_table`). Its reported numbers are then those of that
  configuration on the evaluation rows.
* ``full model``: ``knob_space.full()`` on every row (the same runs for every budget).
* ``best static`` (with the oracle's sweep): per budget, the configuration the lookup table's rule
  picks on the evaluation rows themselves (best accuracy among those whose ``lookup_statistic``
  latency there fits). The best any one configuration per budget does on these rows, in
  hindsight: a lookup table falls short of it only by choosing on other data, and a controller
  passes it only by giving different requests different knobs.
* ``oracle``: per row, the best-scoring configuration whose measured latency on that row fits the
  budget (ties to the faster; the fastest when none fits), from a sweep of every configuration on
  the evaluation rows (:func:`~knob_grpo.latency.oracle_choice`). An upper bound no deployable
  method reaches: it knows every configuration's answer and latency in advance.

``accuracy`` is the mean task score; ``accuracy_within_budget`` (an extra column in the JSON)
counts a row that exceeded the budget as a failure. On the same measured runs the oracle's
accuracy within budget is at least the lookup table's, by construction; its plain accuracy is
at least the lookup table's whenever the lookup table never exceeds the budget (a lookup
configuration can buy accuracy by running over the budget on a row, which the oracle never does).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import json
import math
import os
import statistics
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from .knobs import Knobs
from .latency import (
    BUDGET_TARGETS,
    Choice,
    LatencyProfile,
    _check_latency_margin,
    current_device_name,
    lookup_table,
    markdown_table,
    oracle_choice,
    pareto_series,
    percentile,
    plot_pareto,
    violation_rate,
    write_json,
)
from .profiling import (
    SweepRecord,
    SweepRun,
    _input_key,
    _record,
    _rows,
    check_profile,
    config_job,
    controller_job,
    inputs_by_sample,
    load_profile_for,
    prepare_sample_inputs,
    resolve_configs,
    run_timed_jobs,
    sample_image,
    sample_text,
    suggest_latency_scale,
    torch_threads,
)
from .rewards import exact_match_reward

__all__ = [
    "METHODS",
    "LOOKUP_STATISTICS",
    "RowOutcome",
    "StaticSweep",
    "EvaluationResult",
    "exact_match_score",
    "summarize_outcomes",
    "static_sweep",
    "evaluate_budgets",
    "main",
]

METHODS: tuple[str, ...] = ("controller", "lookup table", "best static", "full model", "oracle")
LOOKUP_STATISTICS: tuple[str, ...] = ("mean", "p95", "max")

ScoreFn = Callable[[str, Mapping[str, Any]], float]


# ============================================================================ inputs


def _check_budget_list(budgets: Any) -> list[float]:
    if budgets is None or isinstance(budgets, (str, bytes)):
        raise ValueError(f"budgets={budgets!r} must be a list of latency budgets in ms")
    if isinstance(budgets, (int, float)):
        budgets = [budgets]
    budgets = list(budgets)
    if not budgets:
        raise ValueError("the budget list is empty; give at least one latency budget in ms")
    out = []
    for i, b in enumerate(budgets):
        if isinstance(b, (bool, np.bool_)):  # float(True) would run a 1 ms budget
            raise ValueError(f"budget {i} = {b!r} is a bool, not a number (budgets are latencies in ms)")
        try:
            value = float(b)
        except (TypeError, ValueError):
            raise ValueError(f"budget {i} = {b!r} is not a number (budgets are latencies in ms)") from None
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"budget {i} = {b!r} is not a finite number of ms > 0")
        out.append(value)
    if len(set(out)) != len(out):
        raise ValueError(f"budgets {out} repeat a value; give each budget once")
    return out


def _check_target(target: str) -> str:
    if target not in BUDGET_TARGETS:
        raise ValueError(f"latency_target={target!r} is not one of {', '.join(map(repr, BUDGET_TARGETS))}")
    return target


def _materialize(dataset: Any, what: str) -> list[Mapping[str, Any]]:
    if dataset is None:
        raise ValueError(f"{what} is None")
    return _rows((dict(r) if isinstance(r, Mapping) else r for r in dataset), what,
                 columns="'prompt'/'question', 'image' and 'answer'")


def _row_id(row: Mapping[str, Any]) -> str:
    """A content hash of a row's prompt and image, to spot rows shared by two datasets."""
    h = hashlib.sha1(sample_text(row).encode())
    image = sample_image(row)
    if image is not None:
        tobytes = getattr(image, "tobytes", None)
        h.update(tobytes() if tobytes is not None else repr(image).encode())
    return h.hexdigest()


def exact_match_score(completion: str, row: Mapping[str, Any]) -> float:
    """The default score: 1.0 if the completion equals ``row["answer"]`` (or one of a list of
    answers) after :func:`~knob_grpo.rewards.normalize_answer`, else 0.0."""
    if row.get("answer") is None:
        raise ValueError(f"row {sample_text(row)!r} has no 'answer'; the default score compares with it (or pass score_fn=)")
    return float(exact_match_reward([None], [completion], answer=[row["answer"]])[0])


def _score(score_fn: ScoreFn, completion: str, row: Mapping[str, Any]) -> float:
    value = float(score_fn(completion, row))
    if not math.isfinite(value):
        raise ValueError(f"score_fn returned {value!r} for completion {completion!r}; scores must be finite")
    return value


def _completion(adaptive: Any, output: Any, prompt_len: int) -> str:
    sequences = getattr(output, "sequences", output)
    return adaptive.tokenizer.decode(sequences[0, prompt_len:], skip_special_tokens=True).strip()


# ============================================================================ outcomes and rows


@dataclass(frozen=True)
class RowOutcome:
    """One method's result on one row: its score, measured latencies and the knobs it ran with."""

    score: float
    ttft_ms: float
    total_ms: float
    knobs: Knobs | None = None
    completion: str | None = None

    def latency(self, target: str = "ttft") -> float:
        return self.ttft_ms if _check_target(target) == "ttft" else self.total_ms

    def to_dict(self) -> dict[str, Any]:
        return {
            "score": self.score,
            "ttft_ms": self.ttft_ms,
            "total_ms": self.total_ms,
            "knobs": None if self.knobs is None else self.knobs.as_dict(),
            "completion": self.completion,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "RowOutcome":
        knobs = d.get("knobs")
        return cls(
            score=float(d["score"]),
            ttft_ms=float(d["ttft_ms"]),
            total_ms=float(d["total_ms"]),
            knobs=None if knobs is None else Knobs(**knobs),
            completion=d.get("completion"),
        )


def _knob_summary(outcomes: Sequence[RowOutcome]) -> tuple[str, dict[str, float]]:
    names = [str(o.knobs) if o.knobs is not None else "–" for o in outcomes]
    counts = collections.Counter(names)
    top, count = counts.most_common(1)[0]
    cell = top if count == len(names) else f"{top} ({count}/{len(names)} rows)"
    return cell, {name: c / len(names) for name, c in counts.most_common()}


def summarize_outcomes(method: str, budget_ms: float, outcomes: Sequence[RowOutcome], latency_target: str = "ttft") -> dict[str, Any]:
    """One report row (the columns of ``latency.REPORT_COLUMNS`` and a few extra) from per-row outcomes."""
    if not outcomes:
        raise ValueError(f"method {method!r} at budget {budget_ms} ms has no row outcomes")
    latencies = [o.latency(latency_target) for o in outcomes]
    scores = [o.score for o in outcomes]
    cell, distribution = _knob_summary(outcomes)
    return {
        "method": method,
        "budget_ms": float(budget_ms),
        "accuracy": statistics.fmean(scores),
        "mean_latency_ms": statistics.fmean(latencies),
        "p95_latency_ms": percentile(latencies, 95),
        "violation_rate": violation_rate(latencies, budget_ms),
        "knobs": cell,
        "accuracy_within_budget": statistics.fmean(s if lat <= budget_ms else 0.0 for s, lat in zip(scores, latencies)),
        "knob_distribution": distribution,
        "num_rows": len(outcomes),
        "latency_target": latency_target,
        "mean_ttft_ms": statistics.fmean(o.ttft_ms for o in outcomes),
        "mean_end_to_end_ms": statistics.fmean(o.total_ms for o in outcomes),
    }


def _gap(ctrl: float, lookup: float, oracle: float) -> float | None:
    room = oracle - lookup
    return None if room <= 1e-12 else (ctrl - lookup) / room


@dataclass
class EvaluationResult:
    """The budget sweep's results.

    ``outcomes`` maps ``(method, budget_ms)`` to the per-row :class:`RowOutcome` list; :attr:`rows`
    (one report row per method and budget, in ``METHODS`` order, then budget order) and
    :attr:`summary` are computed from it, so a result can also be built from hand-made outcomes.
    """

    budgets: list[float]
    outcomes: dict[tuple[str, float], list[RowOutcome]]
    latency_target: str = "ttft"
    executor: str = ""
    device: str = ""
    lookup_choices: dict[float, Choice] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    profile_sweep: "StaticSweep | None" = field(default=None, repr=False)
    evaluation_sweep: "StaticSweep | None" = field(default=None, repr=False)
    rows: list[dict[str, Any]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.budgets = _check_budget_list(self.budgets)
        _check_target(self.latency_target)
        self.outcomes = {(str(m), float(b)): list(v) for (m, b), v in self.outcomes.items()}
        stray = [key for key in self.outcomes if key[1] not in self.budgets]
        if stray:
            raise ValueError(f"outcomes for budget {stray[0][1]} ms, which is not among the budgets {self.budgets}")
        order = {m: i for i, m in enumerate(METHODS)}
        keys = sorted(self.outcomes, key=lambda k: (order.get(k[0], len(order)), k[0], self.budgets.index(k[1])))
        self.rows = [summarize_outcomes(m, b, self.outcomes[(m, b)], self.latency_target) for m, b in keys]
        by_key = {(r["method"], r["budget_ms"]): r for r in self.rows}
        for entry in self.summary:
            row = by_key[("controller", entry["budget_ms"])]
            row["accuracy_minus_lookup"] = entry["controller_minus_lookup"]
            row["gap_closed"] = entry["gap_closed"]
        for budget, choice in self.lookup_choices.items():
            row = by_key.get(("lookup table", float(budget)))
            if row is not None:
                row["lookup_fits_on_profile_data"] = choice.fits
                row["lookup_profiled_latency_ms"] = choice.latency_ms
                row["lookup_profiled_accuracy"] = choice.accuracy

    def row(self, method: str, budget_ms: float) -> dict[str, Any]:
        """The report row of one method at one budget."""
        for r in self.rows:
            if r["method"] == method and r["budget_ms"] == float(budget_ms):
                return r
        raise KeyError(f"no result for method {method!r} at budget {budget_ms} ms")

    @property
    def summary(self) -> list[dict[str, Any]]:
        """Per budget (where the controller, the lookup table and the oracle were all run): the
        controller's accuracy minus the lookup table's, and the gap closed from the lookup table to
        the oracle, ``(ctrl - lookup) / (oracle - lookup)`` (``None`` when the oracle is no better
        than the lookup table); the same two on ``accuracy_within_budget``. Where the best static
        configuration was run too: the controller's accuracy minus its (``None`` otherwise)."""
        out = []
        for budget in self.budgets:
            keys = [(m, budget) for m in ("controller", "lookup table", "oracle")]
            if not all(k in self.outcomes for k in keys):
                continue
            c, l, o = (summarize_outcomes(m, b, self.outcomes[(m, b)], self.latency_target) for m, b in keys)
            out.append(
                {
                    "budget_ms": budget,
                    "controller_accuracy": c["accuracy"],
                    "lookup_accuracy": l["accuracy"],
                    "oracle_accuracy": o["accuracy"],
                    "controller_minus_lookup": c["accuracy"] - l["accuracy"],
                    "gap_closed": _gap(c["accuracy"], l["accuracy"], o["accuracy"]),
                    "controller_minus_lookup_within_budget": c["accuracy_within_budget"] - l["accuracy_within_budget"],
                    "gap_closed_within_budget": _gap(
                        c["accuracy_within_budget"], l["accuracy_within_budget"], o["accuracy_within_budget"]
                    ),
                    "controller_minus_best_static": (
                        c["accuracy"] - summarize_outcomes("best static", budget, self.outcomes[("best static", budget)],
                                                           self.latency_target)["accuracy"]
                        if ("best static", budget) in self.outcomes else None
                    ),
                }
            )
        return out

    def to_markdown(self) -> str:
        """The report: context, the results table (``latency.REPORT_COLUMNS``) and the summary."""
        n_rows = max((len(v) for v in self.outcomes.values()), default=0)
        lines = [
            "# Budget sweep",
            "",
            f"- executor: `{self.executor or 'unknown'}`; device: `{self.device or 'unknown'}`",
            f"- latency: measured {'time to first token' if self.latency_target == 'ttft' else 'end-to-end time'} "
            f"(`{self.latency_target}`), one timed run per method and row, {n_rows} evaluation rows",
            f"- budgets (ms): {', '.join(f'{b:g}' for b in self.budgets)}",
        ]
        lines += [f"- {k}: {v}" for k, v in self.metadata.items() if isinstance(v, (str, int, float))]
        lines += ["", markdown_table(self.rows).rstrip("\n")]
        if self.summary:
            lines += [
                "",
                "## Controller against the baselines",
                "",
                "| budget_ms | controller − lookup | gap closed (lookup → oracle) | controller − lookup, within budget "
                "| gap closed, within budget | controller − best static |",
                "|---:|---:|---:|---:|---:|---:|",
            ]
            fmt = lambda v: "–" if v is None else f"{v:+.4f}"  # noqa: E731
            for s in self.summary:
                lines.append(
                    f"| {s['budget_ms']:g} | {fmt(s['controller_minus_lookup'])} | {fmt(s['gap_closed'])} "
                    f"| {fmt(s['controller_minus_lookup_within_budget'])} | {fmt(s['gap_closed_within_budget'])} "
                    f"| {fmt(s['controller_minus_best_static'])} |"
                )
            lines += [
                "",
                "Gap closed: (controller − lookup) / (oracle − lookup); – where the oracle is no better than the lookup table. "
                "Best static: the one configuration per budget the lookup table's rule picks on the evaluation rows "
                "themselves; a controller passes it only by giving different requests different knobs.",
            ]
        return "\n".join(lines) + "\n"

    def save(self, output_dir: str | os.PathLike) -> dict[str, Path]:
        """Write ``evaluation.md``, ``evaluation.json`` (one object per method and budget) and
        ``pareto.png`` (accuracy against mean latency, one line per method, budgets marked)."""
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        md = out / "evaluation.md"
        md.write_text(self.to_markdown(), encoding="utf-8")
        js = write_json(self.rows, out / "evaluation.json")
        label = "time to first token" if self.latency_target == "ttft" else "end-to-end latency"
        png = plot_pareto(
            pareto_series(self.rows),
            self.budgets,
            out / "pareto.png",
            title=f"Accuracy against measured latency ({self.executor or 'executor'})",
            latency_label=f"mean {label} (ms)",
        )
        return {"markdown": md, "json": js, "pareto": png}


# ============================================================================ static sweeps


@dataclass
class StaticSweep:
    """Scores and measured latencies of static configurations on a set of rows.

    ``outcomes[c][r]`` is configuration ``configs[c]`` on row ``r``. It is keyed to the executor
    and device it was measured on; ``row_ids`` are content hashes of the rows (to check that
    calibration and evaluation data are disjoint). ``timing_records``: the same timed runs as
    profile records (:class:`~knob_grpo.profiling.SweepRecord`, configuration-major), kept by
    :func:`static_sweep` for a sweep run now and not saved: what :func:`evaluate_budgets` sets the
    controller's latency scale from.
    """

    executor: str
    device: str
    configs: list[Knobs]
    outcomes: list[list[RowOutcome]]
    row_ids: list[str] = field(default_factory=list)
    timing_records: list[SweepRecord] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.configs) != len(self.outcomes):
            raise ValueError(f"a static sweep needs one outcome list per configuration: {len(self.configs)} configs, {len(self.outcomes)} lists")
        if not self.configs or not self.outcomes[0]:
            raise ValueError("a static sweep needs at least one configuration and one row")
        if len({len(o) for o in self.outcomes}) != 1:
            raise ValueError("every configuration of a static sweep must have an outcome for every row")

    @property
    def num_rows(self) -> int:
        return len(self.outcomes[0])

    def results(self, knobs: Knobs) -> list[RowOutcome]:
        """The outcomes of one configuration on every row."""
        try:
            return self.outcomes[self.configs.index(knobs)]
        except ValueError:
            raise KeyError(f"configuration {knobs} is not in this sweep") from None

    def table(self, latency_target: str = "ttft", statistic: str = "p95") -> list[tuple[Knobs, float, float]]:
        """``(config, accuracy, latency)`` per configuration, the latency being the ``statistic``
        (``"mean"``, ``"p95"`` or ``"max"``) of its per-row latencies: the input of
        :func:`~knob_grpo.latency.lookup_table`."""
        if statistic not in LOOKUP_STATISTICS:
            raise ValueError(f"lookup_statistic={statistic!r} is not one of {', '.join(map(repr, LOOKUP_STATISTICS))}")
        out = []
        for knobs, outcomes in zip(self.configs, self.outcomes):
            lat = [o.latency(latency_target) for o in outcomes]
            value = {"mean": statistics.fmean, "p95": lambda v: percentile(v, 95), "max": max}[statistic](lat)
            out.append((knobs, statistics.fmean(o.score for o in outcomes), value))
        return out

    def per_sample(self, latency_target: str = "ttft") -> list[list[tuple[Knobs, float, float]]]:
        """Per row, ``(config, score, latency)`` of every configuration: the input of
        :func:`~knob_grpo.latency.oracle_choice`."""
        return [
            [(k, self.outcomes[c][r].score, self.outcomes[c][r].latency(latency_target)) for c, k in enumerate(self.configs)]
            for r in range(self.num_rows)
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "knob_grpo.static_sweep",
            "executor": self.executor,
            "device": self.device,
            "configs": [k.as_dict() for k in self.configs],
            "outcomes": [[o.to_dict() for o in row] for row in self.outcomes],
            "row_ids": list(self.row_ids),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "StaticSweep":
        if d.get("format") != "knob_grpo.static_sweep":
            raise ValueError(f"not a knob_grpo static sweep (format={d.get('format')!r})")
        return cls(
            executor=str(d["executor"]),
            device=str(d["device"]),
            configs=[Knobs(**k) for k in d["configs"]],
            outcomes=[[RowOutcome.from_dict(o) for o in row] for row in d["outcomes"]],
            row_ids=list(d.get("row_ids", [])),
        )

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "StaticSweep":
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def check_for(self, adaptive: Any, what: str = "profile_records") -> "StaticSweep":
        """Refuse (``ValueError``) a sweep of another executor or device, or with configurations
        outside the executor's knob space."""
        executor, device = str(adaptive.name_or_path), current_device_name(adaptive.device)
        if self.executor != executor:
            raise ValueError(f"{what} were measured on executor {self.executor!r}, not on this executor {executor!r}")
        if self.device != device:
            raise ValueError(f"{what} were measured on device {self.device!r}, not on this device {device!r}")
        for k in self.configs:
            adaptive.knob_space.validate(k)
        return self


def _generate_kwargs(max_new_tokens: int) -> dict[str, Any]:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
    return {"max_new_tokens": max_new_tokens, "do_sample": False}


def _warmup_jobs(adaptive: Any, prepared: Mapping[tuple[int, str | None], Any], warmup: int, extra: Mapping[str, Any]) -> list:
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup={warmup!r} must be an integer >= 0")
    full = adaptive.knob_space.full()
    return [config_job(adaptive, full, inputs, **extra) for _ in range(warmup) for inputs in prepared.values()]


def _static_outcomes(
    adaptive: Any, rows: Sequence[Mapping[str, Any]], configs: Sequence[Knobs], timed: Mapping[Any, Any],
    prepared: Mapping[tuple[int, str | None], Any], score_fn: ScoreFn,
) -> list[list[RowOutcome]]:
    out = []
    for knobs in configs:
        per_row = []
        for i, row in enumerate(rows):
            key = _input_key(i, knobs, prepared)
            measurement, output = timed[("static", knobs, i)]
            completion = _completion(adaptive, output, prepared[key]["input_ids"].shape[-1])
            ran = knobs if key[1] == knobs.tier else dataclasses.replace(knobs, tier=None)  # a text-only row has no tier
            per_row.append(RowOutcome(_score(score_fn, completion, row), measurement.ttft_ms, measurement.total_ms, ran, completion))
        out.append(per_row)
    return out


def _timing_records(adaptive: Any, rows: Sequence[Mapping[str, Any]], configs: Sequence[Knobs], timed: Mapping[Any, Any],
                    prepared: Mapping[tuple[int, str | None], Any]) -> list[SweepRecord]:
    """The static runs as profile records (their features and measured times), configuration-major."""
    records = []
    for knobs in configs:
        for i in range(len(rows)):
            inputs = prepared[_input_key(i, knobs, prepared)]
            measurement, output = timed[("static", knobs, i)]
            run = SweepRun(knobs, i, measurement, output, prompt_tokens=int(inputs["input_ids"].shape[-1]),
                           vision_tokens=int(adaptive.num_vision_tokens(inputs)))
            records.append(_record(adaptive, run, "wall"))
    return records


def _static_jobs(adaptive: Any, rows: Sequence[Mapping[str, Any]], configs: Sequence[Knobs],
                 prepared: Mapping[tuple[int, str | None], Any], extra: Mapping[str, Any]) -> list:
    jobs = []
    for knobs in configs:
        for i in range(len(rows)):
            jobs.append((("static", knobs, i), config_job(adaptive, knobs, prepared[_input_key(i, knobs, prepared)], **extra)))
    return jobs


def static_sweep(
    adaptive: Any,
    dataset: Iterable[Mapping[str, Any]],
    configs: int | Sequence[Knobs | Mapping[str, Any]] | None = None,
    *,
    score_fn: ScoreFn | None = None,
    max_new_tokens: int = 8,
    warmup: int = 1,
    seed: int = 0,
    num_threads: int | None = None,
    progress: bool = True,
) -> StaticSweep:
    """Run static configurations (default: all) on every row: scores and measured latencies.

    Timing as in :func:`evaluate_budgets` (prepared inputs, one warm-up pass, one shuffled timed
    run per configuration and row). The result is what ``evaluate_budgets(profile_records=...)``
    takes to build the lookup table without running the sweep again.
    """
    rows = _materialize(dataset, "the sweep dataset")
    score_fn = score_fn or exact_match_score
    chosen = resolve_configs(adaptive, configs, seed)
    extra = _generate_kwargs(max_new_tokens)
    with torch_threads(num_threads):
        prepared = prepare_sample_inputs(adaptive, rows, adaptive.knob_space.tiers or [None])
        timed = run_timed_jobs(
            _static_jobs(adaptive, rows, chosen, prepared, extra), repeats=1,
            warmup_jobs=_warmup_jobs(adaptive, prepared, warmup, extra), seed=seed, device=adaptive.device,
            progress=progress, desc="static sweep",
        )
    return StaticSweep(
        executor=str(adaptive.name_or_path),
        device=current_device_name(adaptive.device),
        configs=chosen,
        outcomes=_static_outcomes(adaptive, rows, chosen, timed, prepared, score_fn),
        row_ids=[_row_id(r) for r in rows],
        timing_records=_timing_records(adaptive, rows, chosen, timed, prepared),
    )


# ============================================================================ the sweep


def _profile_sweep(
    adaptive: Any, profile_records: Any, profile_dataset: Any, eval_rows: Sequence[Mapping[str, Any]], dataset: Any,
    configs: Any, score_fn: ScoreFn, max_new_tokens: int, warmup: int, seed: int, progress: bool,
) -> StaticSweep:
    if profile_records is not None and profile_dataset is not None:
        raise ValueError("pass either profile_records (a static sweep already measured) or profile_dataset, not both")
    if profile_records is None and profile_dataset is None:
        raise ValueError(
            "the lookup table needs a static sweep on calibration data disjoint from the evaluation rows: "
            "pass profile_dataset= (rows to sweep) or profile_records= (a StaticSweep, its dict or its JSON path)"
        )
    if profile_records is not None:
        if isinstance(profile_records, StaticSweep):
            sweep = profile_records
        elif isinstance(profile_records, Mapping):
            sweep = StaticSweep.from_dict(profile_records)
        elif isinstance(profile_records, (str, os.PathLike)):
            sweep = StaticSweep.load(profile_records)
        else:
            raise ValueError(f"profile_records is a {type(profile_records).__name__}; give a StaticSweep, its to_dict() or a JSON path")
        sweep.check_for(adaptive)
    else:
        if profile_dataset is dataset:
            raise ValueError("profile_dataset is the evaluation dataset; the lookup table must be chosen on other (disjoint) rows")
        sweep = static_sweep(adaptive, profile_dataset, configs, score_fn=score_fn, max_new_tokens=max_new_tokens,
                             warmup=warmup, seed=seed, progress=progress)
    shared = set(sweep.row_ids) & {_row_id(r) for r in eval_rows}
    if shared:
        warnings.warn(
            f"{len(shared)} evaluation row(s) also appear in the lookup table's calibration data; "
            "the lookup baseline is then partly chosen on the evaluation rows",
            UserWarning,
            stacklevel=3,
        )
    return sweep


def evaluate_budgets(
    adaptive: Any,
    controller: Any,
    dataset: Iterable[Mapping[str, Any]],
    budgets: Sequence[float],
    *,
    score_fn: ScoreFn | None = None,
    profile_records: Any = None,
    profile_dataset: Iterable[Mapping[str, Any]] | None = None,
    configs: int | Sequence[Knobs | Mapping[str, Any]] | None = None,
    max_new_tokens: int = 8,
    latency_target: str = "ttft",
    lookup_statistic: str = "p95",
    latency_profile: LatencyProfile | None = None,
    latency_margin: float = 0.0,
    output_dir: str | os.PathLike | None = None,
    include_oracle: bool = True,
    warmup: int = 1,
    seed: int = 0,
    num_threads: int | None = None,
    progress: bool = True,
) -> EvaluationResult:
    """Evaluate ``controller`` on ``dataset`` at each budget (ms), against the lookup table, the
    full model and (``include_oracle``) the best static configuration and the per-sample oracle;
    see the module docstring.

    Args:
        adaptive: the :class:`~knob_grpo.adaptive.AdaptiveModel` the controller drives.
        controller: a :class:`~knob_grpo.controller.TwoStageController` built for ``adaptive``.
        dataset: evaluation rows: dicts (or a ``datasets.Dataset``) with ``prompt`` or
            ``question``, an optional ``image`` and, for the default score, ``answer``.
        budgets: latency budgets in ms (finite, > 0, distinct).
        score_fn: ``score_fn(completion, row) -> float``; default :func:`exact_match_score`.
        profile_records / profile_dataset: what the lookup table is chosen from: a
            :class:`StaticSweep` measured before (its dict or JSON path), or rows (disjoint from
            ``dataset``) to run the static sweep on now. Exactly one is required.
        configs: the static configurations swept for the lookup table and the oracle (``None``:
            all; a number: a seeded random subset with the full and cheapest; or a list). The full
            configuration is always run on the evaluation rows.
        latency_target: what a budget limits, ``"ttft"`` or ``"end_to_end"``.
        lookup_statistic: the latency of a configuration on the calibration rows that must fit a
            budget for the lookup table: ``"p95"`` (default), ``"mean"`` or ``"max"``.
        latency_profile / latency_margin: the :class:`~knob_grpo.latency.LatencyProfile` and the
            margin the controller was trained with. Given a profile, the controller's
            ``latency_scale`` is set for the evaluation (and restored after it) from the lookup
            table's own calibration runs (:func:`~knob_grpo.profiling.suggest_latency_scale` on
            them): both then choose from the same runs, timed at the same moment. Needs
            ``profile_dataset`` (a sweep run now). Budgets the scale moves outside the
            controller's training range are listed in the metadata: one below it gets the
            cheapest configuration (``below_range``, the default), one above is read as the
            range's upper end (``clamp_budget``, the default).
        output_dir: if given, ``evaluation.md``, ``evaluation.json`` and ``pareto.png`` go there.
        warmup: untimed warm-up passes before timing; num_threads: PyTorch threads during the
            sweep (restored afterwards; ``None`` leaves them). seed: the timing order's shuffle.

    Raises ``ValueError`` for an empty budget list, a budget that is not a finite number > 0, a
    controller built for another executor, profile records of another executor or device, and with
    ``latency_profile``: a profile of another executor, a margin outside [0, 1), a controller
    without ``latency_scale`` or ``profile_records`` instead of ``profile_dataset``; a
    ``latency_margin`` without a ``latency_profile`` too (it would be ignored).
    """
    budgets = _check_budget_list(budgets)
    latency_target = _check_target(latency_target)
    if lookup_statistic not in LOOKUP_STATISTICS:
        raise ValueError(f"lookup_statistic={lookup_statistic!r} is not one of {', '.join(map(repr, LOOKUP_STATISTICS))}")
    check = getattr(controller, "check_executor", None)
    if check is None or not callable(getattr(controller, "decide", None)):
        raise ValueError(f"controller is a {type(controller).__name__}, not a knob controller (it needs decide and check_executor)")
    check(adaptive)
    if latency_profile is None and latency_margin != 0:
        raise ValueError(f"latency_margin={latency_margin!r} is only used with latency_profile (the profile the controller trained with)")
    if latency_profile is not None:
        if not isinstance(latency_profile, LatencyProfile):
            raise ValueError(f"latency_profile is a {type(latency_profile).__name__}; give a LatencyProfile "
                             "(LatencyProfile.load(path), e.g. the latency_profile.json saved next to the controller)")
        check_profile(latency_profile, adaptive, strict_device=False)  # the scale absorbs another device's speed
        latency_margin = _check_latency_margin(latency_margin)
        if not hasattr(controller, "latency_scale"):
            raise ValueError(f"latency_profile sets the controller's latency_scale, which a {type(controller).__name__} lacks")
        if profile_dataset is None:
            before = " (profile_records is a sweep measured before)" if profile_records is not None else ""
            raise ValueError("latency_profile calibrates the controller on the lookup table's runs timed now: pass profile_dataset= "
                             f"(rows to sweep){before}, or set controller.latency_scale yourself")
    extra = _generate_kwargs(max_new_tokens)
    rows = _materialize(dataset, "the evaluation dataset")
    score_fn = score_fn or exact_match_score

    with torch_threads(num_threads):
        # 1. The lookup table, chosen on calibration data.
        profile = _profile_sweep(adaptive, profile_records, profile_dataset, rows, dataset, configs, score_fn,
                                 max_new_tokens, warmup, seed, progress)
        choices = lookup_table(profile.table(latency_target, lookup_statistic), budgets)

        # 2. Every timed run on the evaluation rows, shuffled together.
        full = adaptive.knob_space.full()
        static = resolve_configs(adaptive, configs, seed) if include_oracle else []
        for knobs in [full, *(c.config_key for c in choices)]:
            if knobs not in static:
                static.append(knobs)
        prepared = prepare_sample_inputs(adaptive, rows, adaptive.knob_space.tiers or [None])
        jobs = _static_jobs(adaptive, rows, static, prepared, extra)
        records: dict[tuple[float, int], dict[str, Any]] = {}
        ctrl_jobs = []
        by_row = inputs_by_sample(prepared)
        for budget in budgets:
            for i, row in enumerate(rows):
                records[(budget, i)] = {}
                fn = controller_job(adaptive, controller, sample_text(row, i), budget, by_row[i], records[(budget, i)], **extra)
                ctrl_jobs.append((("controller", budget, i), fn))
        warm = _warmup_jobs(adaptive, prepared, warmup, extra)
        warm += [fn for (_, budget, i), fn in ctrl_jobs if i == 0] * (1 if warmup else 0)
        controller_was_training = getattr(controller, "training", False)
        scale_before = scale = getattr(controller, "latency_scale", 1.0)
        if controller_was_training:
            controller.eval()
        try:
            if latency_profile is not None:  # the same runs the lookup table was just chosen from
                scale = controller.latency_scale = suggest_latency_scale(latency_profile, profile.timing_records,
                                                                         latency_margin, latency_target)
            timed = run_timed_jobs(jobs + ctrl_jobs, repeats=1, warmup_jobs=warm, seed=seed, device=adaptive.device,
                                   progress=progress, desc="evaluation")
        finally:
            if controller_was_training:
                controller.train()
            if latency_profile is not None:
                controller.latency_scale = scale_before

    # 3. Per-row outcomes of every method.
    sweep = StaticSweep(
        executor=str(adaptive.name_or_path),
        device=current_device_name(adaptive.device),
        configs=static,
        outcomes=_static_outcomes(adaptive, rows, static, timed, prepared, score_fn),
        row_ids=[_row_id(r) for r in rows],
    )
    outcomes: dict[tuple[str, float], list[RowOutcome]] = {}
    hindsight = lookup_table(sweep.table(latency_target, lookup_statistic), budgets) if include_oracle else [None] * len(budgets)
    for budget, choice, best_static in zip(budgets, choices, hindsight):
        ctrl = []
        for i, row in enumerate(rows):
            measurement, output = timed[("controller", budget, i)]
            rec = records[(budget, i)]
            completion = _completion(adaptive, output, rec["prompt_len"])
            ctrl.append(RowOutcome(_score(score_fn, completion, row), measurement.ttft_ms, measurement.total_ms, rec["knobs"], completion))
        outcomes[("controller", budget)] = ctrl
        outcomes[("lookup table", budget)] = sweep.results(choice.config_key)
        outcomes[("full model", budget)] = sweep.results(full)
        if include_oracle:
            outcomes[("best static", budget)] = sweep.results(best_static.config_key)
            picks = oracle_choice(sweep.per_sample(latency_target), budget)
            outcomes[("oracle", budget)] = [sweep.outcomes[sweep.configs.index(p.config_key)][i] for i, p in enumerate(picks)]

    metadata = {
        "controller stage 2 mode": str(controller.stage2_mode),
        "lookup table chosen on": f"{profile.num_rows} calibration rows, {len(profile.configs)} configurations, {lookup_statistic} latency",
        "static configurations run on the evaluation rows": len(static),
        "max_new_tokens": max_new_tokens,
    }
    if latency_profile is not None:
        metadata["controller latency scale"] = (f"{scale:.3f} (each budget divided by it before the controller reads it; from the "
                                                f"lookup table's calibration runs, against the profile and the {latency_margin:.1%} "
                                                "latency margin trained with)")
    elif scale != 1.0:
        metadata["controller latency scale"] = f"{scale:.3f} (each budget divided by it before the controller reads it)"
    config = getattr(controller, "config", None)
    lo, hi = getattr(config, "budget_min_ms", None), getattr(config, "budget_max_ms", None)
    outside = [b for b in budgets if lo is not None and hi is not None and not lo <= b / scale <= hi]
    if outside:  # worth knowing when reading the controller's rows
        metadata["budgets outside the controller's training range"] = (
            ", ".join(_outside_note(b, scale, lo, hi, getattr(config, "clamp_budget", True), getattr(config, "below_range", "decide"))
                      for b in outside)
            + f"; range {lo:g}-{hi:g} ms")
    result = EvaluationResult(
        budgets=budgets,
        outcomes=outcomes,
        latency_target=latency_target,
        executor=str(adaptive.name_or_path),
        device=current_device_name(adaptive.device),
        lookup_choices=dict(zip(budgets, choices)),
        metadata=metadata,
        profile_sweep=profile,
        evaluation_sweep=sweep,
    )
    if output_dir is not None:
        result.save(output_dir)
    return result


def _outside_note(budget: float, scale: float, lo: float, hi: float, clamp: bool, below_range: str) -> str:
    """How the controller reads a budget outside its training range: below it the cheapest
    configuration with ``below_range="cheapest"``; else the nearest end of the range with
    ``clamp_budget``, or extrapolated (see :mod:`knob_grpo.controller`)."""
    scaled = budget / scale
    below = scaled < lo
    seen = [] if scale == 1.0 else [f"{scaled:.1f} after the latency scale"]
    if below and below_range == "cheapest":
        seen.append("below the range: the cheapest configuration")
    elif clamp:
        seen.append(f"read as {lo if below else hi:g}, the range's {'lower' if below else 'upper'} end")
    else:
        seen.append(f"extrapolated {'below' if below else 'above'} the range, clamp_budget=False")
    return f"{budget:g} ({', '.join(seen)})"


# ============================================================================ command line


def _load_rows(spec: str, split: str | None, limit: int | None) -> Any:
    """``embedded:SPLIT[:N]``, a ``save_to_disk`` directory, or a json/jsonl/csv/parquet file."""
    import datasets

    if spec.startswith("embedded:"):
        from .embedded import make_task_dataset

        parts = spec.split(":")
        size = int(parts[2]) if len(parts) > 2 else limit
        data = make_task_dataset(parts[1], size)
    elif os.path.isdir(spec):
        data = datasets.load_from_disk(spec)
    else:
        ext = Path(spec).suffix.lstrip(".").lower()
        builder = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}.get(ext)
        if builder is None:
            raise ValueError(f"--dataset {spec!r}: give embedded:SPLIT[:N], a save_to_disk directory or a .json/.jsonl/.csv/.parquet file")
        data = datasets.load_dataset(builder, data_files=spec)
    if isinstance(data, datasets.DatasetDict):
        if split is None:
            raise ValueError(f"{spec} holds splits {list(data)}; pick one with --split")
        data = data[split]
    if limit is not None:
        data = data.select(range(min(limit, len(data))))
    return data


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="knob-grpo-evaluate", description="Budget sweep of a knob controller against the lookup table, the best static configuration, the full model and the oracle.")
    p.add_argument("--executor", required=True, help="AdaptiveModel directory (or 'embedded' for the project's embedded model)")
    p.add_argument("--controller", required=True, help="TwoStageController directory (save_pretrained)")
    p.add_argument("--budgets", type=float, nargs="+", required=True, help="latency budgets in ms")
    p.add_argument("--dataset", required=True, help="evaluation rows: embedded:SPLIT[:N], a save_to_disk directory, or a data file")
    p.add_argument("--split", default=None, help="split of a dataset directory that holds several")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N rows only")
    p.add_argument("--profile_dataset", default=None, help="calibration rows for the lookup table (disjoint from --dataset)")
    p.add_argument("--profile_limit", type=int, default=None)
    p.add_argument("--profile_records", default=None, help="a static sweep saved before (JSON), instead of --profile_dataset")
    p.add_argument("--save_profile_records", default=None, help="write the calibration sweep to this JSON file for reuse")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--latency_target", choices=BUDGET_TARGETS, default="ttft")
    p.add_argument("--lookup_statistic", choices=LOOKUP_STATISTICS, default="p95")
    p.add_argument("--max_new_tokens", type=int, default=8)
    p.add_argument("--score", choices=("exact_match", "vqa"), default="exact_match")
    p.add_argument("--no_oracle", action="store_true", help="skip the oracle and the best static configuration (and their sweep of every configuration)")
    p.add_argument("--latency_scale", type=float, default=None,
                   help="how many times slower than in its training profile requests run on this device now "
                   "(TwoStageController.latency_scale, from suggest_latency_scale)")
    p.add_argument("--latency_profile", default=None,
                   help="the latency profile the controller was trained with (latency_profile.json, saved next to it): "
                   "its latency scale is then set from the lookup table's calibration runs (needs --profile_dataset)")
    p.add_argument("--latency_margin", type=float, default=None,
                   help="with --latency_profile (required): the latency margin the controller was trained with "
                   "(KnobGRPOConfig.latency_margin, printed by examples/train.py; for the same --latency_target)")
    p.add_argument("--num_threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no_progress", action="store_true")
    return p.parse_args(argv)


def _vqa_score(completion: str, row: Mapping[str, Any]) -> float:
    from .rewards import vqa_accuracy

    answer = row.get("answer")
    refs = [answer] if isinstance(answer, str) else list(answer or [])
    return vqa_accuracy(completion, refs)


def main(argv: Sequence[str] | None = None) -> int:
    """``knob-grpo-evaluate`` / ``python -m knob_grpo.evaluation``: see ``--help``."""
    args = _parse_args(argv)
    from .adaptive import AdaptiveModel
    from .controller import TwoStageController

    adaptive = AdaptiveModel.from_pretrained("knob_grpo/embedded" if args.executor == "embedded" else args.executor)
    controller = TwoStageController.from_pretrained(args.controller).eval()
    if args.latency_scale is not None:
        controller.latency_scale = args.latency_scale
    latency_profile = None
    if args.latency_profile is not None:
        if args.latency_scale is not None:
            raise ValueError(f"--latency_scale {args.latency_scale} and --latency_profile both set the controller's latency scale; pass one")
        if args.latency_margin is None:
            raise ValueError("--latency_profile needs --latency_margin: the latency margin the controller was trained with (0 if none)")
        latency_profile = load_profile_for(adaptive, args.latency_profile, strict=False)  # another device: warns, the scale absorbs it
    elif args.latency_margin is not None:
        raise ValueError(f"--latency_margin {args.latency_margin} is only used with --latency_profile")
    dataset = _load_rows(args.dataset, args.split, args.limit)
    profile_dataset = None if args.profile_dataset is None else _load_rows(args.profile_dataset, args.split, args.profile_limit)
    result = evaluate_budgets(
        adaptive, controller, dataset, args.budgets,
        score_fn=_vqa_score if args.score == "vqa" else None,
        profile_records=args.profile_records, profile_dataset=profile_dataset,
        max_new_tokens=args.max_new_tokens, latency_target=args.latency_target, lookup_statistic=args.lookup_statistic,
        latency_profile=latency_profile, latency_margin=args.latency_margin or 0.0, output_dir=args.output_dir,
        include_oracle=not args.no_oracle, num_threads=args.num_threads, seed=args.seed, progress=not args.no_progress,
    )
    if args.save_profile_records and result.profile_sweep is not None:
        result.profile_sweep.save(args.save_profile_records)
    sys.stdout.write(result.to_markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
