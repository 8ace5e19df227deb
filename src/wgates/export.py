"""ONNX export of a plain (dense or extracted) model, checked against ONNX Runtime."""

from __future__ import annotations

import copy
import io
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from wgates.errors import WgatesError
from wgates.extract import TOLERANCE, _flat_outputs
from wgates.groups import as_input_tuple


def on_device(model: nn.Module, device: str) -> nn.Module:
    """`model` when it is on `device` already, else a copy moved there: measuring a model
    must not move the one being trained (on a GPU) to the CPU, or the other way round."""
    if next(model.parameters()).device.type == device:
        return model
    return copy.deepcopy(model).to(device)


def onnx_bytes(
    model: nn.Module, example_inputs: tuple[torch.Tensor, ...], opset: int = 17,
    dynamic_batch: bool = True,
) -> bytes:
    """The model as an ONNX ModelProto. TorchScript exporter: ~0.3 s for ResNet-20, several
    times faster than the dynamo one, which matters at one export per latency sample."""
    names = [f"input{i}" for i in range(len(example_inputs))]
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(), tuple(example_inputs), buffer, input_names=names, opset_version=opset,
            dynamic_axes={n: {0: "batch"} for n in names} if dynamic_batch else None,
            dynamo=False,
        )
    return buffer.getvalue()


def export_onnx(
    model: nn.Module, example_inputs: torch.Tensor | tuple[torch.Tensor, ...], path: str | Path,
    opset: int = 17, check: bool = True,
) -> Path:
    """Write `model` as ONNX (batch dimension dynamic) and, with `check`, compare ONNX Runtime's
    outputs with PyTorch's on `example_inputs` (`onnx_max_difference` <= 1e-4). A dict output
    (torchvision's segmentation models) becomes one ONNX output per value."""
    # ONNX Runtime runs on the CPU: so do the export and its check (on a GPU, TF32
    # convolutions would differ from ONNX Runtime by more than the check allows)
    model = on_device(model, "cpu")
    example_inputs = tuple(x.cpu() for x in as_input_tuple(example_inputs))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(onnx_bytes(model, example_inputs, opset))
    if check:
        error = onnx_max_difference(model, example_inputs, path)
        if error > TOLERANCE:
            raise WgatesError(
                f"{path}: ONNX Runtime's outputs differ from PyTorch's by {error:.3g}; "
                "the exported file is not trustworthy (try another opset)"
            )
    return path


def onnx_session(model: str | Path | bytes, threads: int | None = None):
    """An ONNX Runtime CPU session (from a file or ONNX bytes) with a fixed intra-op thread
    count (None: the runtime's default)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def onnx_max_difference(model: nn.Module, example_inputs: tuple, path: str | Path) -> float:
    """max |ONNX Runtime - PyTorch| over every output, relative to the output's largest
    magnitude where that exceeds 1: float32 kernels differ by a relative ~1e-5, so logits or
    segmentation maps around 8 differed by 1.1e-4 in absolute terms with nothing wrong."""
    session = onnx_session(path)
    feeds = {i.name: x.numpy() for i, x in zip(session.get_inputs(), example_inputs)}
    with torch.no_grad():
        expected = [t.numpy() for t in _flat_outputs(model.eval()(*example_inputs))]
    got = session.run(None, feeds)
    return max(float(np.abs(a - b).max() / max(1.0, np.abs(a).max()))
               for a, b in zip(expected, got))
