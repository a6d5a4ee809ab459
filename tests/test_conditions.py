"""Condition tokens in batches: cell labels, per-feature modality, perturbation flags."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from scfm.data.batching import Batching
from scfm.data.prepare import InputSpec, PrepareOptions, prepare
from scfm.data.simulate import simulate
from scfm.data.stream import CellStream
from scfm.encodings.continuous import ContinuousEncoding
from scfm.encodings.rank import RankEncoding
from scfm.errors import ScfmInputError


def stream(corpus, conditions, strategy="random", encoding="rank"):
    enc = RankEncoding(max_len=512) if encoding == "rank" else ContinuousEncoding()  # continuous: genes are one row
    return CellStream(corpus, enc.bind(corpus), Batching(strategy=strategy, batch_size=16), val_fraction=0.0,
                      conditions=conditions)


@pytest.fixture(scope="module")
def perturbed_corpus(tmp_path_factory):
    adata = simulate(n_cells=400, n_genes=300, seed=3, modality="protein", n_extra_features=20)
    rng = np.random.default_rng(0)
    targets = np.array(["SIMG5", "SIMG7", "non-targeting", None], dtype=object)
    adata.obs["guide_target"] = targets[rng.integers(0, 4, adata.n_obs)]
    adata.uns = {}
    path = tmp_path_factory.mktemp("perturbed") / "cells.h5ad"
    adata.write_h5ad(path)
    opts = PrepareOptions(gene_key="symbol", progress=False,
                          columns={"cell_type": "cell_type", "batch": "batch", "perturbation": "guide_target"})
    # protein features carry no Ensembl id: key the vocabulary by symbol
    return prepare([InputSpec(str(path), symbol_column="gene_symbol")], path.parent / "corpus", opts), adata


def test_labels_are_stored_in_the_corpus(perturbed_corpus):
    corpus, adata = perturbed_corpus
    assert corpus.labels["cell_type"] == sorted(adata.obs.cell_type.astype(str).unique())
    assert corpus.labels["perturbation"] == ["SIMG5", "SIMG7", "non-targeting"]
    corpus.verify()  # labels.json is checksummed like every other file


def test_cell_labels_match_obs(perturbed_corpus):
    corpus, _ = perturbed_corpus
    obs = pd.concat([corpus.obs(i) for i in range(corpus.n_shards)], ignore_index=True)
    seen = 0
    for b in stream(corpus, ["cell_type", "batch", "perturbation"]):
        for role in ("cell_type", "batch"):
            got = [corpus.labels[role][c] for c in b[role].tolist()]
            assert got == obs[role].iloc[b["cell_index"].numpy()].tolist()
        pert = obs["perturbation"].iloc[b["cell_index"].numpy()]
        assert ((b["perturbation"] == -1).numpy() == pert.isna().to_numpy()).all()
        seen += len(b["cell_index"])
    assert seen == corpus.n_cells


@pytest.mark.parametrize("encoding", ["rank", "continuous"])
def test_perturbed_flags_mark_exactly_the_target_gene(perturbed_corpus, encoding):
    corpus, _ = perturbed_corpus
    vocab = corpus.vocab
    flagged = 0
    for b in stream(corpus, ["perturbation"], strategy="packed", encoding=encoding):
        for i, code in enumerate(b["perturbation"].tolist()):
            lo, hi = int(b["cu_seqlens"][i]), int(b["cu_seqlens"][i + 1])
            genes, flags = b["gene_ids"][0, lo:hi], b["perturbed"][0, lo:hi]
            label = corpus.labels["perturbation"][code] if code >= 0 else None
            target = vocab.lookup([label])[0] if label in ("SIMG5", "SIMG7") else -1
            assert flags.tolist() == (genes == target).tolist()
            flagged += int(flags.sum())
    assert flagged > 50


@pytest.mark.parametrize("encoding", ["rank", "continuous"])
def test_feature_modality_comes_from_the_vocabulary(perturbed_corpus, encoding):
    corpus, adata = perturbed_corpus
    assert sorted(set(corpus.vocab.modalities)) == ["gene", "protein"]
    b = next(iter(stream(corpus, ["modality"], encoding=encoding)))
    genes, modality = b["gene_ids"][b["padding_mask"]], b["modality"][b["padding_mask"]]
    proteins = {int(t) for t in corpus.vocab.lookup(list(adata.var.gene_symbol[adata.var.modality == "protein"]))}
    assert ((modality == 1) == torch_isin(genes, proteins)).all()
    assert (modality == 1).any() and (modality == 0).any()
    if encoding == "continuous":  # one row, shared by every cell
        assert b["modality"].stride(0) == 0 and b["modality"].shape == b["values"].shape


def torch_isin(t, values):
    import torch

    return torch.isin(t, torch.tensor(sorted(values)))


def test_undeclared_condition_is_an_error(pbmc_corpus):
    with pytest.raises(ScfmInputError, match=r"columns\.batch"):
        stream(pbmc_corpus, ["batch"])
    with pytest.raises(ScfmInputError, match="unknown condition"):
        stream(pbmc_corpus, ["tissue"])
