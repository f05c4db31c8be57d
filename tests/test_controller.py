"""Tests for knob_grpo.controller: the two-stage controller, its distributions, persistence and
the one-call inference path on a tiny real Qwen3-VL-MoE (built from a config, nothing downloaded)."""

import collections
import json
import math
import os
import re
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModel

from knob_grpo.adaptive import AdaptiveModel, ControlledGeneration
from knob_grpo.controller import (
    ControllerConfig,
    KnobLogProbs,
    KnobSample,
    TwoStageController,
    language_features,
    prompt_features,
)
from knob_grpo.knobs import KNOB_NAMES, Knobs, KnobSpace
from tiny import tiny_image, tiny_text_model, tiny_vlm

MOLMOE_SPACE = KnobSpace.from_model(16, default_top_k=8, num_experts=64, has_vision=True)
PROMPT = "what colour is the circle ?"


# --------------------------------------------------------------------------- fixtures and helpers
@pytest.fixture(scope="module")
def vlm():
    model, processor = tiny_vlm(moe=True)
    return AdaptiveModel(model, processor)


@pytest.fixture(scope="module")
def vlm_space(vlm):
    return vlm.knob_space


def make_controller(space: KnobSpace, mode: str, *, dim: int = 32, seed: int = 0, head_scale: float = 1.0, **kw) -> TwoStageController:
    """A controller with random weights; ``head_scale`` sharpens or flattens its distributions (and
    makes ``p``'s depend on the tier, which a new controller's do not)."""
    torch.manual_seed(seed)
    ctrl = TwoStageController(ControllerConfig(knob_space=space.to_dict(), language_dim=dim, stage2_mode=mode, budget_range=(100, 400), **kw))
    with torch.no_grad():
        for name, param in ctrl.named_parameters():
            if "_head." in name or "_by_tier." in name:
                param.normal_(0.0, head_scale)
    return ctrl.eval()


def token_table(space: KnobSpace, dim: int, seed: int = 1):
    """A deterministic latency_token_fn: one fixed random vector per (tier, p)."""
    g = torch.Generator().manual_seed(seed)
    table = {(t, p): torch.randn(dim, generator=g) for t in (space.tiers or (None,)) for p in space.insertion_positions}

    def fn(tiers, ps):
        return torch.stack([table[(t, p)] for t, p in zip(tiers, ps)])

    return fn


def steer(ctrl: TwoStageController, knobs: Knobs) -> TwoStageController:
    """Make the greedy decision ``knobs`` whatever the input: zero the heads' weights, bias the target."""
    space = ctrl.knob_space
    heads = {
        "tier": (ctrl.stage1.tier_head, space.tiers),
        "insertion_position": (ctrl.stage1.insertion_position_head, space.insertion_positions),
        "top_k": (ctrl.stage2.top_k_head, space.top_k_options),
        "num_active_blocks": (ctrl.stage2.num_active_blocks_head, space.all_block_options),
    }
    with torch.no_grad():
        for name, (head, options) in heads.items():
            if head is None:
                continue
            head.weight.zero_()
            head.bias.zero_()
            head.bias[options.index(getattr(knobs, name))] = 10.0
    return ctrl


SPACES = {
    "molmoe": (MOLMOE_SPACE, 2048),
    "text_dense": (KnobSpace.from_model(8), 24),  # no tier, no top_k
    "text_moe": (KnobSpace.from_model(12, default_top_k=4, num_experts=8), 24),  # no tier
}


# --------------------------------------------------------------------------- construction and sizes
def test_config_defaults_and_for_executor(vlm):
    ctrl = TwoStageController.for_executor(vlm, stage2_mode="prompt", budget_range=(20, 90))
    cfg = ctrl.config
    assert cfg.model_type == "knob_grpo_controller"
    assert cfg.budget_range == (20.0, 90.0)
    assert cfg.language_dim == vlm.input_embeddings.embedding_dim == 32
    assert cfg.latency_token_dim == cfg.executor_hidden_size == vlm.hidden_size
    assert (cfg.executor_num_blocks, cfg.executor_num_experts) == (6, 8)
    assert KnobSpace.from_dict(cfg.knob_space) == vlm.knob_space
    assert cfg.stage2_mode == "prompt"
    assert ctrl.generation_config is not None
    with pytest.raises(ValueError, match="stage2_mode"):
        ControllerConfig(knob_space=vlm.knob_space.to_dict(), stage2_mode="budget_token")


def test_parameter_counts_at_molmoe_width():
    for mode in ("latency_token", "prompt"):
        ctrl = TwoStageController(ControllerConfig(knob_space=MOLMOE_SPACE.to_dict(), language_dim=2048, stage2_mode=mode))
        counts = ctrl.num_parameters_per_stage()
        assert 0.8e6 <= counts["stage1"] <= 1.2e6, counts
        assert 0.3e6 <= counts["stage2"] <= 0.7e6, counts
        assert counts["total"] == sum(p.numel() for p in ctrl.parameters())


