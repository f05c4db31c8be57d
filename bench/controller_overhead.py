"""Controller overhead: one greedy decision against the cheapest end-to-end generate.

Builds an executor (the embedded tiny Qwen3-VL-MoE with its committed tiers and knob space if
``knob_grpo.embedded.load_embedded_adaptive`` loads, else the random tiny one from
``tests/tiny.py``) and a latency-token controller for it, then measures in the same run:

* ``decision``: stage 1 + stage 2 of one greedy decision from ready features (the language
  feature and the latency token are computed once beforehand; the partial forward to ``p`` is
  not counted), median over many repeats;
* ``cheapest generate``: ``adaptive.generate`` of one prompt and image at
  ``knob_space.cheapest()`` with 8 new tokens (``min_new_tokens=8`` so every run makes 8),
  median over repeats;
* ``in a request``: what deciding adds to a request's time to first token, on the real path
  (``measure_decision_overhead``: prompt features, stage 1, stage 2 at block ``p`` inside the one
  generate, against the static run of the same knobs), with the greedy decisions computed in NumPy
  (what ``decide_and_generate`` uses for a float32 controller on the CPU) and in PyTorch,
  alternated over four rounds. Between two forwards of the executor the controller's small ops
  run several times slower than in the loops above, which is why this is the figure to budget for.

It also prints the parameters per stage for that controller and for one sized for a d_model-2048
MolmoE-like knob space (built from a config alone, no executor). Headline figures come last,
one per line: ``name = value (goal ...)``. Runs in under a minute on 2 CPU cores (about 50 s,
most of it the in-request timing).

    HF_HUB_OFFLINE=1 /work/venv/bin/python bench/controller_overhead.py [--threads N]

Timings on a shared machine are noisy: compare figures from one run only.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

import torch

from knob_grpo.adaptive import AdaptiveModel
from knob_grpo.controller import ControllerConfig, TwoStageController, prompt_features
from knob_grpo.knobs import KnobSpace
from knob_grpo.profiling import measure_decision_overhead

PROMPT = "what colour is the circle ?"


def load_executor():
    try:
        from knob_grpo.embedded import load_embedded_adaptive

        # the committed tiers and knob space (a bare AdaptiveModel(model, processor) would not use them)
        return load_embedded_adaptive(), "embedded tiny Qwen3-VL-MoE (knob_grpo.embedded)"
    except Exception as exc:  # not available yet: the random tiny model of the tests
        from tiny import tiny_vlm

        model, processor = tiny_vlm(moe=True)
        return AdaptiveModel(model, processor), f"random tiny Qwen3-VL-MoE from tests/tiny.py (embedded model unavailable: {type(exc).__name__})"


def test_image():
    try:
        from tiny import tiny_image

        return tiny_image(0)
    except Exception:
        from PIL import Image

        return Image.new("RGB", (64, 64), (200, 30, 30))


def request_rows(image, n: int = 16) -> list[dict]:
    """Requests to time the decision in: the embedded task's validation questions, else PROMPT on ``image``."""
    try:
        from knob_grpo.embedded import make_task_dataset

        data = make_task_dataset("validation", n)
        return [data[i] for i in range(n)]
    except Exception:
        return [{"prompt": PROMPT, "image": image}] * n


