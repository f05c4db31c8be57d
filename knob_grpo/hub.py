"""The model card pushed with a controller checkpoint."""

from __future__ import annotations

from typing import Any


def controller_model_card(
    controller: Any,
    *,
    model_name: str,
    dataset_name: str | None = None,
    evaluation: str | None = None,
    plot: str | None = None,
    training_args: Any = None,
) -> str:
    """Markdown card naming the executor model, the knob space and the budget range."""
    config = controller.config
    space = controller.knob_space
    lo, hi = config.budget_range
    lines = [
        "---",
        "library_name: knob_grpo",
        "tags: [knob-grpo, trl, grpo, latency-budget, mixture-of-experts]",
    ]
    if config.executor_name_or_path:
        lines.append(f"base_model: {config.executor_name_or_path}")
    lines += ["---", "", f"# {model_name}", ""]
    lines += [
        "A two-stage knob controller trained with GRPO by [knob_grpo](https://pypi.org/project/knob-grpo/).",
        "Given a request and a latency budget it chooses how the executor model runs the request.",
        "",
        f"- **Executor model:** `{config.executor_name_or_path}` ({space.num_blocks} blocks"
        + (f", {space.num_experts} experts, top-{space.default_top_k}" if space.num_experts else ", dense")
        + ")",
        f"- **Budget range:** {lo:g}–{hi:g} ms",
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
        f'controller = AutoModel.from_pretrained("{model_name}")',
        f'executor = knob_grpo.AdaptiveModel.from_pretrained("{config.executor_name_or_path}")',
        'result = executor.generate("your question", [image], latency_budget=250.0, controller=controller)',
        "print(result.knobs, result.output)",
        "```",
    ]
    if training_args is not None:
        lines += ["", "## Training", "", f"GRPO with G={training_args.num_generations}, learning rate {training_args.learning_rate:g}, "
                  f"latency source `{training_args.latency_source}`, budgets limit `{training_args.latency_target}`."]
    return "\n".join(lines) + "\n"
