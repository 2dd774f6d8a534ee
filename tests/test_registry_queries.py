"""The page queries: runs list with filters, down-sampled series, samples, checkpoints, config diff, queue."""

import pytest

from zimage import registry as R
from zimage.captioning.config import caption_config
from zimage.jobs import enqueue, move_up
from zimage.registry.db import Registry
from zimage.registry.ingest import Ingester
from zimage.runfolder import RunFolder


def _run(settings, run_id, *, user, state, dataset, kind="train", created, config=None, losses=()):
    rf = RunFolder(settings.runs_dir / run_id)
    cfg = {"dataset_path": f"datasets/{dataset}", "output_name": f"{run_id}-lora", "lora_rank": 16,
           "optimizer": {"name": "adamw", "betas": [0.9, 0.99]}}  # fmt: skip
    cfg.update(config or {})
    rf.write_config(cfg)
    rf.update_status(state=state, kind=kind, user=user, name=run_id, created=created, step=len(losses),
                     total_steps=200 if losses else None)  # fmt: skip
    for i, loss in enumerate(losses, 1):
        rf.append_metrics({"step": i, "loss": loss, "lr": 1e-4 * i, "eta": 200.0 - i})
    return rf


@pytest.fixture()
def reg(zhome):
    losses = [1.0 / (1 + i / 50) for i in range(1000)]
    losses[536] = 100.0  # a spike at step 537 must survive down-sampling
    _run(zhome, "r-ann-pets", user="ann", state="completed", dataset="pets", created=3.0, losses=losses)
    _run(zhome, "r-bob-pets", user="bob", state="running", dataset="pets", created=2.0, losses=[0.5, 0.4, 0.3],
         config={"lora_rank": 32})  # fmt: skip
    _run(zhome, "r-ann-cars", user="ann", state="failed", dataset="cars", created=1.0, config={"learning_rate": 1e-3})
    _run(zhome, "c-ann-pets", user="ann", state="completed", dataset="pets", kind="caption", created=4.0)
    rf = RunFolder(zhome.runs_dir / "r-ann-pets")
    for step in (100, 200):
        for seed in (1, 2):
            rf.append_sample({"step": step, "prompt": f"p{seed}", "seed": seed, "path": f"samples/{step}-{seed}.png"})
        (rf.checkpoints_dir / f"step-{step:06d}").mkdir(parents=True)
    registry = Registry(zhome.db_path)
    Ingester(registry, zhome).scan()
    yield registry
    registry.close()


def test_runs_list_filters_and_summary(zhome, reg):
    df = R.list_runs(reg)
    assert list(df["run_id"]) == ["c-ann-pets", "r-ann-pets", "r-bob-pets", "r-ann-cars"]  # newest first
    first = df.set_index("run_id").loc["r-ann-pets"]
    assert first["progress"] == 1.0 and first["step"] == 1000 and first["eta"] == pytest.approx(200.0 - 1000)
    assert first["last_loss"] == pytest.approx(1.0 / (1 + 999 / 50))
    assert first["run_dir"] == str(zhome.runs_dir / "r-ann-pets") and first["samples_count"] == 4
    bob = df.set_index("run_id").loc["r-bob-pets"]
    assert bob["progress"] == pytest.approx(3 / 200) and bob["user"] == "bob" and bob["dataset"] == "pets"
    assert list(R.list_runs(reg, state="failed")["run_id"]) == ["r-ann-cars"]
    assert list(R.list_runs(reg, user="ann", dataset="pets", kind="train")["run_id"]) == ["r-ann-pets"]
    assert list(R.list_runs(reg, state=["running", "failed"])["run_id"]) == ["r-bob-pets", "r-ann-cars"]
    assert list(R.list_runs(reg, text="CARS-lo")["run_id"]) == ["r-ann-cars"]  # output name, any case
    assert R.list_runs(reg, text="nothing like it").empty
    assert list(R.list_jobs(reg)["run_id"]) == ["c-ann-pets"]
    assert R.filter_choices(reg) == {
        "state": ["completed", "failed", "running"],
        "user": ["ann", "bob"],
        "dataset": ["cars", "pets"],
        "kind": ["caption", "train"],
    }
    detail = R.run_detail(reg, "r-bob-pets")
    assert detail["config"]["lora_rank"] == 32 and detail["status"]["state"] == "running"
    assert R.run_detail(reg, "nope") is None
    assert R.overview(reg)["per_state"] == {"completed": 2, "running": 1, "failed": 1}


