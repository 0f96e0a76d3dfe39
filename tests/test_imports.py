"""One-way imports, read from the source with `ast`, per folder: the speed layer
knows no model, the backpropagation knows tensors and the speed layer only, the model knows no
data beyond the tokenizer's constants, data knows no model, nothing imports the CLI, and no torch.nn
recurrent module stands in for the hand-written cells. docs/architecture.md draws the same graph."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "lmtrain"
# Dotted names below lmtrain: "config", "model.cells", "model" (model/__init__.py), "__main__".
MODULES = sorted(".".join(path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__")
                 for path in PACKAGE.rglob("*.py"))
TORCH_RECURRENT = {"RNN", "GRU", "LSTM", "RNNCell", "GRUCell", "LSTMCell", "RNNBase", "RNNCellBase"}
TORCH_RECURRENT_FUNCTIONS = {"lstm", "gru", "rnn_tanh", "rnn_relu", "lstm_cell", "gru_cell", "rnn_tanh_cell",
                             "rnn_relu_cell"}


def module_path(module: str) -> Path:
    path = PACKAGE.joinpath(*module.split(".")).with_suffix(".py")
    return path if path.exists() else PACKAGE.joinpath(*module.split("."), "__init__.py")


def tree(module: str) -> ast.Module:
    path = module_path(module)
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
            if base == "lmtrain" or base.startswith("lmtrain."):  # `from lmtrain.speed import gemm`
                names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def lmtrain_imports(module: str) -> set[str]:
    """The lmtrain modules that `module` imports, by dotted name below lmtrain (`errors`, `model.cells`):
    a package counts only when nothing below it is named (`from lmtrain.model.cells import Cell` is
    `model.cells`, not also `model`)."""
    named = {name.removeprefix("lmtrain.") for name in imported_names(tree(module)) if name.startswith("lmtrain.")}
    found = {name for name in named if name in MODULES}
    return {name for name in found if not any(other.startswith(name + ".") for other in found)}


def folder(module: str) -> str:
    """The unit a module belongs to: its folder (`model`, `speed`, ...) or, at the top, itself."""
    return module.split(".")[0]


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
    source = ast.parse("import os\nfrom lmtrain.model.cells import X\nfrom . import data\nfrom .model import Y\n"
                       "def f():\n    import lmtrain.cli\n    from lmtrain.evaluation import sampling\n")
    assert imported_names(source) == {"os", "lmtrain.model.cells", "lmtrain.model.cells.X", "lmtrain", "lmtrain.data",
                                      "lmtrain.model", "lmtrain.model.Y", "lmtrain.cli", "lmtrain.evaluation",
                                      "lmtrain.evaluation.sampling"}


def test_checker_sees_torch_recurrent_modules():
    source = ast.parse("import torch\nfrom torch import nn\nfrom torch.nn import LSTM\n"
                       "a = nn.GRU(1, 2)\nb = torch.nn.RNNCell(1, 2)\nc = torch.lstm\nd = nn.Linear(1, 2)\n"
                       "e = self.cell.LSTMCell\n")
    assert sorted(torch_recurrent_uses(source)) == ["nn.GRU", "torch.lstm", "torch.nn.LSTM", "torch.nn.RNNCell"]


def test_package_modules_found():
    assert {"errors", "config", "checkpoint", "cli", "__main__", "model.cells", "model.layers",
            "model.language_model", "backprop.rnn", "backprop.gru", "backprop.lstm", "speed.gemm",
            "data.tokenizer", "training.trainer", "evaluation.sampling"} <= set(MODULES)


def test_checker_resolves_folders():
    source = ast.parse("from lmtrain.speed import gemm, kernels\nfrom lmtrain.model.cells import Cell\n")
    assert imported_names(source) >= {"lmtrain.speed.gemm", "lmtrain.speed.kernels", "lmtrain.model.cells"}


# --- the rules, folder by folder -------------------------------------------------------------------

# Each folder (or top-level module) and what it may import, bottom to top. A folder may always import
# itself. Read as layers: errors, files, config | speed | backprop | data | model | checkpoint |
# evaluation | training | cli.
ALLOWED = {
    "errors": set(),
    "files": {"errors"},
    "config": {"errors"},
    "speed": {"errors", "files"},
    "backprop": {"speed"},
    "data": {"config", "errors", "files"},
    "model": {"backprop", "speed", "config", "data", "errors"},
    "checkpoint": {"model", "data", "speed", "config", "errors", "files"},
    "evaluation": {"checkpoint", "model", "data", "speed", "config", "errors", "files"},
    "training": {"evaluation", "checkpoint", "model", "data", "speed", "config", "errors", "files"},
    "cli": {"training", "evaluation", "checkpoint", "model", "data", "speed", "config", "errors", "files"},
    "__main__": {"cli"},
    "__init__": set(),
}


@pytest.mark.parametrize("module", MODULES)
def test_each_folder_imports_only_the_folders_below_it(module: str):
    unit = folder(module) if module != "__init__" else "__init__"
    assert unit in ALLOWED, f"{module}: a new folder needs its place in ALLOWED"
    assert {folder(name) for name in lmtrain_imports(module)} - {unit} <= ALLOWED[unit]


def test_the_layers_are_acyclic():
    order = list(ALLOWED)
    for unit, below in ALLOWED.items():
        assert all(order.index(other) < order.index(unit) for other in below), unit


def test_the_model_reads_only_the_tokenizers_constants_from_data():
    assert {name for module in MODULES if folder(module) == "model"
            for name in lmtrain_imports(module) if folder(name) == "data"} == {"data.tokenizer"}


CONFIG = [module for module in MODULES if folder(module) == "config"]


@pytest.mark.parametrize("module", ["errors", *CONFIG, "data.tokenizer"])
def test_leaves_import_only_errors(module: str):
    """The config folder's modules import one another and `errors`; the other leaves `errors` alone."""
    outside = {name for name in lmtrain_imports(module) if folder(name) != "config" or module not in CONFIG}
    assert outside <= {"errors"} - {module}


