"""The README's commands run as written, and the guides' commands, links and module names hold.

Each command line of the README's bash blocks is either run here, as written, or listed in NOT_RUN with
the reason. A command line of the README or a guide (in a bash block or inline code) that calls a
script of the project uses only flags that the script's `--help` lists. Every relative link of the
README and the guides points at a file that exists and, with `#anchor`, at one of its headings.
docs/architecture.md names every module of the library and none that does not exist.
"""
from __future__ import annotations

import ast
import csv
import os
import re
import shlex
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
GUIDES = sorted((REPO / "docs").glob("*.md"))

# The README's commands that this file deliberately does not run, and why.
NOT_RUN = {
    "python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements.txt && python3 demo.py":
        "installs every requirement, then trains for minutes: tests/test_demo.py checks the line's form and runs "
        "demo.py in a reduced setting",
    "python3 -m venv .venv && . .venv/bin/activate && pip install -r requirements.txt && npm ci --prefix web "
    "&& python3 -m pytest -q":
        "installs every requirement and runs the whole test suite: .ci/run runs it on a clean clone",
}

# The README's data step, run in a copy of KIMIA_data/.
DATA_STEP = ("python3 KIMIA_data/synthetic.py --classes 4 --train-per-class 8 --test-per-class 4",
             "python3 KIMIA_data/data_process.py KIMIA_data/synthetic_source")

# Which `--help` lists a command's flags: the script (with its subcommand) or module it runs.
SCRIPTS = ("demo.py", "train.py", "train_traindata.py", "multi_test.py", "retrieve.py",
           "KIMIA_data/data_process.py", "KIMIA_data/synthetic.py")
MODULES = re.compile(r"^(models|bench\.\w+)$")


def bash_blocks(path: Path) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", path.read_text(), re.DOTALL | re.MULTILINE)


def command_lines(block: str) -> list[str]:
    """The block's command lines as written: continuations joined, trailing comments and blank lines
    left out."""
    joined = re.sub(r"\\\n\s*", " ", block)
    return [line for line in (re.sub(r"(^|\s+)#.*$", "", raw).strip() for raw in joined.splitlines()) if line]


def readme_commands() -> list[str]:
    return [line for block in bash_blocks(README) for line in command_lines(block)]


def inline_commands(path: Path) -> list[str]:
    """Inline code outside fenced blocks that runs a script: `python3 ...`, `torchrun ...`, `VAR=x python3 ...`."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.DOTALL | re.MULTILINE)
    spans = re.findall(r"`([^`\n]+)`", text)
    return [span for span in spans if span.startswith(("python3 ", "torchrun ")) or " python3 " in span]


def is_help(line: str) -> bool:
    return bool(re.fullmatch(r"python3 (\S+\.py( \w+)?|-m [\w.]+) --help", line))


def environment() -> dict[str, str]:
    """This checkout first on the path: the virtual environment may hold another copy of the library."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def run(line: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(line, shell=True, cwd=cwd, env=environment(), capture_output=True, text=True,
                          timeout=timeout)


@lru_cache(maxsize=None)
def help_text(target: tuple[str, ...]) -> str:
    """`--help` of a script (and subcommand) or module, run from the repository root."""
    result = run(shlex.join(["python3", *target, "--help"]), REPO)
    assert result.returncode == 0, f"{shlex.join(target)} --help failed:\n{result.stderr}"
    return result.stdout


def help_target_and_flags(line: str) -> tuple[tuple[str, ...], list[str]] | None:
    """The script or module a command line runs, and the flags it passes to it (up to a bare `--`,
    after which bench.real_data passes train.py's flags on)."""
    words = [word.strip("[]") for word in shlex.split(line.split(" #")[0].replace("|", " "))]
    for i, word in enumerate(words):
        if word in SCRIPTS:
            target, rest = (word,), words[i + 1:]
            if word == "retrieve.py" and rest and not rest[0].startswith("-"):
                target, rest = (word, rest[0]), rest[1:]
            break
        if word == "-m" and i + 1 < len(words) and MODULES.match(words[i + 1]):
            target, rest = ("-m", words[i + 1]), words[i + 2:]
            break
    else:
        return None
    if "--" in rest:
        rest = rest[:rest.index("--")]
    return target, [word.split("=")[0] for word in rest if re.fullmatch(r"--[a-z][\w-]*(=.*)?", word)]


def every_command(paths: list[Path]) -> list[tuple[str, str]]:
    return [(path.name, line) for path in paths
            for line in [*(line for block in bash_blocks(path) for line in command_lines(block)),
                         *inline_commands(path)]]


# ----------------------------------------------------------------------------- the README as a whole
def test_readme_fits_on_a_few_screens_and_states_its_versions():
    text = README.read_text()
    assert len(text.splitlines()) <= 220
    assert "Python 3.10" in text and "Node.js 18" in text and "python3-venv" in text
    assert "(Xeon)" not in text, "a machine belongs in a benchmark's machine column, nowhere else"


