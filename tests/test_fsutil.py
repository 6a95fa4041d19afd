"""Output directories: nothing ssmrt did not write is touched, and a failure or Ctrl-C at any step of a
replacement leaves one complete output, the old or the new.

Every test compares snapshots of the whole tree (names, kinds, contents, permissions) before and after.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import stat
import subprocess
import uuid
from pathlib import Path

import onnx
import pytest

from ssmrt import artifact, fsutil
from ssmrt.errors import SsmrtError

# ------------------------------------------------------------------------------------------ helpers


def snapshot(root: Path) -> dict[str, str]:
    """relative path -> what it is: a file's hash, a link's target, or 'dir'; with the permission bits."""
    snap = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            mode = oct(stat.S_IMODE(p.lstat().st_mode))
            if p.is_symlink():
                snap[rel] = f"link {os.readlink(p)}"
            elif p.is_dir():
                snap[rel] = f"dir {mode}"
            else:
                snap[rel] = f"file {hashlib.sha256(p.read_bytes()).hexdigest()[:16]} {mode}"
    return snap


OURS = re.compile(r"^(\.[^/]*)?\.ssmrt-(new|old)-[a-z0-9_]{8}$")


def ours(rel: str) -> bool:
    """A path inside a staging or set-aside directory of ssmrt's (mkdtemp's exact names, nothing looser)."""
    return any(OURS.match(part) for part in Path(rel).parts)


def write_artifact(d: Path, tag: str, data: bool = True) -> None:
    """A small but genuine ssmrt artifact: model.onnx with ssmrt metadata, external data, a tokenizer."""
    model = onnx.helper.make_model(onnx.helper.make_graph([], f"g-{tag}", [], []))
    artifact.write_metadata(model, {"tag": tag}, [], {"tag": tag})
    onnx.save_model(model, d / artifact.MODEL_FILE)
    if data:
        (d / artifact.DATA_FILE).write_bytes(tag.encode() * 1000)
    (d / "tokenizer.json").write_text(f'{{"tag": "{tag}"}}')


def export_like(out: Path, tag: str = "new", overwrite: bool = False) -> Path:
    """What ssmrt.exporter does around its (long) work: check first, then write through output_directory."""
    plan = artifact.check_output(out, overwrite)
    with fsutil.output_directory(plan, main_file=artifact.MODEL_FILE) as tmp:
        write_artifact(tmp, tag)
    return plan.out


def expected_artifact(tmp_path: Path, tag: str) -> dict[str, str]:
    ref = tmp_path.parent / f"ref-{tag}-{uuid.uuid4().hex[:6]}"
    ref.mkdir()
    export_like(ref / "a", tag)
    return snapshot(ref / "a")


@pytest.fixture
def home(tmp_path):
    """A user's project directory: their files beside the output, which nothing may touch."""
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.bin").write_bytes(b"\x00\x01")
    return tmp_path


# ------------------------------------------------------------------------------------------ refusals


def test_a_stray_model_onnx_is_not_an_export(home):
    """A directory with a file named model.onnx beside the user's files is refused whole, before any work."""
    proj = home / "proj"
    (proj / "data").mkdir(parents=True)
    (proj / "model.onnx").write_text("not onnx")
    (proj / "notes.txt").write_text("important")
    before = snapshot(home)
    with pytest.raises(SsmrtError, match=r"proj: holds 'data', which ssmrt did not write; choose a new or empty"):
        export_like(proj, overwrite=True)
    (proj / "data").rmdir()
    (proj / "notes.txt").unlink()
    with pytest.raises(SsmrtError, match=r"proj: its model.onnx is not an ssmrt export \(protobuf wire type"):
        export_like(proj, overwrite=True)
    onnx.save_model(onnx.helper.make_model(onnx.helper.make_graph([], "g", [], [])), proj / "model.onnx")
    with pytest.raises(SsmrtError, match="holds a model.onnx that ssmrt did not write"):
        export_like(proj, overwrite=True)
    (proj / "data").mkdir()
    (proj / "notes.txt").write_text("important")
    (proj / "model.onnx").write_text("not onnx")
    assert snapshot(home) == before


