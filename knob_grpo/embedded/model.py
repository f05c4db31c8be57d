"""The embedded default model: a tiny Qwen3-VL-MoE, its word-level tokenizer and its processor.

Everything here is a native transformers class; only the sizes are small.

Architecture (``build_config``):

* vision tower (``Qwen3VLMoeVisionConfig``): patch 8 px, temporal patch 2 (images are repeated, as
  in every Qwen-VL), 2x2 spatial merge, hidden 96, 3 blocks, 3 heads, MLP 256, learned position
  grid 28x28 (the high tier's patch grid), one DeepStack feature (after vision block 1, added to the
  language model's block 0 output: block 0 always runs, so no knob removes it).
* language model (``Qwen3VLMoeTextConfig``): 8 blocks, hidden 128, 4 query / 2 key-value heads of
  size 32, every block MoE with 8 experts of width 96 and top-4 routing, M-RoPE sections (6, 5, 5).
  3.5 M parameters in all (7 MB as float16 safetensors).
* With ``KnobSpace.from_model(8, default_top_k=4, num_experts=8, has_vision=True)`` the knob space
  is top_k in 2..4, p in 1..3, up to 2 blocks dropped: 54 configurations.

Tiers (``TIER_PIXELS``): the image processor's pixel budget (``size["longest_edge"]``). Images are
drawn at 224x224 (pattern questions at 176x176); ``smart_resize`` (factor 16 = patch 8 x merge 2) gives

======  ==========  ======  ===========  ====================  ============================
tier    max pixels  image   patches      vision tokens (LLM)   pattern image (176 px)
======  ==========  ======  ===========  ====================  ============================
low     64*64       64x64   8x8 = 64     16                    the same
medium  96*96       96x96   12x12 = 144  36                    the same
high    224*224     224x224 28x28 = 784  196                   176x176, 22x22 = 484, 121
======  ==========  ======  ===========  ====================  ============================

``high`` equals the processor's own default ``longest_edge``, so the full setting is the
unmodified model and processor.

Tokenizer: a word-level ``tokenizers`` model (whitespace split) over the task's words plus the
Qwen3-VL special tokens the processor and chat template need, wrapped in a
``PreTrainedTokenizerFast``. The chat template is a minimal Qwen-style one; a user turn with an
image renders as::

    <|im_start|>user<|vision_start|><|image_pad|><|vision_end|>QUESTION<|im_end|><|im_start|>assistant

(special tokens split the words, so no spaces are needed) and the model answers
``ANSWER <|im_end|>``.

Why these sizes: pretraining must fit in about half an hour of one CPU core, and time to first
token must be dominated by the vision tokens and the blocks, not by the fixed per-call overhead
of ``generate`` and of ~40 small modules (~20 ms of CPU time even for the cheapest
configuration). At the high tier the vision tower sees 784 patches and the language model ~210
tokens, which costs 3.2x the cheapest configuration's time (committed sweep); a smaller model
(vision hidden 64) was measured at ~3x in an earlier version, a larger one (4 vision blocks, experts of width 128) costs ~35% more
training time per high-tier example.

Processor: ``Qwen3VLProcessor`` needs a video processor, and every transformers video processor
imports torchvision (which does not work here). ``knob_grpo.processing.image_only_processor``
builds the same processor class with the video slot left out of its constructor
(``ProcessorMixin`` derives its sub-processors from the ``__init__`` signature), so it takes only
the tokenizer and the pillow-only ``Qwen2VLImageProcessorPil``. ``AutoProcessor.from_pretrained``
cannot rebuild it (it would look for a video processor): use :func:`load_processor` /
:func:`load_embedded_default` (or ``knob_grpo.processing.load_processor``, which falls back the same way).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from .task import IMAGE_SIZE, task_words

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"

PATCH_SIZE = 8
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
#: Pixel budget (the image processor's ``size["longest_edge"]``) per tier; "high" is the processor default.
TIER_PIXELS: dict[str, int] = {"low": 64 * 64, "medium": 96 * 96, "high": IMAGE_SIZE * IMAGE_SIZE}
MIN_PIXELS = 32 * 32
#: Merged vision tokens the language model sees per tier, for the task's 224x224 images (pattern: 121 at high).
VISION_TOKENS: dict[str, int] = {t: px // (PATCH_SIZE * MERGE_SIZE) ** 2 for t, px in TIER_PIXELS.items()}

PAD_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS: tuple[str, ...] = (
    PAD_TOKEN,
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
ORDINARY_TOKENS: tuple[str, ...] = ("<unk>", "user", "assistant", "system")

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|im_start|>{{ message['role'] }} "
    "{%- if message['content'] is string -%}"
    " {{ message['content'] }}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' or 'image' in item or 'image_url' in item -%}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif item['type'] == 'text' -%}"
    " {{ item['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    " <|im_end|> "
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant {%- endif -%}"
)

# Architecture sizes (see the module docstring).
VISION_HIDDEN = 96
VISION_DEPTH = 3
TEXT_HIDDEN = 128
NUM_BLOCKS = 8
NUM_EXPERTS = 8
TOP_K = 4


def vocabulary() -> list[str]:
    """Token strings in id order: special tokens first, then the ordinary words."""
    return list(SPECIAL_TOKENS) + list(ORDINARY_TOKENS) + task_words()


def build_tokenizer():
    """The word-level tokenizer (a ``PreTrainedTokenizerFast``) with the chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token=PAD_TOKEN,
        eos_token="<|im_end|>",
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (PAD_TOKEN, "<|im_end|>")],
        padding_side="left",
        model_max_length=1024,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_image_processor():
    """The pillow-only Qwen2-VL image processor (what Qwen3-VL uses) at this model's sizes."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        size={"longest_edge": TIER_PIXELS["high"], "shortest_edge": MIN_PIXELS},
        patch_size=PATCH_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        merge_size=MERGE_SIZE,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )


def build_processor(tokenizer=None, image_processor=None):
    """``Qwen3VLProcessor`` without a video slot (``knob_grpo.processing.image_only_processor``)."""
    from transformers import Qwen3VLProcessor

    from ..processing import image_only_processor

    tokenizer = build_tokenizer() if tokenizer is None else tokenizer
    image_processor = build_image_processor() if image_processor is None else image_processor
    return image_only_processor(Qwen3VLProcessor, image_processor, tokenizer, CHAT_TEMPLATE)


def build_config(tokenizer=None):
    """The tiny ``Qwen3VLMoeConfig`` (sizes in the module docstring)."""
    from transformers import Qwen3VLMoeConfig

    tokenizer = build_tokenizer() if tokenizer is None else tokenizer
    ids = tokenizer.convert_tokens_to_ids
    head_dim = 32
    text_config = dict(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=256,
        num_hidden_layers=NUM_BLOCKS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        moe_intermediate_size=96,
        num_experts=NUM_EXPERTS,
        num_experts_per_tok=TOP_K,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [6, 5, 5],
                         "mrope_interleaved": True},
        tie_word_embeddings=False,
        router_aux_loss_coef=0.01,
        pad_token_id=ids(PAD_TOKEN),
        eos_token_id=ids("<|im_end|>"),
        bos_token_id=None,
    )
    grid = IMAGE_SIZE // PATCH_SIZE
    vision_config = dict(
        depth=VISION_DEPTH,
        hidden_size=VISION_HIDDEN,
        intermediate_size=256,
        num_heads=3,
        in_channels=3,
        patch_size=PATCH_SIZE,
        spatial_merge_size=MERGE_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        out_hidden_size=TEXT_HIDDEN,
        num_position_embeddings=grid * grid,
        deepstack_visual_indexes=[1],
    )
    config = Qwen3VLMoeConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    config.pad_token_id = ids(PAD_TOKEN)
    config.eos_token_id = ids("<|im_end|>")
    return config


def build_model(seed: int = 0, tokenizer=None):
    """A freshly initialised model (deterministic from ``seed``)."""
    from transformers import Qwen3VLMoeForConditionalGeneration

    tokenizer = build_tokenizer() if tokenizer is None else tokenizer
    config = build_config(tokenizer)
    torch.manual_seed(seed)
    model = Qwen3VLMoeForConditionalGeneration(config)
    model.generation_config = generation_config(tokenizer)
    return model


def generation_config(tokenizer):
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=False,
        max_new_tokens=2,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids(PAD_TOKEN),
    )


def knob_space():
    """The project's default knob space for this model."""
    from ..knobs import KnobSpace

    return KnobSpace.from_model(NUM_BLOCKS, default_top_k=TOP_K, num_experts=NUM_EXPERTS, has_vision=True)


