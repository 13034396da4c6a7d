"""The one chooser (`dfa_fast.ops.TABLE`): every operation gets the expected implementation for a
CPU float32 call, bfloat16 inputs, bf16 autocast, a data-parallel gather and (under the Triton
interpreter) Triton; DFA_KERNELS forces each backend; a swap across ranks always runs the reference.
And the house has no import circle, and `kernels/` imports nothing from `dfa_fast`."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dfa_fast import ops
from dfa_fast.kernels import onednn_linear

REPO = Path(__file__).resolve().parents[1]
OPERATIONS = ("cross_entropy", "gce", "sample_weights", "weighted_cross_entropy",
              "permute_concat", "disent_head", "lff_head", "linear_relu_chain")
ONEDNN = "onednn" if onednn_linear.available() else "torch"
# operation: (fp32, bf16 inputs, bf16 autocast, gather) on a CPU without DFA_KERNELS.
CPU_DEFAULT = {
    "cross_entropy": ("torch",) * 4, "gce": ("torch",) * 4,
    "sample_weights": ("numba",) * 4,  # the EMA buffers are float32 whatever the inputs
    "weighted_cross_entropy": ("torch",) * 4, "permute_concat": ("torch",) * 4,
    "disent_head": ("numba", "fused_torch", "numba", "fused_torch"),
    "lff_head": ("fused",) * 4,
    "linear_relu_chain": (ONEDNN, "torch", "torch", ONEDNN),
}


def table(monkeypatch, forced=None):
    if forced:
        monkeypatch.setenv("DFA_KERNELS", forced)
    else:
        monkeypatch.delenv("DFA_KERNELS", raising=False)
    return {r["operation"]: (r["fp32"], r["bf16"], r["bf16_mixed"], r["gather"])
            for r in ops.describe("cpu")}


def test_every_operation_is_in_the_table():
    assert tuple(ops.TABLE) == OPERATIONS
    for impls in ops.TABLE.values():  # the reference comes last and takes every call
        assert impls[-1].backend == "torch" and impls[-1].supports()


def test_the_cpu_default(monkeypatch):
    assert table(monkeypatch) == CPU_DEFAULT
    assert table(monkeypatch, "fused") == CPU_DEFAULT


def test_forcing_the_reference_and_triton(monkeypatch):
    assert set(table(monkeypatch, "torch").values()) == {("torch",) * 4}
    forced = table(monkeypatch, "triton")  # the interpreter runs Triton on CPU tensors
    assert forced.pop("linear_relu_chain") == ("torch",) * 4  # no Triton implementation
    assert set(forced.values()) == {("triton",) * 4}


@pytest.mark.parametrize("forced", ["", "fused", "triton", "torch"])
def test_a_swap_across_ranks_runs_the_reference(monkeypatch, forced):
    monkeypatch.setenv("DFA_KERNELS", forced)
    args, kwargs = ops.examples()["disent_head"]
    z_b, label = args[1], args[6]
    impl = ops.choose("disent_head", *args, swap_source=(z_b, label), **kwargs)
    assert impl.name == "torch"


def test_the_ops_command_prints_the_table():
    done = subprocess.run([sys.executable, "-m", "dfa_fast", "ops"], capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert "| disent_head | numba | fused_torch | numba | fused_torch |" in done.stdout
    assert "torch " + torch.__version__ in done.stdout


def module_imports():
    """Return {module: modules of the package it imports anywhere in its code}."""
    files = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
             for p in (REPO / "dfa_fast").rglob("*.py")}
    files |= {"dfa_fast.kernels" + ("" if p.stem == "__init__" else f".{p.stem}"): p
              for p in (REPO / "kernels").glob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in files else base
                          for a in node.names}
        graph[name] = {m for m in found if m in files and m != name}
    return graph


def test_no_import_circle_and_kernels_is_a_leaf():
    graph = module_imports()
    assert "dfa_fast.ops" in graph and "dfa_fast.kernels.reference" in graph
    for name, deps in graph.items():
        if name.startswith("dfa_fast.kernels"):
            outside = {d for d in deps if not d.startswith("dfa_fast.kernels")}
            assert not outside, f"{name} imports {outside} from dfa_fast"
    state = {}

    def visit(node, path):  # depth-first; a node met again on the current path is a circle
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                raise AssertionError("import circle: " + " -> ".join(path + [dep]))
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"
    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
