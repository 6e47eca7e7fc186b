"""The package's layering, read from the source: core ops and plans < o1kernels.paged < the decoder and the
integrations; no upward import, no cycle, no private name taken from another package, and attention plans built only
by the paged wrapper and the low-level ops."""
from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import torch

from o1kernels._backend import resolve_backend
from o1kernels.capabilities import AttentionSpec
from o1kernels.tree_attention import SUPPORTED_BACKENDS

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "o1kernels"
# layer -> the layers it may import (itself included)
ALLOWED = {"core": {"core"}, "paged": {"core", "paged"}, "decoder": {"core", "paged", "decoder"},
           "integrations": {"core", "paged", "integrations"}, "cli": {"core", "paged", "decoder", "cli"}}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in ("paged", "decoder", "integrations"):
        return parts[1]
    if len(parts) > 1 and parts[1] == "decode":
        return "cli"
    return "core"


def imports(path: Path) -> list[tuple[str, list[str], bool]]:
    """(imported o1kernels module, names, at module level) of every import in the file."""
    tree = ast.parse(path.read_text())
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], id(node) in top) for a in node.names if a.name.startswith("o1kernels")]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.startswith("o1kernels"):
                out.append((base, [a.name for a in node.names], id(node) in top))
    return out


def test_no_upward_import_no_private_name_across_packages():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        mod = module_name(path)
        for target, names, _ in imports(path):
            if layer(target) not in ALLOWED[layer(mod)]:
                problems.append(f"{mod} ({layer(mod)}) imports {target} ({layer(target)})")
            if layer(target) != layer(mod):
                private = [n for n in names if n.startswith("_") and not n.startswith("__")]
                problems += [f"{mod} imports the private name {target}.{n}" for n in private]
    assert not problems, "\n".join(problems)


def test_no_import_cycle_at_module_level():
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        graph[module_name(path)] = {t for t, _, top in imports(path) if top}
    modules = set(graph)

    def resolve(name):  # "o1kernels.paged" -> its __init__; a name imported from a package module stays it
        return name if name in modules else name.rsplit(".", 1)[0] if name.rsplit(".", 1)[0] in modules else None

    edges = {m: {r for t in ts if (r := resolve(t)) and r != m} for m, ts in graph.items()}
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(edges[m]):
            assert state.get(n) != "open", "import cycle: " + " -> ".join(stack[stack.index(n):] + [n])
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m)


def test_plans_are_built_only_by_the_wrapper_and_the_low_level_ops():
    found = subprocess.run(["git", "grep", "-n", "-E", r"(TreeAttentionPlan|SharedPrefixPlan)(\(|\.from_arrays\()",
                            "--", "o1kernels"], cwd=ROOT, capture_output=True, text=True).stdout.splitlines()
    builders = {line.split(":")[0] for line in found if not line.split(":", 2)[2].lstrip().startswith(("#", "\"", "raise"))
                and "f\"" not in line and "(f\"" not in line}
    assert builders <= {"o1kernels/paged/attention.py", "o1kernels/shared_prefix_attention.py", "o1kernels/plan.py"}, \
        builders


def test_auto_picks_a_backend_that_supports_the_call():
    """head_dim 512 on CUDA: no Triton or compiled kernel takes it, auto falls back to the torch reference instead of
    picking Triton and raising; head_dim 128 keeps Triton; an explicit backend that cannot run it says why (the
    choice is logic over the capability table: checked here without a GPU)."""
    cuda = torch.device("cuda")
    assert resolve_backend("auto", cuda, SUPPORTED_BACKENDS, AttentionSpec(head_dim=512)) == "torch"
    assert resolve_backend("auto", cuda, SUPPORTED_BACKENDS, AttentionSpec(head_dim=128)) == "triton"
    assert resolve_backend("auto", torch.device("cpu"), SUPPORTED_BACKENDS,
                           AttentionSpec(head_dim=64, alibi=True)) == "torch"  # the reference names it later
    try:
        resolve_backend("triton", cuda, SUPPORTED_BACKENDS, AttentionSpec(head_dim=512))
    except ValueError as exc:
        assert "head_dim up to 256, got 512" in str(exc)
    else:
        raise AssertionError("an explicit Triton backend took head_dim 512")
