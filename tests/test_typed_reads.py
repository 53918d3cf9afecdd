"""The storage contract is read through shards/ only, and its constants are defined once; the run
directory's files are named in engine/rundir.py only.

Every .py outside shards/ and tests/ is parsed (ast, nothing imported) and must not

* call or import ``load_manifest`` / ``select_shards`` (the dict API; use
  ``spinestream.shards.manifest.read_manifest(root)`` and ``Manifest.select``),
* ``read_parquet`` (or pyarrow's ``read_table`` / ``ParquetFile``) a shard-set table: a ``Layout``
  path (``.studies`` / ``.slices`` / ``.truth``) or a path naming ``studies.parquet`` /
  ``slices.parquet`` / ``truth.parquet`` (use ``spinestream.shards.tables.read_study_table`` /
  ``read_slice_table`` / ``read_label_table``),
* ``json.load(s)`` the manifest (a ``Layout(...).manifest`` or a path naming ``manifest.json``),
* build a path to a shard-set file by name (``root / "manifest.json"``; use ``Layout``),

nor define its own TARGETS, COHORTS, VERTEBRAE, ROW_TYPES or dropped-study list (shards.layout
holds them): no assignment to those names, no C1..C7 list literal or ``f"C{i}"`` comprehension,
no dropped study's UID.

NOT_YET_CONVERTED and NOT_YET_POINTED list exactly the files that still do it (owned by another
change in flight when this test was written); each entry must still be true, so the lists shrink
to empty as those files are converted.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from spinestream.shards.layout import DROPPED_STUDIES

ROOT = Path(__file__).resolve().parents[1]

NOT_YET_CONVERTED: dict[str, set[str]] = {}
"""File -> the kinds of string-key read it still has (see :func:`reads`)."""

NOT_YET_POINTED: dict[str, set[str]] = {}
"""File -> the constants it still defines itself instead of importing them from shards.layout."""

SHARD_FILES = {"manifest.json", "studies.parquet", "slices.parquet", "truth.parquet"}
TABLE_ATTRS = {"studies", "slices", "truth"}
CONSTANTS = {"TARGETS", "COHORTS", "VERTEBRAE", "ROW_TYPES", "DROPPED_STUDIES", "EXCLUDED_STUDIES"}
VERTEBRA_NAMES = {f"C{i}" for i in range(1, 8)}


def project_files() -> list[Path]:
    skip = {"shards", "tests"}
    out = []
    for p in sorted(ROOT.rglob("*.py")):
        rel = p.relative_to(ROOT)
        if rel.parts[0] in skip or any(part.startswith(".") or part in ("__pycache__", "build", "dist")
                                       or "venv" in part or part.endswith(".egg-info") for part in rel.parts):
            continue
        out.append(p)
    return out


def _name(func: ast.AST) -> str:
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def _names_file(node: ast.AST, files: set[str], attrs: set[str]) -> bool:
    """Whether an expression is (or builds) a path to one of ``files`` or a Layout attribute in ``attrs``."""
    for n in ast.walk(node):
        if isinstance(n, ast.Constant) and isinstance(n.value, str) and any(
                n.value == f or n.value.endswith("/" + f) for f in files):
            return True
        if isinstance(n, ast.Attribute) and n.attr in attrs:
            return True
    return False


def reads(tree: ast.AST) -> dict[str, list[int]]:
    """Kind of string-key/contract-bypassing read -> line numbers."""
    found: dict[str, list[int]] = {}

    def hit(kind: str, node: ast.AST) -> None:
        found.setdefault(kind, []).append(node.lineno)

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if any(a.name in ("load_manifest", "select_shards") for a in node.names):
                hit("dict-manifest", node)
        elif isinstance(node, ast.Call):
            name, args = _name(node.func), [*node.args, *(k.value for k in node.keywords)]
            if name in ("load_manifest", "select_shards"):
                hit("dict-manifest", node)
            elif name in ("read_parquet", "read_table", "ParquetFile") and any(_names_file(
                    a, SHARD_FILES - {"manifest.json"}, TABLE_ATTRS) for a in [
                    *node.args[:1], *(k.value for k in node.keywords if k.arg in ("path", "source"))]):
                hit("table-read", node)
            elif name in ("load", "loads") and isinstance(node.func, ast.Attribute) and _name(
                    node.func.value) == "json" and any(_names_file(a, {"manifest.json"}, {"manifest"}) for a in args):
                hit("manifest-json", node)
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            r = node.right
            if isinstance(r, ast.Constant) and isinstance(r.value, str) and (
                    r.value in SHARD_FILES or r.value in ("labels/truth.parquet", "volumes.zarr")):
                hit("path-by-name", node)
    return found


RUN_FILES = {"run.json", "config.yaml", "batch_size.json", "metrics.jsonl", "curves.png", "best.pt", "shard_spec.json",
             "summary.json", "report.csv", "slice_probs.parquet", "heatmaps.png"}
"""(An evaluation's submission.csv too, but that is also the name of predict's output, which is not a run's.)"""
RUN_SUFFIXES = {".summary.json", ".heatmap.png"}
RUN_PREFIXES = ("ckpt-", "eval-f")
RUN_DIR_MODULE = "engine/rundir.py"
"""The one module that names the run directory's files (RunLayout, EvalLayout, PseudoLayout)."""
PATH_CALLS = {"glob", "rglob", "with_suffix", "with_name", "Path", "open", "joinpath"}


def _text(node: ast.AST) -> str | None:
    """A string literal's text; an f-string's with ``{}`` for each field; None for anything else."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    return None


def names_run_file(text: str) -> bool:
    """Whether a path literal names a run-directory file (``best.pt``, ``RUN/eval-f{}``, ``ckpt-*.pt``...)."""
    parts = text.replace("*/", "/").split("/")
    return text in RUN_SUFFIXES or any(p in RUN_FILES or p.startswith(RUN_PREFIXES) for p in parts)


def run_paths(tree: ast.AST) -> dict[str, list[int]]:
    """Lines that build a run-directory path by name (``run_dir / "best.pt"``, ``glob("ckpt-*.pt")``)."""
    found: dict[str, list[int]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            texts = [_text(node.right)]
        elif isinstance(node, ast.Call) and _name(node.func) in PATH_CALLS:
            texts = [_text(a) for a in node.args]
        else:
            continue
        if any(t is not None and names_run_file(t) for t in texts):
            found.setdefault("run-path-by-name", []).append(node.lineno)
    return found


def constants(tree: ast.Module) -> dict[str, list[int]]:
    """Constant -> lines where the module defines it itself."""
    found: dict[str, list[int]] = {}

    def hit(kind: str, node: ast.AST) -> None:
        found.setdefault(kind, []).append(node.lineno)

    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                for n in ast.walk(t):
                    if isinstance(n, ast.Name) and n.id in CONSTANTS:
                        hit(n.id, node)
        elif isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            values = {e.value for e in node.elts if isinstance(e, ast.Constant)}
            if VERTEBRA_NAMES <= values:
                hit("C1..C7", node)
        elif isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
            ranges = [g.iter for g in node.generators if isinstance(g.iter, ast.Call) and _name(g.iter.func) == "range"]
            fstr = [n for n in ast.walk(node) if isinstance(n, ast.JoinedStr) and n.values
                    and isinstance(n.values[0], ast.Constant) and n.values[0].value == "C"]
            if ranges and fstr:
                hit("C1..C7", node)
        elif isinstance(node, ast.Constant) and node.value in DROPPED_STUDIES:
            hit("DROPPED_STUDIES", node)
    return found


def _scan(fn) -> dict[str, dict[str, list[int]]]:
    out = {}
    for p in project_files():
        got = fn(ast.parse(p.read_text(), str(p)))
        if got:
            out[p.relative_to(ROOT).as_posix()] = got
    return out


def _check(found: dict[str, dict[str, list[int]]], allowed: dict[str, set[str]], what: str, fix: str) -> None:
    problems = []
    for f, kinds in sorted(found.items()):
        for kind, lines in sorted(kinds.items()):
            if kind not in allowed.get(f, set()):
                problems.append(f"{f}:{lines[0]}: {kind} ({len(lines)}x, lines {lines}): {fix}")
    for f, kinds in sorted(allowed.items()):
        for kind in sorted(kinds - set(found.get(f, {}))):
            problems.append(f"{f}: no longer has {kind}: remove it from {what}")
    assert not problems, "\n".join(problems)


def test_nothing_outside_shards_reads_the_contract_by_string_key():
    _check(_scan(reads), NOT_YET_CONVERTED, "NOT_YET_CONVERTED",
           "read it through shards.manifest.read_manifest / shards.tables.read_*_table and shards.layout.Layout")


def test_run_directory_files_are_named_in_one_module():
    found = {f: k for f, k in _scan(run_paths).items() if f != RUN_DIR_MODULE}
    _check(found, {}, "the allow-list", "use spinestream.engine.rundir's RunLayout / EvalLayout / PseudoLayout")


@pytest.mark.parametrize("src", [
    "p = run_dir / 'best.pt'",
    "p = Path(run_dir) / 'metrics.jsonl'",
    "p = args.run / f'eval-f{fold}'",
    "p = run_dir / f'eval-f{k}-last' / 'summary.json'",
    "found = run_dir.glob('ckpt-*.pt')",
    "found = runs.glob('*/eval-f*/heatmaps.png')",
    "p = table.with_suffix('.summary.json')",
    "p = Path(f'{run}/config.yaml')",
    "p = run_dir / f'ckpt-{step:09d}.pt'",
])
def test_the_scan_sees_each_run_path_by_name(src):
    assert "run-path-by-name" in run_paths(ast.parse(src))


@pytest.mark.parametrize("src", [
    "p = RunLayout(run_dir).best",
    "p = RunLayout(run_dir).evaluation(fold, last=True).summary",
    "p = PseudoLayout(table).heatmap",
    "p = paths.root / 'report.md'",
    "p.add_argument('--out', help='default: RUN/eval-f<k>')",
    "p = shards / 'labels' / 'extra.parquet'",
])
def test_the_scan_leaves_layout_paths_alone(src):
    assert run_paths(ast.parse(src)) == {}


def test_each_constant_is_defined_once_in_shards_layout():
    _check(_scan(constants), NOT_YET_POINTED, "NOT_YET_POINTED", "import it from shards.layout")


@pytest.mark.parametrize("src, kind", [
    ("from shards.layout import load_manifest", "dict-manifest"),
    ("m = layout.load_manifest(root)['image']['size']", "dict-manifest"),
    ("x = select_shards(m, cohorts=['boxed'])", "dict-manifest"),
    ("t = pd.read_parquet(Layout(root).studies)", "table-read"),
    ("t = pd.read_parquet(lay.slices, columns=['slice_id'])", "table-read"),
    ("t = pd.read_parquet(root / 'labels' / 'truth.parquet')", "table-read"),
    ("t = pandas.read_parquet(path=f'{root}/studies.parquet')", "table-read"),
    ("t = pq.read_table(shards / 'slices.parquet')", "table-read"),
    ("m = json.loads((root / 'manifest.json').read_text())", "manifest-json"),
    ("m = json.load(open(Layout(root).manifest))", "manifest-json"),
    ("p = shards / 'manifest.json'", "path-by-name"),
])
def test_the_scan_sees_each_kind_of_read(src, kind):
    assert kind in reads(ast.parse(src))


@pytest.mark.parametrize("src", [
    "t = read_study_table(Layout(root).studies)",
    "m = read_manifest(root).image.size",
    "t = pd.read_parquet(args.table)",  # a table given by the user, not one of the shard set's
    "t = pd.read_parquet(root / 'crack-truth.parquet')",
    "d = json.loads(path.read_text())",
    "msg = f'{root}/manifest.json: bad'",
])
def test_the_scan_leaves_typed_reads_alone(src):
    assert reads(ast.parse(src)) == {}


@pytest.mark.parametrize("src, kind", [
    ("TARGETS = ('C1', 'any')", "TARGETS"),
    ("VERTEBRAE = TARGETS[:7]", "VERTEBRAE"),
    ("cols = [f'C{i}' for i in range(1, 8)] + ['patient_overall']", "C1..C7"),
    ("rows = ('C1', 'C2', 'C3', 'C4', 'C5', 'C6', 'C7', 'patient_overall')", "C1..C7"),
    (f"bad = [{DROPPED_STUDIES[1]!r}]", "DROPPED_STUDIES"),
])
def test_the_scan_sees_each_redefinition(src, kind):
    assert kind in constants(ast.parse(src))


def test_the_scan_leaves_imports_of_the_constants_alone():
    assert constants(ast.parse("from shards.layout import ROW_TYPES, TARGETS\ncols = [*ROW_TYPES]")) == {}
