"""The library under the scripts: one home for each piece they share (docs/architecture.md).

    histo_retrieval            errors, files, images, figures, runtime, distributed: what every part needs
    histo_retrieval.data       patches to tensors: data sets, crops, batch samplers, stain, normalisation
    histo_retrieval.evaluation checkpoints, their selection, embedding, metrics and protocols
    histo_retrieval.training   the training loop and pretrained starts
    histo_retrieval.search     whole slides, the slide index, queries, the search page

Torch-free, so that `KIMIA_data/data_process.py` starts in a fraction of a second: `errors`, `files`.
Importing the package imports none of its modules.
"""
