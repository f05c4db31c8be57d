"""Static sweep of the embedded default: accuracy and time to first token of every knob configuration.

    python -m knob_grpo.embedded.sweep                       # every configuration, full test split
    python -m knob_grpo.embedded.sweep --configs full,cheapest --size 200   # quick look
    python -m knob_grpo.embedded.sweep --json sweep.json     # also save the numbers

For each configuration of ``knob_space()`` (54: 3 tiers x p in 1..3 x top_k 2..4 x the allowed
numbers of blocks) it reports:

* **accuracy** on the test split (800 examples, 200 per question type), overall and per type:
  greedy ``AdaptiveModel.generate`` (``max_new_tokens=2``), batched, exact match of the first
  generated word with the answer. Inputs are prepared once per tier and batch
  (``AdaptiveModel.prepare_inputs``) and reused by every configuration of that tier.
* **time to first token** (TTFT), the median over ``--timing_samples`` single-example requests
  (overall and per question type: the pattern questions' smaller images cost less at the high tier):
  wall clock around ``AdaptiveModel.generate(text=..., images=..., tier=..., <knobs>, max_new_tokens=1)``,
  i.e. image preprocessing at the tier, vision tower, prefill and the first token. The timed
  requests are interleaved across configurations (one request of every configuration, then the
  next round), after a warm-up, so that load from other processes spreads evenly over them.
  Torch runs single-threaded by default (``--threads``): one thread per request is the most
  reproducible setting on a shared CPU (two threads on two busy cores stall each other).

Then it prints the headline checks of the embedded default:

* the full setting reaches >= 80% accuracy;
* the cheapest configuration is >= 20 points worse and >= 3x faster (TTFT);
* with the cheapest configuration, some question type stays within 2 points of the full setting
  and another loses >= 30 points;
* the best knobs depend on the question type, not only on the budget (:func:`type_headroom`):
  at some budget, giving each question type its own best configuration that fits it beats the
  best single configuration that fits every type by >= 5 points. This is all a per-request
  controller can gain over a perfectly chosen lookup table on this task (a controller also pays
  for deciding); below 5 points a 96-question evaluation cannot tell the two apart.

``--from_json PATH`` prints the table and the headline of a sweep saved with ``--json`` without
running it again.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from ..knobs import Knobs
from ..latency import lookup_table
from . import model as M
from .task import QUESTION_TYPES, make_example


def _knob_kwargs(k: Knobs) -> dict[str, Any]:
    return {"insertion_position": k.insertion_position, "top_k": k.top_k, "num_active_blocks": k.num_active_blocks}


CONFIGS_FORMS = "'all' alone, or a comma list of 'full', 'cheapest' and tier/p/k/b entries such as 'low/1/2/6'"


def _select_configs(space, which: str) -> list[Knobs]:
    """``--configs``: ``all``, or a comma list of ``full``, ``cheapest`` and ``tier/p/k/b`` entries.

    Raises ``ValueError`` naming the bad entry and the allowed forms (and, for a well-formed entry
    outside the knob space, the allowed values of the offending knob)."""
    configs = list(space.all_configs())
    if which.strip() == "all":
        return configs
    out: list[Knobs] = []
    for entry in which.split(","):
        name = entry.strip()
        if name == "full":
            cfg = space.full()
        elif name == "cheapest":
            cfg = space.cheapest()
        else:  # tier/p/k/b, e.g. low/1/2/6
            parts = [part.strip() for part in name.split("/")]
            if len(parts) != 4 or not all(parts[1:]) or not all(part.isdigit() for part in parts[1:]):
                raise ValueError(f"--configs entry {entry!r} (in {which!r}) is not 'full', 'cheapest' or tier/p/k/b with "
                                 f"integers p, k and b; allowed: {CONFIGS_FORMS}")
            t, p, k, b = parts
            try:
                cfg = space.resolve(tier=t, insertion_position=int(p), top_k=int(k), num_active_blocks=int(b))
            except ValueError as exc:
                raise ValueError(f"--configs entry {entry!r}: {exc}") from None
        if cfg not in out:
            out.append(cfg)
    return out


@torch.no_grad()
def accuracy(adaptive, examples: list[dict[str, Any]], configs: list[Knobs], batch_size: int = 32,
             progress: bool = True) -> dict[Knobs, dict[str, float]]:
    """Greedy-generation exact-match accuracy per configuration, overall and per question type."""
    tok = adaptive.tokenizer
    hits: dict[Knobs, dict[str, list[int]]] = {c: {t: [] for t in QUESTION_TYPES} for c in configs}
    by_tier: dict[str, list[Knobs]] = {}
    for c in configs:
        by_tier.setdefault(c.tier, []).append(c)
    t0 = time.time()
    for tier, tier_configs in by_tier.items():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            inputs = adaptive.prepare_inputs([e["question"] for e in chunk], [e["image"] for e in chunk], tier=tier)
            n_prompt = inputs["input_ids"].shape[1]
            for cfg in tier_configs:
                # prepared inputs are already at this tier: pass tier=None (the processor is not called again)
                out = adaptive.generate(**inputs, **_knob_kwargs(cfg), max_new_tokens=2, do_sample=False)
                words = tok.batch_decode(out[:, n_prompt:], skip_special_tokens=True)
                for ex, w in zip(chunk, words):
                    pred = w.split()[0] if w.split() else ""
                    hits[cfg][ex["qtype"]].append(int(pred == ex["answer"]))
        if progress:
            print(f"  accuracy: tier {tier} done ({len(tier_configs)} configurations, {time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
    result = {}
    for c, per in hits.items():
        r = {t: sum(v) / max(len(v), 1) for t, v in per.items()}
        r["all"] = sum(sum(v) for v in per.values()) / max(sum(len(v) for v in per.values()), 1)
        result[c] = r
    return result


@torch.no_grad()
def time_to_first_token(adaptive, examples: list[dict[str, Any]], configs: list[Knobs], samples: int = 32,
                        warmup: int = 3) -> dict[Knobs, dict[str, Any]]:
    """Wall-clock TTFT in ms per configuration, single-example requests, interleaved.

    Per configuration: ``median``, ``p10`` and ``p90`` over all timed requests, and ``by_type``,
    the median per question type (the pattern questions' smaller images cost less at the high tier).
    """
    times: dict[Knobs, list[tuple[str, float]]] = {c: [] for c in configs}

    def one(cfg: Knobs, ex: dict[str, Any]) -> float:
        t = time.perf_counter()
        adaptive.generate(text=ex["question"], images=ex["image"], tier=cfg.tier, **_knob_kwargs(cfg),
                          max_new_tokens=1, do_sample=False)
        return (time.perf_counter() - t) * 1000.0

    for i in range(warmup):
        for cfg in configs:
            one(cfg, examples[i % len(examples)])
    for i in range(samples):
        ex = examples[i % len(examples)]
        for cfg in configs:
            times[cfg].append((ex["qtype"], one(cfg, ex)))
    out = {}
    for c, timed in times.items():
        v = sorted(t for _, t in timed)
        per_type: dict[str, list[float]] = {}
        for qtype, t in timed:
            per_type.setdefault(qtype, []).append(t)
        out[c] = {"median": statistics.median(v), "p10": v[int(0.1 * (len(v) - 1))], "p90": v[int(0.9 * (len(v) - 1))],
                  "by_type": {q: statistics.median(per_type[q]) for q in QUESTION_TYPES if q in per_type}}
    return out


def headline(space, acc: dict[Knobs, dict[str, float]], ttft: dict[Knobs, dict[str, float]]) -> dict[str, Any]:
    full, cheap = space.full(), space.cheapest()
    if full not in acc or cheap not in acc:
        return {}
    a_full, a_cheap = acc[full], acc[cheap]
    diffs = {t: a_full[t] - a_cheap[t] for t in QUESTION_TYPES}
    h = {
        "full": str(full),
        "cheapest": str(cheap),
        "full_accuracy": a_full["all"],
        "cheapest_accuracy": a_cheap["all"],
        "accuracy_drop_points": 100 * (a_full["all"] - a_cheap["all"]),
        "per_type_drop_points": {t: 100 * d for t, d in diffs.items()},
    }
    if full in ttft and cheap in ttft:
        h["full_ttft_ms"] = ttft[full]["median"]
        h["cheapest_ttft_ms"] = ttft[cheap]["median"]
        h["ttft_ratio"] = ttft[full]["median"] / ttft[cheap]["median"]
    headroom = type_headroom(acc, ttft)
    if headroom:
        best = max(headroom, key=lambda r: r["headroom_points"])
        h["type_headroom_points"], h["type_headroom_budget_ms"] = best["headroom_points"], best["budget_ms"]
    h["checks"] = {
        "full accuracy >= 80%": a_full["all"] >= 0.80,
        "cheapest >= 20 points worse": a_full["all"] - a_cheap["all"] >= 0.20,
        "cheapest >= 3x faster (TTFT)": h.get("ttft_ratio", 0.0) >= 3.0,
        "a type within 2 points at the cheapest": min(diffs.values()) <= 0.02,
        "a type losing >= 30 points at the cheapest": max(diffs.values()) >= 0.30,
    }
    if headroom:
        h["checks"]["best knobs depend on the type (>= 5 points over one configuration at some budget)"] = h["type_headroom_points"] >= 5.0
    return h


def type_headroom(acc: dict[Knobs, dict[str, float]], ttft: dict[Knobs, dict[str, Any]]) -> list[dict[str, Any]]:
    """What choosing per question type gains over one configuration for all, budget by budget.

    A question type's latency under a configuration is its median TTFT (``ttft[c]["by_type"]``;
    the overall median when a sweep has no per-type timings). One configuration for all fits a
    budget when it fits every type (its slowest type's latency); a per-type choice only has to fit
    that type. The budgets are every such latency (each step where what fits changes). At each:
    ``static`` is the accuracy of the best configuration that fits every type (the lookup table's
    rule), ``per_type`` the mean over question types of each type's best configuration that fits
    it (the types are balanced), and ``headroom_points`` the difference, in points. Types gain
    when their best configurations differ, or when a type's own latency lets it afford more than
    the slowest type does.
    """
    latency = {c: {q: ttft[c].get("by_type", {}).get(q, ttft[c]["median"]) for q in QUESTION_TYPES}
               for c in acc if c in ttft}
    if not latency:
        return []
    budgets = sorted({t for per in latency.values() for t in per.values()})
    # the lookup table's rule, once for one configuration for all and once per question type
    static = lookup_table([(c, acc[c]["all"], max(per.values())) for c, per in latency.items()], budgets)
    by_type = [lookup_table([(c, acc[c][q], per[q]) for c, per in latency.items()], budgets) for q in QUESTION_TYPES]
    out = []
    for j, (budget, choice) in enumerate(zip(budgets, static)):
        per_type = statistics.fmean(choices[j].accuracy for choices in by_type)
        out.append({"budget_ms": budget, "static": choice.accuracy, "per_type": per_type,
                    "headroom_points": 100 * (per_type - choice.accuracy)})
    return out


def print_table(configs, acc, ttft, file=None) -> None:
    file = file if file is not None else sys.stdout  # looked up per call, so redirected output gets it
    cols = ["tier", "p", "k", "b", "acc"] + list(QUESTION_TYPES) + ["ttft_ms", "p10", "p90"]
    print(" ".join(f"{c:>8}" for c in cols), file=file)
    for c in configs:
        row = [c.tier, c.insertion_position, c.top_k, c.num_active_blocks]
        a = acc.get(c)
        row += [f"{100 * a['all']:.1f}"] + [f"{100 * a[t]:.1f}" for t in QUESTION_TYPES] if a else ["-"] * (1 + len(QUESTION_TYPES))
        t = ttft.get(c)
        row += [f"{t['median']:.1f}", f"{t['p10']:.1f}", f"{t['p90']:.1f}"] if t else ["-"] * 3
        print(" ".join(f"{str(v):>8}" for v in row), file=file)


def run_sweep(model_dir=None, *, split: str = "test", size: int = 800, configs: str = "all", batch_size: int = 32,
              timing_samples: int = 32, threads: int | None = 1, skip_timing: bool = False) -> dict[str, Any]:
    if threads:
        torch.set_num_threads(threads)
    from . import knob_space, load_embedded_adaptive

    if size < 1 or batch_size < 1 or (not skip_timing and timing_samples < 1):
        raise ValueError(f"size={size}, batch_size={batch_size} and timing_samples={timing_samples} must all be >= 1")
    _select_configs(knob_space(), configs)  # a bad --configs entry fails before the model loads
    adaptive = load_embedded_adaptive(model_dir)
    space = adaptive.knob_space
    cfgs = _select_configs(space, configs)
    examples = [make_example(split, i) for i in range(size)]
    acc = accuracy(adaptive, examples, cfgs, batch_size=batch_size)
    ttft = {} if skip_timing else time_to_first_token(adaptive, examples, cfgs, samples=timing_samples)
    return {"configs": cfgs, "accuracy": acc, "ttft": ttft, "headline": headline(space, acc, ttft), "space": space}


def load_sweep(path: str | os.PathLike) -> dict[str, Any]:
    """A sweep saved with ``--json``, as :func:`run_sweep` returns it (headline recomputed)."""
    from . import knob_space

    with open(path) as f:
        data = json.load(f)
    names = ("tier", "insertion_position", "top_k", "num_active_blocks")
    configs = [Knobs(**{n: row[n] for n in names}) for row in data["rows"]]
    acc = {c: row["accuracy"] for c, row in zip(configs, data["rows"]) if row.get("accuracy")}
    ttft = {c: row["ttft_ms"] for c, row in zip(configs, data["rows"]) if row.get("ttft_ms")}
    space = knob_space()
    return {"configs": configs, "accuracy": acc, "ttft": ttft, "headline": headline(space, acc, ttft), "space": space,
            "split": data.get("split"), "size": data.get("size"), "threads": data.get("threads")}


def main(argv=None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model_dir", default=None, help="default: the committed weights (knob_grpo/embedded/weights)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--size", type=int, default=800)
    ap.add_argument("--configs", default="all", help=CONFIGS_FORMS)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--timing_samples", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip_timing", action="store_true")
    ap.add_argument("--json", default=None, help="write the results to this JSON file")
    ap.add_argument("--from_json", default=None, help="print the table and headline of a sweep saved with --json instead of running one")
    args = ap.parse_args(argv)

    t0 = time.time()
    if args.from_json:
        res = load_sweep(args.from_json)
        print(f"# embedded default sweep from {args.from_json}: split={res['split']} n={res['size']} threads={res['threads']}")
    else:
        res = run_sweep(args.model_dir, split=args.split, size=args.size, configs=args.configs, batch_size=args.batch_size,
                        timing_samples=args.timing_samples, threads=args.threads, skip_timing=args.skip_timing)
        print(f"# embedded default sweep: split={args.split} n={args.size} threads={args.threads} "
              f"vision tokens per tier {M.VISION_TOKENS} ({time.time() - t0:.0f} s)")
    print_table(res["configs"], res["accuracy"], res["ttft"])
    h = res["headline"]
    if h:
        print("\n# headline")
        print(f"full {h['full']}: accuracy {100 * h['full_accuracy']:.1f}%"
              + (f", TTFT {h['full_ttft_ms']:.1f} ms" if "full_ttft_ms" in h else ""))
        print(f"cheapest {h['cheapest']}: accuracy {100 * h['cheapest_accuracy']:.1f}%"
              + (f", TTFT {h['cheapest_ttft_ms']:.1f} ms" if "cheapest_ttft_ms" in h else ""))
        print(f"accuracy drop {h['accuracy_drop_points']:.1f} points"
              + (f"; TTFT ratio full/cheapest {h['ttft_ratio']:.2f}x" if "ttft_ratio" in h else ""))
        print("per-type drop at the cheapest (points): "
              + ", ".join(f"{t} {d:.1f}" for t, d in h["per_type_drop_points"].items()))
        by_type = res["ttft"].get(res["space"].full(), {}).get("by_type")
        if by_type:
            print("full TTFT by question type (median ms): " + ", ".join(f"{q} {t:.1f}" for q, t in by_type.items()))
        if "type_headroom_points" in h:
            print(f"per-type choice over the best single configuration: at most {h['type_headroom_points']:.1f} points "
                  f"(budget {h['type_headroom_budget_ms']:.1f} ms)")
        for name, ok in h["checks"].items():
            print(f"[{'PASS' if ok else 'FAIL'}] {name}")
    if args.json:
        payload = {
            "split": args.split, "size": args.size, "threads": args.threads,
            "tier_pixels": M.TIER_PIXELS, "vision_tokens": M.VISION_TOKENS,
            "rows": [
                {**c.as_dict(), "accuracy": res["accuracy"].get(c), "ttft_ms": res["ttft"].get(c)} for c in res["configs"]
            ],
            "headline": h,
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
    return res


if __name__ == "__main__":
    main()
