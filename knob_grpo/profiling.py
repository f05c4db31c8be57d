"""Profiling sweeps: measure an executor's knob configurations and fit its latency profile.

:func:`profile_executor` runs every configuration of a knob space (or a subset) on a set of
calibration samples and times each run with :class:`~knob_grpo.latency.LatencyMeter`;
:func:`fit_profile` turns those records into a :class:`~knob_grpo.latency.LatencyProfile` and reports
the profile's own error on records it was not fitted on.

How the sweep measures (the same conventions serve :mod:`knob_grpo.evaluation`):

* The clock covers the model's ``generate``: vision encoder, prefill, and decode. Tokenisation
  and image preprocessing happen once per (sample, tier) before any timing starts.
* Warm-up: before the first timed run, ``warmup`` untimed passes touch every configuration and
  every prepared input at least once (first-call costs: allocator, kernel choice, lazy imports).
* Interleaving: each timed round runs every (configuration, sample) pair once, in an order
  shuffled afresh per round, and a pair's result is the per-field median over the rounds. Slow
  drift of the machine (other jobs, thermal state) then spreads evenly over the configurations
  instead of landing on whichever ran last.
* Fixed length: by default every run generates exactly ``max_new_tokens`` tokens
  (``min_new_tokens`` is set too), so decode timings do not depend on when a model happens to emit
  its end-of-sequence token.

On a CPU shared with other processes, PyTorch's intra-op threads compete with them and timings
swing by orders of magnitude; ``num_threads=1`` (set for the sweep and restored afterwards) gives
much steadier numbers there. Even then, wall-clock runs of the same configuration differ by ~10%
while other jobs run. ``clock="thread_cpu"`` (CPU, one thread only) times the executor's own
compute on its thread instead (``time.thread_time``): time the scheduler gives to other processes
is left out, so it measures what the latency would be on an idle machine, at ~2-5% noise. The
default ``clock="wall"`` measures what a request experiences on the machine as it is.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterable, Iterator, Mapping, Sequence

import torch

from .knobs import Knobs
from .latency import (
    LatencyMeasurement,
    LatencyMeter,
    LatencyProfile,
    ProfileRecord,
    _check_latency_margin,
    _check_number,
    current_device_name,
)

__all__ = [
    "SweepRecord",
    "SweepRun",
    "sample_text",
    "sample_image",
    "resolve_configs",
    "prepare_sample_inputs",
    "inputs_by_sample",
    "run_timed_jobs",
    "config_job",
    "controller_job",
    "sweep_configs",
    "profile_executor",
    "split_by_group",
    "fit_profile",
    "check_profile",
    "load_profile_for",
    "torch_threads",
    "measure_decision_overhead",
    "suggest_budget_range",
    "suggest_latency_margin",
    "suggest_latency_scale",
]

SPLIT_MODES: tuple[str, ...] = ("pair", "config", "input")
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "thread_cpu": time.thread_time}


def _clock(name: str, device: Any = None, num_threads: int | None = None) -> Callable[[], float]:
    if name not in CLOCKS:
        raise ValueError(f"clock={name!r} is not one of {', '.join(map(repr, CLOCKS))}")
    if name == "thread_cpu":
        if device is not None and torch.device(device).type != "cpu":
            raise ValueError(f"clock='thread_cpu' only times CPU work; the executor runs on {device}")
        threads = torch.get_num_threads() if num_threads is None else num_threads
        if threads != 1:
            raise ValueError(f"clock='thread_cpu' needs one PyTorch thread (num_threads=1), got {threads}: work on other threads is not counted")
    return CLOCKS[name]


# ============================================================================ samples


def sample_text(sample: Mapping[str, Any], index: int | None = None) -> str:
    """The prompt text of a calibration or evaluation row: its ``prompt``, else its ``question``."""
    for key in ("prompt", "question"):
        value = sample.get(key) if isinstance(sample, Mapping) else None
        if value is not None and str(value) != "":
            return str(value)
    where = "" if index is None else f" {index}"
    keys = sorted(sample) if isinstance(sample, Mapping) else type(sample).__name__
    raise ValueError(f"row{where} has no 'prompt' or 'question' text (it has: {keys})")


def inputs_by_sample(prepared: Mapping[tuple[int, str | None], Any]) -> dict[int, dict[str | None, Any]]:
    """:func:`prepare_sample_inputs`' output regrouped as ``{sample index: {tier: inputs}}``."""
    out: dict[int, dict[str | None, Any]] = {}
    for (i, tier), inputs in prepared.items():
        out.setdefault(i, {})[tier] = inputs
    return out


