"""Reward functions for knob GRPO, with TRL's reward-function signature.

Every function here is called as ``fn(prompts, completions, **kwargs) -> list[float | None]``.
``kwargs`` carry the dataset columns (``answer``, ``choices`` ...) and the per-row fields the
trainer adds (``latency_ms``, ``budget_ms``, ``knobs``). ``completions`` are the executor's
decoded strings; a conversational completion (a list of ``{"role", "content"}`` messages) is
reduced to the content of its last message.

Accuracy rewards return ``None`` for a row whose answer is ``None`` (TRL leaves such rows out of
that function's mean). All of them compare answers after :func:`normalize_answer`.

Budget rewards refuse to guess: a missing ``latency_ms`` or ``budget_ms`` is a bug in the
trainer, so they raise ``ValueError`` instead of returning ``None``.
"""

from __future__ import annotations

import math
import re
import string
from typing import Any, Mapping, Sequence

__all__ = [
    "normalize_answer",
    "vqa_accuracy",
    "anls",
    "levenshtein",
    "match_choice",
    "exact_match_reward",
    "vqa_score_reward",
    "anls_reward",
    "multiple_choice_reward",
    "answer_probability_reward",
    "budget_penalty_reward",
    "make_budget_reward",
    "BudgetReward",
    "knob_complexity",
    "within_budget",
    "WithinBudget",
]

# ---------------------------------------------------------------------------- normalisation

_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
    "eleven": "11",
    "twelve": "12",
    "thirteen": "13",
    "fourteen": "14",
    "fifteen": "15",
    "sixteen": "16",
    "seventeen": "17",
    "eighteen": "18",
    "nineteen": "19",
    "twenty": "20",
}
_ARTICLES = frozenset({"a", "an", "the"})
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}\b)")
_DECIMAL_POINT = re.compile(r"(?<=\d)\.(?=\d)")
_DECIMAL_PLACEHOLDER = "\x00"
# Apostrophes are deleted (so "don't" and "dont" agree); every other punctuation mark becomes a
# space (so "t-shirt" and "t shirt" agree, and "yes." becomes "yes").
_DELETE = str.maketrans("", "", "'\u2019`")
_TO_SPACE = str.maketrans({c: " " for c in string.punctuation if c not in "'`"})


def normalize_answer(text: Any) -> str:
    """Normalise an answer string the way VQA-style evaluation does.

    Steps, in order:

    1. ``None`` becomes ``""``; anything else is turned into ``str`` and lowercased.
    2. Thousands separators inside numbers are dropped (``"1,000"`` -> ``"1000"``) and decimal
       points between digits are kept (``"3.5"`` stays ``"3.5"``).
    3. Apostrophes (``'``, ``’``, `````) are deleted; every other ASCII punctuation character
       (``string.punctuation``) is replaced by a space.
    4. The text is split on whitespace (which also collapses runs of spaces, tabs and newlines).
    5. Number words ``zero`` .. ``twenty`` become digits, and ``none`` becomes ``0`` (as in the
       official VQA evaluation, where "none" answers counting questions).
    6. The articles ``a``, ``an`` and ``the`` are removed.
    7. The remaining tokens are joined by single spaces.

    Example: ``"The  Two dogs!"`` -> ``"2 dogs"``; ``"A T-shirt."`` -> ``"t shirt"``.
    """
    if text is None:
        return ""
    s = str(text).lower()
    s = _THOUSANDS_COMMA.sub("", s)
    # Protect decimal points from the punctuation pass with a placeholder.
    s = _DECIMAL_POINT.sub(_DECIMAL_PLACEHOLDER, s)
    s = s.translate(_DELETE).translate(_TO_SPACE).replace(_DECIMAL_PLACEHOLDER, ".")
    tokens = [_NUMBER_WORDS.get(tok, tok) for tok in s.split()]
    return " ".join(tok for tok in tokens if tok not in _ARTICLES)


# ---------------------------------------------------------------------------- helpers


def _completion_text(completion: Any) -> str:
    """The text of one completion: a plain string, or the last message of a conversation."""
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Mapping):
        return str(completion.get("content", ""))
    if isinstance(completion, Sequence) and completion:
        return _completion_text(completion[-1])
    return str(completion)


def _column(kwargs: Mapping[str, Any], name: str, n: int, fn_name: str) -> Sequence[Any]:
    """Fetch a per-row column from the reward kwargs and check its length."""
    if name not in kwargs or kwargs[name] is None:
        raise ValueError(
            f"{fn_name} needs the {name!r} field for every row, but the trainer passed none "
            f"(got fields: {sorted(k for k in kwargs if not k.startswith('log_'))})"
        )
    column = kwargs[name]
    if len(column) != n:
        raise ValueError(f"{fn_name}: field {name!r} has {len(column)} rows but there are {n} completions")
    return column


