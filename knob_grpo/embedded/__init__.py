"""The project's embedded default: a tiny MoE vision-language model and a visual task whose question types need different tiers.

* :mod:`.task` — procedurally drawn visual questions (four types: ``colour`` needs little,
  ``stripes`` needs the medium tier, ``pattern`` the high tier's 1-pixel detail, ``compare``
  counting, a little better above the low tier) as
  ``datasets.Dataset`` splits from fixed seeds: :func:`make_task_dataset`.
* :mod:`.model` — a tiny ``Qwen3VLMoeForConditionalGeneration`` (8 blocks, 8 experts, top-4),
  its word-level tokenizer and pillow-only processor, the tier pixel budgets
  (:data:`TIER_PIXELS`), and :func:`load_embedded_default` for the committed weights.
* :mod:`.pretrain` — ``python -m knob_grpo.embedded.pretrain --output_dir DIR --max_steps N``
  reproduces the committed weights (knob-randomised training).
* :mod:`.sweep` — ``python -m knob_grpo.embedded.sweep`` prints accuracy and time to first
  token of every knob configuration on the test split.
"""

from .model import (
    TIER_PIXELS,
    VISION_TOKENS,
    WEIGHTS_DIR,
    build_config,
    build_image_processor,
    build_model,
    build_processor,
    build_tokenizer,
    knob_space,
    load_embedded_default,
    load_processor,
)
from .task import ANSWERS, QUESTION_TYPES, QUESTIONS, SPLIT_SEEDS, make_example, make_task_dataset


#: ``name_or_path`` of the committed embedded model
EMBEDDED_NAME = "knob_grpo/embedded"


def load_embedded_adaptive(path=None, **kwargs):
    """The committed model wrapped in an :class:`~knob_grpo.AdaptiveModel` with its tiers and knob space."""
    from ..adaptive import AdaptiveModel

    model, processor = load_embedded_default(path, **kwargs)
    # the committed weights get a name that is the same on every machine (profiles, controller
    # configs and model cards record it), not the install path
    return AdaptiveModel(model, processor, knob_space=knob_space(), tier_pixels=dict(TIER_PIXELS),
                         name_or_path=EMBEDDED_NAME if path is None else str(path))


__all__ = [
    "ANSWERS",
    "EMBEDDED_NAME",
    "QUESTIONS",
    "QUESTION_TYPES",
    "SPLIT_SEEDS",
    "TIER_PIXELS",
    "VISION_TOKENS",
    "WEIGHTS_DIR",
    "build_config",
    "build_image_processor",
    "build_model",
    "build_processor",
    "build_tokenizer",
    "knob_space",
    "load_embedded_adaptive",
    "load_embedded_default",
    "load_processor",
    "make_example",
    "make_task_dataset",
]
