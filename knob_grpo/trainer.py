"""``KnobGRPOTrainer``: GRPO whose "completions" are knob tuples sampled from the two-stage controller.

One generation batch, top to bottom (:meth:`KnobGRPOTrainer._generate_and_score_completions`):

    prompt -> language feature + budget -> stage 1 (tier, p) -> [partial forward to p -> latency token]
           -> stage 2 (top_k, num_active_blocks) -> execute on the frozen executor -> latency
           -> TRL reward functions -> group-relative advantages

With a latency profile, rollouts in latency-token mode are fused: one partial forward per request
and tier serves every row's latency token, and the tuples drawn for that request and tier continue
from it in one batched generate, each row with its own knobs (``AdaptiveModel.generate_rows``).
The loss (:meth:`KnobGRPOTrainer._compute_loss`) is a PPO-style clipped policy gradient over
the per-decision log-probabilities. By default every decision of a tuple gets the tuple's advantage,
as every token of a GRPO completion does; with ``stage1_credit="greedy_stage2"`` each row also runs
the tuple stage 2 would pick greedily after its (tier, p), stage 1 is credited with that tuple's
reward against its group's mean and stage 2 with its own draw's reward against that tuple's; with
``"greedy_rest"`` the tier is credited with the greedy ``p`` after it (then stage 2 greedily) and
``p`` with its own greedy stage-2 tuple against that. ``stage1_exploration`` mixes a uniform floor
into stage 1's draws (and the loss weighs them by policy / mixture).
Everything else (the repeat sampler that puts each prompt's G rows together, buffering for
``num_iterations > 1``, logging, checkpoints, ``push_to_hub``) is TRL's and transformers' own.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import os
import zlib
from collections import defaultdict
from typing import Any, Callable, Sequence

import numpy as np
import torch
from accelerate.utils import gather_object
from trl import GRPOTrainer
from trl.trainer.callbacks import SyncRefModelCallback
from trl.trainer.utils import nanstd

from .adaptive import AdaptiveModel, PrefixState
from .config import KnobGRPOConfig
from .controller import TwoStageController, _entropy, prompt_features
from .knobs import KNOB_NAMES, Knobs
from .latency import LatencyMeter, LatencyProfile
from .profiling import load_profile_for
from .rewards import _references


class RewardFunctionError(RuntimeError):
    """A reward function raised; the message names it."""


def _named_reward(func: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a reward function so that an exception inside it names the function."""
    name = getattr(func, "__name__", type(func).__name__)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except Exception as error:
            raise RewardFunctionError(f"reward function '{name}' raised {type(error).__name__}: {error}") from error

    functools.update_wrapper(wrapped, func, assigned=("__doc__", "__module__", "__qualname__"), updated=())
    wrapped.__name__ = name
    return wrapped


def _image_key(image: Any) -> Any:
    """Identity of an image's content (rows of one request carry equal but separate image objects)."""
    if image is None:
        return None
    tobytes = getattr(image, "tobytes", None)
    return zlib.crc32(tobytes()) if tobytes is not None else id(image)


LATENCY_PROFILE_FILE = "latency_profile.json"  # next to a saved controller: the profile its rewards used


def _check_unscaled(controller: TwoStageController) -> None:
    """Rollouts and rewards compare the profile's latency with the budgets themselves: a
    :attr:`TwoStageController.latency_scale` (for serving on a device of another speed) would make
    the policy read budgets the rewards do not use."""
    if controller.latency_scale != 1.0:
        raise ValueError(f"the controller has latency_scale={controller.latency_scale}; it is for serving a trained controller "
                         "on a device of another speed. Train with latency_scale=1 (set it after training)")


def _answer_logprob(step_logits: Sequence[torch.Tensor], completion: list[int], references: list[list[int]]) -> float:
    """Log-probability of the likeliest reference answer, read off one greedy generate's logits.

    Each reference's tokens are scored while the completion agrees with them, up to and including
    the first token where it departs: the conditioning is then the reference's own prefix, so the
    sum is exactly log p(reference[:j+1]) for that first departure j (the whole reference when the
    completion starts with it, and for a one-token answer its log-probability).
    """
    log_probs: dict[int, torch.Tensor] = {}  # per step, computed once for all references
    best = -math.inf
    for reference in references:
        total = 0.0
        for t, token in enumerate(reference[: len(step_logits)]):
            if t not in log_probs:
                log_probs[t] = torch.log_softmax(step_logits[t].float(), dim=-1)
            total += log_probs[t][token].item()
            if t >= len(completion) or completion[t] != token:
                break
        best = max(best, total)
    return best


def _sequences_and_logits(output: Any) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """``generate``'s token ids, and its per-step logits when it returned them."""
    if isinstance(output, torch.Tensor):
        return output, None
    return output.sequences, output.logits


