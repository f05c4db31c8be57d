"""AdaptiveModel on tiny real transformers models: each knob observed inside the model."""

from __future__ import annotations

import threading
from collections import defaultdict

import pytest
import torch
from tiny import tiny_image, tiny_text_model, tiny_vlm
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from knob_grpo import AdaptiveModel, ArchitectureSpec, Knobs, KnobSpace
from knob_grpo.adaptive import _active

MOE_TEXT = ["olmoe", "qwen2_moe", "qwen3_moe", "mixtral"]
DENSE_TEXT = ["llama", "qwen2"]
PROMPT = "what is the colour of the shape ?"
GREEDY = dict(max_new_tokens=6, do_sample=False)


class Observer:
    """Plain torch forward hooks: which blocks ran, on how many tokens, with how many experts."""

    def __init__(self, adaptive: AdaptiveModel):
        self.attn_tokens: dict[int, list[int]] = defaultdict(list)
        self.experts_per_token: dict[int, list[int]] = defaultdict(list)
        self.expert_weight_sums: dict[int, list[torch.Tensor]] = defaultdict(list)
        self.vision_tokens: list[int] = []
        self.handles = []
        for i, layer in enumerate(adaptive.layers):
            self.handles.append(layer.self_attn.register_forward_hook(self._attn(i), with_kwargs=True))
            experts = getattr(getattr(layer, "mlp", None), "experts", None)
            if isinstance(experts, torch.nn.Module):
                self.handles.append(experts.register_forward_hook(self._experts(i)))
        if adaptive.vision_tower is not None:  # a submodule: it runs only when the tower really computes
            self.handles.append(adaptive.vision_tower.merger.register_forward_hook(self._vision))

    def _attn(self, i):
        def hook(module, args, kwargs, out):
            self.attn_tokens[i].append(out[0].shape[1])

        return hook

    def _experts(self, i):
        def hook(module, args, out):
            self.experts_per_token[i].append(args[1].shape[-1])
            self.expert_weight_sums[i].append(args[2].float().sum(-1))

        return hook

    def _vision(self, module, args, out):
        self.vision_tokens.append(out.shape[0])

    def blocks_run(self) -> list[int]:
        return sorted(self.attn_tokens)

    def close(self):
        for h in self.handles:
            h.remove()


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert _active() is None


@pytest.fixture(scope="module")
def vlm():
    model, processor = tiny_vlm(moe=True)
    return AdaptiveModel(model, processor)


# --------------------------------------------------------------------------- full setting = plain model
@pytest.mark.parametrize("model_type", MOE_TEXT + DENSE_TEXT)
def test_full_setting_equals_unwrapped_text(model_type):
    model, tok = tiny_text_model(model_type)
    enc = tok([PROMPT, "how many dots ?"], return_tensors="pt", padding=True)
    reference = model.generate(**enc, **GREEDY)
    adaptive = AdaptiveModel(model, tok)
    assert torch.equal(adaptive.generate(**enc, **GREEDY), reference)
    full = adaptive.knob_space.full()
    assert torch.equal(adaptive.generate(**enc, **full.as_dict(), **GREEDY), reference)
    adaptive.remove()
    assert all("forward" not in vars(layer) for layer in adaptive.layers)
    assert torch.equal(model.generate(**enc, **GREEDY), reference)


def test_full_setting_equals_unwrapped_vlm():
    model, processor = tiny_vlm(moe=True)
    images = [tiny_image(1), tiny_image(2)]
    adaptive = AdaptiveModel(model, processor)
    inputs = adaptive.prepare_inputs([PROMPT, "how many dots ?"], images)
    adaptive.remove()
    reference = model.generate(**inputs, **GREEDY)
    adaptive = AdaptiveModel(model, processor)
    assert torch.equal(adaptive.generate([PROMPT, "how many dots ?"], images, **GREEDY), reference)
    assert torch.equal(adaptive.generate([PROMPT, "how many dots ?"], images, tier="high", top_k=4, **GREEDY), reference)


# --------------------------------------------------------------------------- each knob, observed
@pytest.mark.parametrize("model_type", MOE_TEXT)
def test_top_k_observed_per_block(model_type):
    model, tok = tiny_text_model(model_type)
    adaptive = AdaptiveModel(model, tok)
    obs = Observer(adaptive)
    adaptive.generate(PROMPT, insertion_position=2, top_k=2, **GREEDY)
    obs.close()
    for block, ks in obs.experts_per_token.items():
        expected = 4 if block < 2 else 2
        assert set(ks) == {expected}, (block, ks)
    assert len(obs.experts_per_token) == adaptive.num_blocks


