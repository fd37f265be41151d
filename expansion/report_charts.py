"""The report's charts: matplotlib figures drawn on a fresh `Figure` (no pyplot, no global
state) and rendered by its SVG backend to inline SVG — text kept as text, no metadata, every id
prefixed with the chart's name so several charts can share one HTML page. Bars and heat-map cells
link to their trail pages (`set_url`). Charts carry no customer-supplied strings. Money stays
`Decimal` until here, where matplotlib needs floats.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Callable, Sequence
from decimal import Decimal
from typing import Any

from billing.records import CONTRACTION_SUBTYPES, EXPANSION_SUBTYPES
from expansion.report_model import TRAIL_METRICS, ReportModel, cohort_url, period_url, trail_url

CHART_MONTHS = 24  # the charts show the latest 24 months; the tables show every period


COLORS = {
    "start": "#4c72b0", "end": "#4c72b0", "fx": "#8172b2", "up": "#55a868", "down": "#c44e52",
    "new": "#4c72b0", "reactivation": "#64b5cd", "churn": "#8c1c13",
    "expansion.seat": "#2e7d32", "expansion.upgrade": "#66bb6a", "expansion.add_on": "#9ccc65",
    "expansion.usage": "#26a69a", "expansion.cross_sell": "#00897b", "expansion.discount_end": "#c0ca33",
    "contraction.seat": "#e53935", "contraction.downgrade": "#ef6c00", "contraction.add_on": "#ffa726",
    "contraction.usage": "#d81b60", "contraction.cancel": "#8e24aa", "contraction.discount": "#f06292",
}


def _float(value: object) -> float:
    """A metric value for drawing (nan for null); money stays Decimal until here."""
    return float("nan") if value is None else float(Decimal(str(value)))


def chart_svg(draw: Callable[[Any], None], *, name: str, width: float, height: float) -> str:
    """Draw on a fresh matplotlib Figure (no pyplot, no global state) and return its SVG, the
    XML prolog and DOCTYPE removed so it can sit inline in HTML."""
    import matplotlib
    from matplotlib.backends.backend_svg import FigureCanvasSVG
    from matplotlib.figure import Figure

    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": name, "font.size": 9,
                                "font.family": "DejaVu Sans", "axes.spines.top": False,
                                "axes.spines.right": False}):
        fig = Figure(figsize=(width, height), layout="constrained")
        FigureCanvasSVG(fig)
        draw(fig)
        buffer = io.StringIO()
        # no RDF metadata block (it carries the date and namespace URLs nobody needs inline)
        fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    text = buffer.getvalue()
    text = text[text.index("<svg"):]
    # several charts share one HTML document: give every id (and every reference to one) the
    # chart's name, so `figure_1`, `axes_1`, … stay unique
    text = _SVG_ID.sub(lambda m: f'{m[1]}="{name}-{m[2]}"', text)
    text = _SVG_REF.sub(lambda m: f"{m[1]}#{name}-{m[2]}", text)
    return text


_SVG_ID = re.compile(r'\b(id)="([^"]+)"')
_SVG_REF = re.compile(r'(xlink:href="|url\()#([^")]+)')


def _money_axis(ax: Any) -> None:
    from matplotlib.ticker import FuncFormatter

    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:,.0f}"))
    ax.grid(axis="y", color="#e5e5e5", linewidth=0.6)
    ax.set_axisbelow(True)


def bridge_chart(model: ReportModel) -> str:
    """The MRR bridge as a waterfall per month (small multiples, the latest CHART_MONTHS)."""
    rows = model.metrics["month"][-CHART_MONTHS:]
    ncols = 4
    nrows = max(1, math.ceil(len(rows) / ncols))
    steps = ("Start", "New", "Exp", "React", "Contr", "Churn", "FX", "End")

    def draw(fig: Any) -> None:
        axes = fig.subplots(nrows, ncols, squeeze=False)
        for i, ax in enumerate(axes.flat):
            if i >= len(rows):
                ax.set_visible(False)
                continue
            row = rows[i]
            label = row["period"]
            values = [_float(row["starting_mrr"]), _float(row["new"]), _float(row["expansion"]),
                      _float(row["reactivation"]), -_float(row["contraction"]), -_float(row["churn"]),
                      _float(row["fx_impact"]), _float(row["ending_mrr"])]
            urls = [period_url(label), trail_url("new", label), trail_url("expansion", label),
                    trail_url("reactivation", label), trail_url("contraction", label), trail_url("churn", label),
                    period_url(label), period_url(label)]
            level = 0.0
            for j, (step, value) in enumerate(zip(steps, values, strict=True)):
                if step in ("Start", "End"):
                    bottom, height, color = 0.0, value, COLORS["start"]
                    level = value
                else:
                    bottom = level if value >= 0 else level + value
                    height = abs(value)
                    color = COLORS["fx"] if step == "FX" else COLORS["up"] if value >= 0 else COLORS["down"]
                    level += value
                [bar] = ax.bar([j], [height], bottom=[bottom], color=color, width=0.7)
                bar.set_url(urls[j])
            levels = [0.0]
            for value in values[1:-1]:
                levels.append(levels[-1] + value)
            levels = [values[0] + v for v in levels] + [values[-1]]
            low, high = min(levels), max(levels)
            pad = max((high - low) * 0.25, abs(high) * 0.02, 1.0)
            # zoom on the moves (the start and end bars run off the bottom when it is above 0)
            ax.set_ylim(max(0.0, low - pad) if low >= 0 else low - pad, high + pad)
            ax.set_xticks(range(len(steps)), steps, fontsize=6)
            ax.set_title(f"{label}: {_float(row['ending_mrr']):,.0f} {model.rep}", fontsize=8)
            ax.tick_params(axis="y", labelsize=6)
            _money_axis(ax)

    return chart_svg(draw, name="bridge", width=11, height=2.1 * nrows + 0.3)


def _component_values(model: ReportModel, labels: Sequence[str]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for metric in TRAIL_METRICS:
        if metric.type in ("expansion", "contraction") and metric.subtype is None:
            continue
        out[metric.label] = [float(model.trails[(metric.label, label)].total) for label in labels]
    return out


def movements_chart(model: ReportModel) -> str:
    """Movements per month stacked by type and subtype: gains up, losses down."""
    labels = [r["period"] for r in model.metrics["month"][-CHART_MONTHS:]]
    values = _component_values(model, labels)
    ups = ["new", *(f"expansion.{s}" for s in EXPANSION_SUBTYPES), "reactivation"]
    downs = [*(f"contraction.{s}" for s in CONTRACTION_SUBTYPES), "churn"]

    def draw(fig: Any) -> None:
        ax = fig.subplots()
        x = list(range(len(labels)))
        for group, sign in ((ups, 1.0), (downs, -1.0)):
            bottoms = [0.0] * len(labels)
            for component in group:
                heights = [sign * v for v in values[component]]
                if not any(heights):
                    continue
                bars = ax.bar(x, heights, bottom=bottoms, color=COLORS[component], label=component, width=0.7)
                for k, bar in enumerate(bars):
                    bar.set_url(trail_url(component, labels[k]))
                bottoms = [b + h for b, h in zip(bottoms, heights, strict=True)]
        ax.axhline(0, color="#333333", linewidth=0.8)
        ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel(f"MRR moved ({model.rep})")
        _money_axis(ax)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)

    return chart_svg(draw, name="movements", width=11, height=3.6)


def expansion_chart(model: ReportModel) -> str:
    """Expansion by subtype over time (stacked areas)."""
    rows = model.metrics["month"][-CHART_MONTHS:]
    labels = [r["period"] for r in rows]

    def draw(fig: Any) -> None:
        ax = fig.subplots()
        x = list(range(len(labels)))
        series = [[_float(r["expansion_by_subtype"][s]) for r in rows] for s in EXPANSION_SUBTYPES]
        ax.stackplot(x, series, labels=list(EXPANSION_SUBTYPES),
                     colors=[COLORS[f"expansion.{s}"] for s in EXPANSION_SUBTYPES], alpha=0.9)
        ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel(f"expansion MRR ({model.rep})")
        ax.set_xlim(-0.2, max(len(labels) - 0.8, 0.2))
        _money_axis(ax)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)

    return chart_svg(draw, name="expansion", width=11, height=3.2)


def arpea_chart(model: ReportModel) -> str:
    """ARPEA (bars) and the expansion growth rate (line, right axis)."""
    rows = model.metrics["month"][-CHART_MONTHS:]
    labels = [r["period"] for r in rows]

    def draw(fig: Any) -> None:
        ax = fig.subplots()
        x = list(range(len(labels)))
        arpea = [_float(r["arpea"]) for r in rows]
        bars = ax.bar(x, [0.0 if math.isnan(v) else v for v in arpea], color=COLORS["expansion.seat"],
                      width=0.6, label=f"ARPEA ({model.rep})")
        for k, bar in enumerate(bars):
            bar.set_url(trail_url("expansion", labels[k]))
        ax.set_ylabel(f"ARPEA ({model.rep})")
        _money_axis(ax)
        ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=7)
        right = ax.twinx()
        right.plot(x, [_float(r["expansion_growth_rate"]) for r in rows], color="#dd8452", marker="o",
                   linewidth=1.5, label="expansion growth rate (%)")
        right.set_ylabel("expansion growth rate (%)")
        right.axhline(0, color="#dd8452", linewidth=0.6, linestyle=":")
        handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
        names = ax.get_legend_handles_labels()[1] + right.get_legend_handles_labels()[1]
        ax.legend(handles, names, loc="upper left", fontsize=7, frameon=False)

    return chart_svg(draw, name="arpea", width=11, height=3.0)


def retention_chart(model: ReportModel) -> str:
    """NRR and GRR per month, with the 100 % line."""
    rows = model.metrics["month"][-CHART_MONTHS:]
    labels = [r["period"] for r in rows]

    def draw(fig: Any) -> None:
        ax = fig.subplots()
        x = list(range(len(labels)))
        ax.plot(x, [_float(r["nrr"]) for r in rows], marker="o", color="#4c72b0", label="NRR (%)")
        ax.plot(x, [_float(r["grr"]) for r in rows], marker="s", color="#c44e52", label="GRR (%)")
        ax.axhline(100, color="#777777", linewidth=0.8, linestyle="--")
        ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=7)
        ax.set_ylabel("% of starting MRR")
        ax.grid(axis="y", color="#e5e5e5", linewidth=0.6)
        ax.legend(loc="lower left", fontsize=7, frameon=False)

    return chart_svg(draw, name="retention", width=11, height=3.0)


def cohort_chart(model: ReportModel) -> str:
    """Heat map: signup month × months since, net MRR retention (%)."""
    cohorts = model.cohorts[-CHART_MONTHS:]
    width = max((len(c.net) for c in cohorts), default=1)

    def draw(fig: Any) -> None:
        from matplotlib import colormaps
        from matplotlib.colors import TwoSlopeNorm
        from matplotlib.patches import Rectangle

        ax = fig.subplots()
        values = [float(v) for c in cohorts for v in c.net if v is not None]
        low = min([*values, 50.0])
        high = max([*values, 150.0])
        norm = TwoSlopeNorm(vmin=low, vcenter=100.0, vmax=high)
        cmap = colormaps["RdYlGn"]
        for row, cohort in enumerate(cohorts):
            for k, value in enumerate(cohort.net):
                y = len(cohorts) - 1 - row
                color = "#eeeeee" if value is None else cmap(norm(float(value)))
                cell = Rectangle((k, y), 1, 1, facecolor=color, edgecolor="white", linewidth=1)
                cell.set_url(cohort_url(cohort.month.label))
                ax.add_patch(cell)
                text = "–" if value is None else f"{float(value):.0f}%"
                ax.text(k + 0.5, y + 0.5, text, ha="center", va="center", fontsize=7)
        ax.set_xlim(0, width)
        ax.set_ylim(0, max(len(cohorts), 1))
        ax.set_xticks([k + 0.5 for k in range(width)], [str(k) for k in range(width)], fontsize=7)
        ax.set_yticks([len(cohorts) - 1 - r + 0.5 for r in range(len(cohorts))],
                      [c.month.label for c in cohorts], fontsize=7)
        ax.set_xlabel("months since signup")
        ax.set_ylabel("signup month")
        ax.spines[["left", "bottom"]].set_visible(False)
        ax.tick_params(length=0)

    return chart_svg(draw, name="cohorts", width=min(11.0, 2.0 + 0.55 * width),
                     height=max(1.6, 0.8 + 0.32 * len(cohorts)))
