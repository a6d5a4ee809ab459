"""Downstream tasks on a pretrained model bundle, one module each, all built on ``base.TaskModule``:

- ``embed``: ``EmbedCells`` (``task=embed``), zero-shot cell embeddings of every cell.

A task starts from a bundle (``pretrained=<path>``) or from scratch (``pretrained=null``, the same architecture
randomly initialised, for the baseline comparison), declares what it needs (``NEEDS``) and what it runs
(``STAGE``: ``fit`` or ``predict``), and owns its heads, metrics and outputs.
"""