def test_olmoe_does_not_renormalise_but_mixtral_does():
    for model_type, renormalised in (("olmoe", False), ("mixtral", True), ("qwen3_moe", True)):
        model, tok = tiny_text_model(model_type)
        adaptive = AdaptiveModel(model, tok)
        obs = Observer(adaptive)
        adaptive.generate(PROMPT, insertion_position=1, top_k=2, **GREEDY)
        obs.close()
        sums = torch.cat(obs.expert_weight_sums[3])
        if renormalised:
            assert torch.allclose(sums, torch.ones_like(sums), atol=1e-5)
        else:
            assert (sums < 0.999).all()


def test_top_k_matches_a_model_configured_with_that_k():
    """Recomputing top-k from the router's logits equals a model whose config says k."""
    model, tok = tiny_text_model("qwen3_moe")
    adaptive = AdaptiveModel(model, tok)
    out = adaptive.generate(PROMPT, insertion_position=1, top_k=3, num_active_blocks=6, **GREEDY)
    adaptive.remove()
    for i in range(1, 6):
        model.model.layers[i].mlp.gate.top_k = 3
    assert torch.equal(model.generate(**tok([PROMPT], return_tensors="pt"), **GREEDY), out)


@pytest.mark.parametrize("model_type", ["olmoe", "llama"])
def test_dropped_blocks_follow_importance_scores(model_type):
    model, tok = tiny_text_model(model_type, num_layers=8)
    space = KnobSpace.from_model(8, default_top_k=4 if model_type == "olmoe" else None, num_experts=8 if model_type == "olmoe" else None,
                                 insertion_positions=[1, 2, 3], max_dropped_blocks=3, min_blocks_after_insertion=2)
    scores = [float("inf"), 0.1, 0.9, 0.05, 0.7, 0.3, 0.2, 0.8]
    adaptive = AdaptiveModel(model, tok, knob_space=space, importance_scores=scores)
    obs = Observer(adaptive)
    adaptive.generate(PROMPT, insertion_position=2, num_active_blocks=5, **GREEDY)
    obs.close()
    # three least important blocks at index >= 2: 3 (0.05), 6 (0.2), 5 (0.3); block 1 (0.1) is before p
    assert obs.blocks_run() == [0, 1, 2, 4, 7]
    prompt_len = len(tok(PROMPT)["input_ids"])
    for block in obs.blocks_run():  # every block that runs, runs for prefill and every decode step
        assert obs.attn_tokens[block][0] == prompt_len and len(obs.attn_tokens[block]) == GREEDY["max_new_tokens"]


def test_fallback_drop_order_without_scores():
    model, tok = tiny_text_model("llama", num_layers=8)
    adaptive = AdaptiveModel(model, tok)
    assert adaptive.drop_order(2) == [6, 5, 4, 3, 2, 7]
    assert adaptive.dropped_blocks(1, 6) == [5, 6]


def test_vision_tokens_grow_with_tier(vlm):
    counts = {}
    for tier in vlm.knob_space.tiers:
        obs = Observer(vlm)
        inputs = vlm.prepare_inputs(PROMPT, [tiny_image(3)], tier=tier)
        vlm.generate(PROMPT, [tiny_image(3)], tier=tier, max_new_tokens=2, do_sample=False)
        obs.close()
        assert obs.vision_tokens == [vlm.num_vision_tokens(inputs)]
        counts[tier] = obs.vision_tokens[0]
    assert counts["low"] < counts["medium"] < counts["high"]


def test_all_four_knobs_on_the_vlm(vlm):
    obs = Observer(vlm)
    vlm.generate(PROMPT, [tiny_image(4)], tier="medium", insertion_position=1, top_k=2, num_active_blocks=5, **GREEDY)
    obs.close()
    assert len(obs.blocks_run()) == 5 and 0 in obs.blocks_run()
    for block in obs.blocks_run():
        assert set(obs.experts_per_token[block]) == {4 if block < 1 else 2}
    assert obs.vision_tokens == [4]


# --------------------------------------------------------------------------- cache and recomputation agree
@pytest.mark.parametrize("model_type", MOE_TEXT + DENSE_TEXT)
def test_cache_equals_recompute_under_knobs(model_type):
    model, tok = tiny_text_model(model_type)
    adaptive = AdaptiveModel(model, tok)
    knobs = dict(insertion_position=1, num_active_blocks=5)
    if adaptive.knob_space.has("top_k"):
        knobs["top_k"] = 2
    cached = adaptive.generate([PROMPT, "how many dots ?"], **knobs, **GREEDY)
    recomputed = adaptive.generate([PROMPT, "how many dots ?"], **knobs, use_cache=False, **GREEDY)
    assert torch.equal(cached, recomputed)
    assert not torch.equal(cached, adaptive.generate([PROMPT, "how many dots ?"], **GREEDY)) or model_type in DENSE_TEXT


