"""Time to first token of the embedded default: full setting against the cheapest, and per question type.

The issue's sweep requirement (the cheapest configuration >= 3x faster than the full one) and the
reason per-request choice pays on this task (pattern questions' 176 px images make the high tier
cheaper for them) are timing claims, so they are measured here rather than asserted in tests.
Single-example requests, interleaved between the two configurations (``sweep.time_to_first_token``).

    python bench/embedded_ttft.py              # < 1 minute
    python bench/embedded_ttft.py --samples 64
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from knob_grpo.embedded import QUESTION_TYPES, load_embedded_adaptive, make_example  # noqa: E402
from knob_grpo.embedded.sweep import time_to_first_token  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=48, help="timed requests per configuration (cycling the question types)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the committed sweep uses 1)")
    args = parser.parse_args()
    n_types = len(QUESTION_TYPES)
    if args.samples < n_types:  # the requests cycle the question types: fewer would leave a type untimed
        parser.error(f"--samples {args.samples} would leave question types untimed: the requests cycle the "
                     f"{n_types} types {QUESTION_TYPES}, so --samples must be >= {n_types}")
    if args.threads < 1:
        parser.error(f"--threads {args.threads}: must be >= 1")
    torch.set_num_threads(args.threads)
    adaptive = load_embedded_adaptive()
    space = adaptive.knob_space
    full, cheapest = space.full(), space.cheapest()
    examples = [make_example("test", i) for i in range(args.samples)]
    ttft = time_to_first_token(adaptive, examples, [full, cheapest], samples=args.samples)
    for name, cfg in (("full", full), ("cheapest", cheapest)):
        per_type = ", ".join(f"{q} {ttft[cfg]['by_type'][q]:.1f}" for q in QUESTION_TYPES)
        print(f"{name} {cfg}: median {ttft[cfg]['median']:.1f} ms (p10 {ttft[cfg]['p10']:.1f}, p90 {ttft[cfg]['p90']:.1f}); by type: {per_type}")
    ratio = ttft[full]["median"] / ttft[cheapest]["median"]
    others = min(ttft[full]["by_type"][q] for q in QUESTION_TYPES if q != "pattern")
    print()
    print(f"embedded_full_over_cheapest_ttft = {ratio:.2f} (goal >= 3)")
    print(f"embedded_pattern_over_other_types_ttft_at_full = {ttft[full]['by_type']['pattern'] / others:.2f} (goal < 1)")


if __name__ == "__main__":
    main()