# --------------------------------------------------------------------------- features
def test_language_features_mean_pool_real_tokens_only(vlm):
    emb = vlm.input_embeddings
    ids = torch.tensor([[0, 0, 11, 12, 13], [11, 12, 13, 14, 15]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    feats = language_features(vlm, ids, mask)
    assert feats.shape == (2, 32) and not feats.requires_grad
    torch.testing.assert_close(feats[0], emb.weight[[11, 12, 13]].mean(0).detach())
    torch.testing.assert_close(feats[1], emb.weight[[11, 12, 13, 14, 15]].mean(0).detach())
    both = prompt_features(vlm, [PROMPT, "how many dots"])
    torch.testing.assert_close(both[1], prompt_features(vlm, "how many dots")[0])
    # the embedding table is the executor's, never a controller submodule
    ctrl = TwoStageController.for_executor(vlm)
    assert all(p is not emb.weight for p in ctrl.parameters())


def test_prompt_features_tokenise_as_the_tokenizer_does(vlm):
    """One prompt at a time goes through the fast tokenizer's backend (cheaper inside a request):
    the same ids, so the same feature, as the tokenizer's own call."""
    tok = vlm.tokenizer
    assert tok.is_fast
    for text in (PROMPT, "how many dots", "zzz unseen words ?", ""):
        enc = tok(text, return_tensors="pt")
        expected = language_features(vlm, enc["input_ids"], enc["attention_mask"])
        torch.testing.assert_close(prompt_features(vlm, text), expected, rtol=0, atol=0)


# --------------------------------------------------------------------------- greedy decisions in NumPy
def serve(ctrl: TwoStageController, executor: AdaptiveModel, texts: list[str], budgets: list[float], tokens: torch.Tensor) -> list:
    """A server's greedy decisions, one request at a time: stage 1, then stage 2 on a latency token."""
    out = []
    for text, budget, token in zip(texts, budgets, tokens):
        tier, p, decide = ctrl.decide_for_request(executor, text, budget)
        out.append((tier, p, decide(token[None])))
    return out


def serve_both_ways(ctrl: TwoStageController, *args) -> tuple[list, list]:
    """``serve`` with the NumPy greedy path, and with it switched off (PyTorch decides)."""
    fast = serve(ctrl, *args)
    ctrl._numpy_decisions = False
    try:
        return fast, serve(ctrl, *args)
    finally:
        ctrl._numpy_decisions = True


@pytest.mark.parametrize("mode", ["latency_token", "prompt"])
@pytest.mark.parametrize("space_name", ["molmoe", "text_dense", "tiny_vlm"])
def test_numpy_greedy_decisions_equal_the_pytorch_ones(space_name, mode, vlm):
    space = vlm.knob_space if space_name == "tiny_vlm" else SPACES[space_name][0]
    ctrl = make_controller(space, mode, dim=vlm.input_embeddings.embedding_dim, head_scale=3.0)
    with torch.no_grad():  # every parameter random (layer norms included), the heads' biases zero so the inputs decide
        for name, param in ctrl.named_parameters():
            param.copy_(torch.zeros_like(param) if "_head.bias" in name else param + torch.randn_like(param) * 0.1)
    assert ctrl._numpy_greedy() is not None  # float32 on the CPU: NumPy decides
    g = torch.Generator().manual_seed(0)
    n = 40
    words = ["what", "colour", "is", "the", "shape", "how", "many", "dots", "?", "red", "circle", "square", "7"]
    texts = [" ".join(words[int(i)] for i in torch.randint(len(words), (int(k),), generator=g))
             for k in torch.randint(0, 9, (n,), generator=g)]  # an empty prompt among them
    tokens = torch.randn(n, ctrl.config.latency_token_dim, generator=g)
    budgets = torch.empty(n).uniform_(60, 450, generator=g).tolist()  # inside and outside the trained 100-400
    args = (vlm, texts, budgets, tokens)
    fast, slow = serve_both_ways(ctrl, *args)
    assert fast == slow
    assert len(set(fast)) >= 3  # the inputs reach several decisions, so the equality says something
    # the same as the batch API's decisions on prompt_features
    language = prompt_features(vlm, texts)
    assert [d[:2] for d in fast] == ctrl.decide_stage1(language, budgets)
    # with a latency scale
    ctrl.latency_scale = 1.7
    fast, slow = serve_both_ways(ctrl, *args)
    assert fast == slow and [d[:2] for d in fast] == ctrl.decide_stage1(language, budgets)
    before = fast

    def favour_another_p(decisions: list) -> torch.Tensor:
        """A bias for p's head that makes the first request's p another one (whatever the features)."""
        options = space.insertion_positions
        bias = torch.zeros(len(options), dtype=ctrl.stage1.insertion_position_head.bias.dtype)
        bias[next(i for i, p in enumerate(options) if p != decisions[0][1])] = 1e3
        return bias

    # an in-place update (an optimizer step) shows through the NumPy views
    with torch.no_grad():
        ctrl.stage1.insertion_position_head.bias.copy_(favour_another_p(before))
    fast, slow = serve_both_ways(ctrl, *args)
    assert fast == slow and fast != before
    # new storage (.double() and back) gets new views: updates made meanwhile are seen
    before = fast
    ctrl.double()
    assert ctrl._numpy_greedy() is None  # float64: PyTorch decides
    with torch.no_grad():
        ctrl.stage1.insertion_position_head.bias.copy_(favour_another_p(before))
    ctrl.float()
    fast, slow = serve_both_ways(ctrl, *args)
    assert fast == slow and fast != before
    # and so does load_state_dict(assign=True), which replaces the parameters
    before = fast
    state = {k: v.clone() for k, v in ctrl.state_dict().items()}
    state["stage1.insertion_position_head.bias"] = favour_another_p(before)
    ctrl.load_state_dict(state, assign=True)
    fast, slow = serve_both_ways(ctrl, *args)
    assert fast == slow and fast != before
    # as does a parameter replaced by assignment
    before = fast
    ctrl.stage1.insertion_position_head.bias = torch.nn.Parameter(favour_another_p(before))
    fast, slow = serve_both_ways(ctrl, *args)
    assert fast == slow and fast != before
    # and a layer replaced by another (a new head, a wrapper), whose parameters the old views never saw
    before = fast
    head = torch.nn.Linear(ctrl.config.hidden_size, len(space.insertion_positions))
    with torch.no_grad():
        head.weight.zero_()
        head.bias.copy_(favour_another_p(before))
    ctrl.stage1.insertion_position_head = head
    fast, slow = serve_both_ways(ctrl, *args)
    assert fast == slow and fast != before
    if mode == "latency_token":
        with pytest.raises(ValueError, match=re.escape("latency tokens must be (1, ")):
            ctrl.decide_for_request(vlm, PROMPT, 200.0)[2](tokens[:2])


def test_inputs_the_controller_would_misread_are_refused(vlm):
    """Values the controller used to convert, copy through or decide on silently: a fractional p,
    tiers it does not have, group sizes that are not counts, budgets of the wrong shape, NaN
    features, misspelt or impossible sizes, and an executor the overhead is measured on."""
    from knob_grpo.profiling import measure_decision_overhead

    ctrl = make_controller(vlm.knob_space, "latency_token")
    lang = torch.randn(2, 32)
    with pytest.raises(ValueError, match=r"insertion_position=1.9 must be an integer"):  # was decided as p = 1
        ctrl.stage2_decider(lang[:1], 150.0, "low", 1.9)
    with pytest.raises(ValueError, match=r"tier='bogus' is not allowed; allowed values: 'low', 'medium', 'high'"):
        ctrl.decide_stage2(lang, 150.0, [Knobs(tier="bogus", insertion_position=1)] * 2, latency_tokens=torch.randn(2, 32))
    with pytest.raises(ValueError, match=r"tier='bogus' is not allowed"):
        ctrl.stage2_decider(lang[:1], 150.0, "bogus", 1)
    with pytest.raises(ValueError, match=r"got 3 tiers for 2 rows"):
        ctrl.decide_insertion_position(lang, 150.0, ["low", "high", "high"])
    text_only = make_controller(SPACES["text_moe"][0], "prompt", dim=32)
    with pytest.raises(ValueError, match=r"no 'tier' knob"):  # was ignored, and copied into the tuples returned
        text_only.decide_insertion_position(lang, 150.0, ["high", None])
    with pytest.raises(ValueError, match=r"no 'tier' knob"):
        text_only.decide_stage2(lang, 150.0, [Knobs(tier="high", insertion_position=1)] * 2)
    assert text_only.decide_insertion_position(lang, 150.0, [None, None]) == text_only.decide_insertion_position(lang, 150.0, None)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=rf"num_generations={bad!r} must be an integer >= 1"):
            ctrl.log_probs([vlm.knob_space.full()] * 2, lang, 150.0, latency_tokens=torch.randn(2, 32), num_generations=bad)
        with pytest.raises(ValueError, match=rf"num_generations={bad!r} must be an integer >= 1"):
            text_only.sample(lang, 150.0, num_generations=bad)
    assert text_only.decide(lang, np.array(150.0)) == text_only.decide(lang, 150.0)  # a 0-d array is one budget
    with pytest.raises(ValueError, match=r"one number or one per request, got an array of shape \(2, 2\)"):
        text_only.decide(lang, torch.full((2, 2), 150.0))  # was flattened into four budgets
    with pytest.raises(ValueError, match="language features contain NaN"):  # the argmax of NaN logits is option 0
        text_only.decide(torch.full((2, 32), float("nan")), 150.0)
    with pytest.raises(ValueError, match="latency tokens contain NaN"):
        ctrl.decide_for_request(vlm, PROMPT, 150.0)[2](torch.full((1, 32), float("nan")))
    with pytest.raises(ValueError, match="latency tokens contain NaN"):
        ctrl.decide(lang, 150.0, latency_token_fn=lambda tiers, ps: torch.full((2, 32), float("nan")))
    with pytest.raises(ValueError, match=r"hiden_size=8 is not a ControllerConfig setting"):  # was kept as an unused attribute
        TwoStageController.for_executor(vlm, hiden_size=8)
    with pytest.raises(ValueError, match=r"clamp_budget='no' must be True or False"):
        TwoStageController.for_executor(vlm, clamp_budget="no")
    with pytest.raises(ValueError, match=r"hidden_size=0 must be a positive integer"):
        TwoStageController.for_executor(vlm, hidden_size=0)
    other = make_controller(SPACES["text_moe"][0], "prompt", dim=32)
    with pytest.raises(ValueError, match="does not fit this executor"):
        measure_decision_overhead(vlm, other, [PROMPT])


# --------------------------------------------------------------------------- sampling validity
@pytest.mark.parametrize("mode", ["latency_token", "prompt"])
@pytest.mark.parametrize("space_name", ["molmoe", "text_dense", "text_moe", "tiny_vlm"])
def test_sampling_never_yields_an_invalid_tuple(space_name, mode, vlm_space):
    space, dim = (vlm_space, 32) if space_name == "tiny_vlm" else SPACES[space_name]
    seen = set()
    for seed in range(12):
        ctrl = make_controller(space, mode, dim=dim, seed=seed, head_scale=[0.1, 1.0, 10.0][seed % 3])
        g = torch.Generator().manual_seed(seed)
        lang = torch.randn(4, dim, generator=g) * (1 + seed)
        budgets = torch.rand(4, generator=g) * 800 + 1  # in and outside the (100, 400) training range
        fn = (lambda t, p: torch.randn(len(p), dim, generator=g)) if mode == "latency_token" else None
        sample = ctrl.sample(lang, budgets, num_generations=16, latency_token_fn=fn, generator=g)
        assert isinstance(sample, KnobSample) and len(sample.knobs) == 64
        for knobs in sample.knobs:
            assert space.validate(knobs) == knobs  # valid, and no knob left unset
            seen.add(knobs)
        assert torch.isfinite(sample.log_prob).all()
        for name in KNOB_NAMES:
            if not space.has(name):
                assert (sample.log_probs[name] == 0).all()
                assert all(getattr(k, name) is None for k in sample.knobs)
    assert len(seen) > 1


def test_sampling_is_request_major_and_reproducible(vlm_space):
    ctrl = make_controller(vlm_space, "prompt", head_scale=2.0)
    lang = torch.randn(3, 32)
    a = ctrl.sample(lang, [150, 250, 350], num_generations=5, generator=torch.Generator().manual_seed(0))
    b = ctrl.sample(lang, [150, 250, 350], num_generations=5, generator=torch.Generator().manual_seed(0))
    assert a.knobs == b.knobs and torch.equal(a.log_prob, b.log_prob)
    # a sample's log-probs are those log_probs() recomputes for the same rows
    lp = ctrl.log_probs(a.knobs, lang, [150, 250, 350], num_generations=5)
    torch.testing.assert_close(lp.total.detach(), a.log_prob)
    # rows i*G .. i*G+G-1 belong to request i: repeating the features row-wise gives the same numbers
    lp_rows = ctrl.log_probs(a.knobs, lang.repeat_interleave(5, 0), torch.tensor([150, 250, 350]).repeat_interleave(5))
    torch.testing.assert_close(lp_rows.total, lp.total)


# --------------------------------------------------------------------------- the distribution
@pytest.mark.parametrize("mode", ["latency_token", "prompt"])
def test_log_prob_is_sum_of_decisions_and_matches_sampling(mode, vlm_space):
    space = vlm_space
    ctrl = make_controller(space, mode, seed=3, head_scale=1.5)
    fn = token_table(space, 32)
    lang = torch.randn(1, 32, generator=torch.Generator().manual_seed(5))
    budget = 230.0

    configs = list(space.all_configs())
    tokens = fn([k.tier for k in configs], [k.insertion_position for k in configs])
    lp = ctrl.log_probs(configs, lang.expand(len(configs), -1), budget, latency_tokens=tokens if mode == "latency_token" else None)
    assert isinstance(lp, KnobLogProbs)
    torch.testing.assert_close(lp.total, sum(lp.per_decision[n] for n in KNOB_NAMES))
    probs = lp.total.detach().exp()
    assert abs(float(probs.sum()) - 1.0) < 1e-5  # a distribution over exactly the valid tuples
    assert float(probs.min()) > 0

    n = 40000
    sample = ctrl.sample(lang, budget, num_generations=n, latency_token_fn=fn, generator=torch.Generator().manual_seed(7))
    counts = collections.Counter(sample.knobs)
    assert set(counts) <= set(configs)
    for knobs, p in zip(configs, probs.tolist()):
        freq = counts.get(knobs, 0) / n
        tol = 5 * math.sqrt(p * (1 - p) / n) + 1e-3
        assert abs(freq - p) <= tol, (knobs, freq, p)
    # and each sampled row's reported log-prob is the tuple's log-prob
    lookup = dict(zip(configs, lp.total.detach().tolist()))
    for knobs, value in list(zip(sample.knobs, sample.log_prob.tolist()))[:500]:
        assert abs(lookup[knobs] - value) < 1e-5


def test_insertion_position_is_drawn_given_the_tier(vlm_space):
    """``p``'s distribution depends on the tier drawn with it; ``forward(tiers=...)`` gives the
    logits ``log_probs`` scores a tuple with (the trainer's loss reads them), the likeliest tier's
    by default; and a new controller starts with ``p`` independent of the tier."""
    space = vlm_space
    ctrl = make_controller(space, "prompt", seed=4, head_scale=2.0)
    lang = torch.randn(1, 32, generator=torch.Generator().manual_seed(3))
    by_tier = {}
    for tier in space.tiers:
        rows = [Knobs(tier, p, space.top_k_options[0], space.num_blocks) for p in space.insertion_positions]
        lp = ctrl.log_probs(rows, lang.expand(len(rows), -1), 250.0).per_decision["insertion_position"]
        out = ctrl(lang, 250.0, tiers=[tier])
        torch.testing.assert_close(torch.log_softmax(out.insertion_position_logits, -1)[0], lp)
        by_tier[tier] = lp.exp()
    assert not torch.allclose(by_tier[space.tiers[0]], by_tier[space.tiers[-1]], atol=1e-2)
    likeliest = space.tiers[int(ctrl(lang, 250.0).tier_logits.argmax())]
    torch.testing.assert_close(torch.softmax(ctrl(lang, 250.0).insertion_position_logits, -1)[0], by_tier[likeliest])
    with pytest.raises(ValueError, match="tier='ultra'"):
        ctrl(lang, 250.0, tiers=["ultra"])
    fresh = TwoStageController(ControllerConfig(knob_space=space.to_dict(), language_dim=32, budget_range=(100, 400)))
    logits = [fresh(lang, 250.0, tiers=[t]).insertion_position_logits for t in space.tiers]
    assert all(torch.equal(x, logits[0]) for x in logits)


@pytest.mark.parametrize("mode", ["latency_token", "prompt"])
def test_molmoe_space_distribution_sums_to_one(mode):
    ctrl = make_controller(MOLMOE_SPACE, mode, dim=2048, seed=1, head_scale=0.5)
    configs = list(MOLMOE_SPACE.all_configs())
    fn = token_table(MOLMOE_SPACE, 2048)
    tokens = fn([k.tier for k in configs], [k.insertion_position for k in configs]) if mode == "latency_token" else None
    lang = torch.randn(1, 2048).expand(len(configs), -1)
    lp = ctrl.log_probs(configs, lang, 300.0, latency_tokens=tokens)
    assert abs(float(lp.total.detach().exp().sum()) - 1.0) < 1e-4


def test_masked_block_options_have_probability_exactly_zero():
    space = MOLMOE_SPACE
    ctrl = make_controller(space, "latency_token", dim=64, head_scale=5.0)
    ps = list(space.insertion_positions)
    out = ctrl(torch.randn(len(ps), 64), 250.0, insertion_positions=ps, latency_tokens=torch.randn(len(ps), 64))
    logits = out.num_active_blocks_logits
    probs = torch.softmax(logits, -1)
    for row, p in enumerate(ps):
        for col, b in enumerate(space.all_block_options):
            if b in space.block_options(p):
                assert probs[row, col] > 0
            else:
                assert probs[row, col].item() == 0.0 and logits[row, col].item() == float("-inf")
    # an invalid tuple has no log-prob: it is refused
    with pytest.raises(ValueError, match="num_active_blocks=12"):
        ctrl.log_probs([Knobs("low", 5, 8, 12)], torch.randn(1, 64), 250.0, latency_tokens=torch.randn(1, 64))
    # gradients through the masked head and the entropies stay finite
    lp = ctrl.log_probs([Knobs("low", p, 8, 16) for p in ps], torch.randn(len(ps), 64), 250.0, latency_tokens=torch.randn(len(ps), 64))
    assert torch.isfinite(lp.entropy["num_active_blocks"]).all()
    assert lp.entropy["num_active_blocks"][-1].item() == 0.0  # p=5 allows 16 blocks only
    (lp.total.sum() + lp.entropy_total.sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in ctrl.parameters() if p.grad is not None)


@pytest.mark.parametrize("mode", ["latency_token", "prompt"])
def test_stage1_exploration_draws_from_the_mixture_and_reports_its_log_probs(mode, vlm_space):
    """With ``stage1_exploration=e`` stage 1 draws from ``(1 - e) * policy + e * uniform``: an option
    the policy all but excludes is drawn about ``e / options`` of the time, and each row reports the
    log-probability of the mixture for stage 1 and of the policy for stage 2."""
    space = vlm_space
    ctrl = steer(make_controller(space, mode), Knobs(space.tiers[-1], space.insertion_positions[-1], space.top_k_options[0], space.num_blocks))
    fn = token_table(space, 32)
    lang = torch.randn(1, 32, generator=torch.Generator().manual_seed(2))
    n, e = 20000, 0.3
    plain = ctrl.sample(lang, 250.0, num_generations=n, latency_token_fn=fn, generator=torch.Generator().manual_seed(0))
    assert all(k.tier == space.tiers[-1] for k in plain.knobs[:2000])  # bias 10: the others have probability ~5e-5 each
    mixed = ctrl.sample(lang, 250.0, num_generations=n, latency_token_fn=fn, generator=torch.Generator().manual_seed(0),
                        stage1_exploration=e)
    policy = ctrl.log_probs(mixed.knobs, lang, 250.0, num_generations=n, latency_tokens=mixed.latency_tokens)
    for name, options in (("tier", space.tiers), ("insertion_position", space.insertion_positions)):
        drawn = collections.Counter(getattr(k, name) for k in mixed.knobs)
        for option in options[:-1]:  # options the policy excludes: the floor alone
            share = e / len(options)
            assert abs(drawn[option] / n - share) < 5 * math.sqrt(share * (1 - share) / n), (name, option, drawn)
        mixture = torch.log((1 - e) * policy.per_decision[name].exp() + e / len(options))
        torch.testing.assert_close(mixed.log_probs[name], mixture.detach())
    for name in ("top_k", "num_active_blocks"):  # stage 2 still samples its policy
        torch.testing.assert_close(mixed.log_probs[name], policy.per_decision[name].detach())
    assert all(space.validate(k) == k for k in mixed.knobs[:2000])
    assert ctrl.decide(lang, 250.0, latency_token_fn=fn)[0].tier == space.tiers[-1]  # greedy decisions have no floor
    for bad in (1.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match=re.escape(f"stage1_exploration={bad!r} must be a number in [0, 1)")):
            ctrl.sample(lang, 250.0, latency_token_fn=fn, stage1_exploration=bad)


# --------------------------------------------------------------------------- budgets
@pytest.mark.parametrize("bad", [0, -5, float("nan"), float("inf")])
def test_bad_budgets_raise_naming_the_value(bad, vlm_space):
    ctrl = make_controller(vlm_space, "prompt")
    lang = torch.randn(2, 32)
    pattern = re.escape(repr(float(bad)))
    with pytest.raises(ValueError, match=pattern):
        ctrl.decide(lang, bad)
    with pytest.raises(ValueError, match=pattern):
        ctrl.sample(lang, [200.0, bad])
    with pytest.raises(ValueError, match=pattern):
        ctrl.log_probs([vlm_space.full()] * 2, lang, torch.tensor([bad, 200.0]))


@pytest.mark.parametrize("bad", ["45", "abc", None, True, b"4"])
def test_budgets_that_are_not_numbers_raise_naming_the_value(bad, vlm_space):
    """A string used to be read one character per request ("45" -> 4 and 5 ms), a bool as 1 ms."""
    ctrl = make_controller(vlm_space, "prompt")
    lang = torch.randn(2, 32)
    pattern = re.escape(f"latency budget {bad!r} is not allowed")
    for budgets in (bad, [200.0, bad]):
        with pytest.raises(ValueError, match=pattern):
            ctrl.decide(lang, budgets)
    with pytest.raises(ValueError, match="latency budget tensor"):
        ctrl.decide(lang, torch.tensor([True, False]))
    for flags in (np.True_, np.array([True, False])):
        with pytest.raises(ValueError, match=r"latency budget (np\.)?True_? is not allowed"):
            ctrl.decide(lang, flags)


def test_budgets_outside_the_range_behave_like_its_ends(vlm_space):
    ctrl = make_controller(vlm_space, "prompt", head_scale=3.0)
    lang = torch.randn(4, 32)
    configs = [vlm_space.cheapest(), vlm_space.full()] * 2
    at_max = ctrl.log_probs(configs, lang, 400.0).total
    torch.testing.assert_close(ctrl.log_probs(configs, lang, 1e6).total, at_max)
    torch.testing.assert_close(ctrl.log_probs(configs, lang, 1.0).total, ctrl.log_probs(configs, lang, 100.0).total)
    assert ctrl.decide(lang, 5e4) == ctrl.decide(lang, 400.0)
    # without clamping the encoding extrapolates: a far budget is no longer the maximum's
    free = make_controller(vlm_space, "prompt", head_scale=3.0, clamp_budget=False)
    assert not torch.allclose(free.log_probs(configs, lang, 1234.5).total, free.log_probs(configs, lang, 400.0).total)


@pytest.mark.parametrize("mode", ["latency_token", "prompt"])
def test_greedy_decisions_below_the_range_are_the_cheapest_configuration(mode, vlm, tmp_path, monkeypatch):
    """Every greedy path gives a budget read below the trained range the cheapest configuration
    (below_range="cheapest", the default), after the latency scale, and the request runs as a plain
    generate; sampling stays the policy's, and below_range="decide" decides there as at the range's
    lower end."""
    space = vlm.knob_space
    full, cheapest = space.full(), space.cheapest()
    ctrl = steer(TwoStageController.for_executor(vlm, stage2_mode=mode, budget_range=(100, 400)), full)
    assert ctrl.config.below_range == "cheapest" and cheapest != full
    lang = prompt_features(vlm, [PROMPT, PROMPT])
    zeros = torch.zeros(2, ctrl.config.latency_token_dim)
    tokens = token_table(space, ctrl.config.latency_token_dim)
    budgets = [99.0, 100.0]
    assert ctrl.decide(lang, budgets, latency_token_fn=tokens) == [cheapest, full]
    assert ctrl.decide_stage1(lang, budgets) == [(cheapest.tier, cheapest.insertion_position), (full.tier, full.insertion_position)]
    assert ctrl.decide_insertion_position(lang, budgets, ["high", "high"]) == [cheapest.insertion_position, full.insertion_position]
    after_full_p = Knobs("high", full.insertion_position, space.top_k_options[0], space.block_options(full.insertion_position)[0])
    assert ctrl.decide_stage2(lang, budgets, [Knobs("high", full.insertion_position)] * 2, latency_tokens=zeros) == [after_full_p, full]
    assert ctrl.stage2_decider(lang[:1], 99.0, "high", full.insertion_position)(zeros[:1]) == (after_full_p.top_k, after_full_p.num_active_blocks)
    for numpy_decisions in (True, False):  # the one-request path a server and the evaluation take, both implementations
        ctrl.__dict__["_numpy_decisions"] = numpy_decisions
        for budget, knobs in ((99.0, cheapest), (100.0, full)):
            tier, p, decide = ctrl.decide_for_request(vlm, PROMPT, budget)
            assert Knobs(tier, p, *decide(zeros[:1])) == knobs
    del ctrl.__dict__["_numpy_decisions"]
    ctrl.latency_scale = 1.5  # 149 ms now reads as 99.3
    assert ctrl.decide(lang, [149.0, 150.0], latency_token_fn=tokens) == [cheapest, full]
    assert [ctrl.reads_latency_token(b) for b in (149.0, 150.0)] == [False, mode == "latency_token"]
    kwargs = dict(max_new_tokens=2, do_sample=False)
    with monkeypatch.context() as patched:  # all four knobs are known before the generate: no split one
        patched.setattr(vlm, "generate_with_decision", lambda *a, **k: pytest.fail("a split generate below the range"))
        out, chosen = ctrl.decide_and_generate(vlm, PROMPT, [tiny_image(1)], 149.0, **kwargs)
    assert chosen == [cheapest]
    assert torch.equal(out, vlm.generate(PROMPT, [tiny_image(1)], **cheapest.as_dict(), **kwargs))
    ctrl.latency_scale = 1.0
    # training is unchanged: sampling below the range draws from the policy as at the lower end
    drawn = [ctrl.sample(lang, b, num_generations=4, latency_token_fn=tokens, generator=torch.Generator().manual_seed(3)).knobs
             for b in (50.0, 100.0)]
    assert drawn[0] == drawn[1] and cheapest not in drawn[0]
    # "decide", saved with the checkpoint: the policy's decision, as at the lower end
    ctrl.config.below_range = "decide"
    ctrl.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert loaded.config.below_range == "decide"
    assert loaded.decide(lang, budgets, latency_token_fn=tokens) == [full, full]
    tier, p, decide = loaded.decide_for_request(vlm, PROMPT, 50.0)
    assert Knobs(tier, p, *decide(zeros[:1])) == full
    with pytest.raises(ValueError, match=r"below_range='clamp' is not one of 'cheapest', 'decide'"):
        TwoStageController.for_executor(vlm, below_range="clamp")
    loaded.config.below_range = "Cheapest"  # set after construction: refused when read, not taken for "decide"
    with pytest.raises(ValueError, match=r"below_range='Cheapest' is not one of 'cheapest', 'decide'"):
        loaded.decide(lang, budgets, latency_token_fn=tokens)


def test_latency_scale_reads_each_budget_as_that_many_times_smaller(vlm_space, tmp_path):
    ctrl = make_controller(vlm_space, "prompt", head_scale=3.0)
    lang = torch.randn(4, 32)
    configs = [vlm_space.cheapest(), vlm_space.full()] * 2
    budgets = [150.0, 220.0, 300.0, 390.0]
    unscaled = ctrl.log_probs(configs, lang, budgets).total
    as_smaller = ctrl.log_probs(configs, lang, [b / 1.25 for b in budgets]).total
    decisions = ctrl.decide(lang, [b / 1.25 for b in budgets])
    assert not torch.allclose(unscaled, as_smaller)  # the budgets differ for this policy
    ctrl.latency_scale = 1.25
    torch.testing.assert_close(ctrl.log_probs(configs, lang, budgets).total, as_smaller)
    assert ctrl.decide(lang, budgets) == decisions
    for bad in (0, -1.0, float("nan"), float("inf"), "fast", None):
        with pytest.raises(ValueError, match=re.escape(f"latency_scale={bad!r}")):
            ctrl.latency_scale = bad
    assert ctrl.latency_scale == 1.25  # a refused value leaves it as it was
    # a property of the device it runs on, not of the policy: not saved with the checkpoint
    ctrl.save_pretrained(tmp_path)
    assert AutoModel.from_pretrained(tmp_path).latency_scale == 1.0


# --------------------------------------------------------------------------- persistence
@pytest.mark.parametrize("mode", ["latency_token", "prompt"])
def test_save_and_auto_load_give_identical_decisions_and_log_probs(mode, vlm, tmp_path):
    torch.manual_seed(11)
    ctrl = TwoStageController.for_executor(vlm, stage2_mode=mode, budget_range=(30, 300))
    with torch.no_grad():
        for p in ctrl.parameters():
            p.add_(torch.randn_like(p))  # move away from the near-uniform initial policy
    ctrl.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, ControllerConfig) and config.knob_space == ctrl.config.knob_space
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, TwoStageController)

    space = vlm.knob_space
    fn = token_table(space, 32)
    lang = torch.randn(6, 32)
    budgets = [20, 60, 120, 180, 250, 900]
    assert loaded.decide(lang, budgets, latency_token_fn=fn) == ctrl.decide(lang, budgets, latency_token_fn=fn)
    sample = ctrl.sample(lang, budgets, num_generations=4, latency_token_fn=fn, generator=torch.Generator().manual_seed(0))
    again = loaded.sample(lang, budgets, num_generations=4, latency_token_fn=fn, generator=torch.Generator().manual_seed(0))
    assert sample.knobs == again.knobs
    a = ctrl.log_probs(sample.knobs, lang, budgets, num_generations=4, latency_tokens=sample.latency_tokens)
    b = loaded.log_probs(sample.knobs, lang, budgets, num_generations=4, latency_tokens=sample.latency_tokens)
    assert torch.equal(a.total, b.total)
    for name in KNOB_NAMES:
        assert torch.equal(a.per_decision[name], b.per_decision[name])
        assert torch.equal(a.entropy[name], b.entropy[name])
    loaded.check_executor(vlm)


