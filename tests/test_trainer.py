"""KnobGRPOTrainer on a tiny real OLMoE executor with a real TRL training loop."""

from __future__ import annotations

import json
import math

import pytest
import torch
from datasets import Dataset
from transformers import LogitsProcessor, LogitsProcessorList, TrainerCallback
from tiny import tiny_text_model

from knob_grpo import AdaptiveModel, KnobGRPOConfig, KnobGRPOTrainer, Knobs, TwoStageController
from knob_grpo.controller import prompt_features
from knob_grpo.knobs import KNOB_NAMES
from knob_grpo.latency import DECODE_FEATURES, TTFT_FEATURES, LatencyProfile
from knob_grpo.rewards import answer_probability_reward
from knob_grpo.trainer import RewardFunctionError

LOW, HIGH = 72.0, 140.0
PROMPTS = ["what is the colour ?", "how many dots ?"]


def known_profile(executor: AdaptiveModel) -> LatencyProfile:
    """A latency model with known costs: ttft = prompt_tokens * routed_experts ms.

    For the 5-token prompt only top_k=2 with p=1 fits 72 ms (60 or 70 ms); at 140 ms all fit.
    """
    coef = dict(zip(TTFT_FEATURES, [0.0, 0.0, 0.0, 1.0, 0.0]))
    return LatencyProfile(device="test", executor=executor.name_or_path, ttft_coef=coef, decode_coef=dict.fromkeys(DECODE_FEATURES, 0.0))


def gated_quality_reward(completions, knobs, latency_ms, budget_ms, **kwargs):
    """More compute is better, but only inside the budget: the best tuple per budget is certain."""
    return [((k["num_active_blocks"] - 5) + (k["top_k"] - 2)) / 2 if lat <= b else -1.0
            for k, lat, b in zip(knobs, latency_ms, budget_ms)]


def make_trainer(tmp_path, stage2_mode="prompt", reward_funcs=None, measured=False, **overrides):
    model, tok = tiny_text_model("olmoe")
    executor = AdaptiveModel(model, tok)
    torch.manual_seed(0)
    controller = TwoStageController.for_executor(executor, stage2_mode=stage2_mode, budget_range=(50.0, 150.0))
    dataset = Dataset.from_dict({"prompt": [PROMPTS[0]] * 16, "budget": [LOW, HIGH] * 8})
    settings = dict(output_dir=str(tmp_path / "out"), num_generations=8, per_device_train_batch_size=16, max_steps=20,
                    learning_rate=1e-2, lr_scheduler_type="constant", max_completion_length=2, budget_min_ms=50.0,
                    budget_max_ms=150.0, seed=0, logging_steps=1,
                    # in dataset order every step holds one low-budget and one high-budget group, so each
                    # gradient carries the contrast between budgets
                    shuffle_dataset=False)
    settings.update(overrides)
    args = KnobGRPOConfig(**settings)
    trainer = KnobGRPOTrainer(controller, executor, reward_funcs or [gated_quality_reward], args=args,
                              train_dataset=dataset, latency_profile=None if measured else known_profile(executor))
    return trainer, controller, executor


def two_groups():
    """One generation batch: a group of 8 rows of the first prompt at the low budget, then 8 of the second at the high one."""
    return [dict(prompt=PROMPTS[0], budget=LOW) for _ in range(8)] + [dict(prompt=PROMPTS[1], budget=HIGH) for _ in range(8)]


def greedy(controller, executor, budgets):
    language = prompt_features(executor, [PROMPTS[0]] * len(budgets))
    fn = None
    if controller.stage2_mode == "latency_token":
        fn = lambda tiers, ps: torch.cat([executor.prefill(PROMPTS[0], insertion_position=p).latency_token() for p in ps])  # noqa: E731
    return controller.decide(language, budgets, latency_token_fn=fn)


@pytest.mark.parametrize("stage2_mode,stage1_credit", [("prompt", "sampled"), ("latency_token", "sampled"),
                                                        ("prompt", "greedy_stage2"), ("latency_token", "greedy_stage2")])
def test_learns_the_known_best_knobs_per_budget(tmp_path, stage2_mode, stage1_credit):
    trainer, controller, executor = make_trainer(tmp_path, stage2_mode, max_steps=24, stage1_credit=stage1_credit)
    assert trainer.fused_rollouts == (stage2_mode == "latency_token")
    trainer.train()
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.3
    low, high = greedy(controller, executor, [LOW, HIGH])
    assert (low.insertion_position, low.top_k) == (1, 2)  # the only tuples that fit 72 ms
    assert (high.top_k, high.num_active_blocks) == (4, 6)  # the most compute, when everything fits
    logged = trainer.state.log_history[-2]
    for key in ("latency_ms/mean", "violation_rate", "entropy", "knobs/top_k=2", "accuracy", "rewards/gated_quality_reward/mean"):
        assert key in logged


def test_group_advantages_and_rows_a_reward_declines(tmp_path):
    def declines_second_prompt(completions, prompts, knobs, **kwargs):
        return [None if p == PROMPTS[1] else float(k["top_k"]) for p, k in zip(prompts, knobs)]

    trainer, _, _ = make_trainer(tmp_path, reward_funcs=[declines_second_prompt], scale_rewards="none")
    trainer.model.train()
    rows = two_groups()
    out = trainer._generate_and_score_completions(rows)
    top_k = torch.tensor([r["knobs"]["top_k"] for r in rows[:8]], dtype=torch.float32)
    assert torch.allclose(out["advantages"][:8], top_k - top_k.mean())  # centred on its own group
    assert torch.equal(out["advantages"][8:], torch.zeros(8))  # declined rows are left out
    assert all(r["latency_ms"] > 0 and r["budget_ms"] in (LOW, HIGH) for r in rows)


