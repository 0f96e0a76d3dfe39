"""One-way imports (style guide, rule 3), read from the source with `ast`: leaves stay leaves,
cells <- layers <- model, data knows no model, nothing imports the CLI, and no torch.nn recurrent
module stands in for the hand-written cells."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lmtrain"
MODULES = sorted(path.stem for path in PACKAGE.glob("*.py"))
TORCH_RECURRENT = {"RNN", "GRU", "LSTM", "RNNCell", "GRUCell", "LSTMCell", "RNNBase", "RNNCellBase"}
TORCH_RECURRENT_FUNCTIONS = {"lstm", "gru", "rnn_tanh", "rnn_relu", "lstm_cell", "gru_cell", "rnn_tanh_cell",
                             "rnn_relu_cell"}


def tree(module: str) -> ast.Module:
    path = PACKAGE / f"{module}.py"
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def imported_names(source: ast.Module) -> set[str]:
    """Every module imported anywhere (functions included), as dotted names; `from lmtrain import x`
    counts as `lmtrain.x` and relative imports are resolved against `lmtrain`."""
    names: set[str] = set()
    for node in ast.walk(source):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = "lmtrain" + (f".{base}" if base else "")
            names.add(base)
            if base == "lmtrain":
                names.update(f"lmtrain.{alias.name}" for alias in node.names)
    return names


def lmtrain_imports(module: str) -> set[str]:
    """The lmtrain modules that `module` imports, by short name (`errors`, `cells`, ...)."""
    return {name.split(".")[1] for name in imported_names(tree(module))
            if name.startswith("lmtrain.") and name.count(".") >= 1}


def third_party_roots(module: str) -> set[str]:
    return {name.split(".")[0] for name in imported_names(tree(module))}


def dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{dotted(node.value)}.{node.attr}"
    return "?"


def torch_recurrent_uses(source: ast.Module) -> list[str]:
    """`nn.LSTM`, `torch.nn.GRUCell`, `from torch.nn import RNN`, `torch.lstm`, `_VF.gru`, ..."""
    found = []
    for node in ast.walk(source):
        if isinstance(node, ast.Attribute):
            base = dotted(node.value)
            if node.attr in TORCH_RECURRENT and (base == "nn" or base.endswith(".nn") or ".nn." in base):
                found.append(dotted(node))
            if node.attr in TORCH_RECURRENT_FUNCTIONS and base.split(".")[-1] in ("torch", "_VF"):
                found.append(dotted(node))
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("torch"):
            found.extend(f"{node.module}.{a.name}" for a in node.names
                         if a.name in TORCH_RECURRENT | TORCH_RECURRENT_FUNCTIONS | {"rnn", "_VF"})
        elif isinstance(node, ast.Import):
            found.extend(a.name for a in node.names if a.name.startswith("torch.nn.modules.rnn"))
    return found


# --- the checker itself ----------------------------------------------------------------------------

def test_checker_sees_imports_everywhere():
    source = ast.parse("import os\nfrom lmtrain.cells import X\nfrom . import data\nfrom .model import Y\n"
                       "def f():\n    import lmtrain.cli\n    from lmtrain import sampling\n")
    assert imported_names(source) == {"os", "lmtrain.cells", "lmtrain", "lmtrain.data", "lmtrain.model",
                                      "lmtrain.cli", "lmtrain.sampling"}


def test_checker_sees_torch_recurrent_modules():
    source = ast.parse("import torch\nfrom torch import nn\nfrom torch.nn import LSTM\n"
                       "a = nn.GRU(1, 2)\nb = torch.nn.RNNCell(1, 2)\nc = torch.lstm\nd = nn.Linear(1, 2)\n"
                       "e = self.cell.LSTMCell\n")
    assert sorted(torch_recurrent_uses(source)) == ["nn.GRU", "torch.lstm", "torch.nn.LSTM", "torch.nn.RNNCell"]


def test_package_modules_found():
    assert {"errors", "config", "tokenizer", "data", "cells", "layers", "model", "evaluate", "sampling",
            "checkpoint", "optim", "train", "cli", "__main__", "__init__"} <= set(MODULES)


# --- the rules -------------------------------------------------------------------------------------

@pytest.mark.parametrize("module", ["errors", "config", "tokenizer"])
def test_leaves_import_only_errors(module: str):
    assert lmtrain_imports(module) <= {"errors"} - {module}


@pytest.mark.parametrize("module", ["config", "tokenizer", "errors", "__init__"])
def test_leaves_import_no_torch(module: str):
    assert "torch" not in third_party_roots(module)


def test_config_loads_without_torch():
    code = ("import sys, lmtrain, lmtrain.config, lmtrain.tokenizer\n"
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            cwd=PACKAGE.parent, check=True)
    assert result.stdout.strip() == "False"


def test_cells_import_only_the_torch_internals():
    assert lmtrain_imports("cells") <= {"torch_internals"}


def test_layers_import_only_cells_their_backward_and_the_config_defaults():
    assert lmtrain_imports("layers") == {"cells", "backward", "regularization", "config"}


@pytest.mark.parametrize("module", ["regularization", "memory", "threads", "torch_internals"])
def test_leaves_of_the_model_and_speed_import_no_lmtrain_module(module: str):
    assert lmtrain_imports(module) == set()


def test_the_speed_layer_imports_only_itself():
    assert lmtrain_imports("gemm") <= {"torch_internals"}
    assert lmtrain_imports("kernel_build") <= {"torch_internals"}
    assert lmtrain_imports("kernels") <= {"kernel_build", "torch_internals", "errors"}


def test_backward_imports_only_cells_gemm_and_kernels():
    assert lmtrain_imports("backward") <= {"cells", "gemm", "kernels"}


def test_loss_imports_only_gemm_and_kernels():
    assert lmtrain_imports("loss") <= {"gemm", "kernels"}


def test_model_imports_only_layers_config_tokenizer():
    assert lmtrain_imports("model") <= {"layers", "config", "tokenizer", "regularization", "gemm", "loss"}
    assert "layers" in lmtrain_imports("model")


@pytest.mark.parametrize("module", ["data", "streaming", "cache"])
def test_data_knows_tokens_not_models(module: str):
    assert not lmtrain_imports(module) & {"model", "cells", "layers", "backward", "train", "sampling", "evaluate",
                                          "cli", "checkpoint", "optim", "rundir", "interop", "diagnose"}


@pytest.mark.parametrize("module", [m for m in MODULES if m not in ("cli", "__main__")])
def test_nothing_imports_the_cli(module: str):
    assert "cli" not in lmtrain_imports(module)


def test_main_runs_the_cli():
    assert lmtrain_imports("__main__") == {"cli"}


@pytest.mark.parametrize("module", [m for m in MODULES if m != "interop"])  # interop maps weights to/from torch.nn
def test_no_torch_recurrent_modules(module: str):
    assert torch_recurrent_uses(tree(module)) == []


def test_interop_imports_only_cells_and_layers():
    assert lmtrain_imports("interop") <= {"cells", "layers"}


@pytest.mark.parametrize("module", [m for m in MODULES if m != "interop"])
def test_nothing_imports_interop(module: str):
    assert "interop" not in lmtrain_imports(module)


def test_distributed_knows_processes_and_data_not_models():
    assert lmtrain_imports("distributed") <= {"data", "errors"}


def test_rundir_and_diagnose_stay_above_the_model():
    assert lmtrain_imports("rundir") <= {"checkpoint", "errors"}
    assert "train" not in lmtrain_imports("diagnose") and "cli" not in lmtrain_imports("diagnose")


def test_imports_are_acyclic():
    graph = {module: lmtrain_imports(module) - {module} for module in MODULES}
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        if state.get(module) == 1:
            raise AssertionError(f"import cycle: {' -> '.join(path + [module])}")
        if state.get(module) == 2:
            return
        state[module] = 1
        for dependency in graph.get(module, ()):
            visit(dependency, path + [module])
        state[module] = 2

    for module in MODULES:
        visit(module, [])