def test_cache_equals_recompute_vlm(vlm):
    knobs = dict(tier="medium", insertion_position=2, top_k=3, num_active_blocks=6)
    cached = vlm.generate(PROMPT, [tiny_image(5)], **knobs, **GREEDY)
    recomputed = vlm.generate(PROMPT, [tiny_image(5)], **knobs, use_cache=False, **GREEDY)
    assert torch.equal(cached, recomputed)


# --------------------------------------------------------------------------- partial forward and continuation
@pytest.mark.parametrize("model_type", ["olmoe", "llama"])
def test_latency_token_is_the_hidden_state_entering_block_p(model_type):
    model, tok = tiny_text_model(model_type)
    adaptive = AdaptiveModel(model, tok)
    state = adaptive.prefill(PROMPT, insertion_position=2)
    enc = tok([PROMPT], return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc, output_hidden_states=True).hidden_states
    for p in (1, 2):  # hidden_states[p] is the output of block p-1
        assert torch.allclose(state.latency_token(p), hidden[p][:, -1, :], atol=1e-6)
    with pytest.raises(ValueError, match="insertion_position=3"):
        state.latency_token(3)


@pytest.mark.parametrize("model_type", MOE_TEXT + DENSE_TEXT)
def test_continuation_equals_one_shot_text(model_type):
    model, tok = tiny_text_model(model_type)
    adaptive = AdaptiveModel(model, tok)
    prompts = [PROMPT, "how many dots ?"]
    state = adaptive.prefill(prompts, insertion_position=2)
    obs = Observer(adaptive)
    extra = {"top_k": 3} if adaptive.knob_space.has("top_k") else {}
    continued = adaptive.generate(prefix=state, num_active_blocks=6, **extra, **GREEDY)
    obs.close()
    assert obs.attn_tokens[0] == [1] * (GREEDY["max_new_tokens"] - 1)  # block 0 skipped the prompt
    assert torch.equal(continued, adaptive.generate(prompts, insertion_position=2, **extra, **GREEDY))
    # the same prefix also serves a smaller p (blocks before it ran at full configuration)
    fanned = adaptive.generate(prefix=state, insertion_position=1, num_active_blocks=5, **extra, **GREEDY)
    assert torch.equal(fanned, adaptive.generate(prompts, insertion_position=1, num_active_blocks=5, **extra, **GREEDY))


def test_continuation_equals_one_shot_vlm(vlm):
    images = [tiny_image(6), tiny_image(7)]
    prompts = [PROMPT, "how many dots ?"]
    obs = Observer(vlm)
    state = vlm.prefill(prompts, images, tier="medium", insertion_position=2)
    assert obs.blocks_run() == [0, 1] and len(obs.vision_tokens) == 1
    out = vlm.generate(prefix=state, top_k=2, **GREEDY)
    obs.close()
    assert len(obs.vision_tokens) == 1  # the vision tower ran once, for prefill and continuation together
    assert obs.attn_tokens[0][0] == state.inputs["input_ids"].shape[1] and obs.attn_tokens[0][1] == 1
    assert torch.equal(out, vlm.generate(prompts, images, tier="medium", insertion_position=2, top_k=2, **GREEDY))


def test_continuation_refuses_mismatched_knobs(vlm):
    state = vlm.prefill(PROMPT, [tiny_image(8)], tier="low", insertion_position=1)
    with pytest.raises(ValueError, match="insertion_position=2 is past the prefix"):
        vlm.generate(prefix=state, insertion_position=2)
    with pytest.raises(ValueError, match="tier='high' differs"):
        vlm.generate(prefix=state, tier="high")


def _rows_equal_their_own_continuations(adaptive, state, configs, out):
    pad = adaptive.model.generation_config.pad_token_id
    for row, knobs in zip(out, configs):
        single = adaptive.generate(prefix=state, **{k: v for k, v in knobs.as_dict().items() if k != "tier"}, **GREEDY)[0]
        assert torch.equal(row[: single.shape[0]], single), knobs
        assert (row[single.shape[0]:] == pad).all(), knobs  # a row that ended early is padded after its end


