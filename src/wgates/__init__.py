"""wgates: prune a trained CNN to a latency budget measured on your hardware.

The data flow, one module each: groups -> gates -> gated -> latency -> predictor -> search
-> extract -> finetune (train) -> export; `pipeline.prune` runs them all, and `parts` hands
the same pieces to a training loop of your own.
"""

from wgates.errors import WgatesError
from wgates.export import export_onnx
from wgates.extract import load_pruned, save_pruned
from wgates.gated import GatedModel, gate
from wgates.parts import LatencyMeter, LatencyTerm, fit_latency, measure_threads
from wgates.pipeline import PruneResult, prune
from wgates.train import finetune

__all__ = [
    "GatedModel",
    "LatencyMeter",
    "LatencyTerm",
    "PruneResult",
    "WgatesError",
    "export_onnx",
    "finetune",
    "fit_latency",
    "gate",
    "load_pruned",
    "measure_threads",
    "prune",
    "save_pruned",
]
__version__ = "0.1.0"
