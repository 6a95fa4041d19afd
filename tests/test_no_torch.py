"""The ONNX Runtime path needs no torch: an ONNX Runtime-only deployment imports the runtime, loads an artifact
and generates in a process where importing torch fails."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from ssmrt.exporter import export_model
from ssmrt.models import MambaLM, SSMConfig
from ssmrt.runtime import OnnxRuntimeRunnerFromArtifact, Session

BLOCK_TORCH = "import sys; sys.modules['torch'] = None  # any `import torch` now raises ImportError\n"


def run_python(code: str) -> str:
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_importing_the_runtime_does_not_import_torch():
    code = "import sys, ssmrt.runtime, ssmrt.artifact, ssmrt.compare; print(json.dumps(sorted(m for m in " \
           "sys.modules if m == 'torch' or m.startswith('torch.'))))"
    assert json.loads(run_python("import json\n" + code)) == []


@pytest.mark.parametrize("arch,native_ops", [("mamba1", "off"), ("mamba2", "off"), ("mamba2", "auto")])
def test_generate_from_an_artifact_where_torch_cannot_be_imported(tmp_path, arch, native_ops):
    cfg = SSMConfig(arch=arch, d_model=32, n_layer=2, vocab_size=64, d_state=8, headdim=16, ngroups=1,
                    chunk_size=4)
    torch.manual_seed(0)
    art = export_model(MambaLM(cfg).eval(), tmp_path / "art")
    want = Session(OnnxRuntimeRunnerFromArtifact(art, native_ops=native_ops)).generate([[1, 2, 3], [4]], 8)
    code = BLOCK_TORCH + f"""
import json
from ssmrt.runtime import OnnxRuntimeRunnerFromArtifact, Session
from ssmrt.artifact import describe
runner = OnnxRuntimeRunnerFromArtifact({str(art)!r}, native_ops={native_ops!r})
session = Session(runner)
out = session.generate([[1, 2, 3], [4]], 8)
session.prefill([1, 2]); snap = session.snapshot(); session.restore(snap, fork=2)
print(json.dumps({{"tokens": out, "layers": describe({str(art)!r})["state_layers"]}}))
"""
    got = json.loads(run_python(code))
    assert got["tokens"] == [list(map(int, t)) for t in np.asarray(want, dtype=object)]
    assert got["layers"] == 2
