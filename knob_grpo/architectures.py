"""Where each architecture keeps the parts the knobs act on: one row per ``model_type``.

Paths are attribute paths from the ``*ForCausalLM`` / ``*ForConditionalGeneration`` model.
Everything a row does not say is read from the model's (text) config. To support a new
architecture, add a row with :func:`register_architecture`; code is needed only where a model
behaves unlike the rows below (routers that do not return ``(logits, scores, indices)`` sorted by
score, decoder layers that return tuples).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ArchitectureSpec:
    """How to find the knob targets of one architecture.

    Args:
        layers: path to the ``nn.ModuleList`` of decoder blocks.
        router: path, inside one block, to the top-k router (``None`` for dense models). Blocks
            where the path does not resolve (e.g. Qwen-MoE ``mlp_only_layers``) are dense blocks.
        renormalize_topk: whether the router rescales the kept weights to sum to one.
            ``None`` means "read the router's own ``norm_topk_prob``" (OLMoE: no renormalisation,
            as in MolmoE).
        vision_tower: path to the vision encoder (``None`` for text-only models).
        tier_mode: how a tier reaches the processor: ``"pixels"`` (Qwen-VL pixel budget, passed as
            ``size={"shortest_edge", "longest_edge"}``) or ``"crops"`` (Molmo-style crop budget,
            passed as the image processor option named by ``tier_kwarg``).
        tier_kwarg: for ``tier_mode="crops"``, the image-processor option (both its attribute and
            the per-call keyword) that caps the number of crops per image.
        stateful_attributes: module attributes transformers itself writes during ``forward``; the
            wrapper saves and restores them so a call leaves the model as it found it, and
            serialises calls on such models (the attribute is shared between threads).
    """

    layers: str
    router: str | None = None
    renormalize_topk: bool | None = None
    vision_tower: str | None = None
    tier_mode: str | None = None
    tier_kwarg: str | None = None
    stateful_attributes: tuple[str, ...] = field(default_factory=tuple)


_MOE_TEXT = dict(layers="model.layers", router="mlp.gate")
_QWEN_VL = dict(
    layers="model.language_model.layers",
    vision_tower="model.visual",
    tier_mode="pixels",
    stateful_attributes=("model.rope_deltas",),
)
_MOLMO2 = dict(
    layers="model.language_model.layers",
    vision_tower="model.vision_tower",
    tier_mode="crops",
    tier_kwarg="max_crops",
)

ARCHITECTURES: dict[str, ArchitectureSpec] = {
    # Mixture of experts, text only.
    "olmoe": ArchitectureSpec(**_MOE_TEXT),  # the language model inside MolmoE-1B
    "qwen2_moe": ArchitectureSpec(**_MOE_TEXT),  # top_k acts on routed experts; the shared expert always runs
    "qwen3_moe": ArchitectureSpec(**_MOE_TEXT),
    "mixtral": ArchitectureSpec(**_MOE_TEXT, renormalize_topk=True),
    # Mixture of experts with vision: all four knobs.
    "qwen3_vl_moe": ArchitectureSpec(**_QWEN_VL, router="mlp.gate", renormalize_topk=True),
    # Dense: no top_k.
    "llama": ArchitectureSpec(layers="model.layers"),
    "mistral": ArchitectureSpec(layers="model.layers"),
    "qwen2": ArchitectureSpec(layers="model.layers"),
    "qwen3": ArchitectureSpec(layers="model.layers"),
    "olmo2": ArchitectureSpec(layers="model.layers"),
    "qwen2_vl": ArchitectureSpec(**_QWEN_VL),
    "qwen2_5_vl": ArchitectureSpec(**_QWEN_VL),
    "qwen3_vl": ArchitectureSpec(**_QWEN_VL),
    "molmo2": ArchitectureSpec(**_MOLMO2),  # dense language model (Qwen3 / OLMo blocks): no top_k
}


def register_architecture(model_type: str, spec: ArchitectureSpec, *, overwrite: bool = False) -> None:
    """Teach knob_grpo a new ``config.model_type``."""
    if model_type in ARCHITECTURES and not overwrite:
        raise ValueError(f"architecture {model_type!r} is already registered; pass overwrite=True to replace it")
    ARCHITECTURES[model_type] = spec


def get_architecture(model_type: str) -> ArchitectureSpec:
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise ValueError(
            f"knob_grpo does not know the architecture {model_type!r}. Supported: {', '.join(sorted(ARCHITECTURES))}. "
            "To add it, describe where its decoder blocks, routers and vision tower live, e.g. "
            "`knob_grpo.register_architecture('my_moe', ArchitectureSpec(layers='model.layers', router='mlp.gate'))`."
        ) from None