def test_push_to_hub_uploads_config_and_weights(vlm, monkeypatch):
    """``push_to_hub`` runs transformers' own code up to the upload. The Hub's servers cannot be
    reached here; these patches stand in for them: ``create_repo`` and ``create_commit`` record
    the call and the bytes of every file, and the model-card lookup answers "no README yet"."""
    import huggingface_hub
    from huggingface_hub import RepoUrl
    from huggingface_hub.errors import EntryNotFoundError

    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        files = {}
        for op in operations:
            with open(op.path_or_fileobj, "rb") as f:
                files[op.path_in_repo] = f.read()
        calls["create_commit"] = (repo_id, files, kwargs)
        return "stand-in commit"

    def no_readme(*args, **kwargs):
        raise EntryNotFoundError("stand-in Hub: the repository has no README.md yet")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    monkeypatch.setattr(huggingface_hub.repocard, "hf_hub_download", no_readme)

    ctrl = TwoStageController.for_executor(vlm)
    ctrl.push_to_hub("someone/knob-controller")
    assert calls["create_repo"][0] == "someone/knob-controller"
    repo_id, files, kwargs = calls["create_commit"]
    assert repo_id == "someone/knob-controller"
    assert json.loads(files["config.json"])["model_type"] == "knob_grpo_controller"
    assert json.loads(files["config.json"])["knob_space"] == vlm.knob_space.to_dict()
    assert "model.safetensors" in files and len(files["model.safetensors"]) > 1000
    assert "README.md" in files


