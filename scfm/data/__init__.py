"""The corpus side: what is on disk and how it is read into batches.

Public API, one module each:

- ``corpus``: the corpus format and its reader (``Corpus``, ``Shard``, ``is_corpus``);
- ``prepare``: raw-count files -> a corpus (``prepare``, ``PrepareOptions``, ``InputSpec``);
- ``readers``: ``.h5ad`` / 10x mtx / 10x ``.h5`` inputs; ``vocab``: the token table (``Vocab``);
- ``gene_stats``: per-gene medians; ``builtin``: PBMC 3k and the simulator as corpora; ``simulate``: the simulator;
- ``batching``, ``stream``, ``datamodule``: layouts, the streaming dataset, ``CellDataModule``.

``data`` imports nothing of ``encodings``, ``model`` or above (encodings are handed to the DataModule).
"""