@pytest.mark.parametrize("model_type", MOE_TEXT + DENSE_TEXT)
def test_rows_with_their_own_knobs_equal_separate_continuations_text(model_type):
    model, tok = tiny_text_model(model_type)
    adaptive = AdaptiveModel(model, tok)
    state = adaptive.prefill(PROMPT, insertion_position=2)
    configs = [k for k in adaptive.knob_space.all_configs() if k.insertion_position <= 2]
    configs = configs[::2] if len(configs) > 6 else configs
    assert len(configs) >= 3 and len({k.insertion_position for k in configs}) == 2
    obs = Observer(adaptive)
    out = adaptive.generate_rows(state, configs, **GREEDY)
    obs.close()
    assert out.shape[0] == len(configs)
    # one batched generate: every block that ran saw all rows together (prefill, then one token per step)
    for block, tokens in obs.attn_tokens.items():
        assert tokens[0] == state.inputs["input_ids"].shape[1] or block < min(k.insertion_position for k in configs)
    _rows_equal_their_own_continuations(adaptive, state, configs, out)


def test_rows_with_their_own_knobs_equal_separate_continuations_vlm(vlm):
    image = tiny_image(11)
    state = vlm.prefill(PROMPT, [image], tier="medium", insertion_position=2)
    configs = [k for k in vlm.knob_space.all_configs() if k.tier == "medium"][::3]
    assert len({k.top_k for k in configs}) > 1 and len({k.num_active_blocks for k in configs}) > 1
    obs = Observer(vlm)
    out = vlm.generate_rows(state, configs, **GREEDY)
    obs.close()
    assert obs.vision_tokens == []  # the vision tower is not run again
    _rows_equal_their_own_continuations(vlm, state, configs, out)
    # and the same tokens as a plain one-shot generate of each configuration
    prompt_length = state.inputs["input_ids"].shape[1]
    for row, knobs in zip(out, configs):
        plain = vlm.generate(PROMPT, [image], **knobs.as_dict(), **GREEDY)[0]
        assert torch.equal(row[: plain.shape[0]], plain) and plain.shape[0] > prompt_length


def test_rows_refuse_bad_knobs_and_leave_the_model(vlm):
    image = tiny_image(12)
    state = vlm.prefill(PROMPT, [image], tier="low", insertion_position=2)
    reference = vlm.generate(prefix=state, top_k=2, **GREEDY)
    before = snapshot(vlm.model)
    good = dict(top_k=2)
    for bad, message in [
        (dict(top_k=9), "top_k=9"),
        (dict(tier="high"), "tier='high' differs"),
        (dict(insertion_position=3), "insertion_position=3 is past the prefix"),
        (dict(depth=3), "unknown knob 'depth'"),
    ]:
        with pytest.raises(ValueError, match=message):
            vlm.generate_rows(state, [good, bad], **GREEDY)
    with pytest.raises(ValueError, match="at least one"):
        vlm.generate_rows(state, [], **GREEDY)
    two = vlm.prefill([PROMPT, PROMPT], [image, image], tier="low", insertion_position=2)
    with pytest.raises(ValueError, match="one-prompt prefix"):
        vlm.generate_rows(two, [good], **GREEDY)
    assert_same_state(vlm.model, before)
    assert torch.equal(vlm.generate(prefix=state, top_k=2, **GREEDY), reference)


def test_prefix_without_a_kv_cache_is_refused_and_leaves_the_model(vlm):
    """A continuation replays the prefix's KV entries; with use_cache=False there is nowhere to put them,
    so both the prefill and the continuation refuse instead of generating from a cache that lacks blocks 0..p-1."""
    image = tiny_image(4)
    state = vlm.prefill(PROMPT, [image], tier="low", insertion_position=2)
    reference = vlm.generate(prefix=state, top_k=2, **GREEDY)
    before = snapshot(vlm.model)
    with pytest.raises(RuntimeError, match="block 0 wrote no KV cache entry"):
        vlm.prefill(PROMPT, [image], tier="low", insertion_position=2, use_cache=False)
    with pytest.raises(RuntimeError, match="block 0 was handed no KV cache"):
        vlm.generate(prefix=state, top_k=2, use_cache=False, **GREEDY)
    assert_same_state(vlm.model, before)
    assert torch.equal(vlm.generate(prefix=state, top_k=2, **GREEDY), reference)


def test_decision_at_block_p_equals_prefill_and_continue(vlm):
    """One generate that asks for top_k / num_active_blocks entering block p: the decide function
    sees the prefill's latency token, and the tokens equal prefill + continue with its answer."""
    image = tiny_image(9)
    seen = []

    def decide(token):
        seen.append(token.clone())
        return 2, 5

    obs = Observer(vlm)
    out, knobs = vlm.generate_with_decision(PROMPT, [image], decide=decide, tier="medium", insertion_position=1, **GREEDY)
    obs.close()
    assert knobs == Knobs(tier="medium", insertion_position=1, top_k=2, num_active_blocks=5)
    assert len(seen) == 1 and len(obs.vision_tokens) == 1  # decided once, in the prefill; vision ran once
    assert obs.blocks_run() == sorted(set(range(vlm.num_blocks)) - set(vlm.dropped_blocks(1, 5)))
    state = vlm.prefill(PROMPT, [image], tier="medium", insertion_position=1)
    assert torch.allclose(seen[0], state.latency_token(), atol=1e-6)
    assert torch.equal(out, vlm.generate(prefix=state, top_k=2, num_active_blocks=5, **GREEDY))
    assert torch.equal(out, vlm.generate(PROMPT, [image], tier="medium", insertion_position=1, top_k=2, num_active_blocks=5, **GREEDY))


