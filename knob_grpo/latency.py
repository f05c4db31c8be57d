"""Latency measurement, latency profiles, budget-sweep statistics and report writers.

Nothing here depends on the adaptive-model wrapper: measurement wraps any ``generate`` call,
profiles are fitted from plain records, and the sweep statistics work on plain numbers.

* :class:`LatencyMeter` times one Hugging Face ``generate`` call: time to first token (vision +
  prefill + the first sampled token) through a timestamping streamer, and the decode time after it.
* :class:`LatencyProfile` is a per-device linear cost model fitted from a sweep of measured
  configurations, so rewards can use noise-free predicted latencies (DESIGN §5).
* :func:`violation_rate`, :func:`percentile`, :func:`lookup_table` and :func:`oracle_choice` are
  the evaluation statistics of the budget sweep (DESIGN §6); :func:`write_markdown_table`,
  :func:`write_json` and :func:`plot_pareto` write its report.
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from transformers.generation.streamers import BaseStreamer

__all__ = [
    "BUDGET_TARGETS",
    "LatencyMeasurement",
    "TimingStreamer",
    "LatencyMeter",
    "ProfileRecord",
    "LatencyProfile",
    "TTFT_FEATURES",
    "DECODE_FEATURES",
    "profile_features",
    "current_device_name",
    "split_records",
    "Choice",
    "violation_rate",
    "percentile",
    "lookup_table",
    "oracle_choice",
    "REPORT_COLUMNS",
    "write_markdown_table",
    "markdown_table",
    "write_json",
    "pareto_series",
    "plot_pareto",
]

BUDGET_TARGETS: tuple[str, ...] = ("ttft", "end_to_end")


def _check_target(target: str) -> str:
    if target not in BUDGET_TARGETS:
        raise ValueError(f"budget target {target!r} is not one of {', '.join(map(repr, BUDGET_TARGETS))}")
    return target


def _check_budget(budget: Any, name: str = "budget_ms") -> float:
    if isinstance(budget, (bool, np.bool_)):  # float(True) == 1.0 would pass as a 1 ms budget
        raise ValueError(f"{name}={budget!r} is a bool, not a number; it must be a finite number > 0")
    try:
        value = float(budget)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={budget!r} is not a number; it must be a finite number > 0") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={budget!r} must be a finite number > 0")
    return value


def _check_latency_margin(margin: Any) -> float:
    """A latency margin (``KnobGRPOConfig.latency_margin``) as a float, or ``ValueError`` naming it
    unless it is a fraction in [0, 1)."""
    try:
        value = float(margin)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(margin, bool) or not (math.isfinite(value) and 0 <= value < 1):
        raise ValueError(f"latency_margin={margin!r} must be a fraction in [0, 1) (KnobGRPOConfig.latency_margin)")
    return value


def _check_budgets(budgets: Iterable[Any]) -> list[float]:
    budgets = list(budgets)
    if not budgets:
        raise ValueError("the budget list is empty; give at least one budget in ms")
    return [_check_budget(b) for b in budgets]


def _check_latency(latency: Any, name: str = "latency_ms") -> float:
    try:
        if isinstance(latency, (bool, np.bool_)) or getattr(latency, "dtype", None) in (torch.bool, np.bool_):  # float(True): 1 ms
            raise TypeError
        value = float(latency)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={latency!r} is not a number") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}={latency!r} must be a finite number >= 0")
    return value


# ============================================================================ measurement


@dataclass(frozen=True)
class LatencyMeasurement:
    """Timings of one ``generate`` call, in milliseconds.

    ``ttft_ms`` runs from the call to the first generated token (vision encoding, prefill and the
    first sampled token); ``decode_ms`` from there to the end of the call, so
    ``total_ms == ttft_ms + decode_ms``. The first new token comes out of prefill, so decode
    covers ``num_new_tokens - 1`` steps and ``decode_ms_per_token = decode_ms / (num_new_tokens - 1)``
    (0.0 when only one token was generated).
    """

    ttft_ms: float
    decode_ms: float
    decode_ms_per_token: float
    total_ms: float
    num_new_tokens: int

    @classmethod
    def median(cls, runs: Sequence["LatencyMeasurement"]) -> "LatencyMeasurement":
        """Field-by-field median of repeated measurements of one configuration."""
        if len(runs) == 1:
            return runs[0]
        return cls(
            ttft_ms=statistics.median(r.ttft_ms for r in runs),
            decode_ms=statistics.median(r.decode_ms for r in runs),
            decode_ms_per_token=statistics.median(r.decode_ms_per_token for r in runs),
            total_ms=statistics.median(r.total_ms for r in runs),
            num_new_tokens=statistics.median_low(r.num_new_tokens for r in runs),
        )

    def for_target(self, target: str) -> float:
        """The latency a budget is compared with: ``"ttft"`` or ``"end_to_end"`` (``total_ms``)."""
        return self.ttft_ms if _check_target(target) == "ttft" else self.total_ms


class TimingStreamer(BaseStreamer):
    """A ``generate`` streamer that only records when tokens arrive.

    ``generate`` calls ``put`` once with the prompt ids, then once per decoding step with the new
    tokens, then ``end``. The first ``put`` after the prompt marks the first token.
    """

    def __init__(self, clock: Callable[[], float] = time.perf_counter, sync: Callable[[], None] | None = None):
        self.clock = clock
        self.sync = sync
        self.prompt_seen = False
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.end_time: float | None = None
        self.num_new_tokens = 0

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        if self.first_token_time is None:
            # The ids are already on the host, but other streams may still run; make the stamp honest.
            if self.sync is not None:
                self.sync()
            self.first_token_time = self.clock()
        self.last_token_time = self.clock()
        # Plain decoding puts a (batch,) tensor per step; assisted decoding puts (1, k) accepted tokens.
        self.num_new_tokens += int(value.shape[-1]) if value.dim() >= 2 else 1

    def end(self) -> None:
        self.end_time = self.clock()


def _synchronizer(device: str | torch.device | None) -> Callable[[], None] | None:
    """A function that waits for queued device work, or ``None`` where nothing needs waiting for."""
    if device is None:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return torch.cuda.synchronize
        return None
    dev = torch.device(device)
    if dev.type == "cuda":
        return lambda: torch.cuda.synchronize(dev)
    if dev.type == "mps":
        return torch.mps.synchronize
    return None


class LatencyMeter:
    """Times ``generate`` calls with warm-up and a median over repeats.

    Args:
        warmup: runs done first and discarded (kernel selection, allocator and cache warm-up).
        repeats: timed runs; each field of the result is the median over them.
        device: the device the model runs on. CUDA is synchronised before each stamp, CPU needs
            nothing; ``None`` synchronises CUDA if it is in use.
        budget_target: what a budget limits: ``"ttft"`` (DESIGN §5: vision + prefill) or
            ``"end_to_end"``; :meth:`budget_latency` returns that number.
    """

    def __init__(
        self,
        warmup: int = 1,
        repeats: int = 3,
        device: str | torch.device | None = None,
        budget_target: str = "ttft",
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup={warmup!r} must be an integer >= 0")
        if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
            raise ValueError(f"repeats={repeats!r} must be an integer >= 1")
        self.warmup = warmup
        self.repeats = repeats
        self.device = device
        self.budget_target = _check_target(budget_target)
        self.clock = clock
        self._sync = _synchronizer(device)
        self.last_output: Any = None

    def _wait(self) -> None:
        if self._sync is not None:
            self._sync()

    def measure_once(self, generate_fn: Callable[[BaseStreamer], Any]) -> LatencyMeasurement:
        """One timed run of ``generate_fn(streamer)``; its return value goes to :attr:`last_output`."""
        streamer = TimingStreamer(self.clock, self._sync)
        self._wait()
        start = self.clock()
        output = generate_fn(streamer)
        self._wait()
        stop = self.clock()
        if streamer.first_token_time is None:
            raise RuntimeError(
                "the streamer saw no generated token: generate_fn must pass its argument to "
                "model.generate(..., streamer=streamer) and generate at least one token"
            )
        self.last_output = output
        ttft = (streamer.first_token_time - start) * 1e3
        total = (stop - start) * 1e3
        decode = total - ttft
        n = streamer.num_new_tokens
        return LatencyMeasurement(
            ttft_ms=ttft,
            decode_ms=decode,
            decode_ms_per_token=decode / (n - 1) if n > 1 else 0.0,
            total_ms=total,
            num_new_tokens=n,
        )

    def measure(self, generate_fn: Callable[[BaseStreamer], Any]) -> LatencyMeasurement:
        """Warm up, then time ``repeats`` runs of ``generate_fn(streamer)`` and take medians.

        ``generate_fn`` must run one ``generate`` with ``streamer=streamer``. Each field is its
        own median (``num_new_tokens`` the low median), which keeps ``ttft_ms <= total_ms``.
        The output of the last run is kept in :attr:`last_output`.
        """
        for _ in range(self.warmup):
            self.measure_once(generate_fn)
        return LatencyMeasurement.median([self.measure_once(generate_fn) for _ in range(self.repeats)])

    def budget_latency(self, measurement: LatencyMeasurement) -> float:
        """The number this meter's budget target compares with a budget."""
        return measurement.for_target(self.budget_target)


