"""Tests for knob_grpo.rewards on hand-built rows."""

import math
import pickle

import pytest

from knob_grpo.knobs import KnobSpace
from knob_grpo.rewards import (
    anls,
    answer_probability_reward,
    anls_reward,
    budget_penalty_reward,
    exact_match_reward,
    knob_complexity,
    make_budget_reward,
    match_choice,
    multiple_choice_reward,
    normalize_answer,
    vqa_accuracy,
    vqa_score_reward,
    within_budget,
)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("The  Two dogs!", "2 dogs"),
        ("A T-shirt.", "t shirt"),
        ("  YES.\n", "yes"),
        ("1,000 people", "1000 people"),
        ("3.5 meters", "3.5 meters"),
        ("Don't", "dont"),
        ("none", "0"),
        ("an apple\n\tpie", "apple pie"),
        ("twenty-one", "20 1"),  # only single number words map; compounds are split by the hyphen
        (None, ""),
        (7, "7"),
    ],
)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


def test_exact_match_single_and_list_and_none():
    rewards = exact_match_reward(
        ["q"] * 4,
        ["Two.", "the cat", "dog", "anything"],
        answer=["2", ["a cat", "kitten"], "cat", None],
    )
    assert rewards == [1.0, 1.0, 0.0, None]


def test_exact_match_accepts_conversational_completions():
    completions = [[{"role": "assistant", "content": "Yes."}]]
    assert exact_match_reward(["q"], completions, answer=["yes"]) == [1.0]


def test_vqa_two_of_ten_humans_is_point_six():
    # 2 of 10 humans said "red". Leave-one-out over the 10 annotators:
    #  - leaving out one of the 2 "red" humans (2 subsets): 1 match left -> min(1/3, 1) = 1/3
    #  - leaving out one of the 8 others (8 subsets):       2 matches    -> min(2/3, 1) = 2/3
    # mean = (2 * 1/3 + 8 * 2/3) / 10 = (2/3 + 16/3) / 10 = 6/10 = 0.6
    humans = ["red", "Red"] + ["blue"] * 8
    assert vqa_accuracy("red", humans) == pytest.approx(0.6)


def test_vqa_other_counts_of_ten():
    # 3 of 10: 3 subsets with 2 matches (2/3), 7 subsets with 3 matches (1) -> (2 + 7) / 10 = 0.9
    assert vqa_accuracy("red", ["red"] * 3 + ["blue"] * 7) == pytest.approx(0.9)
    # 4 or more of 10: every subset keeps >= 3 matches -> 1.0
    assert vqa_accuracy("red", ["red"] * 4 + ["blue"] * 6) == pytest.approx(1.0)
    # 1 of 10: the subset without that human has 0, the other 9 have 1 -> 9 * 1/3 / 10 = 0.3
    assert vqa_accuracy("red", ["red"] + ["blue"] * 9) == pytest.approx(0.3)
    assert vqa_accuracy("green", ["red"] * 10) == 0.0


def test_vqa_single_reference_is_exact_match():
    assert vqa_score_reward(["q"] * 3, ["Two", "3", "x"], answer=["2", "2", None]) == [1.0, 0.0, None]


def test_vqa_reward_uses_number_words():
    humans = ["2"] * 10
    assert vqa_score_reward(["q"], ["two"], answer=[humans]) == [pytest.approx(1.0)]


def test_anls_near_misses():
    # "invoice" vs "invoise": 1 edit over 7 characters -> 1 - 1/7
    assert anls("invoise", ["invoice"]) == pytest.approx(1 - 1 / 7)
    # 4 edits over 7 characters: NL = 0.57 >= 0.5 -> 0
    assert anls("inxxxxe", ["invoice"]) == 0.0
    # best reference wins; normalisation makes "The Total." equal to "total"
    assert anls("The Total.", ["sum", "total"]) == 1.0
    assert anls("", [""]) == 1.0
    rewards = anls_reward(["q"] * 3, ["abcd", "abcx", "zzzz"], answer=["abcd", ["abcd"], "abcd"])
    assert rewards == [1.0, pytest.approx(0.75), 0.0]


def test_multiple_choice_letters_and_text():
    choices = ["red", "blue", "green"]
    assert match_choice("B", choices) == 1
    assert match_choice("(b)", choices) == 1
    assert match_choice("c) green", choices) == 2
    assert match_choice("Answer: A", choices) == 0
    assert match_choice("The answer is (C).", choices) == 2
    assert match_choice("Blue.", choices) == 1
    assert match_choice("I think it is green", choices) == 2
    assert match_choice("purple", choices) is None
    assert match_choice("D", choices) is None  # a letter past the last choice maps to nothing
    # a choice whose text looks like a letter/article is matched as text first
    assert match_choice("A dog", ["a dog", "a cat"]) == 0

    rewards = multiple_choice_reward(
        ["q"] * 5,
        ["B", "(a)", "green", "purple", "B"],
        answer=["blue", 0, "C", "A", None],
        choices=[choices] * 5,
    )
    assert rewards == [1.0, 1.0, 1.0, 0.0, None]


def test_multiple_choice_needs_choices():
    with pytest.raises(ValueError, match="choices"):
        multiple_choice_reward(["q"], ["A"], answer=["A"])


