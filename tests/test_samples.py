"""The samples run as written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_python_api_sample(tmp_path):
    """It runs, and runs again over its own earlier output (which it replaces, and nothing else)."""
    for _ in range(2):
        res = subprocess.run([sys.executable, str(ROOT / "samples" / "python_api.py"), "--workdir", str(tmp_path)],
                             capture_output=True, text=True, timeout=600)
        print(res.stdout, res.stderr[-3000:])
        assert res.returncode == 0
        for fragment in ("loaded", "exported to", "greedy:", "batch of mixed lengths:", "forked:", "PASSED"):
            assert fragment in res.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact", "checkpoint"]
