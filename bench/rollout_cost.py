"""Seconds per GRPO generation batch: naive latency-token mode, prompt mode, fused latency-token mode.

The seeds count 10 passes per group of 5 in naive latency-token mode (a partial forward to p and a
full generate per tuple) and 5 in prompt mode. Fused mode runs one partial forward per request and
tier, up to the deepest p, and continues every tuple from its own p. All three use a latency
profile as the reward's latency source (so no tuple needs timing alone) and are timed side by side,
interleaved, in this one run. Fused mode also runs the tuples continued from one prefix as one
batched generate with per-row knobs (``AdaptiveModel.generate_rows``); ``fused_one_call_per_tuple``
shows it without that. Peak memory: in a fresh child process per mode, after one warm-up
batch, the peak RSS is reset (Linux ``/proc/self/clear_refs``) and the rise of the peak over the
RSS before the next batch is that mode's working memory.

    python bench/rollout_cost.py          # < 1 minute
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import torch  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from knob_grpo import AdaptiveModel, KnobGRPOConfig, KnobGRPOTrainer, TwoStageController  # noqa: E402
from knob_grpo.latency import DECODE_FEATURES, TTFT_FEATURES, LatencyProfile  # noqa: E402
from peak_rss import peak_rss_rise_kb  # noqa: E402  (bench/, beside this script)

# mode -> (stage2_mode, rollout_mode, batch_rollouts); "fused" is the trainer's default in latency-token mode
MODES = {"naive": ("latency_token", "naive", False), "prompt": ("prompt", "auto", True), "fused": ("latency_token", "fused", True),
         "fused_one_call_per_tuple": ("latency_token", "fused", False)}
G = 5


def build(which: str):
    from tiny import tiny_vlm

    if which == "tiny":
        try:
            from knob_grpo.embedded import load_embedded_adaptive

            return load_embedded_adaptive()
        except Exception:
            return AdaptiveModel(*tiny_vlm(moe=True, num_layers=8))
    import transformers as tf

    model, processor = tiny_vlm(moe=True, num_layers=8)  # a larger CPU-sized one of the same kind
    torch.manual_seed(0)
    config = model.config
    config.text_config.hidden_size, config.text_config.moe_intermediate_size = 256, 128
    config.text_config.num_attention_heads, config.text_config.num_key_value_heads, config.text_config.head_dim = 8, 4, 32
    config.text_config.num_hidden_layers, config.text_config.num_experts = 12, 16
    config.vision_config.out_hidden_size = 256
    big = tf.Qwen3VLMoeForConditionalGeneration(config).eval()
    big.generation_config.pad_token_id, big.generation_config.eos_token_id = 0, 2
    return AdaptiveModel(big, processor)


def trainer_for(executor: AdaptiveModel, mode: str, out: str) -> KnobGRPOTrainer:
    stage2_mode, rollout, batched = MODES[mode]
    torch.manual_seed(0)
    controller = TwoStageController.for_executor(executor, stage2_mode=stage2_mode, budget_range=(10.0, 100.0))
    profile = LatencyProfile(device="bench", executor=executor.name_or_path, ttft_coef=dict.fromkeys(TTFT_FEATURES, 0.01),
                             decode_coef=dict.fromkeys(DECODE_FEATURES, 0.01))
    args = KnobGRPOConfig(output_dir=out, num_generations=G, per_device_train_batch_size=2 * G, max_completion_length=2,
                          budget_min_ms=10.0, budget_max_ms=100.0, rollout_mode=rollout, batch_rollouts=batched,
                          report_to="none")
    from datasets import Dataset

    def zero_reward(completions, **kwargs):
        return [0.0] * len(completions)

    return KnobGRPOTrainer(controller, executor, [zero_reward], args=args, latency_profile=profile,
                           train_dataset=Dataset.from_dict({"prompt": ["unused"] * (2 * G)}))


def rows(executor: AdaptiveModel) -> list[dict]:
    from tiny import tiny_image

    questions = ["what is the colour of the shape ?", "how many dots ?"]
    out = []
    for i, q in enumerate(questions):
        image = tiny_image(i, size=112) if executor.vision_tower is not None else None
        out += [dict(prompt=q, image=image, budget=50.0) for _ in range(G)]
    return out


def step_time(trainer: KnobGRPOTrainer, batch: list[dict]) -> float:
    trainer.model.train()
    start = time.perf_counter()
    trainer._generate_and_score_completions([dict(r) for r in batch])
    return time.perf_counter() - start


def _peak_child(which: str, mode: str, queue) -> None:
    torch.set_num_threads(1)
    hf_logging.set_verbosity_error()
    executor = build(which)
    trainer = trainer_for(executor, mode, tempfile.mkdtemp())
    batch = rows(executor)
    step_time(trainer, batch)  # first-call allocations (caches, kernels) are not the mode's working memory
    queue.put(peak_rss_rise_kb(lambda: step_time(trainer, batch)))


def peak_increase_kb(which: str, mode: str) -> int:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_peak_child, args=(which, mode, queue))
    proc.start()
    value = queue.get()
    proc.join()
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    headline = []
    for which in ("tiny", "larger"):
        executor = build(which)
        trainers = {mode: trainer_for(executor, mode, tempfile.mkdtemp()) for mode in MODES}
        batch = rows(executor)
        for trainer in trainers.values():
            step_time(trainer, batch)  # warm-up
        times = {mode: [] for mode in MODES}
        for _ in range(args.repeats):
            for mode, trainer in trainers.items():
                times[mode].append(step_time(trainer, batch))
        med = {mode: statistics.median(t) for mode, t in times.items()}
        print(f"== {which}: {type(executor.model).__name__}, {executor.num_blocks} blocks, 2 prompts x G={G}")
        for mode in MODES:
            print(f"  {mode:<24s} {med[mode]:.3f} s per generation batch")
        mem = {mode: peak_increase_kb(which, mode) for mode in ("naive", "fused")}
        print(f"  peak RSS increase: naive {mem['naive'] / 1024:.1f} MiB, fused {mem['fused'] / 1024:.1f} MiB")
        headline += [
            (f"{which}_fused_over_prompt", med["fused"] / med["prompt"], "<= 1.10"),
            (f"{which}_fused_over_naive", med["fused"] / med["naive"], "<= 0.60"),
            # a difference, not a ratio: the working memory of one batch is a few MiB at most here,
            # where a ratio of two near-zero numbers says nothing
            (f"{which}_fused_minus_naive_peak_mib", (mem["fused"] - mem["naive"]) / 1024, "<= 0"),
        ]
    print()
    for name, value, goal in headline:
        print(f"{name} = {value:.2f} (goal {goal})")


if __name__ == "__main__":
    main()
