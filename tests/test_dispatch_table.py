"""The one chooser (`dfa_fast.ops.TABLE`): every operation gets the expected implementation for a
CPU float32 call, bfloat16 inputs, bf16 autocast, a data-parallel gather and (under the Triton
interpreter) Triton; DFA_KERNELS forces each backend; a swap across ranks always runs the reference.
Every implementation of a head and of the weighting has the contract's parameters. And the house
has no import circle, and `kernels/` imports nothing from `dfa_fast`."""
import ast
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dfa_fast import ops
from dfa_fast.kernels import numba_head, numba_weighting, onednn_linear, reference

REPO = Path(__file__).resolve().parents[1]
OPERATIONS = ("cross_entropy", "disent_head", "lff_head", "linear_relu_chain")
ONEDNN = "onednn" if onednn_linear.available() else "torch"
# operation: (fp32, bf16 inputs, bf16 autocast, gather) on a CPU without DFA_KERNELS.
CPU_DEFAULT = {
    "cross_entropy": ("torch",) * 4,
    # Other dtypes and a gather: the reference (the compiled head takes float32 only).
    "disent_head": ("numba", "torch", "numba", "torch"),
    "lff_head": ("numba",) * 4,  # the reference's losses with the numba EMA pass
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
    z_b, label = args[1], args[2]
    perm = torch.arange(len(label))
    *head, swap, settings = args
    assert swap is None
    # The same swap within the batch runs the compiled head (or Triton, when forced) ...
    within = ops.choose("disent_head", *head, reference.Swap(perm), settings, **kwargs)
    assert within.name == {"": "numba", "fused": "numba", "triton": "triton",
                           "torch": "torch"}[forced]
    # ... one over the global batch (swap.source) the reference.
    impl = ops.choose("disent_head", *head, reference.Swap(perm, (z_b, label)), settings,
                      **kwargs)
    assert impl.name == "torch"


def test_the_ops_command_prints_the_table():
    done = subprocess.run([sys.executable, "-m", "dfa_fast", "ops"], capture_output=True,
                          text=True, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    assert "| disent_head | numba | torch | numba | torch |" in done.stdout
    assert "| lff_head | numba | numba | numba | numba |" in done.stdout
    assert "torch " + torch.__version__ in done.stdout


def parameters(function, ignore=()) -> tuple[str, ...]:
    """Return the parameter names of ``function`` in order, without those in ``ignore``."""
    return tuple(name for name in inspect.signature(function).parameters if name not in ignore)


def test_every_implementation_has_the_contracts_parameters():
    # kernels/reference.py defines the contract; the numba, Triton and chooser functions take the
    # same parameters by the same names (the reference's lff_head also takes ``weigh``).
    head = pytest.importorskip("dfa_fast.kernels.head")
    weighting = pytest.importorskip("dfa_fast.kernels.weighting")
    triton_ops = pytest.importorskip("dfa_fast.kernels.triton_ops")
    disent = parameters(reference.disent_head)
    assert disent == ("z_i", "z_b", "label", "index", "fc_i", "fc_b", "state", "swap",
                      "settings")
    for function in (numba_head.disent_head, numba_head.usable, head.disent_head,
                     triton_ops.disent_head, ops.disent_head):
        assert parameters(function) == disent, function.__module__
    lff = parameters(reference.lff_head, ignore=("weigh",))
    assert lff == ("logits_d", "logits_b", "label", "index", "state", "settings")
    assert "weigh" in parameters(reference.lff_head)
    for function in (weighting.lff_head, triton_ops.lff_head, ops.lff_head):
        assert parameters(function) == lff, function.__module__
    weights = parameters(reference.sample_weights)
    assert weights == ("state", "index", "label", "ce_i", "ce_b")
    for function in (numba_weighting.sample_weights, weighting.sample_weights,
                     triton_ops.sample_weights):
        assert parameters(function) == weights, function.__module__
    difficulty = parameters(reference.relative_difficulty)
    assert difficulty == ("state", "index", "label")
    assert parameters(ops.relative_difficulty) == difficulty
    assert parameters(numba_weighting.takes) == ("state",)


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