def test_every_readme_command_is_run_here_or_listed_as_not_run():
    commands = readme_commands()
    run_here = [line for line in commands
                if is_help(line) or line in DATA_STEP or line.startswith("python3 multi_test.py demo_output/model/")]
    left = [line for line in commands if line not in run_here and line not in NOT_RUN]
    assert not left, f"README commands neither run by tests/test_readme.py nor listed in NOT_RUN: {left}"
    assert set(NOT_RUN) <= set(commands), "NOT_RUN lists a command the README no longer has"


# ----------------------------------------------------------------------------- the README's commands, run
@pytest.mark.slow
@pytest.mark.parametrize("line", [line for line in readme_commands() if is_help(line)])
def test_readme_help_command_runs_as_written(line):
    result = run(line, REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:") and "--help" in result.stdout
    target = shlex.split(line)[1:-1]
    if target[-1] in ("index", "query", "serve"):
        assert "--index" in result.stdout and "--device" in result.stdout


def test_readme_data_step_runs_as_written(tmp_path):
    """The README's synthetic source and data_process.py, in a copy of KIMIA_data/ (the scripts write
    beside themselves) with this checkout's library on the path."""
    commands = readme_commands()
    assert [line for line in commands if line in DATA_STEP] == list(DATA_STEP), "the README's data step changed"
    (tmp_path / "KIMIA_data").mkdir()
    for script in ("__init__.py", "data_process.py", "synthetic.py"):
        shutil.copy(REPO / "KIMIA_data" / script, tmp_path / "KIMIA_data" / script)
    outputs = []
    for line in DATA_STEP:
        result = run(line, tmp_path)
        assert result.returncode == 0, f"{line}\n{result.stdout}\n{result.stderr}"
        outputs.append(result.stdout)
    assert "48 written, 0 already complete" in outputs[1]

    from PIL import Image
    data = tmp_path / "KIMIA_data"
    for split, per_class in (("train", 8), ("test", 4)):
        assert sorted(p.name for p in (data / split).iterdir()) == ["s0", "s1", "s2", "s3"]
        for folder in (data / split).iterdir():
            pngs = sorted(folder.glob("*.png"))
            assert len(pngs) == per_class and all(p.name.startswith(f"{folder.name}_") for p in pngs)
            with Image.open(pngs[0]) as image:
                assert image.size == (300, 300) and image.mode == "RGB"
    with open(data / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 * (8 + 4) and {row["split"] for row in rows} == {"train", "test"}


@pytest.mark.slow
def test_readme_multi_test_command_runs_as_written_on_a_folder_like_the_demos(tmp_path, make_images, write_checkpoint):
    """`python3 multi_test.py demo_output/model/ ...` on a folder laid out as demo.py leaves it: the
    best-validation file (`--keep-best 1`) and se_resnet50_MSLoss_checkpoint.pth, over demo_output/KIMIA_data."""
    line = next(line for line in readme_commands() if line.startswith("python3 multi_test.py demo_output/model/"))
    shutil.copy(REPO / "multi_test.py", tmp_path / "multi_test.py")
    data = tmp_path / "demo_output" / "KIMIA_data"
    make_images(data / "train", {"s0": 3, "s1": 3, "s2": 3}, seed=1)
    make_images(data / "test", {"s0": 3, "s1": 3, "s2": 3}, seed=2)
    model = tmp_path / "demo_output" / "model"
    model.mkdir()
    write_checkpoint(model / "se_resnet50_MSLoss_0.4000.pth", "se_resnet50", val_loss=0.4, epoch=3, attention=False)
    write_checkpoint(model / "se_resnet50_MSLoss_checkpoint.pth", "se_resnet50", val_loss=0.45, best_val_loss=0.4,
                     epoch=4, attention=False)

    result = run(line, tmp_path)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert "se_resnet50_MSLoss_0.4000.pth [se_resnet50, protocol test, selected by validation]" in result.stdout
    with open(model / "results.csv", newline="") as f:
        rows = {(row["checkpoint"], row["protocol"]): row for row in csv.DictReader(f)}
    names = ("se_resnet50_MSLoss_checkpoint.pth", "se_resnet50_MSLoss_0.4000.pth")
    assert set(rows) == {(name, protocol) for name in names for protocol in ("test", "train")}
    assert rows[("se_resnet50_MSLoss_0.4000.pth", "test")]["selected_by"] == "validation"
    assert rows[("se_resnet50_MSLoss_checkpoint.pth", "test")]["selected_by"] == "last_epoch"
    for row in rows.values():
        assert 0 <= float(row["eta_total"]) <= float(row["eta_p"]) <= 1
    assert (model / "confusion" / "se_resnet50_MSLoss_0.4000_test.csv").is_file()


# ----------------------------------------------------------------------------- the guides
@pytest.mark.slow
@pytest.mark.parametrize("path", [README, *GUIDES], ids=lambda p: p.name)
def test_every_flag_a_command_passes_is_in_its_help(path):
    checked = 0
    for _, line in every_command([path]):
        found = help_target_and_flags(line)
        if found is None:
            continue
        target, flags = found
        text = help_text(target)
        unknown = [flag for flag in flags if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text)]
        assert not unknown, f"{path.name}: `{line}` passes {unknown}, which `{shlex.join(target)} --help` does not list"
        checked += 1
    if path in (README, REPO / "docs" / "reproduction.md"):
        assert checked >= 5


def heading_anchors(path: Path) -> set[str]:
    """GitHub's anchors: lower case, punctuation but `-` and `_` dropped, spaces to `-`."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.DOTALL | re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#+ (.+)$", text, re.MULTILINE)}


@pytest.mark.parametrize("path", [README, *GUIDES], ids=lambda p: p.name)
def test_every_relative_link_points_at_a_file_and_heading_that_exist(path):
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.DOTALL | re.MULTILINE)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if target.startswith(("http://", "https://", "mailto:")):
            continue
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        assert linked.exists(), f"{path.name} links to {target}, which does not exist"
        if anchor and linked.suffix == ".md":
            assert anchor in heading_anchors(linked), f"{path.name} links to {target}: no such heading"


def test_the_readme_links_the_paper_the_data_set_and_the_reference_code():
    text = README.read_text()
    assert "IEEE BIBM 2019" in text or "(BIBM) 2019" in text
    assert "pp. 914-919" in text and "Methods, 2020" in text
    assert "https://kimialab.uwaterloo.ca/kimia/index.php/pathology-images-kimia-path24/" in text
    assert "https://github.com/easonyang1996/DML_HistoImgRetrieval" in text
    for guide in ("reproduction", "own_tissue", "slide_search", "search_page", "benchmarks", "architecture"):
        assert f"(docs/{guide}.md" in text, f"the README does not link docs/{guide}.md"


def test_architecture_names_every_module_of_the_library_and_no_other():
    text = (REPO / "docs" / "architecture.md").read_text()
    named = set(re.findall(r"`(histo_retrieval/[\w/]+\.py)`", text))
    modules = {str(p.relative_to(REPO)) for p in (REPO / "histo_retrieval").rglob("*.py") if p.name != "__init__.py"}
    assert named == modules, f"missing from docs/architecture.md: {modules - named}; not there: {named - modules}"
    for package in ("histo_retrieval.data", "histo_retrieval.evaluation", "histo_retrieval.training",
                    "histo_retrieval.search"):
        assert re.search(rf"^\| `{re.escape(package)}` \|", text, re.MULTILINE), f"no row for {package}"


SUBPACKAGES = ("histo_retrieval.data", "histo_retrieval.evaluation", "histo_retrieval.training",
               "histo_retrieval.search")


def package_rows() -> dict[str, tuple[str, str]]:
    """docs/architecture.md's package table: package -> (its "may import" cell, its "may not import" cell)."""
    text = (REPO / "docs" / "architecture.md").read_text()
    section = text.split("## The packages and what they may import", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for cells in (line.split(" | ") for line in section.splitlines() if line.startswith("| `")):
        package = re.match(r"\| `([\w.]+)/?`", cells[0])
        if package and len(cells) == 5:
            rows[package[1]] = (cells[2], cells[3])
    return rows


def imports_of(folder: Path, recursive: bool) -> list[tuple[str, str]]:
    """(file, module) for every absolute import of the Python files of a folder."""
    found = []
    for path in sorted(folder.rglob("*.py") if recursive else folder.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else [])
            found += [(str(path.relative_to(REPO)), name) for name in names]
    return found


def test_architecture_says_what_each_package_may_not_import_and_the_code_agrees():
    rows = package_rows()
    assert set(SUBPACKAGES) | {"histo_retrieval", "models", "losses"} <= set(rows)
    short = {name.rsplit(".", 1)[1]: name for name in SUBPACKAGES} | {"models": "models", "losses": "losses",
                                                                          "utils": "utils"}
    for package, (may, may_not) in rows.items():
        if package not in (*SUBPACKAGES, "histo_retrieval", "models", "losses"):
            continue
        forbidden = {short[token] for token in re.findall(r"`(\w+)`", may_not) if token in short}
        if "any subpackage" in may_not:
            forbidden |= set(SUBPACKAGES)
        if "nothing of the project" in may:
            forbidden |= {"histo_retrieval", "models", "losses", "utils"} - {package}
        assert forbidden, f"docs/architecture.md gives {package} nothing it may not import"
        folder = REPO / package.replace(".", "/")
        for path, module in imports_of(folder, recursive=package != "histo_retrieval"):
            assert not any(module == name or module.startswith(name + ".") for name in forbidden), \
                f"{path} imports {module}, which docs/architecture.md says {package} may not import"