def test_metric_series_is_down_sampled_in_sql_keeping_spikes(reg):
    df = R.metric_series(reg, "r-ann-pets", "loss", max_points=50)
    assert len(df) == 50 and df["n"].sum() == 1000
    assert list(df["step"]) == sorted(df["step"]) and df["step"].iloc[-1] == 1000
    spike = df[(df["step_first"] <= 537) & (df["step"] >= 537)].iloc[0]
    assert spike["max"] == 100.0 and spike["min"] < 1.0
    assert df["last"].iloc[-1] == pytest.approx(1.0 / (1 + 999 / 50))
    both = R.metric_series(reg, ["r-ann-pets", "r-bob-pets"], ["loss", "lr"], max_points=10)
    sizes = both.groupby(["run_id", "metric"]).size().to_dict()
    assert sizes == {
        ("r-ann-pets", "loss"): 10,
        ("r-ann-pets", "lr"): 10,
        ("r-bob-pets", "loss"): 3,
        ("r-bob-pets", "lr"): 3,
    }
    assert list(both[(both.run_id == "r-bob-pets") & (both.metric == "loss")]["last"]) == [0.5, 0.4, 0.3]
    with pytest.raises(R.RegistryError, match="metrics: drop_table unknown"):
        R.metric_series(reg, "r-ann-pets", "drop_table")
    assert R.metric_series(reg, [], "loss").empty


def test_samples_checkpoints_and_config_diff(zhome, reg):
    s = R.samples(reg, "r-ann-pets", step=200)
    assert list(s["seed"]) == [1, 2] and s["path"].iloc[0] == str(zhome.runs_dir / "r-ann-pets/samples/200-1.png")
    assert R.sample_steps(reg, "r-ann-pets") == [100, 200]
    assert len(R.samples(reg, "r-ann-pets")) == 4
    ck = R.checkpoints(reg, "r-ann-pets")
    assert list(ck["step"]) == [100, 200] and ck["path"].iloc[1] == str(
        zhome.runs_dir / "r-ann-pets/checkpoints/step-000200"
    )
    diff = R.config_diff(reg, ["r-ann-pets", "r-bob-pets", "r-ann-cars"])
    assert set(diff.index) == {"dataset_path", "output_name", "lora_rank", "learning_rate"}
    assert diff.loc["lora_rank"].tolist() == [16, 32, 16]
    assert diff.loc["learning_rate"].tolist()[2] == 1e-3 and diff.loc["learning_rate"].isna().tolist()[:2] == [
        True,
        True,
    ]
    full = R.config_diff(reg, ["r-ann-pets", "r-bob-pets"], all_keys=True)
    assert full.loc["optimizer.name"].tolist() == ["adamw", "adamw"]
    assert full.loc["optimizer.betas"].tolist() == ["[0.9, 0.99]"] * 2
    with pytest.raises(R.RegistryError, match="run nope: not in the registry"):
        R.config_diff(reg, ["r-ann-pets", "nope"])


def test_queue_positions_follow_the_folders(zhome, reg):
    config = caption_config(dataset="pets", model="blip-base")  # valid, though nothing here launches it
    a, b, c = (enqueue(zhome, "caption", config, user="ann", name=n) for n in "abc")
    move_up(zhome, c)
    Ingester(reg, zhome).scan()
    q = R.queue(reg)
    queued = q[q.state == "queued"]
    assert list(queued["run_id"]) == [a, c, b] and list(queued["position"]) == [1, 2, 3]
    assert list(q["run_id"]) == [a, c, b, "r-bob-pets"]
    assert list(q[q.state != "queued"]["run_id"]) == ["r-bob-pets"]  # running now, listed after
    assert q[q.state != "queued"]["position"].isna().all()