@pytest.mark.parametrize("stage2_mode", ["prompt", "latency_token"])
@pytest.mark.parametrize("credit", ["greedy_stage2", "greedy_rest"])
def test_greedy_credit_gives_each_decision_its_own_advantage(tmp_path, stage2_mode, credit):
    """stage1_credit="greedy_stage2": stage 1's decisions get the reward of the row's (tier, p) with
    stage 2's argmax against the group's mean, stage 2's the sampled tuple's reward against that.
    "greedy_rest": p gets that reward against the reward of the greedy p (then stage 2's argmax), and
    the tier (absent on this model, so masked in the loss) the latter against the group's mean."""
    def compute_reward(knobs, latency_ms, **kwargs):
        return [k["top_k"] + 0.5 * k["num_active_blocks"] + 0.25 * k["insertion_position"] for k in knobs]

    trainer, controller, executor = make_trainer(tmp_path, stage2_mode, reward_funcs=[compute_reward], scale_rewards="none",
                                                 stage1_credit=credit)
    generated = []
    generate = executor.generate
    executor.generate = lambda *a, **k: generated.append(1) or generate(*a, **k)
    generate_rows = executor.generate_rows
    executor.generate_rows = lambda *a, **k: generated.extend([1] * len(a[1])) or generate_rows(*a, **k)
    trainer.model.train()
    rows = two_groups()
    torch.manual_seed(0)
    out = trainer._generate_and_score_completions(rows)
    assert out["advantages"].shape == (16, 4)
    space = executor.knob_space

    def stage2_argmax(positions):  # stage 2's argmax after each row's tier and the given p, from the controller's logits
        tokens = None
        if stage2_mode == "latency_token":
            tokens = torch.cat([executor.prefill(r["prompt"], insertion_position=p).latency_token(p) for r, p in zip(rows, positions)])
        with torch.no_grad():
            logits = controller(out["language"], out["budgets"], insertion_positions=positions, latency_tokens=tokens)
        return [dict(r["knobs"], insertion_position=p, top_k=space.top_k_options[int(k)], num_active_blocks=space.all_block_options[int(b)])
                for r, p, k, b in zip(rows, positions, logits.top_k_logits.argmax(-1), logits.num_active_blocks_logits.argmax(-1))]

    def group_centred(values):
        return values - values.view(2, 8).mean(1).repeat_interleave(8)

    greedy = stage2_argmax([r["knobs"]["insertion_position"] for r in rows])
    sampled_reward = torch.tensor(compute_reward([r["knobs"] for r in rows], None))
    greedy_reward = torch.tensor(compute_reward(greedy, None))
    assert torch.allclose(out["advantages"][:, 2], sampled_reward - greedy_reward)
    assert torch.allclose(out["advantages"][:, 3], sampled_reward - greedy_reward)
    ran = [r["knobs"] for r in rows] + greedy
    if credit == "greedy_stage2":
        stage1 = group_centred(greedy_reward)
        assert torch.allclose(out["advantages"][:, 0], stage1) and torch.allclose(out["advantages"][:, 1], stage1)
        assert not torch.allclose(stage1, group_centred(sampled_reward))  # not plain GRPO
    else:
        with torch.no_grad():
            best_p = controller(out["language"], out["budgets"]).insertion_position_logits.argmax(-1)
        rest = stage2_argmax([space.insertion_positions[int(i)] for i in best_p])
        assert any(r["knobs"]["insertion_position"] != g["insertion_position"] for r, g in zip(rows, rest))
        rest_reward = torch.tensor(compute_reward(rest, None))
        assert torch.allclose(out["advantages"][:, 0], group_centred(rest_reward))
        assert torch.allclose(out["advantages"][:, 1], greedy_reward - rest_reward)
        ran += rest
    # a greedy tuple some row also drew runs once
    runs = {(r["prompt"], tuple(sorted(k.items()))) for r, k in zip(rows * 3, ran)}
    assert len(generated) == len(runs) < len(ran)
    assert trainer._metrics["train"]["executions_per_row"][-1] == len(runs) / 16


@pytest.mark.parametrize("stage1_credit", ["sampled", "greedy_stage2", "greedy_rest"])
def test_what_reward_functions_log_reaches_the_table_and_the_metrics(tmp_path, stage1_credit):
    """TRL's log_extra and log_metric: a column per sampled row beside the completions, and a metric
    (the greedy stage-2 runs' rewards are computed but not logged)."""
    def top_k_reward(knobs, log_extra, log_metric, **kwargs):
        values = [float(k["top_k"]) for k in knobs]
        log_extra("top_k_scored", values)
        log_metric("top_k_scored/mean", sum(values) / len(values))
        return values

    trainer, _, _ = make_trainer(tmp_path, stage2_mode="latency_token", reward_funcs=[top_k_reward], stage1_credit=stage1_credit)
    trainer.model.train()
    rows = two_groups()
    trainer._generate_and_score_completions(rows)
    top_k = [float(r["knobs"]["top_k"]) for r in rows]
    assert list(trainer._logs["extra"]["top_k_scored"]) == top_k
    assert len(trainer._logs["completion"]) == 16
    assert trainer._metrics["train"]["top_k_scored/mean"] == [pytest.approx(sum(top_k) / 16)]


@pytest.mark.parametrize("exploration", [0.0, 0.3])
def test_stage1_exploration_brings_back_an_option_the_policy_gave_up(tmp_path, exploration):
    """Stage 1 starts all but certain of p=2, with which nothing fits the low budget (every row there
    ties at -1, so GRPO has nothing to learn from). The floor keeps drawing p=1, the only position
    that fits, and the importance-weighted loss moves the policy to it; without it, p=1 is never
    drawn and the policy stays. No entropy bonus, so nothing else pulls the policy off p=2."""
    trainer, controller, executor = make_trainer(tmp_path, max_steps=24, entropy_coef=0.0, stage1_exploration=exploration)
    with torch.no_grad():
        head = controller.stage1.insertion_position_head
        head.weight.zero_()
        head.bias.copy_(torch.tensor([-5.0, 5.0]))  # P(p=1) = 4.5e-5
    assert greedy(controller, executor, [LOW])[0].insertion_position == 2
    trainer.train()
    at_low = [h["knobs/insertion_position=1"] for h in trainer.state.log_history if "knobs/insertion_position=1" in h]
    low = greedy(controller, executor, [LOW])[0]
    if exploration:
        assert (low.insertion_position, low.top_k) == (1, 2)  # the only tuples that fit 72 ms
        assert sum(at_low[-3:]) / 3 > 0.3
    else:
        assert low.insertion_position == 2
        assert max(at_low) == 0.0


def test_stage1_options_are_checked():
    with pytest.raises(ValueError, match="stage1_credit='tuple'; allowed: 'sampled', 'greedy_stage2', 'greedy_rest'"):
        KnobGRPOConfig(output_dir="unused", stage1_credit="tuple")
    for bad in (1.0, -0.5):
        with pytest.raises(ValueError, match=fr"stage1_exploration={bad!r} must be a number in \[0, 1\)"):
            KnobGRPOConfig(output_dir="unused", stage1_exploration=bad)


@pytest.mark.parametrize("setting,message", [
    (dict(use_vllm=True), "use_vllm=True: KnobGRPOTrainer does not use use_vllm"),
    (dict(top_p=0.9), "top_p=0.9: .* leave it at 1.0"),
    (dict(top_k=3), "top_k=3: .* leave it at 0"),
    (dict(repetition_penalty=1.2), "repetition_penalty=1.2"),
    (dict(top_entropy_quantile=0.2), "top_entropy_quantile=0.2"),
    (dict(multi_objective_aggregation="normalize_then_sum"), "multi_objective_aggregation='normalize_then_sum'"),
    (dict(mask_truncated_completions=True), "mask_truncated_completions=True: .* leave it at False"),
    (dict(cast_lm_head_to_fp32=True), "cast_lm_head_to_fp32=True: .* leave it at False"),
    (dict(loss_type="cispo"), "loss_type='cispo'; allowed: 'dapo', 'grpo', 'bnpo'"),
    (dict(importance_sampling_level="group"), "importance_sampling_level='group'; allowed: 'token' .* 'sequence'"),
    (dict(temperature=0.0), "temperature=0.0 must be a finite number > 0"),
    (dict(temperature=float("nan")), "temperature=nan must be a finite number > 0"),
])
def test_grpo_options_the_knob_trainer_does_not_use_are_refused(setting, message):
    """An option of TRL's GRPOConfig is either honoured or refused by name, never silently ignored."""
    with pytest.raises(ValueError, match=message):
        KnobGRPOConfig(output_dir="unused", **setting)


