"""Tiny real transformers models, built from configs with random weights (nothing downloaded)."""

from __future__ import annotations

import string

import torch
from PIL import Image, ImageDraw
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL = [
    "<pad>", "<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
]
WORDS = ["user", "assistant", "what", "colour", "is", "the", "shape", "how", "many", "dots", "?", "a", "an", "of", "and"]
WORDS += list(string.ascii_lowercase) + [str(i) for i in range(20)] + ["red", "green", "blue", "circle", "square"]

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|> {% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %} <|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)


def tiny_tokenizer(chat_template: bool | str = False, special: list[str] = SPECIAL) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``special`` tokens (pad, unk, eos first) and :data:`WORDS`;
    ``chat_template``: ``True`` for the Qwen-VL-style one, or a template string."""
    vocab = {tok: i for i, tok in enumerate(special + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|endoftext|>",
        additional_special_tokens=special[3:],
    )
    fast.padding_side = "left"
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE if chat_template is True else chat_template
    return fast


VOCAB = len(SPECIAL) + len(WORDS)
_TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256, pad_token_id=0, eos_token_id=2, bos_token_id=2)


def tiny_text_model(model_type: str, num_layers: int = 6, seed: int = 0):
    """A tiny causal LM of the given architecture (MoE ones: 8 experts, top-4)."""
    import transformers as tf

    torch.manual_seed(seed)
    moe = dict(num_experts=8, num_experts_per_tok=4, moe_intermediate_size=16)
    if model_type == "olmoe":
        config = tf.OlmoeConfig(**_TEXT, num_hidden_layers=num_layers, num_experts=8, num_experts_per_tok=4)
        cls = tf.OlmoeForCausalLM
    elif model_type == "qwen2_moe":
        config = tf.Qwen2MoeConfig(**_TEXT, num_hidden_layers=num_layers, **moe, shared_expert_intermediate_size=16, norm_topk_prob=True)
        cls = tf.Qwen2MoeForCausalLM
    elif model_type == "qwen3_moe":
        config = tf.Qwen3MoeConfig(**_TEXT, num_hidden_layers=num_layers, **moe, head_dim=8, norm_topk_prob=True)
        cls = tf.Qwen3MoeForCausalLM
    elif model_type == "mixtral":
        config = tf.MixtralConfig(**_TEXT, num_hidden_layers=num_layers, num_local_experts=8, num_experts_per_tok=4)
        cls = tf.MixtralForCausalLM
    elif model_type == "llama":
        config = tf.LlamaConfig(**_TEXT, num_hidden_layers=num_layers)
        cls = tf.LlamaForCausalLM
    elif model_type == "qwen2":
        config = tf.Qwen2Config(**_TEXT, num_hidden_layers=num_layers)
        cls = tf.Qwen2ForCausalLM
    else:
        raise ValueError(model_type)
    model = cls(config).eval()
    return model, tiny_tokenizer()


def tiny_vlm(moe: bool = True, num_layers: int = 6, seed: int = 0):
    """A tiny Qwen3-VL-MoE (or dense Qwen3-VL) with a PIL image processor."""
    import transformers as tf

    torch.manual_seed(seed)
    tok = tiny_tokenizer(chat_template=True)
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
    text = dict(_TEXT, num_hidden_layers=num_layers, head_dim=8, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]})
    vision = dict(depth=2, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=8,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64, deepstack_visual_indexes=[0])
    special = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                   vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    if moe:
        config = tf.Qwen3VLMoeConfig(text_config=dict(text, num_experts=8, num_experts_per_tok=4, moe_intermediate_size=16, decoder_sparse_step=1),
                                     vision_config=vision, **special)
        model = tf.Qwen3VLMoeForConditionalGeneration(config)
    else:
        config = tf.Qwen3VLConfig(text_config=text, vision_config=vision, **special)
        model = tf.Qwen3VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 2
    image_processor = tf.Qwen2VLImageProcessorPil(
        patch_size=8, merge_size=2, temporal_patch_size=2, size={"shortest_edge": 16 * 16, "longest_edge": 64 * 64},
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    from knob_grpo.processing import image_only_processor

    processor = image_only_processor(tf.Qwen3VLProcessor, image_processor, tok, CHAT_TEMPLATE)
    return model.eval(), processor


def tiny_image(seed: int = 0, size: int = 64) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    img = Image.new("RGB", (size, size), tuple(int(x) for x in torch.randint(0, 255, (3,), generator=g)))
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x, y = (int(v) for v in torch.randint(0, size - 8, (2,), generator=g))
        draw.ellipse([x, y, x + 6, y + 6], fill=tuple(int(v) for v in torch.randint(0, 255, (3,), generator=g)))
    return img
