"""Small SVG line charts, computed here and drawn by ``ops/_chart.html``: no charting library, no script."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

PALETTE = ("#3454d1", "#d1495b", "#1e7a46", "#a86500", "#7b3fb3", "#0f7c8c", "#c2185b", "#5d6b1f")
Point = tuple[float, float | None]  # (x, y); y None = no value (a gap in the line)


@dataclass
class Tick:
    at: float  # pixels along the axis
    label: str
    anchor: str = "middle"  # SVG text-anchor: the first and last x labels stay inside the chart


@dataclass
class Line:
    label: str
    color: str
    path: str  # SVG path data; one subpath per run of values without gaps
    dots: list[tuple[float, float]]  # a lone value between gaps is drawn as a dot
    latest: str


@dataclass
class Chart:
    title: str
    lines: list[Line]
    y_ticks: list[Tick]
    x_ticks: list[Tick]
    subtitle: str = ""
    show_latest: bool = True  # the latest value of each line next to the title
    width: int = 640
    height: int = 150
    left: int = 48
    right: int = 10
    top: int = 8
    bottom: int = 20
    note: str = ""
    legend: bool = field(default=False)

    @property
    def plot_right(self) -> int:
        return self.width - self.right

    @property
    def plot_bottom(self) -> int:
        return self.height - self.bottom

    @property
    def center_x(self) -> float:
        return (self.left + self.plot_right) / 2

    @property
    def center_y(self) -> float:
        return (self.top + self.plot_bottom) / 2

    @property
    def is_empty(self) -> bool:
        return not any(line.path or line.dots for line in self.lines)


def nice_ceiling(value: float) -> float:
    """The smallest of 1, 2, 2.5, 5 × 10^k at or above value (1 for nothing)."""
    if value <= 0 or not math.isfinite(value):
        return 1.0
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if step * power >= value * (1 - 1e-9):
            return step * power
    return 10 * power


def short_number(value: float | None) -> str:
    """Three significant digits, with k / M for large values."""
    if value is None:
        return "–"
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.3g}{suffix}"
    return f"{value:.3g}" if value else "0"


def line_chart(
    *,
    title: str,
    series: dict[str, Sequence[Point]],
    x_range: tuple[float, float],
    x_ticks: Sequence[tuple[float, str]],
    max_gap: float | None = None,
    unit: str = "",
    value_format: Callable[[float | None], str] = short_number,
    subtitle: str = "",
    note: str = "",
    show_latest: bool = True,
) -> Chart:
    """Lines over a shared x range (e.g. unix time) from 0 up to a round maximum.

    ``max_gap``: two points further apart than this are not joined (an engine that was down).
    """
    chart = Chart(title=title, lines=[], y_ticks=[], x_ticks=[], subtitle=subtitle, note=note,
                  legend=len(series) > 1, show_latest=show_latest)
    x0, x1 = x_range
    values = [y for points in series.values() for _x, y in points if y is not None]
    y_max = nice_ceiling(max(values, default=0.0))
    plot_w, plot_h = chart.plot_right - chart.left, chart.plot_bottom - chart.top

    def px(x: float) -> float:
        return round(chart.left + (x - x0) / (x1 - x0 or 1) * plot_w, 1)

    def py(y: float) -> float:
        return round(chart.plot_bottom - y / y_max * plot_h, 1)

    for index, (label, points) in enumerate(series.items()):
        runs: list[list[tuple[float, float]]] = [[]]
        last_x = None
        for x, y in sorted(points, key=lambda p: p[0]):
            if not x0 <= x <= x1:
                continue
            if y is None or (max_gap is not None and last_x is not None and x - last_x > max_gap):
                runs.append([])
            if y is not None:
                runs[-1].append((px(x), py(y)))
            last_x = x
        path = " ".join("M" + " L".join(f"{a},{b}" for a, b in run) for run in runs if len(run) > 1)
        dots = [run[0] for run in runs if len(run) == 1]
        latest = next((y for _x, y in sorted(points, key=lambda p: p[0], reverse=True) if y is not None), None)
        text = value_format(latest) + (f" {unit}" if unit and latest is not None else "")
        chart.lines.append(Line(label, PALETTE[index % len(PALETTE)], path, dots, text))
    chart.y_ticks = [Tick(py(y_max * f), value_format(y_max * f)) for f in (0, 0.5, 1)]
    chart.x_ticks = [Tick(px(x), text) for x, text in x_ticks if x0 <= x <= x1]
    for tick in chart.x_ticks:
        if tick.at > chart.plot_right - 20:
            tick.anchor = "end"
        elif tick.at < chart.left + 20:
            tick.anchor = "start"
    return chart


def recent_ticks(now: float, seconds: float, most: int = 6) -> list[tuple[float, str]]:
    """Ticks back from now at a round step, at most ``most`` of them before now: "-15 min" … "now"."""
    every = next((step for step in (10, 15, 30, 60, 120, 300, 600, 900) if seconds / step <= most), 3600)
    ticks = [(now, "now")]
    back = every
    while back <= seconds + 1e-6:
        ticks.append((now - back, f"-{back // 60:g} min" if back >= 60 else f"-{back:g} s"))
        back += every
    return ticks[::-1]
