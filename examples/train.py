"""Train a knob controller with GRPO, then evaluate it over a budget sweep.

    accelerate launch examples/train.py                      # the embedded default, CPU, ~11 min
    accelerate launch examples/train.py --config run.yaml    # any field below, or of KnobGRPOConfig
    accelerate launch examples/train.py --model_name_or_path ORG/MODEL --dataset_name ORG/DATA \
        --question_column question --image_column image --answer_column answer --push_to_hub

Steps: load the executor -> fit a latency profile on this device, and measure how far single runs
exceed it (the latency margin) and what the controller's decision adds to a request -> train the
controller with KnobGRPOTrainer -> evaluate it against the lookup table, the best static configuration, the
full model and the oracle with measured latency (the controller is told how much slower than in its profile the
device runs now, its latency scale, from the runs the lookup table is chosen on) -> write the table, the Pareto
plot and the controller checkpoint.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from dataclasses import dataclass, field

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from accelerate import PartialState  # noqa: E402
from accelerate.utils import broadcast_object_list  # noqa: E402
from trl import TrlParser  # noqa: E402

from knob_grpo import AdaptiveModel, ControllerConfig, KnobGRPOConfig, KnobGRPOTrainer, TwoStageController  # noqa: E402
from knob_grpo.evaluation import evaluate_budgets  # noqa: E402
from knob_grpo.profiling import (fit_profile, measure_decision_overhead, profile_executor, suggest_budget_range,  # noqa: E402
                                suggest_latency_margin)
from knob_grpo.rewards import answer_probability_reward, exact_match_reward, make_budget_reward, within_budget  # noqa: E402


@dataclass
class ScriptArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "Executor model; default: the embedded tiny MoE VLM."})
    dataset_name: str | None = field(default=None, metadata={"help": "Dataset with the three splits below (Hub name, or a folder "
                                                                 "written by DatasetDict.save_to_disk); default: the embedded task."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_profile_split: str = field(default="validation", metadata={"help": "Split for the latency profile and the lookup table."})
    dataset_test_split: str = field(default="test", metadata={"help": "Split to evaluate on."})
    question_column: str | None = field(
        default=None, metadata={"help": "Column with the request's text: the same as KnobGRPOConfig's --prompt_column, which is "
                                "honoured too (naming two different columns is an error). Default: the --prompt_column "
                                "('prompt', TRL's) if the dataset has it, else 'question'."})
    answer_column: str = field(default="answer", metadata={"help": "Column with the reference answer."})
    train_samples: int = field(default=1792, metadata={"help": "Training prompts used (each gets num_generations knob tuples; "
                                                       "with the script's num_iterations=2 each batch of them serves two updates)."})
    profile_samples: int = field(default=6, metadata={"help": "Rows of the profile split used to fit the latency profile."})
    profile_configs: int = field(default=16, metadata={"help": "Knob configurations timed for the latency profile (random, with the full and the cheapest)."})
    lookup_samples: int = field(default=48, metadata={"help": "Rows of the profile split the lookup table's static sweep runs on."})
    sweep_configs: int | None = field(default=None, metadata={"help": "Configurations of the evaluation's static sweeps (lookup table, oracle); default: all."})
    eval_samples: int = field(default=96, metadata={"help": "Rows evaluated per budget."})
    budget_penalty: float = field(default=-0.5, metadata={"help": "Reward of a rollout over its budget (whose answer then counts "
                                                          "for nothing): below a wrong answer in time (0)."})
    slack_bonus: float = field(default=0.0, metadata={"help": "Reward for budget left unused (make_budget_reward). With TRL's "
                                                      "per-group scaling, groups that tie in accuracy turn it into full-size "
                                                      "advantages: on the embedded default 0.1 sent every request to the low tier."})
    eval_budgets: list[float] | None = field(default=None, metadata={"help": "Budgets (ms) of the sweep; default: 5, spaced geometrically over the budget range (without train_budget_headroom)."})
    stage2_mode: str = field(default="latency_token", metadata={"help": "'latency_token' or 'prompt'."})
    budget_range_from_profile: bool = field(default=True, metadata={"help": "Set the budget range from the profiled cheapest and full latency."})
    train_budget_headroom: float = field(
        default=1.5, metadata={"help": "With budget_range_from_profile: the controller trains on budgets up to this many times the "
                               "largest budget evaluated, so that the evaluation's largest budget lies inside the trained range, not "
                               "at its edge. Stage 1 learns that a slower tier pays for a question only where the tier fits with "
                               "whatever stage 2 draws; on the embedded default, with the training range ending at the evaluation's "
                               "largest budget, that band was 5% of the draws, and stripes and compare questions stayed on the medium "
                               "tier there in every run."})
    measure_decision_overhead: bool = field(
        default=True, metadata={"help": "Measure what the controller's decision adds to a request and add it to every rollout's latency."})
    overhead_samples: int = field(default=16, metadata={"help": "Rows of the profile split the decision overhead is measured on."})
    latency_margin_from_profile: bool = field(
        default=True, metadata={"help": "Set KnobGRPOConfig.latency_margin to how far the slowest 5% of single timed runs exceed "
                                "the profile's prediction (suggest_latency_margin), so the controller keeps that room "
                                "under each budget."})
    margin_samples: int = field(default=16, metadata={"help": "Rows of the profile split (after the profile's own) timed once "
                                                         "per profiled configuration to measure the latency margin."})
    margin_passes: int = field(default=2, metadata={"help": "Passes over those runs; the margin is the smallest pass's, so a burst "
                                                       "of load from elsewhere during one pass does not set it."})
    latency_scale_from_lookup_runs: bool = field(
        default=True, metadata={"help": "In the evaluation, set the controller's latency_scale (suggest_latency_scale: how much "
                                "slower than in its profile the device runs now) from the runs the lookup table is chosen on, "
                                "so that both choose from the same runs (evaluate_budgets' latency_profile). These runs cover "
                                "every swept configuration, the margin's only the profiled ones; on the embedded default their "
                                "pooled p95 agreed (1.23 and 1.24 times the prediction on one sweep)."})
    answer_probability: bool = field(
        default=True, metadata={"help": "Add the executor's probability of the reference answer to the reward (answer_probability_reward, "
                                "with KnobGRPOConfig.answer_logprobs): exact match gives two configurations that both answer "
                                "a question the same reward, this tells the surer one apart. The script pairs it with "
                                "scale_rewards='none' (parse_args below): no group-spread scaling of the summed rewards."})
    random_executor: bool = field(
        default=False,
        metadata={"help": "Use the embedded architecture with randomly initialised weights: the whole pipeline runs "
                  "(profile, training, evaluation) without pretrained weights, but accuracies are meaningless."},
    )


def explicit(script: ScriptArguments, args: KnobGRPOConfig, *names: str) -> list[str]:
    """The settings among ``names`` given on the command line or in the --config file (``script.given``, set by
    parse_args; without it, those that differ from KnobGRPOConfig's defaults)."""
    given = getattr(script, "given", None)
    defaults = {f.name: f.default for f in dataclasses.fields(KnobGRPOConfig)}
    return [f"--{name} {getattr(args, name)}" for name in names
            if (name in given if given is not None else getattr(args, name) != defaults[name])]


def given_names(argv: list[str]) -> frozenset[str]:
    """Names of the settings in ``argv`` and in its ``--config`` YAML file (a value equal to the default is still given)."""
    names = {a[2:].split("=", 1)[0].replace("-", "_") for a in argv if a.startswith("--")}
    if "--config" in argv:
        import yaml

        with open(argv[argv.index("--config") + 1]) as f:
            names |= set(yaml.safe_load(f) or {})
    return frozenset(names)


def check_settings(script: ScriptArguments, args: KnobGRPOConfig) -> None:
    """Refuse settings the script would otherwise ignore or overwrite, before anything loads."""
    if not (math.isfinite(script.train_budget_headroom) and script.train_budget_headroom >= 1):
        raise ValueError(f"train_budget_headroom={script.train_budget_headroom!r} must be a finite number >= 1 "
                         "(the training range must contain the evaluated one)")
    for flag, names in (("latency_margin_from_profile", ["latency_margin"]), ("measure_decision_overhead", ["decision_overhead_ms"]),
                        ("budget_range_from_profile", ["budget_min_ms", "budget_max_ms"])):
        if getattr(script, flag) and (given := explicit(script, args, *names)):
            raise ValueError(f"{' and '.join(given)}: derived on this device while --{flag} is true; "
                             f"pass --{flag} false to set {'it' if len(given) == 1 else 'them'}")
    if (args.budget_min_ms is None) != (args.budget_max_ms is None):
        raise ValueError(f"--budget_min_ms {args.budget_min_ms} and --budget_max_ms {args.budget_max_ms}: give both ends of the "
                         "budget range, or neither")


def open_splits(script: ScriptArguments) -> list:
    """The dataset's train, profile and test splits (``--dataset_*_split``)."""
    from datasets import Dataset, load_dataset, load_from_disk

    name = script.dataset_name
    saved = any(os.path.isfile(os.path.join(name, f)) for f in ("dataset_dict.json", "state.json"))
    data = load_from_disk(name) if saved else load_dataset(name)
    if isinstance(data, Dataset):
        raise ValueError(f"{name} holds a single Dataset (Dataset.save_to_disk); the script needs train, profile and test splits: "
                         "save a DatasetDict(train=..., validation=..., test=...) instead (--dataset_train_split, "
                         "--dataset_profile_split and --dataset_test_split name them)")
    flags = ("dataset_train_split", "dataset_profile_split", "dataset_test_split")
    for flag in flags:
        if getattr(script, flag) not in data:
            raise ValueError(f"--{flag} {getattr(script, flag)!r}: {name} has no such split; its splits are "
                             f"{', '.join(map(repr, data))} (pass --{flag} with one of them)")
    return [data[getattr(script, flag)] for flag in flags]


def text_column(script: ScriptArguments, args: KnobGRPOConfig, columns: list[str]) -> str:
    """The dataset's text column: --question_column or --prompt_column (see ScriptArguments.question_column)."""
    prompt_given = bool(explicit(script, args, "prompt_column"))
    if script.question_column and prompt_given and script.question_column != args.prompt_column:
        raise ValueError(f"--question_column {script.question_column!r} and --prompt_column {args.prompt_column!r} both name "
                         "the text column; pass one of them")
    text = script.question_column or (args.prompt_column if prompt_given or args.prompt_column in columns else "question")
    if text not in columns:
        raise ValueError(f"text column {text!r} is not in the dataset (its columns: {', '.join(columns)}); "
                         "name it with --question_column or --prompt_column")
    return text


def load_data(script: ScriptArguments, args: KnobGRPOConfig) -> list:
    """The train, profile and test rows, their text, image and answer columns renamed to 'prompt', 'image' and 'answer'
    (what the profile and the evaluation read; args.prompt_column and args.image_column are set to them)."""
    profile_rows = max(script.profile_samples + script.margin_samples, script.overhead_samples, script.lookup_samples)
    counts = (script.train_samples, profile_rows, script.eval_samples)
    if script.dataset_name is None:
        from knob_grpo.embedded import make_task_dataset

        splits = [make_task_dataset(split, n) for split, n in zip(("train", "validation", "test"), counts)]
    else:
        splits = [split.select(range(min(n, len(split)))) for split, n in zip(open_splits(script), counts)]
    text = text_column(script, args, splits[0].column_names)
    if script.answer_column not in splits[0].column_names:  # the rewards and the evaluation score against it
        raise ValueError(f"--answer_column {script.answer_column!r} is not in the dataset (its columns: "
                         f"{', '.join(splits[0].column_names)})")
    if explicit(script, args, "image_column") and args.image_column not in splits[0].column_names:  # else: text-only, silently
        raise ValueError(f"--image_column {args.image_column!r} is not in the dataset (its columns: "
                         f"{', '.join(splits[0].column_names)})")
    rename = {text: "prompt", args.image_column or "image": "image", script.answer_column: "answer"}
    args.prompt_column, args.image_column = "prompt", "image"

    def renamed(split):  # a column already named like a target (say, an unused 'prompt') makes way
        moves = {k: v for k, v in rename.items() if k != v and k in split.column_names}
        return split.remove_columns([v for v in moves.values() if v in split.column_names]).rename_columns(moves)

    return [renamed(split) for split in splits]


def new_controller(executor: AdaptiveModel, script: ScriptArguments, args: KnobGRPOConfig) -> TwoStageController:
    """A new controller for the executor, over args' budget range (unset: the controller's default)."""
    budget_range = (args.budget_min_ms, args.budget_max_ms)
    return TwoStageController.for_executor(executor, stage2_mode=script.stage2_mode,
                                           **({} if None in budget_range else {"budget_range": budget_range}))


def main(script: ScriptArguments, args: KnobGRPOConfig) -> None:
    check_settings(script, args)
    # the other processes wait while the main one profiles and evaluates: --ddp_timeout (TrainingArguments') bounds
    # that wait, as it would in the Trainer, which finds the process group already set up here
    state = PartialState(timeout=args.ddp_timeout_delta)
    train, profile_data, test = load_data(script, args)
    if script.random_executor:
        from knob_grpo.embedded import TIER_PIXELS, build_model, build_processor, knob_space

        executor = AdaptiveModel(build_model(seed=args.seed), build_processor(), knob_space=knob_space(),
                                 tier_pixels=dict(TIER_PIXELS), name_or_path="knob_grpo/embedded (random weights)")
    elif script.model_name_or_path is None:
        from knob_grpo.embedded import load_embedded_adaptive

        executor = load_embedded_adaptive()
    else:
        executor = AdaptiveModel.from_pretrained(script.model_name_or_path)

    # 1. a latency profile of this device: noise-free rewards, and rollouts may share work
    # (measured once, on the main process, and shared: every process must reward with the same profile)
    shared = [None, None, None, None]
    if state.is_main_process:
        records = profile_executor(executor, list(profile_data)[: script.profile_samples], configs=script.profile_configs, repeats=2)
        profile, report = fit_profile(executor, records=records)
        margin = None
        if script.latency_margin_from_profile:  # single runs on other rows, as the evaluation times them
            rows = list(profile_data)[script.profile_samples: script.profile_samples + script.margin_samples]
            if not rows:
                raise ValueError(f"the profile split has {len(profile_data)} rows, all used by the profile (profile_samples="
                                 f"{script.profile_samples}): the latency margin needs others (or --latency_margin_from_profile false)")
            passes = [profile_executor(executor, rows, configs=script.profile_configs, repeats=1, seed=1) for _ in range(script.margin_passes)]
            margin = suggest_latency_margin(profile, passes, args.latency_target)
        shared = [records, profile, report, margin]
    broadcast_object_list(shared)
    records, profile, report, margin = shared
    if state.is_main_process:
        print(f"latency profile: held-out median error {report['ttft_mdape_pct']:.1f}% (time to first token), "
              f"{report['end_to_end_mdape_pct']:.1f}% (end to end)")
    if margin is not None:
        if margin >= 1:
            raise ValueError(f"5% of single runs exceed the profile's prediction by {margin:.0%} or more; a latency margin "
                             "must be below 100% (profile on a quieter machine, or pass --latency_margin_from_profile false)")
        args.latency_margin = round(margin, 3)

    # the controller's own decision time is part of every request's latency: rollouts add it
    if script.measure_decision_overhead:
        overhead_rows = list(profile_data.select(range(min(script.overhead_samples, len(profile_data)))))
        overhead = [measure_decision_overhead(executor, new_controller(executor, script, args), overhead_rows)
                    if state.is_main_process else None]
        broadcast_object_list(overhead)
        args.decision_overhead_ms = round(overhead[0], 2)
    eval_range = (args.budget_min_ms, args.budget_max_ms)
    if script.budget_range_from_profile and records:
        eval_range = suggest_budget_range(records, args.latency_target, args.decision_overhead_ms, latency_margin=args.latency_margin)
        args.budget_min_ms, args.budget_max_ms = eval_range[0], round(eval_range[1] * script.train_budget_headroom, 1)
    elif None in eval_range:  # unset: the controller's own (default) range
        eval_range = (ControllerConfig.budget_min_ms, ControllerConfig.budget_max_ms)
    if state.is_main_process:
        print(f"decision overhead {args.decision_overhead_ms:.2f} ms; latency margin {args.latency_margin:.3f}; "
              f"budget range {eval_range[0]}-{eval_range[1]} ms (training to {args.budget_max_ms or eval_range[1]} ms)")

    # 2. GRPO over knob tuples
    torch.manual_seed(args.seed)
    controller = new_controller(executor, script, args)
    rewards = [within_budget(exact_match_reward), make_budget_reward(penalty=script.budget_penalty, slack_bonus=script.slack_bonus)]
    if script.answer_probability:
        args.answer_logprobs = True
        rewards.append(within_budget(answer_probability_reward))
    trainer = KnobGRPOTrainer(controller, executor, rewards, args=args,
                              train_dataset=train, latency_profile=profile)
    trainer.train()

    # 3. the budget sweep, with measured latency, against the lookup table, the best static configuration, the full model and the oracle
    lo, hi = eval_range
    budgets = script.eval_budgets or [round(lo * (hi / lo) ** (i / 4), 1) for i in range(5)]
    if state.is_main_process:
        lookup_data = profile_data.select(range(min(script.lookup_samples, len(profile_data))))
        calibration = dict(latency_profile=profile, latency_margin=args.latency_margin) if script.latency_scale_from_lookup_runs else {}
        result = evaluate_budgets(executor, controller, test, budgets, profile_dataset=lookup_data, configs=script.sweep_configs,
                                  max_new_tokens=args.max_completion_length, latency_target=args.latency_target,
                                  output_dir=args.output_dir, **calibration)
        print(result.to_markdown())
        trainer.evaluation_markdown = result.to_markdown()
    state.wait_for_everyone()  # the other processes wait here: one leaving early tears down the process group
    trainer.save_model(args.output_dir)
    trainer.create_model_card(model_name=os.path.basename(os.path.normpath(args.output_dir)))
    if args.push_to_hub:
        trainer.push_to_hub(dataset_name=script.dataset_name or "knob_grpo embedded task")
    state.wait_for_everyone()
    state.destroy_process_group()


def parse_args(argv: list[str] | None = None) -> tuple[ScriptArguments, KnobGRPOConfig]:
    """The script's and the trainer's arguments, from the command line (or ``argv``) and ``--config``."""
    parser = TrlParser((ScriptArguments, KnobGRPOConfig))
    # Rewards centred on the group mean but not divided by its spread: with the dense answer reward, TRL's
    # per-group scaling blew differences of a few thousandths between low-tier configurations up to full-size
    # advantages, and the controller chased them to the edge of the smallest budget (late in 38-67% of requests)
    # Each decision credited with what it earns when the decisions after it are taken greedily: with every
    # decision sharing the sampled tuple's advantage, a tier that fits only with the fewest blocks paid for
    # stage 2's other draws, and pattern questions reached the high tier 4-7 ms above where it fits; with
    # the tier paying for p's draws, stripes and compare questions, which the high tier fits at 48-56 ms
    # only with p = 1, reached it from 60-64 ms. The extra greedy executions are paid for by groups of 6
    # instead of 8 (12 rows per step: still 2 prompts). The exploration floor keeps the high tier drawn
    # where stage 1 has given it up, so that p and stage 2 after it keep learning what fits there.
    # Each batch of rollouts serves two updates, on half as many prompts: as many updates in about half
    # the training time (the main job took 14:16-16:01 before, 10:24-10:39 since; on one saved profile
    # -0.005 to -0.010 on average over two seeds, docs/embedded_default.md).
    parser.set_defaults_with_config(scale_rewards="none", stage1_credit="greedy_rest", stage1_exploration=0.1, num_generations=6,
                                    per_device_train_batch_size=12, num_iterations=2)
    argv = sys.argv[1:] if argv is None else list(argv)
    script, args = parser.parse_args_and_config(args=argv)
    script.given = given_names(argv)  # what the user set, for explicit()
    return script, args


if __name__ == "__main__":
    main(*parse_args())