def test_decision_at_block_p_refuses_an_invalid_answer_and_leaves_the_model(vlm):
    image = tiny_image(10)
    reference = vlm.generate(PROMPT, [image], **GREEDY)
    before = snapshot(vlm.model)
    with pytest.raises(ValueError, match="top_k=9"):
        vlm.generate_with_decision(PROMPT, [image], decide=lambda token: (9, None), tier="low", insertion_position=1, **GREEDY)
    with pytest.raises(ValueError, match="one prompt per call"):
        vlm.generate_with_decision([PROMPT, PROMPT], [image, image], decide=lambda token: (2, 6), tier="low", **GREEDY)
    assert_same_state(vlm.model, before)
    assert _active() is None
    assert torch.equal(vlm.generate(PROMPT, [image], **GREEDY), reference)


# --------------------------------------------------------------------------- HF generate features keep working
def test_sampling_streamer_and_stopping_criteria(vlm):
    class Collect(BaseStreamer):
        def __init__(self):
            self.chunks = []

        def put(self, value):
            self.chunks.append(value.clone())

        def end(self):
            self.chunks.append(None)

    knobs = dict(tier="low", insertion_position=1, top_k=2, num_active_blocks=5)
    torch.manual_seed(0)
    a = vlm.generate(PROMPT, [tiny_image(9)], **knobs, do_sample=True, max_new_tokens=5)
    torch.manual_seed(0)
    streamer = Collect()
    b = vlm.generate(PROMPT, [tiny_image(9)], **knobs, do_sample=True, max_new_tokens=5, streamer=streamer)
    assert torch.equal(a, b)
    streamed = torch.cat([c.reshape(1, -1) for c in streamer.chunks[1:-1]], dim=1)
    assert torch.equal(streamed, b[:, -streamed.shape[1]:]) and streamer.chunks[-1] is None

    class StopAfter(StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.length, dtype=torch.bool)

    stop = StopAfter()
    stop.length = vlm.prepare_inputs(PROMPT, [tiny_image(9)], tier="low")["input_ids"].shape[1] + 2
    c = vlm.generate(PROMPT, [tiny_image(9)], **knobs, do_sample=False, max_new_tokens=8, stopping_criteria=StoppingCriteriaList([stop]))
    assert c.shape[1] == stop.length


# --------------------------------------------------------------------------- bad input, and failures leave the model as it was
@pytest.mark.parametrize(
    "knobs, message",
    [
        (dict(tier="ultra"), r"tier='ultra' is not allowed; allowed values: 'low', 'medium', 'high'"),
        (dict(insertion_position=0), r"insertion_position=0 is not allowed; allowed values: 1, 2"),
        (dict(insertion_position=6), r"insertion_position=6 is not allowed"),
        (dict(top_k=9), r"top_k=9 is not allowed \(the model has only 8 experts per block\); allowed values: 2, 3, 4"),
        (dict(top_k=0), r"top_k=0 is not allowed \(at least one expert must run\)"),
        (dict(insertion_position=2, num_active_blocks=5), r"num_active_blocks=5 is not allowed for insertion_position=2; allowed values: 6"),
        (dict(top_k=2.5), r"top_k=2.5 must be an integer"),
    ],
)
def test_bad_knobs_raise_and_leave_the_model_unchanged(vlm, knobs, message):
    before = snapshot(vlm.model)
    reference = vlm.generate(PROMPT, [tiny_image(10)], **GREEDY)
    with pytest.raises(ValueError, match=message):
        vlm.generate(PROMPT, [tiny_image(10)], **knobs, **GREEDY)
    assert_same_state(vlm.model, before)
    assert torch.equal(vlm.generate(PROMPT, [tiny_image(10)], **GREEDY), reference)


def test_knob_the_model_lacks():
    model, tok = tiny_text_model("llama")
    adaptive = AdaptiveModel(model, tok)
    with pytest.raises(ValueError, match=r"no 'top_k' knob \(it is a dense model"):
        adaptive.generate(PROMPT, top_k=2)
    with pytest.raises(ValueError, match=r"no 'tier' knob \(it has no vision tower\)"):
        adaptive.generate(PROMPT, tier="low")
    dense_vlm = AdaptiveModel(*tiny_vlm(moe=False))
    assert dense_vlm.knob_space.knob_names == ("tier", "insertion_position", "num_active_blocks")
    with pytest.raises(ValueError, match="no 'top_k' knob"):
        dense_vlm.generate(PROMPT, [tiny_image(0)], top_k=2)