# ============================================================================ profile


@dataclass
class ProfileRecord:
    """One measured (or to-be-predicted) configuration of a profiling sweep.

    Feature fields: ``vision_tokens`` (0 for text-only), ``text_tokens`` (prompt text tokens),
    ``num_active_blocks``, ``top_k`` (experts per token from block ``insertion_position`` on;
    ``None`` for a dense model), ``insertion_position`` (blocks before it run at
    ``default_top_k``; 0 means top_k applies everywhere), ``default_top_k`` (the model's own
    top-k; ``None`` means ``top_k``) and ``output_tokens``. Timing fields, needed for fitting:
    ``ttft_ms`` and ``decode_ms_per_token``; ``end_to_end_ms`` is optional (used by
    :meth:`LatencyProfile.holdout_error` when given).
    """

    vision_tokens: int
    text_tokens: int
    num_active_blocks: int
    top_k: int | None = None
    insertion_position: int = 0
    default_top_k: int | None = None
    output_tokens: int = 1
    ttft_ms: float | None = None
    decode_ms_per_token: float | None = None
    end_to_end_ms: float | None = None


_RECORD_FIELDS = tuple(ProfileRecord.__dataclass_fields__)


def _as_record(item: Any) -> ProfileRecord:
    if isinstance(item, ProfileRecord):
        return item
    if isinstance(item, Mapping):
        source = item
    else:  # any object with the fields as attributes (e.g. another dataclass)
        source = {name: getattr(item, name) for name in _RECORD_FIELDS if hasattr(item, name)}
    missing = [name for name in ("vision_tokens", "text_tokens", "num_active_blocks") if source.get(name) is None]
    if missing:
        raise ValueError(f"profile record {item!r} lacks the feature field(s) {', '.join(missing)}")
    return ProfileRecord(**{name: source[name] for name in _RECORD_FIELDS if name in source})


