"""atomic_directory: a failure while writing leaves the old directory and no temporary one."""

from __future__ import annotations

import pytest

from ssmrt.fsutil import atomic_directory


def test_success_replaces_the_directory(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_directory(out) as tmp:
        (tmp / "new.txt").write_text("new")
        assert not (out / "new.txt").exists()  # nothing visible until the block succeeds
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failure_keeps_the_old_directory_and_cleans_up(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_directory(out) as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("disk full")
    assert (out / "old.txt").read_text() == "old" and not (out / "half.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failure_with_no_previous_directory(tmp_path):
    out = tmp_path / "new" / "out"
    with pytest.raises(KeyboardInterrupt), atomic_directory(out):
        raise KeyboardInterrupt
    assert not out.exists() and list(out.parent.iterdir()) == []