def test_knob_space_refuses_top_k_above_expert_count():
    with pytest.raises(ValueError, match="top_k=9 is not possible: it must be between 1 and the model's 8 experts"):
        KnobSpace.from_model(6, default_top_k=4, num_experts=8, top_k_options=[2, 9])


def test_failure_mid_generate_leaves_model_as_it_was(vlm):
    reference = vlm.generate(PROMPT, [tiny_image(11)], **GREEDY)
    before = snapshot(vlm.model)
    rope_before = vlm.base_model.model.rope_deltas

    class Boom(StoppingCriteria):
        def __call__(self, input_ids, scores, **kw):
            raise RuntimeError("boom in the middle of decoding")

    with pytest.raises(RuntimeError, match="boom"):
        vlm.generate(PROMPT, [tiny_image(11)], tier="low", top_k=2, num_active_blocks=5, insertion_position=1,
                     stopping_criteria=StoppingCriteriaList([Boom()]), **GREEDY)
    assert_same_state(vlm.model, before)
    assert vlm.base_model.model.rope_deltas is rope_before
    assert torch.equal(vlm.generate(PROMPT, [tiny_image(11)], **GREEDY), reference)


def test_threads_with_different_knobs_match_sequential_runs():
    model, tok = tiny_text_model("olmoe")
    adaptive = AdaptiveModel(model, tok)
    configs = [dict(top_k=2, insertion_position=1, num_active_blocks=5), dict(), dict(top_k=3, insertion_position=2)] * 3
    expected = [adaptive.generate(PROMPT, **c, **GREEDY) for c in configs]
    results: list = [None] * len(configs)
    barrier = threading.Barrier(len(configs))

    def run(i):
        barrier.wait()
        results[i] = adaptive.generate(PROMPT, **configs[i], **GREEDY)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(configs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, expected):
        assert torch.equal(got, want)


# --------------------------------------------------------------------------- PEFT, architectures, persistence
def test_peft_model_with_knobs():
    from peft import LoraConfig, get_peft_model

    model, tok = tiny_text_model("olmoe")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.eval()
    enc = tok([PROMPT], return_tensors="pt")
    reference = peft_model.generate(**enc, **GREEDY)
    adaptive = AdaptiveModel(peft_model, tok)
    assert torch.equal(adaptive.generate(**enc, **GREEDY), reference)
    obs = Observer(adaptive)
    adaptive.generate(**enc, insertion_position=1, top_k=2, num_active_blocks=5, **GREEDY)
    obs.close()
    assert len(obs.blocks_run()) == 5 and set(obs.experts_per_token[3]) == {2}


def test_unknown_architecture_says_how_to_add_it():
    import transformers as tf

    model = tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=3, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match=r"does not know the architecture 'gpt2'.*register_architecture"):
        AdaptiveModel(model)
    from knob_grpo import register_architecture
    from knob_grpo.architectures import ARCHITECTURES

    register_architecture("gpt2", ArchitectureSpec(layers="transformer.h"))
    try:
        adaptive = AdaptiveModel(model)
        obs_calls = []
        handles = [blk.attn.register_forward_hook(lambda m, a, o, i=i: obs_calls.append(i)) for i, blk in enumerate(adaptive.layers)]
        space = KnobSpace(num_blocks=3, insertion_positions=(1,), max_dropped_blocks=1, min_blocks_after_insertion=1)
        adaptive = AdaptiveModel(model, knob_space=space)
        adaptive.generate(input_ids=torch.tensor([[1, 2, 3]]), num_active_blocks=2, max_new_tokens=1, do_sample=False, pad_token_id=0)
        for h in handles:
            h.remove()
        assert obs_calls == [0, 2]
    finally:
        ARCHITECTURES.pop("gpt2")


