"""The model card pushed with a controller checkpoint."""

from __future__ import annotations

import math
import os
from typing import Any

from huggingface_hub.utils import HFValidationError, validate_repo_id


def _hub_model_id(name: str | None) -> str | None:
    """``name`` if it can be the card's ``base_model`` (a Hub model id, as the Hub checks the card's
    metadata), else ``None``: a local folder (as TRL's cards leave out), the package's embedded model,
    or a name the Hub would refuse."""
    from .embedded import EMBEDDED_NAME

    if not name or os.path.isdir(name) or name.startswith(EMBEDDED_NAME):
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


def _outside_the_range(config: Any) -> str:
    """What the controller decides for budgets outside its range (``below_range``, ``clamp_budget``)."""
    lo, hi = config.budget_range
    if config.below_range == "cheapest":
        below = "below it the cheapest configuration"
    else:
        below = f"below it as at {lo:g} ms" if config.clamp_budget else "below it extrapolated"
    return below + (f", above it as at {hi:g} ms" if config.clamp_budget else ", above it extrapolated")


def _example_budget(lo: float, hi: float) -> float:
    """A budget inside ``[lo, hi]`` for the card's example: the geometric midpoint (the middle of a
    range spread geometrically, as the evaluation's budgets are), to three significant digits."""
    mid = math.sqrt(lo * hi) if lo > 0 else (lo + hi) / 2
    return min(max(float(f"{mid:.3g}"), lo), hi)


def controller_model_card(
    controller: Any,
    *,
    model_name: str,
    dataset_name: str | None = None,
    evaluation: str | None = None,
    plot: str | None = None,
    training_args: Any = None,
    repo_id: str | None = None,
    latency_profile_saved: bool | None = None,
) -> str:
    """Markdown card naming the executor model, the knob space and the budget range.

    ``repo_id``: what the card's example loads the controller from (default ``model_name``); the
    Hub id with its namespace when pushed. ``latency_profile_saved``: the rewards' latency profile
    is saved beside the controller (``latency_profile.json``), which serving calibrates against
    (default: ``training_args.latency_source`` is a profile's path).
    """
    config = controller.config
    space = controller.knob_space
    lo, hi = config.budget_range
    lines = [
        "---",
        "library_name: knob_grpo",
        "tags: [knob-grpo, trl, grpo, latency-budget, mixture-of-experts]",
    ]
    if base_model := _hub_model_id(config.executor_name_or_path):
        lines.append(f"base_model: {base_model}")
    lines += ["---", "", f"# {model_name}", ""]
    lines += [
        "A two-stage knob controller trained with GRPO by [knob_grpo](https://pypi.org/project/knob-grpo/).",
        "Given a request and a latency budget it chooses how the executor model runs the request.",
        "",
        "- **Executor model:** " + (f"`{config.executor_name_or_path}`" if config.executor_name_or_path else "not recorded")
        + f" ({space.num_blocks} blocks"
        + (f", {space.num_experts} experts, top-{space.default_top_k}" if space.num_experts else ", dense")
        + ")",
        f"- **Budget range:** {lo:g}–{hi:g} ms ({_outside_the_range(config)})",
        f"- **Stage 2 mode:** `{config.stage2_mode}`",
    ]
    if dataset_name:
        lines.append(f"- **Training data:** `{dataset_name}`")
    lines += ["", "## Knob space", "", "| knob | options |", "|---|---|"]
    for name in space.knob_names:
        if name == "num_active_blocks":
            options = "; ".join(f"p={p}: {', '.join(map(str, space.block_options(p)))}" for p in space.insertion_positions)
        else:
            options = ", ".join(map(str, space.options(name)))
        lines.append(f"| `{name}` | {options} |")
    if evaluation or plot:
        lines += ["", "## Evaluation", ""]
        if plot:
            lines += [f"![accuracy against latency, with the budgets marked]({plot})", ""]
        if evaluation:
            lines.append(evaluation)
    lines += [
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModel",
        "import knob_grpo",
        "",
        f'controller = AutoModel.from_pretrained("{repo_id or model_name}")',
        f'executor = knob_grpo.AdaptiveModel.from_pretrained("{config.executor_name_or_path}")'
        if config.executor_name_or_path else
        "executor = ...  # load the executor the controller was trained for: knob_grpo.AdaptiveModel.from_pretrained(...)",
        f'result = executor.generate("your question"{", [image]" if space.tiers else ""}, '
        f"latency_budget={_example_budget(lo, hi):g}, controller=controller)",
        "print(result.knobs, result.output)",
        "```",
    ]
    if training_args is not None:
        args = training_args
        if latency_profile_saved is None:
            latency_profile_saved = args.latency_source != "measured"
        source = "a latency profile (saved as `latency_profile.json`)" if latency_profile_saved else f"`{args.latency_source}`"
        lines += ["", "## Training", "", f"GRPO with G={args.num_generations}, learning rate {args.learning_rate:g}, "
                  f"latency source {source}, budgets limit `{args.latency_target}`, latency margin {args.latency_margin:g}, "
                  f"decision overhead {args.decision_overhead_ms:g} ms."]
        if latency_profile_saved:
            lines += ["", "Where the controller is served, set its `latency_scale` from "
                      "`knob_grpo.profiling.suggest_latency_scale` with the saved `latency_profile.json` and "
                      f"`latency_margin={args.latency_margin:g}`."]
    return "\n".join(lines) + "\n"
