"""The knob space: which runtime knobs a model has, their options and their constraints.

A configuration is a :class:`Knobs` tuple ``(tier, insertion_position, top_k, num_active_blocks)``.
A knob the model lacks (``tier`` for a text-only model, ``top_k`` for a dense one) is ``None`` in
every tuple and absent from :attr:`KnobSpace.knob_names`; passing a value for it is an error.

Constraints (DESIGN §2, generalised from the 16-block, top-8 research model):

* blocks ``0 .. p-1`` always run at the full configuration, so block 0 is never dropped and
  ``top_k`` only applies from block ``p`` on;
* ``num_active_blocks`` counts every block that runs, the ``p`` leading ones included; at most
  ``max_dropped_blocks`` blocks are dropped, and at least ``min_blocks_after_insertion`` blocks
  from ``p`` on always run. With 16 blocks, ``p`` in 1..5, 4 and 11 this gives the research
  system's table: ``p=1 -> 12..16``, ``p=3 -> 14..16``, ``p=5 -> 16`` only.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Iterator, Sequence

KNOB_NAMES: tuple[str, ...] = ("tier", "insertion_position", "top_k", "num_active_blocks")
DEFAULT_TIERS: tuple[str, ...] = ("low", "medium", "high")


@dataclass(frozen=True)
class Knobs:
    """One configuration. ``None`` means "the model's full setting" (or: the model lacks the knob)."""

    tier: str | None = None
    insertion_position: int | None = None
    top_k: int | None = None
    num_active_blocks: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:  # compact form used in logs and tables
        parts = [f"{name}={value}" for name, value in self.as_dict().items() if value is not None]
        return "(" + ", ".join(parts) + ")"


def _allowed(values: Sequence[Any]) -> str:
    return ", ".join(repr(v) if isinstance(v, str) else str(v) for v in values)


def _check_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        # Accept numpy / torch integer scalars, refuse floats and strings.
        if hasattr(value, "item") and not isinstance(value, float) and getattr(value, "ndim", 0) == 0:
            item = value.item()
            if isinstance(item, int) and not isinstance(item, bool):
                return item
        raise ValueError(f"{name}={value!r} must be an integer, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class KnobSpace:
    """The knobs of one model and the options a controller chooses from.

    Build it with :meth:`from_model` (defaults read off the model's config) or directly.

    Args:
        num_blocks: number of transformer blocks of the language model.
        tiers: image tiers, cheapest first; the last is the full setting. Empty for a model
            without a vision tower.
        insertion_positions: options for ``p``; every ``p`` must satisfy ``1 <= p < num_blocks``.
        top_k_options: experts per token to choose from; empty for a dense model.
        default_top_k: the model's own experts per token (its full setting); ``None`` if dense.
        num_experts: experts per MoE block; ``None`` if dense.
        max_dropped_blocks: the most blocks a configuration may drop.
        min_blocks_after_insertion: blocks at index ``>= p`` that always run.
    """

    num_blocks: int
    tiers: tuple[str, ...] = ()
    insertion_positions: tuple[int, ...] = (1,)
    top_k_options: tuple[int, ...] = ()
    default_top_k: int | None = None
    num_experts: int | None = None
    max_dropped_blocks: int = 0
    min_blocks_after_insertion: int = 1
    _check: bool = field(default=True, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tiers", tuple(self.tiers))
        object.__setattr__(self, "insertion_positions", tuple(sorted(_check_int("insertion_position", p) for p in self.insertion_positions)))
        object.__setattr__(self, "top_k_options", tuple(sorted(_check_int("top_k", k) for k in self.top_k_options)))
        n = _check_int("num_blocks", self.num_blocks)
        if n < 2:
            raise ValueError(f"num_blocks={n} is too small: knobs need at least 2 blocks")
        if not self.insertion_positions:
            raise ValueError("insertion_positions must not be empty")
        bad = [p for p in self.insertion_positions if not 1 <= p < n]
        if bad:
            raise ValueError(
                f"insertion_position={bad[0]} is out of range: block 0 always runs in full and at least one "
                f"block must follow, so allowed values are 1..{n - 1}"
            )
        if len(set(self.tiers)) != len(self.tiers):
            raise ValueError(f"tiers must be distinct, got {list(self.tiers)}")
        for name, options in (("insertion_positions", self.insertion_positions), ("top_k_options", self.top_k_options)):
            if len(set(options)) != len(options):
                raise ValueError(f"{name} must be distinct, got {list(options)}")
        if self.default_top_k is not None:
            k = _check_int("default_top_k", self.default_top_k)
            if self.num_experts is not None and not 1 <= k <= _check_int("num_experts", self.num_experts):
                raise ValueError(f"default_top_k={k} is not possible: it must be between 1 and the model's {self.num_experts} experts")
        if self.top_k_options:
            if self.num_experts is None or self.default_top_k is None:
                raise ValueError("a KnobSpace with top_k_options needs num_experts and default_top_k")
            for k in self.top_k_options:
                if not 1 <= k <= self.num_experts:
                    raise ValueError(
                        f"top_k={k} is not possible: it must be between 1 and the model's {self.num_experts} experts"
                    )
        _check_int("max_dropped_blocks", self.max_dropped_blocks)
        _check_int("min_blocks_after_insertion", self.min_blocks_after_insertion)
        if self.max_dropped_blocks < 0:
            raise ValueError(f"max_dropped_blocks={self.max_dropped_blocks} must be >= 0")
        if self.min_blocks_after_insertion < 1:
            raise ValueError(f"min_blocks_after_insertion={self.min_blocks_after_insertion} must be >= 1")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_model(
        cls,
        num_blocks: int,
        *,
        default_top_k: int | None = None,
        num_experts: int | None = None,
        has_vision: bool = False,
        tiers: Sequence[str] | None = None,
        insertion_positions: Sequence[int] | None = None,
        top_k_options: Sequence[int] | None = None,
        max_dropped_blocks: int | None = None,
        min_blocks_after_insertion: int | None = None,
    ) -> "KnobSpace":
        """Defaults scaled from the research system (16 blocks, top-8, p in 1..5, <= 4 dropped).

        ``p`` ranges over ``1..ceil(5n/16)``, at most ``n // 4`` blocks are dropped, ``top_k``
        ranges over ``ceil(k/2)..k`` for a model with default ``k``. Any argument overrides.
        """
        n = num_blocks
        if insertion_positions is None:
            insertion_positions = range(1, min(n - 1, max(1, math.ceil(5 * n / 16))) + 1)
        insertion_positions = tuple(insertion_positions)
        if max_dropped_blocks is None:
            max_dropped_blocks = max(1, n // 4) if n > 2 else 0
        if min_blocks_after_insertion is None:
            min_blocks_after_insertion = max(1, n - max(insertion_positions))
        if default_top_k is None:
            if top_k_options:
                raise ValueError(f"top_k_options={list(top_k_options)} given for a dense model (default_top_k=None): "
                                 "a dense model has no top_k knob")
            top_k_options = ()
        elif top_k_options is None:
            top_k_options = range(max(1, math.ceil(default_top_k / 2)), default_top_k + 1)
        if tiers is None:
            tiers = DEFAULT_TIERS if has_vision else ()
        elif not has_vision and tiers:
            raise ValueError(f"tiers={list(tiers)} given for a model without a vision tower")
        return cls(
            num_blocks=n,
            tiers=tuple(tiers),
            insertion_positions=insertion_positions,
            top_k_options=tuple(top_k_options),
            default_top_k=default_top_k,
            num_experts=num_experts,
            max_dropped_blocks=max_dropped_blocks,
            min_blocks_after_insertion=min_blocks_after_insertion,
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("_check")
        d["tiers"] = list(self.tiers)
        d["insertion_positions"] = list(self.insertion_positions)
        d["top_k_options"] = list(self.top_k_options)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "KnobSpace":
        return cls(**{k: v for k, v in d.items() if not k.startswith("_")})

    # ------------------------------------------------------------------ queries
    @property
    def knob_names(self) -> tuple[str, ...]:
        """Knobs this model has, in the canonical order."""
        names = []
        if self.tiers:
            names.append("tier")
        names.append("insertion_position")
        if self.top_k_options:
            names.append("top_k")
        names.append("num_active_blocks")
        return tuple(names)

    def has(self, knob: str) -> bool:
        return knob in self.knob_names

    @property
    def full_tier(self) -> str | None:
        return self.tiers[-1] if self.tiers else None

    def block_options(self, insertion_position: int) -> tuple[int, ...]:
        """Allowed ``num_active_blocks`` for a given ``p`` (largest last)."""
        p = self.check_value("insertion_position", insertion_position)
        n = self.num_blocks
        low = max(n - self.max_dropped_blocks, p + self.min_blocks_after_insertion)
        low = min(low, n)
        return tuple(range(low, n + 1))

    @property
    def all_block_options(self) -> tuple[int, ...]:
        """Every ``num_active_blocks`` value allowed for some ``p`` (the controller's output head)."""
        return tuple(sorted({b for p in self.insertion_positions for b in self.block_options(p)}))

    def options(self, knob: str) -> tuple[Any, ...]:
        """The options of one knob (``num_active_blocks``: the union over ``p``)."""
        self._require(knob)
        if knob == "tier":
            return self.tiers
        if knob == "insertion_position":
            return self.insertion_positions
        if knob == "top_k":
            return self.top_k_options
        return self.all_block_options

    def _require(self, knob: str) -> None:
        if knob not in KNOB_NAMES:
            raise ValueError(f"unknown knob {knob!r}; knobs are: {', '.join(KNOB_NAMES)}")
        if not self.has(knob):
            why = "it has no vision tower" if knob == "tier" else "it is a dense model (no MoE router)"
            raise ValueError(
                f"this model has no {knob!r} knob ({why}); its knobs are: {', '.join(self.knob_names)}"
            )

    def check_value(self, knob: str, value: Any) -> Any:
        """Return ``value`` if it is one of the knob's options, else raise a ``ValueError``."""
        self._require(knob)
        if knob != "tier":
            value = _check_int(knob, value)
        allowed = self.options(knob)
        if value not in allowed:
            extra = ""
            if knob == "top_k" and self.num_experts is not None and value > self.num_experts:
                extra = f" (the model has only {self.num_experts} experts per block)"
            elif knob == "top_k" and value < 1:
                extra = " (at least one expert must run)"
            raise ValueError(f"{knob}={value!r} is not allowed{extra}; allowed values: {_allowed(allowed)}")
        return value

    def resolve(
        self,
        tier: str | None = None,
        insertion_position: int | None = None,
        top_k: int | None = None,
        num_active_blocks: int | None = None,
    ) -> Knobs:
        """Validate a configuration and fill knobs left ``None`` with the full setting.

        ``insertion_position=None`` means the smallest allowed ``p`` (so a ``top_k`` or a dropped
        block given alone applies as early as the space allows); it changes nothing by itself.
        Raises ``ValueError`` naming the bad value and the allowed ones.
        """
        t = self.check_value("tier", tier) if tier is not None else self.full_tier
        p = self.check_value("insertion_position", insertion_position) if insertion_position is not None else self.insertion_positions[0]
        k = self.check_value("top_k", top_k) if top_k is not None else self.default_top_k
        if num_active_blocks is None:
            b = self.num_blocks
        else:
            self._require("num_active_blocks")
            b = _check_int("num_active_blocks", num_active_blocks)
            allowed = self.block_options(p)
            if b not in allowed:
                raise ValueError(
                    f"num_active_blocks={b} is not allowed for insertion_position={p}; allowed values: "
                    f"{_allowed(allowed)} (the {self.num_blocks} blocks, at most {self.max_dropped_blocks} dropped, "
                    f"and at least {self.min_blocks_after_insertion} from block p on always run)"
                )
        if not self.tiers:
            t = None
        return Knobs(tier=t, insertion_position=p, top_k=k if self.top_k_options else None, num_active_blocks=b)

    def validate(self, knobs: Knobs | dict[str, Any]) -> Knobs:
        """Validate a (possibly partial) tuple; returns it with ``None`` filled by the full setting."""
        if isinstance(knobs, Knobs):
            knobs = knobs.as_dict()
        unknown = set(knobs) - set(KNOB_NAMES)
        if unknown:
            raise ValueError(f"unknown knob {sorted(unknown)[0]!r}; knobs are: {', '.join(KNOB_NAMES)}")
        return self.resolve(**knobs)

    def full(self) -> Knobs:
        """The full configuration: every knob at the model's own setting."""
        return self.resolve()

    def is_full(self, knobs: Knobs) -> bool:
        k = self.validate(knobs)
        return (
            k.tier == self.full_tier
            and k.num_active_blocks == self.num_blocks
            and (k.top_k is None or k.top_k == self.default_top_k)
        )

    def all_configs(self) -> Iterator[Knobs]:
        """Every valid configuration (for sweeps, profiles and lookup tables)."""
        tiers = self.tiers or (None,)
        ks = self.top_k_options or (None,)
        for t, p, k in itertools.product(tiers, self.insertion_positions, ks):
            for b in self.block_options(p):
                yield Knobs(tier=t, insertion_position=p, top_k=k, num_active_blocks=b)

    def cheapest(self) -> Knobs:
        """Lowest tier, smallest top-k, fewest blocks (over every ``p``)."""
        best_p = min(self.insertion_positions, key=lambda p: (self.block_options(p)[0], p))
        return Knobs(
            tier=self.tiers[0] if self.tiers else None,
            insertion_position=best_p,
            top_k=self.top_k_options[0] if self.top_k_options else None,
            num_active_blocks=self.block_options(best_p)[0],
        )
