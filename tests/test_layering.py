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
              "qsae.lake.results", "qsae.lake.accessor", "qsae.lake.inspect", "qsae.lake.verify",
              "qsae.analysis", "qsae.analysis.rivalry", "qsae.analysis.matching", "qsae.jobs.rivalry",
              "qsae.jobs.compare", "qsae.jobs.configs", "flows.cli"]


def _loaded_after_import(module: str) -> set[str]:
    code = (f"import sys, json, {module}; "
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("module", TORCH_FREE)
def test_lake_and_analysis_modules_import_neither_torch_nor_prefect(module):
    loaded = _loaded_after_import(module)
    assert "torch" not in loaded and "transformers" not in loaded, f"{module} pulls in torch"
    assert "prefect" not in loaded, f"{module} pulls in prefect"


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
