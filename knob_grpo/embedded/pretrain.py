"""Pretrain the embedded tiny Qwen3-VL-MoE on the embedded task, robust to the knobs.

    python -m knob_grpo.embedded.pretrain --output_dir knob_grpo/embedded/weights

What one step does:

* takes the next ``batch_size`` training examples (example ``step * batch_size + j`` of the train
  split: the data order is fixed);
* draws one knob configuration for the whole batch (``random.Random(seed)``, so it is fixed too):
  the tier with ``--tier_probs`` (default high 0.5, medium 0.25, low 0.25: the detail questions
  can only be learned from high-tier images); with probability ``--full_prob`` the language model
  runs at its full setting, otherwise ``p``, ``top_k`` and ``num_active_blocks`` are drawn
  uniformly from the knob space. Half of the dropping configurations drop the blocks
  ``AdaptiveModel`` drops by default (deepest first), the other half a random set of blocks at
  index >= p, so the model stays usable whatever drop order importance scores later pick;
* applies the tier through the processor's pixel budget and the other knobs with
  ``AdaptiveModel.configured`` (``apply_knobs`` below): ordinary forward and backward passes;
* loss: cross-entropy on the answer word and the closing ``<|im_end|>`` only (labels -100 on the
  prompt and the image). Question types in ``--full_depth_types`` (default ``compare``) count only
  in steps whose language model runs every block at the full top-k: the model learns them at full
  depth and is never taught to answer them with fewer blocks or experts (the other types are
  trained robust to every knob). The robustness carries over anyway: on the committed weights
  neither dropped blocks nor a smaller top-k cost ``compare`` more than 2 points on the test split
  (``python -m knob_grpo.embedded.sweep``). Plus the
  router load-balancing loss (coefficient
  ``router_aux_loss_coef`` = 0.01 from the config);
* AdamW (lr ``--lr`` with linear warm-up then cosine decay to 10%), gradient clipping at 1.0.

Every ``--eval_every`` steps the accuracy of the first answer token (equal to greedy generation's
first token) is logged on a fixed validation subset, at the full setting and at the cheapest
configuration, per question type. The result is saved with ``save_pretrained``: safetensors
(float16 by default, to keep the committed copy small; loading upcasts to float32), config,
tokenizer, processor and ``knob_grpo_adaptive.json`` (tier pixel budgets and knob space), plus
``training_log.jsonl`` and ``training_args.json``.

Determinism: model initialisation (``torch.manual_seed``), data order and knob draws are all fixed
by ``--seed``; bitwise reproducibility additionally needs the same thread count (``--threads``).
A resumable checkpoint (model, optimiser, sampler state) is written every ``--save_every`` steps;
``--resume`` continues from it with the same data order and knob draws.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable, ContextManager

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

from ..knobs import Knobs
from . import model as M
from .task import QUESTION_TYPES, make_example

IGNORE = -100


# --------------------------------------------------------------------------------- knob plumbing
def make_knob_applier(model, processor) -> tuple[Callable[..., ContextManager], Any]:
    """``apply_knobs(knobs, dropped_blocks=None)`` -> a context manager running forwards with the knobs.

    Uses ``knob_grpo.adaptive.AdaptiveModel.configured``; the tier is not a forward-pass knob
    (it is applied by the processor, see :func:`encode`). Returns ``(apply_knobs, adaptive)``.
    """
    try:
        from ..adaptive import AdaptiveModel
    except ImportError:  # pragma: no cover - adaptive.py is part of the package
        print("knob_grpo.adaptive is not available: only the tier is randomised", file=sys.stderr)

        def apply_knobs(knobs: Knobs, dropped_blocks=None):
            return contextlib.nullcontext()

        return apply_knobs, None

    adaptive = AdaptiveModel(model, processor, knob_space=M.knob_space(), tier_pixels=dict(M.TIER_PIXELS))

    def apply_knobs(knobs: Knobs, dropped_blocks=None):
        return adaptive.configured(
            insertion_position=knobs.insertion_position,
            top_k=knobs.top_k,
            num_active_blocks=knobs.num_active_blocks,
            dropped_blocks=dropped_blocks,
        )

    return apply_knobs, adaptive


def tier_kwargs(tier: str) -> dict[str, Any]:
    """Processor arguments for a tier (the same pixel budget ``AdaptiveModel`` uses)."""
    return {"size": {"longest_edge": M.TIER_PIXELS[tier], "shortest_edge": min(M.MIN_PIXELS, M.TIER_PIXELS[tier])}}


def format_prompt(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode(processor, examples: list[dict[str, Any]], tier: str, with_answers: bool = True,
           skip_types: frozenset[str] = frozenset()) -> dict[str, torch.Tensor]:
    """Processor inputs (left-padded) and, with answers, labels on the answer tokens only
    (none for the rows whose question type is in ``skip_types``)."""
    eos = processor.tokenizer.eos_token
    texts = []
    for ex in examples:
        text = format_prompt(processor, ex["question"])
        if with_answers:
            text = f"{text} {ex['answer']} {eos}"
        texts.append(text)
    enc = dict(
        processor(
            text=texts,
            images=[ex["image"] for ex in examples],
            return_tensors="pt",
            padding=True,
            padding_side="left",
            **tier_kwargs(tier),
        )
    )
    if with_answers:
        labels = torch.full_like(enc["input_ids"], IGNORE)
        labels[:, -2:] = enc["input_ids"][:, -2:]  # answer word + <|im_end|> (left padding: they end the row)
        for row, ex in enumerate(examples):
            if ex["qtype"] in skip_types:
                labels[row] = IGNORE
        enc["labels"] = labels
    return enc


class KnobSampler:
    """Draws one training configuration per step (see the module docstring)."""

    def __init__(self, space, seed: int, tier_probs: dict[str, float], full_prob: float, random_drop_prob: float = 0.5,
                 drop_blocks: bool = True):
        self.space = space
        self.drop_blocks = drop_blocks
        self.rng = random.Random(seed)
        self.tiers = list(tier_probs)
        self.weights = [tier_probs[t] for t in self.tiers]
        self.full_prob = full_prob
        self.random_drop_prob = random_drop_prob

    def __call__(self) -> tuple[Knobs, list[int] | None]:
        tier = self.rng.choices(self.tiers, self.weights)[0]
        if self.rng.random() < self.full_prob:
            full = self.space.full()
            return Knobs(tier, full.insertion_position, full.top_k, full.num_active_blocks), None
        p = self.rng.choice(self.space.insertion_positions)
        k = self.rng.choice(self.space.top_k_options)
        b = self.rng.choice(self.space.block_options(p))
        if not self.drop_blocks:
            b = self.space.num_blocks
        dropped = None
        n_drop = self.space.num_blocks - b
        if n_drop and self.rng.random() < self.random_drop_prob:
            dropped = sorted(self.rng.sample(range(p, self.space.num_blocks), n_drop))
        return Knobs(tier, p, k, b), dropped


# --------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def first_token_accuracy(model, processor, apply_knobs, examples, knobs: Knobs, batch_size: int = 32) -> dict[str, float]:
    """Accuracy of the argmax first answer token (what greedy generation emits first), per type."""
    tok = processor.tokenizer
    was_training = model.training
    model.eval()
    hits: dict[str, list[int]] = {t: [] for t in QUESTION_TYPES}
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        enc = encode(processor, chunk, knobs.tier, with_answers=False)
        with apply_knobs(knobs):
            logits = model(**enc, logits_to_keep=1).logits[:, -1]
        pred = tok.convert_ids_to_tokens(logits.argmax(-1).tolist())
        for ex, p in zip(chunk, pred):
            hits[ex["qtype"]].append(int(p == ex["answer"]))
    model.train(was_training)
    out = {t: sum(v) / max(len(v), 1) for t, v in hits.items()}
    out["all"] = sum(sum(v) for v in hits.values()) / max(sum(len(v) for v in hits.values()), 1)
    return out


# --------------------------------------------------------------------------------- training
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--output_dir", required=True)
    ap.add_argument("--max_steps", type=int, default=2400)
    ap.add_argument("--batch_size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1.5e-3)
    ap.add_argument("--min_lr_ratio", type=float, default=0.1)
    ap.add_argument("--warmup_steps", type=int, default=100)
    ap.add_argument("--weight_decay", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tier_probs", default="low=0.25,medium=0.25,high=0.5")
    ap.add_argument("--full_prob", type=float, default=0.5, help="probability that p/top_k/blocks are at the full setting")
    ap.add_argument("--no_knobs", action="store_true", help="plain training: full p/top_k/blocks every step")
    ap.add_argument("--no_block_drops", action="store_true", help="never drop blocks while training (top_k and tier still vary)")
    ap.add_argument("--full_depth_types", default="compare",
                    help="comma-separated question types trained only at full top_k and blocks ('' for none)")
    ap.add_argument("--eval_every", type=int, default=250)
    ap.add_argument("--eval_size", type=int, default=160)
    ap.add_argument("--log_every", type=int, default=25)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--save_dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--init_from", default=None, help="start from a saved model directory instead of a fresh init")
    ap.add_argument("--save_every", type=int, default=200, help="write a resumable checkpoint every N steps (0: never)")
    ap.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint.pt if it exists")
    return ap.parse_args(argv)


def parse_tier_probs(text: str) -> dict[str, float]:
    """``--tier_probs`` (``tier=weight,...``) as a dict; refuses unknown or repeated tiers and bad weights."""
    allowed = tuple(M.TIER_PIXELS)
    form = f"comma-separated tier=weight entries with tiers from {allowed} and finite weights >= 0, e.g. 'low=0.25,medium=0.25,high=0.5'"
    probs: dict[str, float] = {}
    for entry in text.split(","):
        name, sep, value = entry.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"--tier_probs entry {entry!r} (in {text!r}) is not tier=weight; expected {form}")
        if name not in allowed:
            raise ValueError(f"--tier_probs has unknown tier {name!r} (in {text!r}); tiers are {allowed}")
        if name in probs:
            raise ValueError(f"--tier_probs gives tier {name!r} twice (in {text!r}); expected {form}")
        try:
            weight = float(value)
        except ValueError:
            raise ValueError(f"--tier_probs weight {value!r} of tier {name!r} is not a number; expected {form}") from None
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"--tier_probs weight {value!r} of tier {name!r} must be a finite number >= 0")
        probs[name] = weight
    if sum(probs.values()) <= 0:
        raise ValueError(f"--tier_probs {text!r} gives every tier weight 0; at least one weight must be > 0")
    return probs


def check_args(args: argparse.Namespace) -> tuple[dict[str, float], frozenset[str]]:
    """Validate the arguments before anything is written: ``(tier_probs, full_depth_types)``."""
    tier_probs = parse_tier_probs(args.tier_probs)
    if not (0.0 <= args.full_prob <= 1.0):  # also refuses nan
        raise ValueError(f"--full_prob {args.full_prob} is not a probability; allowed: 0 <= full_prob <= 1")
    full_depth_types = frozenset(t.strip() for t in args.full_depth_types.split(",") if t.strip())
    unknown = full_depth_types - set(QUESTION_TYPES)
    if unknown:
        raise ValueError(f"--full_depth_types has unknown question types {sorted(unknown)}; types are {QUESTION_TYPES}")
    for name in ("max_steps", "batch_size", "threads", "log_every"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} {getattr(args, name)} must be >= 1")
    for name in ("eval_every", "eval_size", "save_every", "warmup_steps"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name} {getattr(args, name)} must be >= 0")
    return tier_probs, full_depth_types


def lr_at(step: int, args) -> float:
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    progress = (step - args.warmup_steps) / max(1, args.max_steps - args.warmup_steps)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def main(argv=None) -> dict[str, Any]:
    args = parse_args(argv)
    tier_probs, full_depth_types = check_args(args)  # before anything in --output_dir is written or truncated
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    if args.init_from:
        model, processor = M.load_embedded_default(args.init_from)
    else:
        processor = M.build_processor()
        model = M.build_model(seed=args.seed, tokenizer=processor.tokenizer)
    model.train()
    apply_knobs, adaptive = make_knob_applier(model, processor)
    space = M.knob_space()
    sampler = KnobSampler(space, args.seed, tier_probs, 1.0 if args.no_knobs else args.full_prob,
                          drop_blocks=not args.no_block_drops)

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.98), eps=1e-8,
    )
    val = [make_example("validation", i) for i in range(args.eval_size)]
    full = space.full()
    cheapest = space.cheapest()
    log_path = out_dir / "training_log.jsonl"
    log_f = open(log_path, "a")
    (out_dir / "training_args.json").write_text(json.dumps(vars(args), indent=2))

    def log(record: dict[str, Any]) -> None:
        log_f.write(json.dumps(record) + "\n")
        log_f.flush()

    t0 = time.time()
    running: list[float] = []
    first_losses: list[float] = []
    last_losses: list[float] = []
    ckpt_path = out_dir / "checkpoint.pt"
    start_step = 0
    if args.resume and ckpt_path.exists():
        ckpt = torch.load(ckpt_path, weights_only=False)
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        sampler.rng.setstate(ckpt["sampler_rng"])
        torch.set_rng_state(ckpt["torch_rng"])
        start_step = ckpt["step"]
        first_losses = ckpt.get("first_losses", [])
        t0 -= ckpt.get("elapsed_s", 0.0)
        print(json.dumps({"resumed_from_step": start_step}), flush=True)
    else:
        log_f.truncate(0)
    for step in range(start_step, args.max_steps):
        knobs, dropped = sampler()
        examples = [make_example("train", step * args.batch_size + j) for j in range(args.batch_size)]
        reduced_depth = knobs.top_k < full.top_k or knobs.num_active_blocks < full.num_active_blocks
        enc = encode(processor, examples, knobs.tier, skip_types=full_depth_types if reduced_depth else frozenset())
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        with apply_knobs(knobs, dropped):
            out = model(**enc, output_router_logits=True)
        loss = out.loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        lm_loss = float(loss.detach()) - float(out.aux_loss.detach() if out.aux_loss is not None else 0.0) * model.config.text_config.router_aux_loss_coef
        running.append(lm_loss)
        if step < 20:
            first_losses.append(lm_loss)
        last_losses = (last_losses + [lm_loss])[-20:]
        if (step + 1) % args.log_every == 0 or step == 0:
            rec = {"step": step + 1, "loss": sum(running) / len(running), "lr": lr_at(step, args), "elapsed_s": round(time.time() - t0, 1),
                   "knobs": str(knobs)}
            print(json.dumps(rec), flush=True)
            log(rec)
            running = []
        if args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == args.max_steps):
            rec = {"step": step + 1, "elapsed_s": round(time.time() - t0, 1)}
            for name, cfg in (("full", full), ("cheapest", cheapest)):
                acc = first_token_accuracy(model, processor, apply_knobs, val, cfg)
                rec[name] = {k: round(v, 3) for k, v in acc.items()}
            print(json.dumps(rec), flush=True)
            log(rec)
        if args.save_every and (step + 1) % args.save_every == 0 and step + 1 < args.max_steps:
            tmp = ckpt_path.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "sampler_rng": sampler.rng.getstate(),
                        "torch_rng": torch.get_rng_state(), "step": step + 1, "first_losses": first_losses,
                        "elapsed_s": time.time() - t0}, tmp)
            os.replace(tmp, ckpt_path)

    model.eval()
    save_dtype = getattr(torch, args.save_dtype)
    if adaptive is not None:
        adaptive.remove()
    model.to(save_dtype)
    M.save_model_and_processor(model, processor, out_dir)
    settings = {
        "model_type": model.config.model_type,
        "knob_space": space.to_dict(),
        "tier_pixels": dict(M.TIER_PIXELS),
        "importance_scores": None,
    }
    (out_dir / "knob_grpo_adaptive.json").write_text(json.dumps(settings, indent=2))
    model.to(torch.float32)
    summary = {
        "steps": args.max_steps,
        "train_seconds": round(time.time() - t0, 1),
        "first_loss": sum(first_losses) / max(len(first_losses), 1),
        "last_loss": sum(last_losses) / max(len(last_losses), 1),
    }
    log(summary)
    log_f.close()
    if ckpt_path.exists():
        ckpt_path.unlink()  # the saved model replaces it
    print(json.dumps(summary), flush=True)
    return summary


if __name__ == "__main__":
    main()
