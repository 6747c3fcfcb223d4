"""Whole-slide search: slides, indexing, the index and its vectors, queries, evaluation, the page."""
from histo_retrieval.search.openblas import choose_core_type

choose_core_type()  # before any module of this package imports faiss (openblas.py says why)