def test_importance_scores_measured_saved_and_loaded(tmp_path):
    model, tok = tiny_text_model("olmoe")
    adaptive = AdaptiveModel(model, tok)
    before = snapshot(model)
    scores = adaptive.measure_block_importance([PROMPT, "how many dots ?", "what is the shape"])
    assert scores[0] == float("inf") and len(scores) == adaptive.num_blocks
    assert all(s == s for s in scores)  # no NaN
    assert_same_state(model, before)
    # a block's score is the loss increase when it alone is dropped: check one by hand
    with adaptive.configured(dropped_blocks=[3]):
        dropped = adaptive._mean_loss([PROMPT, "how many dots ?", "what is the shape"], 8)
    full = adaptive._mean_loss([PROMPT, "how many dots ?", "what is the shape"], 8)
    assert scores[3] == pytest.approx(dropped - full, rel=1e-5, abs=1e-6)
    assert adaptive.drop_order(1)[0] == min(range(1, 6), key=lambda i: (scores[i], -i))

    adaptive.save_pretrained(str(tmp_path))
    loaded = AdaptiveModel.from_pretrained(str(tmp_path))
    assert loaded.importance_scores == scores and loaded.knob_space == adaptive.knob_space
    enc = tok([PROMPT], return_tensors="pt")
    assert torch.equal(loaded.generate(**enc, top_k=2, num_active_blocks=5, **GREEDY),
                       adaptive.generate(**enc, top_k=2, num_active_blocks=5, **GREEDY))


def test_vlm_save_and_load_keeps_tiers(tmp_path, vlm):
    vlm.save_pretrained(str(tmp_path))
    loaded = AdaptiveModel.from_pretrained(str(tmp_path))
    assert loaded.tier_pixels == vlm.tier_pixels
    knobs = dict(tier="low", top_k=2)
    assert torch.equal(loaded.generate(PROMPT, [tiny_image(12)], **knobs, **GREEDY), vlm.generate(PROMPT, [tiny_image(12)], **knobs, **GREEDY))


def test_configured_training_forward_has_gradients(vlm):
    inputs = vlm.prepare_inputs(PROMPT, [tiny_image(13)], tier="low")
    labels = inputs["input_ids"].clone()
    vlm.model.zero_grad()
    with vlm.configured(insertion_position=1, top_k=2, num_active_blocks=5) as knobs:
        loss = vlm.model(**inputs, labels=labels).loss
    loss.backward()
    assert knobs == Knobs(tier="high", insertion_position=1, top_k=2, num_active_blocks=5)
    dropped = vlm.dropped_blocks(1, 5)[0]
    layers = vlm.layers
    assert layers[dropped].self_attn.q_proj.weight.grad is None
    assert layers[0].self_attn.q_proj.weight.grad is not None
    vlm.model.zero_grad(set_to_none=True)


# --------------------------------------------------------------------------- inputs that would be silently ignored or misread
def test_dropped_blocks_are_checked_integers_and_not_beside_num_active_blocks():
    import numpy as np

    model, tok = tiny_text_model("olmoe")
    adaptive = AdaptiveModel(model, tok)
    enc = tok([PROMPT], return_tensors="pt")

    def logits(**kw):
        with adaptive.configured(**kw) as knobs:
            return model(**enc).logits, knobs

    dropped, knobs = logits(dropped_blocks=[np.int64(2)])
    assert torch.equal(dropped, logits(dropped_blocks=[2])[0]) and not torch.equal(dropped, logits()[0])
    assert knobs.num_active_blocks == adaptive.num_blocks - 1  # the knobs yielded say what runs
    for bad in ("2", 2.7, True):  # a string or float used to drop nothing, True to drop block 1
        with pytest.raises(ValueError, match=f"dropped block={bad!r} must be an integer"):
            logits(dropped_blocks=[bad])
    with pytest.raises(ValueError, match=r"num_active_blocks=6 disagrees with dropped_blocks=\[2\], which leaves 5 of 6 blocks running"):
        logits(num_active_blocks=6, dropped_blocks=[2])  # used to run with block 2 dropped and report 6 active blocks
    assert torch.equal(logits(num_active_blocks=5, dropped_blocks=[2])[0], dropped)  # a matching count is fine
    assert _active() is None


def test_knobs_of_a_removed_wrapper_are_refused_not_run_at_the_full_setting():
    model, tok = tiny_text_model("olmoe")
    first, second = AdaptiveModel(model, tok), AdaptiveModel(model, tok)  # the second reuses the first's wrappers
    cheap = second.generate(PROMPT, top_k=2, num_active_blocks=5, **GREEDY)
    first.remove()
    for adaptive in (first, second):
        with pytest.raises(RuntimeError, match=r"wrappers were removed \(AdaptiveModel.remove\(\)\)"):
            adaptive.generate(PROMPT, top_k=2, num_active_blocks=5, **GREEDY)
        with pytest.raises(RuntimeError, match="wrappers were removed"):
            with adaptive.configured(top_k=2):
                pass
    assert torch.equal(AdaptiveModel(model, tok).generate(PROMPT, top_k=2, num_active_blocks=5, **GREEDY), cheap)