def test_the_refused_options_are_grpo_config_fields_at_their_defaults():
    import dataclasses

    from trl import GRPOConfig

    from knob_grpo.config import UNUSED_GRPO_OPTIONS

    defaults = {f.name: f.default for f in dataclasses.fields(GRPOConfig)}
    assert {name: defaults.get(name, "missing") for name in UNUSED_GRPO_OPTIONS} == UNUSED_GRPO_OPTIONS
    KnobGRPOConfig(output_dir="unused", loss_type="grpo", importance_sampling_level="sequence", temperature=0.5)  # honoured


@pytest.mark.parametrize("stage2_mode", ["prompt", "latency_token"])
def test_temperature_samples_and_scores_the_same_distribution(tmp_path, stage2_mode):
    trainer, controller, _ = make_trainer(tmp_path, stage2_mode, temperature=3.0)
    trainer.model.train()
    rows = two_groups()
    torch.manual_seed(0)
    out = trainer._generate_and_score_completions(rows)
    logp, _, present = trainer._decision_log_probs(trainer.model, out)
    assert torch.allclose(logp[:, present], out["old_log_probs"][:, present], atol=1e-5)  # ratio 1 before any update
    direct = controller.log_probs([r["knobs"] for r in rows], out["language"], out["budgets"],
                                  latency_tokens=out.get("latency_tokens"), temperature=3.0)
    for j, name in enumerate(KNOB_NAMES):
        assert torch.allclose(direct.per_decision[name], out["old_log_probs"][:, j], atol=1e-5)
    trainer.temperature = 1.0
    unscaled, _, _ = trainer._decision_log_probs(trainer.model, out)
    assert not torch.allclose(unscaled[:, present], out["old_log_probs"][:, present], atol=1e-3)
    language = prompt_features(trainer.executor, PROMPTS[:1])
    with pytest.raises(ValueError, match="temperature=-1.0 must be a finite number > 0"):
        controller.sample(language, [HIGH], temperature=-1.0, latency_token_fn=lambda tiers, ps: out["latency_tokens"][:1])


@pytest.mark.parametrize("sampling", ["uniform", "log_uniform"])
def test_drawn_budgets_lie_inside_the_controllers_range_at_its_ends_too(sampling, tmp_path, monkeypatch):
    """Without a budget column the budget is drawn inside the controller's range; the lowest draw is
    its lower end exactly (in floating point exp(log(50)) is below 50, where greedy decisions would
    take the cheapest configuration)."""
    trainer, _, _ = make_trainer(tmp_path, budget_sampling=sampling, budget_column=None)
    drawn = [trainer._budget_for({"prompt": f"{PROMPTS[0]} {i}"}) for i in range(50)]
    assert all(50.0 <= b < 150.0 for b in drawn) and len(set(drawn)) == 50
    monkeypatch.setattr(torch, "rand", lambda *a, **k: torch.zeros(1))
    assert trainer._budget_for({"prompt": PROMPTS[0]}) == 50.0


def test_the_loss_scores_p_given_the_tier_it_was_drawn_with(tmp_path):
    """On a model with tiers, the loss's log-probabilities of every decision are the ones sampled
    (ratio 1 before any update), ``p``'s included, which depends on the row's tier."""
    from tiny import tiny_image, tiny_vlm

    executor = AdaptiveModel(*tiny_vlm(moe=True))
    torch.manual_seed(0)
    controller = TwoStageController.for_executor(executor, stage2_mode="latency_token", budget_range=(50.0, 150.0))
    with torch.no_grad():
        for name, param in controller.named_parameters():
            if "_head." in name or "_by_tier." in name:
                param.normal_(0.0, 2.0 if "_by_tier." in name else 0.3)
    dataset = Dataset.from_dict({"prompt": [PROMPTS[0]] * 8, "budget": [HIGH] * 8, "image": [tiny_image(1)] * 8})
    args = KnobGRPOConfig(output_dir=str(tmp_path / "out"), num_generations=8, per_device_train_batch_size=8, max_steps=1,
                          max_completion_length=2, budget_min_ms=50.0, budget_max_ms=150.0, image_column="image")
    trainer = KnobGRPOTrainer(controller, executor, [gated_quality_reward], args=args, train_dataset=dataset,
                              latency_profile=known_profile(executor))
    trainer.model.train()
    torch.manual_seed(1)
    out = trainer._generate_and_score_completions(list(dataset))
    tiers = out["knob_index"][:, 0]
    assert len(set(tiers.tolist())) > 1  # rows of different tiers
    logp, _, present = trainer._decision_log_probs(trainer.model, out)
    assert present.all()
    torch.testing.assert_close(logp, out["old_log_probs"])


def _loss_inputs(trainer, offsets, advantages):
    """Inputs for _compute_loss whose old log-probabilities sit ``offsets`` below the current ones."""
    trainer.model.train()
    rows = two_groups()
    torch.manual_seed(0)
    out = trainer._generate_and_score_completions(rows)
    with torch.no_grad():
        logp, _, present = trainer._decision_log_probs(trainer.model, out)
    out["old_log_probs"] = logp - offsets
    out["advantages"] = advantages
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop; one micro-batch here
    return out, present


@pytest.mark.parametrize("level,delta", [("token", None), ("sequence", None), ("token", 1.5)])
def test_the_clipped_loss_per_decision_per_tuple_and_two_sided(tmp_path, level, delta):
    trainer, _, _ = make_trainer(tmp_path, importance_sampling_level=level, delta=delta, entropy_coef=0.0, epsilon=0.2)
    gen = torch.Generator().manual_seed(1)
    offsets = torch.rand(16, 4, generator=gen) * 0.8 - 0.2  # log-ratios from -0.2 to 0.6: some clipped, some capped
    advantages = torch.randn(16, generator=gen)
    inputs, present = _loss_inputs(trainer, offsets, advantages)
    loss = trainer._compute_loss(trainer.model, inputs)
    m = present.float().expand(16, 4)
    log_ratio = offsets * m
    if level == "sequence":
        log_ratio = (log_ratio.sum(1, keepdim=True) / m.sum(1, keepdim=True)).expand(16, 4)
    ratio = log_ratio.exp()
    capped = ratio if delta is None else ratio.clamp(max=delta)
    a = advantages.unsqueeze(1)
    expected = (-torch.min(capped * a, ratio.clamp(0.8, 1.2) * a) * m).sum() / m.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    if delta is not None:  # the cap bites on some decision with a negative advantage
        assert bool(((ratio > delta) & (a < 0) & (m > 0)).any())


