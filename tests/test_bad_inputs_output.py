"""Bad output locations for `export`, `build` and the demo's checkpoint: refused in one line before the long
work, and nothing ssmrt did not create is touched (the directory tree before and after). The staging and
swapping themselves, mount points included, are tests/test_fsutil.py's."""

from __future__ import annotations

import os

import pytest
from bad_inputs import assert_refused, ssmrt, tree
from test_models import random_lm

from ssmrt.exporter import export_model
from ssmrt.models.checkpoints import save_model


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_model(random_lm(arch="mamba1", d_model=32, n_layer=2, d_state=8), tmp_path_factory.mktemp("c") / "ckpt")


def setup_foreign_dir(root):
    out = root / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    return out


def setup_foreign_model(root):
    out = root / "out"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"not ssmrt's")
    return out


def setup_file(root):
    (root / "out").write_text("a file")
    return root / "out"


def setup_under_file(root):
    (root / "f").write_text("a file")
    return root / "f" / "out"


def setup_link(root):
    (root / "real").mkdir()
    (root / "real" / "keep.txt").write_text("keep")
    os.symlink(root / "real", root / "out")
    return root / "out"


CASES = {
    "a directory holding someone's file": (setup_foreign_dir, "notes.txt"),
    "a directory holding a model.onnx ssmrt did not write": (setup_foreign_model, "model.onnx"),
    "a path that is a file": (setup_file, "out"),
    "a path under a file": (setup_under_file, "f"),
    "a symbolic link to a directory": (setup_link, "out"),
}


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_export_to_a_bad_place_is_refused_and_touches_nothing(ckpt, tmp_path, case, overwrite):
    setup, fragment = CASES[case]
    root = tmp_path / "root"
    root.mkdir()
    out = setup(root)
    before = tree(root)
    res = ssmrt("export", ckpt, "-o", out, *(["--overwrite"] if overwrite else []))
    assert_refused(res, fragment)
    assert tree(root) == before


def test_build_to_a_bad_place_is_refused_and_touches_nothing(ckpt, tmp_path):
    art = export_model(random_lm(arch="mamba1", d_model=32, n_layer=2, d_state=8), tmp_path / "art")
    root = tmp_path / "root"
    root.mkdir()
    out = setup_foreign_dir(root)
    before = tree(root)
    assert_refused(ssmrt("build", art, "-o", out, "--overwrite", "--plugins", "none"), "notes.txt")
    assert tree(root) == before


def test_export_refuses_non_finite_weights_and_an_opset_onnx_does_not_know(tmp_path):
    import onnx
    import torch

    from ssmrt.errors import SsmrtError

    model = random_lm(arch="mamba1", d_model=32, n_layer=2, d_state=8)
    with torch.no_grad():
        model.backbone.layers[1].mixer.D[3] = float("inf")
    with pytest.raises(SsmrtError, match=r"weight backbone.layers.1.mixer.D has NaN or Inf values"):
        export_model(model, tmp_path / "a")
    too_new = onnx.defs.onnx_opset_version() + 1
    with pytest.raises(SsmrtError, match=f"--opset {too_new} is newer than the installed onnx"):
        export_model(random_lm(arch="mamba1", d_model=32, n_layer=2, d_state=8), tmp_path / "b", opset=too_new)
    assert os.listdir(tmp_path) == []


# ------------------------------------------------------------------------ places that cannot be written


def _unwritable_for_everyone():
    """A directory no process can create entries in, root included (root ignores permission bits): sysfs refuses
    mkdir and file creation to all. None where this machine has no such /sys."""
    import tempfile

    try:
        os.rmdir(tempfile.mkdtemp(dir="/sys"))
    except OSError:
        return "/sys" if os.path.isdir("/sys") else None
    return None


ROOT_SKIP = pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                               reason="runs as root, whom permission bits do not stop (the /sys cases cover root)")


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    model = random_lm(arch="mamba1", d_model=32, n_layer=2, d_state=8)
    return export_model(model, tmp_path_factory.mktemp("a") / "art")


def _writes(ckpt, art, out, elsewhere):
    """Every command that writes something, pointed at `out` (the timing cache's engine goes `elsewhere`)."""
    return {
        "export": ["export", ckpt, "-o", out],
        "build": ["build", art, "-o", out, "--plugins", "none"],
        "demo": ["demo", "--model", ckpt, "--workdir", out],
        "selftest": ["selftest", "--workdir", out],
        "build --timing-cache": ["build", art, "-o", elsewhere, "--plugins", "none", "--timing-cache", out],
    }


COMMANDS = list(_writes("c", "a", "o", "e"))


@pytest.mark.parametrize("command", COMMANDS)
def test_a_place_nobody_may_write_is_refused_before_the_work(ckpt, art, tmp_path, command):
    base = _unwritable_for_everyone()
    if base is None:
        pytest.skip("no read-only /sys here to stand for a place nobody may write")
    res = ssmrt(*_writes(ckpt, art, f"{base}/ssmrt-out", tmp_path / "engine")[command], cwd=tmp_path)
    line = assert_refused(res, f"{base}/ssmrt-out")
    assert "cannot be" in line and res.stdout == ""  # refused before the work's first message
    assert list(tmp_path.iterdir()) == []