def test_knob_space_refuses_a_default_top_k_that_is_not_the_models():
    model, tok = tiny_text_model("olmoe")  # top-4 of 8 experts
    n = len(AdaptiveModel(model, tok).layers)
    space = KnobSpace.from_model(n, default_top_k=2, num_experts=8, top_k_options=[1, 2])
    with pytest.raises(ValueError, match=r"default_top_k=2 differs from the model's 4"):  # its "full" setting would run top-2
        AdaptiveModel(model, tok, knob_space=space)
    with pytest.raises(ValueError, match=r"default_top_k=9 is not possible: it must be between 1 and the model's 8 experts"):
        KnobSpace(num_blocks=6, top_k_options=(2, 4), default_top_k=9, num_experts=8)
    with pytest.raises(ValueError, match=r"insertion_positions must be distinct, got \[1, 1, 2\]"):
        KnobSpace(num_blocks=6, insertion_positions=(1, 1, 2))
    with pytest.raises(ValueError, match=r"top_k_options must be distinct, got \[2, 2, 4\]"):
        KnobSpace(num_blocks=6, top_k_options=(2, 4, 2), default_top_k=4, num_experts=8)
    with pytest.raises(ValueError, match=r"top_k_options=\[2\] given for a dense model"):
        KnobSpace.from_model(6, top_k_options=[2])
    with pytest.raises(ValueError, match=r"max_dropped_blocks=1.5 must be an integer"):
        KnobSpace(num_blocks=6, max_dropped_blocks=1.5)
    with pytest.raises(ValueError, match=r"must be an integer"):
        AdaptiveModel(model, tok).generate(PROMPT, top_k=torch.tensor([2, 3]), **GREEDY)


def test_no_tier_is_the_full_tier_also_below_the_processors_own_setting():
    model, processor = tiny_vlm(moe=True)
    adaptive = AdaptiveModel(model, processor, tier_pixels={"low": 256, "medium": 1024, "high": 2048})
    image = tiny_image(1, size=64)
    assert adaptive.resolve().tier == "high"
    for text in (PROMPT, [PROMPT]):  # the processor's own cap is 64 x 64: the high tier here is below it
        none, high = (adaptive.prepare_inputs(text, [image], tier=t) for t in (None, "high"))
        assert torch.equal(none["input_ids"], high["input_ids"]) and torch.equal(none["pixel_values"], high["pixel_values"])
    assert torch.equal(adaptive.generate(PROMPT, [image], **GREEDY), adaptive.generate(PROMPT, [image], tier="high", **GREEDY))
    decided, knobs = adaptive.generate_with_decision(PROMPT, [image], decide=lambda token: (None, None), **GREEDY)
    assert knobs.tier == "high" and torch.equal(decided, adaptive.generate(PROMPT, [image], tier="high", **GREEDY))


def test_arguments_a_call_would_ignore_are_refused(vlm):
    image = tiny_image(12)
    inputs = vlm.prepare_inputs(PROMPT, [image], tier="low")
    with pytest.raises(ValueError, match=r"images=\.\.\. needs text=\.\.\."):  # the image is already in the tensors
        vlm.generate(images=[image], **inputs, **GREEDY)
    with pytest.raises(ValueError, match=r"images=\.\.\. needs text=\.\.\."):
        vlm.prefill(images=[image], insertion_position=2, **inputs)
    with pytest.raises(ValueError, match=r"prefill does not generate tokens, so max_new_tokens=5 would have no effect"):
        vlm.prefill(PROMPT, [image], tier="low", insertion_position=2, max_new_tokens=5)
    with pytest.raises(ValueError, match=r"prefill does not generate tokens, so streamer="):
        vlm.prefill(PROMPT, [image], tier="low", insertion_position=2, streamer=BaseStreamer())
    state = vlm.prefill(PROMPT, [image], tier="low", insertion_position=2)
    with pytest.raises(ValueError, match=r"generate\(prefix=\.\.\.\) continues one recorded prompt per row, so num_return_sequences=2"):
        vlm.generate(prefix=state, num_return_sequences=2, **GREEDY)
    with pytest.raises(ValueError, match=r"generate_rows continues one recorded prompt per row, so num_beams=2"):
        vlm.generate_rows(state, [dict(top_k=2)], num_beams=2, **GREEDY)
    with pytest.raises(ValueError, match=r"insertion_position='1' must be an integer"):
        vlm.generate(prefix=state, insertion_position="1", **GREEDY)
    with pytest.raises(ValueError, match=r"knobs\[0\]: insertion_position='1' must be an integer"):
        vlm.generate_rows(state, [dict(insertion_position="1")], **GREEDY)
    assert _active() is None
    # the prepared tensors alone still run, and the refused calls left nothing behind
    assert torch.equal(vlm.generate(**inputs, **GREEDY), vlm.generate(PROMPT, [image], tier="low", **GREEDY))