# Feature choice. Prefill of a transformer costs, per active block, projections + norms + router
# for every prompt token (~ P), expert MLPs for every prompt token and chosen expert (~ P * k), and
# attention scores (~ P^2). The vision encoder works crop by crop, so its cost is linear in the
# vision tokens. Summing over blocks gives TTFT as a non-negative combination of the columns below
# (plus a fixed overhead). Decode is memory bound at small batch: each step reads every active
# block's weights (~ b), the chosen experts' weights (~ routed experts) and the KV cache
# (~ context * b), plus a fixed per-step overhead.
TTFT_FEATURES: tuple[str, ...] = (
    "intercept",
    "vision_tokens",
    "prompt_tokens*active_blocks",
    "prompt_tokens*routed_experts",
    "prompt_tokens^2*active_blocks",
)
DECODE_FEATURES: tuple[str, ...] = (
    "intercept",
    "active_blocks",
    "routed_experts",
    "context_tokens*active_blocks",
)


def _check_number(name: str, value: Any, minimum: float, what: str) -> float:
    """``value`` as a float, or a ``ValueError`` naming it unless it is a finite number >= ``minimum``
    (a bool is not a number here: float(True) would pass as 1)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if isinstance(value, bool) or not (math.isfinite(number) and number >= minimum):
        raise ValueError(f"{name}={value!r} must be a finite number >= {minimum:g} ({what})")
    return number


def _check_feature(name: str, value: Any, low: int, what: str) -> None:
    # A NaN or negative feature would give a NaN or negative latency without any error.
    _check_number(f"profile feature {name}", value, low, what)


def profile_features(record: Any) -> dict[str, dict[str, float]]:
    """The TTFT and decode-per-token feature values of one record (see ``TTFT_FEATURES``).

    ``routed_experts`` is the sum over active blocks of experts per token:
    ``p * default_top_k + (b - p) * top_k`` (0 for a dense model, whose MLP cost is then part of
    the per-block term). ``context_tokens`` is the mean context during decode,
    ``prompt_tokens + output_tokens / 2``.
    """
    r = _as_record(record)
    for name in ("vision_tokens", "text_tokens", "num_active_blocks", "output_tokens", "insertion_position"):
        _check_feature(name, getattr(r, name), 0, "a count of tokens or blocks")
    for name in ("top_k", "default_top_k"):
        if getattr(r, name) is not None:  # None: a dense model (top_k) or top_k everywhere (default_top_k)
            _check_feature(name, getattr(r, name), 1, "experts per token, or None")
    prompt = float(r.vision_tokens + r.text_tokens)
    blocks = float(r.num_active_blocks)
    if r.top_k is None:
        routed = 0.0
    else:
        full_k = r.default_top_k if r.default_top_k is not None else r.top_k
        lead = min(r.insertion_position, r.num_active_blocks)
        routed = float(lead * full_k + (r.num_active_blocks - lead) * r.top_k)
    context = prompt + r.output_tokens / 2.0
    ttft = dict(zip(TTFT_FEATURES, (1.0, float(r.vision_tokens), prompt * blocks, prompt * routed, prompt**2 * blocks)))
    decode = dict(zip(DECODE_FEATURES, (1.0, blocks, routed, context * blocks)))
    return {"ttft": ttft, "decode": decode}


def _nnls(a: np.ndarray, y: np.ndarray, max_iter: int | None = None) -> np.ndarray:
    """Non-negative least squares, ``argmin ||a x - y|| s.t. x >= 0`` (Lawson-Hanson active set).

    Costs are sums of non-negative terms, so a negative coefficient would only fit noise and
    extrapolate badly; the active-set method is short and exact for a handful of columns.
    """
    m, n = a.shape
    x = np.zeros(n)
    passive = np.zeros(n, dtype=bool)
    tol = 10 * np.finfo(float).eps * max(m, n) * max(np.abs(a).sum(axis=0).max(), 1.0)
    max_iter = max_iter or 3 * n + 10
    for _ in range(max_iter):
        gradient = a.T @ (y - a @ x)
        candidates = np.where(~passive, gradient, -np.inf)
        j = int(np.argmax(candidates))
        if passive.all() or candidates[j] <= tol:
            break
        passive[j] = True
        while True:
            s = np.zeros(n)
            s[passive] = np.linalg.lstsq(a[:, passive], y, rcond=None)[0]
            if (s[passive] > tol).all():
                break
            # Step from x towards s until the first passive coefficient hits zero, then drop it.
            blocking = passive & (s <= tol)
            alpha = np.min(x[blocking] / (x[blocking] - s[blocking] + 1e-300))
            x = x + alpha * (s - x)
            passive &= x > tol
            x[~passive] = 0.0
            if not passive.any():
                s = np.zeros(n)
                break
        x = s
    return x


def _fit_columns(rows: list[dict[str, float]], targets: list[float], names: Sequence[str]) -> dict[str, float]:
    a = np.array([[row[name] for name in names] for row in rows], dtype=float)
    y = np.array(targets, dtype=float)
    # Columns span ~7 orders of magnitude (1 vs P^2*b); scale them to unit max for a sane solve.
    scale = np.abs(a).max(axis=0)
    used = scale > 0
    coef = np.zeros(len(names))
    coef[used] = _nnls(a[:, used] / scale[used], y) / scale[used]
    return dict(zip(names, coef.tolist()))


def current_device_name(device: str | torch.device | None = None) -> str:
    """A stable name for the hardware a profile was measured on.

    CUDA: ``"cuda:<device name>"`` from ``torch.cuda.get_device_name``. CPU: ``"cpu:<model> x<N>"``
    with the CPU model (``/proc/cpuinfo``, else ``platform.processor()`` or ``platform.machine()``)
    and the logical CPU count. ``None`` means CUDA if available, else CPU.
    """
    dev = torch.device(device) if device is not None else None
    if (dev is None and torch.cuda.is_available()) or (dev is not None and dev.type == "cuda"):
        return f"cuda:{torch.cuda.get_device_name(dev)}"
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.lower().startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    model = model or platform.processor() or platform.machine() or "unknown"
    return f"cpu:{model} x{os.cpu_count()}"


def _finite_or_null(value: Any) -> Any:
    """``value`` with every NaN or infinite float (in nested dicts and lists) replaced by ``None``."""
    if isinstance(value, Mapping):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    if isinstance(value, (float, np.floating)) and not math.isfinite(value):
        return None
    return value


def _device_and_executor(device: Any, executor: Any) -> tuple[str, Any]:
    """The device name and executor name of :meth:`LatencyProfile.fit`/``load`` arguments: an
    executor object gives its ``name_or_path`` and, unless ``device`` is given, its device."""
    executor_device = None
    if executor is not None and not isinstance(executor, str):
        if not hasattr(executor, "name_or_path"):
            raise ValueError(f"executor={executor!r} must be the executor's name (a str) or the executor "
                             "(an object with name_or_path and device, e.g. an AdaptiveModel)")
        executor_device, executor = getattr(executor, "device", None), str(executor.name_or_path)
    if device is None:
        device = current_device_name(executor_device)
    elif isinstance(device, torch.device):
        device = current_device_name(device)
    return device, executor


_FORMAT = "knob_grpo.latency_profile"
_VERSION = 1


@dataclass
class LatencyProfile:
    """A linear latency model of one executor on one device.

    ``ttft_ms = ttft_coef · ttft features`` and ``decode_ms_per_token = decode_coef · decode
    features`` (see :func:`profile_features`); ``end_to_end_ms = ttft_ms + (output_tokens - 1) *
    decode_ms_per_token``, matching :class:`LatencyMeasurement`. All coefficients are >= 0.
    """

    device: str
    executor: str
    ttft_coef: dict[str, float]
    decode_coef: dict[str, float]
    num_records: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ fitting
    @classmethod
    def fit(
        cls,
        records: Sequence[Any],
        device: str | torch.device | None = None,
        executor: Any = "unknown",
        metadata: Mapping[str, Any] | None = None,
    ) -> "LatencyProfile":
        """Fit TTFT and decode-per-token by non-negative least squares.

        Each record (a :class:`ProfileRecord`, a dict or an object with those fields) needs the
        feature fields and ``ttft_ms``; records with ``output_tokens > 1`` and a
        ``decode_ms_per_token`` also feed the decode fit (at least one is required).
        ``executor`` identifies the model and executor (e.g. ``"molmoe-1b/adaptive-v1"``): a
        profile never transfers between executors. ``device`` is a device name as
        :func:`current_device_name` gives it, or a ``torch.device`` to name. Its default is the
        executor's device when ``executor`` is the executor object (e.g. an
        :class:`~knob_grpo.adaptive.AdaptiveModel`: its ``name_or_path`` then names it), else
        :func:`current_device_name` ``()``, which is CUDA whenever CUDA is available -- not
        necessarily where the records were timed (:func:`knob_grpo.profiling.fit_profile` names
        the executor's device).
        """
        device, executor = _device_and_executor(device, executor)
        records = [_as_record(r) for r in records]
        if not records:
            raise ValueError("LatencyProfile.fit got no records; run a profiling sweep first")
        ttft_rows, ttft_y, dec_rows, dec_y = [], [], [], []
        for i, r in enumerate(records):
            if r.ttft_ms is None:
                raise ValueError(f"record {i} has no ttft_ms; every profiling record needs a measured ttft_ms")
            features = profile_features(r)
            ttft_rows.append(features["ttft"])
            ttft_y.append(_check_latency(r.ttft_ms, f"record {i} ttft_ms"))
            if r.decode_ms_per_token is not None and r.output_tokens > 1:
                dec_rows.append(features["decode"])
                dec_y.append(_check_latency(r.decode_ms_per_token, f"record {i} decode_ms_per_token"))
        if not dec_rows:
            raise ValueError(
                "no record has decode_ms_per_token with output_tokens > 1; the decode model needs "
                "measurements that generated at least two tokens"
            )
        if len(records) < len(TTFT_FEATURES):
            warnings.warn(
                f"fitting {len(TTFT_FEATURES)} TTFT coefficients from only {len(records)} records; "
                "the profile will be underdetermined",
                UserWarning,
                stacklevel=2,
            )
        return cls(
            device=device,
            executor=executor,
            ttft_coef=_fit_columns(ttft_rows, ttft_y, TTFT_FEATURES),
            decode_coef=_fit_columns(dec_rows, dec_y, DECODE_FEATURES),
            num_records=len(records),
            metadata=dict(metadata or {}),
        )

    # ------------------------------------------------------------------ prediction
    def predict(self, features: Any) -> dict[str, float]:
        """Predicted ``ttft_ms``, ``decode_ms_per_token`` and ``end_to_end_ms`` of one configuration.

        ``features`` holds the record's feature fields (timings are ignored). A feature that is not a
        finite number (counts >= 0, ``top_k``/``default_top_k`` >= 1 or ``None``) is a ``ValueError``
        naming it.
        """
        r = _as_record(features)
        values = profile_features(r)
        ttft = sum(self.ttft_coef[name] * v for name, v in values["ttft"].items())
        per_token = sum(self.decode_coef[name] * v for name, v in values["decode"].items())
        return {
            "ttft_ms": ttft,
            "decode_ms_per_token": per_token,
            "end_to_end_ms": ttft + max(r.output_tokens - 1, 0) * per_token,
        }

    def predict_for_target(self, features: Any, target: str = "ttft") -> float:
        """The predicted latency a budget with this target (``"ttft"``/``"end_to_end"``) limits."""
        return self.predict(features)[f"{_check_target(target)}_ms"]

    def holdout_error(self, records: Sequence[Any]) -> dict[str, float]:
        """Median absolute percentage error (in %) on measured records: ``{"ttft", "end_to_end"}``.

        The measured end-to-end is ``end_to_end_ms`` if the record has it, else
        ``ttft_ms + (output_tokens - 1) * decode_ms_per_token``.
        """
        return {target: statistics.median(abs(predicted - measured) / measured * 100 for measured, predicted in pairs)
                for target, pairs in self._measured_and_predicted(records, "holdout_error").items()}

    def holdout_excess(self, records: Sequence[Any], q: float = 95.0) -> dict[str, float]:
        """How far measured latency runs over the prediction: the ``q``-th percentile (in %) of
        ``(measured - predicted) / predicted`` on measured records, ``{"ttft", "end_to_end"}``.

        A prediction scaled by ``1 + excess / 100`` is exceeded by about ``100 - q`` % of such runs,
        which makes it a :attr:`KnobGRPOConfig.latency_margin` measured for this profile.
        """
        return {target: percentile([(measured - predicted) / predicted * 100 for measured, predicted in pairs], q)
                for target, pairs in self._measured_and_predicted(records, "holdout_excess").items()}

    def _measured_and_predicted(self, records: Sequence[Any], caller: str) -> dict[str, list[tuple[float, float]]]:
        records = [_as_record(r) for r in records]
        if not records:
            raise ValueError(f"{caller} got no records")
        out: dict[str, list[tuple[float, float]]] = {"ttft": [], "end_to_end": []}
        for i, r in enumerate(records):
            if r.ttft_ms is None:
                raise ValueError(f"holdout record {i} has no ttft_ms")
            measured_ttft = _check_latency(r.ttft_ms, f"record {i} ttft_ms")
            if r.end_to_end_ms is not None:
                measured_e2e = _check_latency(r.end_to_end_ms, f"record {i} end_to_end_ms")
            elif r.output_tokens <= 1:
                measured_e2e = measured_ttft
            elif r.decode_ms_per_token is not None:
                measured_e2e = measured_ttft + (r.output_tokens - 1) * r.decode_ms_per_token
            else:
                raise ValueError(f"holdout record {i} has neither end_to_end_ms nor decode_ms_per_token")
            if measured_ttft <= 0:
                raise ValueError(f"holdout record {i} has ttft_ms={measured_ttft}; percentage errors need > 0")
            predicted = self.predict(r)
            out["ttft"].append((measured_ttft, predicted["ttft_ms"]))
            out["end_to_end"].append((measured_e2e, predicted["end_to_end_ms"]))
        return out

    # ------------------------------------------------------------------ persistence
    def to_dict(self) -> dict[str, Any]:
        return {
            "ttft_coef": dict(self.ttft_coef),
            "decode_coef": dict(self.decode_coef),
            "num_records": self.num_records,
            "metadata": self.metadata,
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write the profile to a JSON file ``{"profiles": {device: {executor: ...}}}``.

        An existing profile file is updated in place: profiles of other devices or executors
        stay, the entry for this device and executor is replaced. One file can thus carry the
        profiles of every machine a model is deployed on. The file is strict JSON: a NaN or infinite
        metadata value is written as ``null`` (and loads as ``None``).
        """
        path = Path(path)
        data: dict[str, Any] = {"format": _FORMAT, "version": _VERSION, "profiles": {}}
        if path.exists():
            existing = json.loads(path.read_text(encoding="utf-8"))
            if existing.get("format") != _FORMAT:
                raise ValueError(f"{path} exists and is not a knob_grpo latency profile; refusing to overwrite it")
            data["profiles"] = existing.get("profiles", {})
        data["profiles"].setdefault(self.device, {})[self.executor] = self.to_dict()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        # Strict JSON has no NaN/inf (e.g. a held-out error nobody could measure): write them as null.
        tmp.write_text(json.dumps(_finite_or_null(data), indent=2, sort_keys=True, allow_nan=False), encoding="utf-8")
        tmp.replace(path)  # atomic: a crash never leaves half a profile behind
        return path

    @classmethod
    def load(
        cls,
        path: str | os.PathLike,
        device: str | torch.device | None = None,
        executor: Any = None,
        strict: bool = True,
    ) -> "LatencyProfile":
        """Load the profile for ``executor`` on ``device``.

        ``device`` is a device name or a ``torch.device``, as for :meth:`fit`, with the same
        default: the executor's device when ``executor`` is the executor object, else
        :func:`current_device_name` ``()`` -- CUDA whenever CUDA is available, even for an
        executor on the CPU (:func:`knob_grpo.profiling.load_profile_for` names the executor's
        device).

        * Another executor is always an error (``ValueError`` naming both): its costs are
          unrelated. ``executor=None`` accepts the file's only executor.
        * Another device: with ``strict=True`` (the default) a ``ValueError`` naming both, because
          latencies from other hardware would train the controller for the wrong budget scale;
          with ``strict=False`` a ``UserWarning`` and the file's profile is used (e.g. for tests or
          for a first run before profiling the new machine).
        """
        wanted, executor = _device_and_executor(device, executor)
        path = Path(path)
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != _FORMAT:
            raise ValueError(f"{path} is not a knob_grpo latency profile (format={data.get('format')!r})")
        if data.get("version") != _VERSION:
            raise ValueError(f"{path} has profile version {data.get('version')!r}; this code reads version {_VERSION}")
        profiles: dict[str, dict[str, Any]] = data.get("profiles", {})
        executors = sorted({name for per_device in profiles.values() for name in per_device})
        if not executors:
            raise ValueError(f"{path} holds no profiles")
        if executor is None:
            if len(executors) > 1:
                raise ValueError(f"{path} holds profiles for several executors ({', '.join(executors)}); pass executor=")
            executor = executors[0]
        devices = sorted(d for d, per_device in profiles.items() if executor in per_device)
        if not devices:
            raise ValueError(
                f"{path} was profiled for executor {', '.join(executors)}, not for executor {executor!r}; "
                "profile this executor before using its latencies"
            )
        if wanted in devices:
            chosen = wanted
        elif strict:
            raise ValueError(
                f"{path} has a profile of executor {executor!r} for device {', '.join(devices)}, not for this "
                f"device {wanted!r}; profile this device, or pass strict=False to use it anyway"
            )
        else:
            chosen = devices[0]
            warnings.warn(
                f"using the latency profile of device {chosen!r} on device {wanted!r}: predicted "
                "latencies may be off by a device-dependent factor",
                UserWarning,
                stacklevel=2,
            )
        entry = profiles[chosen][executor]
        return cls(
            device=chosen,
            executor=executor,
            ttft_coef={name: float(entry["ttft_coef"][name]) for name in TTFT_FEATURES},
            decode_coef={name: float(entry["decode_coef"][name]) for name in DECODE_FEATURES},
            num_records=int(entry.get("num_records", 0)),
            metadata=dict(entry.get("metadata", {})),
        )


def split_records(records: Sequence[Any], holdout_fraction: float = 0.2, seed: int = 0) -> tuple[list[Any], list[Any]]:
    """Shuffle ``records`` with ``seed`` and split them into ``(fit, holdout)``.

    The hold-out gets ``round(len * holdout_fraction)`` records, at least one, and the fit part
    keeps at least one.
    """
    records = list(records)
    if not 0 < holdout_fraction < 1:
        raise ValueError(f"holdout_fraction={holdout_fraction!r} must be strictly between 0 and 1")
    if len(records) < 2:
        raise ValueError(f"split_records needs at least 2 records, got {len(records)}")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    n_hold = min(max(1, round(len(records) * holdout_fraction)), len(records) - 1)
    hold = set(order[:n_hold])
    return [r for i, r in enumerate(records) if i not in hold], [r for i, r in enumerate(records) if i in hold]


# ============================================================================ sweep statistics


@dataclass(frozen=True)
class Choice:
    """A configuration picked for a budget. ``fits`` is False when nothing fitted and the
    fastest configuration was taken instead."""

    budget_ms: float
    config_key: Any
    accuracy: float
    latency_ms: float
    fits: bool


# Accuracies are averages of per-sample scores; treat values this close as a tie.
_TIE = 1e-9


def violation_rate(latencies: Sequence[float], budget: float) -> float:
    """Fraction of ``latencies`` strictly above ``budget`` (a latency equal to it fits)."""
    budget = _check_budget(budget)
    values = [_check_latency(v) for v in latencies]
    if not values:
        raise ValueError("violation_rate got no latencies")
    return sum(v > budget for v in values) / len(values)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (``q`` in 0..100) with linear interpolation.

    The values are sorted, ``h = (n - 1) * q / 100`` is the fractional rank, and the result is
    ``v[floor(h)] + (h - floor(h)) * (v[floor(h) + 1] - v[floor(h)])``; the same as
    ``numpy.percentile``'s default method. ``percentile(v, 95)`` is the p95 of the report.
    """
    if not 0 <= q <= 100 or not math.isfinite(q):
        raise ValueError(f"percentile q={q!r} must be between 0 and 100")
    data = sorted(float(v) for v in values)
    if not data:
        raise ValueError("percentile got no values")
    if any(not math.isfinite(v) for v in data):
        raise ValueError(f"percentile got a non-finite value among {data}")
    h = (len(data) - 1) * q / 100
    low = math.floor(h)
    if low + 1 >= len(data):
        return data[-1]
    return data[low] + (h - low) * (data[low + 1] - data[low])


def _entries(results: Iterable[Any], what: str) -> list[tuple[Any, float, float]]:
    """Normalise ``(key, accuracy, latency)`` triples or a ``{key: (accuracy, latency)}`` mapping."""
    items = [(k, *v) for k, v in results.items()] if isinstance(results, Mapping) else list(results)
    if not items:
        raise ValueError(f"{what} is empty")
    out = []
    for item in items:
        if len(item) != 3:
            raise ValueError(f"{what} entries must be (config_key, accuracy, latency_ms), got {item!r}")
        key, accuracy, latency = item
        accuracy = float(accuracy)
        if not math.isfinite(accuracy):
            raise ValueError(f"{what}: accuracy={accuracy!r} of config {key!r} is not finite")
        out.append((key, accuracy, _check_latency(latency, f"latency_ms of config {key!r}")))
    return out


def _best_fitting(entries: list[tuple[Any, float, float]], budget: float) -> Choice:
    fitting = [e for e in entries if e[2] <= budget]
    if not fitting:
        key, accuracy, latency = min(entries, key=lambda e: e[2])
        return Choice(budget, key, accuracy, latency, fits=False)
    best_accuracy = max(e[1] for e in fitting)
    # Among (near-)equal best accuracies the faster config wins; min() keeps the first on full ties.
    key, accuracy, latency = min((e for e in fitting if e[1] >= best_accuracy - _TIE), key=lambda e: e[2])
    return Choice(budget, key, accuracy, latency, fits=True)


def lookup_table(static_results: Iterable[Any], budgets: Sequence[float]) -> list[Choice]:
    """The lookup-table baseline: for each budget, the best static configuration that fits.

    ``static_results`` are ``(config_key, accuracy, latency_ms)`` from a profiling sweep (or a
    mapping ``config_key -> (accuracy, latency_ms)``). Per budget: the highest accuracy among
    configs with ``latency_ms <= budget``, ties to the lower latency; if none fits, the fastest
    config with ``fits=False``. Returns one :class:`Choice` per budget, in the given order.
    """
    entries = _entries(static_results, "static_results")
    return [_best_fitting(entries, b) for b in _check_budgets(budgets)]


def oracle_choice(per_sample_results: Sequence[Any], budget: float) -> list[Choice]:
    """The per-sample oracle: for each sample, the best-scoring configuration that fits ``budget``.

    ``per_sample_results[i]`` holds sample ``i``'s ``(config_key, score, latency_ms)`` triples (or
    a mapping ``config_key -> (score, latency_ms)``). Ties go to the faster config; a sample where
    nothing fits gets its fastest config with ``fits=False``. Returns one :class:`Choice` per sample.
    """
    budget = _check_budget(budget)
    if not per_sample_results:
        raise ValueError("oracle_choice got no samples")
    return [_best_fitting(_entries(r, f"results of sample {i}"), budget) for i, r in enumerate(per_sample_results)]


# ============================================================================ reports

REPORT_COLUMNS: tuple[str, ...] = (
    "method",
    "budget_ms",
    "accuracy",
    "mean_latency_ms",
    "p95_latency_ms",
    "violation_rate",
    "knobs",
)


def _plain(value: Any) -> Any:
    """JSON-friendly scalars: numpy/torch numbers to Python, NaN/inf to None."""
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _check_rows(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    rows = list(rows)
    if not rows:
        raise ValueError("no result rows to write")
    for i, row in enumerate(rows):
        missing = [c for c in REPORT_COLUMNS if c not in row]
        if missing:
            raise ValueError(f"result row {i} lacks column(s) {', '.join(missing)}: {dict(row)!r}")
    return rows


def _cell(column: str, value: Any) -> str:
    value = _plain(value)
    if value is None:
        return "–"
    if isinstance(value, float):
        digits = {"accuracy": 4, "violation_rate": 3}.get(column, 1)
        return f"{value:.{digits}f}"
    # Pipes would split the cell; newlines would end the row.
    return str(value).replace("|", "\\|").replace("\n", " ")


def write_markdown_table(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Write the sweep results as a Markdown table, one line per row, columns ``REPORT_COLUMNS``."""
    rows = _check_rows(rows)
    lines = [
        "| " + " | ".join(REPORT_COLUMNS) + " |",
        "|" + "|".join("---" if c in ("method", "knobs") else "---:" for c in REPORT_COLUMNS) + "|",
    ]
    for row in rows:
        lines.append("| " + " | ".join(_cell(c, row[c]) for c in REPORT_COLUMNS) + " |")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The Markdown table :func:`write_markdown_table` writes, as a string (one line per row)."""
    rows = _check_rows(rows)
    lines = [
        "| " + " | ".join(REPORT_COLUMNS) + " |",
        "|" + "|".join("---" if c in ("method", "knobs") else "---:" for c in REPORT_COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(_cell(c, row[c]) for c in REPORT_COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_json(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Write the sweep results as a JSON list of objects (extra keys kept, NaN written as null)."""
    rows = _check_rows(rows)
    plain = [{k: _plain(v) if not isinstance(v, (list, dict)) else v for k, v in row.items()} for row in rows]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(plain, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def pareto_series(
    rows: Sequence[Mapping[str, Any]], latency_key: str = "mean_latency_ms"
) -> dict[str, list[tuple[float, float]]]:
    """Group result rows into ``{method: [(latency, accuracy, budget), ...]}`` for :func:`plot_pareto`."""
    series: dict[str, list[tuple[float, float, float]]] = {}
    for row in _check_rows(rows):
        point = (float(row[latency_key]), float(row["accuracy"]), float(row["budget_ms"]))
        series.setdefault(str(row["method"]), []).append(point)
    return series


_STYLES = {
    "controller": {"color": "tab:blue", "marker": "o"},
    "lookup table": {"color": "tab:orange", "marker": "s"},
    "best static": {"color": "tab:purple", "marker": "v"},
    "full model": {"color": "tab:red", "marker": "D"},
    "oracle": {"color": "tab:green", "marker": "^"},
}


def plot_pareto(
    series: Mapping[str, Sequence[tuple[float, float]]],
    budgets: Sequence[float],
    path: str | os.PathLike,
    title: str = "Accuracy against latency over the budget sweep",
    latency_label: str = "mean latency (ms)",
) -> Path:
    """Plot accuracy (y) against latency (x), one line with markers per method, to a PNG.

    ``series`` maps a method name ("controller", "lookup table", "full model", "oracle", or any
    other) to its ``(latency_ms, accuracy)`` points, or ``(latency_ms, accuracy, budget_ms)`` to
    label each point with the budget it was run at; points are joined in latency order. Budgets
    are drawn as labelled vertical dashed lines; accuracy runs from 0 to 1.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on training nodes
    import matplotlib.pyplot as plt

    budgets = _check_budgets(budgets)
    if not series:
        raise ValueError("plot_pareto got no series")
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=120)
    try:
        for i, budget in enumerate(budgets):
            ax.axvline(budget, color="0.55", linestyle="--", linewidth=1, zorder=1, label="budget" if i == 0 else None)
        for method, points in series.items():
            pts = sorted((_check_latency(p[0], f"latency of {method!r}"), float(p[1]), *p[2:3]) for p in points)
            if not pts:
                raise ValueError(f"series {method!r} has no points")
            style = _STYLES.get(method, {"marker": "o"})
            ax.plot([p[0] for p in pts], [p[1] for p in pts], label=method, linewidth=1.8, markersize=6, zorder=3, **style)
            if method == "controller":  # which point is which budget; points that nearly coincide share one label
                labelled = [p for p in pts if len(p) > 2]
                span = max(budgets[-1], max(p[0] for p in pts)) - min(min(budgets), min(p[0] for p in pts)) or 1.0
                clusters: list[list[tuple]] = []
                for p in labelled:
                    if clusters and abs(p[0] - clusters[-1][-1][0]) < 0.06 * span and abs(p[1] - clusters[-1][-1][1]) < 0.02:
                        clusters[-1].append(p)
                    else:
                        clusters.append([p])
                for cluster in clusters:
                    ax.annotate(", ".join(f"{p[2]:g}" for p in sorted(cluster, key=lambda p: p[2])), (cluster[0][0], cluster[0][1]),
                                textcoords="offset points", xytext=(4, 5), fontsize=7, color=style.get("color", "0.2"))
        # Budget values along the top edge, in axis-fraction y so they stay inside the frame.
        for budget in budgets:
            ax.text(budget, 1.01, f"{budget:g} ms", transform=ax.get_xaxis_transform(), ha="center", va="bottom",
                    fontsize=8, color="0.35")
        ax.set_xlabel(latency_label)
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.03, 1.05)
        ax.set_title(title, pad=16)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", framealpha=0.9)
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path
