"""What each knob buys, and what the wrapper costs.

For a tiny MoE VLM and a CPU-sized OLMoE: time to first token (prefill) of the cheapest and
intermediate settings of each knob as a ratio to the full setting, and the wrapper's overhead at
full setting against the plain model's ``generate`` (time, and peak memory measured in separate
child processes). Every ratio compares runs interleaved in this one process run.

    python bench/knob_cost.py            # < 1 minute
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import torch  # noqa: E402

from knob_grpo import AdaptiveModel  # noqa: E402


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


def tiny_moe_vlm():
    try:
        from knob_grpo.embedded import load_embedded_default

        return load_embedded_default()
    except Exception:  # the embedded default is not available: a random tiny one
        from tiny import tiny_vlm

        return tiny_vlm(moe=True, num_layers=8)


def prompt_inputs(name: str):
    from tiny import tiny_image

    if name == "olmoe":
        return dict(text=" ".join(["what is the colour of the shape ?"] * 4)), None
    return dict(text="what is the colour of the shape ?", images=[tiny_image(0, size=224)]), "image"


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def knob_ratios(adaptive: AdaptiveModel, inputs: dict, repeats: int) -> list[tuple[str, float]]:
    """Prefill time (one new token) of each knob's settings over the full setting, interleaved."""
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

    run({})()  # warm-up
    ratios = []
    for name, knobs in settings:
        run(knobs)()
        pairs = [(median_time(run({}), 1), median_time(run(knobs), 1)) for _ in range(repeats)]
        full = statistics.median(p[0] for p in pairs)
        ratios.append((name, statistics.median(p[1] for p in pairs) / full))
    return ratios


def wrapper_overhead(adaptive: AdaptiveModel, inputs: dict, repeats: int, new_tokens: int) -> float:
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
    ratios = []
    for i in range(repeats):
        if i % 2:
            w, p = median_time(wrapped, 1), median_time(plain, 1)
        else:
            p, w = median_time(plain, 1), median_time(wrapped, 1)
        ratios.append(w / p)
    return statistics.median(ratios)


def _peak_rss_child(which: str, wrapped: bool, queue) -> None:
    torch.set_num_threads(1)
    model, proc = cpu_olmoe() if which == "olmoe" else tiny_moe_vlm()
    inputs, _ = prompt_inputs(which)
    adaptive = AdaptiveModel(model, proc)
    prepared = adaptive.prepare_inputs(**inputs)
    if not wrapped:
        adaptive.remove()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(2):
        if wrapped:
            adaptive.generate(**inputs, max_new_tokens=8, do_sample=False)
        else:
            model.generate(**prepared, max_new_tokens=8, do_sample=False)
    queue.put((base, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))


def peak_memory_ratio(which: str) -> float:
    ctx = mp.get_context("spawn")
    peaks = {}
    for wrapped in (False, True):
        queue = ctx.Queue()
        proc = ctx.Process(target=_peak_rss_child, args=(which, wrapped, queue))
        proc.start()
        peaks[wrapped] = queue.get()[1]
        proc.join()
    return peaks[True] / peaks[False]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    headline = []
    for which, build in (("vlm", tiny_moe_vlm), ("olmoe", cpu_olmoe)):
        model, proc = build()
        adaptive = AdaptiveModel(model, proc)
        inputs, _ = prompt_inputs(which)
        print(f"== {which}: {type(model).__name__}, {adaptive.num_blocks} blocks, knobs {adaptive.knob_space.knob_names}")
        for name, ratio in knob_ratios(adaptive, inputs, args.repeats):
            print(f"  prefill time {name:<60s} / full = {ratio:.2f}")
            if name.startswith("cheapest"):
                headline.append((f"{which}_cheapest_prefill_ratio", f"{ratio:.2f}", "report; < 1"))
        overhead = wrapper_overhead(adaptive, inputs, args.repeats * 3, new_tokens=4)
        print(f"  wrapper overhead at full setting (generate, 4 tokens) = {overhead:.3f}")
        headline.append((f"{which}_wrapper_time_overhead", f"{overhead:.3f}", "<= 1.03"))
        del model, adaptive
        mem = peak_memory_ratio(which)
        print(f"  peak RSS wrapped / plain = {mem:.3f}")
        headline.append((f"{which}_wrapper_peak_memory", f"{mem:.3f}", "<= 1.05"))
    print()
    for name, value, goal in headline:
        print(f"{name} = {value} (goal {goal})")


if __name__ == "__main__":
    main()
