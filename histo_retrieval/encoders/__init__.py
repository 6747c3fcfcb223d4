"""Encoders: whatever turns a patch into one vector, behind one interface (docs/encoders.md).

A checkpoint of this project, any timm architecture with weights from a file, a pathology foundation
model preset, or the colour histogram: `load_encoder(spec)` gives an Encoder, which every tool
(multi_test.py, retrieve.py, train.py --freeze-trunk, bench/) embeds with.
"""
from histo_retrieval.encoders.base import ENCODER_KINDS, Encoder
from histo_retrieval.encoders.registry import add_encoder_args, encoder_from_args, encoder_names, load_encoder

__all__ = ["ENCODER_KINDS", "Encoder", "add_encoder_args", "encoder_from_args", "encoder_names", "load_encoder"]
