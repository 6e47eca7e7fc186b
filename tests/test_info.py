"""`python -m o1kernels` / o1kernels.info(): versions, the compiled extension's state, backends and why not."""
import io
import json
import subprocess
import sys

import torch

import o1kernels
from o1kernels import _ext, _info
from o1kernels.decode import main


def test_info_reports_versions_extension_and_backends():
    out = io.StringIO()
    o1kernels.info(file=out)
    text = out.getvalue()
    assert f"o1kernels     {o1kernels.__version__}" in text and f"torch         {torch.__version__}" in text
    assert "python" in text and "triton" in text and "GPUs" in text
    if _ext._C is None:
        assert "o1kernels._C  not available" in text
    else:
        kind = "CUDA + C++ CPU kernels" if _ext._C.WITH_CUDA else "C++ CPU kernels only (no CUDA)"
        assert f"o1kernels._C  built, {kind}" in text
    for name, reason in o1kernels.available_backends("cpu").items():
        assert f"  {name:<7} {'available' if reason is None else 'unavailable: ' + reason}" in text


def test_info_prints_the_build_record_when_the_extension_is_missing(monkeypatch, tmp_path):
    record = tmp_path / "_build_info.json"
    record.write_text(json.dumps({"outcome": "failed", "detail": "building the CPU extension failed (no compiler)"}))
    monkeypatch.setattr(_info, "BUILD_RECORD", record)
    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "_IMPORT_ERROR", "the compiled extension o1kernels._C is not available (test)")
    out = io.StringIO()
    o1kernels.info(file=out)
    assert "o1kernels._C  not available: the compiled extension o1kernels._C is not available (test)" in out.getvalue()
    assert "setup.py recorded: failed: building the CPU extension failed (no compiler)" in out.getvalue()
    assert "cpu     unavailable: the compiled extension" in out.getvalue()


def test_demo_says_when_the_compiled_kernels_are_missing(monkeypatch, capsys):
    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "_IMPORT_ERROR", "the compiled extension o1kernels._C is not available (test)")
    assert main(["--json", "--n", "2", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "note: the compiled CPU kernels are unavailable" in err and "python -m o1kernels" in err


def test_module_entry_point():
    proc = subprocess.run([sys.executable, "-m", "o1kernels"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("o1kernels") and "backends on cpu:" in proc.stdout
