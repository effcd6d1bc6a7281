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


def _layer_head_figure(
    heads: list[list[float]], side: list[list[float]], *, side_x: list[str], head_text: list[list[str]],
    side_text: list[list[str]], colorbar: str, subplot_titles: tuple[str, str], side_width: int, title: str,
    margin: tuple[int, int], layer_title: str | None,
) -> go.Figure:  # fmt: skip
    """The layout the layer × head figures share: the heads' heatmap `heads[layer][head]` on the left, the
    per-layer columns `side[layer][column]` (MLPs, ...) on the right, both on one diverging colour scale
    symmetric around 0 (so signs read the same everywhere), layer 0 at the top, hover text from `head_text`
    and `side_text`, the layer axis titled `layer_title`. The figure is `margin` (width, height) plus 60 px
    per head and 45 px per layer.
    """
    n_layers, n_heads = len(heads), len(heads[0])
    vmax = _diverging_range([v for row in heads + side for v in row])
    fig = make_subplots(rows=1, cols=2, column_widths=[n_heads, side_width], horizontal_spacing=0.06,
                        subplot_titles=subplot_titles)  # fmt: skip
    common = dict(colorscale="RdBu", zmid=0, zmin=-vmax, zmax=vmax, hoverinfo="text")
    ys = [f"L{layer}" for layer in range(n_layers)]
    fig.add_trace(go.Heatmap(z=heads, x=[f"H{h}" for h in range(n_heads)], y=ys, text=head_text,
                             colorbar=dict(title=colorbar), **common), 1, 1)  # fmt: skip
    fig.add_trace(go.Heatmap(z=side, x=side_x, y=ys, text=side_text, showscale=False, **common), 1, 2)
    for col in (1, 2):
        fig.update_yaxes(autorange="reversed", title_text=layer_title if col == 1 else None, row=1, col=col)
    fig.update_layout(title=title, template="plotly_white", width=margin[0] + 60 * n_heads,
                      height=margin[1] + 45 * n_layers)  # fmt: skip
    return fig


