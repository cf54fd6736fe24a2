"""Figures as an operator reads them: binary byte units, short durations, "12 s ago"."""

from __future__ import annotations

from django import template

register = template.Library()

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


@register.filter
def iec_bytes(value: int | float | None) -> str:
    if value is None:
        return "–"
    size, unit = float(value), _UNITS[0]
    for unit in _UNITS:
        if abs(size) < 1024 or unit == _UNITS[-1]:
            break
        size /= 1024
    if unit == "B":
        return f"{int(size)} B"
    return f"{size:.3g} {unit}" if abs(size) < 1000 else f"{size:.0f} {unit}"


@register.filter
def duration(seconds: float | None) -> str:
    """0.0123 → "12.3 ms", 75 → "1 min 15 s", 93784 → "1 d 2 h"."""
    if seconds is None:
        return "–"
    if seconds < 1:
        return f"{seconds * 1000:.3g} ms"
    if seconds < 60:
        return f"{seconds:.3g} s"
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {secs} s"


@register.filter
def ago(timestamp: float | None, now: float) -> str:
    if not timestamp:
        return "never"
    seconds = max(0.0, now - timestamp)
    return "just now" if seconds < 1 else f"{duration(seconds)} ago"


@register.filter
def from_now(timestamp: float | None, now: float) -> str:
    if not timestamp:
        return "–"
    seconds = max(0.0, timestamp - now)
    return "now" if seconds < 1 else f"in {duration(round(seconds))}"


@register.filter
def percent(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}%"


@register.filter
def get_item(mapping: dict, key: str) -> object:
    return mapping.get(key) if mapping else None
