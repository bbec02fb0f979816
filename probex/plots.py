"""Plotly figures for the app: concept score bars and the weight–text map of a tree.

Pure functions of plain data (lists, arrays): the service decides what to show, these decide how it looks. Nothing
here reads files or runs models, so every figure can be built and checked in a test without a browser.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative

# Enough distinct hues that neighbouring classes rarely share a colour; a tree has up to a few hundred classes, so
# colours repeat — the hover text and the class-name labels disambiguate.
CLASS_COLOURS = qualitative.Dark24 + qualitative.Light24 + qualitative.Alphabet
MARK_STYLES = {  # what a highlighted point is → how it stands out on top of the known models
    "upload": dict(symbol="star", size=24, color="#e11d48", line=dict(color="white", width=2)),
    "query": dict(symbol="diamond", size=20, color="#2563eb", line=dict(color="white", width=2)),
}
FONT = dict(family="Inter, system-ui, sans-serif", size=13)


@dataclass
class Mark:
    """A point placed on the map at request time: the uploaded LoRA or a text query."""

    label: str
    x: float
    y: float
    kind: str = "upload"  # "upload" | "query"


def concept_bars(classes: list[dict], title: str = "Inferred concepts", score_label: str = "cosine score") \
        -> go.Figure:
    """Horizontal bars, best concept on top. ``classes``: [{"name", "score"}] in any order."""
    ranked = sorted(classes, key=lambda c: c["score"], reverse=True)
    names = [c["name"] for c in ranked][::-1]  # plotly draws the first category at the bottom
    scores = [float(c["score"]) for c in ranked][::-1]
    colours = ["#e2e8f0"] * len(scores)
    if colours:
        colours[-1] = "#e11d48"  # the winner
    fig = go.Figure(go.Bar(
        x=scores, y=names, orientation="h", marker_color=colours, text=[f"{s:.3f}" for s in scores],
        # outside the bar for positive scores; a negative bar's outside text would cover the class names
        textposition=["outside" if s >= 0 else "inside" for s in scores], insidetextanchor="start",
        cliponaxis=False,
        hovertemplate="%{y}<br>" + score_label + " %{x:.3f}<extra></extra>"))
    low = min([0.0, *scores])
    high = max([0.0, *scores])
    fig.update_layout(
        title=dict(text=title, x=0.0, xanchor="left"), font=FONT, template="plotly_white",
        height=max(220, 60 + 34 * len(names)), margin=dict(l=10, r=50, t=50, b=30),
        xaxis=dict(title=score_label, range=[low - 0.05 * abs(low), high + 0.18 * max(abs(high), 1e-6)],
                   zeroline=True),
        yaxis=dict(automargin=True), showlegend=False)
    return fig


def class_colour(index: int) -> str:
    return CLASS_COLOURS[index % len(CLASS_COLOURS)]


def weight_text_map(xy: np.ndarray, ids: list[str], classes: list[str], splits: list[str],
                    scores: list[float] | None = None, class_points: dict[str, tuple[float, float]] | None = None,
                    labelled: list[str] | None = None, marks: list[Mark] | None = None,
                    title: str = "Weight–text map") -> go.Figure:
    """The tree's known models (UMAP coordinates from the bundle) coloured by class, class-name points, and the
    request's marks on top. ``scores`` (similarity to the upload or query) go into the hover text when given.
    ``labelled``: the class names written on the map; the other class points show their name on hover only, so a
    tree of hundreds of classes stays readable."""
    xy = np.asarray(xy, dtype=float).reshape(-1, 2)
    vocabulary = sorted(set(classes))
    colour_of = {name: class_colour(i) for i, name in enumerate(vocabulary)}
    score_text = [f"{s:.3f}" for s in scores] if scores is not None else ["–"] * len(ids)
    fig = go.Figure(go.Scattergl(
        x=xy[:, 0], y=xy[:, 1], mode="markers", name="known models",
        marker=dict(size=8, color=[colour_of[c] for c in classes], opacity=0.8, line=dict(width=0)),
        customdata=np.column_stack([ids, classes, splits, score_text]) if len(ids) else None,
        hovertemplate=("<b>%{customdata[1]}</b><br>%{customdata[0]} (%{customdata[2]})"
                       "<br>similarity %{customdata[3]}<extra></extra>")))
    if class_points:
        add_class_points(fig, class_points, colour_of, set(labelled or []))
    for mark in marks or []:
        style = MARK_STYLES.get(mark.kind, MARK_STYLES["upload"])
        fig.add_trace(go.Scatter(
            x=[mark.x], y=[mark.y], mode="markers+text", name=mark.label, text=[mark.label],
            textposition="top center", textfont=dict(size=14, color=style["color"]), marker=style,
            hovertemplate=f"<b>{mark.label}</b><extra></extra>"))
    fig.update_layout(
        title=dict(text=title, x=0.0, xanchor="left"), font=FONT, template="plotly_white", height=560,
        margin=dict(l=10, r=10, t=50, b=10), hovermode="closest",
        legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0),
        xaxis=dict(visible=False), yaxis=dict(visible=False))  # UMAP axes carry no units: fill the width
    return fig


def add_class_points(fig: go.Figure, class_points: dict[str, tuple[float, float]], colour_of: dict[str, str],
                     labelled: set[str]) -> None:
    names = list(class_points)
    xy = np.array([class_points[n] for n in names], dtype=float).reshape(-1, 2)
    fig.add_trace(go.Scatter(
        x=xy[:, 0], y=xy[:, 1], mode="markers", name="class names",
        marker=dict(symbol="circle-open", size=11, color=[colour_of.get(n, "#64748b") for n in names]),
        customdata=names, hovertemplate="class <b>%{customdata}</b><extra></extra>"))
    shown = [i for i, n in enumerate(names) if n in labelled]
    if shown:
        fig.add_trace(go.Scatter(
            x=xy[shown, 0], y=xy[shown, 1], mode="text", text=[f"<b>{names[i]}</b>" for i in shown],
            showlegend=False, textposition="top center", textfont=dict(size=13, color="#1e293b"),
            hoverinfo="skip"))