def test_an_earlier_export_needs_overwrite(home):
    out = export_like(home / "art", "old")
    before = snapshot(home)
    with pytest.raises(SsmrtError, match=r"art: holds an earlier ssmrt export; pass --overwrite \(overwrite=True\)"):
        export_like(out, "new")
    assert snapshot(home) == before


def test_a_file_the_user_added_to_an_export_blocks_replacing_it(home):
    out = export_like(home / "art", "old")
    (out / "my-eval.csv").write_text("1,2")
    before = snapshot(home)
    with pytest.raises(SsmrtError, match="holds 'my-eval.csv', which ssmrt did not write"):
        export_like(out, "new", overwrite=True)
    assert snapshot(home) == before


@pytest.mark.parametrize("case", ["under a file", "a file", "a symlink", "a dangling symlink", "parent link"])
def test_bad_output_paths_are_refused_before_any_work(home, case):
    (home / "f.txt").write_text("x")
    (home / "real").mkdir()
    out, match = {
        "under a file": (home / "f.txt" / "sub" / "art", r"cannot be created: .*f.txt is a file, not a directory"),
        "a file": (home / "f.txt", "exists and is not a directory"),
        "a symlink": (home / "link", "is a symbolic link"),
        "a dangling symlink": (home / "dangling", "is a symbolic link"),
        "parent link": (home / "dangling" / "art", "dangling is a broken symbolic link"),
    }[case]
    (home / "link").symlink_to(home / "real")
    (home / "dangling").symlink_to(home / "nowhere")
    before = snapshot(home)
    with pytest.raises(SsmrtError, match=match):
        artifact.check_output(out)
    assert snapshot(home) == before


def test_created_directories_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        out = export_like(tmp_path / "a" / "b" / "art")
        (tmp_path / "empty").mkdir(mode=0o700)
        filled = export_like(tmp_path / "empty")
    finally:
        os.umask(old)
    for d in (tmp_path / "a", tmp_path / "a" / "b", out):
        assert stat.S_IMODE(d.stat().st_mode) == 0o750, d
    assert stat.S_IMODE((out / "model.onnx").stat().st_mode) == 0o640
    assert stat.S_IMODE(filled.stat().st_mode) == 0o700  # the user's own directory keeps its mode


def test_success_in_each_mode(home):
    new = expected_artifact(home, "new")
    before = snapshot(home)
    for out in (home / "fresh" / "art", home / "empty", home / "replaced"):
        if out.name == "empty":
            out.mkdir()
        if out.name == "replaced":
            export_like(out, "old")
        export_like(out, "new", overwrite=True)
        assert snapshot(out) == new
    after = snapshot(home)
    assert {k: v for k, v in after.items() if k in before} == before
    assert not [k for k in after if ours(k)]


def test_a_failing_write_leaves_nothing_behind(home):
    export_like(home / "art", "old")
    before = snapshot(home)
    for out in (home / "art", home / "new" / "deeper" / "art"):
        with pytest.raises(RuntimeError, match="disk full"):
            plan = artifact.check_output(out, overwrite=True)
            with fsutil.output_directory(plan, main_file=artifact.MODEL_FILE) as tmp:
                write_artifact(tmp, "half", data=False)
                raise RuntimeError("disk full")
        assert snapshot(home) == before  # the parents it made are gone too


# ----------------------------------------------------------------------------- failures mid-replacement


class Faults:
    """Replaces the replacement's filesystem operations with ones that raise `error` (KeyboardInterrupt, or an
    OSError as a full disk or a vanished device gives) at call `at` (counted from 0) and pass every other call
    through."""

    def __init__(self, monkeypatch, at: int, error=KeyboardInterrupt):
        self.at, self.calls, self.error = at, 0, error
        for name in ("rename", "exchange", "rmtree", "rmdir"):
            real = getattr(fsutil._Ops, name)
            monkeypatch.setattr(fsutil._ops, name, self._wrap(real))

    def _wrap(self, real):
        def op(*args, **kwargs):
            self.calls += 1
            if self.calls - 1 == self.at:
                raise self.error()
            return real(*args, **kwargs)

        return op


