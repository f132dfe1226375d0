"""The README runs as written, and the setup it describes holds: every ```python block runs from an
empty folder with the Python that `make build` installed deconvcuda into; deconvcuda imports from any
folder there; the package metadata raises no deprecation warning; the build prints one line.

A README block that cannot run here is marked on the line above its fence, and only for these
reasons (a block that merely needs data or files must make them itself, as small as it can):

    <!-- readme-test: skip (needs a GPU) -->
    <!-- readme-test: skip (needs torchrun) -->
"""
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKER = re.compile(r"<!--\s*readme-test:(.*?)-->")
ALLOWED = re.compile(r"skip \((needs a GPU|needs torchrun|needs a GPU and torchrun)\)")
IN_MAKES_VENV = Path(sys.prefix).resolve() == (ROOT / ".venv").resolve()


def python_blocks():
    """(line, code, marker) of every ```python block of the README: the line of its fence, its text,
    and the readme-test marker on the nearest non-blank line above the fence (or None)."""
    lines = README.read_text(encoding="utf-8").splitlines()
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            above = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            marker = MARKER.search(above)
            blocks.append((i + 1, "\n".join(lines[i + 1:end]) + "\n", marker.group(1).strip() if marker else None))
            i = end
        i += 1
    return blocks


BLOCKS = python_blocks()


def _clean_environment():
    """The environment of a user's shell: no PYTHONPATH pointing into the repository."""
    return {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}


def test_the_readme_has_python_and_skips_only_what_needs_a_gpu_or_torchrun():
    assert len(BLOCKS) >= 4
    for line, _, marker in BLOCKS:
        if marker is not None:
            assert ALLOWED.fullmatch(marker), (
                f"README.md:{line}: readme-test marker {marker!r}; a block may be skipped only where it needs a GPU "
                "or torchrun: '<!-- readme-test: skip (needs a GPU) -->' or '... (needs torchrun) -->'")
    assert sum(marker is None for _, _, marker in BLOCKS) >= 3   # most of it runs


@pytest.mark.parametrize("line, code, marker", BLOCKS, ids=[f"README.md:{line}" for line, _, _ in BLOCKS])
def test_readme_python_block_runs_as_written(line, code, marker, tmp_path):
    if marker is not None:
        pytest.skip(f"README.md:{line}: {marker}")
    script = tmp_path / "block.py"
    script.write_text(code, encoding="utf-8")
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=_clean_environment(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"README.md:{line} failed:\n{code}\n--- stderr ---\n{done.stderr[-4000:]}"


@pytest.mark.skipif(not IN_MAKES_VENV, reason="not running in the .venv that `make build` installs deconvcuda into")
def test_make_build_installs_deconvcuda_into_the_venv(tmp_path):
    done = subprocess.run([sys.executable, "-c", "import deconvcuda; print(deconvcuda.__file__)"], cwd=tmp_path,
                          env=_clean_environment(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert Path(done.stdout.strip()) == ROOT / "deconvcuda" / "__init__.py"   # editable: this checkout
    command = Path(sys.prefix) / "bin" / "deconvcuda"
    done = subprocess.run([str(command), "--version"], cwd=tmp_path, env=_clean_environment(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.startswith("deconvcuda "), done.stderr[-2000:]


def test_the_package_metadata_raises_no_deprecation_warning():
    setuptools = pytest.importorskip("setuptools")
    from setuptools.config import pyprojecttoml
    from setuptools.dist import Distribution

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pyprojecttoml.apply_configuration(Distribution(), ROOT / "pyproject.toml")
    ours = [f"{w.category.__name__}: {str(w.message).splitlines()[0]}" for w in caught
            if issubclass(w.category, (DeprecationWarning, setuptools.SetuptoolsDeprecationWarning))]
    assert ours == []


# A stand-in for .venv/bin/python in a copy of the Makefile: `setup.py ...` prints what a real build
# prints (compiler command lines, warnings) and the one line setup.py says about what it builds.
_FAKE_PYTHON = """#!/bin/sh
if [ "$1" = setup.py ]; then
  echo "deconvcuda: building the CPU kernels only (nvcc was not found)"
  for i in 1 2 3 4 5 6 7 8 9 10 11 12; do
    echo "[$i/12] c++ -MMD -MF build/temp/csrc/cpu/kernel$i.o.d -O3 -fopenmp -I/usr/include/python3 -c kernel$i.cpp"
  done
  echo "warning: a compiler warning" >&2
  exit ${FAKE_STATUS:-0}
fi
exit 0
"""


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize("verbose", [False, True])
def test_the_build_prints_one_line_unless_verbose(tmp_path, verbose):
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    fake = tmp_path / "fakepython"
    fake.write_text(_FAKE_PYTHON)
    fake.chmod(0o755)
    command = ["make", "--no-print-directory", "deconvcuda/.built", f"PY={fake}", "DEPS=", "SOURCES="]
    # a `make test VERBOSE=1` around this test passes its variables down in MAKEFLAGS: not here
    environment = {key: value for key, value in os.environ.items() if key not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    (tmp_path / "deconvcuda").mkdir()
    done = subprocess.run(command + (["VERBOSE=1"] if verbose else []), cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env=environment)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = (done.stdout + done.stderr).splitlines()
    summary = [line for line in lines if re.fullmatch(r"deconvcuda: built the CPU kernels only \(nvcc was not found\) "
                                                      r"in \d+ s \(log: build/build\.log\)", line)]
    assert len(summary) == 1, lines
    if verbose:
        assert any("c++ -MMD" in line for line in lines) and "warning: a compiler warning" in lines
    else:
        assert lines == summary
    assert "c++ -MMD" in (tmp_path / "build" / "build.log").read_text()   # the log keeps every line

    (tmp_path / "deconvcuda" / ".built").unlink()
    failed = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env=dict(environment, FAKE_STATUS="3"))
    assert failed.returncode != 0
    output = failed.stdout + failed.stderr
    assert "warning: a compiler warning" in output and "[12/12] c++" in output   # the end of the log
    assert "deconvcuda: the build failed (exit 3); the whole log is build/build.log" in output