def patching_heatmap(result, n_layers: int, n_heads: int, *, title: str) -> go.Figure:
    """Layer × head heatmap of normalised patching scores, with the MLP row beside it.

    Colours are diverging around 0 (no effect) with a symmetric range, so signs read the same everywhere;
    hovering shows the score and its 95% bootstrap interval.
    """
    grid = result.head_grid(n_layers, n_heads).tolist()
    mlp = result.mlp_row(n_layers).tolist()
    ci = {c.name: (float(lo), float(hi)) for c, lo, hi in zip(result.components, result.ci_low, result.ci_high)}

    def text(name: str, value: float) -> str:
        lo, hi = ci.get(name, (float("nan"), float("nan")))
        return f"{name}<br>score {value:.3f}<br>95% CI [{lo:.3f}, {hi:.3f}]"

    fig = _layer_head_figure(
        grid, [[v] for v in mlp], side_x=["MLP"], colorbar="score", side_width=max(1, n_heads // 4),
        head_text=[[text(f"L{layer}H{h}", grid[layer][h]) for h in range(n_heads)] for layer in range(n_layers)],
        side_text=[[text(f"MLP{layer}", mlp[layer])] for layer in range(n_layers)],
        subplot_titles=("attention heads (hook_z)", "MLPs"), title=title, margin=(300, 200), layer_title="layer",
    )  # fmt: skip
    fig.update_xaxes(title_text="head", row=1, col=1)
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


# ---------------------------------------------------------------------------------------------------------
# Direct logit attribution, logit lens, Fourier spectra, Fourier-filter errors (arithinterp.attribution/.fourier)


def dla_heatmap(
    dla, n_layers: int, n_heads: int, *, metric: str = "logit_diff", title: str, ranked: list[dict] | None = None
) -> go.Figure:
    """Layer × head heatmap of the mean direct logit attribution, with the MLP and attention-bias columns.

    Diverging colours around 0 with a symmetric range; hover shows the mean and its 95% bootstrap interval.
    Pass `ranked`, the records of `dla.ranked(metric)` (attribute.json's `components`), when you have them:
    the figure then shows the same bootstrap instead of running another (`dla` may then be None).
    """
    recs = {r["name"]: r for r in (ranked if ranked is not None else dla.ranked(metric))}
    grid = [[recs[f"L{layer}H{h}"]["mean"] for h in range(n_heads)] for layer in range(n_layers)]
    side = [[recs[f"MLP{layer}"]["mean"], recs[f"attn_bias{layer}"]["mean"]] for layer in range(n_layers)]

    def text(name: str) -> str:
        r = recs[name]
        return f"{name}<br>mean {r['mean']:.3f}<br>95% CI [{r['ci'][0]:.3f}, {r['ci'][1]:.3f}]"

    return _layer_head_figure(
        grid, side, side_x=["MLP", "attn bias"], colorbar="DLA", side_width=2,
        head_text=[[text(f"L{ly}H{h}") for h in range(n_heads)] for ly in range(n_layers)],
        side_text=[[text(f"MLP{ly}"), text(f"attn_bias{ly}")] for ly in range(n_layers)],
        subplot_titles=("attention heads", "MLP, attn bias"), title=title, margin=(360, 220), layer_title="layer",
    )  # fmt: skip


def residual_decomposition_bar(groups: list[dict], *, title: str, yaxis: str = "DLA") -> go.Figure:
    """Bars of the residual stream's parts (records `{name, mean, ci}`), with 95% intervals; they add up to
    the total logit (difference)."""
    names = [g["name"] for g in groups]
    mean = [g["mean"] for g in groups]
    fig = go.Figure(go.Bar(
        x=names, y=mean, marker_color=["#b2182b" if m < 0 else "#2166ac" for m in mean],
        error_y=dict(type="data", symmetric=False, array=[g["ci"][1] - g["mean"] for g in groups],
                     arrayminus=[g["mean"] - g["ci"][0] for g in groups]),
    ))  # fmt: skip
    fig.update_layout(title=title, template="plotly_white", yaxis_title=yaxis, height=380,
                      width=max(480, 60 * len(names)))  # fmt: skip
    return fig


def logit_lens_figure(summary: list[dict], *, title: str) -> go.Figure:
    """The answer read out after each stage: top-1 share and mean probability (left), mean logit difference
    (right axis, when there is one)."""
    stages = [s["stage"] for s in summary]
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Scatter(x=stages, y=[s["top1"] for s in summary], name="answer is top-1", mode="lines+markers"))
    fig.add_trace(go.Scatter(x=stages, y=[s["mean_prob"] for s in summary], name="mean P(answer)",
                             mode="lines+markers"))  # fmt: skip
    if "mean_logit_diff" in summary[0]:
        fig.add_trace(go.Scatter(x=stages, y=[s["mean_logit_diff"] for s in summary], name="mean logit diff",
                                 mode="lines+markers", line=dict(dash="dot")), secondary_y=True)  # fmt: skip
        fig.update_yaxes(title_text="logit difference", secondary_y=True)
    fig.update_yaxes(title_text="share / probability", range=[0, 1.02], secondary_y=False)
    fig.update_layout(title=title, template="plotly_white", xaxis_title="residual stream after", height=400)
    return fig