def sample_image(sample: Mapping[str, Any]) -> Any:
    """The row's image, or ``None`` for a text-only row."""
    return sample.get("image") if isinstance(sample, Mapping) else None


def _rows(samples: Iterable[Mapping[str, Any]], what: str, columns: str = "'prompt'/'question' (and 'image')") -> list[Mapping[str, Any]]:
    """The rows as a list, each checked to be a dict with a prompt text (``columns`` names what a row holds)."""
    rows = list(samples)
    if not rows:
        raise ValueError(f"{what} is empty; give at least one row with a 'prompt' or 'question'")
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"{what} row {i} is a {type(row).__name__}, not a dict with {columns}")
        sample_text(row, i)
    return rows


def resolve_configs(adaptive: Any, configs: int | Sequence[Knobs | Mapping[str, Any]] | None = None, seed: int = 0) -> list[Knobs]:
    """The configurations a sweep runs, validated and with every knob filled in.

    ``None``: every configuration of ``adaptive.knob_space``. An integer ``n``: a random subset of
    ``n`` of them (drawn with ``seed``) that always holds the full and the cheapest configuration,
    so the sweep spans the whole cost range. A sequence: those configurations (duplicates dropped).
    """
    space = adaptive.knob_space
    every = [space.validate(k) for k in space.all_configs()]
    if configs is None:
        return every
    if isinstance(configs, bool):
        raise ValueError(f"configs={configs!r} must be None, a number of configurations or a list of them")
    if isinstance(configs, int):
        if configs < 1:
            raise ValueError(f"configs={configs} must be >= 1 (a number of random configurations)")
        if configs >= len(every):
            return every
        ends = [space.full(), space.validate(space.cheapest())]
        rest = [k for k in every if k not in ends]
        chosen = ends[: configs] + random.Random(seed).sample(rest, max(0, configs - len(ends)))
        return [k for k in every if k in chosen]  # keep the knob space's order
    out: list[Knobs] = []
    for k in configs:
        knobs = space.validate(k if isinstance(k, Knobs) else Knobs(**dict(k)))
        if knobs not in out:
            out.append(knobs)
    if not out:
        raise ValueError("configs is an empty list; give at least one configuration (or None for all)")
    return out


def prepare_sample_inputs(adaptive: Any, samples: Sequence[Mapping[str, Any]], tiers: Iterable[str | None]) -> dict[tuple[int, str | None], dict[str, Any]]:
    """Prepared model inputs per ``(sample index, tier)``; a text-only sample only gets tier ``None``."""
    tiers = list(dict.fromkeys(tiers))
    prepared: dict[tuple[int, str | None], dict[str, Any]] = {}
    for i, sample in enumerate(samples):
        text, image = sample_text(sample, i), sample_image(sample)
        if image is None:
            prepared[(i, None)] = adaptive.prepare_inputs(text)
            continue
        for tier in tiers:
            prepared[(i, tier)] = adaptive.prepare_inputs(text, [image], tier=tier)
    return prepared


def _input_key(sample_index: int, knobs: Knobs, prepared: Mapping[tuple[int, str | None], Any]) -> tuple[int, str | None]:
    key = (sample_index, knobs.tier)
    return key if key in prepared else (sample_index, None)


# ============================================================================ timing machinery


@contextlib.contextmanager
def torch_threads(num_threads: int | None) -> Iterator[None]:
    """Run with ``torch.set_num_threads(num_threads)`` and restore the previous count (``None``: no change)."""
    if num_threads is None:
        yield
        return
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"num_threads={num_threads!r} must be an integer >= 1 (or None to leave PyTorch's setting)")
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(enabled: bool, total: int, desc: str) -> Any:
    if not enabled:
        return _NoProgress()
    try:
        from tqdm.auto import tqdm
    except ImportError:  # progress bars are optional
        return _NoProgress()
    return tqdm(total=total, desc=desc, leave=False)


def _median_measurement(runs: Sequence[LatencyMeasurement]) -> LatencyMeasurement:
    """Per-field medians, as :meth:`LatencyMeter.measure` aggregates its repeats."""
    return LatencyMeasurement.median(runs)