# --------------------------------------------------------------------------- executor checks
def test_controller_refuses_another_executor(vlm):
    ctrl = TwoStageController.for_executor(vlm)
    ctrl.check_executor(vlm)
    model, processor = tiny_vlm(moe=True, num_layers=4)
    other = AdaptiveModel(model, processor)
    with pytest.raises(ValueError, match=r"blocks: controller 6, executor 4"):
        ctrl.check_executor(other)
    with pytest.raises(ValueError, match="does not fit this executor"):
        other.generate(PROMPT, [tiny_image(0)], latency_budget=100.0, controller=ctrl, max_new_tokens=2)
    text_model, tok = tiny_text_model("olmoe")
    with pytest.raises(ValueError, match="knob space"):
        ctrl.check_executor(AdaptiveModel(text_model, tok))


# --------------------------------------------------------------------------- one-call inference
class Probe:
    """Plain torch forward hooks on the text decoder: prompt passes per block, experts per token."""

    def __init__(self, adaptive: AdaptiveModel) -> None:
        self.attn_lengths = collections.defaultdict(list)  # block -> sequence length of each call
        self.experts = collections.defaultdict(set)  # block -> experts per token seen
        self.vision_calls = 0
        self.handles = []
        for i, layer in enumerate(adaptive.layers):
            self.handles.append(layer.self_attn.register_forward_hook(self._attn(i), with_kwargs=True))
            self.handles.append(layer.mlp.experts.register_forward_hook(self._experts(i), with_kwargs=True))
        self.handles.append(adaptive.vision_tower.patch_embed.register_forward_hook(self._vision))  # real vision compute

    def _attn(self, i):
        def hook(module, args, kwargs, output):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            self.attn_lengths[i].append(hidden.shape[1])

        return hook

    def _experts(self, i):
        def hook(module, args, kwargs, output):
            index = kwargs["top_k_index"] if "top_k_index" in kwargs else args[1]
            self.experts[i].add(index.shape[-1])

        return hook

    def _vision(self, module, args, output):
        self.vision_calls += 1

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize(
    "mode,target",
    [
        ("latency_token", Knobs("low", 1, 2, 5)),
        ("latency_token", Knobs("medium", 2, 3, 6)),
        ("prompt", Knobs("low", 1, 3, 5)),
        ("prompt", Knobs("high", 2, 2, 6)),
    ],
)
def test_one_call_generate_runs_the_chosen_configuration(mode, target, vlm):
    ctrl = steer(TwoStageController.for_executor(vlm, stage2_mode=mode, budget_range=(10, 200)), target)
    image = tiny_image(2)
    kwargs = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)
    prompt_len = vlm.prepare_inputs(PROMPT, [image], tier=target.tier)["input_ids"].shape[1]

    probe = Probe(vlm)
    try:
        result = vlm.generate(PROMPT, [image], latency_budget=80.0, controller=ctrl, **kwargs)
    finally:
        probe.remove()
    assert isinstance(result, ControlledGeneration)
    assert result.knobs == [target]
    p, k, b = target.insertion_position, target.top_k, target.num_active_blocks

    ran = sorted(probe.attn_lengths)
    assert len(ran) == b  # (c) the number of blocks that ran is num_active_blocks
    assert set(range(vlm.num_blocks)) - set(ran) == set(vlm.dropped_blocks(p, b))
    assert set(range(p)) <= set(ran)
    for i in ran:  # (a) every block that ran, 0..p-1 included, processed the prompt exactly once
        assert probe.attn_lengths[i].count(prompt_len) == 1, (i, probe.attn_lengths[i])
        assert probe.attn_lengths[i].count(1) == 2  # and each of the two decode steps
    for i in ran:  # (b) experts per token: the default before p, the chosen top_k from p on
        assert probe.experts[i] == ({vlm.default_top_k} if i < p else {k}), (i, probe.experts[i])
    assert probe.vision_calls == 1  # the image is encoded once

    # (d) the same tokens as a plain generate with the chosen knobs
    direct = vlm.generate(PROMPT, [image], **target.as_dict(), **kwargs)
    assert torch.equal(result.output, direct)