def fourier_spectra_figure(spectra: dict[str, dict], *, title: str, normalise: bool = True) -> go.Figure:
    """Power by frequency of several spectra (records of `fourier.Spectrum.record`), DC left out.

    With `normalise`, each curve is divided by its non-constant energy so shapes compare across components.
    The x axis is the frequency k; its labels give the period N/k.
    """
    fig = go.Figure()
    for name, rec in spectra.items():
        ks, power = rec["freqs"][1:], rec["power"][1:]
        total = sum(power) or 1.0
        fig.add_trace(go.Scatter(
            x=ks, y=[p / total for p in power] if normalise else power, name=name, mode="lines+markers",
            hovertext=[f"{name}: k={k}, period {rec['n'] / k:.3g}" for k in ks], hoverinfo="text+y",
        ))  # fmt: skip
    first = next(iter(spectra.values()), None)
    if first is not None:
        ks = first["freqs"][1:]
        step = max(1, len(ks) // 12)
        fig.update_xaxes(tickvals=ks[::step], ticktext=[f"{k}<br>T={first['n'] / k:.3g}" for k in ks[::step]])
    fig.update_layout(title=title, template="plotly_white", xaxis_title="frequency k (period T = N/k)",
                      yaxis_title="share of non-constant energy" if normalise else "power", height=420)  # fmt: skip
    return fig


def error_histogram(filters: list[dict], *, title: str, top: int = 15) -> go.Figure:
    """Grouped bars: how often each error (predicted - true answer) occurs under each Fourier filter.

    The `top` most common non-zero errors over all filters are shown ("none": not a number)."""
    counts: dict[str, int] = {}
    for f in filters:
        for k, v in f["error_histogram"].items():
            if k != "0":
                counts[k] = counts.get(k, 0) + v
    common = sorted(counts, key=lambda k: -counts[k])[:top]
    keys = sorted(common, key=lambda k: (k == "none", int(k) if k != "none" else 0))
    fig = go.Figure()
    for f in filters:
        n = sum(f["error_histogram"].values()) or 1
        fig.add_trace(go.Bar(x=keys, y=[f["error_histogram"].get(k, 0) / n for k in keys],
                             name=f"{f['filter']} (acc {f['accuracy']:.2f})"))  # fmt: skip
    fig.update_layout(title=title, template="plotly_white", barmode="group", xaxis_type="category", height=420,
                      xaxis_title="error = predicted - true answer", yaxis_title="share of examples")  # fmt: skip
    return fig


# ---------------------------------------------------------------------------------------------------------
# Localization (arithinterp.localize)


def circuit_scores_figure(circuit, n_layers: int, n_heads: int, *, title: str) -> go.Figure:
    """Layer × head heatmap (plus the MLP column) of every component's score; the chosen circuit is boxed."""
    grid = [[circuit.scores.get(f"L{layer}H{h}", float("nan")) for h in range(n_heads)] for layer in range(n_layers)]
    mlp = [[circuit.scores.get(f"MLP{layer}", float("nan"))] for layer in range(n_layers)]
    chosen = set(circuit.names)
    ys = [f"L{layer}" for layer in range(n_layers)]

    def text(name: str, v: float) -> str:
        return f"{name}<br>score {v:.3f}" + ("<br><b>in circuit</b>" if name in chosen else "")

    fig = _layer_head_figure(
        grid, mlp, side_x=["MLP"], colorbar="score", side_width=max(1, n_heads // 4),
        head_text=[[text(f"L{ly}H{h}", grid[ly][h]) for h in range(n_heads)] for ly in range(n_layers)],
        side_text=[[text(f"MLP{ly}", mlp[ly][0])] for ly in range(n_layers)],
        subplot_titles=("attention heads", "MLPs"), title=title, margin=(360, 220), layer_title=None,
    )  # fmt: skip
    marker = dict(symbol="square-open", size=26, color="black", line=dict(width=3))
    heads = [c for c in circuit.components if c.kind == "head"]
    mlps = [c for c in circuit.components if c.kind == "mlp"]
    fig.add_trace(go.Scatter(x=[f"H{c.head}" for c in heads], y=[f"L{c.layer}" for c in heads], mode="markers",
                             marker=marker, name="circuit", hoverinfo="skip"), 1, 1)  # fmt: skip
    fig.add_trace(go.Scatter(x=["MLP"] * len(mlps), y=[f"L{c.layer}" for c in mlps], mode="markers", marker=marker,
                             showlegend=False, hoverinfo="skip"), 1, 2)  # fmt: skip
    for col in (1, 2):  # the boxes must not reorder the layers
        fig.update_yaxes(categoryorder="array", categoryarray=ys, row=1, col=col)
    return fig


def faithfulness_curve_figure(curve: list[dict], *, chosen_k: int, target: float | None, title: str) -> go.Figure:
    """Faithfulness (and accuracy) of the top-k components alone, against k; the chosen size is marked."""
    ks = [p["k"] for p in curve]
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=ks, y=[p["faithfulness"] for p in curve], mode="lines+markers", name="faithfulness"))
    fig.add_trace(go.Scatter(x=ks, y=[p["accuracy"] for p in curve], mode="lines+markers", name="accuracy",
                             line=dict(dash="dot")))  # fmt: skip
    fig.add_vline(x=chosen_k, line_dash="dash", line_color="black", annotation_text=f"chosen: {chosen_k}")
    if target is not None:
        fig.add_hline(y=target, line_dash="dot", line_color="gray", annotation_text=f"target {target}")
    fig.update_layout(title=title, template="plotly_white", height=420, yaxis_title="value",
                      xaxis_title="circuit size k (top-k components kept, the rest ablated)")  # fmt: skip
    return fig


