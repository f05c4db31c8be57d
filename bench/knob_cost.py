"""What each knob buys, and what the wrapper costs.

For a tiny MoE VLM (the committed embedded default, wrapped with its own tiers and knob space by
``knob_grpo.embedded.load_embedded_adaptive``) and a CPU-sized OLMoE: time to first token
(prefill) of the cheapest and intermediate settings of each knob as a ratio to the full setting,
and the wrapper's overhead at full setting against the plain model's ``generate``. Every time ratio
is the median over interleaved pairs (full setting and knob setting, or plain and wrapped, run back
to back, the order alternating) in this one process run.

Memory: the rise of the peak RSS over the RSS just before a ``generate`` (8 new tokens, the same
prepared inputs in both modes), in a fresh child process per mode (plain, wrapped) that builds its
own models (Linux ``/proc/self/clear_refs`` resets the peak before each generate): the first
call's rise (first-call allocations included, the same in both modes) and the steady rise (the
larger of the next two). The two children run at the same time, before any timing. Reported as
the difference wrapped - plain: the whole-process peak (interpreter, torch, weights, ~470 MiB) is
the same for both and would hide what the wrapper adds, and a ratio of two rises of a MiB or less
says nothing.

    python bench/knob_cost.py            # < 1 minute (about 25 s on 2 quiet cores)
    python bench/knob_cost.py --pairs 16 # steadier ratios
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import torch  # noqa: E402

from knob_grpo import AdaptiveModel  # noqa: E402
from peak_rss import peak_rss_rise_kb  # noqa: E402  (bench/, beside this script)


def cpu_olmoe():
    """OLMoE shaped like a scaled-down MolmoE language model: 16 blocks, 64 experts, top-8."""
    import transformers as tf

    from tiny import tiny_tokenizer

    torch.manual_seed(0)
    tok = tiny_tokenizer()
    config = tf.OlmoeConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=64, num_hidden_layers=16,
                            num_attention_heads=4, num_key_value_heads=4, num_experts=64, num_experts_per_tok=8,
                            pad_token_id=0, eos_token_id=2, bos_token_id=2)
    return tf.OlmoeForCausalLM(config).eval(), tok


def build(which: str) -> AdaptiveModel:
    """The wrapped model: the embedded default with its committed tier settings, or the CPU OLMoE."""
    if which == "olmoe":
        return AdaptiveModel(*cpu_olmoe())
    try:
        from knob_grpo.embedded import load_embedded_adaptive

        return load_embedded_adaptive()
    except Exception as exc:  # the embedded default is not available: a random tiny one
        from tiny import tiny_vlm

        print(f"  (embedded default unavailable: {type(exc).__name__}: {exc}; using a random tiny VLM)", file=sys.stderr)
        return AdaptiveModel(*tiny_vlm(moe=True, num_layers=8))


def prompt_inputs(name: str):
    from tiny import tiny_image

    if name == "olmoe":
        return dict(text=" ".join(["what is the colour of the shape ?"] * 4)), None
    return dict(text="what is the colour of the shape ?", images=[tiny_image(0, size=224)]), "image"


def seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def paired_ratio(base, other, pairs: int) -> float:
    """Median over ``pairs`` back-to-back runs of other/base, alternating which runs first."""
    ratios = []
    for i in range(pairs):
        if i % 2:
            o, b = seconds(other), seconds(base)
        else:
            b, o = seconds(base), seconds(other)
        ratios.append(o / b)
    return statistics.median(ratios)


def knob_ratios(adaptive: AdaptiveModel, inputs: dict, pairs: int) -> list[tuple[str, float]]:
    """Prefill time (one new token) of each knob's settings over the full setting, interleaved pairs."""
    space = adaptive.knob_space
    settings: list[tuple[str, dict]] = []
    # the cheapest setting of each knob and one halfway to the full setting
    def pick(options):
        return sorted({options[0], options[(len(options) - 1) // 2]} - {options[-1]})

    if space.has("tier"):
        settings += [(f"tier={t}", dict(tier=t)) for t in pick(space.tiers)]
    if space.has("top_k"):
        settings += [(f"top_k={k}", dict(insertion_position=1, top_k=k)) for k in pick(space.top_k_options)]
    settings += [(f"num_active_blocks={b}", dict(insertion_position=1, num_active_blocks=b)) for b in pick(space.block_options(1))]
    cheapest = space.cheapest()
    settings.append(("cheapest " + str(cheapest), cheapest.as_dict()))

    def run(knobs):
        return lambda: adaptive.generate(**inputs, **knobs, max_new_tokens=1, do_sample=False)

    for _, knobs in [("full", {})] + settings:  # warm-up: every setting once
        run(knobs)()
    ratios: dict[str, list[float]] = {name: [] for name, _ in settings}
    for i in range(pairs):  # round-robin over the settings: load from other processes spreads over all of them
        for name, knobs in settings:
            if i % 2:
                t_knobs, t_full = seconds(run(knobs)), seconds(run({}))
            else:
                t_full, t_knobs = seconds(run({})), seconds(run(knobs))
            ratios[name].append(t_knobs / t_full)
    return [(name, statistics.median(r)) for name, r in ratios.items()]


def wrapper_overhead(adaptive: AdaptiveModel, inputs: dict, pairs: int, new_tokens: int) -> float:
    """Median over interleaved pairs of (wrapped, full setting) / (plain model) generate time."""
    prepared = adaptive.prepare_inputs(**inputs)
    model = adaptive.model

    def plain():
        adaptive.remove()
        try:
            model.generate(**prepared, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        finally:
            adaptive._install()

    def wrapped():  # same prepared tensors as the plain call: only the wrapper's own cost differs
        adaptive.generate(**prepared, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

    plain(), wrapped()
    return paired_ratio(plain, wrapped, pairs)


def _peak_rise_child(wrapped: bool, queue) -> None:
    """In a fresh process: for each model, the peak RSS rise (KiB) of a generate in one mode: the
    first one, and the larger of the next two (steady state)."""
    torch.set_num_threads(1)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    out = {}
    for which in WHICH:
        adaptive = build(which)
        inputs, _ = prompt_inputs(which)
        prepared = adaptive.prepare_inputs(**inputs)
        model = adaptive.model
        if not wrapped:
            adaptive.remove()

        def generate():
            if wrapped:  # the same prepared tensors as the plain call: only the wrapper differs
                adaptive.generate(**prepared, max_new_tokens=8, min_new_tokens=8, do_sample=False)
            else:
                model.generate(**prepared, max_new_tokens=8, min_new_tokens=8, do_sample=False)

        # the first includes first-call allocations (caches, kernels), the same in both modes
        rises = [peak_rss_rise_kb(generate) for _ in range(3)]
        out[which] = (rises[0], max(rises[1:]))
        del adaptive, model, prepared
    queue.put(out)


def start_peak_rise_children():
    """Start one child per mode (plain, wrapped); ``collect()`` returns {which: {wrapped: (first, steady) KiB}}."""
    ctx = mp.get_context("spawn")
    jobs = []
    for wrapped in (False, True):
        queue = ctx.Queue()
        proc = ctx.Process(target=_peak_rise_child, args=(wrapped, queue))
        proc.start()
        jobs.append((wrapped, queue, proc))

    def collect() -> dict[str, dict[bool, tuple[int, int]]]:
        rises: dict[str, dict[bool, tuple[int, int]]] = {which: {} for which in WHICH}
        for wrapped, queue, proc in jobs:
            result = queue.get(timeout=600)
            proc.join()
            for which, kb in result.items():
                rises[which][wrapped] = kb
        return rises

    return collect


WHICH = ("vlm", "olmoe")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=8, help="interleaved pairs per knob ratio (default 8; the wrapper overhead uses twice as many)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the timings (default 1)")
    args = parser.parse_args()
    if args.pairs < 1:
        parser.error(f"--pairs {args.pairs}: must be >= 1")
    if args.threads < 1:
        parser.error(f"--threads {args.threads}: must be >= 1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    t0 = time.perf_counter()
    # memory first, both modes' children at once (single-threaded each), so no timing below overlaps them
    rises = start_peak_rise_children()()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    headline = []
    for which in WHICH:
        adaptive = build(which)
        inputs, _ = prompt_inputs(which)
        print(f"== {which}: {type(adaptive.model).__name__}, {adaptive.num_blocks} blocks, knobs {adaptive.knob_space.knob_names}")
        for name, ratio in knob_ratios(adaptive, inputs, args.pairs):
            print(f"  prefill time {name:<60s} / full = {ratio:.2f}")
            if name.startswith("cheapest"):
                headline.append((f"{which}_cheapest_prefill_ratio", f"{ratio:.2f}", "report; < 1"))
        overhead = wrapper_overhead(adaptive, inputs, args.pairs * 2, new_tokens=4)
        print(f"  wrapper overhead at full setting (generate, 4 tokens) = {overhead:.3f}")
        headline.append((f"{which}_wrapper_time_overhead", f"{overhead:.3f}", "<= 1.03"))
        del adaptive
        (plain_first, plain), (wrapped_first, wrapped) = ([kb / 1024 for kb in rises[which][m]] for m in (False, True))
        ratio = f"{wrapped / plain:.2f}" if plain >= 0.1 else "n/a, plain rise < 0.1 MiB"
        print(f"  peak RSS rise of a generate (8 tokens), steady: plain {plain:.1f} MiB, wrapped {wrapped:.1f} MiB "
              f"(wrapped / plain = {ratio}); first call: plain {plain_first:.1f} MiB, wrapped {wrapped_first:.1f} MiB")
        # a difference, not a ratio: a generate's working memory here is a few MiB at most, where a
        # ratio of two near-zero numbers says nothing (as in bench/rollout_cost.py)
        headline.append((f"{which}_wrapper_minus_plain_peak_rise_mib", f"{wrapped - plain:+.1f}", "<= 1.0"))
        headline.append((f"{which}_wrapper_minus_plain_first_call_rise_mib", f"{wrapped_first - plain_first:+.1f}", "report"))
    print(f"  benchmark wall time: {time.perf_counter() - t0:.1f} s")
    print()
    for name, value, goal in headline:
        print(f"{name} = {value} (goal {goal})")


if __name__ == "__main__":
    main()
