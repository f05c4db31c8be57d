"""The two-stage knob controller: a small policy that picks a knob tuple for a latency budget.

The controller is an ordinary transformers model (:class:`TwoStageController`, configured by
:class:`ControllerConfig`, registered for ``AutoConfig`` / ``AutoModel`` when this module is
imported), so ``save_pretrained``, ``AutoModel.from_pretrained``, trainer checkpoints and
``push_to_hub`` work as for any model. The frozen executor (an :class:`~knob_grpo.adaptive.AdaptiveModel`)
is never a submodule: the controller reads its input embedding table and, in latency-token mode,
one hidden state from it, and nothing else.

Inputs
------
* **Language feature** (:func:`language_features`, :func:`prompt_features`): the executor's own
  input embeddings of the prompt's tokens, mean-pooled over the real tokens. A table lookup, no
  transformer block, no gradient. Shape ``(B, language_dim)``.
* **Budget feature**: the budget in milliseconds, normalised to the training range
  ``x = (b - min_ms) / (max_ms - min_ms)``, through a fixed sinusoidal encoding
  (``sin``/``cos`` of ``pi * j * x`` for ``j = 1 .. budget_encoding_dim / 2``, a Fourier basis on
  the range) plus ``x`` itself, then a trainable MLP (each stage has its own).

  Budgets must be finite and positive (anything else is a ``ValueError`` naming the value).
  Budgets outside the range are accepted. With ``clamp_budget=True`` (the default) ``x`` is
  clamped to ``[0, 1]`` before the encoding, so a budget above the range is treated exactly like
  ``max_ms`` and one below like ``min_ms``: the controller never extrapolates, and a very large
  budget gets the decision of the largest budget it was trained for. With ``clamp_budget=False``
  the raw ``x`` is encoded: the sinusoids are periodic, so a budget outside the range aliases onto
  some budget inside it and ``x`` grows without bound -- the decisions there are extrapolation
  and not to be trusted.

  Greedy decisions (everything a server or an evaluation calls) give a budget below the range the
  knob space's cheapest configuration (``below_range="cheapest"``, the default): the controller
  never trained there, and a range derived from the latency profile starts a little above what
  the fastest profiled configuration costs (the cheapest, which a profile always times), so below
  it nothing else is known to fit. Its stage 2 then reads no latency token, and the request runs as
  a plain generate. (On the embedded default, where the machine had slowed down since the
  profile, the decision for the range's lower end was late in 10-28% of requests there, the best
  static configuration, on the low tier, in 1-3%.) ``below_range="decide"`` decides from the
  encoding instead, as above. Sampling and log-probabilities are the policy's either way; the
  greedy decisions a trainer credits stage 1 through (``stage1_credit``) follow the rule like any
  other, which matters only for budgets from a budget column below the range (drawn budgets lie
  inside it). Checkpoints saved before the field existed load with the default.

  A "budget token" appended to the prompt (an option in the seed design) is not offered: the
  budget enters only through this feature.

Stages
------
* **Stage 1** (before any model compute): language + budget -> logits for ``tier`` (if the
  knob space has tiers), then for ``insertion_position`` given the tier (the tier drawn, or the
  one whose logits ``forward(tiers=...)`` is given).
* **Stage 2** (``config.stage2_mode``):

  - ``"latency_token"``: the latency token -- the hidden state of the last prompt token entering
    block ``p`` (``AdaptiveModel.prefill(...).latency_token()``) -- plus the budget and an
    embedding of ``p``;
  - ``"prompt"``: the language feature plus the budget and an embedding of ``p`` (no model
    compute: all four knobs are known before anything runs).

  Output: logits for ``top_k`` (if the model is MoE) and ``num_active_blocks`` over
  ``knob_space.all_block_options``, masked so an option not allowed for the row's ``p`` has
  probability exactly zero (log-probability ``-inf``; it is never sampled nor chosen).

A tuple's log-probability is the sum of its decisions' categorical log-probabilities; a knob the
model lacks contributes 0.

Batch-first API (``B`` requests, ``G`` samples per request, rows request-major)
-------------------------------------------------------------------------------
* :meth:`TwoStageController.sample` -- ``B*G`` sampled tuples with their per-decision log-probs
  (no gradient; the "old policy" of a GRPO step).
* :meth:`TwoStageController.log_probs` -- per-decision log-probs and entropies of given tuples,
  with gradients (what the GRPO loss uses).
* :meth:`TwoStageController.decide` -- the greedy tuple per request.
* :meth:`TwoStageController.decide_and_generate` -- one call from prompt and budget to output
  (this is what ``AdaptiveModel.generate(..., latency_budget=..., controller=...)`` calls).
* :meth:`TwoStageController.decide_for_request` -- one request's greedy decisions as a server
  makes them (stage 1, and stage 2 as a function of the latency token); NumPy for a float32
  controller on the CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, AutoModel, GenerationConfig, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .knobs import KNOB_NAMES, Knobs, KnobSpace
from .latency import _check_budget

__all__ = [
    "ControllerConfig",
    "ControllerOutput",
    "KnobLogProbs",
    "KnobSample",
    "BELOW_RANGE",
    "STAGE2_MODES",
    "TwoStageController",
    "language_features",
    "prompt_features",
]

STAGE2_MODES = ("latency_token", "prompt")
#: What a greedy decision gives a budget below the trained range (``ControllerConfig.below_range``).
BELOW_RANGE = ("cheapest", "decide")

#: ``latency_token_fn(tiers, insertion_positions) -> (N, latency_token_dim)``: the latency token
#: of each row, for that row's stage-1 choice (``tiers`` holds ``None`` for a text-only model).
LatencyTokenFn = Callable[[list, list], torch.Tensor]


# =========================================================================== configuration
class ControllerConfig(PretrainedConfig):
    """Configuration of a :class:`TwoStageController`.

    Args:
        knob_space: the executor's knob space, as :meth:`KnobSpace.to_dict` (required).
        budget_min_ms, budget_max_ms: the budget range the controller is trained for
            (``budget_range=(lo, hi)`` is accepted as a shorthand). Defaults: the research
            system's 170-380 ms.
        language_dim: width of the language feature (the executor's embedding dim).
        latency_token_dim: width of the latency token (the executor's hidden size); defaults to
            ``language_dim``.
        hidden_size: width of stage 1; default ``min(256, max(64, language_dim // 8))``.
        stage2_hidden_size: width of stage 2; default ``max(32, hidden_size // 2)``.
        budget_encoding_dim: number of fixed sinusoidal budget features (even).
        position_embedding_dim: width of the embedding of ``p`` fed to stage 2.
        stage2_mode: ``"latency_token"`` or ``"prompt"`` (see the module docstring).
        clamp_budget: clamp the normalised budget to ``[0, 1]`` before encoding it.
        below_range: a greedy decision's tuple for a budget below ``budget_min_ms`` (as the
            controller reads it, after its ``latency_scale``): ``"cheapest"`` (default) the knob
            space's cheapest configuration, ``"decide"`` the policy's decision (see the module
            docstring).
        executor_name_or_path, executor_hidden_size, executor_num_blocks, executor_num_experts:
            the executor the controller was built for (checked by
            :meth:`TwoStageController.check_executor`; ``None`` = not recorded, not checked).
        initializer_range: standard deviation of the output heads' initial weights (small, so a
            new controller starts near the uniform policy over valid options).
    """

    model_type = "knob_grpo_controller"

    knob_space: dict | None = None
    budget_min_ms: float = 170.0
    budget_max_ms: float = 380.0
    language_dim: int = 2048
    latency_token_dim: int | None = None
    hidden_size: int | None = None
    stage2_hidden_size: int | None = None
    budget_encoding_dim: int = 32
    position_embedding_dim: int = 32
    stage2_mode: str = "latency_token"
    clamp_budget: bool = True
    below_range: str = "cheapest"
    executor_name_or_path: str | None = None
    executor_hidden_size: int | None = None
    executor_num_blocks: int | None = None
    executor_num_experts: int | None = None
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs: Any) -> None:
        budget_range = kwargs.pop("budget_range", None)
        if budget_range is not None:
            if len(budget_range) != 2:
                raise ValueError(f"budget_range={budget_range!r} must be (min_ms, max_ms)")
            self.budget_min_ms, self.budget_max_ms = float(budget_range[0]), float(budget_range[1])
        if isinstance(self.knob_space, KnobSpace):
            self.knob_space = self.knob_space.to_dict()
        if self.knob_space is not None:
            KnobSpace.from_dict(self.knob_space)  # validate early
        lo, hi = float(self.budget_min_ms), float(self.budget_max_ms)
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo < hi):
            raise ValueError(f"budget range ({lo}, {hi}) ms is invalid: need finite 0 <= min_ms < max_ms")
        self.budget_min_ms, self.budget_max_ms = lo, hi
        if self.stage2_mode not in STAGE2_MODES:
            raise ValueError(f"stage2_mode={self.stage2_mode!r} is not one of {', '.join(STAGE2_MODES)}")
        for name in ("language_dim", "latency_token_dim", "hidden_size", "stage2_hidden_size", "budget_encoding_dim", "position_embedding_dim"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if not isinstance(self.clamp_budget, bool):  # "no" would be stored and act as True
            raise ValueError(f"clamp_budget={self.clamp_budget!r} must be True or False")
        if self.below_range not in BELOW_RANGE:
            raise ValueError(f"below_range={self.below_range!r} is not one of {', '.join(map(repr, BELOW_RANGE))}")
        if self.budget_encoding_dim < 2 or self.budget_encoding_dim % 2:
            raise ValueError(f"budget_encoding_dim={self.budget_encoding_dim} must be even and >= 2")
        if self.latency_token_dim is None:
            self.latency_token_dim = self.language_dim
        if self.hidden_size is None:
            self.hidden_size = min(256, max(64, self.language_dim // 8))
        if self.stage2_hidden_size is None:
            self.stage2_hidden_size = max(32, self.hidden_size // 2)
        super().__post_init__(**kwargs)

    @property
    def budget_range(self) -> tuple[float, float]:
        return (self.budget_min_ms, self.budget_max_ms)

    def get_knob_space(self) -> KnobSpace:
        if self.knob_space is None:
            raise ValueError("this ControllerConfig has no knob_space; build it with knob_space=KnobSpace(...).to_dict()")
        return KnobSpace.from_dict(self.knob_space)


# =========================================================================== features
def _embedding_of(embedding_or_adaptive: Any) -> nn.Embedding:
    if isinstance(embedding_or_adaptive, nn.Embedding):
        return embedding_or_adaptive
    emb = getattr(embedding_or_adaptive, "input_embeddings", None)
    if emb is None and hasattr(embedding_or_adaptive, "get_input_embeddings"):
        emb = embedding_or_adaptive.get_input_embeddings()
    if emb is None:
        raise TypeError(f"expected an nn.Embedding or an AdaptiveModel, got {type(embedding_or_adaptive).__name__}")
    return emb


@torch.no_grad()
def language_features(embedding_or_adaptive: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The language feature: the executor's input embeddings of the prompt, mean-pooled.

    ``embedding_or_adaptive`` is the executor's ``nn.Embedding`` (or an ``AdaptiveModel`` /
    transformers model, whose input embeddings are used). Only real tokens (``attention_mask == 1``)
    are pooled; a row without tokens gives zeros. Returns ``(B, embedding_dim)`` in float32 on the
    embedding's device, without gradient (the table is the frozen executor's).
    """
    emb = _embedding_of(embedding_or_adaptive)
    device = emb.weight.device
    input_ids = torch.as_tensor(input_ids, device=device)
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    mask = torch.as_tensor(attention_mask, device=device).to(torch.float32).unsqueeze(-1)
    vectors = emb(input_ids).to(torch.float32)
    return (vectors * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def _fast_backend(tokenizer: Any) -> Any:
    """A fast tokenizer's own ``tokenizers`` backend (``None`` for a slow one): for one text its
    ``encode(text).ids`` are the tokenizer call's ids, in a fraction of the time (this runs inside a request)."""
    return getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None


@torch.no_grad()
def prompt_features(adaptive: Any, texts: str | Sequence[str]) -> torch.Tensor:
    """Language features of raw prompt texts: tokenised with ``adaptive.tokenizer`` as they are
    (no chat template, no image tokens), embedded by the executor, mean-pooled: ``(B, language_dim)``."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    tokenizer = adaptive.tokenizer
    if tokenizer is None:
        raise ValueError("prompt_features needs the executor's tokenizer (build the AdaptiveModel with processor=...)")
    if len(texts) > 1 and getattr(tokenizer, "pad_token_id", None) is not None:
        enc = tokenizer(texts, return_tensors="pt", padding=True)
        return language_features(adaptive.input_embeddings, enc["input_ids"], enc["attention_mask"])
    # no pad token (or a single prompt): one row at a time, no padding needed
    backend = _fast_backend(tokenizer)
    rows = []
    for t in texts:
        ids = torch.tensor([backend.encode(t).ids], dtype=torch.long) if backend is not None else tokenizer(t, return_tensors="pt")["input_ids"]
        rows.append(language_features(adaptive.input_embeddings, ids))
    return torch.cat(rows, 0)


# =========================================================================== outputs
@dataclass
class ControllerOutput(ModelOutput):
    """Logits of one forward pass. Invalid ``num_active_blocks`` options hold ``-inf``.

    Knobs the model lacks (and stage 2 when no ``insertion_positions`` were given) are ``None``.
    """

    tier_logits: torch.Tensor | None = None
    insertion_position_logits: torch.Tensor | None = None
    top_k_logits: torch.Tensor | None = None
    num_active_blocks_logits: torch.Tensor | None = None


@dataclass
class KnobSample:
    """What :meth:`TwoStageController.sample` returns (``N = B * G`` rows, request-major).

    Attributes:
        knobs: the sampled tuples; rows ``i*G .. i*G+G-1`` belong to request ``i``.
        log_probs: per knob name, ``(N,)`` log-probabilities of each decision (0 for an absent knob).
        log_prob: ``(N,)`` their sum, the tuple's log-probability.
        indices: per knob name, ``(N,)`` option indices (-1 for an absent knob).
        latency_tokens: ``(N, d)`` the latency tokens stage 2 read (latency-token mode), to pass
            back to :meth:`TwoStageController.log_probs`; ``None`` in prompt mode.
        num_generations: ``G``.
    """

    knobs: list[Knobs]
    log_probs: dict[str, torch.Tensor]
    log_prob: torch.Tensor
    indices: dict[str, torch.Tensor]
    latency_tokens: torch.Tensor | None = None
    num_generations: int = 1


@dataclass
class KnobLogProbs:
    """What :meth:`TwoStageController.log_probs` returns; every tensor is ``(N,)`` and differentiable.

    Attributes:
        per_decision: log-probability of each knob's decision (zeros for an absent knob).
        total: their sum (the tuple's log-probability).
        entropy: entropy of each decision's distribution (zeros for an absent knob).
        entropy_total: their sum.
    """

    per_decision: dict[str, torch.Tensor]
    total: torch.Tensor
    entropy: dict[str, torch.Tensor] = field(default_factory=dict)
    entropy_total: torch.Tensor | None = None


# =========================================================================== building blocks
class SinusoidalBudgetEncoding(nn.Module):
    """Fixed encoding of a budget in ms: ``[sin(pi j x), cos(pi j x)]_{j=1..dim/2}`` and ``x``,
    where ``x`` is the budget normalised to the training range (clamped to ``[0, 1]`` if ``clamp``)."""

    def __init__(self, dim: int, min_ms: float, max_ms: float, clamp: bool = True) -> None:
        super().__init__()
        self.dim, self.min_ms, self.max_ms, self.clamp = int(dim), float(min_ms), float(max_ms), bool(clamp)
        self.register_buffer("frequencies", self.compute_frequencies(), persistent=False)

    def compute_frequencies(self) -> torch.Tensor:
        return math.pi * torch.arange(1, self.dim // 2 + 1, dtype=torch.float32)

    @property
    def out_dim(self) -> int:
        return self.dim + 1

    def normalise(self, budgets_ms: torch.Tensor) -> torch.Tensor:
        x = (budgets_ms - self.min_ms) * (1.0 / (self.max_ms - self.min_ms))
        return x.clamp(0.0, 1.0) if self.clamp else x

    def forward(self, budgets_ms: torch.Tensor) -> torch.Tensor:
        """``(B,)`` budgets in ms -> ``(B, dim + 1)`` codes."""
        x = self.normalise(budgets_ms.float()).unsqueeze(-1)
        angles = x * self.frequencies.float()  # float32 even in a bf16 controller
        return torch.cat([torch.sin(angles), torch.cos(angles), x], dim=-1)


def _mlp(sizes: Sequence[int]) -> nn.Sequential:
    """Linear layers, each followed by SiLU (the output feeds another layer). SiLU rather than exact
    GELU: as smooth, and several times cheaper per call on CPU, which matters at these sizes."""
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.SiLU()]
    return nn.Sequential(*layers)


def _head(in_dim: int, n: int) -> nn.Linear:
    head = nn.Linear(in_dim, n)
    head._knob_head = True  # small initial weights: near-uniform policy
    return head


def _budget_mlp(config: ControllerConfig, width: int) -> nn.Sequential:
    """The trainable part of the budget feature (each stage has its own)."""
    return _mlp([config.budget_encoding_dim + 1, width, width])


class Stage1Policy(nn.Module):
    """Language + budget code -> logits for ``tier`` (if any), then for ``insertion_position`` given
    the tier.

    ``p``'s logits are a shared head plus one per tier (``insertion_position_by_tier``, zero at
    initialisation). Drawn independently, ``p`` could not depend on the tier it goes with, and the
    ``p`` that lets a large tier fit a tight budget (few leading blocks at the full setting) is not
    the one the other tiers favour there: on the embedded default, the high tier fitted stripes
    questions at 48-56 ms only with ``p = 1``, so while ``p`` was drawn as for the medium tier the
    high tier was late in two draws of three and stage 1 learned to avoid it there.
    """

    def __init__(self, config: ControllerConfig, space: KnobSpace) -> None:
        super().__init__()
        h = config.hidden_size
        self.language_norm = nn.LayerNorm(config.language_dim)
        self.language_proj = _mlp([config.language_dim, h])
        self.budget_mlp = _budget_mlp(config, h)
        self.trunk = _mlp([2 * h, h, h, h])
        self.tier_head = _head(h, len(space.tiers)) if space.tiers else None
        self.insertion_position_head = _head(h, len(space.insertion_positions))
        self.insertion_position_by_tier = None
        if space.tiers:
            self.insertion_position_by_tier = nn.Linear(h, len(space.tiers) * len(space.insertion_positions), bias=False)
            self.insertion_position_by_tier._zero_init = True  # p starts independent of the tier

    def forward(self, language: torch.Tensor, budget_code: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{"features": (B, h), "tier": (B, num_tiers)}`` (no ``"tier"`` without tiers); then
        :meth:`insertion_position_logits`."""
        x = torch.cat([self.language_proj(self.language_norm(language)), self.budget_mlp(budget_code)], dim=-1)
        out = {"features": self.trunk(x)}
        if self.tier_head is not None:
            out["tier"] = self.tier_head(out["features"])
        return out

    def insertion_position_logits(self, features: torch.Tensor, tier_index: torch.Tensor | None) -> torch.Tensor:
        """``(B, num_positions)`` logits of ``p`` given each row's tier (option index; ``None``
        without tiers)."""
        logits = self.insertion_position_head(features)
        if self.insertion_position_by_tier is None:
            return logits
        by_tier = self.insertion_position_by_tier(features).view(features.shape[0], -1, logits.shape[-1])
        return logits + by_tier.gather(1, tier_index.view(-1, 1, 1).expand(-1, 1, logits.shape[-1])).squeeze(1)


class Stage2Policy(nn.Module):
    """Context (latency token or language feature) + budget code + embedding of ``p`` -> logits
    for ``top_k`` (if any) and ``num_active_blocks`` (invalid options for ``p`` set to ``-inf``)."""

    def __init__(self, config: ControllerConfig, space: KnobSpace) -> None:
        super().__init__()
        h = config.stage2_hidden_size
        context_dim = config.latency_token_dim if config.stage2_mode == "latency_token" else config.language_dim
        self.context_norm = nn.LayerNorm(context_dim)
        self.context_proj = _mlp([context_dim, h])
        self.budget_mlp = _budget_mlp(config, h)
        self.position_embedding = nn.Embedding(len(space.insertion_positions), config.position_embedding_dim)
        self.trunk = _mlp([2 * h + config.position_embedding_dim, h, h, h])
        self.top_k_head = _head(h, len(space.top_k_options)) if space.top_k_options else None
        self.num_active_blocks_head = _head(h, len(space.all_block_options))
        self._space = space
        self.register_buffer("invalid_blocks", self.compute_invalid_blocks(), persistent=False)

    def compute_invalid_blocks(self) -> torch.Tensor:
        """``(num_p, num_block_options)`` bool: option ``j`` is NOT allowed for the ``i``-th ``p``."""
        space = self._space
        return torch.tensor(
            [[b not in space.block_options(p) for b in space.all_block_options] for p in space.insertion_positions],
            dtype=torch.bool,
        )

    def forward(self, context: torch.Tensor, budget_code: torch.Tensor, p_index: torch.Tensor) -> dict[str, torch.Tensor]:
        x = torch.cat(
            [self.context_proj(self.context_norm(context)), self.budget_mlp(budget_code), self.position_embedding(p_index)], dim=-1
        )
        x = self.trunk(x)
        out = {"num_active_blocks": self.num_active_blocks_head(x).masked_fill(self.invalid_blocks[p_index], float("-inf"))}
        if self.top_k_head is not None:
            out["top_k"] = self.top_k_head(x)
        return out


# =========================================================================== greedy decisions in NumPy
def _silu(x: np.ndarray) -> np.ndarray:
    half = 0.5 * x  # x * sigmoid(x) written with tanh: no overflow for large negative x
    return half + half * np.tanh(half)


class _NumpyGreedy:
    """Greedy decisions of a float32 CPU controller, computed with NumPy on views of its parameters.

    A decision runs inside the request it decides for, between forwards of the executor, where each
    of its ~50 small PyTorch ops runs several times slower than in a loop (cold caches, dispatch).
    On the embedded default deciding in PyTorch added 1.0-1.5 ms to a 13 ms request; the same
    arithmetic in NumPy adds 18-27% less (``bench/controller_overhead.py``). The arrays share
    memory with the parameters, so optimizer steps and ``load_state_dict`` show through;
    :meth:`TwoStageController._numpy_greedy` builds new views when a parameter is replaced or its
    storage changes (``.to()``, ``.double()``). Same argmax as the PyTorch path except where two
    logits tie to float32 rounding.
    """

    def __init__(self, controller: "TwoStageController") -> None:
        # every parameter and buffer: the dict that holds it, its name there, the tensor, its memory.
        # The views below keep that memory alive, so no new tensor can reuse its address unnoticed.
        self.slots = [(table, name, t, t.data_ptr()) for module in controller.modules()
                      for table in (module._parameters, module._buffers) for name, t in table.items() if t is not None]
        # and every submodule where it was: a layer replaced (a new head, a LoRA wrapper) has parameters of its own
        self.children = [(module._modules, name, child) for module in controller.modules() for name, child in module._modules.items()]
        self.controller = controller
        # NumPy reads float32 CPU memory in place; anything else (a GPU, bf16) decides in PyTorch
        self.applies = all(t.device.type == "cpu" and t.dtype in (torch.float32, torch.bool) for _, _, t, _ in self.slots)
        if not self.applies:
            return

        def view(t: torch.Tensor) -> np.ndarray:
            return t.detach().numpy()

        def mlp(seq: nn.Sequential) -> list[tuple[np.ndarray, np.ndarray]]:
            return [(view(m.weight), view(m.bias)) for m in seq if isinstance(m, nn.Linear)]

        def norm(ln: nn.LayerNorm) -> tuple[np.ndarray, np.ndarray, float]:
            return view(ln.weight), view(ln.bias), ln.eps

        enc, s1, s2 = controller.budget_encoding, controller.stage1, controller.stage2
        self.frequencies = view(enc.frequencies)
        self.lo, self.inv_span, self.clamp = np.float32(enc.min_ms), np.float32(1.0 / (enc.max_ms - enc.min_ms)), enc.clamp
        self.s1_norm, self.s1_language, self.s1_budget, self.s1_trunk = norm(s1.language_norm), mlp(s1.language_proj), mlp(s1.budget_mlp), mlp(s1.trunk)
        self.tier_head = None if s1.tier_head is None else (view(s1.tier_head.weight), view(s1.tier_head.bias))
        self.p_head = view(s1.insertion_position_head.weight), view(s1.insertion_position_head.bias)
        self.p_by_tier = None if s1.insertion_position_by_tier is None else view(s1.insertion_position_by_tier.weight)
        self.s2_norm, self.s2_context, self.s2_budget, self.s2_trunk = norm(s2.context_norm), mlp(s2.context_proj), mlp(s2.budget_mlp), mlp(s2.trunk)
        self.position_embedding = view(s2.position_embedding.weight)
        self.top_k_head = None if s2.top_k_head is None else (view(s2.top_k_head.weight), view(s2.top_k_head.bias))
        self.blocks_head = view(s2.num_active_blocks_head.weight), view(s2.num_active_blocks_head.bias)
        self.invalid_blocks = view(s2.invalid_blocks)

    def is_current(self) -> bool:
        """Still the controller's modules and tensors, in the same memory (not replaced, moved or cast)."""
        return (all(table.get(name) is t and t.data_ptr() == pointer for table, name, t, pointer in self.slots)
                and all(table.get(name) is child for table, name, child in self.children))

    @staticmethod
    def _layer_norm(x: np.ndarray, params: tuple[np.ndarray, np.ndarray, float]) -> np.ndarray:
        mean = x.mean(-1, keepdims=True)
        centred = x - mean
        return centred / np.sqrt((centred * centred).mean(-1, keepdims=True) + params[2]) * params[0] + params[1]

    @staticmethod
    def _mlp(layers: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray) -> np.ndarray:
        for weight, bias in layers:  # nn.Linear then SiLU, as _mlp builds them
            x = _silu(x @ weight.T + bias)
        return x

    @staticmethod
    def language(adaptive: Any, text: str) -> np.ndarray:
        """:func:`prompt_features` of one text, ``(1, language_dim)``: NumPy on the executor's float32
        CPU embedding table with a fast tokenizer's backend, else :func:`prompt_features` itself."""
        backend, table = _fast_backend(adaptive.tokenizer), _embedding_of(adaptive).weight
        if backend is None or table.dtype != torch.float32 or table.device.type != "cpu":
            return prompt_features(adaptive, [text]).cpu().numpy()
        ids = backend.encode(text).ids
        if not ids:
            return np.zeros((1, table.shape[1]), dtype=np.float32)
        return table.detach().numpy()[ids].mean(0, keepdims=True)

    def budget_code(self, budgets: list[float]) -> np.ndarray:
        """:meth:`TwoStageController.budget_code` (budgets already checked)."""
        scaled = np.asarray(budgets, dtype=np.float32) / np.float32(self.controller._latency_scale)
        x = (scaled - self.lo) * self.inv_span
        if self.clamp:
            x = np.clip(x, np.float32(0.0), np.float32(1.0))
        x = x[:, None]
        angles = x * self.frequencies
        return np.concatenate([np.sin(angles), np.cos(angles), x], axis=-1)

    def stage1(self, language: np.ndarray, code: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
        """Option indices of the greedy tier (``None`` without tiers) and of ``p`` given it, per row."""
        x = np.concatenate([self._mlp(self.s1_language, self._layer_norm(language, self.s1_norm)), self._mlp(self.s1_budget, code)], axis=-1)
        h = self._mlp(self.s1_trunk, x)
        p_logits = h @ self.p_head[0].T + self.p_head[1]
        if self.tier_head is None:
            return None, p_logits.argmax(-1)
        tier = (h @ self.tier_head[0].T + self.tier_head[1]).argmax(-1)
        by_tier = (h @ self.p_by_tier.T).reshape(h.shape[0], -1, p_logits.shape[-1])
        return tier, (p_logits + by_tier[np.arange(h.shape[0]), tier]).argmax(-1)

    def stage2_budget_part(self, code: np.ndarray, p_index: int) -> np.ndarray:
        """What stage 2 reads besides its context, for one row: budget MLP and ``p``'s embedding."""
        return np.concatenate([self._mlp(self.s2_budget, code)[0], self.position_embedding[p_index]])

    def stage2(self, context: np.ndarray, budget_part: np.ndarray, p_index: int) -> tuple[int | None, int]:
        """Option indices of the greedy ``top_k`` (``None`` without it) and ``num_active_blocks`` for one row."""
        h = self._mlp(self.s2_trunk, np.concatenate([self._mlp(self.s2_context, self._layer_norm(context, self.s2_norm)), budget_part]))
        blocks = h @ self.blocks_head[0].T + self.blocks_head[1]
        blocks[self.invalid_blocks[p_index]] = -np.inf
        top_k = None if self.top_k_head is None else int((h @ self.top_k_head[0].T + self.top_k_head[1]).argmax())
        return top_k, int(blocks.argmax())


def _log_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Log-softmax where ``-inf`` logits (masked options) give exactly ``-inf`` (probability 0)."""
    valid = torch.isfinite(logits)
    safe = logits.masked_fill(~valid, torch.finfo(logits.dtype).min)
    return torch.where(valid, torch.log_softmax(safe, dim=-1), torch.full_like(safe, float("-inf")))


def _check_temperature(temperature: float) -> float:
    """A sampling temperature: a finite number > 0 (it divides the controller's logits)."""
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature={temperature!r} must be a finite number > 0 (it divides the controller's logits)")
    return float(temperature)


def _check_num_generations(num_generations: Any) -> int:
    """A group size: an integer >= 1 (not a bool)."""
    if isinstance(num_generations, bool) or not isinstance(num_generations, int) or num_generations < 1:
        raise ValueError(f"num_generations={num_generations!r} must be an integer >= 1 (knob tuples per request)")
    return num_generations


def _check_exploration(exploration: float) -> float:
    """An exploration floor: a number in ``[0, 1)`` (the weight of the uniform distribution mixed
    into a decision's)."""
    if not (math.isfinite(exploration) and 0 <= exploration < 1):
        raise ValueError(f"stage1_exploration={exploration!r} must be a number in [0, 1) (the weight of the uniform "
                         "distribution mixed into stage 1's)")
    return float(exploration)


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    """Entropy of a distribution given as log-probs (masked ``-inf`` entries contribute 0, no NaN grads)."""
    valid = torch.isfinite(logp)
    safe = logp.masked_fill(~valid, 0.0)
    return -(safe.exp() * safe).masked_fill(~valid, 0.0).sum(-1)


# =========================================================================== the model
class TwoStageController(PreTrainedModel):
    """The two-stage knob controller (see the module docstring for the design).

    Build one for an executor with :meth:`for_executor`, or from a :class:`ControllerConfig`.
    ``forward`` returns the logits (:class:`ControllerOutput`); the methods a trainer and a server
    use are :meth:`sample`, :meth:`log_probs`, :meth:`decide` and :meth:`decide_and_generate`.

    Features are passed as ``language`` (``(B, language_dim)``, from :func:`language_features` /
    :func:`prompt_features`) and ``budgets`` (milliseconds: a number for every row, or ``B`` values).
    """

    config_class = ControllerConfig
    base_model_prefix = "controller"
    main_input_name = "language"
    _no_split_modules: list[str] = []
    supports_gradient_checkpointing = False

    def __init__(self, config: ControllerConfig) -> None:
        super().__init__(config)
        self.knob_space = config.get_knob_space()
        # fixed (no parameters), shared by both stages; each stage has its own trainable budget MLP
        self.budget_encoding = SinusoidalBudgetEncoding(
            config.budget_encoding_dim, config.budget_min_ms, config.budget_max_ms, config.clamp_budget
        )
        self.stage1 = Stage1Policy(config, self.knob_space)
        self.stage2 = Stage2Policy(config, self.knob_space)
        # TRL reads (and writes pad/eos ids into) ``model.generation_config``; the controller does
        # not generate tokens, this is only there so the trainer's setup finds one.
        self.generation_config = GenerationConfig()
        self._latency_scale = 1.0
        self.post_init()

    @property
    def latency_scale(self) -> float:
        """How many times slower than the controller was trained for requests run on this device
        now (default 1).

        The controller learned which tuples fit a budget on its training profile (with its latency
        margin and decision overhead); a budget is divided by this before the controller reads it,
        so on a device (or a moment) ``s`` times slower it picks what fitted ``budget / s`` then. The
        decision overhead it learned is scaled with the rest, which errs on the safe side on a
        slower device. Measure it with :func:`~knob_grpo.profiling.suggest_latency_scale` (from the
        training's latency profile and margin) just before serving or evaluating. A property of
        the device, not of the policy: it is not saved with the checkpoint, and the trainer refuses
        a controller whose scale is not 1, when built and when training starts.
        """
        return self._latency_scale

    @latency_scale.setter
    def latency_scale(self, value: float) -> None:
        self._latency_scale = _check_budget(value, "latency_scale")  # a finite number > 0, as a budget is

    # ------------------------------------------------------------------ the NumPy twin of the greedy decisions
    def _numpy_greedy(self) -> _NumpyGreedy | None:
        """The NumPy implementation of the one-request greedy decisions (:class:`_NumpyGreedy`), or
        ``None`` where it does not apply (parameters not float32 on the CPU, or
        ``_numpy_decisions`` switched off) and the PyTorch path decides."""
        if not self.__dict__.get("_numpy_decisions", True):
            return None
        cached = self.__dict__.get("_numpy_cache")
        if cached is None or not cached.is_current():
            self.__dict__["_numpy_cache"] = cached = _NumpyGreedy(self)
        return cached if cached.applies else None

    # ------------------------------------------------------------------ construction
    @classmethod
    def for_executor(
        cls,
        adaptive: Any,
        *,
        stage2_mode: str = "latency_token",
        budget_range: tuple[float, float] = (170.0, 380.0),
        **sizes: Any,
    ) -> "TwoStageController":
        """A new controller for an :class:`~knob_grpo.adaptive.AdaptiveModel`: its knob space,
        embedding width, hidden size, blocks and experts are recorded in the config.

        ``sizes`` go to :class:`ControllerConfig` (``hidden_size``, ``stage2_hidden_size``,
        ``budget_encoding_dim``, ``position_embedding_dim``, ``clamp_budget``, ...); a name that is
        not one of its fields is refused (the config itself would keep it as an unused attribute).
        """
        fields = {name for name in ControllerConfig.__annotations__ if not name.startswith("_")}
        unknown = sorted(set(sizes) - fields)
        if unknown:
            raise ValueError(f"{unknown[0]}={sizes[unknown[0]]!r} is not a ControllerConfig setting; settings: {', '.join(sorted(fields))}")
        config = ControllerConfig(
            knob_space=adaptive.knob_space.to_dict(),
            budget_range=tuple(budget_range),
            language_dim=int(adaptive.input_embeddings.embedding_dim),
            latency_token_dim=int(adaptive.hidden_size),
            stage2_mode=stage2_mode,
            executor_name_or_path=str(adaptive.name_or_path),
            executor_hidden_size=int(adaptive.hidden_size),
            executor_num_blocks=int(adaptive.num_blocks),
            executor_num_experts=None if adaptive.num_experts is None else int(adaptive.num_experts),
            **sizes,
        )
        return cls(config)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, SinusoidalBudgetEncoding):
            init.copy_(module.frequencies, module.compute_frequencies())
        elif isinstance(module, Stage2Policy):
            init.copy_(module.invalid_blocks, module.compute_invalid_blocks())
        elif isinstance(module, nn.Linear):
            if getattr(module, "_zero_init", False):
                init.zeros_(module.weight)
            elif getattr(module, "_knob_head", False):
                init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            else:  # variance-preserving for the hidden layers
                init.normal_(module.weight, mean=0.0, std=module.in_features ** -0.5)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=1.0)

    # ------------------------------------------------------------------ static helpers
    language_features = staticmethod(language_features)
    prompt_features = staticmethod(prompt_features)

    @property
    def stage2_mode(self) -> str:
        return self.config.stage2_mode

    def num_parameters_per_stage(self) -> dict[str, int]:
        """Trainable parameter counts: ``{"stage1": ..., "stage2": ..., "total": ...}``."""
        s1 = sum(p.numel() for p in self.stage1.parameters())
        s2 = sum(p.numel() for p in self.stage2.parameters())
        return {"stage1": s1, "stage2": s2, "total": s1 + s2}

    def check_executor(self, adaptive: Any) -> None:
        """Refuse (``ValueError``) an executor other than the one this controller was built for.

        Compares the knob space, block count, expert count, hidden size and embedding width;
        fields the config does not record are not checked. The executor's name is not compared
        (the same model may be loaded from a local path or a Hub id).
        """
        cfg = self.config
        diffs = []
        if cfg.executor_num_blocks is not None and cfg.executor_num_blocks != adaptive.num_blocks:
            diffs.append(f"blocks: controller {cfg.executor_num_blocks}, executor {adaptive.num_blocks}")
        if cfg.executor_num_experts is not None and cfg.executor_num_experts != adaptive.num_experts:
            diffs.append(f"experts per block: controller {cfg.executor_num_experts}, executor {adaptive.num_experts}")
        if cfg.executor_hidden_size is not None and cfg.executor_hidden_size != adaptive.hidden_size:
            diffs.append(f"hidden size: controller {cfg.executor_hidden_size}, executor {adaptive.hidden_size}")
        emb_dim = int(adaptive.input_embeddings.embedding_dim)
        if cfg.language_dim != emb_dim:
            diffs.append(f"embedding dim: controller {cfg.language_dim}, executor {emb_dim}")
        if cfg.stage2_mode == "latency_token" and cfg.latency_token_dim != adaptive.hidden_size:
            diffs.append(f"latency token dim: controller {cfg.latency_token_dim}, executor hidden size {adaptive.hidden_size}")
        mine, theirs = self.knob_space.to_dict(), adaptive.knob_space.to_dict()
        if mine != theirs:
            fields = ", ".join(f"{k}: controller {mine.get(k)!r}, executor {theirs.get(k)!r}" for k in mine if mine.get(k) != theirs.get(k))
            diffs.append(f"knob space ({fields})")
        if diffs:
            name = cfg.executor_name_or_path or "another executor"
            raise ValueError(
                f"this controller was trained for {name!s} and does not fit this executor "
                f"({adaptive.name_or_path}): " + "; ".join(diffs)
            )

    # ------------------------------------------------------------------ inputs
    @property
    def _param(self) -> torch.Tensor:
        return self.stage1.insertion_position_head.weight

    def _language(self, language: torch.Tensor) -> torch.Tensor:
        p = self._param
        language = torch.as_tensor(language)
        if language.dim() == 1:
            language = language.unsqueeze(0)
        if language.dim() != 2 or language.shape[-1] != self.config.language_dim:
            raise ValueError(f"language features must be (B, {self.config.language_dim}), got {tuple(language.shape)}")
        if not torch.isfinite(language).all():  # the argmax of NaN logits is option 0, a decision made on nothing
            raise ValueError("language features contain NaN or infinite values")
        return language.to(device=p.device, dtype=p.dtype)

    def budget_tensor(self, budgets: Any, n: int) -> torch.Tensor:
        """Budgets (ms) as a float tensor of ``n`` rows; a ``ValueError`` names a budget that is
        zero, negative, NaN or infinite."""
        return torch.tensor(self._budget_values(budgets, n), dtype=torch.float32, device=self._param.device)

    @staticmethod
    def _budget_values(budgets: Any, n: int) -> list[float]:
        """:meth:`budget_tensor`'s checks, as a list of ``n`` floats."""
        def number(b: Any) -> float:
            # a string would otherwise be read one character per request, a bool as 0 or 1 ms
            if isinstance(b, (str, bytes, bool, np.bool_)) or b is None or (isinstance(b, torch.Tensor) and b.dtype == torch.bool):
                raise ValueError(f"latency budget {b!r} is not allowed: a budget must be a finite number of milliseconds > 0")
            try:
                return float(b)
            except (TypeError, ValueError):
                raise ValueError(f"latency budget {b!r} is not allowed: a budget must be a finite number of milliseconds > 0") from None

        if getattr(budgets, "ndim", 0) > 1:  # would be flattened into more requests than rows
            raise ValueError(f"latency budgets must be one number or one per request, got an array of shape {tuple(budgets.shape)}")
        if isinstance(budgets, torch.Tensor):
            if budgets.dtype == torch.bool:
                number(budgets)
            values = budgets.detach().to(torch.float64).reshape(-1).cpu().tolist()
        elif (isinstance(budgets, (str, bytes, bool, np.bool_, int, float)) or budgets is None or getattr(budgets, "ndim", None) == 0
              or (hasattr(budgets, "item") and not hasattr(budgets, "__len__"))):
            values = [number(budgets)]
        else:
            values = [number(b) for b in budgets]
        for v in values:
            if not math.isfinite(v) or v <= 0:
                raise ValueError(f"latency budget {v!r} ms is not allowed: a budget must be a finite number of milliseconds > 0")
        if len(values) == 1:
            values = values * n
        if len(values) != n:
            raise ValueError(f"got {len(values)} budgets for {n} requests; give one budget, or one per request")
        return values

    def _below_range(self, values: Sequence[float]) -> list[bool]:
        """Which of these (checked) budgets a greedy decision answers with the cheapest configuration:
        those read below the trained range, with ``below_range="cheapest"``."""
        if self.config.below_range not in BELOW_RANGE:  # set after construction: not read as either
            raise ValueError(f"below_range={self.config.below_range!r} is not one of {', '.join(map(repr, BELOW_RANGE))}")
        cheapest = self.config.below_range == "cheapest"
        return [cheapest and v / self._latency_scale < self.config.budget_min_ms for v in values]

    def reads_latency_token(self, budget: float) -> bool:
        """Whether the greedy stage 2 for ``budget`` (ms) reads the latency token, inside the generate
        at block ``p``: in latency-token mode, unless the budget is read below the trained range
        (``below_range="cheapest"``), where all four knobs are known before anything runs and the
        request is a plain generate (:meth:`decide_and_generate`, the evaluation's timed runs)."""
        return self.stage2_mode == "latency_token" and not self._below_range(self._budget_values(budget, 1))[0]

    def _cheapest_rest(self, insertion_position: int) -> tuple[int | None, int]:
        """The cheapest ``(top_k, num_active_blocks)`` after a given ``p``."""
        space = self.knob_space
        return (space.top_k_options[0] if space.top_k_options else None), space.block_options(insertion_position)[0]

    def _latency_tokens(self, tokens: torch.Tensor, n: int) -> torch.Tensor:
        tokens = torch.as_tensor(tokens)
        if tokens.dim() == 1:
            tokens = tokens.unsqueeze(0)
        if tuple(tokens.shape) != (n, self.config.latency_token_dim):
            raise ValueError(f"latency tokens must be ({n}, {self.config.latency_token_dim}), got {tuple(tokens.shape)}")
        if not torch.isfinite(tokens).all():
            raise ValueError("latency tokens contain NaN or infinite values")
        return tokens.to(device=self._param.device, dtype=self._param.dtype)

    def _option_index(self, knob: str, values: Sequence[Any]) -> torch.Tensor:
        """Option indices of ``values`` of one knob (a ``ValueError`` names a value not allowed)."""
        options = self.knob_space.options(knob)
        return torch.tensor([options.index(self.knob_space.check_value(knob, v)) for v in values], device=self._param.device)

    def _tier_index(self, tiers: Any, n: int) -> torch.Tensor | None:
        """Option indices of one tier per row (``None`` for a knob space without tiers, whose rows
        must then give ``None``)."""
        tiers = [tiers] * n if isinstance(tiers, str) or tiers is None else list(tiers)
        if len(tiers) != n:
            raise ValueError(f"got {len(tiers)} tiers for {n} rows")
        if not self.knob_space.tiers:
            given = [t for t in tiers if t is not None]
            if given:
                self.knob_space.check_value("tier", given[0])  # raises: this model has no tier knob
            return None
        return self._option_index("tier", tiers)

    def _p_index(self, insertion_positions: Any) -> torch.Tensor:
        values = insertion_positions.tolist() if isinstance(insertion_positions, torch.Tensor) else list(insertion_positions)
        return self._option_index("insertion_position", values)

    def _stage2_context(self, language: torch.Tensor, latency_tokens: Any, n: int) -> torch.Tensor:
        if self.stage2_mode == "prompt":
            return language
        if latency_tokens is None:
            raise ValueError("a latency_token controller needs the latency tokens for stage 2 (latency_tokens=... / latency_token_fn=...)")
        return self._latency_tokens(latency_tokens, n)

    def budget_code(self, budgets: Any, n: int) -> torch.Tensor:
        """The fixed part of the budget feature: ``(n, budget_encoding_dim + 1)``, of the budgets
        divided by :attr:`latency_scale` (in the training profile's milliseconds)."""
        return self.budget_encoding(self.budget_tensor(budgets, n) / self._latency_scale).to(self._param.dtype)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        language: torch.Tensor,
        budgets: Any,
        insertion_positions: Any = None,
        latency_tokens: torch.Tensor | None = None,
        return_dict: bool = True,
        tiers: Any = None,
        **kwargs: Any,
    ) -> ControllerOutput:
        """Logits of both stages. ``insertion_position_logits`` are given each row's tier: ``tiers``
        (one per row), or the likeliest tier by default. Stage 2 needs ``insertion_positions`` (``p``
        values, one per row) and, in latency-token mode, ``latency_tokens`` ``(B, latency_token_dim)``."""
        language = self._language(language)
        n = language.shape[0]
        code = self.budget_code(budgets, n)
        tier_index = self._tier_index(tiers, n) if tiers is not None else None
        s1 = self._stage1_logits(language, code, tier_index)
        s2: dict[str, torch.Tensor] = {}
        if insertion_positions is not None:
            context = self._stage2_context(language, latency_tokens, n)
            s2 = self.stage2(context, code, self._p_index(insertion_positions))
        out = ControllerOutput(
            tier_logits=s1.get("tier"),
            insertion_position_logits=s1["insertion_position"],
            top_k_logits=s2.get("top_k"),
            num_active_blocks_logits=s2.get("num_active_blocks"),
        )
        return out if return_dict else out.to_tuple()

    # ------------------------------------------------------------------ knobs <-> indices
    def _stage1_values(self, idx: dict[str, torch.Tensor]) -> tuple[list, list]:
        space = self.knob_space
        n = idx["insertion_position"].shape[0]
        tiers = [space.tiers[i] for i in idx["tier"].tolist()] if "tier" in idx else [None] * n
        ps = [space.insertion_positions[i] for i in idx["insertion_position"].tolist()]
        return tiers, ps

    def _to_knobs(self, idx: dict[str, torch.Tensor], tiers: list, ps: list) -> list[Knobs]:
        space = self.knob_space
        n = len(ps)
        ks = [space.top_k_options[i] for i in idx["top_k"].tolist()] if "top_k" in idx else [None] * n
        bs = [space.all_block_options[i] for i in idx["num_active_blocks"].tolist()]
        return [Knobs(tier=t, insertion_position=p, top_k=k, num_active_blocks=b) for t, p, k, b in zip(tiers, ps, ks, bs)]

    def knob_indices(self, knobs: Sequence[Knobs | dict]) -> dict[str, torch.Tensor]:
        """Option indices of each present knob, ``(N,)`` each; tuples are validated first
        (``ValueError`` for an invalid one; a ``None`` knob means the full setting)."""
        space = self.knob_space
        rows = [space.validate(k) for k in knobs]
        device = self._param.device
        out = {
            "insertion_position": torch.tensor([space.insertion_positions.index(k.insertion_position) for k in rows], device=device),
            "num_active_blocks": torch.tensor([space.all_block_options.index(k.num_active_blocks) for k in rows], device=device),
        }
        if space.tiers:
            out["tier"] = torch.tensor([space.tiers.index(k.tier) for k in rows], device=device)
        if space.top_k_options:
            out["top_k"] = torch.tensor([space.top_k_options.index(k.top_k) for k in rows], device=device)
        return out

    # ------------------------------------------------------------------ policy API
    def _choose(
        self, logits: dict[str, torch.Tensor], names: tuple[str, ...], greedy: bool, generator: torch.Generator | None,
        idx: dict[str, torch.Tensor], logps: dict[str, torch.Tensor], temperature: float = 1.0, exploration: float = 0.0,
    ) -> None:
        for name in names:
            if name not in logits:
                continue
            if greedy:  # argmax of the logits: a masked (-inf) option is never the maximum
                idx[name] = logits[name].argmax(-1)
                continue
            logp = _log_softmax(logits[name] / temperature)
            if exploration > 0:  # the floor is uniform over the valid options only
                valid = torch.isfinite(logits[name])
                floor = valid.to(logp.dtype) / valid.sum(-1, keepdim=True)
                logp = torch.where(valid, torch.log((1 - exploration) * logp.exp() + exploration * floor), logp)
            # multinomial never draws a zero-probability (masked) option
            idx[name] = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(-1)
            logps[name] = logp.gather(-1, idx[name].unsqueeze(-1)).squeeze(-1)

    def _stage1_logits(self, language: torch.Tensor, code: torch.Tensor, tier_index: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """Stage 1's logits: the tier's, and ``p``'s given each row's tier (option index; the
        likeliest tier when ``None``)."""
        s1 = self.stage1(language, code)
        if tier_index is None and "tier" in s1:
            tier_index = s1["tier"].argmax(-1)
        s1["insertion_position"] = self.stage1.insertion_position_logits(s1["features"], tier_index)
        return s1

    def _stage1(self, language: torch.Tensor, code: torch.Tensor, greedy: bool, generator: torch.Generator | None,
                idx: dict[str, torch.Tensor], logps: dict[str, torch.Tensor], temperature: float = 1.0, exploration: float = 0.0) -> None:
        """Stage 1's decisions into ``idx`` (and their log-probs into ``logps``): the tier, then ``p`` given it."""
        s1 = self.stage1(language, code)
        self._choose(s1, ("tier",), greedy, generator, idx, logps, temperature, exploration)
        logits = {"insertion_position": self.stage1.insertion_position_logits(s1["features"], idx.get("tier"))}
        self._choose(logits, ("insertion_position",), greedy, generator, idx, logps, temperature, exploration)

    def _run(
        self,
        language: torch.Tensor,
        budgets: Any,
        *,
        greedy: bool,
        num_generations: int = 1,
        latency_token_fn: LatencyTokenFn | None = None,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
        stage1_exploration: float = 0.0,
    ) -> KnobSample:
        _check_num_generations(num_generations)
        _check_temperature(temperature)
        _check_exploration(stage1_exploration)
        if self.stage2_mode == "latency_token" and latency_token_fn is None:
            raise ValueError("a latency_token controller needs latency_token_fn(tiers, insertion_positions) -> (N, d) for stage 2")
        language = self._language(language)
        values = self._budget_values(budgets, language.shape[0])
        code = self.budget_code(values, language.shape[0])
        # greedy decisions: the cheapest configuration below the trained range (ControllerConfig.below_range)
        below = torch.tensor(self._below_range(values), device=language.device).repeat_interleave(num_generations) if greedy else None
        cheapest = self.knob_indices([self.knob_space.cheapest()]) if below is not None and bool(below.any()) else {}
        if num_generations > 1:
            language = language.repeat_interleave(num_generations, dim=0)
            code = code.repeat_interleave(num_generations, dim=0)
        n = language.shape[0]
        idx: dict[str, torch.Tensor] = {}
        logps: dict[str, torch.Tensor] = {}

        def cheapest_below(names: tuple[str, ...]) -> None:
            for name in names:
                if name in idx and cheapest:
                    idx[name] = torch.where(below, cheapest[name], idx[name])

        self._stage1(language, code, greedy, generator, idx, logps, temperature, stage1_exploration)
        cheapest_below(("tier", "insertion_position"))
        tiers, ps = self._stage1_values(idx)
        tokens = None
        if self.stage2_mode == "latency_token":
            tokens = self._latency_tokens(latency_token_fn(tiers, ps), n)
        context = language if tokens is None else tokens
        self._choose(self.stage2(context, code, idx["insertion_position"]), ("top_k", "num_active_blocks"), greedy, generator, idx, logps,
                     temperature)
        cheapest_below(("top_k", "num_active_blocks"))
        knobs = self._to_knobs(idx, tiers, ps)
        if greedy:
            return KnobSample(knobs=knobs, log_probs={}, log_prob=language.new_zeros(0), indices=idx, latency_tokens=tokens)
        zeros = language.new_zeros(n)
        per = {name: logps.get(name, zeros) for name in KNOB_NAMES}
        indices = {name: idx.get(name, torch.full((n,), -1, device=language.device, dtype=torch.long)) for name in KNOB_NAMES}
        return KnobSample(
            knobs=knobs,
            log_probs=per,
            log_prob=sum(per.values()),
            indices=indices,
            latency_tokens=tokens,
            num_generations=num_generations,
        )

    @torch.no_grad()
    def sample(
        self,
        language: torch.Tensor,
        budgets: Any,
        *,
        num_generations: int = 1,
        latency_token_fn: LatencyTokenFn | None = None,
        generator: torch.Generator | None = None,
        temperature: float = 1.0,
        stage1_exploration: float = 0.0,
    ) -> KnobSample:
        """Sample ``G = num_generations`` tuples for each of ``B`` requests (``B*G`` rows, request-major).

        ``language``: ``(B, language_dim)``; ``budgets``: ms, one value or ``B``. In latency-token
        mode sampling is two-step: stage 1 samples ``(tier, p)`` for every row, then
        ``latency_token_fn(tiers, insertion_positions)`` (two lists of ``B*G``) must return the
        ``(B*G, latency_token_dim)`` latency tokens, then stage 2 samples. No gradient: use
        :meth:`log_probs` for the loss. Sampled tuples always pass ``knob_space.validate``.
        ``temperature`` divides every decision's logits before sampling (``KnobSample.log_probs``
        are those of the divided logits; greedy decisions do not depend on it).

        ``stage1_exploration`` ``ε`` in ``[0, 1)`` draws stage 1's decisions (tier, p) from
        ``(1 - ε) * policy + ε * uniform`` instead of the policy, so that no tier nor position
        stops being tried while training; ``KnobSample.log_probs`` are then those of that mixture
        (the distribution the tuple was drawn from), so a GRPO loss weighs each decision by
        ``policy / mixture`` as it weighs any off-policy sample. Stage 2 samples from its policy.
        """
        return self._run(language, budgets, greedy=False, num_generations=num_generations, latency_token_fn=latency_token_fn,
                         generator=generator, temperature=temperature, stage1_exploration=stage1_exploration)

    @torch.inference_mode()
    def decide(self, language: torch.Tensor, budgets: Any, *, latency_token_fn: LatencyTokenFn | None = None) -> list[Knobs]:
        """The greedy tuple (argmax at each stage) for each of ``B`` requests.

        In latency-token mode ``latency_token_fn(tiers, insertion_positions)`` gives the ``(B, d)``
        latency tokens for the stage-1 choices, as in :meth:`sample`.
        """
        return self._run(language, budgets, greedy=True, latency_token_fn=latency_token_fn).knobs

    def log_probs(
        self,
        knobs: Sequence[Knobs | dict],
        language: torch.Tensor,
        budgets: Any,
        *,
        latency_tokens: torch.Tensor | None = None,
        num_generations: int = 1,
        temperature: float = 1.0,
    ) -> KnobLogProbs:
        """Per-decision log-probabilities and entropies of given tuples, with gradients.

        ``knobs``: ``N = B * num_generations`` tuples, request-major; ``language`` and ``budgets``
        are per request (``B`` rows; they are repeated ``num_generations`` times).
        ``latency_tokens``: ``(N, latency_token_dim)``, required in latency-token mode (e.g.
        ``KnobSample.latency_tokens``). An invalid tuple raises ``ValueError``. ``temperature``: as
        in :meth:`sample`.
        """
        _check_temperature(temperature)
        _check_num_generations(num_generations)
        language = self._language(language)
        code = self.budget_code(budgets, language.shape[0])
        if num_generations > 1:
            language = language.repeat_interleave(num_generations, dim=0)
            code = code.repeat_interleave(num_generations, dim=0)
        n = language.shape[0]
        if len(knobs) != n:
            raise ValueError(f"got {len(knobs)} knob tuples for {n} rows ({n // num_generations} requests x {num_generations})")
        idx = self.knob_indices(knobs)
        context = self._stage2_context(language, latency_tokens, n)
        logits = self._stage1_logits(language, code, idx.get("tier"))
        logits.update(self.stage2(context, code, idx["insertion_position"]))
        zeros = language.new_zeros(n)
        per, ent = {}, {}
        for name in KNOB_NAMES:
            if name in logits:
                logp = _log_softmax(logits[name] / temperature)
                per[name] = logp.gather(-1, idx[name].unsqueeze(-1)).squeeze(-1)
                ent[name] = _entropy(logp)
            else:
                per[name], ent[name] = zeros, zeros
        return KnobLogProbs(per_decision=per, total=sum(per.values()), entropy=ent, entropy_total=sum(ent.values()))

    # ------------------------------------------------------------------ one-call inference
    @torch.inference_mode()
    def decide_stage1(self, language: torch.Tensor, budgets: Any) -> list[tuple[str | None, int]]:
        """The greedy ``(tier, insertion_position)`` for each of ``B`` requests (stage 1 only; below
        the trained range, the cheapest configuration's: ``ControllerConfig.below_range``)."""
        language = self._language(language)
        values = self._budget_values(budgets, language.shape[0])
        idx: dict[str, torch.Tensor] = {}
        self._stage1(language, self.budget_code(values, language.shape[0]), True, None, idx, {})
        cheapest = self.knob_space.cheapest()
        return [(cheapest.tier, cheapest.insertion_position) if below else decided
                for decided, below in zip(zip(*self._stage1_values(idx)), self._below_range(values))]

    @torch.no_grad()
    def decide_insertion_position(self, language: torch.Tensor, budgets: Any, tiers: Sequence[str | None]) -> list[int]:
        """The greedy ``insertion_position`` for each of ``B`` requests given its tier (``tiers``:
        one per request, ``None`` entries for a model without tiers; below the trained range, the
        cheapest configuration's: ``ControllerConfig.below_range``)."""
        language = self._language(language)
        n = language.shape[0]
        tier_index = self._tier_index(tiers, n)
        values = self._budget_values(budgets, n)
        index = self._stage1_logits(language, self.budget_code(values, n), tier_index)["insertion_position"].argmax(-1)
        cheapest = self.knob_space.cheapest().insertion_position
        return [cheapest if below else self.knob_space.insertion_positions[i] for i, below in zip(index.tolist(), self._below_range(values))]

    @torch.no_grad()
    def decide_stage2(self, language: torch.Tensor, budgets: Any, stage1: Sequence[Knobs], *,
                      latency_tokens: torch.Tensor | None = None) -> list[Knobs]:
        """Greedy stage 2 after given stage-1 choices: for each of ``N`` rows, ``stage1[i]``'s tier
        and ``p`` with the ``top_k`` and ``num_active_blocks`` stage 2 would pick for them (argmax),
        reading ``latency_tokens[i]`` ``(N, latency_token_dim)`` in latency-token mode. Below the
        trained range, the cheapest ``top_k`` and ``num_active_blocks`` after that ``p``
        (``ControllerConfig.below_range``)."""
        language = self._language(language)
        n = language.shape[0]
        if len(stage1) != n:
            raise ValueError(f"got {len(stage1)} stage-1 choices for {n} rows")
        values = self._budget_values(budgets, n)
        code = self.budget_code(values, n)
        positions = [k.insertion_position for k in stage1]
        self._tier_index([k.tier for k in stage1], n)  # the tiers the returned tuples carry are real ones
        idx: dict[str, torch.Tensor] = {}
        self._choose(self.stage2(self._stage2_context(language, latency_tokens, n), code, self._p_index(positions)),
                     ("top_k", "num_active_blocks"), True, None, idx, {})
        knobs = self._to_knobs(idx, [k.tier for k in stage1], positions)
        return [Knobs(k.tier, k.insertion_position, *self._cheapest_rest(k.insertion_position)) if below else k
                for k, below in zip(knobs, self._below_range(values))]

    def stage2_decider(self, language: torch.Tensor, budget: float, tier: str | None, insertion_position: int) -> Callable[[torch.Tensor], tuple[int | None, int]]:
        """Greedy stage 2 for one request whose stage 1 chose ``(tier, insertion_position)``, as the
        ``decide`` function of :meth:`AdaptiveModel.generate_with_decision`: latency token
        ``(1, latency_token_dim)`` -> ``(top_k, num_active_blocks)``. In prompt mode the token is
        ignored (stage 2 reads the language feature); below the trained range it is ignored too,
        and ``decide`` gives the cheapest options after that ``p`` (``ControllerConfig.below_range``)."""
        language = self._language(language)
        if language.shape[0] != 1:
            raise ValueError(f"stage2_decider is for one request; got language features for {language.shape[0]}")
        values = self._budget_values(budget, 1)
        code = self.budget_code(values, 1)
        self._tier_index([tier], 1)
        p_index = self._p_index([insertion_position])
        if self._below_range(values)[0]:
            rest = self._cheapest_rest(insertion_position)
            return lambda latency_token: rest

        @torch.inference_mode()
        def decide(latency_token: torch.Tensor) -> tuple[int | None, int]:
            context = self._latency_tokens(latency_token, 1) if self.stage2_mode == "latency_token" else language
            idx: dict[str, torch.Tensor] = {}
            self._choose(self.stage2(context, code, p_index), ("top_k", "num_active_blocks"), True, None, idx, {})
            knobs = self._to_knobs(idx, [tier], [insertion_position])[0]
            return knobs.top_k, knobs.num_active_blocks

        return decide

    def decide_for_request(self, adaptive: Any, text: str, budget: float) -> tuple[str | None, int, Callable[[Any], tuple[int | None, int]]]:
        """A server's greedy decisions for one request: stage 1's ``(tier, insertion_position)`` and
        stage 2 as the ``decide`` function of :meth:`AdaptiveModel.generate_with_decision` (latency
        token -> ``(top_k, num_active_blocks)``; in prompt mode it ignores its argument).

        What :meth:`decide_and_generate` and the timed controller runs of the evaluation use. A
        float32 controller on the CPU computes it in NumPy (:class:`_NumpyGreedy`): the same
        decisions as :meth:`decide_stage1` and :meth:`stage2_decider`, without the ~20 small PyTorch
        ops they run, each several times slower inside a request than in a loop. It runs inside each
        request's time, so it does not check the executor: do that once with :meth:`check_executor`,
        as :meth:`decide_and_generate` and the evaluation do. Below the trained range it decides
        nothing: the cheapest configuration (``ControllerConfig.below_range``).
        """
        values = self._budget_values(budget, 1)
        if self._below_range(values)[0]:
            cheapest = self.knob_space.cheapest()
            return cheapest.tier, cheapest.insertion_position, lambda latency_token: (cheapest.top_k, cheapest.num_active_blocks)
        fast = self._numpy_greedy()
        if fast is None:
            language = self._language(prompt_features(adaptive, [text]))
            ((tier, p),) = self.decide_stage1(language, [budget])
            return tier, p, self.stage2_decider(language, budget, tier, p)
        space = self.knob_space
        language = _NumpyGreedy.language(adaptive, text)
        code = fast.budget_code(values)
        tier_index, p_index = fast.stage1(language, code)
        tier = None if tier_index is None else space.tiers[int(tier_index[0])]
        p_index = int(p_index[0])
        budget_part = fast.stage2_budget_part(code, p_index)  # now, so that only the token's part runs at block p
        width = self.config.latency_token_dim

        def decide(latency_token: Any) -> tuple[int | None, int]:
            if self.stage2_mode == "prompt":
                context = language[0]
            else:
                if tuple(latency_token.shape) != (1, width):
                    raise ValueError(f"latency tokens must be (1, {width}), got {tuple(latency_token.shape)}")
                context = latency_token.detach().float().cpu().numpy()[0]
                if not np.isfinite(context).all():
                    raise ValueError("latency tokens contain NaN or infinite values")
            top_k, blocks = fast.stage2(context, budget_part, p_index)
            return (None if top_k is None else space.top_k_options[top_k]), space.all_block_options[blocks]

        return tier, space.insertion_positions[p_index], decide

    @torch.no_grad()
    def decide_and_generate(self, adaptive: Any, text: str | Sequence[str], images: Any, latency_budget: Any, **generate_kwargs: Any) -> tuple[Any, list[Knobs]]:
        """Choose the knobs for each prompt greedily and generate with them.

        Stage 1 reads the prompt text (tokenised without chat template, :func:`prompt_features`)
        and the budget. Latency-token mode then runs one
        ``adaptive.generate_with_decision(text, images, tier, p, decide=stage 2)``: entering block
        ``p`` the prompt's latency token goes to stage 2, whose ``top_k`` and
        ``num_active_blocks`` hold from there on, so blocks ``0..p-1`` (and the vision tower)
        process the prompt once, in one generation loop. Prompt mode, and a budget below the
        trained range (:meth:`reads_latency_token`), pick all four knobs first and call
        ``adaptive.generate(text, images, tier=..., ...)``.

        ``text``: one prompt or a list; ``images``: ``None``, one image (or a one-element list)
        for a single prompt, or one image per prompt; ``latency_budget``: ms, one value or one per
        prompt. Returns ``(output, knobs)``: for a single prompt (a ``str``) the output of
        ``adaptive.generate``; for a list, a list with one output per prompt in the original
        order (each prompt runs in its own generate call, since rows with different knobs cannot
        share one, so each output equals the single-prompt call). A row without an image runs
        with ``tier=None``. Refuses an executor the controller was not built for.

        Each prompt's decisions come from :meth:`decide_for_request`, which a float32 controller on
        the CPU computes in NumPy on its own parameters: the same decisions, adding 18-27% less time
        to a request (``bench/controller_overhead.py``).
        """
        self.check_executor(adaptive)
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if images is None:
            row_images = [None] * len(texts)
        elif single:
            row_images = [images if isinstance(images, (list, tuple)) else [images]]
        else:
            if not isinstance(images, (list, tuple)) or len(images) != len(texts):
                raise ValueError(f"got {len(texts)} prompts: give one image per prompt (or images=None)")
            row_images = [None if im is None else (im if isinstance(im, (list, tuple)) else [im]) for im in images]
        budgets = self._budget_values(latency_budget, len(texts))
        outputs, chosen = [], []
        for i, text in enumerate(texts):
            tier, p, decide = self.decide_for_request(adaptive, text, budgets[i])
            tier = tier if row_images[i] is not None else None
            if self.reads_latency_token(budgets[i]):
                out, knobs = adaptive.generate_with_decision(texts[i], row_images[i], decide=decide, tier=tier,
                                                             insertion_position=p, **generate_kwargs)
            else:
                top_k, num_active_blocks = decide(None)
                knobs = Knobs(tier=tier, insertion_position=p, top_k=top_k, num_active_blocks=num_active_blocks)
                out = adaptive.generate(texts[i], row_images[i], **knobs.as_dict(), **generate_kwargs)
            outputs.append(out)
            chosen.append(knobs)
        return (outputs[0] if single else outputs), chosen


AutoConfig.register(ControllerConfig.model_type, ControllerConfig, exist_ok=True)
AutoModel.register(ControllerConfig, TwoStageController, exist_ok=True)
