"""Processors for vision-language models on machines without torchvision.

transformers' Qwen-VL processors insist on a video processor, and video processors need
torchvision. :func:`image_only_processor` builds the same processor class without that slot,
so text + images work with the PIL image processors alone.
"""

from __future__ import annotations

from typing import Any

_CACHE: dict[type, type] = {}


def _image_only_class(processor_class: type) -> type:
    if processor_class not in _CACHE:

        def __init__(self: Any, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None, **kwargs: Any) -> None:
            # The parent passes a third (video) slot positionally; the attribute list, read off this
            # signature, has no video slot, so it is dropped.
            processor_class.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)
            self.video_processor = None

        _CACHE[processor_class] = type(f"ImageOnly{processor_class.__name__}", (processor_class,), {"__init__": __init__})
    return _CACHE[processor_class]


def image_only_processor(processor_class: type, image_processor: Any, tokenizer: Any, chat_template: str | None = None) -> Any:
    """An instance of ``processor_class`` (e.g. ``Qwen3VLProcessor``) with no video processor."""
    return _image_only_class(processor_class)(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)


def load_processor(name_or_path: str) -> Any:
    """``AutoProcessor.from_pretrained``, falling back to an image-only processor without torchvision."""
    from transformers import AutoConfig, AutoImageProcessor, AutoProcessor, AutoTokenizer
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

    try:
        processor = AutoProcessor.from_pretrained(name_or_path)
        if getattr(processor, "image_processor", None) is not None:
            return processor
    except (ImportError, AttributeError, ValueError, TypeError):
        pass  # AutoProcessor needs torchvision for the video slot, or it fell back to the bare tokenizer
    config = AutoConfig.from_pretrained(name_or_path)
    processor_class = PROCESSOR_MAPPING[type(config)]
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    image_processor = AutoImageProcessor.from_pretrained(name_or_path, backend="pil")
    chat_template = _saved_chat_template(name_or_path) or getattr(tokenizer, "chat_template", None)
    return image_only_processor(processor_class, image_processor, tokenizer, chat_template)


def _saved_chat_template(name_or_path: str) -> str | None:
    import os

    for name in ("chat_template.jinja", "chat_template.json"):
        path = os.path.join(name_or_path, name)
        if os.path.isfile(path):
            with open(path) as f:
                text = f.read()
            if name.endswith(".json"):
                import json

                return json.loads(text).get("chat_template")
            return text
    return None