def no_exchange(a, b):
    raise OSError(38, "Function not implemented")  # ENOSYS: the rename-aside path


def run_every_fault(home, out, monkeypatch, setup, tweak=None) -> int:
    """Replaces `out` (made by setup()) with a fault at every operation in turn; asserts after each that the
    tree holds the old output untouched or the new one complete, and the user's files as they were."""
    new = expected_artifact(home, "new")
    at = 0
    while True:
        setup()
        before = snapshot(home)
        old_out = snapshot(out)
        with monkeypatch.context() as m:
            if tweak:
                tweak(m)
            faults = Faults(m, at)
            try:
                export_like(out, "new", overwrite=True)
                interrupted = False
            except KeyboardInterrupt:
                interrupted = True
        after = snapshot(home)
        if interrupted and snapshot(out) == old_out:
            assert after == before, f"fault at op {at}: the old output is there but something else changed"
        else:
            # past the commit: the new output is complete; only ssmrt's own hidden copies may be left
            assert {k: v for k, v in snapshot(out).items() if not ours(k)} == new, f"fault at op {at}"
            assert {k: v for k, v in after.items() if k in before and not k.startswith(out.name)} == \
                {k: v for k, v in before.items() if not k.startswith(out.name)}
            assert all(ours(k) for k in after if k not in before and not k.startswith(f"{out.name}/")), at
        if faults.calls <= at:  # this run had no fault left to inject: every step has been tried
            assert not interrupted and not [k for k in after if ours(k)]
            return at
        at += 1


def fresh_old_export(home: Path, out: Path):
    """setup() for run_every_fault: `out` an old export again, and nothing of ssmrt's left beside it."""
    import shutil

    def setup():
        shutil.rmtree(out, ignore_errors=True)
        for p in home.glob(f".{out.name}.ssmrt-*"):
            shutil.rmtree(p)
        export_like(out, "old")

    return setup


def test_a_fault_at_any_step_of_an_atomic_exchange(home, monkeypatch):
    out = home / "art"
    steps = run_every_fault(home, out, monkeypatch, fresh_old_export(home, out))
    assert steps == 2  # exchange, remove the old


def test_a_fault_at_any_step_of_rename_aside(home, monkeypatch):
    out = home / "art"

    def tweak(m):
        m.setattr(fsutil._Ops, "exchange", staticmethod(no_exchange))

    steps = run_every_fault(home, out, monkeypatch, fresh_old_export(home, out), tweak)
    assert steps == 4  # (exchange refused), old aside, new in, remove the old


def test_a_fault_at_any_step_of_an_entry_by_entry_swap(home, monkeypatch):
    """The path a mount point takes (forced here; the real mount point is tested below)."""
    out = home / "art"

    def tweak(m):
        m.setattr(fsutil, "is_mount_point", lambda p: Path(p) == out)

    steps = run_every_fault(home, out, monkeypatch, fresh_old_export(home, out), tweak)
    assert steps == 3 + 3 + 2  # three old entries aside, three new in, two directories removed


def test_a_fault_at_any_step_of_filling_an_empty_directory(home, monkeypatch):
    out = home / "art"

    def setup():
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()

    steps = run_every_fault(home, out, monkeypatch, setup)
    assert steps == 3 + 1