def test_adaptive_entropy_follows_trl_rule_and_checkpoints(tmp_path):
    """use_adaptive_entropy: the coefficient rises by entropy_coef_delta per optimizer step while the
    policy's mean decision entropy is at or below entropy_target, falls above it, and applies only
    below it; TRL's checkpoint machinery saves it."""
    common = dict(use_adaptive_entropy=True, entropy_coef=0.05, entropy_coef_delta=0.01, entropy_coef_max=0.08, max_steps=4,
                  save_strategy="steps", save_steps=4)
    rising, _, _ = make_trainer(tmp_path / "rise", entropy_target=10.0, **common)  # entropy is always below 10 nats
    rising.train()
    coefs = [h["entropy_coef"] for h in rising.state.log_history if "entropy_coef" in h]
    assert coefs == pytest.approx([0.06, 0.07, 0.08, 0.08])  # capped at entropy_coef_max
    saved = json.loads((tmp_path / "rise" / "out" / "checkpoint-4" / "entropy_ctrl_state.json").read_text())
    assert saved["entropy_coef"] == pytest.approx(0.08) and saved["last_world_entropy"] < 10.0

    falling, _, _ = make_trainer(tmp_path / "fall", entropy_target=0.0, **common)
    falling.train()
    assert [h["entropy_coef"] for h in falling.state.log_history if "entropy_coef" in h] == pytest.approx([0.04, 0.03, 0.02, 0.01])
    mask = torch.ones(2, 4)
    assert falling._entropy_bonus("eval", torch.ones(2, 4), mask) == 0.0  # entropy above the target: no bonus
    falling._last_world_entropy = 0.0
    assert falling._entropy_bonus("eval", torch.ones(2, 4), mask) == pytest.approx(0.01)


def test_sync_ref_model_moves_the_reference_toward_the_policy(tmp_path):
    trainer, controller, _ = make_trainer(tmp_path, beta=0.1, sync_ref_model=True, ref_model_sync_steps=2,
                                          ref_model_mixup_alpha=1.0, max_steps=3)
    initial = {k: v.clone() for k, v in controller.state_dict().items()}
    ref, policy = {}, {}  # after each step (the sync callback, added first, has run)

    def snapshot(args, state, control, **kwargs):
        ref[state.global_step] = {k: v.clone() for k, v in trainer.ref_model.state_dict().items()}
        policy[state.global_step] = {k: v.clone() for k, v in controller.state_dict().items()}

    trainer.add_callback(type("Snapshot", (TrainerCallback,), {"on_step_end": lambda self, *a, **k: snapshot(*a, **k)}))
    trainer.train()
    assert all(torch.equal(ref[1][k], initial[k]) for k in initial)  # not synced at step 1
    assert all(torch.equal(ref[2][k], policy[2][k]) for k in initial)  # synced at step 2 (alpha 1: a copy)
    assert any(not torch.equal(policy[2][k], initial[k]) for k in initial)
    assert all(torch.equal(ref[3][k], ref[2][k]) for k in initial)  # not at step 3
    with pytest.raises(ValueError, match="sync_ref_model=True needs beta > 0"):
        make_trainer(tmp_path / "b", sync_ref_model=True)


def test_reward_weights_and_generation_batches_spanning_steps(tmp_path):
    """TRL's reward_weights weigh each function in the advantage; steps_per_generation=2 generates
    once for two optimizer steps, each step taking its half of the generation batch."""
    def top_k_reward(knobs, **kwargs):
        return [float(k["top_k"]) for k in knobs]

    def blocks_reward(knobs, **kwargs):
        return [float(k["num_active_blocks"]) for k in knobs]

    trainer, controller, _ = make_trainer(tmp_path, reward_funcs=[top_k_reward, blocks_reward], reward_weights=[2.0, -0.5],
                                          scale_rewards="none", steps_per_generation=2, max_steps=4)
    trainer.model.train()
    rows = two_groups()
    out = trainer._generate_and_score_completions(rows)
    total = torch.tensor([2.0 * r["knobs"]["top_k"] - 0.5 * r["knobs"]["num_active_blocks"] for r in rows])
    assert torch.allclose(out["advantages"], total - total.view(2, 8).mean(1).repeat_interleave(8))

    calls = []
    generate_and_score = trainer._generate_and_score_completions
    trainer._generate_and_score_completions = lambda inputs: calls.append(len(inputs)) or generate_and_score(inputs)
    before = {k: v.clone() for k, v in controller.state_dict().items()}
    trainer.train()
    assert calls == [32, 32]  # two generation batches of two steps' rows for four steps
    assert any(not torch.equal(controller.state_dict()[k], before[k]) for k in before)


def test_a_reward_function_that_raises_is_named(tmp_path):
    def broken_reward(completions, **kwargs):
        raise KeyError("answer")

    trainer, _, _ = make_trainer(tmp_path, reward_funcs=[broken_reward], max_steps=1)
    with pytest.raises(RewardFunctionError, match="reward function 'broken_reward' raised KeyError"):
        trainer.train()


def test_a_controller_with_a_latency_scale_is_refused(tmp_path):
    """Training rewards compare the profile's latency with the budgets themselves, so a scale set
    for serving would make the policy read budgets the rewards do not use: refused when the trainer
    is built and when training starts."""
    trainer, controller, executor = make_trainer(tmp_path, max_steps=1)
    controller.latency_scale = 1.2
    with pytest.raises(ValueError, match="latency_scale=1.2"):
        trainer.train()
    with pytest.raises(ValueError, match="latency_scale=1.2"):
        KnobGRPOTrainer(controller, executor, [gated_quality_reward], args=trainer.args,
                        train_dataset=Dataset.from_dict({"prompt": PROMPTS[:2]}), latency_profile=known_profile(executor))


def test_resume_from_checkpoint_matches_uninterrupted_run(tmp_path):
    common = dict(max_steps=6, save_strategy="steps", save_steps=3, logging_steps=3)
    trainer, controller, _ = make_trainer(tmp_path / "a", **common)
    trainer.train()
    uninterrupted = {k: v.clone() for k, v in controller.state_dict().items()}

    resumed, controller_b, _ = make_trainer(tmp_path / "a", **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "out" / "checkpoint-3"))
    for key, value in controller_b.state_dict().items():
        assert torch.allclose(value, uninterrupted[key], atol=1e-6), key
    fresh, _, _ = make_trainer(tmp_path / "c")
    assert any(not torch.equal(v, uninterrupted[k]) for k, v in fresh.model.state_dict().items())


