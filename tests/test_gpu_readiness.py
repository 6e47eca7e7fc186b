"""What the first minutes on a GPU machine rely on, checked without one: test collection there, the build failing
loudly when CUDA kernels were expected, the compile check importing the tree it checked."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("O1K_REQUIRE_CUDA", "PYTHONPATH")}
    env.update(extra)
    return env


def test_cuda_collection_survives_a_missing_hypothesis(tmp_path):
    """A GPU image without hypothesis: `pytest -m cuda tests` must still collect every other module (test_fuzz.py
    skipped), not stop at a collection error."""
    shim = tmp_path / "hypothesis"
    shim.mkdir()
    (shim / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'hypothesis'\", name='hypothesis')\n")
    run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "cuda", "-p", "no:hypothesispytest",
                          "-p", "no:cacheprovider", "tests/test_fuzz.py", "tests/test_merge_states.py"],
                         cwd=ROOT, env=_env(PYTHONPATH=str(tmp_path)), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "error" not in run.stdout.lower(), run.stdout[-3000:]
    assert "test_merge_states.py::" in run.stdout and "test_fuzz.py::" not in run.stdout, run.stdout[-3000:]


def _tree_copy(tmp_path) -> Path:
    """setup.py and the sources it builds, copied (a build run here must not touch the checkout's extension)."""
    import shutil

    dst = tmp_path / "tree"
    dst.mkdir()
    ignore = shutil.ignore_patterns("*.so", "__pycache__", "_build_info.json", "build")
    for name in ("setup.py", "csrc", "o1kernels"):
        src = ROOT / name
        (shutil.copytree(src, dst / name, ignore=ignore) if src.is_dir() else shutil.copy(src, dst / name))
    return dst


def test_cuda_required_without_cuda_fails_the_build(tmp_path):
    """O1K_REQUIRE_CUDA=1 (what the GPU check sets) with a torch that has no CUDA: setup.py stops with exit status
    1 before building, saying why, instead of installing a CPU-only extension."""
    tree = _tree_copy(tmp_path)
    run = subprocess.run([sys.executable, "setup.py", "--version"], cwd=tree, env=_env(O1K_REQUIRE_CUDA="1"),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, run.stdout[-2000:] + run.stderr[-2000:]
    assert "O1K_REQUIRE_CUDA=1 but torch" in run.stderr and "has no CUDA" in run.stderr, run.stderr[-2000:]
    assert '"failed"' in (tree / "o1kernels" / "_build_info.json").read_text()


def test_required_extension_build_error_fails_the_build(tmp_path):
    """O1K_REQUIRE_EXTENSION=1 and a compiler that fails: exit status 1 (without it the install goes on, green)."""
    tree = _tree_copy(tmp_path)
    for required, expected in (("0", 0), ("1", 1)):
        run = subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree,
                             env=_env(O1K_REQUIRE_EXTENSION=required, CXX="false", CC="false", MAX_JOBS="1"),
                             capture_output=True, text=True, timeout=600)
        assert run.returncode == expected, (required, run.stdout[-2000:] + run.stderr[-2000:])
        assert '"failed"' in (tree / "o1kernels" / "_build_info.json").read_text()


def _launch_sites_unguarded(source: str) -> list[str]:
    """Kernel launches (`name_kernel[grid](...)`) of a module not run under `with device_guard(...)`: neither inside
    such a block (nested functions included) nor in a function whose every call in the module is guarded."""
    import ast

    tree = ast.parse(source)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

    def enclosing(node, kind):
        while node in parents:
            node = parents[node]
            if isinstance(node, kind):
                yield node

    def under_guard(node) -> bool:
        return any(isinstance(item.context_expr, ast.Call) and getattr(item.context_expr.func, "id", "") == "device_guard"
                   for w in enclosing(node, ast.With) for item in w.items)

    def function_of(node):
        return next((f.name for f in enclosing(node, ast.FunctionDef) if f in tree.body), None)

    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    launches = [c for c in calls if isinstance(c.func, ast.Subscript) and getattr(c.func.value, "id", "").endswith("_kernel")]
    guarded: dict[str, bool] = {}

    def is_guarded(node, seen=()) -> bool:
        if under_guard(node):
            return True
        name = function_of(node)
        if name is None or name in seen:
            return False
        if name not in guarded:
            sites = [c for c in calls if getattr(c.func, "id", None) == name]
            guarded[name] = bool(sites) and all(is_guarded(c, seen + (name,)) for c in sites)
        return guarded[name]

    return [f"line {c.lineno}: {c.func.value.id}" for c in launches if not is_guarded(c)]


def test_every_triton_launch_runs_under_a_device_guard():
    """Triton launches on the current CUDA device, not the tensors': cuda:1 inputs would fault. Every launch in
    o1kernels/triton_ops must run inside `with device_guard(device)` (an offline check: no second GPU here)."""
    modules = sorted((ROOT / "o1kernels" / "triton_ops").glob("*.py"))
    found = {m.name: _launch_sites_unguarded(m.read_text()) for m in modules}
    assert sum("_kernel" in m.read_text() for m in modules) >= 3
    assert not any(found.values()), found


STUB_NVCC = """#!/usr/bin/env bash
# nvcc stand-in: the version, the toolkit root, and an (empty) output file for -o
case " $* " in *" --version "*) echo "Cuda compilation tools, release 13.0, V13.0.0"; exit 0 ;; esac
case " $* " in *" --dryrun "*) echo "#\\$ TOP=/nonexistent/cuda" >&2; exit 0 ;; esac
while [ $# -gt 0 ]; do [ "$1" = -o ] && { : > "$2"; chmod +x "$2"; }; shift; done
"""


def test_compile_check_imports_the_tree_it_checked(tmp_path):
    """csrc/tools/compile_check.sh's last step imports the checked tree's o1kernels._C, whatever else is installed
    (nvcc and the host compiler stubbed: only that step is under test). PYTHONSAFEPATH=1 keeps the working directory
    off sys.path, as a python started differently would: the check must still import the tree's extension, and
    fail when the tree has none."""
    import shutil

    so = sorted((ROOT / "o1kernels").glob("_C*.so"))
    if not so:
        import pytest

        pytest.skip("this checkout has no built o1kernels._C")
    tree = _tree_copy(tmp_path)
    stub = tmp_path / "nvcc"
    stub.write_text(STUB_NVCC)
    stub.chmod(0o755)
    env = _env(NVCC=str(stub), CXX="true", PYTHON=sys.executable, PYTHONSAFEPATH="1",
               O1K_COMPILE_CHECK_DIR=str(tmp_path / "objects"))
    script = str(tree / "csrc" / "tools" / "compile_check.sh")
    shutil.copy(so[0], tree / "o1kernels" / so[0].name)
    run = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert f"import ok {tree / 'o1kernels' / so[0].name}" in run.stdout, run.stdout[-2000:]
    (tree / "o1kernels" / so[0].name).unlink()
    run = subprocess.run(["bash", script], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode != 0 and "import ok" not in run.stdout, run.stdout[-2000:] + run.stderr[-2000:]


def test_gpu_check_dry_run(tmp_path):
    """benchmarks/gpu_check.sh bench with its GPU steps stubbed (GPU_CHECK_DRY_RUN=1, the benchmarks on the CPU):
    the plan with expected times and limits first, a start and an end line per step, every benchmark's table and
    acceptance lines written into OUT_DIR, exit status 0."""
    import json

    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "bench", str(tmp_path)],
                         env=_env(GPU_CHECK_DRY_RUN="1"), capture_output=True, text=True, timeout=600)
    out = run.stdout
    assert run.returncode == 0, out[-3000:] + run.stderr[-2000:]
    assert out.count("expected ~") >= 6 and "limit 110s" in out, out[:2000]
    for step in ("prechecks", "cuda-kernels", "bench-attention", "bench-step-rewards", "bench-decode"):
        assert f"{step}: start" in out and f"{step}: ok in" in out, out[-3000:]
    results = sorted(tmp_path.glob("bench_*_cpu_*.json"))
    assert [p.name.split("_cpu_")[0] for p in results] == ["bench_attention", "bench_decode", "bench_step_rewards"]
    assert all(json.loads(p.read_text())["meta"]["complete"] and json.loads(p.read_text())["rows"] for p in results)
    summary = out[out.index("acceptance lines"):].splitlines()
    assert sum(line.startswith("  acceptance (") for line in summary) == 3, out[-2000:]
    assert (tmp_path / "gpu_check_bench.log").exists()
