"""ONNX export: ONNX Runtime agrees with PyTorch (1e-4) and the batch dimension is dynamic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import wgates
from wgates.export import export_onnx, onnx_session
from wgates.models import create_model

pytestmark = pytest.mark.usefixtures("one_thread")

pytest.importorskip("onnxruntime")


def _check_batch3(model, path, shape):
    session = onnx_session(path, threads=1)
    (inp,) = session.get_inputs()
    assert isinstance(inp.shape[0], str)  # symbolic: dynamic batch
    x = torch.randn(3, *shape[1:], generator=torch.Generator().manual_seed(3))
    (got,) = session.run(None, {inp.name: x.numpy()})
    with torch.no_grad():
        expected = model.eval()(x).numpy()
    assert got.shape == expected.shape == (3, 10)
    assert np.abs(got - expected).max() <= 1e-4


def test_export_extracted_resnet20(resnet20, x32, make_masks, tmp_path):
    gated = wgates.gate(resnet20, x32, verify=False)
    gated.set_masks(make_masks(gated))
    small = gated.extract()
    path = export_onnx(small, (x32[:1],), tmp_path / "r20.onnx")
    assert path.is_file() and path.stat().st_size > 0
    _check_batch3(small, path, x32.shape)


def test_export_dense_small_cnn(warm, tmp_path):
    torch.manual_seed(0)
    model = warm(create_model("small_cnn"), (4, 1, 32, 32))
    path = export_onnx(model, (torch.randn(1, 1, 32, 32),), tmp_path / "sub" / "cnn.onnx")
    _check_batch3(model, path, (1, 1, 32, 32))
