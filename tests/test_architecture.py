"""The import rules of docs/architecture.md, read from every .py file's source with `ast` (nothing is
imported). Each rule is a table below and a checker that turns one file's source into its violations;
each checker is also run on a small snippet that breaks its rule, so that no rule passes by accident.

The project's parts: the library `histo_retrieval` (its base modules and the subpackages data,
evaluation, training, search), `models`, `losses`, `utils.py`, the scripts at the root, KIMIA_data/
(the data tools), bench/ and tests/.
"""
from __future__ import annotations

import ast
import functools
import os
import re
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import pytest

REPO = Path(__file__).resolve().parents[1]
# Folders that hold no code of the project (hidden ones such as .venv, npm's packages, build outputs).
SKIPPED_FOLDERS = {"node_modules", "__pycache__", "build", "dist"}

# The part of the project a dotted module name belongs to: the longest prefix that matches.
PARTS = {
    "histo_retrieval": "base",  # histo_retrieval/*.py: errors, files, images, figures, runtime, distributed
    "histo_retrieval.data": "data",
    "histo_retrieval.encoders": "encoders",
    "histo_retrieval.evaluation": "evaluation",
    "histo_retrieval.training": "training",
    "histo_retrieval.search": "search",
    "models": "models",
    "losses": "losses",
    "utils": "utils",
    "train": "scripts", "train_traindata": "scripts", "multi_test": "scripts", "retrieve": "scripts",
    "demo": "scripts",
    "KIMIA_data": "KIMIA_data",
    "bench": "bench",
    "tests": "tests",
}
LIBRARY = ("base", "data", "encoders", "evaluation", "training", "search", "models", "losses")

# (a) Third-party packages that only one part may import (tests and bench/ use them to check and to
# time the search package against them).
CONFINED = {"faiss": "search", "openslide": "search", "tiffslide": "search", "timm": "encoders",
            "safetensors": "encoders", "pymilvus": "search", "milvus_lite": "search"}
CONFINEMENT_EXEMPT = ("tests", "bench")

# (b) The parts that may import histo_retrieval.search, besides the package itself: the command that
# runs it, its benchmarks and its tests. The rest of the library never does (rule (c) says it again).
SEARCH_IMPORTERS = ("scripts:retrieve", "bench", "tests")

# (c) The library's layers, bottom up (base <- data <- encoders <- evaluation <- training; evaluation <-
# search): what each may import of the project. models and losses lie under all of them (rule (d)).
LAYERS = {
    "base": {"base"},
    "data": {"base", "data"},
    "encoders": {"base", "data", "encoders", "models"},
    "evaluation": {"base", "data", "encoders", "evaluation", "models", "losses"},
    "training": {"base", "data", "encoders", "evaluation", "training", "models", "losses"},
    "search": {"base", "data", "encoders", "evaluation", "search", "models", "losses"},
}

# (d) The networks and the losses import nothing of the project but themselves.
SELF_CONTAINED = {"models": {"models"}, "losses": {"losses"}}

# (e) What the library (every part of LIBRARY) never imports.
NOT_FOR_THE_LIBRARY = {"utils", "scripts", "KIMIA_data", "bench", "tests"}

# (f) A script imports another script only to run it (orchestration), through its entry points:
# train_traindata.py trains each ratio, demo.py runs every command, bench/ times train.py and
# retrieve.py as their commands run. Tests may use any piece of a script: they test it.
ORCHESTRATION = {
    "scripts:train_traindata": {"train"},
    "scripts:demo": {"train", "retrieve", "multi_test"},
    "bench": {"train", "retrieve"},
}
ENTRY_POINTS = {"main", "get_args_parser", "command"}

# (g) Nothing edits the import path: the project is installed (pyproject.toml) or run from its root.
SYS_PATH_EDIT = re.compile(r"\bsys\s*\.\s*path\s*\.\s*(?:insert|append|extend)\s*\(")


# ----------------------------------------------------------------------------- reading the imports
class Import(NamedTuple):
    module: str  # absolute dotted name; for `from a import b`, a.b (b may be a module or a name in a)
    line: int