def knockout_vs_random_figure(necessity, *, title: str) -> go.Figure:
    """Histogram of accuracy with random same-size sets knocked out; lines for the circuit and the clean model."""
    fig = go.Figure()
    fig.add_trace(go.Histogram(x=necessity.random_accuracy.tolist(), nbinsx=30, name="random sets",
                               marker_color="lightgray"))  # fmt: skip
    fig.add_vline(x=necessity.knockout_accuracy, line_color="crimson", line_width=3,
                  annotation_text=f"circuit knocked out: {necessity.knockout_accuracy:.3f}")  # fmt: skip
    fig.add_vline(x=necessity.clean_accuracy, line_color="black", line_dash="dash", annotation_position="bottom left",
                  annotation_text=f"clean: {necessity.clean_accuracy:.3f}")  # fmt: skip
    fig.update_layout(title=title, template="plotly_white", height=420, xaxis_title="accuracy",
                      yaxis_title="random sets", xaxis_range=[-0.02, 1.02])  # fmt: skip
    return fig


def transfer_figure(transfer, *, title: str) -> go.Figure:
    """Overlap (Jaccard) of circuits located on each dataset, and each circuit's knockout effect on each."""
    names = transfer.names
    fig = make_subplots(rows=1, cols=2, column_widths=[0.4, 0.6], horizontal_spacing=0.15,
                        subplot_titles=("overlap (Jaccard) of the located circuits",
                                        "accuracy on each dataset"))  # fmt: skip
    ov = transfer.overlap.tolist()
    fig.add_trace(go.Heatmap(z=ov, x=names, y=names, zmin=0, zmax=1, colorscale="Blues",
                             text=[[f"{v:.2f}" for v in row] for row in ov], texttemplate="%{text}",
                             colorbar=dict(title="Jaccard", x=0.36)), 1, 1)  # fmt: skip
    fig.add_trace(go.Bar(x=names, y=transfer.clean_accuracy.tolist(), name="clean", marker_color="black"), 1, 2)
    for i, n in enumerate(names):
        fig.add_trace(go.Bar(x=names, y=transfer.knockout_accuracy[i].tolist(), name=f"circuit of {n} knocked out"),
                      1, 2)  # fmt: skip
        fig.add_trace(go.Bar(x=names, y=transfer.random_accuracy[i].tolist(), name=f"random sets of its size ({n})",
                             marker_pattern_shape="/"), 1, 2)  # fmt: skip
        fig.add_trace(go.Bar(x=names, y=transfer.heads_knockout_accuracy[i].tolist(),
                             name=f"only its heads knocked out ({n})", marker_pattern_shape="."), 1, 2)  # fmt: skip
    fig.update_yaxes(autorange="reversed", row=1, col=1)
    fig.update_yaxes(range=[0, 1.02], title_text="accuracy", row=1, col=2)
    fig.update_layout(title=title, template="plotly_white", barmode="group", height=460, width=1100)
    return fig


def head_attention_figure(patterns, names: list[str], labels: list[str], *, title: str) -> go.Figure:
    """Mean attention of each head from the final position to every prompt position (`patterns` [head, pos])."""
    z = [[float(v) for v in row] for row in patterns]
    fig = go.Figure(go.Heatmap(z=z, x=labels, y=names, zmin=0, zmax=1, colorscale="Viridis",
                               text=[[f"{v:.2f}" for v in row] for row in z], texttemplate="%{text}",
                               colorbar=dict(title="attention")))  # fmt: skip
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title=title, template="plotly_white", height=180 + 40 * len(names), width=900,
                      xaxis_title="key position (attended to)", yaxis_title="head")  # fmt: skip
    return fig


# ---------------------------------------------------------------------------------------------------------
# Selective fine-tuning (arithinterp.finetune)

_ARM_COLOURS = {"selective": "#1f77b4", "full": "#d62728", "random": "#7f7f7f", "lora": "#2ca02c"}