def test_answer_probability_is_exp_of_the_logprob_and_refuses_non_logprobs():
    rewards = answer_probability_reward(["q"] * 3, ["a", "b", "c"], answer_logprob=[0.0, math.log(0.25), None])
    assert rewards[0] == 1.0 and rewards[1] == pytest.approx(0.25) and rewards[2] is None
    assert within_budget(answer_probability_reward)(["q"] * 2, ["a", "b"], answer_logprob=[math.log(0.5)] * 2,
                                                    latency_ms=[10.0, 30.0], budget_ms=[20.0, 20.0]) == [pytest.approx(0.5), 0.0]
    for bad in (0.5, float("nan")):
        with pytest.raises(ValueError, match=f"answer_logprob={bad!r}"):
            answer_probability_reward(["q"], ["a"], answer_logprob=[bad])
    with pytest.raises(ValueError, match="1 rows but there are 2 completions"):
        answer_probability_reward(["q"] * 2, ["a", "b"], answer_logprob=[0.0])


def test_budget_penalty_hand_built():
    rewards = budget_penalty_reward(
        ["q"] * 3, ["", "", ""], latency_ms=[150.0, 200.0, 200.1], budget_ms=[200.0, 200.0, 200.0]
    )
    assert rewards == [0.0, 0.0, -1.0]  # equal to the budget fits
    assert budget_penalty_reward.__name__ == "budget_penalty_reward"


def test_budget_reward_missing_latency_raises():
    with pytest.raises(ValueError, match="latency_ms"):
        budget_penalty_reward(["q"], ["x"], budget_ms=[200.0])
    with pytest.raises(ValueError, match="budget_ms"):
        budget_penalty_reward(["q"], ["x"], latency_ms=[100.0])
    with pytest.raises(ValueError, match="latency_ms"):
        budget_penalty_reward(["q"], ["x"], latency_ms=[None], budget_ms=[200.0])


def test_shaped_budget_reward_bounds():
    reward = make_budget_reward(penalty=-2.0, slack_bonus=0.1)
    assert reward.__name__ == "budget_shaped_reward"
    budgets = [200.0] * 6
    latencies = [0.0, 50.0, 100.0, 150.0, 200.0, 260.0]
    out = reward(["q"] * 6, [""] * 6, latency_ms=latencies, budget_ms=budgets)
    # slack = 1.0, 0.75, 0.5 (capped at max_slack_fraction=0.5 -> full bonus), 0.25 -> half, 0 -> 0
    assert out == pytest.approx([0.1, 0.1, 0.1, 0.05, 0.0, -2.0])
    assert all(0.0 <= r <= 0.1 for r in out[:5])
    assert pickle.loads(pickle.dumps(reward))(["q"], [""], latency_ms=[50.0], budget_ms=[200.0]) == [0.1]


def test_complexity_cost_and_validation():
    space = KnobSpace.from_model(16, default_top_k=8, num_experts=64, has_vision=True)
    full = {"tier": "high", "insertion_position": 1, "top_k": 8, "num_active_blocks": 16}
    light = {"tier": "low", "insertion_position": 1, "top_k": 4, "num_active_blocks": 12}
    assert knob_complexity(full, space) == pytest.approx(1.0)
    # tier share 1/3; expert-block share (1*8 + 11*4) / (16*8) = 52/128
    assert knob_complexity(light, space) == pytest.approx(52 / 128 / 3)
    reward = make_budget_reward(penalty=-1.0, complexity_cost=0.05, knob_space=space)
    out = reward(["q"] * 3, [""] * 3, latency_ms=[100.0, 100.0, 300.0], budget_ms=[200.0] * 3,
                 knobs=[full, light, light])
    assert out == pytest.approx([-0.05, -0.05 * 52 / 384, -1.0])
    with pytest.raises(ValueError, match="knob_space"):
        make_budget_reward(complexity_cost=0.1)
    with pytest.raises(ValueError, match="penalty"):
        make_budget_reward(penalty=-0.01, complexity_cost=0.05, knob_space=space)
    with pytest.raises(ValueError, match="slack_bonus"):
        make_budget_reward(slack_bonus=-0.1)


def test_within_budget_counts_answers_in_time_only():
    reward = within_budget(exact_match_reward)
    assert reward.__name__ == "exact_match_reward_within_budget"
    out = reward(["q"] * 4, ["red", "red", "blue", "red"], answer=["red", "red", "red", None],
                 latency_ms=[10.0, 30.0, 10.0, 10.0], budget_ms=[20.0, 20.0, 20.0, 20.0])
    assert out == [1.0, 0.0, 0.0, None]  # in time and right; late; wrong; unscorable
    # with a budget penalty every late row scores the penalty alone, below a wrong answer in time
    penalty = make_budget_reward(penalty=-0.5)
    kwargs = dict(answer=["red"] * 3, latency_ms=[10.0, 30.0, 30.0], budget_ms=[20.0] * 3)
    totals = [a + b for a, b in zip(reward(["q"] * 3, ["blue", "red", "blue"], **kwargs), penalty(["q"] * 3, ["blue", "red", "blue"], **kwargs))]
    assert totals == [0.0, -0.5, -0.5]
    assert pickle.loads(pickle.dumps(reward))(["q"], ["red"], answer=["red"], latency_ms=[1.0], budget_ms=[2.0]) == [1.0]
    with pytest.raises(ValueError, match="latency_ms"):
        reward(["q"], ["red"], answer=["red"], budget_ms=[2.0])
