"""Run a frozen Hugging Face model in a chosen knob configuration.

How the knobs reach the model (no weights are copied or changed):

* ``top_k`` — each MoE router's ``forward`` is wrapped; when a configuration is active and the
  block index is ``>= insertion_position``, the top-k is recomputed from the router's own logits
  with the requested ``k`` (renormalised exactly when the router itself renormalises).
* ``num_active_blocks`` — each decoder block's ``forward`` is wrapped; a dropped block returns its
  input unchanged (its KV cache is never written; block 0 is never dropped, so the cache length
  the model reads from block 0 stays right).
* ``tier`` — applied where the image becomes tokens: the processor's pixel budget (Qwen-VL) or
  crop budget (Molmo).
* ``insertion_position`` — bounds the two block-level knobs, and is where a generate can be
  split: :meth:`AdaptiveModel.prefill` runs blocks ``0..p-1`` and returns the hidden state of
  the last prompt token (the controller's latency token); ``generate(prefix=...)`` then continues
  the same prefill from block ``p`` by replaying the recorded vision output, KV entries and hidden
  state instead of recomputing them.

The wrappers are installed once, when the :class:`AdaptiveModel` is built, and do nothing while no
configuration is active: the model behaves exactly as the unwrapped one. The active configuration
lives in thread-local state that is set for one call and cleared in a ``finally``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from .architectures import ArchitectureSpec, get_architecture
from .knobs import KNOB_NAMES, Knobs, KnobSpace, _check_int

ADAPTIVE_CONFIG_NAME = "knob_grpo_adaptive.json"


# --------------------------------------------------------------------------- active configuration
@dataclass
class _Recording:
    """State of a partial forward: record up to block ``stop_at``, then stop."""

    stop_at: int
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # input of block i, i = 1..stop_at
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # what block i wrote
    vision_output: Any = None


@dataclass
class _Replay:
    """State of a continuation: blocks ``< p`` replay their KV, block ``p`` starts from ``hidden``."""

    insertion_position: int
    hidden: torch.Tensor
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]
    vision_output: Any
    consumed: bool = False


@dataclass
class _Rows:
    """Per-row knobs of a batched continuation: row ``r`` runs blocks from ``from_block[r]`` on with
    ``top_k[r]`` experts (``None``: the model's own) and without the blocks in ``dropped[r]``."""

    from_block: list[int]
    top_k: list[int | None]
    dropped: list[frozenset[int]]


@dataclass
class _Active:
    top_k: int | None
    from_block: int
    dropped: frozenset[int]
    recording: _Recording | None = None
    replay: _Replay | None = None
    rows: _Rows | None = None
    # called once, with the hidden states entering block ``from_block`` in the prefill; returns the
    # ``(top_k, dropped)`` that hold from there on (one-pass controller inference)
    decide: Callable[[torch.Tensor], tuple[int | None, frozenset[int]]] | None = None


class _StopPrefill(Exception):
    """Raised inside the forward once the partial prefill reaches block p."""


_local = threading.local()


def _active() -> _Active | None:
    return getattr(_local, "active", None)


@contextlib.contextmanager
def _activate(state: _Active | None) -> Iterator[None]:
    previous = _active()
    _local.active = state
    try:
        yield
    finally:
        _local.active = previous


def _get_path(root: Any, path: str) -> Any:
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _set_path(root: Any, path: str, value: Any) -> None:
    *head, last = path.split(".")
    obj = root
    for part in head:
        obj = getattr(obj, part)
    setattr(obj, last, value)


# --------------------------------------------------------------------------- outputs
@dataclass
class PrefixState:
    """A prefill stopped before block ``insertion_position`` (see :meth:`AdaptiveModel.prefill`).

    It can be continued by ``AdaptiveModel.generate(prefix=state, ...)`` any number of times, with
    any ``top_k`` / ``num_active_blocks`` and any ``insertion_position <= state.insertion_position``
    (blocks before that ``p`` ran at the full configuration here, which is what the knobs require).
    """

    tier: str | None
    insertion_position: int
    inputs: dict[str, Any]
    hidden: dict[int, torch.Tensor]
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]]
    vision_output: Any

    def latency_token(self, insertion_position: int | None = None) -> torch.Tensor:
        """Hidden state of the last prompt token entering block ``p``: ``(batch, hidden_size)``."""
        p = self.insertion_position if insertion_position is None else insertion_position
        if p not in self.hidden:
            raise ValueError(
                f"insertion_position={p} is not available from this prefix; allowed: 1..{self.insertion_position}"
            )
        return self.hidden[p][:, -1, :]


@dataclass
class ControlledGeneration:
    """What ``AdaptiveModel.generate(..., controller=...)`` returns: the output and the chosen knobs."""

    output: Any
    knobs: list[Knobs]


