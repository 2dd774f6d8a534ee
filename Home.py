"""Home: what this studio has right now — base models and datasets."""

import streamlit as st

from zimage.catalogue import list_models
from zimage.data.folders import list_datasets
from zimage.settings import get_settings

st.set_page_config(page_title="Z-Image LoRA Studio", page_icon="🎨", layout="wide")
settings = get_settings()

st.title("Z-Image LoRA Studio")
st.caption(f"Data home: `{settings.home}`")

st.subheader("Base models")
models = list_models(settings)
st.dataframe(
    [
        {
            "name": m.entry.name,
            "model": m.entry.title,
            "type": m.entry.model_type,
            "sampling": f"{m.entry.sample_steps} steps, CFG {m.entry.sample_cfg:g}",
            "status": "ready" if m.path else (m.problem or "not downloaded"),
            "source": m.entry.repo_id or "local",
        }
        for m in models
    ],
    hide_index=True,
    key="home_models",
)
if not any(m.path for m in models):
    st.info("No model is on disk yet. Run `zimage demo` for the offline tiny model, or `zimage models download NAME`.")

st.subheader("Datasets")
datasets = list_datasets(settings.datasets_dir)
if datasets:
    rows = []
    for folder in datasets:
        info = folder.read_info()
        items = folder.items()
        rows.append(
            {
                "name": info.name,
                "type": info.type,
                "trigger word": info.trigger_word,
                "images": len(items),
                "captioned": sum(1 for i in items if i.caption_path.exists()),
                "resolution": info.resolution,
            }
        )
    st.dataframe(rows, hide_index=True, key="home_datasets")
else:
    st.info("No datasets yet. Run `zimage demo` for the demo-shapes dataset.")
