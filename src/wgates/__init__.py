"""wgates: prune a trained CNN to a latency budget measured on your hardware.

The data flow, one module each: groups -> gates -> gated -> latency -> predictor -> search
-> extract -> finetune -> export.
"""

from wgates.errors import WgatesError
from wgates.extract import load_pruned, save_pruned
from wgates.gated import GatedModel, gate

__all__ = ["GatedModel", "WgatesError", "gate", "load_pruned", "save_pruned"]
__version__ = "0.1.0"