@ROOT_SKIP
@pytest.mark.parametrize("command", COMMANDS)
def test_a_read_only_directory_is_refused_before_the_work(ckpt, art, tmp_path, command):
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "keep.txt").write_text("mine")
    ro.chmod(0o555)
    try:
        before = tree(tmp_path)
        res = ssmrt(*_writes(ckpt, art, ro / "out", tmp_path / "engine")[command], cwd=tmp_path)
        assert_refused(res, str(ro))
        assert res.stdout == ""
        assert tree(tmp_path) == before
    finally:
        ro.chmod(0o755)


def test_an_empty_output_path_is_not_the_current_directory(ckpt, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    before = tree(tmp_path)
    assert_refused(ssmrt("export", ckpt, "-o", "", cwd=tmp_path), "--output", "is empty")
    assert tree(tmp_path) == before


def setup_demo_artifact(root):
    (root / "artifact").mkdir()
    (root / "artifact" / "notes.txt").write_text("mine")
    return root, "artifact"


def setup_demo_model(root):
    (root / "char-mamba2").mkdir()
    (root / "char-mamba2" / "notes.txt").write_text("mine")
    return root, "char-mamba2"


def setup_demo_file(root):
    (root / "w").write_text("a file")
    return root / "w", "is a file"


DEMO_CASES = {
    "its artifact directory holds someone's file": setup_demo_artifact,
    "its model directory holds someone's file": setup_demo_model,
    "the workdir is a file": setup_demo_file,
}


@pytest.mark.parametrize("case", list(DEMO_CASES))
def test_demo_refuses_a_bad_workdir_before_training(tmp_path, case):
    root = tmp_path / "root"
    root.mkdir()
    workdir, fragment = DEMO_CASES[case](root)
    before = tree(root)
    res = ssmrt("demo", "--workdir", workdir, "--train-seconds", "600", cwd=tmp_path)  # 600: a wait would show
    assert_refused(res, fragment)
    assert "training" not in res.stdout
    assert tree(root) == before


@pytest.mark.parametrize("cache,fragment", [("tc", "--timing-cache must be a file"),
                                            ("missing/tc", "--timing-cache's directory")])
def test_build_refuses_a_timing_cache_it_could_not_write_back(art, tmp_path, cache, fragment):
    root = tmp_path / "root"
    (root / "tc").mkdir(parents=True)
    cache = root / cache
    before = tree(root)
    res = ssmrt("build", art, "-o", root / "engine", "--plugins", "none", "--timing-cache", cache)
    assert_refused(res, fragment)
    assert tree(root) == before


@pytest.mark.parametrize("setup", [setup_file, setup_under_file])
def test_selftest_refuses_a_workdir_that_is_no_directory(tmp_path, setup):
    root = tmp_path / "root"
    root.mkdir()
    workdir = setup(root)
    before = tree(root)
    assert_refused(ssmrt("selftest", "--workdir", workdir), str(workdir))
    assert tree(root) == before


@pytest.mark.parametrize("option,fragment", [
    (["--workspace", "-1"], "--workspace must be positive, got -1 (MiB)"),  # not -1048576: the value given
    (["--max-batch", str(2**31)], "TensorRT's dimensions are 32-bit"),
    (["--max-seq", str(2**40)], "--max-seq must be at most"),
])
def test_build_refuses_limits_tensorrt_cannot_take(art, tmp_path, option, fragment):
    assert_refused(ssmrt("build", art, "-o", tmp_path / "engine", "--plugins", "none", *option), fragment)
    assert list(tmp_path.iterdir()) == []


def test_api_refuses_paths_that_are_empty_or_not_paths(ckpt, tmp_path, monkeypatch):
    from ssmrt import SsmrtError, load_model
    from ssmrt.exporter import export
    from ssmrt.runtime import runner_from_path

    monkeypatch.chdir(tmp_path)  # where Path("") would have pointed
    for call, match in [
        (lambda: export(ckpt, ""), "the output directory is empty"),
        (lambda: export(ckpt, None), r"the output directory must be a path \(str or os.PathLike\), got NoneType"),
        (lambda: export_model(random_lm(arch="mamba1", d_model=32, n_layer=2, d_state=8), 123), "got int"),
        (lambda: export_model("model", tmp_path / "a"), r"export_model\(model\) takes an ssmrt model"),
        (lambda: load_model(""), "the checkpoint directory is empty"),
        (lambda: load_model(ckpt, dtype="int8"), "dtype must be one of"),
        (lambda: runner_from_path(None), "path must be a path"),
        (lambda: runner_from_path(str(tmp_path / "a\0b")), "NUL byte"),
        (lambda: save_model(random_lm(arch="mamba1", d_model=32, n_layer=2, d_state=8), ""), "is empty"),
    ]:
        with pytest.raises(SsmrtError, match=match):
            call()
    assert list(tmp_path.iterdir()) == []
