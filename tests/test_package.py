"""The public API: what knob_grpo exports, and what the README imports from it."""

from __future__ import annotations

import inspect
import os
import re

import knob_grpo


def test_exports_resolve_and_are_documented():
    for name in knob_grpo.__all__:
        obj = getattr(knob_grpo, name)  # an AttributeError names a stale entry
        if inspect.isclass(obj) or inspect.isfunction(obj):
            assert inspect.getdoc(obj), f"knob_grpo.{name} has no docstring"


def test_every_name_the_readme_imports_from_knob_grpo_is_exported():
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    imported = set()
    for names in re.findall(r"^from knob_grpo import \(?([^)\n]+)", readme, flags=re.M):
        imported |= {n.strip() for n in names.split(",") if n.strip()}
    assert imported, "the README imports nothing from knob_grpo"
    assert imported <= set(knob_grpo.__all__), imported - set(knob_grpo.__all__)
