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
