"""Shared checks of the bad-input suite (tests/test_bad_inputs_*.py): a refusal is exit 2 with one line on
stderr and no traceback, and nothing ssmrt did not create changed (a snapshot of the directory tree, taken
before and compared after)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path


def tree(root) -> dict[str, str]:
    """path -> a digest of the file's bytes and mode ("dir" for a folder, "link -> target" for a link), for
    everything under root."""
    root = Path(root)
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            if p.is_symlink():
                out[rel] = f"link -> {os.readlink(p)}"
            elif p.is_dir():
                out[rel] = "dir"
            else:
                try:
                    out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() + f" {oct(p.stat().st_mode)}"
                except OSError as e:
                    out[rel] = f"unreadable {e.errno}"
    return out


def ssmrt(*args: str, cwd=None, env=None, timeout: int = 600) -> subprocess.CompletedProcess:
    """`ssmrt ARGS` in a fresh process (what a user runs), stdout and stderr captured."""
    return subprocess.run([sys.executable, "-m", "ssmrt.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env={**os.environ, **(env or {})}, timeout=timeout)


def assert_refused(res: subprocess.CompletedProcess, *fragments: str) -> str:
    """Exit 2, one line on stderr naming what was wrong (each fragment in it), no traceback. Returns the line."""
    err = res.stderr.strip()
    assert res.returncode == 2, (res.returncode, res.stdout[-2000:], res.stderr[-2000:])
    assert "Traceback" not in res.stderr and len(err.splitlines()) == 1, res.stderr[-2000:]
    for f in fragments:
        assert f in err, (f, err)
    return err
