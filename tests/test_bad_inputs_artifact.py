"""Bad artifacts and a bad native-ops cache: tampered metadata (the graph says otherwise, impossible states,
a lying vocabulary) is refused in one line by every command that reads it, before any decoding; a truncated or
altered cached library is never loaded; an empty SSMRT_CACHE_DIR is not the current directory. Each CLI case
also proves the artifact's directory is unchanged."""

from __future__ import annotations

import json
import shutil

import onnx
import pytest
from bad_inputs import assert_refused, ssmrt, tree
from test_models import random_lm

from ssmrt import ort_ops
from ssmrt.errors import SsmrtError
from ssmrt.exporter import export_model


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    return export_model(random_lm(arch="mamba2", d_model=48, n_layer=2, d_state=16, headdim=16, ngroups=2),
                        tmp_path_factory.mktemp("clean") / "art")


def tampered(clean, tmp_path, edit) -> str:
    """A copy of the clean artifact whose metadata `edit(meta: dict of parsed JSON)` changed."""
    art = tmp_path / "art"
    shutil.copytree(clean, art)
    m = onnx.load(str(art / "model.onnx"))
    meta = {p.key: p.value for p in m.metadata_props}
    parsed = {k: json.loads(v) for k, v in meta.items() if k.startswith("ssmrt.")}
    edit(parsed)
    for p in m.metadata_props:
        if p.key in parsed:
            p.value = parsed[p.key] if isinstance(parsed[p.key], str) else json.dumps(parsed[p.key])
    onnx.save(m, str(art / "model.onnx"))
    return art


def more_layers(meta):
    meta["ssmrt.config"]["n_layer"] = 3
    meta["ssmrt.states"] += [{**s, "name": s["name"].replace(".1", ".2"), "output": s["output"].replace(".1", ".2"),
                              "layer": 2} for s in meta["ssmrt.states"][-2:]]


def swapped(meta):
    s = meta["ssmrt.states"]
    s[0], s[1] = s[1], s[0]


def lying_vocab(meta):
    meta["ssmrt.config"]["vocab_size"] = 50


def int8_state(meta):
    meta["ssmrt.states"][1]["dtype"] = "int8"


def huge_state(meta):
    meta["ssmrt.states"][1]["shape"] = ["batch", 1 << 20, 1 << 20, 1 << 10]


def negative_state(meta):
    meta["ssmrt.states"][1]["shape"] = ["batch", -4, 16, 16]


def wrong_size(meta):
    meta["ssmrt.states"][1]["shape"][2] = 17


def missing_field(meta):
    del meta["ssmrt.states"][0]["dtype"]


def bad_json(meta):
    meta["ssmrt.states"] = "[{"


CASES = {
    "metadata says 3 layers, the graph has 2": (more_layers, "are not the metadata's"),
    "state entries swapped": (swapped, "are not the metadata's"),
    "a vocabulary the logits do not have": (lying_vocab, "logits are 97 wide, the metadata's vocabulary 50"),
    "a state dtype ssmrt never writes": (int8_state, "has dtype 'int8'"),
    "an absurd state size": (huge_state, "which no model has"),
    "a negative state size": (negative_state, "expected [\"batch\", positive sizes...]"),
    "a state size the graph does not have": (wrong_size, "in the graph"),
    "a state without its dtype": (missing_field, "must name its name, output, kind, shape and dtype"),
    "states that are not JSON": (bad_json, "metadata 'ssmrt.states' is not valid JSON"),
}


@pytest.mark.parametrize("command", ["inspect", "generate"])
@pytest.mark.parametrize("case", list(CASES))
def test_tampered_metadata_is_refused(clean, tmp_path, case, command):
    edit, fragment = CASES[case]
    art = tampered(clean, tmp_path, edit)
    before = tree(tmp_path)
    args = ["inspect", art] if command == "inspect" else ["generate", art, "--prompt-ids", "1,2",
                                                          "--max-new-tokens", "2"]
    assert_refused(ssmrt(*args), fragment)
    assert tree(tmp_path) == before


def test_absurd_state_bytes_are_refused_before_anything_is_allocated(clean):
    from ssmrt.artifact import check_states

    with pytest.raises(SsmrtError, match="which no model has"):
        check_states([{"name": "s", "output": "o", "kind": "ssm", "dtype": "float32",
                       "shape": ["batch", 1 << 20, 1 << 20, 1 << 10]}], "art")


