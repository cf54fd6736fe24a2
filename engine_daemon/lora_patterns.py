"""PEFT's ``rank_pattern`` / ``alpha_pattern`` keys, matched in bounded time.

A key is a regular expression the uploader wrote. PEFT's rule, kept here token for token: for a
module path such as ``model.layers.3.self_attn.q_proj``, the first key (in the config's order)
for which ``(.*\\.)?(<key>)$`` matches the whole path wins; no key means the config's ``r`` /
``lora_alpha``. Python's ``re`` can backtrack for hours on a key such as ``.*.*.*.*.*.*.*.*Z``,
so keys are matched with the ``regex`` engine under one time budget for the whole adapter, and a
key that matches none of the adapter's modules is refused by name (it would silently do nothing).

Only the upload's validation calls this: the engine loads the per-module ranks and scalings the
validation wrote into ``manifest.json`` and never sees a pattern.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import regex

MAX_PATTERN_KEYS = 4096  # 80 layers x 7 projections, named one by one, fit with room to spare
MAX_PATTERN_KEY_CHARS = 512
MATCH_BUDGET_SECONDS = 2.0  # all keys against all module paths of one adapter


class PatternError(ValueError):
    """A pattern key we refuse; the message names the key and the fix."""


def pattern_values(
    pattern: dict[str, Any], paths: Sequence[str], *, field: str, budget_seconds: float | None = None
) -> dict[str, Any]:
    """``path → value`` for every path some key matches (PEFT's first-match rule), in bounded time."""
    if len(pattern) > MAX_PATTERN_KEYS:
        raise PatternError(f"{field} has {len(pattern)} keys; at most {MAX_PATTERN_KEYS} are accepted")
    if budget_seconds is None:
        budget_seconds = MATCH_BUDGET_SECONDS  # read at call time: the validation child sets its own
    deadline = time.monotonic() + budget_seconds
    compiled = [(key, _compile(key, field), value) for key, value in pattern.items()]
    found: dict[str, Any] = {}
    used: set[str] = set()
    for path in paths:
        for key, matcher, value in compiled:
            if _matches(matcher, path, deadline, key=key, field=field, budget_seconds=budget_seconds):
                found[path] = value
                used.add(key)
                break
    unused = [key for key, _, _ in compiled if key not in used]
    for key, matcher, _ in compiled:  # a key shadowed by an earlier one still has to name a module
        if key in unused and any(
            _matches(matcher, path, deadline, key=key, field=field, budget_seconds=budget_seconds) for path in paths
        ):
            unused.remove(key)
    if unused:
        raise PatternError(
            f"{field} key {unused[0]!r} matches none of the adapter's modules (e.g. {paths[0]!r}); "
            "remove it, or name a module path that the adapter's weights adapt"
        )
    return found


def _compile(key: Any, field: str) -> regex.Pattern:
    if not isinstance(key, str) or not key:
        raise PatternError(f"{field} keys must be non-empty module paths or regular expressions, got {key!r}")
    if len(key) > MAX_PATTERN_KEY_CHARS:
        raise PatternError(
            f"{field} key {key[:40]!r}... is {len(key)} characters; at most {MAX_PATTERN_KEY_CHARS} are accepted"
        )
    try:
        return regex.compile(rf"(.*\.)?({key})$")
    except (regex.error, OverflowError, RecursionError) as exc:
        raise PatternError(f"{field} key {key!r} is not a valid regular expression ({exc})") from None


def _matches(matcher: regex.Pattern, path: str, deadline: float, *, key: str, field: str, budget_seconds: float) -> bool:
    left = deadline - time.monotonic()
    try:
        if left <= 0:
            raise TimeoutError
        return matcher.match(path, timeout=left) is not None
    except TimeoutError:
        raise PatternError(
            f"{field} key {key!r} takes too long to match (the adapter's keys get {budget_seconds:g} s in all); "
            "PEFT names modules by plain paths such as 'model.layers.0.self_attn.q_proj' or 'q_proj': use those"
        ) from None
