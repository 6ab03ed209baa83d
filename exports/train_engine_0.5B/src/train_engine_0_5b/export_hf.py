"""`export-hf`: the MiniCPM family's checkpoint -> Hugging Face writer, shared with the other engines
(minicpm/export_hf.py), re-exported for this engine's modules."""

from __future__ import annotations

from train_engine_0_5b.minicpm.export_hf import LAYOUTS, export

__all__ = ["LAYOUTS", "export"]