def finetune_comparison(record: dict) -> go.Figure:
    """One panel per measure (target accuracy, each transfer accuracy, retention): each arm's value after
    fine-tuning as a bar, the input model's value as a dashed line."""
    before, arms = record["before"], record["arms"]
    panels = [("target: " + record["data"]["target"], lambda r: r["target"])]
    panels += [(f"transfer: {k}", lambda r, k=k: r["transfer"][k]) for k in before["transfer"]]
    if before["retention"] is not None:
        ret = record["retention"]
        panels.append((f"retention: {ret['kind']} {ret['metric']}", lambda r: r["retention"]))
    fig = make_subplots(rows=1, cols=len(panels), subplot_titles=[t for t, _ in panels], horizontal_spacing=0.05)
    for col, (_, get) in enumerate(panels, 1):
        names = list(arms)
        fig.add_trace(go.Bar(x=names, y=[get(arms[a]["after"]) for a in names], showlegend=False,
                             marker_color=[_ARM_COLOURS.get(a, "#9467bd") for a in names],
                             hovertemplate="%{x}: %{y:.3f}<extra>after</extra>"), 1, col)  # fmt: skip
        fig.add_hline(y=get(before), line_dash="dash", line_color="black", row=1, col=col,
                      annotation_text="before" if col == 1 else None)  # fmt: skip
    fig.update_layout(title="After fine-tuning, per arm (dashed: before)", template="plotly_white",
                      height=380, width=max(500, 260 * len(panels)))  # fmt: skip
    return fig


def finetune_cost(record: dict) -> go.Figure:
    """Trainable parameters (log scale) and training wall time per arm."""
    arms = record["arms"]
    names = list(arms)
    colours = [_ARM_COLOURS.get(a, "#9467bd") for a in names]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("trainable parameters", "training time (s)"))
    fig.add_trace(go.Bar(x=names, y=[arms[a]["trainable_parameters"] for a in names], marker_color=colours,
                         showlegend=False), 1, 1)  # fmt: skip
    fig.add_trace(go.Bar(x=names, y=[arms[a]["train_time_s"] for a in names], marker_color=colours,
                         showlegend=False), 1, 2)  # fmt: skip
    fig.update_yaxes(type="log", row=1, col=1)
    fig.update_layout(title=f"Cost per arm (the model has {record['n_parameters']:,} parameters)",
                      template="plotly_white", height=360, width=800)  # fmt: skip
    return fig


def finetune_loss_curves(record: dict) -> go.Figure:
    """Training loss against optimiser step, one line per arm."""
    fig = go.Figure()
    for name, arm in record["arms"].items():
        log = arm.get("loss_log", [])
        fig.add_trace(go.Scatter(x=[e["step"] for e in log], y=[e["loss"] for e in log], mode="lines", name=name,
                                 line_color=_ARM_COLOURS.get(name)))  # fmt: skip
    fig.update_layout(title="Training loss", xaxis_title="step", yaxis_title="cross-entropy (answer tokens)",
                      yaxis_type="log", template="plotly_white", height=360, width=800)  # fmt: skip
    return fig


def finetune_figures(record: dict) -> list[go.Figure]:
    """The figures of finetune.html."""
    return [finetune_comparison(record), finetune_cost(record), finetune_loss_curves(record)]


# ---------------------------------------------------------------------------------------------------------
# Probes (arithinterp.probes)


def probe_layer_figure(result, *, title: str, positions: list[int] | None = None) -> go.Figure:
    """Held-out probe score against layer (hook), one line per position, its control dashed, chance dotted."""
    from arithinterp.probes import hook_label

    fig = go.Figure()
    x = [hook_label(h) for h in result.hooks]
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
               "#bcbd22", "#17becf"]  # fmt: skip
    for i, pos in enumerate(positions if positions is not None else result.positions):
        p = result.positions.index(pos)
        colour, name = palette[i % len(palette)], f"pos {pos} {result.position_labels[p]!r}"
        fig.add_trace(go.Scatter(x=x, y=result.score[:, p], name=name, mode="lines+markers", line=dict(color=colour),
                                 error_y=dict(type="data", array=result.std[:, p], visible=True)))  # fmt: skip
        for c, values in result.control.items():
            fig.add_trace(go.Scatter(x=x, y=values[:, p], name=f"{name} control ({c})", mode="lines",
                                     line=dict(color=colour, dash="dash"), opacity=0.6, showlegend=i == 0))  # fmt: skip
    fig.add_hline(y=result.chance, line=dict(color="grey", dash="dot"), annotation_text="chance")
    yaxis = "held-out " + ("accuracy" if result.metric == "accuracy" else "R²")
    fig.update_layout(title=title, template="plotly_white", xaxis_title="residual stream after (hook)",
                      yaxis_title=yaxis, height=450)  # fmt: skip
    return fig