@pytest.fixture
def python_sigint():
    """Python's own Ctrl-C handler installed for the test, and what was there put back after: pytest started as a
    background job of a non-interactive shell inherits SIGINT ignored, where ssmrt rightly leaves Ctrl-C alone."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_ctrl_c_during_the_swap_is_held_until_the_new_output_is_in_place(home, monkeypatch, python_sigint):
    out = export_like(home / "art", "old")
    new = expected_artifact(home, "new")
    real = fsutil._Ops.exchange
    swapped = []

    def exchange_then_sigint(a, b):
        # raise_signal, not os.kill: it delivers the signal to this thread and runs the Python handler before it
        # returns, so the Ctrl-C certainly arrives inside the held block
        signal.raise_signal(signal.SIGINT)
        real(a, b)
        swapped.append(b)

    monkeypatch.setattr(fsutil._ops, "exchange", exchange_then_sigint)
    interrupted = False
    try:
        export_like(out, "new", overwrite=True)
    except KeyboardInterrupt:
        interrupted = True
    assert swapped == [out], "the replacement did not go through the atomic exchange"
    assert interrupted, "the Ctrl-C held during the swap was not raised after it"
    assert snapshot(out) == new
    assert not [k for k in snapshot(home) if ours(k)]


def test_the_directory_changing_during_the_write_is_caught(home):
    out = export_like(home / "art", "old")
    plan = artifact.check_output(out, overwrite=True)
    with pytest.raises(SsmrtError, match="holds 'late.txt', which ssmrt did not write"):
        with fsutil.output_directory(plan, main_file=artifact.MODEL_FILE) as tmp:
            write_artifact(tmp, "new")
            (out / "late.txt").write_text("written by someone else meanwhile")
    assert (out / "late.txt").read_text().startswith("written")
    assert not [k for k in snapshot(home) if ours(k)]


# ------------------------------------------------------------------------------------------ real mounts


@pytest.fixture
def mount(tmp_path):
    """mount(path, *options): a tmpfs (or a bind mount with "bind") at path, unmounted after the test;
    skips with the reason where this machine does not allow mounting."""
    mounted = []

    def do(path: Path, *options: str, source: str = "none"):
        path.mkdir(parents=True, exist_ok=True)
        args = ["mount", "--bind", source, str(path)] if "bind" in options else \
            ["mount", "-t", "tmpfs", "-o", ",".join(("size=16m", *options)), "none", str(path)]
        try:
            res = subprocess.run(args, capture_output=True, text=True)
        except FileNotFoundError:
            pytest.skip("no mount command on this machine")
        if res.returncode != 0:
            pytest.skip(f"cannot mount here ({res.stderr.strip() or res.returncode}): needs root in a "
                        "namespace that allows mounts")
        mounted.append(path)
        return path

    yield do
    for p in reversed(mounted):
        subprocess.run(["umount", "-l", str(p)], capture_output=True)


def test_replacing_an_export_on_a_mount_point(home, mount, monkeypatch):
    out = mount(home / "vol")
    assert fsutil.is_mount_point(out)
    export_like(out, "old")
    new = expected_artifact(home, "new")
    export_like(out, "new", overwrite=True)
    assert snapshot(out) == new
    assert fsutil.is_mount_point(out)

    def setup():
        for p in out.iterdir():
            import shutil

            shutil.rmtree(p) if p.is_dir() else p.unlink()
        export_like(out, "old")

    run_every_fault(home, out, monkeypatch, setup)


def test_a_mount_point_with_user_files_is_refused(home, mount):
    out = mount(home / "vol")
    (out / "model.onnx").write_text("not onnx")
    (out / "notes.txt").write_text("important")
    before = snapshot(home)
    with pytest.raises(SsmrtError, match="holds 'notes.txt', which ssmrt did not write"):
        export_like(out, overwrite=True)
    assert snapshot(home) == before


def test_a_bind_mount_is_seen_as_a_mount_point(home, mount):
    (home / "src").mkdir()
    out = mount(home / "bound", "bind", source=str(home / "src"))
    assert fsutil.is_mount_point(out)
    export_like(out, "old")
    export_like(out, "new", overwrite=True)
    assert snapshot(out) == expected_artifact(home, "new")


def test_a_read_only_location_is_refused_before_any_work(home, mount):
    ro = mount(home / "ro", "ro")
    before = snapshot(home)
    with pytest.raises(SsmrtError, match=r"ro/art: cannot be created in .*ro \(Read-only file system\)"):
        artifact.check_output(ro / "art")
    assert snapshot(home) == before


# ------------------------------------------------------------------------------------------ checkpoints


def test_save_model_replaces_only_its_own_files(home):
    import torch

    import ssmrt
    from ssmrt.models import MambaLM, SSMConfig, save_model

    cfg = SSMConfig(arch="mamba2", d_model=32, n_layer=1, vocab_size=64, d_state=8, headdim=16, ngroups=1,
                    chunk_size=4)
    torch.manual_seed(0)
    first, second = MambaLM(cfg), MambaLM(cfg)
    out = save_model(first, home / "ckpt", extra_files={"tokenizer.json": "{}"})
    (home / "user-ckpt").mkdir()
    (home / "user-ckpt" / "config.json").write_text("{}")
    (home / "user-ckpt" / "training-log.txt").write_text("epoch 1")
    before = snapshot(home)
    with pytest.raises(SsmrtError, match=r"ckpt: holds a checkpoint; pass overwrite=True to replace it"):
        save_model(second, out, extra_files={"tokenizer.json": "{}"})
    with pytest.raises(SsmrtError, match="holds 'tokenizer.json', which this save would not write"):
        save_model(second, out, overwrite=True)
    with pytest.raises(SsmrtError, match="holds 'training-log.txt', which this save would not write"):
        save_model(second, home / "user-ckpt", overwrite=True)
    assert snapshot(home) == before
    save_model(second, out, extra_files={"tokenizer.json": "{}"}, overwrite=True)
    loaded = ssmrt.load_model(out)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), second.state_dict().values(),
                                                  strict=True))
    after = snapshot(home)
    assert {k: v for k, v in after.items() if not k.startswith("ckpt")} == \
        {k: v for k, v in before.items() if not k.startswith("ckpt")}


# ------------------------------------------------------------------------------------------ what a review found


@pytest.mark.parametrize("kind", ["a folder", "a link to a folder", "a link to a file"])
def test_an_entry_with_an_artifact_name_that_is_not_a_file_is_refused(home, kind):
    out = export_like(home / "art", "old")
    (out / "tokenizer.json").unlink()
    (home / "mine").mkdir()
    (home / "mine" / "precious.txt").write_text("keep")
    target = out / "tokenizer.json"
    if kind == "a folder":
        target.mkdir()
        (target / "precious.txt").write_text("keep")
    else:
        target.symlink_to(home / "mine" if kind == "a link to a folder" else home / "mine" / "precious.txt")
    before = snapshot(home)
    with pytest.raises(SsmrtError, match="holds 'tokenizer.json', which is not a regular file"):
        export_like(out, "new", overwrite=True)
    assert snapshot(home) == before


def test_only_ssmrts_own_leftovers_are_taken_for_its_own(home):
    out = export_like(home / "art", "old")
    (out / ".ssmrt-old-my-backup").mkdir()
    (out / ".ssmrt-old-my-backup" / "thesis.tex").write_text("keep")
    before = snapshot(home)
    with pytest.raises(SsmrtError, match="holds '.ssmrt-old-my-backup', which ssmrt did not write"):
        export_like(out, "new", overwrite=True)
    assert snapshot(home) == before
    (out / ".ssmrt-old-my-backup" / "thesis.tex").unlink()
    (out / ".ssmrt-old-my-backup").rmdir()
    # the exact name of a killed run's staging copy, but with a folder inside: not ssmrt's
    (out / ".ssmrt-new-abcd1234" / "sub").mkdir(parents=True)
    with pytest.raises(SsmrtError, match="holds '.ssmrt-new-abcd1234', which ssmrt did not write"):
        export_like(out, "new", overwrite=True)
    (out / ".ssmrt-new-abcd1234" / "sub").rmdir()
    (out / ".ssmrt-new-abcd1234" / "model.onnx").write_text("half")  # what a killed run leaves: files only
    export_like(out, "new", overwrite=True)
    assert snapshot(out) == expected_artifact(home, "new")


def test_a_file_added_between_the_last_check_and_the_exchange_is_kept(home, monkeypatch):
    out = export_like(home / "art", "old")
    old = snapshot(out)
    real = fsutil._Ops.exchange

    def late_write_then_exchange(a, b):
        (out / "late.csv").write_text("written meanwhile")
        real(a, b)

    monkeypatch.setattr(fsutil._ops, "exchange", late_write_then_exchange)
    with pytest.raises(SsmrtError, match="holds 'late.csv'.*added while the new output was being put in place"):
        export_like(out, "new", overwrite=True)
    assert snapshot(out) == {**old, "late.csv": snapshot(out)["late.csv"]}
    assert (out / "late.csv").read_text() == "written meanwhile"
    assert not [k for k in snapshot(home) if ours(k)]


def test_filling_never_replaces_a_file_that_appears(home, monkeypatch):
    out = home / "empty"
    out.mkdir()
    real = fsutil._Ops.rename
    calls = []

    def rename(a, b):
        calls.append(b)
        if len(calls) == 2:
            (out / "model.onnx").write_text("the user's")  # the main file, moved last, appears meanwhile
        real(a, b)

    monkeypatch.setattr(fsutil._ops, "rename", rename)
    with pytest.raises(SsmrtError, match="could not be put in place"):
        export_like(out, "new")
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx"]
    assert (out / "model.onnx").read_text() == "the user's"


def test_extra_file_names_cannot_leave_the_directory(home):
    import torch

    from ssmrt.models import MambaLM, SSMConfig, save_model

    cfg = SSMConfig(arch="mamba2", d_model=32, n_layer=1, vocab_size=64, d_state=8, headdim=16, ngroups=1,
                    chunk_size=4)
    torch.manual_seed(0)
    before = snapshot(home)
    for name in ("../notes.txt", str(home / "notes.txt"), "sub/x.json", "..", ""):
        with pytest.raises(SsmrtError, match="is not a plain file name"):
            save_model(MambaLM(cfg), home / "ckpt", extra_files={name: "x"})
    assert snapshot(home) == before


def test_exporting_into_the_current_directory(home, monkeypatch):
    out = export_like(home / "art", "old")
    monkeypatch.chdir(out)
    export_like(Path("."), "new", overwrite=True)
    assert os.getcwd() == str(out) and snapshot(Path(".")) == expected_artifact(home, "new")
    assert not [k for k in snapshot(home) if ours(k)]


@pytest.mark.parametrize("mode", ["exchange", "rename aside", "entry by entry", "fill"])
def test_an_os_error_at_any_step_is_one_line_and_leaves_one_output(home, monkeypatch, mode):
    out = home / "art"

    def setup():
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        for p in home.glob(".art.ssmrt-*"):
            shutil.rmtree(p)
        if mode == "fill":
            out.mkdir()
        else:
            export_like(out, "old")

    new = expected_artifact(home, "new")
    at = 0
    while True:
        setup()
        before = snapshot(out)
        with monkeypatch.context() as m:
            if mode == "rename aside":
                m.setattr(fsutil._Ops, "exchange", staticmethod(no_exchange))
            if mode == "entry by entry":
                m.setattr(fsutil, "is_mount_point", lambda p: Path(p) == out)
            faults = Faults(m, at, error=lambda: OSError(28, "No space left on device"))
            try:
                export_like(out, "new", overwrite=True)
                failed = False
            except SsmrtError as e:
                assert "could not be put in place (No space left on device)" in str(e), e
                failed = True
        visible = {k: v for k, v in snapshot(out).items() if not ours(k)}
        assert visible in (before, new), (mode, at)
        if failed:
            assert snapshot(out) == before, (mode, at)
        if faults.calls <= at:
            assert not failed
            break
        at += 1


def test_ctrl_c_is_left_alone_where_the_process_ignores_it(home, monkeypatch):
    import signal

    out = export_like(home / "art", "old")
    real = fsutil._Ops.exchange

    def exchange_then_sigint(a, b):
        signal.raise_signal(signal.SIGINT)  # as in the test above
        real(a, b)

    monkeypatch.setattr(fsutil._ops, "exchange", exchange_then_sigint)
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        export_like(out, "new", overwrite=True)  # no KeyboardInterrupt: the process chose to ignore SIGINT
    finally:
        signal.signal(signal.SIGINT, previous)
    assert signal.getsignal(signal.SIGINT) is previous
    assert snapshot(out) == expected_artifact(home, "new")
