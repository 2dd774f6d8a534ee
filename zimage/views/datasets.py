"""The Datasets page's charts and check tables, as plain functions (no streamlit here).

size_chart     a bar chart of image counts per "WxH" size, the sizes in pixel-count order (or as given)
check_models   the local base models whose tokenizer can count caption tokens
"""

from __future__ import annotations

from pathlib import Path

import altair as alt
import pandas as pd

from zimage.data.stats import size_key
from zimage.settings import Settings


def size_chart(counts: dict[str, int], label: str, by_size: bool = True) -> alt.Chart:
    """Images per size as bars, left to right from the fewest pixels to the most (not in text order, where
    "1024x1024" would come before "256x256"); `by_size=False` keeps the order of `counts` (caption bins)."""
    order = sorted(counts, key=size_key) if by_size else list(counts)
    frame = pd.DataFrame({label: order, "images": [counts[k] for k in order]})
    return (
        alt.Chart(frame)
        .mark_bar()
        .encode(
            x=alt.X(f"{label}:N", sort=order, title=label, axis=alt.Axis(labelAngle=-45)),
            y=alt.Y("images:Q", title="images", axis=alt.Axis(tickMinStep=1)),
            tooltip=[alt.Tooltip(f"{label}:N"), alt.Tooltip("images:Q")],
        )
    )


def check_models(settings: Settings) -> dict[str, Path]:
    """Name -> folder of every complete local base model (each has the tokenizer of its text encoder)."""
    from zimage.catalogue import list_models

    return {row.entry.name: row.path for row in list_models(settings) if row.path is not None}