def test_the_clean_artifact_still_runs(clean):
    res = ssmrt("generate", clean, "--prompt-ids", "1,2", "--max-new-tokens", "2")
    assert res.returncode == 0, res.stderr


# ----------------------------------------------------------------------------------- native-ops cache


@pytest.fixture
def cached_copy(tmp_path, monkeypatch):
    """The built library's cache entry copied under a fresh SSMRT_CACHE_DIR (so the test can damage it), and
    the build made to fail (so a damaged library can only be refused, not silently rebuilt over)."""
    try:
        built = ort_ops.library_path()
    except ort_ops.NativeOpsUnavailable as e:
        pytest.skip(f"native ops cannot be built here: {e}")
    monkeypatch.setenv("SSMRT_CACHE_DIR", str(tmp_path / "cache"))
    target = ort_ops.cache_dir() / built.parent.name
    shutil.copytree(built.parent, target)

    def no_build(cmd, source):
        raise ort_ops.NativeOpsUnavailable("the test forbids building")

    monkeypatch.setattr(ort_ops, "_run", no_build)
    return target / ort_ops.LIBRARY


def test_an_intact_cached_library_is_used(cached_copy):
    assert ort_ops.library_path() == cached_copy


@pytest.mark.parametrize("damage", ["truncated", "altered", "no build record"])
def test_a_damaged_cached_library_is_never_loaded(cached_copy, damage):
    """A truncated shared library would kill ONNX Runtime's process with SIGBUS: it is rebuilt (here: the build
    is forbidden, so refused with the reason) instead of handed over."""
    if damage == "truncated":
        data = cached_copy.read_bytes()
        cached_copy.write_bytes(data[: len(data) // 3])
    elif damage == "altered":
        data = bytearray(cached_copy.read_bytes())
        data[len(data) // 2] ^= 0xFF
        cached_copy.write_bytes(bytes(data))
    else:
        cached_copy.with_name(cached_copy.name + ort_ops.DIGEST_SUFFIX).unlink()
    with pytest.raises(ort_ops.NativeOpsUnavailable, match="the test forbids building"):
        ort_ops.library_path()


def test_an_empty_cache_dir_is_not_the_current_directory(clean, tmp_path):
    before = tree(tmp_path)
    res = ssmrt("generate", clean, "--prompt-ids", "1,2", "--max-new-tokens", "2", "--native-ops", "on",
                cwd=tmp_path, env={"SSMRT_CACHE_DIR": ""})
    assert_refused(res, "SSMRT_CACHE_DIR is set but empty")
    res = ssmrt("generate", clean, "--prompt-ids", "1,2", "--max-new-tokens", "2", cwd=tmp_path,
                env={"SSMRT_CACHE_DIR": ""})
    assert res.returncode == 0, res.stderr  # auto: the bodies, and nothing written into the current directory
    assert tree(tmp_path) == before


def test_verbose_says_once_why_the_native_ops_are_not_used(clean, tmp_path):
    """--native-ops auto falling back to the bodies is said, once, with -v (here: an empty cache directory)."""
    res = ssmrt("-v", "generate", clean, "--prompt-ids", "1,2", "--max-new-tokens", "2", cwd=tmp_path,
                env={"SSMRT_CACHE_DIR": ""})
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stderr.splitlines() if "fallback bodies" in line]
    assert lines == ["ssmrt: the ssmrt ops run on their fallback bodies: SSMRT_CACHE_DIR is set but empty; unset it "
                     "or name a directory"]


def test_a_model_file_declaring_an_enormous_field_is_refused_without_reading_it(tmp_path):
    """A protobuf length of 2^62 bytes (a MemoryError for a parser that believes it): one line, nothing read."""
    def varint(n: int) -> bytes:
        out = b""
        while True:
            byte, n = n & 0x7F, n >> 7
            if not n:
                return out + bytes([byte])
            out += bytes([byte | 0x80])

    art = tmp_path / "art"
    art.mkdir()
    (art / "model.onnx").write_bytes(varint((14 << 3) | 2) + varint(1 << 62) + b"xx")
    before = tree(tmp_path)
    assert_refused(ssmrt("inspect", art), "field 14 runs past the end of the file")
    assert_refused(ssmrt("generate", art, "--prompt-ids", "1"), "field 14 runs past the end of the file")
    assert tree(tmp_path) == before