def _check_count(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
    return value


def run_timed_jobs(
    jobs: Sequence[tuple[Hashable, Callable[[Any], Any]]],
    *,
    repeats: int = 1,
    warmup_jobs: Sequence[Callable[[Any], Any]] = (),
    seed: int = 0,
    device: Any = None,
    clock: str = "wall",
    progress: bool = True,
    desc: str = "timing",
) -> dict[Hashable, tuple[LatencyMeasurement, Any]]:
    """Time ``generate_fn(streamer)`` jobs in interleaved rounds.

    ``jobs`` are ``(key, generate_fn)`` pairs (``generate_fn`` as for :meth:`LatencyMeter.measure`).
    The ``warmup_jobs`` run once, untimed, first. Then each of ``repeats`` rounds runs every job
    once in an order shuffled with ``seed`` and the round number. Returns, per key, the per-field
    median :class:`LatencyMeasurement` over the rounds and the output of the job's last run.
    ``clock``: ``"wall"`` or ``"thread_cpu"`` (module docstring).
    """
    repeats = _check_count("repeats", repeats, 1)
    keys = [key for key, _ in jobs]
    if len(set(keys)) != len(keys):
        raise ValueError("run_timed_jobs got duplicate job keys")
    meter = LatencyMeter(warmup=0, repeats=1, device=device, clock=_clock(clock, device))
    bar = _progress_bar(progress, len(warmup_jobs) + repeats * len(jobs), desc)
    try:
        for fn in warmup_jobs:
            meter.measure_once(fn)
            bar.update()
        runs: dict[Hashable, list[LatencyMeasurement]] = {key: [] for key in keys}
        outputs: dict[Hashable, Any] = {}
        rng = random.Random(seed)
        for _ in range(repeats):
            order = list(range(len(jobs)))
            rng.shuffle(order)
            for j in order:
                key, fn = jobs[j]
                runs[key].append(meter.measure_once(fn))
                outputs[key] = meter.last_output
                bar.update()
    finally:
        bar.close()
    return {key: (_median_measurement(runs[key]), outputs[key]) for key in keys}


# ============================================================================ sweeps


def config_job(adaptive: Any, knobs: Knobs, inputs: Mapping[str, Any], **generate_kwargs: Any) -> Callable[[Any], Any]:
    """A ``generate_fn(streamer)`` that runs prepared ``inputs`` in configuration ``knobs``.

    ``inputs`` come from ``adaptive.prepare_inputs`` at ``knobs.tier`` (the tier is applied there,
    so it is not passed again). Runs under ``torch.inference_mode``.
    """

    def generate(streamer: Any) -> Any:
        with torch.inference_mode():
            return adaptive.generate(
                **inputs,
                insertion_position=knobs.insertion_position,
                top_k=knobs.top_k,
                num_active_blocks=knobs.num_active_blocks,
                streamer=streamer,
                **generate_kwargs,
            )

    return generate


def controller_job(adaptive: Any, controller: Any, text: str, budget: float, prepared: Mapping[str | None, Mapping[str, Any]],
                   record: dict[str, Any], **generate_kwargs: Any) -> Callable[[Any], Any]:
    """A ``generate_fn(streamer)`` that lets ``controller`` decide for ``budget`` (ms), then generates.

    Everything a request pays for is inside the timed call: prompt features, stage 1, and either
    stage 2 before the generate (prompt mode, or a budget below the trained range) or stage 2 at
    block ``p`` inside it (latency-token mode). ``prepared`` maps each tier to the request's
    prepared inputs (``{None: ...}`` for a text-only request). Each call stores the knobs it ran in
    ``record["knobs"]`` and the prompt length in ``record["prompt_len"]``.
    """
    has_image = None not in prepared

    def generate(streamer: Any) -> Any:
        with torch.inference_mode():
            tier, p, decide = controller.decide_for_request(adaptive, text, budget)
            tier = tier if has_image else None
            record["prompt_len"] = prepared[tier]["input_ids"].shape[-1]
            if controller.reads_latency_token(budget):  # stage 2 runs inside the one generate, at block p (no second generation loop)
                output, knobs = adaptive.generate_with_decision(**prepared[tier], decide=decide, insertion_position=p,
                                                                streamer=streamer, **generate_kwargs)
                record["knobs"] = dataclasses.replace(knobs, tier=tier)  # the tier the inputs were prepared at
                return output
            top_k, num_active_blocks = decide(None)
            record["knobs"] = Knobs(tier=tier, insertion_position=p, top_k=top_k, num_active_blocks=num_active_blocks)
            return adaptive.generate(**prepared[tier], insertion_position=p, top_k=top_k, num_active_blocks=num_active_blocks,
                                     streamer=streamer, **generate_kwargs)

    return generate


@dataclass
class SweepRun:
    """One (configuration, sample) pair of a sweep: its median timings and last output."""

    knobs: Knobs
    sample_index: int
    measurement: LatencyMeasurement
    output: Any
    prompt_tokens: int
    vision_tokens: int

    @property
    def text_tokens(self) -> int:
        return self.prompt_tokens - self.vision_tokens


def sweep_configs(
    adaptive: Any,
    samples: Sequence[Mapping[str, Any]],
    configs: Sequence[Knobs],
    *,
    max_new_tokens: int = 8,
    fixed_length: bool = True,
    repeats: int = 1,
    warmup: int = 1,
    seed: int = 0,
    clock: str = "wall",
    progress: bool = True,
    desc: str = "sweep",
    generate_kwargs: Mapping[str, Any] | None = None,
) -> list[SweepRun]:
    """Run every configuration on every sample (greedy decoding), timed as the module describes.

    ``configs`` must already be validated (:func:`resolve_configs`). Returns one :class:`SweepRun`
    per pair, configuration-major in the given order.
    """
    max_new_tokens = _check_count("max_new_tokens", max_new_tokens, 1)
    warmup = _check_count("warmup", warmup, 0)
    samples = _rows(samples, "the sample list")
    configs = list(configs)
    if not configs:
        raise ValueError("sweep_configs got no configurations")
    prepared = prepare_sample_inputs(adaptive, samples, [k.tier for k in configs])
    extra = {"max_new_tokens": max_new_tokens, "do_sample": False, **dict(generate_kwargs or {})}
    if fixed_length:
        extra["min_new_tokens"] = max_new_tokens

    def job(knobs: Knobs, inputs: dict[str, Any]) -> Callable[[Any], Any]:
        return config_job(adaptive, knobs, inputs, **extra)

    pairs = [(c, s) for c in range(len(configs)) for s in range(len(samples))]
    jobs = [((c, s), job(configs[c], prepared[_input_key(s, configs[c], prepared)])) for c, s in pairs]
    # Warm-up touches every configuration and every prepared input at least once.
    inputs_list = list(prepared)
    n_warm = max(len(configs), len(inputs_list)) if warmup else 0
    warm = []
    for _ in range(warmup):
        for j in range(n_warm):
            knobs = configs[j % len(configs)]
            sample_index, _tier = inputs_list[j % len(inputs_list)]
            warm.append(job(knobs, prepared[_input_key(sample_index, knobs, prepared)]))
    timed = run_timed_jobs(jobs, repeats=repeats, warmup_jobs=warm, seed=seed, device=adaptive.device, clock=clock,
                           progress=progress, desc=desc)
    runs = []
    for c, s in pairs:
        measurement, output = timed[(c, s)]
        inputs = prepared[_input_key(s, configs[c], prepared)]
        runs.append(
            SweepRun(
                knobs=configs[c],
                sample_index=s,
                measurement=measurement,
                output=output,
                prompt_tokens=int(inputs["input_ids"].shape[-1]),
                vision_tokens=int(adaptive.num_vision_tokens(inputs)),
            )
        )
    return runs


@dataclass
class SweepRecord(ProfileRecord):
    """A :class:`ProfileRecord` that also names the configuration and sample it measured, and the
    clock that timed it (``"wall"`` or ``"thread_cpu"``)."""

    knobs: Knobs | None = None
    sample_index: int = -1
    clock: str = "wall"


def _record(adaptive: Any, run: SweepRun, clock: str) -> SweepRecord:
    m, k = run.measurement, run.knobs
    return SweepRecord(
        vision_tokens=run.vision_tokens,
        text_tokens=run.text_tokens,
        num_active_blocks=k.num_active_blocks,
        top_k=k.top_k,
        insertion_position=k.insertion_position or 0,
        default_top_k=adaptive.default_top_k,
        output_tokens=m.num_new_tokens,
        ttft_ms=m.ttft_ms,
        decode_ms_per_token=m.decode_ms_per_token,
        end_to_end_ms=m.total_ms,
        knobs=k,
        sample_index=run.sample_index,
        clock=clock,
    )


def profile_executor(
    adaptive: Any,
    samples: Iterable[Mapping[str, Any]],
    configs: int | Sequence[Knobs | Mapping[str, Any]] | None = None,
    *,
    max_new_tokens: int = 8,
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
    num_threads: int | None = None,
    clock: str = "wall",
    progress: bool = True,
) -> list[SweepRecord]:
    """Measure ``configs`` (default: the whole knob space) on calibration ``samples``.

    ``samples`` are dicts with ``prompt`` (or ``question``) text and an optional ``image``; their
    differing texts and image sizes, together with the tiers, give the spread of text and vision
    token counts the profile's input-size terms are fitted from. ``configs``: ``None`` (all), a
    number ``n`` (a seeded random subset that keeps the full and the cheapest configuration) or a
    list of configurations. Each pair is timed ``repeats`` times in interleaved rounds after
    ``warmup`` warm-up passes (module docstring); every run generates exactly ``max_new_tokens``
    (>= 2, so decode is measured). ``clock``: ``"wall"`` (default) or ``"thread_cpu"`` (CPU and
    ``num_threads=1`` only; see the module docstring). Returns one :class:`SweepRecord` per
    (configuration, sample), with the feature fields, ``ttft_ms``, ``decode_ms_per_token`` and
    ``end_to_end_ms``.
    """
    max_new_tokens = _check_count("max_new_tokens", max_new_tokens, 2)
    _clock(clock, adaptive.device, num_threads)
    samples = _rows(samples, "the calibration sample list")
    chosen = resolve_configs(adaptive, configs, seed)
    with torch_threads(num_threads):
        runs = sweep_configs(
            adaptive, samples, chosen, max_new_tokens=max_new_tokens, fixed_length=True, repeats=repeats,
            warmup=warmup, seed=seed, clock=clock, progress=progress, desc="profiling",
        )
    return [_record(adaptive, run, clock) for run in runs]


# ============================================================================ fitting


def split_by_group(
    records: Sequence[Any], holdout_fraction: float = 0.25, *, split_by: str = "pair", seed: int = 0
) -> tuple[list[Any], list[Any]]:
    """Split records into ``(fit, holdout)`` so no unit is on both sides.

    ``split_by``: ``"pair"`` (each (configuration, input) pair is a unit: its repeats were already
    merged into one record), ``"config"`` (held-out records are of configurations never fitted on)
    or ``"input"`` (of calibration samples never fitted on). ``"config"``/``"input"`` need the
    :class:`SweepRecord` fields ``knobs``/``sample_index``. Units are shuffled with ``seed`` and
    ``round(units * holdout_fraction)`` of them (at least one, leaving at least one) are held out.
    """
    records = list(records)
    if split_by not in SPLIT_MODES:
        raise ValueError(f"split_by={split_by!r} is not one of {', '.join(map(repr, SPLIT_MODES))}")
    if not (isinstance(holdout_fraction, (int, float)) and 0 < holdout_fraction < 1):
        raise ValueError(f"holdout_fraction={holdout_fraction!r} must be strictly between 0 and 1")

    def unit(i: int, r: Any) -> Hashable:
        if split_by == "pair":
            return i
        field_name = "knobs" if split_by == "config" else "sample_index"
        value = getattr(r, field_name, None) if not isinstance(r, Mapping) else r.get(field_name)
        if value is None or value == -1:
            raise ValueError(f"split_by={split_by!r} needs records that name their {field_name} (SweepRecord); record {i} does not")
        return value

    keys = [unit(i, r) for i, r in enumerate(records)]
    units = list(dict.fromkeys(keys))
    if len(units) < 2:
        raise ValueError(f"split_by={split_by!r} needs at least 2 distinct units to split, got {len(units)}")
    random.Random(seed).shuffle(units)
    n_hold = min(max(1, round(len(units) * holdout_fraction)), len(units) - 1)
    held = set(units[:n_hold])
    fit = [r for r, k in zip(records, keys) if k not in held]
    hold = [r for r, k in zip(records, keys) if k in held]
    return fit, hold


def fit_profile(
    adaptive: Any,
    samples: Iterable[Mapping[str, Any]] | None = None,
    *,
    records: Sequence[Any] | None = None,
    holdout_fraction: float = 0.25,
    split_by: str = "pair",
    configs: int | Sequence[Knobs | Mapping[str, Any]] | None = None,
    max_new_tokens: int = 8,
    repeats: int = 3,
    warmup: int = 1,
    seed: int = 0,
    num_threads: int | None = None,
    clock: str = "wall",
    progress: bool = True,
) -> tuple[LatencyProfile, dict[str, Any]]:
    """Profile ``adaptive`` (or use given ``records``), fit a latency profile, report its error.

    The records (from :func:`profile_executor` on ``samples`` unless ``records`` are given) are
    split into fit and held-out parts by :func:`split_by_group`; the profile is fitted on the fit
    part only and its median absolute percentage error on the held-out part is reported, so the
    returned profile's error is exactly the one reported. The profile is keyed by
    :func:`current_device_name` of the executor's device and ``adaptive.name_or_path``; the
    report is also stored in ``profile.metadata["holdout"]`` so a saved profile carries it.

    Returns ``(profile, report)`` with report keys ``ttft_mdape_pct``, ``end_to_end_mdape_pct``,
    ``decode_per_token_mdape_pct``, ``num_records``, ``num_fit``, ``num_holdout``, ``split_by``,
    ``clock`` (of the records), ``device``, ``executor``, ``profiling_seconds``.
    """
    start = time.perf_counter()
    if records is None:
        if samples is None:
            raise ValueError("fit_profile needs calibration samples (or records= from profile_executor)")
        records = profile_executor(
            adaptive, samples, configs, max_new_tokens=max_new_tokens, repeats=repeats, warmup=warmup,
            seed=seed, num_threads=num_threads, clock=clock, progress=progress,
        )
    records = list(records)
    measured_seconds = time.perf_counter() - start
    fit_part, held = split_by_group(records, holdout_fraction, split_by=split_by, seed=seed)
    device = current_device_name(adaptive.device)
    executor = str(adaptive.name_or_path)
    profile = LatencyProfile.fit(fit_part, device=device, executor=executor)
    errors = profile.holdout_error(held)
    decode_errors = [
        abs(profile.predict(r)["decode_ms_per_token"] - r.decode_ms_per_token) / r.decode_ms_per_token * 100
        for r in held
        if getattr(r, "decode_ms_per_token", None) and r.output_tokens > 1
    ]
    report = {
        "device": device,
        "executor": executor,
        "num_records": len(records),
        "num_fit": len(fit_part),
        "num_holdout": len(held),
        "split_by": split_by,
        "clock": "/".join(sorted({str(getattr(r, "clock", "unknown")) for r in records})),
        "ttft_mdape_pct": errors["ttft"],
        "end_to_end_mdape_pct": errors["end_to_end"],
        "decode_per_token_mdape_pct": statistics.median(decode_errors) if decode_errors else math.nan,
        "profiling_seconds": measured_seconds,
    }
    profile.metadata["holdout"] = {k: v for k, v in report.items() if k not in ("device", "executor")}
    return profile, report


# ============================================================================ keying


def check_profile(profile: LatencyProfile, adaptive: Any, *, strict_device: bool = True) -> LatencyProfile:
    """Refuse (``ValueError``) a profile of another executor, or (``strict_device``) another device."""
    executor = str(adaptive.name_or_path)
    if profile.executor != executor:
        raise ValueError(
            f"the latency profile is for executor {profile.executor!r}, not for {executor!r}; "
            "profile this executor (knob_grpo.profiling.fit_profile) before using its latencies"
        )
    device = current_device_name(adaptive.device)
    if strict_device and profile.device != device:
        raise ValueError(f"the latency profile was measured on device {profile.device!r}, not on this device {device!r}")
    return profile


def load_profile_for(adaptive: Any, path: Any, *, strict: bool = True) -> LatencyProfile:
    """Load the profile of ``adaptive`` on this device from ``path`` (see :meth:`LatencyProfile.load`)."""
    return LatencyProfile.load(path, device=current_device_name(adaptive.device), executor=str(adaptive.name_or_path), strict=strict)


def measure_decision_overhead(
    adaptive: Any,
    controller: Any,
    samples: Sequence[Mapping[str, Any] | str],
    budgets: Sequence[float] | None = None,
    *,
    repeats: int = 5,
    warmup: int = 1,
    max_new_tokens: int = 1,
    num_threads: int | None = None,
    progress: bool = False,
) -> float:
    """Median ms that letting ``controller`` decide adds to a request, measured on the real path.

    For each sample (a dataset row with ``prompt``/``question`` and an optional ``image``, or a
    plain text) and budget, the controlled run (:func:`controller_job`: prompt features, both
    stages, and in latency-token mode the generate split at block ``p``) and the static run of the
    knobs it chose (:func:`config_job`) are timed in the same interleaved rounds; the result is the
    median of their differences (time to first token), floored at 0. That is exactly what a
    rollout's profiled latency lacks, so it is what :attr:`KnobGRPOConfig.decision_overhead_ms`
    should be. Timing the controller alone undercounts it: between two forwards of the executor
    its small layers run with cold caches (on the embedded default, 0.76 ms alone against 1.4 ms
    in the real path). The weights do not change the cost much, so an untrained controller
    measures it. ``budgets`` (one per sample) default to spread over the controller's range.
    """
    controller.check_executor(adaptive)  # decide_for_request leaves that to its caller
    samples = [{"prompt": s} if isinstance(s, str) else s for s in samples]
    if not samples:
        raise ValueError("measure_decision_overhead needs at least one sample (a dataset row or a prompt text)")
    _check_count("repeats", repeats, 1)
    _check_count("warmup", warmup, 0)
    lo, hi = controller.config.budget_min_ms, controller.config.budget_max_ms
    n = len(samples)
    budgets = list(budgets) if budgets is not None else [lo + (hi - lo) * (i + 0.5) / n for i in range(n)]
    if len(budgets) != n:
        raise ValueError(f"{len(budgets)} budgets for {n} samples; give one budget per sample")
    extra = {"max_new_tokens": max_new_tokens, "min_new_tokens": max_new_tokens, "do_sample": False}
    jobs: list[tuple[Hashable, Callable[[Any], Any]]] = []
    was_training = getattr(controller, "training", False)
    controller.eval()
    try:
        with torch_threads(num_threads):
            by_sample = inputs_by_sample(prepare_sample_inputs(adaptive, samples, adaptive.knob_space.tiers or [None]))
            for i, (sample, budget) in enumerate(zip(samples, budgets)):
                mine = by_sample[i]
                record: dict[str, Any] = {}
                controlled = controller_job(adaptive, controller, sample_text(sample, i), budget, mine, record, **extra)
                controlled(None)  # the decision is deterministic: learn which knobs the static run needs
                knobs = record["knobs"]
                jobs += [(("controlled", i), controlled), (("static", i), config_job(adaptive, knobs, mine[knobs.tier], **extra))]
            timed = run_timed_jobs(jobs, repeats=repeats, warmup_jobs=[fn for _, fn in jobs] * warmup,
                                   device=adaptive.device, progress=progress, desc="decision overhead")
    finally:
        controller.train(was_training)
    diffs = [timed[("controlled", i)][0].ttft_ms - timed[("static", i)][0].ttft_ms for i in range(n)]
    return max(0.0, statistics.median(diffs))


def suggest_budget_range(records: Sequence[SweepRecord], target: str = "ttft", overhead_ms: float = 0.0,
                         low_margin: float = 1.15, high_margin: float = 1.1, latency_margin: float = 0.0) -> tuple[float, float]:
    """A budget range that spans what the profiled configurations can do, in ms.

    From ``low_margin`` above the cheapest configuration's median latency (room for the run-to-run
    spread, so that the cheapest configuration can meet the smallest budget) to ``high_margin``
    above the slowest one's (every configuration fits the largest budget); both after scaling by
    ``1 + latency_margin`` and adding ``overhead_ms`` (the controller's decision time,
    :func:`measure_decision_overhead`), which is how the rewards see a configuration's latency.
    Both margins are finite factors >= 1, ``overhead_ms`` a finite number >= 0 and
    ``latency_margin`` a fraction in [0, 1) (anything else is a ``ValueError`` naming it); so are
    configurations whose latencies lie too close together for the margins to give a range (the
    smallest budget at or above the largest).
    """
    if target not in ("ttft", "end_to_end"):
        raise ValueError(f"target={target!r}; allowed: 'ttft', 'end_to_end'")
    latency_margin = _check_latency_margin(latency_margin)
    overhead_ms = _check_number("overhead_ms", overhead_ms, 0, "the controller's decision time in ms")
    # below 1 the cheapest configuration would miss the smallest budget, the slowest the largest
    low_margin = _check_number("low_margin", low_margin, 1, "a factor above the cheapest configuration's latency")
    high_margin = _check_number("high_margin", high_margin, 1, "a factor above the slowest configuration's latency")
    by_config: dict[str, list[float]] = {}
    for r in records:
        by_config.setdefault(str(r.knobs), []).append(r.ttft_ms if target == "ttft" else r.end_to_end_ms)
    if not by_config:
        raise ValueError("suggest_budget_range needs profiling records (profile_executor's output); got none")
    medians = sorted(statistics.median(v) * (1 + latency_margin) for v in by_config.values())
    low, high = round((medians[0] + overhead_ms) * low_margin, 1), round((medians[-1] + overhead_ms) * high_margin, 1)
    if low >= high:
        raise ValueError(f"the profiled configurations span {medians[0]:.1f}-{medians[-1]:.1f} ms, too little for a budget "
                         f"range with low_margin={low_margin} and high_margin={high_margin} ({low} >= {high} ms); "
                         "profile more configurations or narrow the margins")
    return low, high


def suggest_latency_margin(profile: LatencyProfile, records: Sequence[SweepRecord] | Sequence[Sequence[SweepRecord]],
                           target: str = "ttft", q: float = 95.0) -> float:
    """A :attr:`KnobGRPOConfig.latency_margin` from single timed runs the profile was not fitted on.

    How far the slowest ``100 - q`` % of the runs exceed the profile's prediction
    (:meth:`LatencyProfile.holdout_excess`, pooled over configurations), as a fraction; 0 when
    they all run faster than predicted. Time the records as the evaluation does
    (``profile_executor(..., repeats=1)`` on rows the profile was not fitted on). On the embedded
    default, pooling was the safer choice: the median over configurations of each one's excess
    gave 3.5% in one run, and that run's controller exceeded the smallest budget in 22% of the
    evaluation's runs (pooled margins of 9–10% kept it at 1–2%).

    The records may be :class:`SweepRecord` s, dicts or other objects with their fields, as
    :meth:`LatencyProfile.holdout_excess` takes them.

    ``records`` may also be several passes over the same runs (a list of record lists); the margin
    is then the smallest pass's. A burst of load from elsewhere on the machine inflates only the
    pass it falls in, while what single runs add systematically shows in every pass: on the
    embedded default one pass once gave 38% where four others gave 2.5–14%.
    """
    return min(max(excess, 0.0) for excess in _pass_excess(profile, records, target, q, "suggest_latency_margin")) / 100


def suggest_latency_scale(profile: LatencyProfile, records: Sequence[SweepRecord] | Sequence[Sequence[SweepRecord]],
                          latency_margin: float = 0.0, target: str = "ttft", q: float = 95.0) -> float:
    """A :attr:`TwoStageController.latency_scale` for this device now: how far the tail of its
    single runs lies from where the controller was trained to expect it.

    The controller learned to keep ``predicted x (1 + latency_margin)`` (plus its decision time)
    under each budget. Time single runs now, as for :func:`suggest_latency_margin`; their ``q``-th
    percentile of measured over predicted latency, divided by ``1 + latency_margin``, is the scale:
    1 when the tail is where the margin put it, above 1 on a slower device or a busier moment
    (the controller then treats a budget as that many times smaller), below 1 on a faster one, or
    on the same device when the margin was clamped at 0 (runs faster than the profile). Several
    passes (a list of record lists): the smallest pass's, as for the margin. On the
    embedded default the cheapest configuration took 6-21% longer in the evaluation than in the
    profile the controller was trained on (three main-job runs), and those controllers were late
    at the smallest budget in up to 21% of requests.
    """
    margin = _check_latency_margin(latency_margin)
    excess = min(_pass_excess(profile, records, target, q, "suggest_latency_scale"))
    return (1 + excess / 100) / (1 + margin)


def _pass_excess(profile: LatencyProfile, records: Any, target: str, q: float, caller: str) -> list[float]:
    """``profile.holdout_excess`` (in %) of each pass of timed records (one list, or a list of lists)."""
    if target not in ("ttft", "end_to_end"):
        raise ValueError(f"target={target!r}; allowed: 'ttft', 'end_to_end'")
    # one pass of records (as LatencyProfile.holdout_excess takes them: records, dicts or objects with
    # the fields), or a list of such passes
    is_record = lambda r: isinstance(r, (ProfileRecord, Mapping)) or hasattr(r, "vision_tokens")  # noqa: E731
    passes = [list(p) for p in records] if records and not is_record(records[0]) else [list(records)]
    if not all(passes):
        raise ValueError(f"{caller} needs timed records (profile_executor's output); got none")
    return [profile.holdout_excess(p, q)[target] for p in passes]
