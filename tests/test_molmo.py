"""Molmo-style crop tiers on a tiny transformers Molmo2 (random weights, processor built in code)."""

from __future__ import annotations

import json

import pytest
import torch
from tiny import WORDS, tiny_image, tiny_tokenizer
from transformers import PreTrainedTokenizerFast

from knob_grpo import AdaptiveModel
from knob_grpo.adaptive import ADAPTIVE_CONFIG_NAME
from knob_grpo.architectures import get_architecture
from knob_grpo.processing import image_only_processor, molmo2_image_processor

PROMPT = "what is the colour of the shape ?"
GREEDY = dict(max_new_tokens=4, do_sample=False)
# What Molmo2Processor looks up in its tokenizer, plus the usual pad/unk/eos.
SPECIAL = [
    "<pad>", "<unk>", "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image|>", "<|video|>",
    "<im_patch>", "<im_col>", "<im_start>", "<low_res_im_start>", "<frame_start>", "<im_end>", "<frame_end>", "<im_low>",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|> {{ m['role'] }} "
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|image|> {% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endif %} <|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
)
MAX_CROPS = 12  # the processor's own setting: the "high" tier


def molmo2_tokenizer() -> PreTrainedTokenizerFast:
    return tiny_tokenizer(chat_template=CHAT_TEMPLATE, special=SPECIAL)


