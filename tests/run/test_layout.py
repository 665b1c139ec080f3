"""The run's on-disk layout is spelled in ``docev.run`` only, and the packages import one way down."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "docev"
RUN = SRC / "run"

# Folder names of a run, caught where code joins them onto a path (``root / "logs"``).
RUN_FOLDERS = {"logs", "eval", "checkpoints", "pipeline", "export", "shards", "validate", "kfp"}
# Text that spells a run sub-path or a step-folder name inside a string (docstrings and comments are prose).
RUN_TEXT = re.compile(
    r"metrics\.jsonl|loss\.png|manifest\.jsonl|rejects\.jsonl|\.partial|\.manifest|step_\(|^\.?step_$"
    r"|^(logs|eval|checkpoints|pipeline|export|shards|validate)/"
)


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def run_spellings(path: Path) -> list[str]:
    """``file:line: text`` for each string or path join in ``path`` that spells a run sub-path."""
    tree = ast.parse(path.read_text())
    docs = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs:
            if RUN_TEXT.search(node.value):
                found.append(f"{path.relative_to(SRC)}:{node.lineno}: {node.value!r}")
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            right = node.right
            if isinstance(right, ast.Constant) and right.value in RUN_FOLDERS:
                found.append(f"{path.relative_to(SRC)}:{node.lineno}: / {right.value!r}")
    return found


def test_no_module_outside_docev_run_spells_a_run_path():
    found = [hit for p in sorted(SRC.rglob("*.py")) if RUN not in p.parents for hit in run_spellings(p)]
    assert found == []


def test_the_spelling_check_sees_what_it_must(tmp_path):
    # What the check must catch, and what it must let through (prose, the split name "eval").
    sample = SRC / "_probe_.py"
    sample.write_text(
        '"""logs/metrics.jsonl is where metrics go."""\n'
        "import re\n"
        'a = root / "logs" / "metrics.jsonl"\n'
        'b = f".step_{n}.partial"\n'
        'c = re.compile(r"step_(\\d+)")\n'
        'd = split == "eval"\n'
        'e = f"shards/eval"\n'
    )
    try:
        hits = run_spellings(sample)
    finally:
        sample.unlink()
    assert [h.split(":")[1] for h in hits] == ["3", "3", "4", "4", "5", "7"]


def test_one_publish_helper():
    """Every rename that publishes goes through ``docev.run.publish``."""
    found = [
        f"{p.relative_to(SRC)}:{n}"
        for p in sorted(SRC.rglob("*.py"))
        if p != RUN / "publish.py"
        for n, line in enumerate(p.read_text().splitlines(), start=1)
        if re.search(r"\bos\.(replace|rename)\(|\.rename\(", line)
    ]
    assert found == []


def _imports(path: Path) -> set[str]:
    """Every ``docev.*`` module the file imports, at top level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("docev"):
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("docev"))
    return out


def _package_imports(package: str) -> set[str]:
    folder = SRC / package.removeprefix("docev.").replace(".", "/")
    files = sorted(folder.rglob("*.py")) if folder.is_dir() else [folder.with_suffix(".py")]
    return {m for f in files for m in _imports(f)}


FORBIDDEN = [
    ("docev.training", "docev.k8s"),
    ("docev.export", "docev.training"),
    ("docev.evaluation", "docev.training"),
    ("docev.models", "docev.assets"),
    ("docev.data", "docev.validate"),
    ("docev.sources", "docev.data"),  # the source layer is below data and validate
    ("docev.sources", "docev.validate"),
    ("docev.run", "docev.training"),
    ("docev.run", "docev.models"),
]


@pytest.mark.parametrize(("importer", "imported"), FORBIDDEN, ids=[f"{a}->{b}" for a, b in FORBIDDEN])
def test_imports_run_one_way_down(importer, imported):
    bad = sorted(m for m in _package_imports(importer) if m == imported or m.startswith(imported + "."))
    assert bad == [], f"{importer} imports {bad}"


def test_data_and_validate_do_not_import_each_other_both_ways():
    data_to_validate = any(m.startswith("docev.validate") for m in _package_imports("docev.data"))
    validate_to_data = any(m.startswith("docev.data") for m in _package_imports("docev.validate"))
    assert not (data_to_validate and validate_to_data) and not data_to_validate


def test_docev_run_imports_no_torch():
    for path in RUN.rglob("*.py"):
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not {m for m in names if m.split(".")[0] in ("torch", "numpy", "torchtune")}, path


def test_the_checkpoint_folder_is_read_through_run_paths():
    """``checkpointer.output_dir`` may be unset: every reader asks ``run_paths(cfg).checkpoints`` (one default)."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        if RUN in path.parents or SRC / "config" in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "output_dir":
                inner = node.value
                if isinstance(inner, ast.Attribute) and inner.attr == "checkpointer":
                    found.append(f"{path.relative_to(SRC)}:{node.lineno}")
    assert found == []