# --------------------------------------------------------------------------- the wrapper
class AdaptiveModel:
    """A frozen transformers model (optionally a ``PeftModel``) whose ``generate`` takes knobs.

    Args:
        model: a loaded ``*ForCausalLM`` / ``*ForConditionalGeneration`` model or a ``PeftModel``.
        processor: its processor (vision-language) or tokenizer (text). Needed to pass raw text
            and images to :meth:`generate` and for the ``tier`` knob.
        knob_space: the options a controller chooses from; defaults from the model's config
            (:meth:`KnobSpace.from_model`).
        tier_pixels: pixel budget of each tier, cheapest first, for Qwen-VL-style models. The
            last tier defaults to the processor's own ``max_pixels`` so the full setting is the
            unmodified model; the others default to 256 and 1024 merged vision tokens (or 1/16
            and 1/4 of the full budget when that is smaller).
        tier_crops: maximum crops per image of each tier, cheapest first, for Molmo-style models
            (``tier_mode="crops"``). The last tier defaults to the processor's own ``max_crops``
            (15 if it has none) so the full setting is the unmodified model; the others default to
            the research system's 3 and 8 crops (1/4 and 1/2 of the full budget when it is 8 or less).
        importance_scores: per block, the damage of dropping it alone (higher = more important),
            as measured by :meth:`measure_block_importance`. Without scores blocks are dropped
            deepest first, keeping the last block for last: ``n-2, n-3, ..., p, n-1``.
        name_or_path: the executor's identifier (recorded by controllers and latency profiles).

    Thread safety: the knob configuration is thread-local, so several threads may call
    :meth:`generate` with different knobs at once on text models. For Qwen-VL-style models
    transformers itself keeps per-call state on the module (``rope_deltas``), so calls on those
    are serialised by a lock held for the whole call.
    """

    def __init__(
        self,
        model: nn.Module,
        processor: Any = None,
        *,
        knob_space: KnobSpace | None = None,
        tier_pixels: dict[str, int] | None = None,
        tier_crops: dict[str, int] | None = None,
        importance_scores: Sequence[float] | None = None,
        name_or_path: str | None = None,
    ) -> None:
        self.model = model
        self.processor = processor
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.base_model = base
        self.config = base.config
        self.text_config = self.config.get_text_config()
        self.arch: ArchitectureSpec = get_architecture(self.config.model_type)
        self.name_or_path = name_or_path or getattr(self.config, "_name_or_path", "") or self.config.model_type

        self.layers: nn.ModuleList = _get_path(base, self.arch.layers)
        self.num_blocks = len(self.layers)
        self.routers: dict[int, nn.Module] = {}
        if self.arch.router is not None:
            for i, layer in enumerate(self.layers):
                try:
                    router = _get_path(layer, self.arch.router)
                except AttributeError:
                    continue  # a dense block inside a MoE model
                if hasattr(router, "top_k"):
                    self.routers[i] = router
            if not self.routers:
                raise ValueError(f"found no MoE router at '{self.arch.router}' in any block of {self.config.model_type}")
        self.vision_tower: nn.Module | None = _get_path(base, self.arch.vision_tower) if self.arch.vision_tower else None

        self.num_experts: int | None = None
        self.default_top_k: int | None = None
        if self.routers:
            first = next(iter(self.routers.values()))
            self.default_top_k = int(first.top_k)
            self.num_experts = int(getattr(first, "num_experts", first.weight.shape[0]))

        self._check_tier_mode(tier_pixels, tier_crops)
        self.tier_pixels = self._default_tier_pixels(tier_pixels, knob_space)
        self.tier_crops = self._default_tier_crops(tier_crops, knob_space)
        if knob_space is None:
            knob_space = KnobSpace.from_model(
                self.num_blocks,
                default_top_k=self.default_top_k,
                num_experts=self.num_experts,
                has_vision=self.vision_tower is not None,
                tiers=tuple(self.tier_settings) if self.tier_settings else None,
            )
        self._check_space(knob_space)
        self.knob_space = knob_space

        self.importance_scores: list[float] | None = None
        if importance_scores is not None:
            self.set_importance_scores(importance_scores)

        self._lock = threading.RLock() if self.arch.stateful_attributes else None
        self._install()

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_pretrained(cls, name_or_path: str, *, processor: Any = None, **kwargs: Any) -> "AdaptiveModel":
        """Load a model (and its processor) with transformers' Auto classes, plus saved knob settings.

        ``kwargs`` go to the model's ``from_pretrained`` except ``knob_space``, ``tier_pixels``,
        ``tier_crops`` and ``importance_scores``, which go to the wrapper (they override what was saved).
        ``"knob_grpo/embedded"`` is the package's committed embedded model (no download).
        """
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

        from .embedded import EMBEDDED_NAME, load_embedded_adaptive

        if name_or_path == EMBEDDED_NAME and not os.path.isfile(os.path.join(name_or_path, "config.json")):
            if processor is not None or kwargs:
                raise ValueError(f"{EMBEDDED_NAME!r} is loaded as committed; it takes no processor or other arguments (got {sorted(kwargs)})")
            return load_embedded_adaptive()

        from .processing import load_processor

        own = {k: kwargs.pop(k) for k in ("knob_space", "tier_pixels", "tier_crops", "importance_scores") if k in kwargs}
        saved: dict[str, Any] = {}
        local = os.path.join(name_or_path, ADAPTIVE_CONFIG_NAME)
        if os.path.isfile(local):
            with open(local) as f:
                saved = json.load(f)
        else:
            try:
                from huggingface_hub import hf_hub_download

                with open(hf_hub_download(name_or_path, ADAPTIVE_CONFIG_NAME)) as f:
                    saved = json.load(f)
            except Exception:  # no saved settings: defaults from the config
                saved = {}
        config = AutoConfig.from_pretrained(name_or_path)
        has_vision = hasattr(config, "vision_config")
        auto = AutoModelForImageTextToText if has_vision else AutoModelForCausalLM
        model = auto.from_pretrained(name_or_path, **kwargs)
        model.eval()
        if processor is None:
            processor = load_processor(name_or_path) if has_vision else AutoTokenizer.from_pretrained(name_or_path)
        settings: dict[str, Any] = {}
        if "knob_space" in saved:
            settings["knob_space"] = KnobSpace.from_dict(saved["knob_space"])
        for key in ("tier_pixels", "tier_crops", "importance_scores"):
            if saved.get(key) is not None:
                settings[key] = saved[key]
        settings.update(own)
        return cls(model, processor, name_or_path=name_or_path, **settings)

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """Save the model, its processor and the knob settings (space, tiers, importance scores)."""
        os.makedirs(save_directory, exist_ok=True)
        self.model.save_pretrained(save_directory, **kwargs)
        if self.processor is not None:
            self.processor.save_pretrained(save_directory)
        with open(os.path.join(save_directory, ADAPTIVE_CONFIG_NAME), "w") as f:
            json.dump(self.settings(), f, indent=2)

    def settings(self) -> dict[str, Any]:
        """The wrapper's own settings, as saved next to the model."""
        return {
            "model_type": self.config.model_type,
            "knob_space": self.knob_space.to_dict(),
            "tier_pixels": self.tier_pixels,
            "tier_crops": self.tier_crops,
            "importance_scores": self.importance_scores,
        }

    @property
    def tier_settings(self) -> dict[str, int] | None:
        """The processor setting of each tier (pixels or crops, per the architecture), cheapest first."""
        return self.tier_crops if self.arch.tier_mode == "crops" else self.tier_pixels

    def _check_tier_mode(self, tier_pixels: dict[str, int] | None, tier_crops: dict[str, int] | None) -> None:
        given = {"pixels": tier_pixels, "crops": tier_crops}
        if self.vision_tower is None:
            for mode, values in given.items():
                if values:
                    raise ValueError(f"tier_{mode} given for a model without a vision tower (it has no 'tier' knob)")
            return
        if self.arch.tier_mode not in given:
            raise ValueError(f"tier mode {self.arch.tier_mode!r} of {self.config.model_type} is not supported (known: 'pixels', 'crops')")
        for mode, values in given.items():
            if values is not None and mode != self.arch.tier_mode:
                raise ValueError(
                    f"tier_{mode} given, but {self.config.model_type} sets its tiers by {self.arch.tier_mode}: "
                    f"pass tier_{self.arch.tier_mode}=... instead"
                )

    def _tier_image_processor(self, argument: str) -> Any:
        image_processor = getattr(self.processor, "image_processor", None)
        if image_processor is None:
            raise ValueError(
                "a vision-language model needs its processor (with an image_processor) for the 'tier' knob; "
                f"pass processor=... or {argument}=..."
            )
        return image_processor

    @staticmethod
    def _check_tier_values(argument: str, values: dict[str, int], knob_space: KnobSpace | None) -> dict[str, int]:
        if knob_space is not None and tuple(values) != tuple(knob_space.tiers):
            raise ValueError(f"{argument} names {list(values)} differ from the knob space's tiers {list(knob_space.tiers)}")
        settings = list(values.values())
        if any(v <= 0 for v in settings) or settings != sorted(settings):
            raise ValueError(f"{argument} must be positive and increasing from the cheapest tier, got {values}")
        return values

    def _default_tier_pixels(self, tier_pixels: dict[str, int] | None, knob_space: KnobSpace | None) -> dict[str, int] | None:
        if self.vision_tower is None or self.arch.tier_mode != "pixels":
            return None
        if tier_pixels is not None:
            pixels = {str(k): int(v) for k, v in tier_pixels.items()}
        else:
            image_processor = self._tier_image_processor("tier_pixels")
            full = int(image_processor.size["longest_edge"])
            factor = int(image_processor.patch_size * image_processor.merge_size)
            pixels = {
                "low": min(256 * factor * factor, full // 16),
                "medium": min(1024 * factor * factor, full // 4),
                "high": full,
            }
        return self._check_tier_values("tier_pixels", pixels, knob_space)

    def _default_tier_crops(self, tier_crops: dict[str, int] | None, knob_space: KnobSpace | None) -> dict[str, int] | None:
        if self.vision_tower is None or self.arch.tier_mode != "crops":
            return None
        if tier_crops is not None:
            crops = {str(k): int(v) for k, v in tier_crops.items()}
        else:
            image_processor = self._tier_image_processor("tier_crops")
            full = int(getattr(image_processor, self.arch.tier_kwarg or "max_crops", None) or 15)
            if full > 8:  # the research system: low 1-3, medium 4-8, high 9-15 crops
                crops = {"low": 3, "medium": 8, "high": full}
            else:
                crops = {"low": max(1, full // 4), "medium": max(1, full // 2), "high": full}
        return self._check_tier_values("tier_crops", crops, knob_space)

    def _check_space(self, space: KnobSpace) -> None:
        if space.num_blocks != self.num_blocks:
            raise ValueError(f"knob space is for {space.num_blocks} blocks but the model has {self.num_blocks}")
        if space.top_k_options and not self.routers:
            raise ValueError("knob space has top_k options but the model is dense (no MoE router)")
        if space.top_k_options and space.num_experts != self.num_experts:
            raise ValueError(f"knob space is for {space.num_experts} experts but the model has {self.num_experts}")
        if space.top_k_options and space.default_top_k != self.default_top_k:  # its full setting would run a reduced top-k
            raise ValueError(f"knob space's default_top_k={space.default_top_k} differs from the model's {self.default_top_k} experts per token")
        if space.tiers and self.vision_tower is None:
            raise ValueError("knob space has tiers but the model has no vision tower")

    # ------------------------------------------------------------------ importance scores
    def set_importance_scores(self, scores: Sequence[float]) -> None:
        scores = [float(s) for s in scores]
        if len(scores) != self.num_blocks:
            raise ValueError(f"importance_scores has {len(scores)} entries but the model has {self.num_blocks} blocks")
        if any(math.isnan(s) for s in scores):
            raise ValueError(f"importance_scores contains NaN: {scores}")
        self.importance_scores = scores

    def drop_order(self, insertion_position: int) -> list[int]:
        """Blocks at index ``>= p`` in the order they are dropped (first = least important)."""
        candidates = list(range(insertion_position, self.num_blocks))
        if self.importance_scores is not None:
            # least important first; ties go to the deeper block
            return sorted(candidates, key=lambda i: (self.importance_scores[i], -i))
        last = self.num_blocks - 1
        return [i for i in reversed(candidates) if i != last] + ([last] if last in candidates else [])

    def dropped_blocks(self, insertion_position: int, num_active_blocks: int) -> list[int]:
        """The blocks a configuration drops (sorted)."""
        n_drop = self.num_blocks - num_active_blocks
        return sorted(self.drop_order(insertion_position)[:n_drop])

    @torch.no_grad()
    def measure_block_importance(
        self,
        calibration: Sequence[str] | None = None,
        *,
        score_fn: Callable[["AdaptiveModel"], float] | None = None,
        batch_size: int = 8,
    ) -> list[float]:
        """Measure how much dropping each block alone hurts, and keep the scores.

        With ``score_fn`` (higher is better, e.g. accuracy on a calibration set computed with
        :meth:`generate`), a block's importance is ``score(full) - score(block dropped)``.
        Otherwise ``calibration`` texts are scored by their mean next-token loss and a block's
        importance is the loss increase when it is dropped. Block 0 never drops and gets ``inf``.
        """
        if score_fn is None:
            if not calibration:
                raise ValueError("measure_block_importance needs calibration texts or a score_fn")
            texts = list(calibration)

            def score_fn(adaptive: "AdaptiveModel") -> float:
                return -adaptive._mean_loss(texts, batch_size)

        full = float(score_fn(self))
        scores = [math.inf]
        for block in range(1, self.num_blocks):
            with self.configured(dropped_blocks=[block]):
                scores.append(full - float(score_fn(self)))
        self.set_importance_scores(scores)
        return scores

    def _mean_loss(self, texts: list[str], batch_size: int) -> float:
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        if tokenizer is None:
            raise ValueError("the default importance metric needs a tokenizer (pass processor=...)")
        total, count = 0.0, 0
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True)
            enc = {k: v.to(self.device) for k, v in enc.items()}
            labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
            out = self.model(**enc, labels=labels)
            n = int((labels[:, 1:] != -100).sum())
            total += float(out.loss.detach()) * n
            count += n
        return total / max(count, 1)

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.base_model.parameters()).device

    @property
    def hidden_size(self) -> int:
        return int(self.text_config.hidden_size)

    @property
    def input_embeddings(self) -> nn.Embedding:
        """The executor's input embedding table (the controller's language feature reads it)."""
        return self.base_model.get_input_embeddings()

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    # ------------------------------------------------------------------ wrappers around modules
    def _install(self) -> None:
        """Wrap block, router and vision-tower forwards once; each reads the thread-local state."""
        for i, layer in enumerate(self.layers):
            if "forward" in vars(layer) and getattr(layer.forward, "_knob_grpo", False):
                continue  # already wrapped by another AdaptiveModel over the same model
            layer.forward = _wrap_block(layer.forward, i)
        for i, router in self.routers.items():
            if "forward" in vars(router) and getattr(router.forward, "_knob_grpo", False):
                continue
            router.forward = _wrap_router(router, router.forward, i, self.arch.renormalize_topk)
        if self.vision_tower is not None and not getattr(self.vision_tower.forward, "_knob_grpo", False):
            self.vision_tower.forward = _wrap_vision(self.vision_tower.forward)

    def _wrapped_modules(self) -> list[nn.Module]:
        return list(self.layers) + list(self.routers.values()) + ([self.vision_tower] if self.vision_tower is not None else [])

    def remove(self) -> None:
        """Take the wrappers off: the model is then the plain transformers model again.

        Every ``AdaptiveModel`` over this model (they share the wrappers) then refuses to run
        instead of running each configuration at the full setting.
        """
        for module in self._wrapped_modules():
            if "forward" in vars(module) and getattr(module.forward, "_knob_grpo", False):
                del module.forward

    def _check_installed(self) -> None:
        for module in self._wrapped_modules():
            if not getattr(module.forward, "_knob_grpo", False):
                raise RuntimeError("this AdaptiveModel's wrappers were removed (AdaptiveModel.remove()), so its knobs would have "
                                   "no effect; build a new AdaptiveModel over the model to run configurations again")

    # ------------------------------------------------------------------ configuration
    def _state_for(self, knobs: Knobs, dropped: Sequence[int] | None = None) -> _Active:
        p = knobs.insertion_position or self.knob_space.insertion_positions[0]
        if dropped is None:
            dropped = self.dropped_blocks(p, knobs.num_active_blocks or self.num_blocks)
        top_k = knobs.top_k if (knobs.top_k is not None and knobs.top_k != self.default_top_k) else None
        return _Active(top_k=top_k, from_block=p, dropped=frozenset(dropped))

    def resolve(self, **knobs: Any) -> Knobs:
        """Validate knob values against :attr:`knob_space` (``None`` = full setting)."""
        return self.knob_space.resolve(**knobs)

    @contextlib.contextmanager
    def configured(
        self,
        insertion_position: int | None = None,
        top_k: int | None = None,
        num_active_blocks: int | None = None,
        *,
        dropped_blocks: Sequence[int] | None = None,
    ) -> Iterator[Knobs]:
        """Run ordinary forward passes (training included) in a configuration, in this thread.

        ``tier`` is not a forward-pass knob: apply it with :meth:`prepare_inputs`.
        ``dropped_blocks`` names blocks to drop explicitly (for importance measurement); it
        bypasses the knob space but never allows block 0.
        """
        knobs = self.resolve(insertion_position=insertion_position, top_k=top_k, num_active_blocks=num_active_blocks)
        if dropped_blocks is not None:
            dropped_blocks = [_check_int("dropped block", b) for b in dropped_blocks]
            bad = [b for b in dropped_blocks if not 1 <= b < self.num_blocks]
            if bad:
                raise ValueError(f"dropped block {bad[0]} is not allowed: blocks 1..{self.num_blocks - 1} may be dropped, block 0 always runs")
            active = self.num_blocks - len(set(dropped_blocks))
            if num_active_blocks is not None and num_active_blocks != active:  # the blocks named are the ones that go
                raise ValueError(f"num_active_blocks={num_active_blocks!r} disagrees with dropped_blocks={dropped_blocks}, which leaves "
                                 f"{active} of {self.num_blocks} blocks running; give a matching count or leave it out")
            knobs = dataclasses.replace(knobs, num_active_blocks=active)
        self._check_installed()
        with _activate(self._state_for(knobs, dropped_blocks)):
            yield knobs

    # ------------------------------------------------------------------ inputs
    def tier_processor_kwargs(self, tier: str | None) -> dict[str, Any]:
        """Processor call arguments that apply ``tier`` (empty when no tier is given).

        Pixel tiers set the image processor's ``size`` budget; crop tiers set its crop cap
        (``max_crops=n`` for Molmo2). The full tier passes the processor's own setting.
        """
        if tier is None or not self.tier_settings:
            return {}
        self.knob_space.check_value("tier", tier)
        if self.arch.tier_mode == "crops":
            return {self.arch.tier_kwarg or "max_crops": self.tier_crops[tier]}
        image_processor = self.processor.image_processor
        pixels = self.tier_pixels[tier]
        shortest = min(int(image_processor.size["shortest_edge"]), pixels)
        return {"size": {"shortest_edge": shortest, "longest_edge": pixels}}

    def format_prompt(self, text: str, has_image: bool) -> str:
        """Apply the chat template (with an image slot) when the processor has one."""
        template_owner = self.processor if getattr(self.processor, "chat_template", None) else None
        if template_owner is None:
            return text
        content: list[dict[str, Any]] = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": text}]
        return template_owner.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)

    def prepare_inputs(
        self,
        text: str | Sequence[str],
        images: Any = None,
        *,
        tier: str | None = None,
        chat_template: bool = True,
    ) -> dict[str, Any]:
        """Tokenise prompts (and images at ``tier``) the way :meth:`generate` does; left-padded."""
        if self.processor is None:
            raise ValueError("raw text needs a processor or tokenizer: build the AdaptiveModel with processor=...")
        texts = [text] if isinstance(text, str) else list(text)
        if images is not None and not isinstance(images, (list, tuple)):
            images = [images]
        if images is not None and self.vision_tower is None:
            raise ValueError("images given to a text-only model (it has no vision tower)")
        if images is not None and len(images) != len(texts):
            raise ValueError(f"got {len(texts)} prompts but {len(images)} images; give one image per prompt")
        if tier is not None and images is None:
            raise ValueError(f"tier={tier!r} needs images: the tier sets how much of the image the model sees")
        if chat_template:
            texts = [self.format_prompt(t, images is not None) for t in texts]
        kwargs: dict[str, Any] = {"return_tensors": "pt", "padding": True, "padding_side": "left"}
        if images is not None:
            # no tier = the full tier (what resolve() reports), also when tier_pixels/tier_crops set it below the processor's own
            kwargs.update(self.tier_processor_kwargs(self.knob_space.full_tier if tier is None else tier))
            enc = self.processor(text=texts, images=list(images), **kwargs)
        else:
            enc = self.processor(text=texts, **kwargs)
        return {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in dict(enc).items()}

    def num_vision_tokens(self, inputs: dict[str, Any]) -> int:
        """Vision tokens of the first prompt in prepared inputs (0 for text-only inputs).

        Counts the placeholder tokens the vision features fill: Qwen-VL's ``image_token_id``,
        Molmo2's ``<im_patch>`` (``image_patch_id``; one per pooled patch of every crop, the
        low-resolution overview included).
        """
        token_id = getattr(self.config, "image_token_id", None)
        if token_id is None:
            token_id = getattr(self.config, "image_patch_id", None)
        if token_id is None or "input_ids" not in inputs:
            return 0
        return int((inputs["input_ids"][0] == token_id).sum())

    # ------------------------------------------------------------------ generate
    def _split_inputs(self, text: Any, images: Any, tier: str | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        # what the processor makes (Molmo2's image_token_pooling, image_grids, ... included) is prompt input
        tensor_keys = {"input_ids", "attention_mask", "pixel_values", "image_grid_thw", "inputs_embeds", "mm_token_type_ids",
                       *getattr(self.processor, "model_input_names", ())}
        given = {k: kwargs.pop(k) for k in list(kwargs) if k in tensor_keys}
        if text is None and images is not None:
            raise ValueError("images=... needs text=...: with prepared tensors (input_ids=..., pixel_values=...) the image is "
                             "already in them")
        if text is not None:
            if given:
                raise ValueError(f"pass either text/images or prepared tensors, not both (got text and {sorted(given)})")
            return self.prepare_inputs(text, images, tier=tier)
        if not given:
            raise ValueError("generate needs text=... (and images=...) or prepared inputs such as input_ids=...")
        if tier is not None and tier != self.knob_space.full_tier:
            raise ValueError(f"tier={tier!r} needs raw images (text=..., images=...); prepared pixel_values are already at a fixed size")
        return given

    @contextlib.contextmanager
    def _call_guard(self) -> Iterator[None]:
        """Serialise where transformers keeps per-call state, and put that state back afterwards."""
        self._check_installed()
        lock = self._lock or contextlib.nullcontext()
        with lock:
            saved = {}
            for path in self.arch.stateful_attributes:
                try:
                    saved[path] = _get_path(self.base_model, path)
                except AttributeError:
                    pass
            try:
                yield
            finally:
                for path, value in saved.items():
                    _set_path(self.base_model, path, value)

    @torch.no_grad()
    def generate(
        self,
        text: str | Sequence[str] | None = None,
        images: Any = None,
        *,
        tier: str | None = None,
        insertion_position: int | None = None,
        top_k: int | None = None,
        num_active_blocks: int | None = None,
        prefix: PrefixState | None = None,
        latency_budget: float | Sequence[float] | None = None,
        controller: Any = None,
        **generate_kwargs: Any,
    ) -> Any:
        """Hugging Face ``generate`` with the knobs held for prefill and every decode step.

        Pass raw ``text`` (and ``images`` for a vision-language model: the processor applies the
        chat template and ``tier``), or prepared tensors (``input_ids=...``) in ``generate_kwargs``.
        Everything else in ``generate_kwargs`` goes to transformers' ``generate`` unchanged
        (greedy or sampling, streamers, stopping criteria, ``return_dict_in_generate``...).
        A knob left ``None`` is at the model's full setting. With ``prefix`` (from
        :meth:`prefill`) the stopped prefill continues from block ``p``. With ``controller`` and
        ``latency_budget`` (milliseconds) the controller chooses the knobs; the result is then a
        :class:`ControlledGeneration` with the output and the chosen knobs.
        Raises ``ValueError`` on an invalid knob before anything runs.
        """
        if controller is not None or latency_budget is not None:
            if controller is None or latency_budget is None:
                raise ValueError("controller and latency_budget go together: pass both to let the controller choose the knobs")
            if any(v is not None for v in (tier, insertion_position, top_k, num_active_blocks)) or prefix is not None:
                raise ValueError("with a controller the knobs are chosen for you: do not pass tier/insertion_position/top_k/num_active_blocks/prefix")
            return self._generate_controlled(text, images, latency_budget, controller, generate_kwargs)

        if prefix is not None:
            if text is not None or images is not None:
                raise ValueError("with prefix=..., the prompt is the prefix's: do not pass text or images")
            _check_one_sequence_per_prompt(generate_kwargs, "generate(prefix=...)")
            knobs = self._resolve_on_prefix(prefix, tier, insertion_position, top_k, num_active_blocks)
            p = knobs.insertion_position
            state = self._state_for(knobs)
            state.replay = _Replay(p, prefix.hidden[p], {i: prefix.kv[i] for i in range(p)}, prefix.vision_output)
            inputs = dict(prefix.inputs)
        else:
            knobs = self.resolve(tier=tier, insertion_position=insertion_position, top_k=top_k, num_active_blocks=num_active_blocks)
            inputs = self._split_inputs(text, images, tier, generate_kwargs)
            state = self._state_for(knobs)
        with self._call_guard(), _activate(state):
            return self.model.generate(**inputs, **generate_kwargs)

    @torch.no_grad()
    def prefill(
        self,
        text: str | Sequence[str] | None = None,
        images: Any = None,
        *,
        tier: str | None = None,
        insertion_position: int | None = None,
        **generate_kwargs: Any,
    ) -> PrefixState:
        """Run the prompt through blocks ``0..p-1`` only, at the full configuration.

        Runs inside transformers' own ``generate`` (so the inputs are prepared exactly as for a
        full generate) and stops before block ``p``. Returns a :class:`PrefixState` holding the
        latency token (``state.latency_token()``) and what ``generate(prefix=state, ...)``
        needs to continue from block ``p`` without recomputing blocks ``0..p-1`` or the vision tower.
        """
        knobs = self.resolve(tier=tier, insertion_position=insertion_position)
        p = knobs.insertion_position
        inputs = self._split_inputs(text, images, tier, generate_kwargs)
        # a prefill generates nothing: arguments about generated tokens would be silently ignored
        ignored = sorted(set(generate_kwargs) & _NOT_FOR_PREFILL)
        if ignored:
            raise ValueError(f"prefill does not generate tokens, so {ignored[0]}={generate_kwargs[ignored[0]]!r} would have no effect; "
                             "pass it to generate(prefix=...) instead")
        state = _Active(top_k=None, from_block=p, dropped=frozenset(), recording=_Recording(stop_at=p))
        with self._call_guard(), _activate(state):
            try:
                self.model.generate(**inputs, **{**generate_kwargs, "max_new_tokens": 1, "min_new_tokens": 0})
            except _StopPrefill:
                pass
            else:  # pragma: no cover - only if the model never reached block p
                raise RuntimeError(f"the prefill never reached block {p}")
        rec = state.recording
        missing = [i for i in range(p) if i not in rec.kv]
        if missing:  # a continuation replays these entries; without them it would silently attend to nothing
            raise RuntimeError(
                f"decoder block {missing[0]} wrote no KV cache entry during the prefill (looked for a `cache` or "
                f"`past_key_values` keyword argument); use_cache=False cannot be continued with generate(prefix=...)"
            )
        return PrefixState(tier=knobs.tier, insertion_position=p, inputs=inputs, hidden=rec.hidden, kv=rec.kv, vision_output=rec.vision_output)

    @torch.no_grad()
    def generate_with_decision(
        self,
        text: str | None = None,
        images: Any = None,
        *,
        decide: Callable[[torch.Tensor], tuple[int | None, int | None]],
        tier: str | None = None,
        insertion_position: int | None = None,
        **generate_kwargs: Any,
    ) -> tuple[Any, Knobs]:
        """One ``generate`` in which ``top_k`` and ``num_active_blocks`` are chosen at block ``p``.

        The prompt runs at ``tier`` through blocks ``0..p-1`` at the full setting; entering block
        ``p``, ``decide(latency_token)`` (the ``(1, hidden_size)`` hidden state of the last prompt
        token, as :meth:`PrefixState.latency_token` gives it) returns ``(top_k, num_active_blocks)``,
        which then hold for the rest of the prefill and every decode step. Same tokens as
        ``prefill`` + ``generate(prefix=...)`` with those knobs, in one call of transformers'
        ``generate`` (no second set-up of the generation loop). One prompt per call, since the
        decision is per prompt. Returns ``(output, knobs)``. A knob value ``decide`` returns that
        the knob space does not allow raises ``ValueError`` (and the model is left as it was).
        With prepared tensors (``input_ids=...`` instead of ``text``) the returned knobs have
        ``tier=None``: the tier is the one the tensors were prepared at.
        """
        knobs = self.resolve(tier=tier, insertion_position=insertion_position)
        p = knobs.insertion_position or self.knob_space.insertion_positions[0]
        inputs = self._split_inputs(text, images, tier, generate_kwargs)
        if inputs["input_ids"].shape[0] != 1:
            raise ValueError(f"generate_with_decision takes one prompt per call (the decision is per prompt); got {inputs['input_ids'].shape[0]}")
        chosen: list[Knobs] = []

        def at_block_p(hidden_states: torch.Tensor) -> tuple[int | None, frozenset[int]]:
            top_k, num_active_blocks = decide(hidden_states[:, -1, :])
            full = self.resolve(tier=knobs.tier, insertion_position=p, top_k=top_k, num_active_blocks=num_active_blocks)
            # prepared tensors are at whatever tier they were prepared at, which this call cannot see
            chosen.append(full if text is not None else dataclasses.replace(full, tier=None))
            configured = self._state_for(full)
            return configured.top_k, configured.dropped

        state = _Active(top_k=None, from_block=p, dropped=frozenset(), decide=at_block_p)
        with self._call_guard(), _activate(state):
            output = self.model.generate(**inputs, **generate_kwargs)
        if not chosen:  # pragma: no cover - only if the model never reached block p
            raise RuntimeError(f"the generate never reached block {p}")
        return output, chosen[0]

    def _resolve_on_prefix(self, prefix: PrefixState, tier: str | None, insertion_position: int | None,
                           top_k: int | None, num_active_blocks: int | None) -> Knobs:
        """The knobs of a continuation of ``prefix``: its tier, ``p`` at most its own (default: its own)."""
        if tier is not None and tier != prefix.tier:
            raise ValueError(f"tier={tier!r} differs from the prefix's tier {prefix.tier!r}")
        p = prefix.insertion_position if insertion_position is None else _check_int("insertion_position", insertion_position)
        if p > prefix.insertion_position:
            raise ValueError(f"insertion_position={p} is past the prefix, which stopped before block {prefix.insertion_position}")
        return self.resolve(tier=prefix.tier, insertion_position=p, top_k=top_k, num_active_blocks=num_active_blocks)

    @torch.no_grad()
    def generate_rows(self, prefix: PrefixState, knobs: Sequence[Knobs | dict[str, Any]], **generate_kwargs: Any) -> Any:
        """Continue one prefix with several configurations in one batched ``generate``.

        Row ``i`` of the result runs ``knobs[i]`` (its ``insertion_position`` at most the prefix's,
        default the prefix's; any ``top_k`` and ``num_active_blocks``; its ``tier``, if given, must
        be the prefix's) and gives the same tokens as ``generate(prefix=prefix, **knobs[i])``: each
        row holds its own top-k in the routers and skips its own dropped blocks, and the blocks
        between the smallest ``p`` and a row's own ``p`` run at the full setting for it, as the
        prefill ran them. Rows that finish before the others are padded after their end-of-sequence
        token, as in any batched ``generate``. One call of transformers' ``generate`` instead of
        ``len(knobs)``: what fused rollouts use to run a group's tuples. Raises ``ValueError`` on an
        invalid knob before anything runs.
        """
        if prefix.inputs["input_ids"].shape[0] != 1:
            raise ValueError(f"generate_rows continues a one-prompt prefix; this one has {prefix.inputs['input_ids'].shape[0]} prompts")
        if not knobs:
            raise ValueError("generate_rows needs at least one configuration")
        _check_one_sequence_per_prompt(generate_kwargs, "generate_rows")
        resolved: list[Knobs] = []
        for i, row in enumerate(knobs):
            values = row.as_dict() if isinstance(row, Knobs) else dict(row)
            unknown = sorted(set(values) - set(KNOB_NAMES))
            if unknown:
                raise ValueError(f"knobs[{i}] has unknown knob {unknown[0]!r}; knobs are: {', '.join(KNOB_NAMES)}")
            try:
                resolved.append(self._resolve_on_prefix(prefix, values.get("tier"), values.get("insertion_position"),
                                                        values.get("top_k"), values.get("num_active_blocks")))
            except ValueError as error:
                raise ValueError(f"knobs[{i}]: {error}") from None
        configured = [self._state_for(k) for k in resolved]
        n, p0 = len(configured), min(c.from_block for c in configured)
        rows = _Rows([c.from_block for c in configured], [c.top_k for c in configured], [c.dropped for c in configured])
        state = _Active(top_k=None, from_block=p0, dropped=frozenset(), rows=rows)
        kv = {i: (_repeat_rows(k, n), _repeat_rows(v, n)) for i, (k, v) in prefix.kv.items() if i < p0}
        state.replay = _Replay(p0, _repeat_rows(prefix.hidden[p0], n), kv, _repeat_rows(prefix.vision_output, n))
        inputs = {k: _repeat_rows(v, n) for k, v in prefix.inputs.items()}
        with self._call_guard(), _activate(state):
            return self.model.generate(**inputs, **generate_kwargs)

    def _generate_controlled(self, text: Any, images: Any, latency_budget: Any, controller: Any, generate_kwargs: dict[str, Any]) -> ControlledGeneration:
        if text is None:
            raise ValueError("generate with a controller needs the raw prompt text (and images)")
        decide = getattr(controller, "decide_and_generate", None)
        if decide is None:
            raise TypeError(f"{type(controller).__name__} cannot choose knobs (it has no decide_and_generate method)")
        output, knobs = decide(self, text, images, latency_budget, **generate_kwargs)
        return ControlledGeneration(output=output, knobs=list(knobs))


#: ``generate`` arguments about the generated tokens, which a prefill (stopped before block ``p``) never makes
_NOT_FOR_PREFILL = frozenset({"streamer", "max_new_tokens", "min_new_tokens", "max_length", "min_length", "do_sample", "temperature",
                              "top_p", "top_k", "num_beams", "num_return_sequences", "stopping_criteria", "logits_processor"})


def _check_one_sequence_per_prompt(generate_kwargs: dict[str, Any], where: str) -> None:
    """A continuation replays one recorded prompt: beams and several returned sequences would need it copied."""
    for name in ("num_beams", "num_return_sequences"):
        value = generate_kwargs.get(name)
        if value is not None and value != 1:
            raise ValueError(f"{where} continues one recorded prompt per row, so {name}={value!r} is not supported (only 1); "
                             "use generate without a prefix for beam search or several sequences per prompt")


# --------------------------------------------------------------------------- module wrappers
def _wrap_block(original: Callable[..., Any], index: int) -> Callable[..., Any]:
    def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        state = _active()
        if state is None:
            return original(hidden_states, *args, **kwargs)
        replay = state.replay
        if replay is not None and not replay.consumed:
            if index < replay.insertion_position:
                cache = _layer_cache(kwargs)
                if cache is None:
                    raise RuntimeError(f"decoder block {index} was handed no KV cache to replay the prefix into; generate(prefix=...) needs use_cache=True")
                key, value = replay.kv[index]
                cache.update(key, value, index)
                return hidden_states  # ignored: block p starts from the recorded hidden state
            if index == replay.insertion_position:
                hidden_states = replay.hidden
                replay.consumed = True
        if state.decide is not None and index == state.from_block:
            decide, state.decide = state.decide, None
            state.top_k, state.dropped = decide(hidden_states)
        rec = state.recording
        if rec is not None:
            if index >= 1:
                rec.hidden[index] = hidden_states
            if index == rec.stop_at:
                raise _StopPrefill
            return _recording_call(original, index, rec, hidden_states, args, kwargs)
        if state.rows is not None:
            drop = [index in d for d in state.rows.dropped]
            if all(drop):
                return hidden_states
            out = original(hidden_states, *args, **kwargs)
            if any(drop):  # the rows that drop this block keep their input (what the block's residual adds is discarded)
                keep = torch.tensor(drop, device=hidden_states.device).view(-1, *([1] * (hidden_states.dim() - 1)))
                if isinstance(out, tuple):
                    out = (torch.where(keep, hidden_states, out[0]),) + tuple(out[1:])
                else:
                    out = torch.where(keep, hidden_states, out)
            return out
        if index in state.dropped:
            return hidden_states
        return original(hidden_states, *args, **kwargs)

    forward._knob_grpo = True  # type: ignore[attr-defined]
    return forward


def _layer_cache(kwargs: dict[str, Any]) -> Any:
    """The KV cache a decoder block was handed: ``cache`` from transformers 5.24, ``past_key_values`` before."""
    cache = kwargs.get("cache")
    return kwargs.get("past_key_values") if cache is None else cache


def _recording_call(original: Callable[..., Any], index: int, rec: _Recording, hidden_states: torch.Tensor, args: tuple, kwargs: dict) -> Any:
    """Run a block and keep the key/value states it hands to the cache (the cache is per call)."""
    cache = _layer_cache(kwargs)
    if cache is None:
        return original(hidden_states, *args, **kwargs)
    cache_update = cache.update

    def update(key: torch.Tensor, value: torch.Tensor, layer_idx: int, *a: Any, **kw: Any) -> Any:
        if layer_idx == index:
            rec.kv[index] = (key, value)
        return cache_update(key, value, layer_idx, *a, **kw)

    cache.update = update
    try:
        return original(hidden_states, *args, **kwargs)
    finally:
        del cache.update


def _wrap_router(router: nn.Module, original: Callable[..., Any], index: int, renormalize: bool | None) -> Callable[..., Any]:
    def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        out = original(hidden_states, *args, **kwargs)
        state = _active()
        rows = state.rows if state is not None else None
        if rows is not None:
            top_ks = [k if index >= f else None for k, f in zip(rows.top_k, rows.from_block)]
            if all(k is None for k in top_ks):
                return out
        elif state is None or state.top_k is None or index < state.from_block:
            return out
        if not (isinstance(out, tuple) and len(out) == 3):
            raise RuntimeError(
                f"router of block {index} ({type(router).__name__}) does not return (logits, scores, indices); "
                "register an ArchitectureSpec with code for it"
            )
        logits, scores, full_indices = out
        norm = getattr(router, "norm_topk_prob", False) if renormalize is None else renormalize

        def top(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
            values, indices = torch.topk(probs, k, dim=-1)
            if norm:
                values = values / values.sum(dim=-1, keepdim=True)
            return values.to(scores.dtype), indices

        probs = torch.softmax(logits.float(), dim=-1)
        if rows is None:
            return (logits, *top(probs, state.top_k))
        # Per-row top-k in one batch: every row keeps the slots its own top-k gives it (the same
        # values as a call with that top-k alone); its spare slots repeat its first expert with
        # weight 0, which adds exactly 0. (The "no expert" index num_experts would skip them, but
        # transformers' batched expert kernels honour it only under expert parallelism.)
        n, tokens = len(top_ks), logits.shape[0]
        if tokens % n:
            raise RuntimeError(f"router of block {index} saw {tokens} tokens for a batch of {n} rows")
        per_row = tokens // n
        width = max([full_indices.shape[-1]] + [k for k in top_ks if k is not None])
        new_scores = scores.new_zeros(tokens, width)
        new_indices = torch.empty(tokens, width, dtype=full_indices.dtype, device=full_indices.device)
        for r, k in enumerate(top_ks):
            t = slice(r * per_row, (r + 1) * per_row)
            values, chosen = (scores[t], full_indices[t]) if k is None else top(probs[t], k)
            new_scores[t, : chosen.shape[-1]] = values
            new_indices[t] = chosen[:, :1]
            new_indices[t, : chosen.shape[-1]] = chosen
        return logits, new_scores, new_indices

    forward._knob_grpo = True  # type: ignore[attr-defined]
    return forward


def _wrap_vision(original: Callable[..., Any]) -> Callable[..., Any]:
    def forward(*args: Any, **kwargs: Any) -> Any:
        state = _active()
        if state is not None and state.replay is not None and state.replay.vision_output is not None and not state.replay.consumed:
            return _copy_output(state.replay.vision_output)
        out = original(*args, **kwargs)
        if state is not None and state.recording is not None:
            # transformers edits fields of this object after it returns; keep our own copy
            state.recording.vision_output = _copy_output(out)
        return out

    forward._knob_grpo = True  # type: ignore[attr-defined]
    return forward


def _repeat_rows(value: Any, n: int) -> Any:
    """``value`` for a batch of ``n`` copies of its one prompt: tensors (batch- or token-major, both
    with the prompt's rows first) concatenated ``n`` times, containers walked, anything else kept."""
    if value is None or n == 1:
        return value
    if isinstance(value, torch.Tensor):
        return torch.cat([value] * n) if value.dim() else value
    if isinstance(value, dict):
        return type(value)(**{k: _repeat_rows(v, n) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return type(value)(_repeat_rows(v, n) for v in value)
    return value


def _copy_output(out: Any) -> Any:
    if isinstance(out, dict):
        return type(out)(**dict(out.items()))
    return copy.copy(out)