def test_kl_to_a_frozen_copy_and_several_iterations(tmp_path):
    trainer, controller, _ = make_trainer(tmp_path, beta=0.5, num_iterations=2, max_steps=6)
    initial = {k: v.clone() for k, v in controller.state_dict().items()}
    trainer.train()
    ref = trainer.ref_model.state_dict()
    assert all(torch.equal(ref[k], initial[k]) for k in initial)  # the reference stays where training started
    assert any(not torch.equal(controller.state_dict()[k], initial[k]) for k in initial)
    kls = [h["kl"] for h in trainer.state.log_history if "kl" in h]
    assert kls and all(k >= 0 for k in kls) and max(kls) > 0


def test_model_card_names_executor_knobs_and_budgets(tmp_path):
    trainer, controller, executor = make_trainer(tmp_path, max_steps=1)
    trainer.create_model_card(model_name="my-controller")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "olmoe" in card.lower() and "50–150 ms" in card and "| `top_k` | 2, 3, 4 |" in card
    assert "text-generation" not in card


def test_push_to_hub_through_the_trainer(tmp_path, monkeypatch):
    """``Trainer.push_to_hub`` runs transformers' own code up to the upload call. The Hub's servers
    cannot be reached here; these patches stand in for them: ``create_repo`` answers, and
    ``upload_folder`` (the upload) records the files it would send."""
    import json
    import os

    import huggingface_hub
    from huggingface_hub import RepoUrl

    uploaded = {}

    def create_repo(self, repo_id, **kwargs):
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        for name in os.listdir(folder_path):
            if os.path.isfile(os.path.join(folder_path, name)):
                with open(os.path.join(folder_path, name), "rb") as f:
                    uploaded[name] = f.read()
        uploaded["__repo_id__"] = repo_id
        return huggingface_hub.CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/0", commit_message="",
                                          commit_description="", oid="0" * 40)

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    trainer, controller, _ = make_trainer(tmp_path, max_steps=1, push_to_hub=True, hub_model_id="someone/knob-controller",
                                          hub_strategy="end")
    trainer.train()
    trainer.push_to_hub()
    assert uploaded["__repo_id__"] == "someone/knob-controller"
    assert json.loads(uploaded["config.json"])["model_type"] == "knob_grpo_controller"
    assert "model.safetensors" in uploaded
    # the profile the rewards used goes with it: suggest_latency_scale needs it where the controller is served
    pushed = tmp_path / "pushed_profile.json"
    pushed.write_bytes(uploaded["latency_profile.json"])
    saved = LatencyProfile.load(pushed, device=trainer.latency_profile.device, executor=trainer.latency_profile.executor)
    assert saved.to_dict() == trainer.latency_profile.to_dict()
    card = uploaded["README.md"].decode()
    assert "knob-controller" in card and "| `num_active_blocks` |" in card and "50–150 ms" in card


def test_fused_rollouts_give_the_naive_tokens_and_share_prefills(tmp_path):
    trainer, controller, executor = make_trainer(tmp_path, stage2_mode="latency_token", max_steps=1)
    assert trainer.fused_rollouts
    calls = []
    prefill = executor.prefill
    executor.prefill = lambda *a, **k: calls.append(k["insertion_position"]) or prefill(*a, **k)
    trainer.model.train()
    rows = two_groups()
    trainer._generate_and_score_completions(rows)
    completions = list(trainer._logs["completion"])[-16:]
    assert len(calls) <= 2 * len(executor.knob_space.tiers or [None])  # one prefill per request (and tier), not per row
    for row, completion in zip(rows, completions):
        knobs = {k: v for k, v in row["knobs"].items() if v is not None}
        out = executor.generate(row["prompt"], **knobs, max_new_tokens=2, do_sample=False)
        prompt_len = executor.prepare_inputs(row["prompt"])["input_ids"].shape[1]
        assert executor.tokenizer.decode(out[0, prompt_len:], skip_special_tokens=True).strip() == completion


def test_batched_rollouts_equal_one_generate_per_tuple(tmp_path):
    """The tuples continued from one prefix run as one batched generate, with the tokens and
    latencies of one generate per tuple."""
    seen = {}
    for batched in (True, False):
        trainer, controller, executor = make_trainer(tmp_path / str(batched), stage2_mode="latency_token", max_steps=1,
                                                     batch_rollouts=batched)
        calls = []
        generate_rows = executor.generate_rows
        executor.generate_rows = lambda *a, **k: calls.append(len(a[1])) or generate_rows(*a, **k)
        trainer.model.train()
        rows = two_groups()
        torch.manual_seed(0)
        trainer._generate_and_score_completions(rows)
        seen[batched] = dict(knobs=[r["knobs"] for r in rows], latency=[r["latency_ms"] for r in rows],
                             completions=list(trainer._logs["completion"])[-16:], calls=calls,
                             calls_per_row=trainer._metrics["train"]["generate_calls_per_row"][-1],
                             executions_per_row=trainer._metrics["train"]["executions_per_row"][-1])
    for key in ("knobs", "latency", "completions", "executions_per_row"):
        assert seen[True][key] == seen[False][key], key
    distinct = {(r, tuple(sorted(k.items()))) for r, k in zip([0] * 8 + [1] * 8, seen[True]["knobs"])}
    assert sum(seen[True]["calls"]) == len(distinct) and seen[False]["calls"] == []
    assert max(seen[True]["calls"]) > 1  # some prefix served several tuples in one call
    assert seen[True]["calls_per_row"] == len(seen[True]["calls"]) / 16 < seen[False]["calls_per_row"]


def test_rows_without_an_image_on_an_executor_with_tiers(tmp_path):
    """Text-only rows on a vision-language executor: whatever tier a tuple drew, it runs without one,
    continued from one shared prefill per request, with the tokens of a plain generate (batched or not)."""
    from tiny import tiny_vlm

    executor = AdaptiveModel(*tiny_vlm(moe=True))
    seen = {}
    for batched in (True, False):
        torch.manual_seed(0)
        controller = TwoStageController.for_executor(executor, stage2_mode="latency_token", budget_range=(50.0, 150.0))
        dataset = Dataset.from_dict({"prompt": [PROMPTS[0]] * 8 + [PROMPTS[1]] * 8, "budget": [HIGH] * 16})
        args = KnobGRPOConfig(output_dir=str(tmp_path / str(batched)), num_generations=8, per_device_train_batch_size=16, max_steps=1,
                              max_completion_length=2, batch_rollouts=batched)
        trainer = KnobGRPOTrainer(controller, executor, [gated_quality_reward], args=args, train_dataset=dataset,
                                  latency_profile=known_profile(executor))
        prefills = []
        prefill = executor.prefill
        executor.prefill = lambda *a, **k: prefills.append(k["tier"]) or prefill(*a, **k)
        try:
            trainer.model.train()
            rows = [dict(r) for r in dataset]
            torch.manual_seed(1)
            trainer._generate_and_score_completions(rows)
        finally:
            del executor.prefill
        assert len({r["knobs"]["tier"] for r in rows}) > 1 and prefills == [None, None]  # tiers drawn, one prefill per prompt
        completions = list(trainer._logs["completion"])[-16:]
        for row, completion in zip(rows, completions):
            knobs = {k: v for k, v in row["knobs"].items() if v is not None and k != "tier"}
            out = executor.generate(row["prompt"], **knobs, max_new_tokens=2, do_sample=False)
            prompt_len = executor.prepare_inputs(row["prompt"])["input_ids"].shape[1]
            assert executor.tokenizer.decode(out[0, prompt_len:], skip_special_tokens=True).strip() == completion
        seen[batched] = ([r["knobs"] for r in rows], [r["latency_ms"] for r in rows], completions)
    assert seen[True] == seen[False]


