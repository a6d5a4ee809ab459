"""Cells -> tokens, computed on the fly in the loader workers: ``rank`` (``RankEncoding``, Geneformer), ``bin``
(``BinEncoding``, scGPT), ``continuous`` (``ContinuousEncoding``, scFoundation); ``rng``: per-cell random streams.

Every encoding is a dataclass with ``kind`` (its name), ``bind(corpus)`` (or ``bind_arrays(vocab, arrays)`` from a
model bundle), ``bound_arrays()``, ``lengths(shard)`` and ``encode(gene_ids, counts, offsets, totals, seeds)``.
"""
