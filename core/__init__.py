"""The library under the scripts: one home for each piece they share.

Torch-free, so that `KIMIA_data/data_process.py` starts in a fraction of a second: `errors`, `files`.
With torch: `runtime`, `data`, `checkpoint` and the modules built on them (see docs/architecture.md).
Importing the package imports none of its modules.
"""
