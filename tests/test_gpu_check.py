"""bench/gpu_check.sh's plan, as the script prints it with --plan (which builds and runs nothing): the
stages of each part in the order of what they tell per second, each part's caps adding up to no more
than its total, part 1's total under the 9 minutes one command of a GPU lease may take, and the test
files its last stage runs all there."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.sh")
ONE_COMMAND_S = 9 * 60

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="bench/gpu_check.sh needs bash")


def _plan(script=SCRIPT):
    run = subprocess.run(["bash", script, "--plan"], capture_output=True, text=True, timeout=60)
    parts = {}
    for line in run.stdout.splitlines():
        header = re.match(r"part (\d): total (\d+)s$", line)
        stage = re.match(r"  (\S+)\s+(\d+s|rest)$", line)
        if header:
            part = parts[int(header.group(1))] = {"total": int(header.group(2)), "stages": []}
        elif stage:
            cap = stage.group(2)
            part["stages"].append((stage.group(1), None if cap == "rest" else int(cap[:-1])))
    return run, parts


def test_each_part_fits_its_total():
    run, parts = _plan()
    assert run.returncode == 0, run.stdout + run.stderr
    assert set(parts) == {1, 2}
    for number, part in parts.items():
        caps = [cap for _, cap in part["stages"] if cap is not None]
        assert sum(caps) <= part["total"], f"part {number}: caps {sum(caps)}s over the total {part['total']}s"
        assert part["stages"][-1] == ("rest", None), f"part {number} must end with the rest of the tests"
        assert all(cap is not None for _, cap in part["stages"][:-1])
    assert parts[1]["total"] < ONE_COMMAND_S
    # the rest of the CUDA tests get at least half a minute besides what earlier stages leave
    assert parts[1]["total"] - sum(cap for _, cap in parts[1]["stages"] if cap) >= 30


def test_part_1_runs_what_tells_most_first():
    _, parts = _plan()
    assert [name for name, _ in parts[1]["stages"]] == [
        "env", "build", "import", "ops-quick", "fused-vs-dense", "top9", "emulation", "memcheck", "racecheck",
        "synccheck", "rest"]
    _, parts = _plan()
    assert [name for name, _ in parts[2]["stages"]] == ["build", "retry", "bench-all", "rest"]


def test_the_plan_refuses_caps_over_the_total(tmp_path):
    source = open(SCRIPT).read()
    assert "PART1_TOTAL=520" in source
    script = tmp_path / "gpu_check.sh"
    script.write_text(source.replace("PART1_TOTAL=520", "PART1_TOTAL=300"))
    run, parts = _plan(str(script))
    assert run.returncode == 1 and "the caps exceed the total" in run.stdout
    script.write_text(source.replace("PART1_TOTAL=520", "PART1_TOTAL=600"))
    run, _ = _plan(str(script))
    assert run.returncode == 1 and "exceeds 540s" in run.stdout


def test_every_cuda_test_file_has_a_stage():
    """Each test file with CUDA tests is run by some stage: the rest stage's list, or the stages named
    after the emulation, the quick op subset (test_ops.py is in the rest too) and the TF32 tests."""
    source = open(SCRIPT).read()
    rest = re.search(r"REST_FILES=\(([^)]*)\)", source).group(1).split()
    tests = os.path.join(ROOT, "tests")
    for name in rest:
        assert os.path.exists(os.path.join(tests, name)), f"REST_FILES names {name}, which does not exist"
    other_stages = {"test_cuda_emulation.py", "test_memory_format.py", "test_tf32.py"}
    for name in sorted(os.listdir(tests)):
        if name.startswith("test_") and name.endswith(".py") and name != os.path.basename(__file__):
            text = open(os.path.join(tests, name)).read()
            # tests over conftest's DEVICES (or its `device` fixture), or marked cuda themselves
            if "DEVICES" in text or "mark.cuda" in text or re.search(r"def test_\w+\([^)]*\bdevice\b", text):
                assert name in rest or name in other_stages, f"{name} has CUDA tests that no stage runs"
