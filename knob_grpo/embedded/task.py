"""The embedded visual task: procedurally drawn images with four question types.

Every example is an RGB image drawn with PIL, a one-sentence question and a one-word answer. The
four question types need different tiers (DESIGN §2): colour any, stripes the medium tier, pattern
the high tier, compare a little more than the low tier. Fine detail is drawn aligned to the high
tier's patch grid (8 px patches, 16 px merged tokens), and spread over many patches: a tiny model
trained from scratch for minutes learns such textures at once, while detail confined to a single
patch (a small glyph) or exact counting of small dots stayed at chance in the same budget.

Images are 224x224, except the pattern questions' (:data:`PATTERN_IMAGE_SIZE` = 176 px): a tier
is a pixel budget, so a smaller image costs fewer vision tokens at the high tier (121 against 196)
and the same at the lower tiers (whose budgets are below both sizes). The request that needs the
high tier is then the cheaper one to run there, so one configuration per budget, sized for the
slowest request, cannot give it the high tier where a per-request choice can: without this no
choice per question type beat the best single configuration by more than 0.4 points (all images
224 px; ``python -m knob_grpo.embedded.sweep`` reports the headroom).

``colour`` "what colour is the big shape ?" -> red / green / blue / yellow / purple / orange.
    One large shape (70-120 px) on a light background. Survives any downscaling: the low tier
    (64x64 pixels, 16 vision tokens) suffices and the answer needs little depth.
``pattern`` "what pattern is in the square ?" -> rows / columns / checks / bricks.
    A 48 or 64 px square filled with a two-tone texture at the finest scale, 1 px features with 50%
    ink in random colours: rows (``y % 2``), columns (``x % 2``), a 1 px checkerboard, or bricks
    (2x1 px cells, ``(x // 2 + y) % 2``), with +-8 levels of pixel noise on the whole image. Square and texture are
    aligned to the 16 px grid of merged patches, so at the high tier (the 176x176 image as drawn)
    every patch inside the square shows the same pixels and a linear patch embedding tells the
    textures apart. Every texture has energy only at a period of 2 px along at least one axis,
    which the medium tier (96x96) and the low tier (64x64) resample away: there the square is
    one flat colour (bicubic resizing from 176 px leaves a residue of at most 0.5 levels at full
    contrast, below the noise) and the answer is chance. Only the high tier answers it.
``stripes`` "how thick are the stripes ?" -> thin / medium / thick.
    A 48 or 64 px square of horizontal or vertical stripes with a period of 2, 4 or 8 px (half
    ink), aligned to the patch grid. Graded: the low tier keeps only the thick stripes (2.3 px
    period there; thin and medium ones average to the same flat colour: ~73%), the medium tier
    (1.7 px period for the medium stripes, still visible; thin ones are the only flat squares there)
    tells all three apart, as does the high tier.
``compare`` "are there more red or blue shapes ?" -> red / blue.
    3-7 medium-sized red and blue shapes (the counts differ by 1 or 2): counting two sets and
    comparing them. The shapes shrink to 5-7 px at the low tier, which costs a few points.
    Pretraining teaches it at full depth only (``--full_depth_types``), but the model is as
    good with fewer blocks or experts: no question type needs depth.

Determinism: example ``i`` of a split is drawn from ``numpy.random.default_rng([SPLIT_SEEDS[split], i])``
and its question type is ``QUESTION_TYPES[i % 4]`` (so every split is balanced). The splits use
different seeds, and every image carries continuous random positions and sizes, so no two examples
coincide (``tests/test_embedded.py`` checks the content hashes of the splits against each other);
:func:`make_task_dataset` can also drop, on request, any example identical to one of the first
:data:`DEFAULT_SIZES` ``["train"]`` training examples.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Callable, Iterator

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 224
#: Side of the pattern questions' images (see the module docstring); a multiple of the 16 px token grid.
PATTERN_IMAGE_SIZE = 176
QUESTION_TYPES: tuple[str, ...] = ("colour", "pattern", "stripes", "compare")
SPLIT_SEEDS: dict[str, int] = {"train": 1_000, "validation": 2_000, "test": 3_000}
DEFAULT_SIZES: dict[str, int] = {"train": 20_000, "validation": 400, "test": 800}

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 205, 30),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
PATTERNS: tuple[str, ...] = ("rows", "columns", "checks", "bricks")
PATTERN_NOISE = 8  # +- levels of pixel noise on the pattern square (masks resampling residue)
STRIPES: tuple[str, ...] = ("thin", "medium", "thick")
STRIPE_PERIODS: dict[str, int] = {"thin": 2, "medium": 4, "thick": 8}

QUESTIONS: dict[str, str] = {
    "colour": "what colour is the big shape ?",
    "pattern": "what pattern is in the square ?",
    "stripes": "how thick are the stripes ?",
    "compare": "are there more red or blue shapes ?",
}
ANSWERS: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "pattern": PATTERNS,
    "stripes": STRIPES,
    "compare": ("red", "blue"),
}


def task_words() -> list[str]:
    """Every word a question or an answer uses (the tokenizer's ordinary vocabulary)."""
    words: list[str] = []
    for text in list(QUESTIONS.values()) + [a for answers in ANSWERS.values() for a in answers]:
        for w in text.split():
            if w not in words:
                words.append(w)
    return words


# ---------------------------------------------------------------------------------------- drawing
def _background(rng: np.random.Generator, size: int = IMAGE_SIZE) -> Image.Image:
    shade = int(rng.integers(232, 256))
    tint = rng.integers(-6, 7, size=3)
    colour = tuple(int(np.clip(shade + t, 0, 255)) for t in tint)
    return Image.new("RGB", (size, size), colour)


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, size: float, fill) -> None:
    r = size / 2
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:  # triangle
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.85), (cx + r, cy + r * 0.85)], fill=fill)