def tiny_molmo2(num_layers: int = 4, seed: int = 0):
    """Molmo2 with a 2-layer ViT on 24x24 crops of 4x4 patches, pooled 2x2, and a 4-block dense LM."""
    import transformers as tf

    torch.manual_seed(seed)
    tok = molmo2_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL}
    config = tf.Molmo2Config(
        vision_config=dict(hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=2, head_dim=16, image_size=[24, 24], patch_size=4),
        adapter_config=dict(vision_feature_layer=[-1, 0], hidden_size=32, num_attention_heads=2, num_key_value_heads=2,
                            head_dim=16, intermediate_size=32, text_hidden_size=32),
        text_config=dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=len(SPECIAL) + len(WORDS),
                         additional_vocab_size=0, num_hidden_layers=num_layers, intermediate_size=32, max_position_embeddings=1024,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        image_start_token_id=ids["<im_start>"], low_res_image_start_token_id=ids["<low_res_im_start>"],
        image_end_token_id=ids["<im_end>"], image_patch_id=ids["<im_patch>"],
        frame_start_token_id=ids["<frame_start>"], frame_end_token_id=ids["<frame_end>"],
    )
    model = tf.Molmo2ForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = ids["<pad>"]
    model.generation_config.eos_token_id = ids["<|endoftext|>"]
    image_processor = molmo2_image_processor(
        size={"height": 24, "width": 24}, patch_size=4, pooling_size=[2, 2], overlap_margins=[1, 1], max_crops=MAX_CROPS,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    processor = image_only_processor(tf.Molmo2Processor, image_processor, tok, CHAT_TEMPLATE)
    return model, processor


@pytest.fixture(scope="module")
def molmo():
    model, processor = tiny_molmo2()
    return AdaptiveModel(model, processor)


def big_image(seed: int):
    return tiny_image(seed, size=160)  # larger than every canvas, so the crop cap decides the tiling


class CropObserver:
    """Crops the ViT really encodes (hook on its patch embedding) and image features the LM receives."""

    def __init__(self, adaptive: AdaptiveModel):
        self.crops: list[int] = []
        self.features: list[int] = []
        base = adaptive.base_model.model
        self.handles = [
            adaptive.vision_tower.patch_embedding.register_forward_hook(lambda m, a, out: self.crops.append(out.shape[0])),
            base.multi_modal_projector.register_forward_hook(lambda m, a, out: self.features.append(out.last_hidden_state.shape[0])),
        ]

    def close(self):
        for h in self.handles:
            h.remove()


def test_table_row_and_default_crop_tiers(molmo):
    spec = get_architecture("molmo2")
    assert (spec.layers, spec.vision_tower, spec.tier_mode, spec.router) == ("model.language_model.layers", "model.vision_tower", "crops", None)
    assert molmo.tier_crops == {"low": 3, "medium": 8, "high": MAX_CROPS}  # the research system's 1-3 / 4-8 / 9-15
    assert molmo.tier_pixels is None and molmo.tier_settings == molmo.tier_crops
    assert molmo.knob_space.knob_names == ("tier", "insertion_position", "num_active_blocks")
    assert [molmo.tier_processor_kwargs(t) for t in ("low", "medium", "high")] == [{"max_crops": 3}, {"max_crops": 8}, {"max_crops": MAX_CROPS}]
    assert molmo.tier_processor_kwargs(None) == {}


def test_default_high_tier_is_the_processor_setting():
    model, processor = tiny_molmo2(num_layers=2)
    processor.image_processor.max_crops = 6  # a processor capped below the research system's 9-15
    assert AdaptiveModel(model, processor).tier_crops == {"low": 1, "medium": 3, "high": 6}
    custom = AdaptiveModel(model, processor, tier_crops={"one": 1, "some": 4, "all": 6})
    assert custom.knob_space.tiers == ("one", "some", "all")
    assert custom.tier_processor_kwargs("some") == {"max_crops": 4}


def test_vision_tokens_grow_with_tier(molmo):
    crops, features, tokens = {}, {}, {}
    for tier in molmo.knob_space.tiers:
        obs = CropObserver(molmo)
        try:
            molmo.generate(PROMPT, [big_image(1)], tier=tier, max_new_tokens=2, do_sample=False)
        finally:
            obs.close()
        assert len(obs.crops) == 1  # the ViT ran once, at prefill
        crops[tier], features[tier] = obs.crops[0], obs.features[0]
        tokens[tier] = molmo.num_vision_tokens(molmo.prepare_inputs(PROMPT, [big_image(1)], tier=tier))
        assert tokens[tier] == features[tier]  # every <im_patch> placeholder is filled by one pooled feature
        assert crops[tier] - 1 <= molmo.tier_crops[tier]  # crops + the low-resolution overview
    assert crops["low"] < crops["medium"] < crops["high"], crops
    assert tokens["low"] < tokens["medium"] < tokens["high"], tokens


def test_full_setting_equals_unwrapped_generate(molmo):
    images = [big_image(2), big_image(3)]
    prompts = [PROMPT, "how many dots ?"]
    enc = molmo.processor(text=[molmo.format_prompt(p, True) for p in prompts], images=images,
                          return_tensors="pt", padding=True, padding_side="left")
    molmo.remove()
    try:
        reference = molmo.model.generate(**enc, **GREEDY)
    finally:
        molmo._install()
    assert torch.equal(molmo.generate(prompts, images, **GREEDY), reference)
    assert torch.equal(molmo.generate(prompts, images, tier="high", insertion_position=1, num_active_blocks=4, **GREEDY), reference)
    # a cheaper configuration is really different
    assert not torch.equal(molmo.prepare_inputs(prompts, images, tier="low")["input_ids"], enc["input_ids"])


def test_block_knob_runs_on_molmo(molmo):
    ran = []
    handles = [layer.self_attn.register_forward_hook(lambda m, a, out, i=i: ran.append(i)) for i, layer in enumerate(molmo.layers)]
    try:
        molmo.generate(PROMPT, [big_image(4)], tier="medium", insertion_position=1, num_active_blocks=3, max_new_tokens=1, do_sample=False)
    finally:
        for h in handles:
            h.remove()
    assert sorted(set(ran)) == [0, 1, 3]  # without scores the deepest-but-last block (2) drops first


def test_top_k_refused(molmo):
    with pytest.raises(ValueError, match="top_k"):
        molmo.generate(PROMPT, [big_image(5)], top_k=2, **GREEDY)


def test_unknown_tier_refused(molmo):
    with pytest.raises(ValueError, match=r"tier='ultra' is not allowed"):
        molmo.generate(PROMPT, [big_image(6)], tier="ultra", **GREEDY)
    with pytest.raises(ValueError, match=r"tier='ultra' is not allowed"):
        molmo.tier_processor_kwargs("ultra")


def test_wrong_tier_argument_refused():
    model, processor = tiny_molmo2(num_layers=2)
    with pytest.raises(ValueError, match="sets its tiers by crops: pass tier_crops"):
        AdaptiveModel(model, processor, tier_pixels={"low": 1000, "high": 4000})
    with pytest.raises(ValueError, match="increasing"):
        AdaptiveModel(model, processor, tier_crops={"low": 8, "high": 3})


def test_settings_json_keeps_crop_tiers_and_old_keys(molmo, tmp_path):
    settings = molmo.settings()
    assert settings["tier_crops"] == molmo.tier_crops and settings["tier_pixels"] is None
    json.dumps(settings)
    (tmp_path / ADAPTIVE_CONFIG_NAME).write_text(json.dumps(settings))
    loaded = json.loads((tmp_path / ADAPTIVE_CONFIG_NAME).read_text())
    again = AdaptiveModel(molmo.model, molmo.processor, tier_crops=loaded["tier_crops"])
    assert again.tier_crops == molmo.tier_crops


def test_save_and_load_keeps_crop_tiers(tmp_path):
    adaptive = AdaptiveModel(*tiny_molmo2(num_layers=2), tier_crops={"low": 2, "medium": 5, "high": MAX_CROPS})
    adaptive.save_pretrained(str(tmp_path))
    loaded = AdaptiveModel.from_pretrained(str(tmp_path))  # processor rebuilt without torchvision
    assert loaded.tier_crops == adaptive.tier_crops
    knobs = dict(tier="medium", max_new_tokens=3, do_sample=False)
    assert torch.equal(loaded.generate(PROMPT, [big_image(7)], **knobs), adaptive.generate(PROMPT, [big_image(7)], **knobs))


def test_rows_continued_from_one_prefix_equal_separate_generates(molmo):
    """prefill + generate_rows on Molmo2 (crop tiers, pooled image features): each row's tokens are
    those of a plain generate with its knobs."""
    image = big_image(6)
    state = molmo.prefill(PROMPT, [image], tier="medium", insertion_position=2)
    configs = [dict(insertion_position=1, num_active_blocks=3), dict(insertion_position=2), dict(insertion_position=1)]
    out = molmo.generate_rows(state, configs, **GREEDY)
    for row, knobs in zip(out, configs):
        plain = molmo.generate(PROMPT, [image], tier="medium", **knobs, **GREEDY)[0]
        assert torch.equal(row[: plain.shape[0]], plain), knobs


def test_prefix_of_prepared_tensors_keeps_every_processor_input(molmo):
    """From prepared tensors (Molmo2's image_token_pooling, image_grids, image_num_crops included),
    prefill + continue gives the one-shot tokens: the prefix records every input the processor made."""
    image = big_image(8)
    inputs = molmo.prepare_inputs(PROMPT, [image], tier="medium")
    assert {"image_token_pooling", "image_grids", "image_num_crops"} <= set(inputs)
    state = molmo.prefill(insertion_position=2, **inputs)
    assert set(inputs) <= set(state.inputs)
    one_shot = molmo.generate(**inputs, insertion_position=1, num_active_blocks=3, **GREEDY)
    assert torch.equal(molmo.generate(prefix=state, insertion_position=1, num_active_blocks=3, **GREEDY), one_shot)
    assert torch.equal(one_shot, molmo.generate(PROMPT, [image], tier="medium", insertion_position=1, num_active_blocks=3, **GREEDY))