def _references(answer: Any) -> list[str]:
    """One answer or a list of acceptable answers, as a list of raw strings."""
    if isinstance(answer, str):
        return [answer]
    if isinstance(answer, Sequence):
        return [str(a) for a in answer if a is not None]
    return [str(answer)]


# ---------------------------------------------------------------------------- accuracy


def exact_match_reward(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
    """1.0 if the normalised completion equals any normalised acceptable answer, else 0.0.

    ``answer`` is per row a string or a list of acceptable strings; a ``None`` answer gives ``None``.
    """
    answers = _column(kwargs, "answer", len(completions), "exact_match_reward")
    rewards: list[float | None] = []
    for completion, answer in zip(completions, answers):
        if answer is None:
            rewards.append(None)
            continue
        pred = normalize_answer(_completion_text(completion))
        refs = {normalize_answer(r) for r in _references(answer)}
        rewards.append(1.0 if pred in refs else 0.0)
    return rewards


def answer_probability_reward(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
    """The executor's probability of the reference answer in the row's knobs: ``exp(answer_logprob)``.

    Exact match is 0 or 1, so two configurations that both answer (or both miss) a question tie
    even when one is far surer of the answer. This reward tells them apart on every question, a
    signal that exact match gives only on the few questions where their answers differ. Needs
    ``KnobGRPOConfig(answer_logprobs=True)``; a row whose ``answer_logprob`` is ``None`` (no answer)
    gives ``None``.
    """
    if kwargs.get("answer_logprob") is None:
        raise ValueError("answer_probability_reward needs the 'answer_logprob' field, which KnobGRPOTrainer passes "
                         "only with KnobGRPOConfig(answer_logprobs=True)")
    logprobs = _column(kwargs, "answer_logprob", len(completions), "answer_probability_reward")
    rewards: list[float | None] = []
    for logprob in logprobs:
        if logprob is None:
            rewards.append(None)
        elif isinstance(logprob, float) and math.isnan(logprob) or logprob > 0:
            raise ValueError(f"answer_probability_reward: answer_logprob={logprob!r} is not a log-probability (allowed: <= 0)")
        else:
            rewards.append(math.exp(logprob))
    return rewards


def vqa_accuracy(prediction: str, references: Sequence[str]) -> float:
    """VQA accuracy of one prediction against the human answers of one question.

    With ``n >= 2`` answers: for each of the ``n`` subsets that leave one human out, score
    ``min(matches_in_subset / t, 1)`` with ``t = min(3, n - 1)``, and average the ``n`` scores.
    For the standard 10 answers ``t = 3``, which is the official VQA metric; the smaller ``t`` for
    fewer answers keeps "every human agrees" worth 1.0. With one answer it is exact match.
    Both sides are compared after :func:`normalize_answer`.
    """
    pred = normalize_answer(prediction)
    refs = [normalize_answer(r) for r in references]
    n = len(refs)
    if n == 0:
        raise ValueError("vqa_accuracy needs at least one reference answer, got an empty list")
    if n == 1:
        return 1.0 if pred == refs[0] else 0.0
    threshold = min(3, n - 1)
    matches = sum(r == pred for r in refs)
    total = 0.0
    for r in refs:
        # Leaving out a matching human removes one match from that subset.
        in_subset = matches - (1 if r == pred else 0)
        total += min(in_subset / threshold, 1.0)
    return total / n


def vqa_score_reward(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
    """Standard VQA accuracy (see :func:`vqa_accuracy`) against the ``answer`` column.

    ``answer`` is per row the list of human answers (usually 10) or a single string.
    """
    answers = _column(kwargs, "answer", len(completions), "vqa_score_reward")
    rewards: list[float | None] = []
    for completion, answer in zip(completions, answers):
        if answer is None:
            rewards.append(None)
            continue
        refs = _references(answer)
        rewards.append(vqa_accuracy(_completion_text(completion), refs) if refs else None)
    return rewards


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions, each costing 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: str, references: Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalised Levenshtein Similarity of one prediction (the per-question term).

    For each reference, ``nl = levenshtein(pred, ref) / max(len(pred), len(ref))``; the score is
    ``1 - nl`` if ``nl < threshold`` and 0 otherwise, maximised over references. Strings are first
    passed through :func:`normalize_answer` (the DocVQA reference implementation only lowercases
    and trims, so scores can differ slightly on punctuation and articles).
    """
    pred = normalize_answer(prediction)
    best = 0.0
    for ref in references:
        ref = normalize_answer(ref)
        longest = max(len(pred), len(ref))
        if longest == 0:
            return 1.0
        nl = levenshtein(pred, ref) / longest
        if nl < threshold:
            best = max(best, 1.0 - nl)
    return best


def anls_reward(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
    """ANLS (threshold 0.5) of each completion against one or several acceptable answers."""
    answers = _column(kwargs, "answer", len(completions), "anls_reward")
    rewards: list[float | None] = []
    for completion, answer in zip(completions, answers):
        if answer is None:
            rewards.append(None)
            continue
        rewards.append(anls(_completion_text(completion), _references(answer)))
    return rewards


_LETTERS = string.ascii_lowercase
# "b", "(b)", "b)", "b.", "b:" possibly followed by the choice text; after an optional
# "answer:" / "the answer is" lead-in.
_LETTER_FORM = re.compile(
    r"^\s*(?:(?:the\s+)?(?:correct\s+)?(?:answer|option|choice)\s*(?:is|:)?\s*:?\s*)?"
    r"(?:\(([a-z])\)|([a-z])(?:[.):]|\s*$))"
)


def _choice_from_letter(text: str, num_choices: int) -> int | None:
    match = _LETTER_FORM.match(text.lower())
    if match is None:
        return None
    index = _LETTERS.index(match.group(1) or match.group(2))
    return index if index < num_choices else None


def match_choice(text: str, choices: Sequence[str]) -> int | None:
    """Map a completion to a choice index, or ``None`` if it maps to none.

    Tried in order: the whole completion equals a choice text (after :func:`normalize_answer`);
    a letter form (``"B"``, ``"(b)"``, ``"b) blue"``, ``"B. blue"``, ``"Answer: B"``); exactly one
    choice text appearing as whole words inside the completion. Text is tried first so that a
    choice literally called "a" is not read as the letter A.
    """
    normalised = [normalize_answer(c) for c in choices]
    pred = normalize_answer(text)
    if pred and pred in normalised:
        return normalised.index(pred)
    index = _choice_from_letter(text, len(choices))
    if index is not None:
        return index
    padded = f" {pred} "
    hits = [i for i, c in enumerate(normalised) if c and f" {c} " in padded]
    return hits[0] if len(hits) == 1 else None


def _answer_index(answer: Any, choices: Sequence[str]) -> int:
    """The correct choice as an index: from an int, a letter, or the choice text."""
    if isinstance(answer, bool):
        raise ValueError(f"multiple-choice answer {answer!r} is neither an index, a letter nor a choice text")
    if isinstance(answer, int):
        if not 0 <= answer < len(choices):
            raise ValueError(f"multiple-choice answer index {answer} is out of range for {len(choices)} choices")
        return answer
    text = str(answer)
    normalised = [normalize_answer(c) for c in choices]
    target = normalize_answer(text)
    if target and target in normalised:
        return normalised.index(target)
    letter = _choice_from_letter(text, len(choices))
    if letter is not None:
        return letter
    raise ValueError(f"multiple-choice answer {answer!r} matches none of the choices {list(choices)}")


def multiple_choice_reward(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
    """1.0 if the completion picks the correct choice, else 0.0 (see :func:`match_choice`).

    Needs the ``choices`` column (per row a list of option texts, lettered A, B, ... in order) and
    ``answer`` (an index, a letter or the correct option's text). A completion that maps to no
    choice scores 0.0.
    """
    n = len(completions)
    answers = _column(kwargs, "answer", n, "multiple_choice_reward")
    choices_col = _column(kwargs, "choices", n, "multiple_choice_reward")
    rewards: list[float | None] = []
    for completion, answer, choices in zip(completions, answers, choices_col):
        if answer is None:
            rewards.append(None)
            continue
        if not choices:
            raise ValueError(f"multiple_choice_reward: a row has answer {answer!r} but no choices")
        picked = match_choice(_completion_text(completion), choices)
        rewards.append(1.0 if picked is not None and picked == _answer_index(answer, choices) else 0.0)
    return rewards


# ---------------------------------------------------------------------------- budget


def _latency_pairs(kwargs: Mapping[str, Any], n: int, fn_name: str) -> list[tuple[float, float]]:
    latencies = _column(kwargs, "latency_ms", n, fn_name)
    budgets = _column(kwargs, "budget_ms", n, fn_name)
    pairs = []
    for row, (latency, budget) in enumerate(zip(latencies, budgets)):
        for name, value in (("latency_ms", latency), ("budget_ms", budget)):
            if value is None:
                raise ValueError(f"{fn_name}: field {name!r} is missing (None) for row {row}")
            if not math.isfinite(float(value)):
                raise ValueError(f"{fn_name}: field {name!r} is {value!r} for row {row}; it must be finite")
        if float(latency) < 0:
            raise ValueError(f"{fn_name}: latency_ms={latency!r} for row {row} is negative")
        if float(budget) <= 0:
            raise ValueError(f"{fn_name}: budget_ms={budget!r} for row {row} must be > 0")
        pairs.append((float(latency), float(budget)))
    return pairs


def knob_complexity(knobs: Mapping[str, Any] | Any, knob_space: Any) -> float:
    """A rough share of the full model's compute that a knob tuple uses, in (0, 1].

    The product of the tier's rank share (``(index + 1) / len(tiers)``; 1 without tiers) and the
    share of expert-block work, ``(p * K + (b - p) * k) / (n * K)`` for ``b`` active blocks out of
    ``n``, insertion position ``p``, chosen ``top_k`` ``k`` and default ``K`` (``b / n`` for a
    dense model). Prefill cost grows roughly with both, hence the product. It is a proxy, used
    only as a small deterministic tie-breaker.
    """
    if hasattr(knobs, "as_dict"):
        knobs = knobs.as_dict()
    resolved = knob_space.validate({k: v for k, v in dict(knobs).items() if v is not None})
    tier_share = 1.0
    if knob_space.tiers:
        tier_share = (knob_space.tiers.index(resolved.tier) + 1) / len(knob_space.tiers)
    n, b, p = knob_space.num_blocks, resolved.num_active_blocks, resolved.insertion_position
    if resolved.top_k is None:
        block_share = b / n
    else:
        full_k = knob_space.default_top_k
        block_share = (p * full_k + (b - p) * resolved.top_k) / (n * full_k)
    return tier_share * block_share


class BudgetReward:
    """Latency-against-budget reward; build it with :func:`make_budget_reward`.

    A callable class rather than a closure so that it pickles (TRL may ship reward functions to
    worker processes) and so that its ``__name__`` reads well in the logs.
    """

    def __init__(
        self,
        penalty: float = -1.0,
        slack_bonus: float = 0.0,
        complexity_cost: float = 0.0,
        *,
        max_slack_fraction: float = 0.5,
        knob_space: Any = None,
        name: str = "budget_reward",
    ) -> None:
        for label, value in (("penalty", penalty), ("slack_bonus", slack_bonus), ("complexity_cost", complexity_cost)):
            if not math.isfinite(value):
                raise ValueError(f"{label}={value!r} must be finite")
        if slack_bonus < 0:
            raise ValueError(f"slack_bonus={slack_bonus} must be >= 0")
        if complexity_cost < 0:
            raise ValueError(f"complexity_cost={complexity_cost} must be >= 0")
        if not 0 < max_slack_fraction <= 1:
            raise ValueError(f"max_slack_fraction={max_slack_fraction} must be in (0, 1]")
        # The worst in-budget reward is -complexity_cost; a violation must score strictly below it.
        if not penalty < -complexity_cost:
            raise ValueError(
                f"penalty={penalty} must be < -complexity_cost={-complexity_cost}, so that exceeding the "
                "budget always scores below every configuration that fits"
            )
        if complexity_cost > 0 and knob_space is None:
            raise ValueError("complexity_cost > 0 needs knob_space= to measure how heavy each knob tuple is")
        self.penalty = float(penalty)
        self.slack_bonus = float(slack_bonus)
        self.complexity_cost = float(complexity_cost)
        self.max_slack_fraction = float(max_slack_fraction)
        self.knob_space = knob_space
        self.__name__ = name

    def row_reward(self, latency_ms: float, budget_ms: float, knobs: Any = None) -> float:
        """The reward of one row (see :func:`make_budget_reward` for the formula)."""
        if latency_ms > budget_ms:
            return self.penalty
        reward = 0.0
        if self.slack_bonus:
            slack = (budget_ms - latency_ms) / budget_ms
            reward += self.slack_bonus * min(slack, self.max_slack_fraction) / self.max_slack_fraction
        if self.complexity_cost:
            reward -= self.complexity_cost * knob_complexity(knobs, self.knob_space)
        return reward

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        n = len(completions)
        pairs = _latency_pairs(kwargs, n, self.__name__)
        knobs_col: Sequence[Any] = [None] * n
        if self.complexity_cost:
            knobs_col = _column(kwargs, "knobs", n, self.__name__)
        return [self.row_reward(lat, bud, kn) for (lat, bud), kn in zip(pairs, knobs_col)]

    def __repr__(self) -> str:
        return (
            f"BudgetReward(penalty={self.penalty}, slack_bonus={self.slack_bonus}, "
            f"complexity_cost={self.complexity_cost}, max_slack_fraction={self.max_slack_fraction})"
        )


def make_budget_reward(
    penalty: float = -1.0,
    slack_bonus: float = 0.0,
    complexity_cost: float = 0.0,
    *,
    max_slack_fraction: float = 0.5,
    knob_space: Any = None,
    name: str | None = None,
) -> BudgetReward:
    """Build a budget reward with optional shaping.

    Per row, with ``latency = latency_ms`` and ``budget = budget_ms``:

    * ``latency > budget``: exactly ``penalty``. The budget is a hard constraint, so a violation
      gets no bonus and no discount however close it came.
    * otherwise ``slack_bonus * min(slack, max_slack_fraction) / max_slack_fraction
      - complexity_cost * knob_complexity(knobs)``, where ``slack = (budget - latency) / budget``.

    Why this shape:

    * The slack bonus gives a gradient inside the feasible region: between two equally accurate
      configurations the faster one is preferred, so the policy learns a safety margin against
      latency noise. It grows linearly up to ``max_slack_fraction`` of the budget left unused and
      is flat beyond: once half the budget (by default) is free there is no reason to push the
      controller to be faster still at the cost of accuracy. Keep it small next to the accuracy
      reward (e.g. 0.1) or the controller learns to trade answers for speed.
    * The complexity cost is a small deterministic penalty on heavy knob tuples (see
      :func:`knob_complexity`; needs ``knob_space``). When a group's accuracies tie, GRPO's group
      normalisation turns whatever differences remain into large advantages; a noise-free
      tie-breaker beats letting latency jitter decide.
    * Bounds: in budget the reward lies in ``[-complexity_cost, slack_bonus]``; a violation gives
      ``penalty``, which must be below ``-complexity_cost``, so violating never pays. To make it
      never pay against the accuracy reward too, keep ``|penalty|`` (times its weight) at least
      the accuracy range.

    Rows need ``latency_ms`` and ``budget_ms`` (and ``knobs`` when ``complexity_cost > 0``); a
    missing field raises ``ValueError``, since a budget reward without latency is a bug.
    """
    if name is None:
        shaped = slack_bonus or complexity_cost
        name = "budget_shaped_reward" if shaped else "budget_penalty_reward"
    return BudgetReward(
        penalty,
        slack_bonus,
        complexity_cost,
        max_slack_fraction=max_slack_fraction,
        knob_space=knob_space,
        name=name,
    )


def budget_penalty_reward(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
    """-1.0 for a row whose ``latency_ms`` exceeds its ``budget_ms``, 0.0 otherwise.

    The hard-constraint reward; :func:`make_budget_reward` builds variants with another penalty
    or with shaping. Raises ``ValueError`` if ``latency_ms`` or ``budget_ms`` is missing.
    """
    return _DEFAULT_BUDGET_REWARD(prompts, completions, **kwargs)


_DEFAULT_BUDGET_REWARD = BudgetReward(name="budget_penalty_reward")


class WithinBudget:
    """An accuracy reward that counts only for rows within their budget; build it with :func:`within_budget`."""

    def __init__(self, reward_fn: Any) -> None:
        if not callable(reward_fn):
            raise TypeError(f"within_budget needs a reward function, got {type(reward_fn).__name__}")
        self.reward_fn = reward_fn
        self.__name__ = f"{getattr(reward_fn, '__name__', type(reward_fn).__name__)}_within_budget"

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float | None]:
        rewards = self.reward_fn(prompts, completions, **kwargs)
        pairs = _latency_pairs(kwargs, len(completions), self.__name__)
        return [None if r is None else (r if latency <= budget else 0.0) for r, (latency, budget) in zip(rewards, pairs)]


def within_budget(reward_fn: Any) -> WithinBudget:
    """``reward_fn``'s reward for rows whose ``latency_ms`` is within ``budget_ms``, 0.0 for the rest.

    An answer that arrives after its budget is worth nothing, as in the evaluation's
    ``accuracy_within_budget``. Paired with a budget penalty, every late row then scores exactly the
    penalty: the penalty alone sets how much worse than a wrong answer in time a violation is (any
    negative value keeps it worse), instead of it having to outweigh the answer's credit too.
    A ``None`` (unscorable row) stays ``None``.
    """
    return WithinBudget(reward_fn)
