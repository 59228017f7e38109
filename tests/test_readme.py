"""The README as a newcomer meets it: its first Python block is examples/quickstart.py, which
runs as it stands; the commands it gives are the ones CI runs; it fits its promised length."""

import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def blocks(language):
    return re.findall(rf"^```{language}\n(.*?)^```", README, flags=re.S | re.M)


def test_first_python_block_is_the_quickstart_and_runs():
    quickstart = ROOT / "examples" / "quickstart.py"
    assert blocks("python")[0] == quickstart.read_text()
    done = subprocess.run(
        [sys.executable, str(quickstart)], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    cmi_before, cmi_after = map(float, re.search(r"cmi: (\S+) -> (\S+)", done.stdout).groups())
    assert cmi_after > cmi_before  # the fine-tune raised the teacher's CMI


def test_commands_are_the_ones_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    commands = [line for block in blocks("bash") for line in block.splitlines()]
    tests = [c for c in commands if "pytest" in c]
    job = [c for c in commands if "examples/mcmi_demo.py" in c]
    assert len(tests) == 1 and len(job) == 1
    assert tests[0].split("&& ")[-1] in ci
    assert job[0].split("&& ")[-1].split(" --")[0] in ci


def test_length_and_first_screen():
    lines = README.splitlines()
    assert len(lines) <= 150
    first_screen = "\n".join(lines[:40])
    assert "pytest" in first_screen and "examples/mcmi_demo.py" in first_screen
    assert "pip install" in first_screen