def _draw_colour(rng: np.random.Generator) -> tuple[Image.Image, str]:
    img = _background(rng)
    draw = ImageDraw.Draw(img)
    colour = ANSWERS["colour"][int(rng.integers(len(COLOURS)))]
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    size = float(rng.uniform(70, 120))
    cx, cy = rng.uniform(size / 2 + 4, IMAGE_SIZE - size / 2 - 4, size=2)
    _draw_shape(draw, shape, float(cx), float(cy), size, COLOURS[colour])
    for _ in range(int(rng.integers(0, 5))):  # tiny grey clutter
        x, y = rng.uniform(4, IMAGE_SIZE - 4, size=2)
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(90, 90, 90))
    return img, colour


def _paste_patch(img: Image.Image, rng: np.random.Generator, mask: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Image.Image:
    """A framed square (48 or 64 px, on the 16 px grid) of dark ink on light paper where
    ``mask(yy, xx)`` holds; the random draws come in a fixed order (the committed weights were
    trained on exactly these images)."""
    side = int(rng.choice([48, 64]))
    x0 = int(rng.integers(1, (img.width - side) // 16)) * 16
    y0 = int(rng.integers(1, (img.height - side) // 16)) * 16
    ink = np.array([int(v) for v in rng.integers(0, 70, size=3)], dtype=np.uint8)
    paper = np.array([int(v) for v in rng.integers(200, 256, size=3)], dtype=np.uint8)
    yy, xx = np.mgrid[0:side, 0:side]
    arr = np.array(img)
    arr[y0 : y0 + side, x0 : x0 + side] = np.where(mask(yy, xx)[..., None], ink, paper)
    img = Image.fromarray(arr)
    ImageDraw.Draw(img).rectangle([x0 - 1, y0 - 1, x0 + side, y0 + side], outline=tuple(int(v) for v in ink), width=1)
    return img


def _draw_stripes(rng: np.random.Generator) -> tuple[Image.Image, str]:
    img = _background(rng)
    width = STRIPES[int(rng.integers(len(STRIPES)))]
    period = STRIPE_PERIODS[width]

    def stripes(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        coord = yy if rng.random() < 0.5 else xx  # horizontal or vertical
        return (coord % period) < period // 2

    return _paste_patch(img, rng, stripes), width


def _draw_compare(rng: np.random.Generator) -> tuple[Image.Image, str]:
    img = _background(rng)
    draw = ImageDraw.Draw(img)
    while True:
        n_red = int(rng.integers(1, 6))
        n_blue = int(rng.integers(1, 6))
        if 1 <= abs(n_red - n_blue) <= 2 and 3 <= n_red + n_blue <= 7:
            break
    colours = ["red"] * n_red + ["blue"] * n_blue
    placed: list[tuple[float, float, float]] = []
    for colour in colours:
        for _ in range(500):
            size = float(rng.uniform(16, 26))
            x, y = rng.uniform(size / 2 + 4, IMAGE_SIZE - size / 2 - 4, size=2)
            if all(math.hypot(x - qx, y - qy) > (size + qs) / 2 + 6 for qx, qy, qs in placed):
                break
        placed.append((float(x), float(y), size))
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        _draw_shape(draw, shape, float(x), float(y), size, COLOURS[colour])
    return img, "red" if n_red > n_blue else "blue"


def _draw_pattern(rng: np.random.Generator) -> tuple[Image.Image, str]:
    img = _background(rng, PATTERN_IMAGE_SIZE)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(0, 4))):  # tiny grey clutter
        x, y = rng.uniform(4, PATTERN_IMAGE_SIZE - 4, size=2)
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(90, 90, 90))
    pattern = PATTERNS[int(rng.integers(len(PATTERNS)))]

    def texture(yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
        if pattern == "rows":
            return yy % 2 == 0
        if pattern == "columns":
            return xx % 2 == 0
        if pattern == "checks":
            return (xx + yy) % 2 == 0
        return (xx // 2 + yy) % 2 == 0  # bricks

    img = _paste_patch(img, rng, texture)
    # the lower tiers keep a residue of at most 0.5 levels from resampling; noise larger than that
    # makes "flat at the lower tiers" true for any learner, not only for a tiny one
    arr = np.asarray(img).astype(np.int16)
    arr += rng.integers(-PATTERN_NOISE, PATTERN_NOISE + 1, size=arr.shape, dtype=np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), pattern


_DRAWERS = {"colour": _draw_colour, "pattern": _draw_pattern, "stripes": _draw_stripes, "compare": _draw_compare}


def make_example(split: str, index: int) -> dict[str, Any]:
    """Example ``index`` of ``split``: ``{"image", "question", "prompt", "answer", "qtype", "uid"}``."""
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; splits are: {', '.join(SPLIT_SEEDS)}")
    qtype = QUESTION_TYPES[index % len(QUESTION_TYPES)]
    rng = np.random.default_rng([SPLIT_SEEDS[split], index])
    image, answer = _DRAWERS[qtype](rng)
    question = QUESTIONS[qtype]
    return {
        "image": image,
        "question": question,
        "prompt": question,
        "answer": answer,
        "qtype": qtype,
        "uid": f"{split}-{index}",
    }


def example_hash(example: dict[str, Any]) -> str:
    """Content hash of an example (image pixels + question), used to check split disjointness."""
    h = hashlib.sha1(example["image"].tobytes())
    h.update(example["question"].encode())
    return h.hexdigest()


def iter_examples(split: str, start: int = 0, stop: int | None = None) -> Iterator[dict[str, Any]]:
    i = start
    while stop is None or i < stop:
        yield make_example(split, i)
        i += 1


_TRAIN_HASHES: set[str] | None = None


def _train_hashes(n: int) -> set[str]:
    global _TRAIN_HASHES
    if _TRAIN_HASHES is None:
        _TRAIN_HASHES = {example_hash(e) for e in iter_examples("train", 0, n)}
    return _TRAIN_HASHES


def make_task_dataset(split: str, size: int | None = None, *, dedupe_against_train: bool = False):
    """The ``split`` as a :class:`datasets.Dataset` (columns image, question, prompt, answer, qtype, uid).

    ``size`` defaults to :data:`DEFAULT_SIZES` ``[split]``. The first ``size`` examples are the same
    for every ``size`` (a smaller set is a prefix of a larger one). ``dedupe_against_train=True``
    drops examples identical to one of the first ``DEFAULT_SIZES["train"]`` training examples
    (hashing those takes ~30 s; none has ever matched).
    """
    import datasets

    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; splits are: {', '.join(SPLIT_SEEDS)}")
    size = DEFAULT_SIZES[split] if size is None else int(size)
    rows: dict[str, list] = {k: [] for k in ("image", "question", "prompt", "answer", "qtype", "uid")}
    seen = _train_hashes(DEFAULT_SIZES["train"]) if dedupe_against_train else set()
    for ex in iter_examples(split, 0, size):
        if seen and example_hash(ex) in seen:
            continue
        for k in rows:
            rows[k].append(ex[k])
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "prompt": datasets.Value("string"),
            "answer": datasets.Value("string"),
            "qtype": datasets.Value("string"),
            "uid": datasets.Value("string"),
        }
    )
    return datasets.Dataset.from_dict(rows, features=features)
