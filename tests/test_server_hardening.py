"""Server hardening that a test can read: the bind address of the config and the README's start command,
XSRF and CORS protection, the upload limit, and the untrusted-file rules over the whole package (every
torch.load with weights_only=True, model weights only as safetensors, never trust_remote_code)."""

from __future__ import annotations

import ast
import re
import shlex
import tomllib
from pathlib import Path

from zimage.views.auth import exposure_warning

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "zimage"
WEIGHT_LOADERS = {"AutoencoderKL", "AutoModel", "ZImageTransformer2DModel", "ZImagePipeline"}


def test_the_config_binds_loopback_and_keeps_xsrf_cors_and_the_upload_limit():
    server = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())["server"]
    assert server["address"] == "127.0.0.1"
    assert server["enableXsrfProtection"] is True and server["enableCORS"] is True
    assert server["maxUploadSize"] == 2048


def test_the_readme_start_command_binds_loopback():
    commands = [ln for ln in (ROOT / "README.md").read_text().splitlines() if "streamlit run Home.py" in ln
                and not ln.lstrip().startswith(("#", "The app"))]  # fmt: skip
    assert commands, "the README has no start command"
    for line in commands:
        words = shlex.split(line.split("streamlit run", 1)[1])
        assert "--server.address" in words and words[words.index("--server.address") + 1] == "127.0.0.1", line


def test_a_server_without_login_beyond_loopback_is_flagged():
    assert exposure_warning("none", "127.0.0.1") is None and exposure_warning("none", "localhost") is None
    assert "every network interface" in exposure_warning("none", None)
    assert "on 0.0.0.0" in exposure_warning("none", "0.0.0.0")
    assert exposure_warning("password", "0.0.0.0") is None  # a login is on


def calls(name: str):
    """(file, call node) of every call to `...name(...)` in the package."""
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                f = node.func
                called = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
                if called == name:
                    yield path, node


def keyword(node: ast.Call, name: str):
    for kw in node.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else kw.value
    return None


def test_every_torch_load_uses_weights_only():
    loads = [
        (p, n)
        for p, n in calls("load")
        if isinstance(n.func, ast.Attribute) and getattr(n.func.value, "id", "") == "torch"
    ]
    assert loads, "torch.load is gone: drop this test's expectation"
    for path, node in loads:
        assert keyword(node, "weights_only") is True, f"{path}:{node.lineno}: torch.load without weights_only=True"


def test_model_weights_load_only_as_safetensors_and_no_remote_code_runs():
    loaders = [(p, n) for p, n in calls("from_pretrained")
               if isinstance(n.func, ast.Attribute) and getattr(n.func.value, "id", "") in WEIGHT_LOADERS]  # fmt: skip
    assert len(loaders) >= 5
    for path, node in loaders:
        assert keyword(node, "use_safetensors") is True, f"{path}:{node.lineno}: weights may load from a pickle"
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        assert not re.search(r"trust_remote_code\s*=\s*True", text), path
        assert "pickle.load" not in text and "import pickle" not in text, path


def test_a_pickled_lora_is_refused_before_it_is_opened(tmp_path):
    import pickle  # the test writes one; the package never loads one

    import pytest

    from zimage.testgrid import lora_problem
    from zimage.training.lora_io import LoraFormatError, read_lora

    class Boom:
        def __reduce__(self):
            return (Path(tmp_path / "pwned").touch, ())

    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(LoraFormatError, match="only .safetensors"):
        read_lora(evil)
    assert "pickles are never loaded" in lora_problem(evil)
    disguised = tmp_path / "evil.safetensors"
    disguised.write_bytes(evil.read_bytes())  # a pickle under the right name: safetensors refuses its header
    with pytest.raises(LoraFormatError):
        read_lora(disguised)
    assert lora_problem(disguised) is not None
    assert not (tmp_path / "pwned").exists()