@pytest.mark.parametrize("module", [*CONFIG, "data.tokenizer", "errors", "__init__", "model", "backprop", "speed",
                                    "data", "training", "evaluation"])
def test_leaves_and_package_files_import_no_torch(module: str):
    assert "torch" not in third_party_roots(module)


def test_config_loads_without_torch():
    code = ("import sys, lmtrain, lmtrain.config, lmtrain.data.tokenizer\n"
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                            cwd=PACKAGE.parent, check=True)
    assert result.stdout.strip() == "False"


def test_cells_import_only_the_torch_internals_the_stacking_and_the_argument_checks():
    assert lmtrain_imports("model.cells") <= {"speed.torch_internals", "backprop.stacking", "model.arguments"}


@pytest.mark.parametrize("module", ["model.arguments", "model.regularization", "speed.memory", "speed.threads",
                                    "speed.torch_internals", "backprop.stacking"])
def test_leaves_of_the_model_and_speed_import_no_lmtrain_module(module: str):
    assert lmtrain_imports(module) == set()


@pytest.mark.parametrize("module", [m for m in MODULES if m not in ("cli", "__main__")])
def test_nothing_imports_the_cli(module: str):
    assert "cli" not in lmtrain_imports(module)


def test_main_runs_the_cli():
    assert lmtrain_imports("__main__") == {"cli"}


@pytest.mark.parametrize("module", [m for m in MODULES if m != "evaluation.interop"])  # maps weights to/from torch.nn
def test_no_torch_recurrent_modules(module: str):
    assert torch_recurrent_uses(tree(module)) == []


def test_interop_imports_only_the_model():
    assert {folder(name) for name in lmtrain_imports("evaluation.interop")} <= {"model"}


@pytest.mark.parametrize("module", [m for m in MODULES if m != "evaluation.interop"])
def test_nothing_imports_interop(module: str):
    assert "evaluation.interop" not in lmtrain_imports(module)


def test_distributed_knows_processes_and_data_not_models():
    assert lmtrain_imports("training.distributed") <= {"data.dataset", "errors"}


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


def test_the_architecture_page_is_current():
    result = subprocess.run([sys.executable, str(PACKAGE.parent / "scripts" / "architecture.py"), "--check"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