def median_seconds(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads for every timing (default 1: "
                        "the controller's tensors are far too small to split, and extra threads only add barrier waits)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    adaptive, executor_name = load_executor()
    image = test_image()
    space = adaptive.knob_space
    print(f"executor: {executor_name}")
    print(f"  blocks={adaptive.num_blocks} experts={adaptive.num_experts} top_k={adaptive.default_top_k} hidden={adaptive.hidden_size}")
    print(f"  knob space: {space}")
    print(f"torch threads: {torch.get_num_threads()}")

    torch.manual_seed(0)
    ctrl = TwoStageController.for_executor(adaptive, stage2_mode="latency_token", budget_range=(10.0, 500.0)).eval()
    prompt_ctrl = TwoStageController.for_executor(adaptive, stage2_mode="prompt", budget_range=(10.0, 500.0)).eval()
    molmoe_space = KnobSpace.from_model(16, default_top_k=8, num_experts=64, has_vision=True)
    molmoe = TwoStageController(ControllerConfig(knob_space=molmoe_space.to_dict(), language_dim=2048, latency_token_dim=2048)).eval()

    # features computed once: the decision timing starts from them
    language = prompt_features(adaptive, PROMPT)
    first = ctrl.decide(language, 100.0, latency_token_fn=lambda t, p: torch.zeros(len(p), adaptive.hidden_size))[0]
    token = adaptive.prefill(PROMPT, [image], tier=first.tier, insertion_position=first.insertion_position).latency_token()
    token_fn = lambda tiers, ps: token  # noqa: E731 - the partial forward is not part of the decision

    decision = median_seconds(lambda: ctrl.decide(language, 100.0, latency_token_fn=token_fn), repeats=300)
    decision_prompt = median_seconds(lambda: prompt_ctrl.decide(language, 100.0), repeats=300)
    features = median_seconds(lambda: prompt_features(adaptive, PROMPT), repeats=300)
    molmoe_language, molmoe_token = torch.randn(1, 2048), torch.randn(1, 2048)
    decision_molmoe = median_seconds(lambda: molmoe.decide(molmoe_language, 250.0, latency_token_fn=lambda t, p: molmoe_token), repeats=300)
    prefill = median_seconds(
        lambda: adaptive.prefill(PROMPT, [image], tier=first.tier, insertion_position=first.insertion_position), repeats=7, warmup=1
    )

    cheapest = space.cheapest()
    generate = median_seconds(
        lambda: adaptive.generate(PROMPT, [image], **cheapest.as_dict(), max_new_tokens=8, min_new_tokens=8, do_sample=False),
        repeats=7,
        warmup=1,
    )

    # what deciding adds inside a request, NumPy greedy path against PyTorch's, alternated
    rows = request_rows(image)
    in_request = {True: [], False: []}
    for _ in range(4):
        for numpy_path in (True, False):
            ctrl._numpy_decisions = numpy_path
            in_request[numpy_path].append(measure_decision_overhead(adaptive, ctrl, rows, repeats=5))
    ctrl._numpy_decisions = True
    overhead_numpy, overhead_torch = (statistics.median(in_request[k]) for k in (True, False))

    counts = ctrl.num_parameters_per_stage()
    prompt_counts = prompt_ctrl.num_parameters_per_stage()
    molmoe_counts = molmoe.num_parameters_per_stage()
    print()
    print("parameters per stage")
    print(f"  this executor, latency_token mode: stage1 {fmt_params(counts['stage1'])}, stage2 {fmt_params(counts['stage2'])}")
    print(f"  this executor, prompt mode:        stage1 {fmt_params(prompt_counts['stage1'])}, stage2 {fmt_params(prompt_counts['stage2'])}")
    print(
        f"  d_model 2048 MolmoE-like space:    stage1 {fmt_params(molmoe_counts['stage1'])}, stage2 {fmt_params(molmoe_counts['stage2'])}"
        f" (hidden {molmoe.config.hidden_size}/{molmoe.config.stage2_hidden_size})"
    )
    print()
    print("timings (median)")
    print(f"  greedy decision, latency_token mode (stage 1 + stage 2): {decision * 1e6:.0f} us")
    print(f"  greedy decision, prompt mode:                           {decision_prompt * 1e6:.0f} us")
    print(f"  language feature (tokenise + embedding lookup):         {features * 1e6:.0f} us")
    print(f"  greedy decision, d_model-2048 controller:               {decision_molmoe * 1e6:.0f} us")
    print(f"  partial prefill to p={first.insertion_position} (tier {first.tier}), not in the decision: {prefill * 1e3:.1f} ms")
    print(f"  cheapest generate {cheapest}, 8 new tokens: {generate * 1e3:.1f} ms")
    print(f"  added to a request's time to first token, {len(rows)} requests (rounds: NumPy "
          f"{', '.join(f'{v:.2f}' for v in in_request[True])} ms; PyTorch {', '.join(f'{v:.2f}' for v in in_request[False])} ms)")
    print(f"  benchmark wall time: {time.perf_counter() - t0:.1f} s")
    print()
    print(f"decision_fraction_of_cheapest_generate = {decision / generate:.4f} (goal < 0.01)")
    print(f"decision_us = {decision * 1e6:.0f} (goal: report)")
    print(f"decision_in_request_ms_numpy = {overhead_numpy:.2f} (goal: report; PyTorch path {overhead_torch:.2f})")
    print(f"decision_in_request_numpy_over_pytorch = {overhead_numpy / max(overhead_torch, 1e-9):.2f} (goal < 1)")
    print(f"decision_us_molmoe_width_cpu = {decision_molmoe * 1e6:.0f} (goal: report; research target < 200 on a GPU)")
    print(f"cheapest_generate_ms = {generate * 1e3:.1f} (goal: report)")
    print(f"stage1_params_molmoe_width = {molmoe_counts['stage1'] / 1e6:.2f}M (goal <= 1.2M)")
    print(f"stage2_params_molmoe_width = {molmoe_counts['stage2'] / 1e6:.2f}M (goal <= 0.7M)")


if __name__ == "__main__":
    main()
