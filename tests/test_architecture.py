"""The layout tells the truth: the arrows between the top packages run one way (import-linter's
contracts in pyproject.toml), and the README's package table lists exactly the packages."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_hold() -> None:
    lint_imports = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run([str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True,
                            text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_readme_package_table_lists_every_package() -> None:
    readme = (ROOT / "README.md").read_text()
    listed = set(re.findall(r"^\| `(\w+)/` \|", readme, flags=re.MULTILINE))
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "benchmarks"}
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    assert listed == packages == set(contracts["root_packages"])
