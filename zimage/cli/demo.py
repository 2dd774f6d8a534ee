"""`zimage demo`: build the tiny offline model and the demo dataset (idempotent)."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("demo", help="write the tiny demo model and the demo-shapes dataset")
    p.set_defaults(handler=run)


def run(args) -> int:
    from zimage.demo import DEMO_DATASET, prepare_demo
    from zimage.settings import get_settings
    from zimage.tiny import TINY_MODEL_NAME

    settings = get_settings()
    done = prepare_demo(settings)
    model_dir = settings.base_models_dir / TINY_MODEL_NAME
    data_dir = settings.datasets_dir / DEMO_DATASET
    print(f"model   {model_dir}  ({'written' if done['model'] else 'already there'})")
    print(f"dataset {data_dir}  ({'written' if done['dataset'] else 'already there'})")
    from zimage.captioning.tiny import DEMO_CAPTIONER, DEMO_CAPTIONER_TITLE

    where = settings.captioners_dir / DEMO_CAPTIONER
    print(f"captioner {where}  ({'written' if done['captioner'] else 'already there'}; {DEMO_CAPTIONER_TITLE})")
    return 0
