"""The layering rule of DESIGN.md, enforced: qsae never imports Prefect or flows/, and reading a
lake and the analyses need no torch (a notebook or dask worker without the GPU stack)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TORCH_FREE = ["qsae", "qsae.lake", "qsae.lake.schema", "qsae.lake.store", "qsae.lake.storage", "qsae.lake.writer",
              "qsae.lake.results", "qsae.lake.accessor", "qsae.lake.inspect", "qsae.lake.verify", "qsae.version",
              "qsae.analysis", "qsae.analysis.rivalry", "qsae.analysis.matching", "qsae.jobs.rivalry",
              "qsae.jobs.compare", "qsae.jobs.configs", "qsae.jobs.preflight", "qsae.jobs.report",
              "qsae.jobs.progress", "qsae.jobs.interrupt", "qsae.jobs.pipeline", "qsae.analysis.params",
              "qsae.sae.params", "qsae.lm.locate", "qsae.sae.locate", "flows.cli"]


def _module_file(name: str) -> Path | None:
    """The source file of a module of this repository (a package's __init__), else None."""
    base = REPO.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.exists():
            return path
    return None


def _import_time_imports(path: Path, name: str) -> set[str]:
    """Modules a file imports when it is imported: top-level statements (and those under if/try),
    not the ones inside functions or under ``if TYPE_CHECKING``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(nodes) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([node.module] if node.module else []))
                found.add(base)
                found.update(f"{base}.{alias.name}" for alias in node.names)  # a submodule, if it is one
            elif isinstance(node, ast.If):
                if not (isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"):
                    visit(node.body)
                visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body)
                for h in node.handlers:
                    visit(h.body)
                visit(node.orelse)
                visit(node.finalbody)

    visit(tree.body)
    return found


def external_imports(module: str) -> dict[str, list[str]]:
    """Every third-party top-level package importing ``module`` loads, each with one chain of
    this repository's modules that leads to it (static: the AST of each file, transitively)."""
    out: dict[str, list[str]] = {}
    seen: set[str] = set()
    todo: list[tuple[str, list[str]]] = [(module, [module])]
    while todo:
        name, chain = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # importing a.b.c runs a/__init__ and a/b/__init__ first
            mod = ".".join(parts[:i])
            if mod in seen:
                continue
            path = _module_file(mod)
            if path is None:
                if i == 1:
                    out.setdefault(mod, chain)
                break
            seen.add(mod)
            for imported in _import_time_imports(path, mod):
                top = imported.split(".")[0]
                if _module_file(top) is None:
                    out.setdefault(top, chain)
                elif _module_file(imported) is not None or _module_file(imported.rpartition(".")[0]) is not None:
                    todo.append((imported if _module_file(imported) else imported.rpartition(".")[0],
                                 chain + [imported]))
    return out


def test_lake_and_analysis_modules_import_neither_torch_nor_prefect_statically():
    """Each module's import-time import graph (AST, transitively), with the chain that leads to a
    forbidden package named when there is one."""
    offenders = {}
    for module in TORCH_FREE:
        ext = external_imports(module)
        bad = {k: " -> ".join(v) for k, v in ext.items() if k in ("torch", "transformers", "prefect")}
        if bad:
            offenders[module] = bad
    assert offenders == {}


@pytest.mark.slow
def test_the_static_graph_finds_what_a_real_import_loads():
    """The static graph is not vacuous: it finds torch behind the capture job, and one real
    interpreter that imports every torch-free module together loads neither torch nor Prefect."""
    assert "torch" in external_imports("qsae.jobs.capture")
    assert "prefect" in external_imports("flows.capture")
    code = (f"import sys, json; [__import__(m) for m in {TORCH_FREE!r}]; "
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert not loaded & {"torch", "transformers", "prefect"}, sorted(loaded & {"torch", "transformers", "prefect"})
    assert set(external_imports("qsae.lake.store")) - {"__future__"} <= loaded | set(sys.stdlib_module_names)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_nothing_in_qsae_imports_flows_or_prefect():
    offenders = {str(p.relative_to(REPO)): sorted(_imports(p) & {"flows", "prefect"})
                 for p in (REPO / "qsae").rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


BLOCKS = ("lake", "lm", "sae", "analysis")  # the building blocks, side by side
SHARED = {"qsae.errors", "qsae.version"}  # what every layer may import


def _qsae_imports(path: Path, module: str) -> set[str]:
    """Every qsae module a file imports anywhere (inside functions too: the rule is the direction)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "qsae")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            if base.split(".")[0] == "qsae":
                found.add(base)
    return found


def block_violations(root: Path = REPO) -> dict[str, list[str]]:
    """For each building-block module: the qsae modules it imports outside its own block (and
    outside the shared errors and version): a job, a flow, or another block."""
    out = {}
    for block in BLOCKS:
        for path in (root / "qsae" / block).rglob("*.py"):
            module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
            bad = sorted(m for m in _qsae_imports(path, module)
                         if not m.startswith(f"qsae.{block}") and m not in SHARED and m != "qsae")
            if "qsae" in _qsae_imports(path, module):
                bad.append("qsae (the package: it registers the accessor and imports jobs)")
            if bad:
                out[module] = bad
    return out


def test_the_building_blocks_import_no_job_no_flow_and_not_each_other():
    """One direction: flows -> jobs -> the building blocks (lake, lm, sae, analysis), which stand
    side by side: none imports a job, a flow or another block (the lake needs no model or SAE;
    what joins a lake and an SAE, e.g. re-encoding for verify or decoding codes, is a job's)."""
    assert block_violations() == {}


def test_the_direction_check_catches_an_arrow_back_up(tmp_path):
    """Not vacuous: a lake module importing an SAE format inside a function, and an SAE module
    importing a job, are both found."""
    for rel, text in (("qsae/lake/x.py", "def f():\n    from qsae.sae.formats import load_sae\n"),
                      ("qsae/sae/y.py", "from ..jobs.configs import TrainConfig\n"),
                      ("qsae/lm/z.py", "from qsae.errors import QsaeError\nfrom qsae.lm.hooks import splice\n")):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    for block in BLOCKS:
        (tmp_path / "qsae" / block).mkdir(parents=True, exist_ok=True)
    assert block_violations(tmp_path) == {"qsae.lake.x": ["qsae.sae.formats"], "qsae.sae.y": ["qsae.jobs.configs"]}


def test_the_check_catches_a_stray_import(tmp_path):
    """The scan above is not vacuous: a file with the forbidden imports is found."""
    bad = tmp_path / "stray.py"
    bad.write_text("import os\nfrom prefect import flow\nimport flows.cli\n\ndef f():\n    import torch\n")
    assert {"prefect", "flows", "torch"} <= _imports(bad)


def test_every_config_field_is_described_and_the_cli_help_is_that_description():
    """One source of truth: the CLI's option help is generated from the config fields'
    descriptions (it had drifted when written twice)."""
    import typer.main

    from flows.cli import app
    from qsae.jobs import configs

    classes = {"capture": configs.CaptureConfig, "collect": configs.CollectConfig, "train": configs.TrainConfig,
               "rivalry": configs.RivalryConfig, "reconstruct": configs.ReconstructionConfig,
               "compare": configs.CompareConfig}
    for cls in [*classes.values(), configs.SamplingConfig]:
        assert [n for n, f in cls.model_fields.items() if not f.description] == [], cls.__name__
    renamed = {"samples": "n_samples", "layer": "layers"}
    group = typer.main.get_command(app)
    checked = 0
    for name, cls in classes.items():
        for param in group.commands[name].params:
            field = param.name if param.name in cls.model_fields else renamed.get(param.name, param.name)
            owner = cls if field in cls.model_fields else configs.SamplingConfig if name == "capture" else None
            if owner is not None and field in owner.model_fields:
                help_text = getattr(param, "help", None) or ""
                assert help_text.startswith(owner.model_fields[field].description), (name, param.name, help_text)
                checked += 1
    assert checked >= 30


def test_the_lm_layer_and_the_lake_agree_on_float16s_limit_without_an_import():
    """lm/convert.py no longer imports the lake's schema (an arrow back up); the two constants agree."""
    from qsae.lake.schema import FP16_MAX as in_lake
    from qsae.lm.convert import FP16_MAX as in_lm

    assert in_lm == in_lake and "qsae.lake" not in {m for m in external_imports("qsae.lm.convert")}
    assert not any(imp.startswith("qsae.lake") for imp in _import_time_imports(REPO / "qsae/lm/convert.py",
                                                                                  "qsae.lm.convert"))
