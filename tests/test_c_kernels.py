"""Builds and runs the plain-C kernel tests (tests/c) under ASan + UBSan."""

import os
import pathlib
import shutil
import subprocess

import pytest

HERE = pathlib.Path(__file__).parent / "c"


@pytest.mark.skipif(
    shutil.which("make") is None or shutil.which(os.environ.get("CC", "gcc")) is None,
    reason="builds the C tests from source: needs make and a C compiler",
)
def test_c_kernels_under_sanitizers(tmp_path):
    result = subprocess.run(
        ["make", "-s", "-C", str(HERE), f"BUILD={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert " passed, 0 failed" in result.stdout