def _check_budget_range(args: KnobGRPOConfig, controller: TwoStageController) -> tuple[float, float]:
    """The range budgets are drawn from: the controller's. A config range that differs is refused:
    budgets drawn outside the range the controller encodes would be clamped to its ends."""
    own = tuple(float(v) for v in controller.config.budget_range)
    given = (args.budget_min_ms, args.budget_max_ms)
    if any(v is not None and float(v) != o for v, o in zip(given, own)):
        raise ValueError(f"budget_min_ms, budget_max_ms = ({given[0]}, {given[1]}) ms differ from the controller's budget_range "
                         f"({own[0]:g}, {own[1]:g}) ms (budgets outside it all read as its ends); leave them unset (None: the "
                         "controller's range) or set them to it")
    return own  # not written into args: one config may serve trainers of controllers with other ranges


def _check_columns(args: KnobGRPOConfig, datasets: dict[str, Any]) -> None:
    """The columns the trainer reads exist, checked before the first step. The image and budget
    columns may be absent (no image; drawn budgets) only under their default names: a name the user
    set that is missing is a typo, not "absent"."""
    settings = [("prompt_column", args.prompt_column)]
    if args.image_column not in (None, "image"):
        settings.append(("image_column", args.image_column))
    if args.budget_column not in (None, "budget"):
        settings.append(("budget_column", args.budget_column))
    for split, dataset in datasets.items():
        columns = getattr(dataset, "column_names", None)
        if columns is None:  # not a datasets.Dataset, or an iterable one of unknown columns
            continue
        for name, column in settings:
            if column not in columns:
                raise ValueError(f"{name}={column!r}: {split} has no column {column!r}; its columns: {', '.join(map(repr, columns))}")


def _log_softmax(logits: torch.Tensor) -> torch.Tensor:
    # masked options hold -inf; log_softmax keeps them at -inf and the others finite
    return torch.log_softmax(logits.float(), dim=-1)