def probe_heatmap(result, *, title: str) -> go.Figure:
    """Probe score per hook (rows) and position (columns); hover shows the control."""
    from arithinterp.probes import hook_label

    text = [[f"{h} @ pos {pos}<br>score {result.score[i, j]:.3f}<br>"
             + "<br>".join(f"control {c}: {v[i, j]:.3f}" for c, v in result.control.items())
             for j, pos in enumerate(result.positions)] for i, h in enumerate(result.hooks)]  # fmt: skip
    columns = [f"{p} {t!r}" for p, t in zip(result.positions, result.position_labels)]
    fig = go.Figure(go.Heatmap(z=result.score, x=columns,
                               y=[hook_label(h) for h in result.hooks], text=text, hoverinfo="text",
                               colorscale="Viridis", zmin=min(0.0, float(result.chance)), zmax=1.0,
                               colorbar=dict(title=result.metric)))  # fmt: skip
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title=title, template="plotly_white", xaxis_title="position (token of example 0)",
                      yaxis_title="hook", height=220 + 40 * len(result.hooks))  # fmt: skip
    return fig


def digit_fourier_figure(fits: dict, *, title: str) -> go.Figure:
    """Left: share of digit-dependent variance per frequency; right: median R² (Fourier, full, random control)."""
    fig = make_subplots(rows=1, cols=2, column_widths=[0.6, 0.4], horizontal_spacing=0.1,
                        subplot_titles=("spectrum (share of variance)", "median R² per row"))  # fmt: skip
    ks = [f"k={k}<br>T={10 / k:g}" for k in range(1, 6)]
    for name, fit in fits.items():
        fig.add_trace(go.Bar(x=ks, y=fit.spectrum, name=name), 1, 1)
    names = list(fits)
    for label, key in (("Fourier {10,5,2}", "median_r2"), ("full basis", "median_r2_full"),
                       ("random basis (control)", "control_r2")):  # fmt: skip
        fig.add_trace(go.Bar(x=names, y=[getattr(f, key) for f in fits.values()], name=label, legendgroup="r2"), 1, 2)
    fig.update_yaxes(range=[0, 1.02], row=1, col=2)
    fig.update_layout(title=title, template="plotly_white", barmode="group", height=430)
    return fig


def pca_figure(coords, labels, *, title: str, explained=None, text=None) -> go.Figure:
    """2-D scatter of PCA coordinates coloured by `labels` (with `text` beside each point if given)."""
    ev = list(explained) if explained is not None else [float("nan")] * 2
    fig = go.Figure(go.Scatter(
        x=coords[:, 0], y=coords[:, 1], mode="markers+text" if text is not None else "markers", text=text,
        textposition="top center", marker=dict(color=list(labels), colorscale="Turbo", showscale=True, size=7,
                                                colorbar=dict(title="value")),
        hovertext=[f"value {v}" for v in labels], hoverinfo="text",
    ))  # fmt: skip
    fig.update_layout(title=title, template="plotly_white", xaxis_title=f"PC1 ({ev[0]:.0%})",
                      yaxis_title=f"PC2 ({ev[1]:.0%})" if len(ev) > 1 else "PC2", height=450, width=560)  # fmt: skip
    return fig


def activation_norms_figure(norms, hooks: list[str], position_labels: list[str], *, title: str) -> go.Figure:
    """RMS activation per hook (rows) and stored position (columns): a first look at an activation store."""
    fig = go.Figure(go.Heatmap(z=norms, x=position_labels, y=hooks, colorscale="Viridis", colorbar=dict(title="RMS")))
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(title=title, template="plotly_white", xaxis_title="position", height=220 + 30 * len(hooks))
    return fig


def finetune_summary(summary: dict) -> go.Figure:
    """Multi-seed summary (benchmarks/finetune.py): per measure, each arm's mean after fine-tuning with its
    standard deviation over seeds as an error bar; the input model's value dashed."""
    measures, rows = summary["measures"], summary["rows"]
    arms = [a for a in rows if a != "before"]
    fig = make_subplots(rows=1, cols=len(measures), subplot_titles=measures, horizontal_spacing=0.05)
    for col, m in enumerate(measures, 1):
        fig.add_trace(go.Bar(x=arms, y=[rows[a][m][0] for a in arms], showlegend=False,
                             error_y=dict(type="data", array=[rows[a][m][1] for a in arms]),
                             marker_color=[_ARM_COLOURS.get(a, "#9467bd") for a in arms]), 1, col)  # fmt: skip
        fig.add_hline(y=rows["before"][m][0], line_dash="dash", line_color="black", row=1, col=col)
    fig.update_layout(title=f"Mean over seeds {summary['seeds']} (error bars: sd; dashed: before)",
                      template="plotly_white", height=380, width=max(500, 260 * len(measures)))  # fmt: skip
    return fig