def test_rows_that_drew_the_same_tuple_run_once(tmp_path):
    """With a profile and greedy decoding a (request, tuple) pair runs once, and its rows get the
    tokens and latency a separate run gives."""
    trainer, controller, executor = make_trainer(tmp_path, stage2_mode="prompt", max_steps=1)
    generated = []
    generate = executor.generate
    executor.generate = lambda *a, **k: generated.append(1) or generate(*a, **k)
    trainer.model.train()
    rows = two_groups()
    trainer._generate_and_score_completions(rows)
    distinct = {(row["prompt"], tuple(sorted(row["knobs"].items()))) for row in rows}
    assert len(generated) == len(distinct) < len(rows)  # 16 rows over 2 requests: some tuples repeat
    assert trainer._metrics["train"]["executions_per_row"][-1] == len(distinct) / len(rows)
    completions = list(trainer._logs["completion"])[-16:]
    for row, completion in zip(rows, completions):
        ids, latency, _ = trainer._execute(row["prompt"], None, Knobs(**row["knobs"]), None)  # this row alone
        assert executor.tokenizer.decode(ids, skip_special_tokens=True).strip() == completion
        assert row["latency_ms"] == latency


class ForceTokens(LogitsProcessor):
    """Teacher forcing inside generate: step t may only emit tokens[t] (raw logits stay as the model gave them)."""

    def __init__(self, tokens, prompt_length):
        self.tokens, self.prompt_length = tokens, prompt_length

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, -math.inf)
        forced[:, self.tokens[input_ids.shape[1] - self.prompt_length]] = 0.0
        return forced


def teacher_forced_logprob(executor, prompt, knobs, reference, completion):
    """log p(reference[:j+1]) for the first token j where the completion departs from the reference,
    from a separate generate that is forced along the reference."""
    prompt_length = executor.prepare_inputs(prompt)["input_ids"].shape[1]
    out = executor.generate(prompt, **knobs, max_new_tokens=len(reference), do_sample=False, output_logits=True,
                            return_dict_in_generate=True, logits_processor=LogitsProcessorList([ForceTokens(reference, prompt_length)]))
    total = 0.0
    for t, token in enumerate(reference):
        total += torch.log_softmax(out.logits[t][0].float(), dim=-1)[token].item()
        if t >= len(completion) or completion[t] != token:
            break
    return total


@pytest.mark.parametrize("stage2_mode,batched,measured", [("latency_token", True, False), ("latency_token", False, False),
                                                          ("prompt", True, False), ("prompt", True, True)])
def test_answer_logprobs_equal_a_teacher_forced_generate(tmp_path, stage2_mode, batched, measured):
    """Each row's answer_logprob is the executor's log-probability of its reference in the row's own
    knobs (the likeliest of a list), whichever way the rollouts ran; answer_probability_reward is its exp."""
    trainer, controller, executor = make_trainer(tmp_path, stage2_mode=stage2_mode, max_steps=1, batch_rollouts=batched,
                                                 measured=measured, answer_logprobs=True, reward_funcs=[answer_probability_reward])
    assert (trainer.latency_profile is None) == measured  # measured: each rollout timed alone through LatencyMeter
    tok = executor.tokenizer
    full = executor.generate(PROMPTS[0], max_new_tokens=1, do_sample=False)
    first = tok.decode(full[0, -1:])  # the full model's own first word: some rows follow the reference past it
    rows = [dict(prompt=PROMPTS[0], budget=HIGH, answer=[f"{first} red", "circle"]) for _ in range(8)]
    # one request whose rows carry different references: each row is scored against its own
    rows += [dict(prompt=PROMPTS[1], budget=HIGH, answer=["blue", "red"][i % 2]) for i in range(8)]
    trainer.model.train()
    torch.manual_seed(0)
    trainer._generate_and_score_completions(rows)
    rewards = list(trainer._logs["rewards"]["answer_probability_reward"])[-16:]
    followed = 0
    for row, reward in zip(rows, rewards):
        knobs = {k: v for k, v in row["knobs"].items() if v is not None}
        completion = trainer._execute(row["prompt"], None, Knobs(**row["knobs"]), None)[0]
        refs = [tok(a, add_special_tokens=False)["input_ids"] for a in ([row["answer"]] if isinstance(row["answer"], str) else row["answer"])]
        expected = max(teacher_forced_logprob(executor, row["prompt"], knobs, ref, completion) for ref in refs)
        assert row["answer_logprob"] == pytest.approx(expected, abs=1e-5)
        assert reward == pytest.approx(math.exp(expected), rel=1e-5)
        followed += completion[:1] == refs[0][:1]
    assert followed > 0  # the two-token reference was scored past its first token somewhere


def test_answer_logprob_is_only_passed_when_asked_for(tmp_path):
    trainer, _, _ = make_trainer(tmp_path, max_steps=1)
    rows = [dict(prompt=PROMPTS[0], budget=HIGH, answer="red") for _ in range(16)]
    trainer.model.train()
    trainer._generate_and_score_completions(rows)
    assert "answer_logprob" not in rows[0]
    with pytest.raises(ValueError, match="answer_logprobs=True"):
        answer_probability_reward(["q"], ["red"], answer=["red"])


def test_answer_logprobs_score_the_answers_exact_match_compares_against(tmp_path):
    trainer, _, _ = make_trainer(tmp_path, max_steps=1, answer_logprobs=True)
    assert trainer._reference_ids([None, "red"]) == trainer._reference_ids("red")  # a missing entry is no answer
    assert trainer._reference_ids([None]) is None and trainer._reference_ids(None) is None


def test_decision_overhead_is_added_to_every_rollout_latency(tmp_path):
    plain, _, executor = make_trainer(tmp_path / "plain", max_steps=1)
    trainer, _, _ = make_trainer(tmp_path / "overhead", max_steps=1, decision_overhead_ms=7.5)
    trainer.model.train()
    rows = two_groups()
    trainer._generate_and_score_completions(rows)
    for row in rows:
        _, without, _ = plain._execute(row["prompt"], None, Knobs(**row["knobs"]), None)
        assert row["latency_ms"] == pytest.approx(without + 7.5)
    with pytest.raises(ValueError, match="decision_overhead_ms=-1.0"):
        KnobGRPOConfig(output_dir=str(tmp_path / "bad"), decision_overhead_ms=-1.0)


