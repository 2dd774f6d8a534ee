from zimage.system import disk_usage, folder_size, gpus, human_bytes


def test_disk_usage_counts_files(zhome):
    (zhome.datasets_dir / "a").mkdir()
    (zhome.datasets_dir / "a" / "x.bin").write_bytes(b"0" * 1000)
    (zhome.runs_dir / "r").mkdir()
    (zhome.runs_dir / "r" / "m.jsonl").write_bytes(b"1" * 10)
    usage = disk_usage(zhome)
    assert usage["datasets"] == 1000 and usage["registry"] == 10 and usage["models"] == 0
    assert usage["free"] > 0
    assert folder_size(zhome.home / "missing") == 0


def test_cpu_only_host_has_no_gpus():
    import torch

    assert (gpus() == []) == (not torch.cuda.is_available())


def test_human_bytes():
    assert human_bytes(512) == "512 B" and human_bytes(1536) == "1.5 KB" and human_bytes(3 * 1024**3) == "3.0 GB"
