"""The embedded default: task determinism, tokenizer/processor, the pretraining script, the committed model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from knob_grpo.embedded import (
    ANSWERS,
    QUESTION_TYPES,
    TIER_PIXELS,
    VISION_TOKENS,
    build_processor,
    knob_space,
    load_embedded_adaptive,
    make_example,
    make_task_dataset,
)
from knob_grpo.embedded.task import example_hash, task_words

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------- the task
def test_dataset_is_deterministic_and_prefix_stable():
    a = make_task_dataset("validation", 12)
    b = make_task_dataset("validation", 12)
    c = make_task_dataset("validation", 20)
    assert a.column_names == ["image", "question", "prompt", "answer", "qtype", "uid"]
    for i in range(12):
        assert a[i]["answer"] == b[i]["answer"] == c[i]["answer"]
        assert a[i]["question"] == c[i]["question"]
        assert a[i]["image"].tobytes() == b[i]["image"].tobytes() == c[i]["image"].tobytes()
    assert a[0]["image"].size == (224, 224)


def test_splits_are_disjoint_and_balanced():
    n = 400
    hashes = {split: {example_hash(make_example(split, i)) for i in range(n)} for split in ("train", "validation", "test")}
    for split, h in hashes.items():
        assert len(h) == n, f"duplicate examples inside {split}"
    assert not hashes["train"] & hashes["validation"]
    assert not hashes["train"] & hashes["test"]
    assert not hashes["validation"] & hashes["test"]
    ds = make_task_dataset("test", 40)
    counts = {t: ds["qtype"].count(t) for t in QUESTION_TYPES}
    assert counts == {t: 10 for t in QUESTION_TYPES}
    for row in ds:
        assert row["answer"] in ANSWERS[row["qtype"]]
        assert row["prompt"] == row["question"]


def test_answers_are_spread_over_classes():
    for qtype in QUESTION_TYPES:
        i0 = QUESTION_TYPES.index(qtype)
        answers = [make_example("train", i0 + 4 * j)["answer"] for j in range(120)]
        assert set(answers) == set(ANSWERS[qtype]), qtype
        top = max(answers.count(a) for a in set(answers))
        assert top <= 0.7 * len(answers), f"{qtype} answers are too unbalanced"


def test_unknown_split_is_rejected():
    with pytest.raises(ValueError, match="unknown split"):
        make_example("dev", 0)


# ------------------------------------------------------------------------------------- tokenizer and processor
def test_tokenizer_and_processor_tiers():
    processor = build_processor()
    tok = processor.tokenizer
    unk = tok.unk_token_id
    for w in task_words():
        ids = tok(w, add_special_tokens=False).input_ids
        assert len(ids) == 1 and ids[0] != unk, w
    ex = make_example("test", 1)
    for tier, n_tokens in VISION_TOKENS.items():
        text = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ex["question"]}]}],
            tokenize=False, add_generation_prompt=True,
        )
        enc = processor(text=[text], images=[ex["image"]], return_tensors="pt",
                        size={"longest_edge": TIER_PIXELS[tier], "shortest_edge": 32 * 32})
        assert int((enc["input_ids"] == tok.convert_tokens_to_ids("<|image_pad|>")).sum()) == n_tokens
        assert unk not in enc["input_ids"][0].tolist()
    # the high tier is the processor's own default: the full setting is the unmodified processor
    assert processor.image_processor.size["longest_edge"] == TIER_PIXELS["high"]
    assert VISION_TOKENS == {"low": 16, "medium": 64, "high": 196}


def test_knob_space_of_the_embedded_model():
    space = knob_space()
    assert space.tiers == ("low", "medium", "high")
    assert space.top_k_options == (2, 3, 4)
    assert space.insertion_positions == (1, 2, 3)
    assert len(list(space.all_configs())) == 54
    assert space.cheapest().num_active_blocks == 6


# ------------------------------------------------------------------------------------- pretraining script
def test_pretrain_script_runs_and_loss_goes_down(tmp_path):
    out = tmp_path / "pretrained"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [
        sys.executable, "-m", "knob_grpo.embedded.pretrain", "--output_dir", str(out), "--max_steps", "40",
        "--batch_size", "8", "--lr", "3e-3", "--warmup_steps", "5", "--tier_probs", "low=1", "--eval_every", "0",
        "--log_every", "1", "--threads", "1",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 40
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    for name in ("model.safetensors", "config.json", "tokenizer.json", "processor_config.json", "knob_grpo_adaptive.json"):
        assert (out / name).exists(), name
    # what it saved loads back and generates under knobs
    adaptive = load_embedded_adaptive(out)
    ex = make_example("test", 0)
    ids = adaptive.generate(text=ex["question"], images=ex["image"], tier="low", insertion_position=1, top_k=2,
                            num_active_blocks=6, max_new_tokens=2, do_sample=False)
    assert ids.shape[0] == 1


# The committed-model tests (weights size/format, full-setting accuracy >= 80%, the sweep's headline
# checks) come back with knob_grpo/embedded/weights/ (issue #6); the weights are not committed yet.
