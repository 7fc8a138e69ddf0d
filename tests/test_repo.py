"""House rules that keep the codebase what it promises to be: readable, dependency-light, ruff-clean."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
LIBRARY_FILES = sorted((ROOT / "minidiff").rglob("*.py")) + [ROOT / "train.py", ROOT / "sample.py"]
REFERENCE_IMPORT = re.compile(r"^\s*(import|from)\s+(diffusers|transformers|open_clip|safetensors)\b", re.M)


def test_runtime_dependencies_are_exactly_the_six():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[<>=!~ \[]", dep)[0].lower() for dep in project["dependencies"]}
    assert names == {"torch", "numpy", "pillow", "tqdm", "ftfy", "regex"}


def test_library_never_imports_a_reference_library():
    side_by_side = (ROOT / "minidiff" / "bench", ROOT / "minidiff" / "demo")  # the benchmark runs the references
    offenders = [str(p.relative_to(ROOT)) for p in LIBRARY_FILES
                 if p.parent not in side_by_side and REFERENCE_IMPORT.search(p.read_text())]
    assert not offenders, f"reference libraries are for tests, the benchmark and the demo only: {offenders}"


def test_files_stay_readable():
    long = [f"{p.relative_to(ROOT)}: {n}" for p in LIBRARY_FILES if (n := len(p.read_text().splitlines())) > 500]
    assert not long, f"split these by idea (house limit 500 lines): {long}"


def test_ruff_clean():
    ruff = shutil.which("ruff") or pytest.skip("ruff is not installed (it comes with the test extra)")
    result = subprocess.run([ruff, "check", "--quiet", str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script", ["sample.py", "train.py"])
def test_cli_help(script):
    result = subprocess.run([sys.executable, str(ROOT / script), "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "usage:" in result.stdout
