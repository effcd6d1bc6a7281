"""Plotly figure builders. They return figures; they never show them and set nothing at import time."""

from __future__ import annotations

import html
import math
from pathlib import Path

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from arithinterp._io import atomic_write_text


def _diverging_range(values) -> float:
    finite = [abs(v) for v in values if v == v and math.isfinite(v)]
    return max(finite + [1e-6])


def patching_heatmap(result, n_layers: int, n_heads: int, *, title: str) -> go.Figure:
    """Layer × head heatmap of normalised patching scores, with the MLP row beside it.

    Colours are diverging around 0 (no effect) with a symmetric range, so signs read the same everywhere;
    hovering shows the score and its 95% bootstrap interval.
    """
    grid = result.head_grid(n_layers, n_heads).tolist()
    mlp = result.mlp_row(n_layers).tolist()
    ci = {c.name: (float(lo), float(hi)) for c, lo, hi in zip(result.components, result.ci_low, result.ci_high)}
    vmax = _diverging_range([v for row in grid for v in row] + mlp)

    def text(name: str, value: float) -> str:
        lo, hi = ci.get(name, (float("nan"), float("nan")))
        return f"{name}<br>score {value:.3f}<br>95% CI [{lo:.3f}, {hi:.3f}]"

    head_text = [[text(f"L{layer}H{h}", grid[layer][h]) for h in range(n_heads)] for layer in range(n_layers)]
    mlp_text = [[text(f"MLP{layer}", mlp[layer])] for layer in range(n_layers)]
    fig = make_subplots(
        rows=1, cols=2, column_widths=[n_heads, max(1, n_heads // 4)], horizontal_spacing=0.06,
        subplot_titles=("attention heads (hook_z)", "MLPs"),
    )  # fmt: skip
    common = dict(colorscale="RdBu", zmid=0, zmin=-vmax, zmax=vmax, hoverinfo="text")
    fig.add_trace(go.Heatmap(z=grid, x=[f"H{h}" for h in range(n_heads)], y=[f"L{layer}" for layer in range(n_layers)],
                             text=head_text, colorbar=dict(title="score"), **common), 1, 1)  # fmt: skip
    fig.add_trace(go.Heatmap(z=[[v] for v in mlp], x=["MLP"], y=[f"L{layer}" for layer in range(n_layers)],
                             text=mlp_text, showscale=False, **common), 1, 2)  # fmt: skip
    for col in (1, 2):
        fig.update_yaxes(autorange="reversed", title_text="layer" if col == 1 else None, row=1, col=col)
    fig.update_xaxes(title_text="head", row=1, col=1)
    fig.update_layout(title=title, template="plotly_white", width=300 + 60 * n_heads, height=200 + 45 * n_layers)
    return fig


def write_html(path: str | Path, figures: list[go.Figure], *, title: str, header: str = "") -> Path:
    """Write figures into one self-contained HTML page (plotly.js inlined, so it works offline)."""
    parts = []
    for i, fig in enumerate(figures):
        parts.append(fig.to_html(full_html=False, include_plotlyjs=(i == 0)))
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
        f"<body style='font-family:sans-serif;max-width:1200px;margin:auto'><h2>{html.escape(title)}</h2>"
        f"{header}{''.join(parts)}</body></html>"
    )
    return atomic_write_text(path, page)
