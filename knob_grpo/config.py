"""``KnobGRPOConfig``: TRL's ``GRPOConfig`` with defaults for a small policy network and knob fields."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from trl import GRPOConfig

from .controller import _check_exploration, _check_temperature
from .latency import _check_latency_margin

#: ``GRPOConfig`` options :class:`KnobGRPOTrainer` does not use, with their defaults: how a language
#: model samples tokens (a policy of knob tuples makes a few small categorical decisions instead),
#: and loss refinements the knob loss does not implement. Setting one away from its default is an
#: error, not an option silently ignored. The executor's own generate takes
#: ``executor_generation_kwargs``; the controller's sampling takes ``temperature``.
UNUSED_GRPO_OPTIONS: dict[str, Any] = {
    "use_vllm": False,
    "use_transformers_continuous_batching": False,
    "use_transformers_paged": False,
    "top_p": 1.0,
    "top_k": 0,  # GRPOConfig's token filter; the MoE top-k is one of the knobs the controller picks
    "min_p": None,
    "repetition_penalty": 1.0,
    "generation_kwargs": None,
    "cache_implementation": None,
    "chat_template_kwargs": None,
    "max_tool_calling_iterations": None,
    "top_entropy_quantile": 1.0,  # masks tokens by entropy; four decisions per tuple are all kept
    "off_policy_mask_threshold": None,
    "multi_objective_aggregation": "sum_then_normalize",  # the weighted sum of the rewards is what is centred
    "mask_truncated_completions": False,  # a knob tuple is never truncated (the executor's output is not the completion)
    "cast_lm_head_to_fp32": False,  # the controller has no language-modelling head
}
#: ``loss_type`` values the knob loss implements. With the same number of decisions in every tuple,
#: TRL's "grpo" (per-sequence mean), "bnpo" (per-batch mean) and "dapo" (per-token mean over the
#: accumulated batch) are one and the same loss.
LOSS_TYPES: tuple[str, ...] = ("dapo", "grpo", "bnpo")


@dataclass
class KnobGRPOConfig(GRPOConfig):
    r"""Configuration of [`KnobGRPOTrainer`]: every ``GRPOConfig`` field, plus the knob-specific ones.

    The policy is a controller of about a million parameters, not a language model, so some TRL
    defaults change: a larger learning rate, no gradient checkpointing, no bf16, a small entropy
    bonus (a categorical policy this small otherwise turns deterministic within a few dozen steps,
    before it has learned how the best tier depends on the budget), and TRL's
    ``max_completion_length`` is the executor's ``max_new_tokens``. Rewards are scaled per group as
    in TRL: a group whose tuples differ a little in accuracy (two tiers that both fit) then learns
    as fast as one with budget violations. With measured latency and a reward that varies with the
    latency itself (a slack bonus), prefer ``scale_rewards="batch"``: a group whose accuracies tie
    would otherwise turn timing noise into large advantages (DESIGN §8). TRL's options for sampling
    tokens, and the loss refinements the knob loss does not implement, are refused by name
    (:data:`UNUSED_GRPO_OPTIONS`, ``loss_type`` outside :data:`LOSS_TYPES`); the others work as in TRL.
    """

    # a dict given as a JSON string (on the command line) is parsed, as TRL does for generation_kwargs
    _VALID_DICT_FIELDS = GRPOConfig._VALID_DICT_FIELDS + ["executor_generation_kwargs"]

    # ---- TRL defaults that do not fit an MLP policy
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate of the controller."})
    # Both unset: transformers then turns checkpointing off (TRL's default is on), without the
    # deprecation warning that setting the old name gives.
    activation_checkpointing: bool | None = field(default=None, metadata={"help": "Off when unset: not useful for a small MLP policy."})
    gradient_checkpointing: bool | None = field(default=None, metadata={"help": "Deprecated alias of activation_checkpointing."})
    bf16: bool | None = field(default=False, metadata={"help": "The controller trains in float32."})
    num_generations: int | None = field(default=8, metadata={"help": "Group size G: knob tuples sampled per prompt and budget."})
    per_device_train_batch_size: int = field(default=16, metadata={"help": "Rows per device and step (prompts x G)."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Passes over the training prompts."})
    max_completion_length: int | None = field(default=8, metadata={"help": "max_new_tokens of the executor's generate."})
    scale_rewards: str = field(
        default="group",
        metadata={"help": "'group' (default), 'batch' or 'none': what the group-centred rewards are divided by (the "
                  "group's or the batch's standard deviation). Prefer 'batch' when rewards carry timing noise."},
    )
    entropy_coef: float = field(
        default=0.1,
        metadata={"help": "Weight of the policy's mean per-decision entropy, subtracted from the loss: keeps the "
                  "controller exploring while it learns how the best knobs depend on the budget and the request. "
                  "On the embedded default 0.02 let the tier head collapse to the always-fitting low tier within 40 "
                  "steps; 0.1 keeps it exploring until it gives each question type its own tier."},
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every this many steps."})
    report_to: None | str | list[str] = field(default="none", metadata={"help": "Logging backends (TRL's usual ones)."})
    save_strategy: str = field(default="no", metadata={"help": "When to save checkpoints ('no', 'steps', 'epoch')."})
    use_cpu: bool = field(
        default=not torch.cuda.is_available(),
        metadata={"help": "Train on the CPU. Defaults to True on a machine without a GPU, so that "
                  "`accelerate launch --multi_gpu --num_processes N` runs N gloo processes on the CPU."},
    )

    # ---- the data
    prompt_column: str = field(default="prompt", metadata={"help": "Dataset column with the request's text."})
    image_column: str | None = field(default="image", metadata={"help": "Dataset column with the image (ignored if absent)."})
    budget_column: str = field(
        default="budget",
        metadata={"help": "Dataset column with the latency budget in ms; when absent, budgets are drawn (see budget_sampling)."},
    )
    # Budgets drawn outside the controller's own range would all be clamped to its ends: unset, the
    # trainer takes the controller's range; set, it must be the controller's.
    budget_min_ms: float | None = field(
        default=None, metadata={"help": "Lower end of the budget range in ms budgets are drawn from; unset: the controller's "
                                "budget_range. When set, it must equal the controller's."})
    budget_max_ms: float | None = field(
        default=None, metadata={"help": "Upper end of the budget range in ms budgets are drawn from; unset: the controller's "
                                "budget_range. When set, it must equal the controller's."})
    budget_sampling: str = field(
        default="uniform",
        metadata={"help": "How budgets are drawn when the dataset has none: 'uniform' (default, as in the research system) "
                  "or 'log_uniform' over the range. Log-uniform puts more draws at the low end, where configurations' "
                  "latencies crowd; uniform puts more where only the slowest, most accurate ones fit. On the embedded "
                  "default only the slowest tier answers one question type; with log-uniform draws (~16% of them leave "
                  "room for that tier) the controller's tier head settled on the two cheaper tiers before it found "
                  "that type in some runs. The draw depends on the prompt and "
                  "the step only, so every member of a group, on every process, gets the same budget."},
    )

    # ---- executing the knobs
    latency_source: str = field(
        default="measured",
        metadata={"help": "'measured' (each configuration timed alone, wall clock) or the path of a latency profile "
                  "(knob_grpo.latency.LatencyProfile) fitted on this device for this executor."},
    )
    latency_target: str = field(
        default="ttft",
        metadata={"help": "What a budget limits: 'ttft' (time to first token: vision + prefill) or 'end_to_end'."},
    )
    latency_margin: float = field(
        default=0.0,
        metadata={"help": "Latencies predicted by a latency profile are scaled by (1 + latency_margin) before the rewards "
                  "see them, so the controller leaves room for the spread of real latency around the profile's "
                  "prediction (run to run, a few percent on a CPU). knob_grpo.profiling.suggest_latency_margin "
                  "measures it on single timed runs the profile was not fitted on (examples/train.py does). Measured latencies are not scaled."},
    )
    rollout_mode: str = field(
        default="auto",
        metadata={"help": "'naive' (latency-token mode: a partial forward, then a separate full generate), 'fused' (continue "
                  "the partial forward from block p; needs a profile, since a continued prefill cannot be timed as one) "
                  "or 'auto' (fused when the latency comes from a profile)."},
    )
    batch_rollouts: bool = field(
        default=True,
        metadata={"help": "In fused rollouts with greedy decoding, run the tuples continued from one prefix (one request "
                  "at one tier) as one batched generate, each row with its own knobs (AdaptiveModel.generate_rows): "
                  "the same tokens as one generate per tuple, for one set-up of the generation loop."},
    )
    decision_overhead_ms: float = field(
        default=0.0,
        metadata={"help": "Added to every rollout's latency: what letting the controller decide adds to a request (prompt "
                  "features, both stages, the generate split at block p), which a request pays for at inference but a "
                  "rollout's profiled latency does not contain. Measure it with "
                  "knob_grpo.profiling.measure_decision_overhead (examples/train.py does)."},
    )
    answer_logprobs: bool = field(
        default=False,
        metadata={"help": "Pass reward functions `answer_logprob`: per row, the executor's log-probability, in that row's "
                  "knobs, of the reference answer (column `answer`; the likeliest of a list), read off the logits of the "
                  "generate that made the completion. Tokens are scored up to the first one the greedy output departs "
                  "from, so a one-token answer gets its exact log-probability. A dense signal where exact match is 0/1: "
                  "knob_grpo.rewards.answer_probability_reward turns it into a reward. Rows without an answer get None."},
    )
    stage1_credit: str = field(
        default="sampled",
        metadata={"help": "What stage 1's decisions (tier, p) are credited with. 'sampled': the advantage of the whole "
                  "sampled tuple, as every decision of a GRPO completion is. 'greedy_stage2': the reward the row's (tier, "
                  "p) earns when stage 2 then decides greedily (as at inference), against its group's mean; stage 2's "
                  "decisions get their own reward against that one. Costs one more execution per row whose greedy "
                  "stage-2 tuple was not drawn. Stage 1 then stops paying for stage 2's exploration: a tier that fits "
                  "only with the right stage-2 choice is not punished for the draws that miss it. 'greedy_rest': the "
                  "same, and the tier too stops paying for p's exploration: it gets the reward of the greedy p after "
                  "it (then stage 2 greedily) against its group's mean, and p gets 'greedy_stage2''s reward against "
                  "that. Costs up to one more execution per row."},
    )
    stage1_exploration: float = field(
        default=0.0,
        metadata={"help": "Exploration floor of stage 1, in [0, 1): its decisions (tier, p) are drawn from (1 - x) * policy "
                  "+ x * uniform, and the loss weighs each by policy / that mixture (the importance ratio, clipped as "
                  "any). A tier stage 1 gave up on early at some budget is still tried there now and then, so stage 2 "
                  "keeps learning what fits after it and stage 1 can come back to it. 0: sample from the policy."},
    )
    executor_generation_kwargs: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Extra keyword arguments of the executor's generate (greedy by default)."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("budget_min_ms", "budget_max_ms"):  # None: the controller's range, filled in by the trainer
            value = getattr(self, name)
            if value is not None and not (math.isfinite(float(value)) and float(value) > 0):
                raise ValueError(f"{name}={value!r} must be a finite number of ms > 0, or None (the controller's range)")
        if None not in (self.budget_min_ms, self.budget_max_ms) and float(self.budget_max_ms) <= float(self.budget_min_ms):
            raise ValueError(f"budget range ({self.budget_min_ms}, {self.budget_max_ms}) must satisfy 0 < budget_min_ms < budget_max_ms")
        kwargs = self.executor_generation_kwargs
        if kwargs is not None and not isinstance(kwargs, dict):
            raise ValueError(f"executor_generation_kwargs={kwargs!r} must be a dict (or its JSON text, e.g. '{{\"num_beams\": 1}}')")
        if self.budget_sampling not in ("uniform", "log_uniform"):
            raise ValueError(f"budget_sampling={self.budget_sampling!r}; allowed: 'uniform', 'log_uniform'")
        if self.latency_target not in ("ttft", "end_to_end"):
            raise ValueError(f"latency_target={self.latency_target!r}; allowed: 'ttft', 'end_to_end'")
        if not (math.isfinite(self.decision_overhead_ms) and self.decision_overhead_ms >= 0):
            raise ValueError(f"decision_overhead_ms={self.decision_overhead_ms!r} must be a finite number of ms >= 0")
        self.latency_margin = _check_latency_margin(self.latency_margin)
        if self.stage1_credit not in ("sampled", "greedy_stage2", "greedy_rest"):
            raise ValueError(f"stage1_credit={self.stage1_credit!r}; allowed: 'sampled', 'greedy_stage2', 'greedy_rest'")
        for name, default in UNUSED_GRPO_OPTIONS.items():
            value = getattr(self, name)
            if value != default:
                raise ValueError(f"{name}={value!r}: KnobGRPOTrainer does not use {name} (its completions are knob tuples, "
                                 f"not tokens); leave it at {default!r}. The executor's generate takes "
                                 "executor_generation_kwargs, the controller's sampling temperature")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type={self.loss_type!r}; allowed: {', '.join(map(repr, LOSS_TYPES))} (one loss for tuples of equal length)")
        if self.importance_sampling_level not in ("token", "sequence"):
            raise ValueError(f"importance_sampling_level={self.importance_sampling_level!r}; allowed: 'token' (one ratio per "
                             "decision), 'sequence' (one per tuple)")
        self.temperature = _check_temperature(self.temperature)
        self.stage1_exploration = _check_exploration(self.stage1_exploration)
        if self.rollout_mode not in ("auto", "naive", "fused"):
            raise ValueError(f"rollout_mode={self.rollout_mode!r}; allowed: 'auto', 'naive', 'fused'")