def test_latency_margin_scales_profiled_latency(tmp_path):
    plain, _, _ = make_trainer(tmp_path / "plain", max_steps=1)
    trainer, _, _ = make_trainer(tmp_path / "margin", max_steps=1, latency_margin=0.1, decision_overhead_ms=2.0)
    trainer.model.train()
    rows = two_groups()
    trainer._generate_and_score_completions(rows)
    for row in rows:
        _, without, _ = plain._execute(row["prompt"], None, Knobs(**row["knobs"]), None)
        assert row["latency_ms"] == pytest.approx(without * 1.1 + 2.0)  # the margin scales the profile, not the overhead
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="latency_margin="):
            KnobGRPOConfig(output_dir=str(tmp_path / "bad"), latency_margin=bad)


@pytest.mark.parametrize("credit", ["greedy_stage2", "greedy_rest"])
def test_greedy_credit_is_scaled_by_the_spread_of_every_reward_it_uses(tmp_path, credit):
    """With stage1_credit other than "sampled" the greedy tuples' rewards enter the advantages too,
    so the spread they are divided by covers them: a group whose sampled tuples tie but whose
    greedy tuple differs gets advantages of the size of that difference, not 1e4 times it. A group
    whose rewards all tie gets 0 (as in TRL). With scale_rewards="none" nothing is divided."""
    trainer, _, _ = make_trainer(tmp_path, max_steps=1, stage1_credit=credit)
    sampled = torch.tensor([1.0] * 8 + [0.5] * 8)  # group 1: every sampled tuple scores 1; group 2: everything ties
    greedy_ = torch.tensor([0.0] + [1.0] * 7 + [0.5] * 8)  # stage 2's greedy tuple after row 0's (tier, p) scores 0
    rest = torch.tensor([1.0, 0.0] + [1.0] * 6 + [0.5] * 8)
    values = [sampled, greedy_] + ([rest] if credit == "greedy_rest" else [])

    def group_centred(v):
        return v - v.view(2, 8).mean(1).repeat_interleave(8)

    if credit == "greedy_stage2":
        raw = torch.stack([group_centred(greedy_), group_centred(greedy_), sampled - greedy_, sampled - greedy_], 1)
    else:
        raw = torch.stack([group_centred(rest), greedy_ - rest, sampled - greedy_, sampled - greedy_], 1)
    pooled = torch.stack(values, 1)
    spreads = {"group": pooled.view(2, -1).std(1).repeat_interleave(8), "batch": pooled.std().expand(16)}
    for mode in ("group", "batch", "none"):
        trainer.scale_rewards = mode
        per_func = [v.unsqueeze(1) for v in values]  # one reward function
        advantages, rewards = trainer._advantages(per_func[0], "train", *per_func[1:])
        assert torch.equal(rewards, sampled)
        expected = raw if mode == "none" else raw / (spreads[mode] + 1e-4).unsqueeze(1)
        torch.testing.assert_close(advantages, expected, msg=mode)
        assert advantages.abs().max() < 5, mode
        assert torch.equal(advantages[8:], torch.zeros(8, 4)), mode  # the tied group


def test_the_budget_range_is_the_controllers(tmp_path):
    """Unset, KnobGRPOConfig's budget range is the controller's (budgets drawn from another range
    would all be clamped to its ends); set to another range, the trainer refuses it, naming both."""
    trainer, controller, executor = make_trainer(tmp_path, max_steps=1, budget_min_ms=None, budget_max_ms=None)
    assert trainer.budget_range == controller.config.budget_range == (50.0, 150.0)
    drawn = [trainer._budget_for({"prompt": f"{p} {i}"}) for p in PROMPTS for i in range(20)]
    assert all(50.0 <= b <= 150.0 for b in drawn) and max(drawn) - min(drawn) > 50
    # the same unset config serves a controller of another range: the range is the trainer's, not written into args
    assert (trainer.args.budget_min_ms, trainer.args.budget_max_ms) == (None, None)
    other = TwoStageController.for_executor(executor, stage2_mode="prompt", budget_range=(20.0, 60.0))
    second = KnobGRPOTrainer(other, executor, [gated_quality_reward], args=trainer.args, train_dataset=trainer.train_dataset,
                             latency_profile=known_profile(executor))
    drawn = [second._budget_for({"prompt": f"{p} {i}"}) for p in PROMPTS for i in range(20)]
    assert all(20.0 <= b <= 60.0 for b in drawn) and max(drawn) - min(drawn) > 20
    for lo, hi in [(170.0, 380.0), (50.0, 200.0), (None, 200.0)]:
        with pytest.raises(ValueError, match=fr"budget_min_ms, budget_max_ms = \({lo}, {hi}\) ms differ from the controller's "
                                             r"budget_range \(50, 150\) ms"):
            make_trainer(tmp_path / "other", max_steps=1, budget_min_ms=lo, budget_max_ms=hi)
    assert (KnobGRPOConfig(output_dir="unused").budget_min_ms, KnobGRPOConfig(output_dir="unused").budget_max_ms) == (None, None)
    with pytest.raises(ValueError, match=r"budget range \(100.0, 50.0\) must satisfy 0 < budget_min_ms < budget_max_ms"):
        KnobGRPOConfig(output_dir="unused", budget_min_ms=100.0, budget_max_ms=50.0)
    with pytest.raises(ValueError, match=r"budget_min_ms=-1.0 must be a finite number of ms > 0"):
        KnobGRPOConfig(output_dir="unused", budget_min_ms=-1.0)


def test_a_chat_format_prompt_is_refused_by_name(tmp_path):
    trainer, _, _ = make_trainer(tmp_path, max_steps=1)
    trainer.model.train()
    rows = [dict(prompt=[{"role": "user", "content": PROMPTS[0]}], budget=HIGH) for _ in range(16)]
    with pytest.raises(ValueError, match="prompt_column='prompt' holds a list .*plain-text prompts: the executor applies its own "
                                         "chat template"):
        trainer._generate_and_score_completions(rows)


