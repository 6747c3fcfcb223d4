"""Figures of the scripts: matplotlib without a display, PNGs written atomically.

The scripts' name for histo_retrieval.figures, where the library keeps them (the library never
imports this module; see docs/architecture.md).
"""
from histo_retrieval.figures import pyplot, save_figure

__all__ = ["pyplot", "save_figure"]