def test_one_call_generate_on_a_batch_keeps_the_order(vlm):
    ctrl = steer(TwoStageController.for_executor(vlm, stage2_mode="latency_token", budget_range=(10, 200)), Knobs("low", 1, 2, 5))
    texts = [PROMPT, "how many dots ?"]
    images = [tiny_image(3), tiny_image(4)]
    result = vlm.generate(texts, images, latency_budget=[50.0, 150.0], controller=ctrl, max_new_tokens=3, do_sample=False)
    assert isinstance(result.output, list) and len(result.output) == 2
    assert result.knobs == [Knobs("low", 1, 2, 5)] * 2
    for text, image, out in zip(texts, images, result.output):
        assert torch.equal(out, vlm.generate(text, [image], **result.knobs[0].as_dict(), max_new_tokens=3, do_sample=False))


def test_decide_uses_the_real_latency_token(vlm):
    """decide() with a latency_token_fn built on AdaptiveModel.prefill agrees with decide_and_generate."""
    torch.manual_seed(4)
    ctrl = TwoStageController.for_executor(vlm, budget_range=(10, 200))
    with torch.no_grad():
        for p in ctrl.parameters():
            p.add_(torch.randn_like(p))
    image = tiny_image(5)

    def fn(tiers, ps):
        return torch.cat([vlm.prefill(PROMPT, [image], tier=t, insertion_position=p).latency_token() for t, p in zip(tiers, ps)])

    for budget in (20.0, 120.0):
        greedy = ctrl.decide(prompt_features(vlm, PROMPT), budget, latency_token_fn=fn)
        _, chosen = ctrl.decide_and_generate(vlm, PROMPT, [image], budget, max_new_tokens=1, do_sample=False)
        assert chosen == greedy


def test_one_call_generate_on_a_text_only_executor():
    """No tier knob: the controller's space has no tier head and rows run with tier=None."""
    model, tokenizer = tiny_text_model("olmoe")
    text = AdaptiveModel(model, tokenizer)
    space = text.knob_space
    assert not space.has("tier")
    target = Knobs(None, space.insertion_positions[0], space.top_k_options[0], space.block_options(space.insertion_positions[0])[0])
    for mode in ("latency_token", "prompt"):
        ctrl = steer(TwoStageController.for_executor(text, stage2_mode=mode, budget_range=(10, 200)), target)
        assert ctrl.stage1.tier_head is None
        result = text.generate("how many dots ?", latency_budget=60.0, controller=ctrl, max_new_tokens=3, do_sample=False)
        assert result.knobs == [target]
        assert torch.equal(result.output, text.generate("how many dots ?", **target.as_dict(), max_new_tokens=3, do_sample=False))