def load_processor(path: str | os.PathLike | None = None):
    """Rebuild the processor saved in ``path`` (default: the committed weights directory)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path = Path(WEIGHTS_DIR if path is None else path)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHAT_TEMPLATE
    image_processor = Qwen2VLImageProcessorPil.from_pretrained(path)
    return build_processor(tokenizer, image_processor)


def save_model_and_processor(model, processor, path: str | os.PathLike) -> None:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    processor.save_pretrained(path)


def load_embedded_default(path: str | os.PathLike | None = None, *, dtype: torch.dtype = torch.float32,
                          device: str | torch.device = "cpu") -> tuple[Any, Any]:
    """Load the committed tiny Qwen3-VL-MoE (or one saved by ``pretrain``): returns ``(model, processor)``.

    The model is in eval mode. Never touches the Hub (the path is local).
    """
    from transformers import Qwen3VLMoeForConditionalGeneration

    path = Path(WEIGHTS_DIR if path is None else path)
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(
            f"no model.safetensors in {path}; run `python -m knob_grpo.embedded.pretrain --output_dir {path}`"
        )
    processor = load_processor(path)
    model = Qwen3VLMoeForConditionalGeneration.from_pretrained(path, dtype=dtype, local_files_only=True)
    model.generation_config = generation_config(processor.tokenizer)
    model.to(device)
    model.eval()
    return model, processor