def site_heatmap(result, *, title: str, position_labels: list[str] | None = None) -> go.Figure:
    """Sites × positions heatmap of normalised patching scores (activation patching per position).

    Rows are the patched activations (`L3H1.q`, `MLP2`, `L1.resid_pre`, ... in layer order), columns the
    patched position (`all` for all positions at once); hovering shows the score and its 95% interval.
    """
    rows: dict[str, dict[str, tuple[float, float, float]]] = {}
    cols: list[str] = []
    for c, s, lo, hi in zip(result.components, result.scores, result.ci_low, result.ci_high):
        row, _, pos = c.name.partition("@")
        pos = pos or "final"
        rows.setdefault(row, {})[pos] = (float(s), float(lo), float(hi))
        if pos not in cols:
            cols.append(pos)
    cols.sort(key=lambda p: (not p.isdigit(), int(p) if p.isdigit() else 0))
    labels = {p: (position_labels[int(p)] if position_labels and p.isdigit() else "") for p in cols}
    nan = (float("nan"),) * 3
    z = [[rows[r].get(p, nan)[0] for p in cols] for r in rows]
    text = [[f"{r}@{p}<br>score {rows[r].get(p, nan)[0]:.3f}<br>95% CI [{rows[r].get(p, nan)[1]:.3f}, "
             f"{rows[r].get(p, nan)[2]:.3f}]" for p in cols] for r in rows]  # fmt: skip
    vmax = _diverging_range([v for row in z for v in row])
    x = [f"{p} {labels[p]!r}" if labels[p] else p for p in cols]
    fig = go.Figure(go.Heatmap(z=z, x=x, y=list(rows), text=text, hoverinfo="text", colorscale="RdBu", zmid=0,
                               zmin=-vmax, zmax=vmax, colorbar=dict(title="score")))  # fmt: skip
    fig.update_yaxes(autorange="reversed", title_text="patched activation")
    fig.update_xaxes(title_text="position")
    fig.update_layout(title=title, template="plotly_white", width=300 + 50 * len(cols),
                      height=200 + 18 * len(rows))  # fmt: skip
    return fig


def path_graph(edges: list[dict], n_layers: int, n_heads: int, *, title: str, max_edges: int = 80) -> go.Figure:
    """Senders → receivers: a layered picture of path-patching (or edge-attribution) results.

    `edges` are records with `sender` and `receiver` names (`L0H1`, `MLP0`; `L2H3.q`, `MLP1`, `logits`) and
    a signed `value` (the effect: normalised score, minus 1 when noising). Heads sit in columns by layer
    (one row per head), each MLP just right of its layer's heads, the logits at the right end. A line joins
    sender and receiver, its width proportional to |value|, red for positive and blue for negative; the
    receiving input is drawn solid (query), dashed (key), dotted (value) or solid (MLP input, logits).
    The `max_edges` largest edges are drawn.
    """
    import re

    def where(name: str) -> tuple[float, float]:
        name = name.split(".")[0]
        if name == "logits":
            return 2 * n_layers, (n_heads - 1) / 2
        if m := re.fullmatch(r"MLP(\d+)", name):
            return 2 * int(m[1]) + 1, (n_heads - 1) / 2
        m = re.fullmatch(r"L(\d+)H(\d+)", name)
        return 2 * int(m[1]), int(m[2])

    shown = sorted(edges, key=lambda e: -abs(e["value"]))[:max_edges]
    vmax = _diverging_range([e["value"] for e in shown])
    fig = go.Figure()
    dash = {"q": "solid", "k": "dash", "v": "dot"}
    for e in shown:
        (x0, y0), (x1, y1) = where(e["sender"]), where(e["receiver"])
        inp = e["receiver"].split(".")[1] if "." in e["receiver"] else ""
        colour = "rgba(200,30,30,0.75)" if e["value"] >= 0 else "rgba(30,60,200,0.75)"
        fig.add_trace(go.Scatter(
            x=[x0, (x0 + x1) / 2, x1], y=[y0, (y0 + y1) / 2 + 0.15 * (x1 - x0) ** 0.5, y1], mode="lines",
            line=dict(width=1 + 8 * abs(e["value"]) / vmax, color=colour, dash=dash.get(inp, "solid"), shape="spline"),
            hoverinfo="text", text=f"{e['sender']} → {e['receiver']}: {e['value']:.3f}", showlegend=False,
        ))  # fmt: skip
    used = {e["sender"] for e in shown} | {e["receiver"].split(".")[0] for e in shown}
    names = [f"L{layer}H{h}" for layer in range(n_layers) for h in range(n_heads)]
    names += [f"MLP{layer}" for layer in range(n_layers)] + ["logits"]
    xy = [where(n) for n in names]
    fig.add_trace(go.Scatter(
        x=[p[0] for p in xy], y=[p[1] for p in xy], mode="markers+text", text=[n if n in used else "" for n in names],
        textposition="top center", hovertext=names, hoverinfo="text", showlegend=False,
        marker=dict(size=[14 if n in used else 7 for n in names],
                    symbol=["square" if n[:3] == "MLP" else "diamond" if n == "logits" else "circle" for n in names],
                    color=["black" if n in used else "lightgray" for n in names]),
    ))  # fmt: skip
    for inp, style in (("query", "solid"), ("key", "dash"), ("value", "dot")):
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", line=dict(color="gray", dash=style),
                                 name=f"into {inp}"))  # fmt: skip
    ticks = [2 * layer for layer in range(n_layers)] + [2 * layer + 1 for layer in range(n_layers)] + [2 * n_layers]
    labels = [f"L{layer} heads" for layer in range(n_layers)] + [f"MLP{layer}" for layer in range(n_layers)]
    labels.append("logits")
    fig.update_xaxes(tickvals=ticks, ticktext=labels, showgrid=False, zeroline=False)
    fig.update_yaxes(title_text="head", autorange="reversed", showgrid=False, zeroline=False)
    fig.update_layout(title=title, template="plotly_white", width=300 + 120 * n_layers, height=250 + 35 * n_heads)
    return fig


