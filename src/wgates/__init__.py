"""wgates: prune a trained CNN to a latency budget measured on your hardware.

The data flow, one module each: groups -> gates -> gated -> latency -> predictor -> search
-> extract -> finetune (train) -> export; `pipeline.prune` runs them all.
"""

from wgates.errors import WgatesError
from wgates.extract import load_pruned, save_pruned
from wgates.gated import GatedModel, gate
from wgates.pipeline import PruneResult, prune

__all__ = [
    "GatedModel",
    "PruneResult",
    "WgatesError",
    "gate",
    "load_pruned",
    "prune",
    "save_pruned",
]
__version__ = "0.1.0"