def module_name(path: str) -> str:
    """The dotted module name of a file given relative to the repository root (a/b/__init__.py -> a.b)."""
    parts = path[:-len(".py")].split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(module: str) -> str | None:
    """The project part of a dotted name (the longest prefix in PARTS); None for third-party modules."""
    matches = [prefix for prefix in PARTS if module == prefix or module.startswith(prefix + ".")]
    return PARTS[max(matches, key=len)] if matches else None


def label_of(path: str) -> str:
    """The name a file goes by in the tables: its part, or `scripts:<name>` for a root script."""
    module = module_name(path)
    part = part_of(module)
    return f"scripts:{module}" if part == "scripts" else str(part)


def imports(path: str, source: str) -> Iterator[Import]:
    """Every import statement of a file, anywhere in it (functions included), relative ones resolved."""
    package = module_name(path).split(".") if path.endswith("__init__.py") else module_name(path).split(".")[:-1]
    for node in ast.walk(ast.parse(source, filename=path)):
        if isinstance(node, ast.Import):
            yield from (Import(alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[:len(package) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            yield from (Import(f"{base}.{alias.name}" if alias.name != "*" else base, node.lineno)
                        for alias in node.names)


def project_files() -> list[str]:
    """Every .py file of the repository, as a path relative to its root."""
    found = []
    for folder, subfolders, files in os.walk(REPO):
        subfolders[:] = [f for f in subfolders
                         if not (f.startswith(".") or f in SKIPPED_FOLDERS or f.endswith(".egg-info"))]
        found += [Path(folder, name).relative_to(REPO).as_posix() for name in files if name.endswith(".py")]
    return sorted(found)


# ----------------------------------------------------------------------------- the rules, one file at a time
def confined_packages(path: str, source: str) -> list[str]:
    """(a) faiss, openslide and tiffslide imported outside their part."""
    if label_of(path) in CONFINEMENT_EXEMPT:
        return []
    return [f"{path}:{imp.line} imports {imp.module} (only histo_retrieval.{CONFINED[top]} may)"
            for imp in imports(path, source)
            for top in [imp.module.split(".")[0]] if top in CONFINED and part_of(module_name(path)) != CONFINED[top]]


def search_importers(path: str, source: str) -> list[str]:
    """(b) histo_retrieval.search imported from outside it, by a file not in SEARCH_IMPORTERS."""
    label = label_of(path)
    if label == "search" or label in SEARCH_IMPORTERS:
        return []
    return [f"{path}:{imp.line} imports {imp.module}" for imp in imports(path, source)
            if part_of(imp.module) == "search"]


def layer_imports(path: str, source: str) -> list[str]:
    """(c) A library layer importing a part of the project above it or beside it."""
    layer = label_of(path)
    if layer not in LAYERS:
        return []
    return [f"{path}:{imp.line} ({layer}) imports {imp.module} ({part_of(imp.module)})"
            for imp in imports(path, source)
            if part_of(imp.module) is not None and part_of(imp.module) not in LAYERS[layer]]


def self_contained(path: str, source: str) -> list[str]:
    """(d) models/ or losses/ importing anything of the project but itself."""
    part = label_of(path)
    if part not in SELF_CONTAINED:
        return []
    return [f"{path}:{imp.line} imports {imp.module}" for imp in imports(path, source)
            if part_of(imp.module) is not None and part_of(imp.module) not in SELF_CONTAINED[part]]


def library_imports_no_script(path: str, source: str) -> list[str]:
    """(e) The library importing utils, a script, the data tools, bench or the tests."""
    if label_of(path) not in LIBRARY:
        return []
    return [f"{path}:{imp.line} imports {imp.module}" for imp in imports(path, source)
            if part_of(imp.module) in NOT_FOR_THE_LIBRARY]


def script_imports(path: str, source: str) -> list[str]:
    """(f) A script imported by a file that may not run it, or used beyond its entry points."""
    label = label_of(path)
    if label == "tests":
        return []
    allowed = ORCHESTRATION.get(label, set())
    problems, aliases = [], {}
    for imp in imports(path, source):
        if part_of(imp.module) != "scripts":
            continue
        script, _, name = imp.module.partition(".")
        if script not in allowed:
            problems.append(f"{path}:{imp.line} imports the script {script}")
        elif name and name not in ENTRY_POINTS:
            problems.append(f"{path}:{imp.line} imports {script}.{name}, not an entry point")
    tree = ast.parse(source, filename=path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases.update({alias.asname or alias.name: alias.name for alias in node.names
                            if alias.name in allowed and "." not in alias.name})
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                and node.attr not in ENTRY_POINTS):
            problems.append(f"{path}:{node.lineno} uses {aliases[node.value.id]}.{node.attr}, not an entry point")
    return problems


def sys_path_edits(path: str, source: str) -> list[str]:
    """(g) sys.path edited anywhere, code or a script written out as text."""
    return [f"{path}:{source.count(chr(10), 0, match.start()) + 1} edits sys.path"
            for match in SYS_PATH_EDIT.finditer(source)]


RULES: dict[str, Callable[[str, str], list[str]]] = {
    "(a) faiss, openslide and tiffslide only in histo_retrieval.search": confined_packages,
    "(b) histo_retrieval.search imported only by retrieve.py, bench/ and tests/": search_importers,
    "(c) the library's layers import only downwards": layer_imports,
    "(d) models/ and losses/ import nothing of the project": self_contained,
    "(e) the library imports no script, utils, data tool, bench or test": library_imports_no_script,
    "(f) a script imports another only to run it": script_imports,
    "(g) no sys.path edits": sys_path_edits,
}


# ----------------------------------------------------------------------------- the repository
@functools.cache
def sources() -> dict[str, str]:
    """{path: source} of every .py file (a function, not a fixture: a failure shows no dict of sources)."""
    return {path: (REPO / path).read_text(encoding="utf-8") for path in project_files()}


def test_every_part_of_the_project_is_read() -> None:
    labels = {label_of(path) for path in sources()}
    assert {"base", "data", "evaluation", "training", "search", "models", "losses", "utils", "KIMIA_data", "bench",
            "tests", "scripts:train", "scripts:train_traindata", "scripts:multi_test", "scripts:retrieve",
            "scripts:demo"} <= labels
    assert "tests/test_architecture.py" in sources() and not any("node_modules" in path for path in sources())


@pytest.mark.parametrize("rule", list(RULES))
def test_the_repository_follows_the_rule(rule: str) -> None:
    violations = [problem for path, source in sources().items() for problem in RULES[rule](path, source)]
    assert not violations, f"{rule}: {len(violations)} violation(s):\n  " + "\n  ".join(violations)


# ----------------------------------------------------------------------------- each rule can fail
SYS_PATH = "sys.path"  # spelt in two pieces so that this file breaks no rule of its own
BROKEN = {
    "(a) faiss, openslide and tiffslide only in histo_retrieval.search": [
        ("histo_retrieval/evaluation/x.py", "def f():\n    import faiss\n"),
        ("retrieve.py", "from openslide.deepzoom import DeepZoomGenerator\n"),
        ("models/x.py", "import tiffslide as ts\n")],
    "(b) histo_retrieval.search imported only by retrieve.py, bench/ and tests/": [
        ("multi_test.py", "from histo_retrieval.search.index import SlideIndex\n"),
        ("histo_retrieval/training/x.py", "from histo_retrieval import search\n"),
        ("histo_retrieval/evaluation/x.py", "from ..search import slides\n")],
    "(c) the library's layers import only downwards": [
        ("histo_retrieval/files.py", "from histo_retrieval.data import datasets\n"),
        ("histo_retrieval/data/x.py", "from ..evaluation.checkpoint import load_model\n"),
        ("histo_retrieval/evaluation/x.py", "from histo_retrieval.training.loop import validate\n"),
        ("histo_retrieval/search/x.py", "import histo_retrieval.training.pretrained\n"),
        ("histo_retrieval/data/x.py", "import models\n")],
    "(d) models/ and losses/ import nothing of the project": [
        ("models/x.py", "from histo_retrieval.errors import UserError\n"),
        ("losses/x.py", "from models import build_model\n"),
        ("models/x.py", "from utils import pyplot\n")],
    "(e) the library imports no script, utils, data tool, bench or test": [
        ("histo_retrieval/figures.py", "from utils import save_figure\n"),
        ("histo_retrieval/training/loop.py", "import train\n"),
        ("histo_retrieval/search/x.py", "from KIMIA_data import synthetic\n")],
    "(f) a script imports another only to run it": [
        ("multi_test.py", "import train\n"),
        ("retrieve.py", "from multi_test import main\n"),
        ("train_traindata.py", "from train import build_datasets\n"),
        ("bench/x.py", "import retrieve\nretrieve.index_settings(None)\n"),
        ("KIMIA_data/x.py", "import demo\n")],
    "(g) no sys.path edits": [
        ("bench/x.py", f"import sys\n{SYS_PATH}.insert(0, '.')\n"),
        ("tests/x.py", f"SCRIPT = '''\nimport sys\n{SYS_PATH}.append(REPO)\n'''\n"),
        ("KIMIA_data/x.py", f"import sys\n{SYS_PATH} . extend(['..'])\n")],
}
FOLLOWED = {
    "(a) faiss, openslide and tiffslide only in histo_retrieval.search": [
        ("histo_retrieval/search/x.py", "import faiss\nfrom openslide import OpenSlide\nimport tiffslide\n"),
        ("tests/x.py", "import faiss\n")],
    "(b) histo_retrieval.search imported only by retrieve.py, bench/ and tests/": [
        ("retrieve.py", "from histo_retrieval.search.index import SlideIndex\n"),
        ("histo_retrieval/search/x.py", "from . import slides\n")],
    "(c) the library's layers import only downwards": [
        ("histo_retrieval/training/x.py", "from histo_retrieval.evaluation import checkpoint\nimport models, torch\n"),
        ("histo_retrieval/search/x.py", "from ..evaluation.embedder import Embedder\nfrom .slides import open_slide\n"),
        ("histo_retrieval/data/x.py", "from histo_retrieval import errors\nfrom .sampler import PKBatchSampler\n")],
    "(d) models/ and losses/ import nothing of the project": [
        ("models/x.py", "from .layers import PointwiseConv2d\nimport torch\n")],
    "(e) the library imports no script, utils, data tool, bench or test": [
        ("histo_retrieval/evaluation/x.py", "from histo_retrieval.figures import pyplot\n")],
    "(f) a script imports another only to run it": [
        ("demo.py", "import train, retrieve\ntrain.main(train.get_args_parser().parse_args([]))\n"
                    "retrieve.main(None)\n"),
        ("train_traindata.py", "import train\ntrain.main(None)\n"),
        ("bench/x.py", "from train import main\n")],
    "(g) no sys.path edits": [("tests/x.py", "import sys\nprint(sys.path[0])\n")],
}


@pytest.mark.parametrize("rule", list(RULES))
def test_each_rule_finds_a_snippet_that_breaks_it(rule: str) -> None:
    for path, source in BROKEN[rule]:
        problems = RULES[rule](path, source)
        assert len(problems) == 1 and problems[0].startswith(f"{path}:"), (path, source, problems)
    for path, source in FOLLOWED[rule]:
        assert RULES[rule](path, source) == [], (path, source)


def test_relative_imports_resolve_against_the_files_package() -> None:
    assert [i.module for i in imports("histo_retrieval/search/index.py", "from . import vector_index\n")] == \
        ["histo_retrieval.search.vector_index"]
    assert [i.module for i in imports("losses/__init__.py", "from .ms import MSLoss\n")] == ["losses.ms.MSLoss"]
    assert [i.module for i in imports("histo_retrieval/data/x.py", "from ..errors import UserError\n")] == \
        ["histo_retrieval.errors.UserError"]
    assert [part_of(m) for m in ("histo_retrieval.errors", "histo_retrieval.search", "train_traindata", "trainer",
                                 "torch")] == ["base", "search", "scripts", None, None]