# ---------------------------------------------------------------------------------------------------------
# Training runs (arithinterp.mul4)


def internalization_figure(runs: dict[str, list[dict]], *, origins: dict[str, int] | None = None,
                           title: str = "Stepwise internalization") -> go.Figure:  # fmt: skip
    """Stepwise-internalization runs over training, from their logs (`mul4.run_log`). Top: at every evaluation,
    the share of 500 held-out problems whose whole remaining target (chain of thought, "=", answer) is exact
    under teacher forcing (solid), and whose 8 answer digits are (dotted), in that stage's own format. Bottom:
    the chain-of-thought tokens the stage removes. A run's steps are shifted by `origins[name]` (e.g.
    `mul4.run_origin`), so that a warm-started run lines up with the run it continues."""
    origins = origins or {}
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, row_heights=[0.7, 0.3], vertical_spacing=0.06)
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    for i, (name, log) in enumerate(runs.items()):
        colour, shift = palette[i % len(palette)], origins.get(name, 0)
        evals = [e for e in log if "eval_exact_match" in e]
        xs = [e["step"] + shift for e in evals]
        hover = [f"{name}<br>step {x:,}, stage {e['stage']} ({e['removed']} removed)" for x, e in zip(xs, evals)]
        fig.add_trace(go.Scatter(x=xs, y=[e["eval_exact_match"] for e in evals], mode="lines", name=f"{name}: whole",
                                 line=dict(color=colour), text=hover, hovertemplate="%{text}<br>whole %{y:.3f}"),
                      row=1, col=1)  # fmt: skip
        fig.add_trace(go.Scatter(x=xs, y=[e["eval_answer_exact_match"] for e in evals], mode="lines",
                                 name=f"{name}: answer", line=dict(color=colour, dash="dot", width=1), text=hover,
                                 hovertemplate="%{text}<br>answer %{y:.3f}"), row=1, col=1)  # fmt: skip
        fig.add_trace(go.Scatter(x=[e["step"] + shift for e in log], y=[e["removed"] for e in log], mode="lines",
                                 line=dict(color=colour, shape="hv"), name=f"{name}: removed", showlegend=False),
                      row=2, col=1)  # fmt: skip
    fig.update_yaxes(title_text="exact (teacher forcing)", range=[0, 1.02], row=1, col=1)
    fig.update_yaxes(title_text="CoT tokens removed", row=2, col=1)
    fig.update_xaxes(title_text="training step", row=2, col=1)
    fig.update_layout(title=title, template="plotly_white", height=620, width=1000)
    return fig
