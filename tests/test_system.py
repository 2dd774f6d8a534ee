"""Host facts: GPUs through NVML (never torch: no CUDA context), disk use of the data folders."""

from __future__ import annotations

import subprocess
import sys
import types
from collections import namedtuple

import pytest

from zimage import system
from zimage.system import GpuInfo, bf16_supported, disk_usage, folder_size, gpu_report, gpus, human_bytes, visible_gpus


def test_disk_usage_counts_files(zhome):
    (zhome.datasets_dir / "a").mkdir()
    (zhome.datasets_dir / "a" / "x.bin").write_bytes(b"0" * 1000)
    (zhome.runs_dir / "r").mkdir()
    (zhome.runs_dir / "r" / "m.jsonl").write_bytes(b"1" * 10)
    usage = disk_usage(zhome)
    assert usage["datasets"] == 1000 and usage["registry"] == 10 and usage["models"] == 0
    assert usage["free"] > 0
    assert folder_size(zhome.home / "missing") == 0


def test_gpu_facts_never_import_torch():
    code = "import sys, zimage.system as s; r = s.gpu_report(); print(r.describe()); assert 'torch' not in sys.modules"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()


def test_host_without_a_driver_says_so():
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        pass
    else:
        pynvml.nvmlShutdown()
        pytest.skip("this host has an NVIDIA driver")
    report = gpu_report()
    assert report.gpus == [] and gpus() == []
    assert report.problem.startswith("no NVIDIA driver"), report.problem
    assert report.describe() == report.problem


def test_without_nvidia_ml_py_the_report_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    report = gpu_report()
    assert report.gpus == [] and "nvidia-ml-py is not installed" in report.problem


class FakeNVMLError(Exception):
    pass


def fake_nvml(devices: list[dict]) -> types.ModuleType:
    """A stand-in for pynvml with the calls zimage.system makes (no NVIDIA driver on the test machine)."""
    nv = types.ModuleType("pynvml")
    nv.NVMLError = FakeNVMLError
    nv.NVMLError_LibraryNotFound = type("NVMLError_LibraryNotFound", (FakeNVMLError,), {})
    nv.NVMLError_DriverNotLoaded = type("NVMLError_DriverNotLoaded", (FakeNVMLError,), {})
    nv.calls = []
    Mem = namedtuple("Mem", "total free used")
    Rates = namedtuple("Rates", "gpu memory")
    Proc = namedtuple("Proc", "pid usedGpuMemory")

    def unsupported():
        raise FakeNVMLError("Not Supported")

    nv.nvmlInit = lambda: nv.calls.append("init")
    nv.nvmlShutdown = lambda: nv.calls.append("shutdown")
    nv.nvmlSystemGetDriverVersion = lambda: "570.1"
    nv.nvmlDeviceGetCount = lambda: len(devices)
    nv.nvmlDeviceGetHandleByIndex = lambda i: devices[i]
    nv.nvmlDeviceGetName = lambda h: h["name"].encode()  # older bindings return bytes
    nv.nvmlDeviceGetMemoryInfo = lambda h: Mem(h["total"], h["total"] - h["used"], h["used"])
    nv.nvmlDeviceGetUUID = lambda h: h["uuid"]
    nv.nvmlDeviceGetUtilizationRates = lambda h: Rates(h["util"], 0) if "util" in h else unsupported()
    nv.nvmlDeviceGetCudaComputeCapability = lambda h: h["cap"]
    nv.nvmlDeviceGetComputeRunningProcesses = lambda h: [Proc(p, 1) for p in h["pids"]]
    return nv


DEVICES = [
    {"name": "NVIDIA H200", "total": 141 * 1024**3, "used": 30 * 1024**3, "uuid": "GPU-aaaa-1111", "util": 97,
     "cap": (9, 0), "pids": [4242]},
    {"name": "Tesla V100", "total": 16 * 1024**3, "used": 0, "uuid": "GPU-bbbb-2222", "cap": (7, 0), "pids": []},
]  # fmt: skip


def test_nvml_report_maps_every_field_and_shuts_nvml_down(monkeypatch):
    nv = fake_nvml(DEVICES)
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    report = gpu_report()
    assert report.problem is None and report.driver == "570.1"
    h200, v100 = report.gpus
    assert h200 == GpuInfo(0, "NVIDIA H200", 141 * 1024**3, 30 * 1024**3, "GPU-aaaa-1111", 97, (9, 0), (4242,))
    assert v100.utilization is None and v100.capability == (7, 0)  # "Not Supported" leaves the field empty
    assert nv.calls == ["init", "shutdown"]
    assert h200.matches("0") and h200.matches("GPU-aaaa") and not h200.matches("1") and not h200.matches("GPU")
    assert bf16_supported([h200]) and not bf16_supported([h200, v100])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert visible_gpus(report) == [v100]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaaa-1111")
    assert visible_gpus(report) == [h200]


def test_nvml_without_driver_and_failing_nvml(monkeypatch):
    nv = fake_nvml(DEVICES)

    def no_driver():
        raise nv.NVMLError_DriverNotLoaded("Driver Not Loaded")

    nv.nvmlInit = no_driver
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    assert gpu_report().problem == "no NVIDIA driver (Driver Not Loaded)"
    nv.nvmlInit = lambda: None
    nv.nvmlDeviceGetCount = lambda: 0
    assert gpu_report().problem == "the NVIDIA driver lists no GPU"


def test_home_gpu_rows_name_the_job_on_each_gpu(monkeypatch):
    import pandas as pd

    from zimage.views import home

    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(DEVICES))
    active = pd.DataFrame([{"run_id": "r1", "name": "cats", "kind": "train", "user": "ann", "gpu_ids": "0,1"},
                           {"run_id": "r2", "name": None, "kind": "caption", "user": "bob", "gpu_ids": "1"}])  # fmt: skip
    rows = home.gpu_rows(system.gpus(), active)
    assert [r["job"] for r in rows] == ["cats (train, ann)", "cats (train, ann), r2 (caption, bob)"]
    assert rows[0]["utilisation %"] == 97 and rows[0]["processes"] == 1 and rows[0]["memory %"] == 21.3
    assert home.gpu_rows(system.gpus(), pd.DataFrame())[1]["job"] == "free"


def test_human_bytes():
    assert human_bytes(512) == "512 B" and human_bytes(1536) == "1.5 KB" and human_bytes(3 * 1024**3) == "3.0 GB"
