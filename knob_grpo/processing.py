"""Processors for vision-language models on machines without torchvision.

transformers' Qwen-VL and Molmo2 processors insist on a video processor, and video processors
need torchvision. :func:`image_only_processor` builds the same processor class without that slot,
so text + images work with the PIL image processors alone.

Molmo2's only image processor (``Molmo2ImageProcessor``) is a torchvision-backend class: its
``resize`` and ``normalize`` call ``torchvision.transforms.v2.functional``. :func:`molmo2_image_processor`
returns a subclass that does those two steps with plain torch (bilinear, no antialias: the same
arithmetic torchvision uses on float tensors), so Molmo2 runs here too.
"""

from __future__ import annotations

from typing import Any

_CACHE: dict[type, type] = {}


def _drop_video_slot(parent_attributes: tuple[str, ...]) -> type:
    """A class that sits between the processor class and ``ProcessorMixin`` in the MRO.

    The processor's own ``__init__`` hands its sub-processors to ``ProcessorMixin`` positionally, in
    the order of its own signature (Qwen-VL: image, tokenizer, video; Molmo2: image, video, tokenizer).
    This names them by that order, drops the video slot, and passes the rest by keyword.
    """
    from transformers.processing_utils import ProcessorMixin

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        named = dict(zip(parent_attributes, args))
        named.update(kwargs)
        named.pop("video_processor", None)
        ProcessorMixin.__init__(self, **named)

    return type("_DropVideoSlot", (ProcessorMixin,), {"__init__": __init__})


def _image_only_class(processor_class: type) -> type:
    if processor_class not in _CACHE:

        def __init__(self: Any, image_processor: Any = None, tokenizer: Any = None, chat_template: Any = None, **kwargs: Any) -> None:
            # The attribute list, read off this signature, has no video slot.
            processor_class.__init__(
                self, image_processor=image_processor, tokenizer=tokenizer, video_processor=None, chat_template=chat_template, **kwargs
            )
            self.video_processor = None

        slot = _drop_video_slot(tuple(processor_class.get_attributes()))
        _CACHE[processor_class] = type(f"ImageOnly{processor_class.__name__}", (processor_class, slot), {"__init__": __init__})
    return _CACHE[processor_class]


def image_only_processor(
    processor_class: type, image_processor: Any, tokenizer: Any, chat_template: str | None = None, **kwargs: Any
) -> Any:
    """An instance of ``processor_class`` (e.g. ``Qwen3VLProcessor``, ``Molmo2Processor``) with no video processor.

    ``kwargs`` are the processor's own options (e.g. Molmo2's ``image_use_col_tokens``).
    """
    return _image_only_class(processor_class)(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template, **kwargs)


_MOLMO2_TORCH: list[type] = []


def _molmo2_torch_class() -> type:
    """``Molmo2ImageProcessor`` with its two torchvision calls done in plain torch."""
    if not _MOLMO2_TORCH:
        import torch
        from torch.nn import functional as F
        from transformers.models.molmo2.image_processing_molmo2 import Molmo2ImageProcessor

        def resize(self: Any, image: Any, size: Any, resample: Any = None, antialias: bool = True, **kwargs: Any) -> Any:
            if not (size.height and size.width):
                raise ValueError(f"the torch-only Molmo2 image processor resizes to an exact height and width, got {size}")
            is_float = image.dtype.is_floating_point
            out = F.interpolate(
                image if is_float else image.float(), size=(size.height, size.width), mode="bilinear",
                align_corners=False, antialias=antialias,
            )
            return out if is_float else out.round().clamp(0, 255).to(image.dtype)

        def normalize(self: Any, image: Any, mean: Any, std: Any, inplace: bool = False, **kwargs: Any) -> Any:
            mean = torch.as_tensor(mean, dtype=image.dtype, device=image.device).reshape(-1, 1, 1)
            std = torch.as_tensor(std, dtype=image.dtype, device=image.device).reshape(-1, 1, 1)
            return (image - mean) / std

        def convert_to_rgb(self: Any, image: Any, input_data_format: Any = None) -> Any:
            if image.ndim == 2:
                image = image[None]
            if image.shape[-3] == 1:
                image = image.expand(*image.shape[:-3], 3, *image.shape[-2:])
            return image[..., :3, :, :]

        _MOLMO2_TORCH.append(
            type(
                "Molmo2ImageProcessorTorch",
                (Molmo2ImageProcessor,),
                {"resize": resize, "normalize": normalize, "convert_to_rgb": convert_to_rgb, "__module__": __name__},
            )
        )
    return _MOLMO2_TORCH[0]


def molmo2_image_processor(**kwargs: Any) -> Any:
    """A Molmo2 image processor: transformers' own with torchvision, else the torch-only subclass."""
    from transformers.utils import is_torchvision_available

    if is_torchvision_available():
        from transformers.models.molmo2.image_processing_molmo2 import Molmo2ImageProcessor

        return Molmo2ImageProcessor(**kwargs)
    return _molmo2_torch_class()(**kwargs)


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
    if config.model_type == "molmo2":  # its only image processor is a torchvision-backend class
        image_processor = _molmo2_torch_class().from_pretrained(name_or_path)
    else:
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