def test_missing_columns_and_bad_budgets_are_named(tmp_path):
    """A column the trainer reads that the data lacks is an error when the trainer is built, naming
    the setting and the columns there are; the image and budget columns may be absent only under
    their default names (a name the user set is not a typo for "absent")."""
    trainer, controller, executor = make_trainer(tmp_path, max_steps=1)

    def build(columns, eval_columns=None, **settings):
        args = KnobGRPOConfig(output_dir=str(tmp_path / "out2"), num_generations=8, per_device_train_batch_size=16, **settings)
        data = Dataset.from_dict({c: [PROMPTS[0]] * 16 for c in columns})
        eval_data = Dataset.from_dict({c: [PROMPTS[0]] * 16 for c in eval_columns}) if eval_columns else None
        return KnobGRPOTrainer(controller, executor, [gated_quality_reward], args=args, train_dataset=data, eval_dataset=eval_data,
                               latency_profile=known_profile(executor))

    build(["prompt"])  # no image, budgets drawn
    with pytest.raises(ValueError, match="prompt_column='prompt': train_dataset has no column 'prompt'; its columns: 'question'"):
        build(["question"])
    with pytest.raises(ValueError, match="prompt_column='question': eval_dataset has no column 'question'; its columns: 'prompt'"):
        build(["question"], eval_columns=["prompt"], prompt_column="question")
    with pytest.raises(ValueError, match="image_column='picture': train_dataset has no column 'picture'"):
        build(["prompt", "image"], image_column="picture")
    with pytest.raises(ValueError, match="budget_column='budget_ms': train_dataset has no column 'budget_ms'; its columns: 'prompt', 'budget'"):
        build(["prompt", "budget"], budget_column="budget_ms")
    with pytest.raises(ValueError, match="budget 'fast' in column 'budget' is not a number of ms"):
        trainer._budget_for({"prompt": PROMPTS[0], "budget": "fast"})
    import numpy as np

    for flag in (True, np.True_):  # float(True) would be a 1 ms budget
        with pytest.raises(ValueError, match=rf"budget {flag!r} in column 'budget' is not a number of ms"):
            trainer._budget_for({"prompt": PROMPTS[0], "budget": flag})
    assert 50.0 <= build(["prompt", "budget"], budget_column=None)._budget_for({"prompt": PROMPTS[0], "budget": 1000.0}) <= 150.0  # None: drawn


def test_executor_generation_kwargs_given_as_json_text(tmp_path):
    """On the command line executor_generation_kwargs is JSON text: parsed into a dict, as TRL does
    for generation_kwargs."""
    from trl import TrlParser

    (args,) = TrlParser((KnobGRPOConfig,)).parse_args_and_config(
        args=["--output_dir", str(tmp_path / "cli"), "--executor_generation_kwargs", '{"num_beams": 1}'])
    assert args.executor_generation_kwargs == {"num_beams": 1}
    trainer, _, _ = make_trainer(tmp_path, max_steps=1, executor_generation_kwargs='{"num_beams": 1}')
    assert trainer.executor_generation_kwargs == {"do_sample": False, "num_beams": 1}
    with pytest.raises(ValueError, match="executor_generation_kwargs='num_beams=1' must be a dict"):
        KnobGRPOConfig(output_dir="unused", executor_generation_kwargs="num_beams=1")


@pytest.mark.parametrize("prompt,budget", [("prompt", "budget"), ("question", "latency")])
def test_remove_unused_columns_keeps_the_columns_the_trainer_reads(tmp_path, prompt, budget):
    """remove_unused_columns=True drops the other columns only: TRL's own list (prompt, image,
    images) would drop the budget column, and every budget would silently be drawn instead."""
    trainer, controller, executor = make_trainer(tmp_path, max_steps=1)
    data = Dataset.from_dict({prompt: [PROMPTS[0]] * 16, budget: [LOW] * 16, "answer": ["red"] * 16, "note": ["x"] * 16})
    args = KnobGRPOConfig(output_dir=str(tmp_path / "out2"), num_generations=8, per_device_train_batch_size=16, max_steps=1,
                          prompt_column=prompt, budget_column=budget, remove_unused_columns=True)
    trainer = KnobGRPOTrainer(controller, executor, [gated_quality_reward], args=args, train_dataset=data,
                              latency_profile=known_profile(executor))
    rows = next(iter(trainer.get_train_dataloader()))
    assert len(rows) == 16 and all(set(row) == {prompt, budget, "answer"} for row in rows)
    assert all(trainer._budget_for(row) == LOW for row in rows)


def test_model_card_example_and_training_settings(tmp_path, monkeypatch):
    """The card's example loads the controller from its Hub id (namespace included) and asks for a
    budget inside the controller's range, and the card says what budgets outside that range get; the
    training section names the latency margin and the decision overhead, and how the served
    controller's latency_scale is set. base_model names only a Hub id. Without a recorded executor, no
    "None" appears."""
    from knob_grpo.hub import controller_model_card

    trainer, controller, _ = make_trainer(tmp_path, max_steps=1, hub_model_id="someone/knob-controller", latency_margin=0.05,
                                          decision_overhead_ms=1.5)
    trainer.create_model_card(model_name="knob-controller")  # the bare name, as transformers passes it
    card = (tmp_path / "out" / "README.md").read_text()
    assert 'controller = AutoModel.from_pretrained("someone/knob-controller")' in card
    assert 'executor.generate("your question", latency_budget=86.6, controller=controller)' in card  # sqrt(50 * 150); text only
    assert "latency margin 0.05, decision overhead 1.5 ms" in card
    assert "- **Budget range:** 50–150 ms (below it the cheapest configuration, above it as at 150 ms)" in card
    controller.config.below_range, controller.config.clamp_budget = "decide", False
    assert "50–150 ms (below it extrapolated, above it extrapolated)" in controller_model_card(controller, model_name="x")
    controller.config.below_range, controller.config.clamp_budget = "decide", True
    assert "50–150 ms (below it as at 50 ms, above it as at 150 ms)" in controller_model_card(controller, model_name="x")
    assert "`knob_grpo.profiling.suggest_latency_scale` with the saved `latency_profile.json` and `latency_margin=0.05`" in card
    # base_model is a Hub id or absent, as the Hub checks the card's metadata (and TRL's cards leave out local folders)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local" / "executor").mkdir(parents=True)  # a folder here, though its name could be a Hub id
    for name, base_model in (("someone/executor", "someone/executor"), ("knob_grpo/embedded", None), ("local/executor", None),
                             (str(tmp_path), None)):
        controller.config.executor_name_or_path = name
        card = controller_model_card(controller, model_name="x")
        assert (f"\nbase_model: {base_model}\n" in card) if base_model else "base_model" not in card
    controller.config.executor_name_or_path = None
    card = controller_model_card(controller, model_name="x")
    assert "None" not in card and "# load the executor the controller was trained for" in card


def test_a_latency_profile_path_is_loaded_for_the_executors_device(tmp_path, monkeypatch):
    """latency_source=PATH loads the profile of the device the executor runs on, not of whatever
    device the machine has first: on a GPU machine with the executor on the CPU, the CPU's."""
    import knob_grpo.latency as latency

    executor = AdaptiveModel(*tiny_text_model("olmoe"))
    cpu = latency.current_device_name(executor.device)
    path = tmp_path / "profile.json"
    profile = known_profile(executor)
    LatencyProfile(device=cpu, executor=profile.executor, ttft_coef=profile.ttft_coef, decode_coef=profile.decode_coef).save(path)
    real = latency.current_device_name
    monkeypatch.setattr(latency, "current_device_name", lambda device=None: "cuda:Simulated GPU" if device is None else real(device))
    trainer, _, executor = make_trainer(tmp_path, max_steps=1, measured=True, latency_source=str(path))
    assert trainer.latency_profile.device == cpu and trainer.latency_profile.executor == executor.name_or_path