class KnobGRPOTrainer(GRPOTrainer):
    """Train a :class:`~knob_grpo.TwoStageController` with GRPO against a frozen executor.

    Args:
        model: the controller (the policy; the only thing the optimiser, DDP, checkpoints and the
            Hub see).
        executor: the frozen :class:`~knob_grpo.AdaptiveModel` that runs each sampled tuple.
        reward_funcs: TRL-signature reward functions (``knob_grpo.rewards``); besides the dataset
            columns they receive ``knobs`` (a dict per row), ``latency_ms`` and ``budget_ms``, and
            with ``args.answer_logprobs`` also ``answer_logprob``.
        args: a :class:`KnobGRPOConfig`.
        train_dataset / eval_dataset: rows with ``args.prompt_column`` (and ``args.image_column``,
            an optional ``args.budget_column`` and whatever the reward functions read).
        latency_profile: a fitted :class:`~knob_grpo.latency.LatencyProfile`; overrides
            ``args.latency_source``.
    """

    _tag_names = ["trl", "grpo", "knob-grpo"]
    _name = "KnobGRPO"

    def __init__(
        self,
        model: TwoStageController,
        executor: AdaptiveModel,
        reward_funcs: Callable[..., Any] | Sequence[Callable[..., Any]],
        args: KnobGRPOConfig | None = None,
        train_dataset: Any = None,
        eval_dataset: Any = None,
        callbacks: list | None = None,
        optimizers: tuple = (None, None),
        latency_profile: LatencyProfile | None = None,
    ) -> None:
        if not isinstance(model, TwoStageController):
            raise TypeError(f"model must be a TwoStageController (the policy), got {type(model).__name__}")
        if not isinstance(executor, AdaptiveModel):
            raise TypeError(f"executor must be an AdaptiveModel, got {type(executor).__name__}")
        args = args if args is not None else KnobGRPOConfig(output_dir="knob-grpo-controller")
        if not isinstance(args, KnobGRPOConfig):
            raise TypeError("args must be a KnobGRPOConfig")
        model.check_executor(executor)
        _check_unscaled(model)
        self.budget_range = _check_budget_range(args, model)
        evals = eval_dataset if isinstance(eval_dataset, dict) else {"": eval_dataset}
        _check_columns(args, {"train_dataset": train_dataset,
                              **{f"eval_dataset[{k!r}]" if k else "eval_dataset": d for k, d in evals.items() if d is not None}})
        funcs = [reward_funcs] if callable(reward_funcs) else list(reward_funcs)
        if not funcs:
            raise ValueError("KnobGRPOTrainer needs at least one reward function")
        beta = args.beta
        if beta < 0:
            raise ValueError(f"beta={beta} must be >= 0")
        # TRL would rebuild a reference policy from the config's name; ours is a frozen copy, taken
        # before TRL wraps the controller's forward (a copy taken after would call the live weights).
        ref_model = copy.deepcopy(model).eval().requires_grad_(False) if beta > 0 else None
        sync_ref_model = args.sync_ref_model
        if sync_ref_model and beta == 0:
            raise ValueError("sync_ref_model=True needs beta > 0: with beta=0 there is no reference controller to move")
        args.beta, args.sync_ref_model = 0.0, False  # TRL would look for its own reference model
        try:
            super().__init__(
                model=model,
                reward_funcs=[_named_reward(f) for f in funcs],
                args=args,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=executor.tokenizer,
                callbacks=callbacks,
                optimizers=optimizers,
            )
        finally:
            args.beta, args.sync_ref_model = beta, sync_ref_model
        self.beta = beta
        self.ref_model = ref_model.to(self.accelerator.device) if ref_model is not None else None
        if sync_ref_model:  # TRL's soft update of the reference toward the policy, on our frozen copy
            self.add_callback(SyncRefModelCallback(ref_model=self.ref_model, accelerator=self.accelerator))
        self.executor = executor  # not a submodule: DDP, the optimiser and checkpoints see the controller only
        self.knob_space = executor.knob_space

        if latency_profile is None and args.latency_source != "measured":
            latency_profile = load_profile_for(executor, args.latency_source)  # this executor on the device it runs on
        self.latency_profile = latency_profile
        self.fused_rollouts = model.stage2_mode == "latency_token" and (
            args.rollout_mode == "fused" or (args.rollout_mode == "auto" and latency_profile is not None)
        )
        if args.rollout_mode == "fused" and latency_profile is None:
            raise ValueError("rollout_mode='fused' needs a latency profile (latency_profile=... or latency_source=PATH)")
        self.executor_generation_kwargs = {"do_sample": False, **(args.executor_generation_kwargs or {})}
        # the first answer-quality reward is logged as "accuracy" (a within_budget one counts late rows as 0)
        names = [n for n in self.reward_func_names if "budget" not in n or n.endswith("_within_budget")]
        self.accuracy_reward_name = names[0] if names else None

    # ------------------------------------------------------------------ data
    def _set_signature_columns_if_needed(self) -> None:
        # remove_unused_columns=True keeps only these: the columns the trainer reads, and those the
        # package's rewards and answer_logprobs read (TRL's list, prompt/image/images, would drop the
        # budget column, and with it every budget, without a word). As in TRL, a reward function that
        # reads other columns needs remove_unused_columns=False (the default).
        if self._signature_columns is None:
            args = self.args
            self._signature_columns = [c for c in (args.prompt_column, args.image_column, args.budget_column, "answer", "choices") if c]

    def _prompt_text(self, row: dict[str, Any]) -> str:
        prompt = row[self.args.prompt_column]
        if not isinstance(prompt, str):  # str() of a list of chat messages would be its Python repr
            raise ValueError(f"prompt_column={self.args.prompt_column!r} holds a {type(prompt).__name__} ({str(prompt)[:80]}); "
                             "KnobGRPOTrainer takes plain-text prompts: the executor applies its own chat template to the text")
        return prompt

    # ------------------------------------------------------------------ budgets
    def _budget_for(self, row: dict[str, Any]) -> float:
        """The row's budget: its column, or a draw that every member of its group gets alike."""
        column = self.args.budget_column
        if column in row and row[column] is not None:
            try:
                if isinstance(row[column], (bool, np.bool_)):  # float(True) would be a 1 ms budget
                    raise TypeError
                budget = float(row[column])
            except (TypeError, ValueError):
                raise ValueError(f"budget {row[column]!r} in column '{column}' is not a number of ms") from None
            if not math.isfinite(budget) or budget <= 0:
                raise ValueError(f"budget {row[column]!r} in column '{column}' must be a finite number of ms > 0")
            return budget
        # A function of the prompt and the step only: rows of one group agree across processes.
        key = repr(row.get(self.args.prompt_column)) + repr(row.get("answer"))
        seed = zlib.crc32(key.encode()) ^ (self.state.global_step * 2654435761 + self.args.seed) & 0xFFFFFFFF
        u = torch.rand(1, generator=torch.Generator().manual_seed(seed)).item()
        lo, hi = self.budget_range
        if self.args.budget_sampling == "log_uniform":  # rounding must not put a draw below the range (cheapest there)
            return min(hi, max(lo, math.exp(math.log(lo) + u * (math.log(hi) - math.log(lo)))))
        return lo + u * (hi - lo)

    # ------------------------------------------------------------------ executing one tuple
    def _generation_kwargs(self) -> dict[str, Any]:
        kwargs = dict(self.executor_generation_kwargs, max_new_tokens=self.args.max_completion_length)
        if self.args.answer_logprobs:
            kwargs.update(output_logits=True, return_dict_in_generate=True)
        return kwargs

    def _reference_ids(self, answer: Any) -> list[list[int]] | None:
        """Token ids of each acceptable answer, the same answers exact match compares against
        (``None`` for a row without one)."""
        texts = _references(answer) if answer is not None else []
        if not texts:
            return None
        ids = []
        for text in texts:
            tokens = self.processing_class(text, add_special_tokens=False)["input_ids"]
            if not tokens:
                raise ValueError(f"answer {text!r} has no tokens: answer_logprobs cannot score it")
            ids.append(list(tokens))
        return ids

    def _execute(self, prompt: str, image: Any, knobs: Knobs, prefix: PrefixState | None,
                 references: list[list[int]] | None = None) -> tuple[list[int], float, float | None]:
        """Run one configuration; returns the completion's token ids, its latency in ms (plus the
        configured decision overhead, so the reward sees what a request would) and, with
        ``answer_logprobs``, the reference answer's log-probability (else ``None``)."""
        executor, args = self.executor, self.args
        gen_kwargs = self._generation_kwargs()
        knob_kwargs = {k: v for k, v in knobs.as_dict().items() if k != "tier" and v is not None}
        measured = None
        if prefix is not None and self.fused_rollouts:
            inputs = prefix.inputs
            output = executor.generate(prefix=prefix, **knob_kwargs, **gen_kwargs)
        else:
            images = [image] if image is not None else None
            inputs = executor.prepare_inputs(prompt, images, tier=knobs.tier if images is not None else None)
            if self.latency_profile is None:  # measured: this configuration alone, wall clock
                meter = LatencyMeter(warmup=0, repeats=1, budget_target=args.latency_target)
                measured = meter.measure(lambda streamer: executor.generate(**inputs, **knob_kwargs, streamer=streamer, **gen_kwargs))
                output = meter.last_output
            else:
                output = executor.generate(**inputs, **knob_kwargs, **gen_kwargs)
        sequences, logits = _sequences_and_logits(output)
        completion = sequences[0, inputs["input_ids"].shape[1]:].tolist()
        if measured is not None:
            latency = float(measured.for_target(args.latency_target)) + args.decision_overhead_ms
        else:
            latency = self._profile_latency(inputs, knobs, completion)
        score = None
        if logits is not None and references is not None:
            score = _answer_logprob([step[0] for step in logits], completion, references)
        return completion, latency, score

    def _execute_rows(self, prefix: PrefixState, tuples: list[Knobs],
                      references: Sequence[list[list[int]] | None] | None = None) -> list[tuple[list[int], float, float | None]]:
        """Run several configurations continued from one prefix as one batched generate (same tokens
        and answer log-probabilities as :meth:`_execute` on each; a row that ends early is cut after
        its end-of-sequence token)."""
        gen_kwargs = self._generation_kwargs()
        # the prefix holds the tier (None for a row without an image, whatever tier was drawn), as in _execute
        rows = [dataclasses.replace(knobs, tier=None) for knobs in tuples]
        sequences, logits = _sequences_and_logits(self.executor.generate_rows(prefix, rows, **gen_kwargs))
        eos = gen_kwargs.get("eos_token_id", self.executor.model.generation_config.eos_token_id)
        eos = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
        prompt_length = prefix.inputs["input_ids"].shape[1]
        results = []
        for r, (row, knobs) in enumerate(zip(sequences[:, prompt_length:].tolist(), tuples)):
            ends = [j for j, token in enumerate(row) if token in eos]
            completion = row[: ends[0] + 1] if ends else row
            score = None
            if logits is not None and references is not None and references[r] is not None:
                score = _answer_logprob([step[r] for step in logits], completion, references[r])
            results.append((completion, self._profile_latency(prefix.inputs, knobs, completion), score))
        return results

    def _profile_latency(self, inputs: dict[str, Any], knobs: Knobs, completion: list[int]) -> float:
        """The profile's latency of ``knobs`` on these prompt inputs, with the configured margin, plus
        the decision overhead."""
        vision = self.executor.num_vision_tokens(inputs)
        prompt_length = inputs["input_ids"].shape[1]
        features = dict(
            vision_tokens=vision,
            text_tokens=prompt_length - vision,
            num_active_blocks=knobs.num_active_blocks,
            top_k=knobs.top_k,
            insertion_position=knobs.insertion_position,
            default_top_k=self.executor.default_top_k,
            output_tokens=max(1, len(completion)),
        )
        latency = self.latency_profile.predict_for_target(features, self.args.latency_target)
        return float(latency) * (1 + self.args.latency_margin) + self.args.decision_overhead_ms

    # ------------------------------------------------------------------ training and saving
    def train(self, *args: Any, **kwargs: Any) -> Any:
        _check_unscaled(self.accelerator.unwrap_model(self.model))  # also when set after the trainer was built
        return super().train(*args, **kwargs)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        if self.latency_profile is not None:  # where the controller is served, suggest_latency_scale needs it
            self.latency_profile.save(os.path.join(output_dir or self.args.output_dir, LATENCY_PROFILE_FILE))

    # ------------------------------------------------------------------ one generation batch
    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        args, executor = self.args, self.executor
        mode = "train" if self.model.training else "eval"
        device = self.accelerator.device
        controller: TwoStageController = self.accelerator.unwrap_model(self.model)

        # prompt -> features
        prompts = [self._prompt_text(row) for row in inputs]
        images = [row.get(args.image_column) for row in inputs] if args.image_column else [None] * len(inputs)
        budgets = [self._budget_for(row) for row in inputs]
        language = prompt_features(executor, prompts).to(device)

        # features -> knobs (stage 1, the partial forward when stage 2 reads the latency token, stage 2)
        states: dict[Any, PrefixState] = {}  # fused: one prefill per request and tier; naive: one per row
        row_prefix: dict[int, PrefixState] = {}  # the prefill each row's tuples continue from
        greedy_positions: list[int] = []  # stage1_credit="greedy_rest": the greedy p after each row's tier

        def group_key(i: int, tier: Any) -> Any:
            # a row without an image runs no tier: its tuples share one prefill whatever tier they drew
            return (prompts[i], _image_key(images[i]), tier if images[i] is not None else None) if self.fused_rollouts else i

        def latency_token_fn(tiers: list, positions: list) -> torch.Tensor:
            # Fused: rows of one request that share a tier share one prefill, run to the largest p
            # among them (and among the greedy p after their tier); each reads its latency token at
            # its own p and later continues from there. Naive: one partial forward per row (and a
            # full generate per row afterwards).
            if args.stage1_credit == "greedy_rest":
                greedy_positions[:] = controller.decide_insertion_position(language, budgets, tiers)
            deepest: dict[Any, int] = {}
            for i, (tier, p) in enumerate(zip(tiers, positions)):
                key = group_key(i, tier)
                deepest[key] = max(deepest.get(key, 0), p, greedy_positions[i] if greedy_positions else 0)
            for i, tier in enumerate(tiers):
                key = group_key(i, tier)
                if key not in states:
                    image = [images[i]] if images[i] is not None else None
                    states[key] = executor.prefill(prompts[i], image, tier=tier if image is not None else None, insertion_position=deepest[key])
                row_prefix[i] = states[key]
            return torch.stack([row_prefix[i].latency_token(p)[0] for i, p in enumerate(positions)]).to(device)

        use_tokens = controller.stage2_mode == "latency_token"
        sample = controller.sample(language, budgets, latency_token_fn=latency_token_fn if use_tokens else None,
                                   temperature=self.temperature,
                                   stage1_exploration=args.stage1_exploration if mode == "train" else 0.0)
        # stage1_credit: also run what stage 2 would pick greedily after each row's (tier, p)
        # ("greedy_stage2"), and after each row's tier the greedy p, then stage 2 greedily ("greedy_rest")
        greedy: list[Knobs] = []
        rest: list[Knobs] = []
        if args.stage1_credit in ("greedy_stage2", "greedy_rest"):
            greedy = controller.decide_stage2(language, budgets, sample.knobs, latency_tokens=sample.latency_tokens)
        if args.stage1_credit == "greedy_rest":
            positions = greedy_positions or controller.decide_insertion_position(language, budgets, [k.tier for k in sample.knobs])
            rest = list(greedy)
            other = [i for i, (k, p) in enumerate(zip(sample.knobs, positions)) if p != k.insertion_position]
            if other:
                stage1 = [Knobs(tier=sample.knobs[i].tier, insertion_position=positions[i]) for i in other]
                tokens = None
                if use_tokens:  # the row's prefill reaches the greedy p: latency_token_fn ran it that far
                    tokens = torch.stack([row_prefix[i].latency_token(k.insertion_position)[0] for i, k in zip(other, stage1)]).to(device)
                decided = controller.decide_stage2(language[other], [budgets[i] for i in other], stage1, latency_tokens=tokens)
                for i, knobs in zip(other, decided):
                    rest[i] = knobs

        # knobs -> execution -> latency
        # One job per row (its sampled tuple), then one per row for each greedy tuple asked for.
        # With a profile and greedy decoding, jobs of one request with the same tuple give the same
        # tokens and the same latency: run each distinct (request, tuple) once. (Measured latency
        # times every job alone, and sampling gives each its own draw.) Fused and greedy, the
        # distinct tuples continued from one prefix run as one batch.
        jobs = list(enumerate(sample.knobs)) + list(enumerate(greedy)) + list(enumerate(rest))  # (row, tuple)
        prefixes = [row_prefix.get(i) for i, _ in jobs]  # per job
        reuse = self.latency_profile is not None and not self.executor_generation_kwargs.get("do_sample", False)
        answers = [repr(row.get("answer")) if args.answer_logprobs else None for row in inputs]  # scored rows differ by answer too
        keys = [(prompts[i], _image_key(images[i]), knobs, answers[i]) if reuse else j for j, (i, knobs) in enumerate(jobs)]
        first_job: dict[Any, int] = {}
        for j, key in enumerate(keys):
            first_job.setdefault(key, j)
        # tokenised once per executed (request, tuple), not per row
        references = {j: self._reference_ids(inputs[jobs[j][0]].get("answer")) if args.answer_logprobs else None for j in first_job.values()}
        done: dict[Any, tuple[list[int], float, float | None]] = {}
        calls = 0
        if reuse and self.fused_rollouts and args.batch_rollouts:
            by_prefix: dict[int, list[Any]] = {}
            for key, j in first_job.items():
                by_prefix.setdefault(id(prefixes[j]), []).append(key)
            for batch in by_prefix.values():
                prefix = prefixes[first_job[batch[0]]]
                batch_jobs = [first_job[key] for key in batch]
                done.update(zip(batch, self._execute_rows(prefix, [jobs[j][1] for j in batch_jobs], [references[j] for j in batch_jobs])))
                calls += 1
        for key, j in first_job.items():
            if key not in done:
                i, knobs = jobs[j]
                done[key] = self._execute(prompts[i], images[i], knobs, prefixes[j], references[j])
                calls += 1
        self._metrics[mode]["executions_per_row"].append(len(done) / len(sample.knobs))
        self._metrics[mode]["generate_calls_per_row"].append(calls / len(sample.knobs))

        # execution -> reward (TRL's machinery; reward functions see the knobs and the latency)
        def score(rows: list[dict[str, Any]], job_keys: list[Any], tuples: list[Knobs]) -> tuple[list[str], torch.Tensor]:
            completion_ids = [list(done[key][0]) for key in job_keys]
            completions = [c.strip() for c in self.processing_class.batch_decode(completion_ids, skip_special_tokens=True)]
            for row, key, knobs, budget in zip(rows, job_keys, tuples, budgets):
                _, latency, logprob = done[key]
                row.update(knobs=knobs.as_dict(), latency_ms=latency, budget_ms=budget)
                if args.answer_logprobs:
                    row["answer_logprob"] = logprob
            return completions, self._calculate_rewards(rows, prompts, completions, completion_ids)  # gathered

        def score_quietly(job_keys: list[Any], tuples: list[Knobs]) -> torch.Tensor:
            # what reward functions log (log_extra, log_metric) for the greedy runs is dropped: the
            # table has the sampled rows
            logged = self._pending_extra_logs, self._pending_metrics
            self._pending_extra_logs, self._pending_metrics = defaultdict(list), defaultdict(list)
            try:
                return score([dict(row) for row in inputs], job_keys, tuples)[1]
            finally:
                self._pending_extra_logs, self._pending_metrics = logged

        n = len(inputs)
        completions, rewards_per_func = score(inputs, keys[:n], sample.knobs)
        greedy_rewards_per_func = score_quietly(keys[n: 2 * n], greedy) if greedy else None
        rest_rewards_per_func = score_quietly(keys[2 * n:], rest) if rest else None
        latencies = [done[key][1] for key in keys[:n]]

        # reward -> group-relative advantage (per decision with stage1_credit other than "sampled")
        advantages, rewards = self._advantages(rewards_per_func, mode, greedy_rewards_per_func, rest_rewards_per_func)
        process_slice = slice(self.accelerator.process_index * len(prompts), (self.accelerator.process_index + 1) * len(prompts))

        self._log_generation(mode, prompts, completions, rewards_per_func, rewards, advantages, sample.knobs, latencies, budgets)

        knob_index = torch.stack([sample.indices[name] for name in KNOB_NAMES], dim=1).to(device)
        old_log_probs = torch.stack([sample.log_probs[name] for name in KNOB_NAMES], dim=1).to(device)
        output = {
            "language": language,
            "budgets": torch.tensor(budgets, dtype=torch.float32, device=device),
            "knob_index": knob_index,
            "old_log_probs": old_log_probs.detach(),
            "advantages": advantages[process_slice],
        }
        if use_tokens:
            output["latency_tokens"] = sample.latency_tokens.to(device)
        return output

    def _advantages(self, rewards_per_func: torch.Tensor, mode: str, greedy_rewards_per_func: torch.Tensor | None = None,
                    rest_rewards_per_func: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Weighted sum of the reward functions, centred on the group mean and scaled per ``scale_rewards``.

        Returns ``(advantages, rewards)``; ``advantages`` is ``(N,)``, one per tuple, or, given the
        rewards of the greedy stage-2 tuples (``stage1_credit="greedy_stage2"``), ``(N, 4)`` per
        decision: stage 1's two get the greedy tuple's reward against its group's mean, stage 2's
        the sampled tuple's reward against the greedy one's. Given also the rewards of the tuples
        with the greedy ``p`` after each row's tier (``"greedy_rest"``), the tier gets those against
        their group's mean and ``p`` the greedy stage-2 tuple's reward against them. All are divided
        by the same spread, that of all these rewards (the group's, or the batch's).
        """
        num_generations = self.num_generations if mode == "train" else self.num_generations_eval

        def weighted(per_func: torch.Tensor) -> torch.Tensor:
            total = (per_func * self.reward_weights.to(per_func.device).unsqueeze(0)).nansum(dim=1)
            total[torch.isnan(per_func).all(dim=1)] = torch.nan  # a row every function declined: out of the baseline, advantage 0
            return total

        def centred(values: torch.Tensor) -> torch.Tensor:
            return values - torch.nanmean(values.view(-1, num_generations), dim=1).repeat_interleave(num_generations)

        rewards = weighted(rewards_per_func)
        values = [rewards] + [weighted(r) for r in (greedy_rewards_per_func, rest_rewards_per_func) if r is not None]
        if len(values) == 1:
            advantages = centred(rewards)
        elif len(values) == 2:
            stage1_value = values[1]
            stage1, stage2 = centred(stage1_value), rewards - stage1_value
            advantages = torch.stack([stage1, stage1, stage2, stage2], dim=1)
        else:  # each decision against the same tuple with itself taken greedily, the tier against its group
            position_value, tier_value = values[1], values[2]
            advantages = torch.stack([centred(tier_value), position_value - tier_value, rewards - position_value,
                                      rewards - position_value], dim=1)
        # The spread covers every reward that enters the advantages, the greedy tuples' too: a group
        # whose sampled tuples tie but whose greedy one differs would otherwise be divided by ~1e-4.
        # A group whose values all tie has advantages 0 (as in TRL).
        pooled = torch.stack(values, dim=1)  # (N, 1 + greedy runs); a group's rows are consecutive
        if self.scale_rewards == "group":
            grouped = pooled.reshape(-1, num_generations * pooled.shape[1])
            spread = nanstd(grouped, dim=1).repeat_interleave(num_generations) if grouped.shape[1] > 1 else torch.zeros_like(rewards)
        elif self.scale_rewards == "batch":
            spread = nanstd(pooled).expand_as(rewards)
        elif self.scale_rewards == "none":
            spread = None
        else:
            raise ValueError(f"scale_rewards={self.scale_rewards!r}; allowed: 'group', 'batch', 'none'")
        if spread is not None:
            advantages = advantages / (spread + 1e-4).view(-1, *([1] * (advantages.dim() - 1)))
        return torch.nan_to_num(advantages, nan=0.0), rewards

    def _log_generation(self, mode: str, prompts: list[str], completions: list[str], rewards_per_func: torch.Tensor,
                        rewards: torch.Tensor, advantages: torch.Tensor, knobs: list[Knobs], latencies: list[float], budgets: list[float]) -> None:
        metrics = self._metrics[mode]
        for i, name in enumerate(self.reward_func_names):
            metrics[f"rewards/{name}/mean"].append(torch.nanmean(rewards_per_func[:, i]).item())
            metrics[f"rewards/{name}/std"].append(nanstd(rewards_per_func[:, i]).item())
        if self.accuracy_reward_name is not None:
            metrics["accuracy"].append(torch.nanmean(rewards_per_func[:, self.reward_func_names.index(self.accuracy_reward_name)]).item())
        metrics["reward"].append(torch.nanmean(rewards).item())
        metrics["reward_std"].append(nanstd(rewards).item())
        device = self.accelerator.device
        lat = self.accelerator.gather(torch.tensor(latencies, device=device))
        bud = self.accelerator.gather(torch.tensor(budgets, device=device))
        metrics["latency_ms/mean"].append(lat.mean().item())
        metrics["budget_ms/mean"].append(bud.mean().item())
        metrics["violation_rate"].append((lat > bud).float().mean().item())
        all_knobs = gather_object([k.as_dict() for k in knobs])
        for name in self.knob_space.knob_names:
            values = [k[name] for k in all_knobs]
            for option in self.knob_space.options(name):
                metrics[f"knobs/{name}={option}"].append(sum(v == option for v in values) / len(values))
            metrics[f"knobs/{name}/mean"].append(sum(self.knob_space.options(name).index(v) for v in values) / len(values))

        self._logs["prompt"].extend(gather_object(prompts))
        self._logs["completion"].extend(gather_object(completions))
        for i, name in enumerate(self.reward_func_names):
            self._logs["rewards"][name].extend(rewards_per_func[:, i].tolist())
        self._logs["advantages"].extend((advantages if advantages.dim() == 1 else advantages[:, -1]).tolist())
        self._logs["extra"]["knobs"].extend(str(Knobs(**k)) for k in all_knobs)
        self._logs["extra"]["latency_ms"].extend(lat.tolist())
        self._logs["extra"]["budget_ms"].extend(bud.tolist())
        # what reward functions logged through TRL's log_extra / log_metric (names sorted: every process
        # must gather them in the same order)
        for column in sorted(set(gather_object(list(self._pending_extra_logs)))):
            self._logs["extra"][column].extend(gather_object(self._pending_extra_logs.get(column, [None] * len(prompts))))
        for name in sorted(set(gather_object(list(self._pending_metrics)))):
            values = self._pending_metrics.get(name, [])
            total, count = self.accelerator.gather(torch.tensor([sum(values), len(values)], dtype=torch.float32, device=device)).view(-1, 2).sum(0).tolist()
            metrics[name].append(total / count)
        self._pending_extra_logs.clear()
        self._pending_metrics.clear()

    # ------------------------------------------------------------------ loss
    def _decision_log_probs(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-decision log-probs ``(N, 4)``, entropies ``(N, 4)`` and the mask of decisions the space has."""
        index = inputs["knob_index"]
        positions = torch.tensor(self.knob_space.insertion_positions, device=index.device)[index[:, 1]]
        tiers = [self.knob_space.tiers[i] for i in index[:, 0].tolist()] if self.knob_space.tiers else None
        out = model(inputs["language"], inputs["budgets"], insertion_positions=positions, latency_tokens=inputs.get("latency_tokens"),
                    tiers=tiers)
        logits = [out.tier_logits, out.insertion_position_logits, out.top_k_logits, out.num_active_blocks_logits]
        n = index.shape[0]
        logps, entropies, present = [], [], []
        for j, decision_logits in enumerate(logits):
            if decision_logits is None:
                logps.append(torch.zeros(n, device=index.device))
                entropies.append(torch.zeros(n, device=index.device))
                present.append(False)
                continue
            logp = _log_softmax(decision_logits / self.temperature)  # the distribution the tuple was sampled from
            logps.append(logp.gather(-1, index[:, j : j + 1]).squeeze(-1))
            entropies.append(_entropy(logp))
            present.append(True)
        mask = torch.tensor(present, device=index.device)
        return torch.stack(logps, 1), torch.stack(entropies, 1), mask

    def _compute_loss(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        mode = "train" if self.model.training else "eval"
        logp, entropy, present = self._decision_log_probs(model, inputs)
        old = inputs["old_log_probs"]
        advantages = inputs["advantages"]
        advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages  # per tuple, or per decision
        mask = present.float().unsqueeze(0).expand_as(logp)
        # PPO-style clipping per decision: each knob is one "token" of the completion
        log_ratio = logp - old
        if self.importance_sampling_level == "sequence":  # GSPO: one ratio per tuple, from the mean over its decisions
            log_ratio = (log_ratio * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True)
        ratio = torch.exp(log_ratio)
        clipped = torch.clamp(ratio, 1 - self.epsilon_low, 1 + self.epsilon_high)
        capped = ratio if self.args.delta is None else torch.clamp(ratio, max=self.args.delta)  # two-sided clipping
        per_decision = -torch.min(capped * advantages, clipped * advantages)
        if self.beta > 0:
            with torch.no_grad():
                ref_logp, _, _ = self._decision_log_probs(self.ref_model, inputs)
            delta = ref_logp - logp
            kl = torch.exp(delta) - delta - 1  # k3 estimator, as TRL uses per token
            if self.args.use_bias_correction_kl:  # as TRL: weighted by the importance ratio of the sampled tuples
                kl = kl * ratio
            per_decision = per_decision + self.beta * kl
            self._metrics[mode]["kl"].append(self.accelerator.gather((kl[:, present]).mean()).mean().item())
        loss = (per_decision * mask).sum() / mask.sum()
        mean_entropy = (entropy * mask).sum() / mask.sum()
        loss = loss - self._entropy_bonus(mode, entropy, mask) * mean_entropy
        normaliser = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        with torch.no_grad():
            is_clipped = ((ratio < 1 - self.epsilon_low) | (ratio > 1 + self.epsilon_high)).float()
            self._metrics[mode]["clip_ratio"].append(self.accelerator.gather((is_clipped * mask).sum() / mask.sum()).mean().item())
            self._metrics[mode]["entropy"].append(self.accelerator.gather(mean_entropy.detach()).mean().item())
            for j, name in enumerate(KNOB_NAMES):
                if present[j]:
                    self._metrics[mode][f"entropy/{name}"].append(self.accelerator.gather(entropy[:, j].mean()).mean().item())
        return loss / normaliser

    def _entropy_bonus(self, mode: str, entropy: torch.Tensor, mask: torch.Tensor) -> float:
        """The entropy coefficient for this micro-batch: ``entropy_coef``, or with
        ``use_adaptive_entropy`` TRL's rule (Skywork-OR1): applied only while the last optimizer step's
        mean entropy was at or below ``entropy_target``, and moved by ``entropy_coef_delta`` toward
        more bonus below the target and less above it, within ``entropy_coef_min``/``_max``. The
        state lives where TRL keeps it, so its checkpoints save and restore it."""
        if not self.use_adaptive_entropy:
            return self.entropy_coef
        coef = self.entropy_coef if self._last_world_entropy <= self.args.entropy_target else 0.0
        if mode == "train":
            stats = torch.stack([(entropy * mask).sum(), mask.sum()]).detach()
            window = stats if self._entropy_window_stats is None else self._entropy_window_stats + stats
            self._entropy_window_stats = window
            if self.accelerator.sync_gradients:  # one update per optimizer step, over every process's decisions
                total = self.accelerator.reduce(window, reduction="sum")
                world_entropy = (total[0] / total[1].clamp(min=1.0)).item()
                if world_entropy <= self.args.entropy_target:
                    self.entropy_coef = min(self.entropy_coef + self.args.entropy_coef_delta, self.args.entropy_coef_max)
                else:
                    self.entropy_coef = max(self.entropy_coef - self.args.entropy_coef_delta, self.args.entropy_coef_min)
                self._last_world_entropy = world_entropy
                self._entropy_window_stats = None
                self._metrics[mode]["entropy_coef"].append(self.entropy_coef)
        return coef

    # ------------------------------------------------------------------ model card
    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None, tags: Any = None, **kwargs: Any) -> None:
        """Write a model card for the controller (not TRL's text-generation template)."""
        if not self.is_world_process_zero():
            return
        from .hub import controller_model_card

        card = controller_model_card(
            self.accelerator.unwrap_model(self.model),
            model_name=model_name or os.path.basename(os.path.normpath(self.args.output_dir)),
            dataset_name=dataset_name,
            evaluation=getattr(self, "evaluation_markdown", None),
            plot="pareto.png" if os.path.isfile(os.path.join(self.args.output_dir, "pareto.png")) else None,
            training_args=self.args,
            # transformers passes the Hub id's bare name: the example loads from the full id
            repo_id=getattr(self, "hub_model_id", None) or self.args.hub_model_id,
            latency_profile_saved=self.latency_profile is not None,
        )
        os.makedirs(self.args.output_dir, exist_ok=True)
        with open(os.path.join(self.args.output_dir, "README.md"), "w") as f:
            f.write(card)
