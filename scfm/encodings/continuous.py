"""scFoundation / xTrimoGene's continuous-value encoding with read-depth-aware (RDA) down-sampling.

References: Hao et al. 2024, "Large-scale foundation model on single-cell transcriptomics" (scFoundation,
Nature Methods); Gong et al. 2023, "xTrimoGene: an efficient and scalable representation learner for
single-cell RNA-seq data" (NeurIPS). Every cell is laid out over one fixed gene list (scFoundation: 19,264
genes, all kept, zeros included) followed by two depth tokens ``T`` and ``S``.

Per cell, with ``c`` its raw counts over the gene list (0 for genes it does not express):

1. **Down-sampling** (RDA, the hierarchical beta-binomial step): only if the cell's raw total (over *all*
   input genes, the corpus's ``total_counts``) is ``>= downsample_min_total``, and then with probability
   ``downsample_prob``: draw a rate ``γ ~ Beta(beta_a, beta_b)`` and thin every count, ``c'_g ~ Binomial(c_g, γ)``.
   Otherwise ``c' = c`` and the rate is 1.
2. **Input values** ``log1p(c' × (target_sum / Σc'))`` in float64, stored as float32 (``Σ`` over the gene list:
   scFoundation normalises the 19,264-gene vector by its own sum); all zeros if ``Σc' = 0``. ``log1p=False`` drops
   the log.
3. **Depth tokens** (appended last, in this order): ``T = log10(raw total)`` and ``S = log10(total of the
   down-sampled cell)``, both over all input genes. The paper defines S as the total count of the (down-sampled)
   input sample; counts outside the gene list are thinned too, with the same γ: their thinned sum is drawn
   exactly as one ``Binomial(raw total − Σc, γ)`` (a sum of binomials with one rate is a binomial). So
   ``S <= T``, and ``S == T`` when the cell is not down-sampled. A total of 0 gives 0 (``log10`` of max(total, 1)).
4. **Masking** for value regression: each gene with ``c' > 0`` is masked with probability ``mask_nonzero`` and each
   gene with ``c' == 0`` (including genes thinned to 0) with probability ``mask_zero``, all independently (Bernoulli
   per gene, not exact counts). ``T`` and ``S`` are never masked.
5. **Target** ``log1p(c × (target_sum / Σc))`` of the **raw** counts: RDA trains the model to predict the
   high-depth (raw) expression from the down-sampled input; ``T`` tells it which depth to predict at. The target
   depends neither on masking nor on down-sampling.

Outputs, flat per token (``n_cells × max_len``, every cell the same length, genes in gene-list order, then T, S):

- ``gene_ids``: the gene's token id; ``<pad>`` (0) at T and S: models tell T/S apart by ``token_kind``;
- ``values``: float32 input values, 0 where masked (the model puts its learned mask embedding there, from
  ``value_mask``); at T and S their log10 depths;
- ``target_values``: float32, the raw cell (step 5); at T and S both ``log10(raw total)`` (never regressed);
- ``value_mask``: bool, True = masked (regress there);
- ``encoder_mask``: bool, what xTrimoGene's asymmetric encoder sees: genes with ``c' > 0`` that are not masked, plus
  T and S;
- ``token_kind``: int8, 0 gene, 1 T, 2 S.

Per cell (``cell``): ``raw_total`` and ``input_total`` (float32 counts: T and S before log10), ``downsampled`` (bool),
``rate`` (float32 γ, 1.0 if not down-sampled).

**Randomness** comes only from the cell's seed (``CellStream`` derives it from seed, epoch and global cell index:
the same cell in the same epoch encodes identically, so a resumed run is exact). Per-gene draws go in token-id
order, the corpus's order within a cell, so the input order of a cell's genes does not matter and corpus input
needs no sorting, whatever the gene list's order (scFoundation's is alphabetical by symbol). Per cell,
``rng = cell_rng(seed)`` (``scfm.encodings.rng``) draws in this order (``tests/test_continuous.py`` replays
it gene by gene):

1. ``rng.random()`` (always drawn); the cell is down-sampled iff it is ``< downsample_prob`` and raw total >= min;
2. if down-sampled: ``γ = rng.beta(beta_a, beta_b)``; ``rng.binomial(c_g, γ)`` for each listed gene with ``c_g > 0``
   in token-id order; then ``rng.binomial(raw total − Σc, γ)`` for the counts outside the gene list;
3. ``rng.random() < mask_nonzero`` for each gene with ``c'_g > 0``, in token-id order;
4. ``k = rng.binomial(n_genes, mask_zero)``, then ``rng.choice(n_genes, k, replace=False, shuffle=False)``: the
   columns drawn; those with ``c' == 0`` are masked. A uniform k-subset with ``k ~ Binomial(n, p)`` is the same as
   one Bernoulli(p) per column, so each zero gene is masked with probability ``mask_zero``, independently, at
   O(k) cost instead of one uniform per gene (the dense uniform matrix was the costly part).

Cost: one generator state and ~8 numpy calls per cell, the rest vectorised over the block (a dense
``[n_cells, max_len]`` layout built from the sparse entries by a token -> column map fixed in ``bind``).

Defaults are all configurable (``conf/encoding/continuous.yaml``). ``target_sum=1e4`` + ``log1p`` is scFoundation's
normalisation and 30% masking of expressed values its masking ratio (DESIGN.md §1); ``downsample_prob=0.5``,
``downsample_min_total=1000``, ``Beta(2, 2)`` and ``mask_zero=0.03`` are our recollection of the paper's RDA and
masking settings, not checked against its text or code here (its pretraining code is not released): override
them when you know better.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from scfm.encodings.rng import CellStreams
from scfm.errors import ScfmInputError

_HEADER_NAMES = ("gene_id", "gene_ids", "ensembl_id", "ensembl", "gene_name", "gene_symbol", "symbol", "gene")
_FIXED_SEED = 0x5CF0_C0DE  # cells encoded without seeds get ``_FIXED_SEED + position in the block``
def read_gene_list(path: str | Path) -> list[str]:
    """Gene ids from a text file (one per line) or a TSV/CSV whose header names the column (gene_id, symbol …;
    else the first column is used)."""
    path = Path(path)
    if not path.is_file():
        raise ScfmInputError("gene list file not found", where=str(path),
                             fix="give encoding.gene_list=<text/TSV file of gene ids>, or null for the whole "
                                 "corpus vocabulary")
    sep = "," if path.suffix == ".csv" else "\t"
    df = pd.read_csv(path, sep=sep, header=None, dtype=str, keep_default_na=False, comment="#")
    if df.empty:
        raise ScfmInputError("gene list is empty", where=str(path))
    first = [str(x).strip().lower() for x in df.iloc[0]]
    col = 0
    if any(x in _HEADER_NAMES or x == "index" for x in first):
        named = [i for i, x in enumerate(first) if x in _HEADER_NAMES]
        col = named[0] if named else 0
        df = df.iloc[1:]
    genes = [str(g).strip() for g in df.iloc[:, col] if str(g).strip()]
    dup = pd.Index(genes)[pd.Index(genes).duplicated()]
    if len(dup):
        raise ScfmInputError(f"gene list has {len(dup)} duplicated genes, e.g. {list(dup[:5])}", where=str(path),
                             fix="list each gene once")
    return genes


def gene_list_tokens(genes: list[str], vocab, where: str) -> np.ndarray:
    """Token id of each listed gene: by the vocabulary's key (Ensembl id), else by unique symbol. Every gene
    must be in the vocabulary (see ``ContinuousEncoding``)."""
    tokens = vocab.lookup(genes)
    missing = tokens < 0
    if missing.any():  # scFoundation's list is keyed by symbol; try the vocabulary's symbols
        symbols = pd.Series(vocab.gene_token_ids(), index=pd.Index([str(s) for s in vocab.symbols]))
        symbols = symbols[~symbols.index.duplicated(keep=False) & (symbols.index != "None")]
        by_symbol = symbols.reindex([genes[i] for i in np.flatnonzero(missing)]).to_numpy()
        found = ~np.isnan(by_symbol)
        tokens[np.flatnonzero(missing)[found]] = by_symbol[found].astype(np.int64)
        missing = tokens < 0
    if missing.any():
        examples = [genes[i] for i in np.flatnonzero(missing)[:5]]
        raise ScfmInputError(
            f"{int(missing.sum()):,} of {len(genes):,} genes of the gene list are not in the corpus vocabulary "
            f"(e.g. {examples}); every listed gene needs a token id, even genes the data never measures",
            where=where,
            fix="prepare the corpus with a vocabulary that contains the whole list (scfm-prepare vocab=<vocab.tsv "
                "built from the list>): genes absent from the data then stay at value 0; or remove them from the list")
    if len(np.unique(tokens)) != len(tokens):
        raise ScfmInputError("several genes of the gene list map to the same token", where=where,
                             fix="list each gene once (Ensembl ids without version suffixes)")
    return tokens


@dataclass
class Sample:
    """The random draws of a block (``ContinuousEncoding.sample``). Sparse entries are the block's non-zero raw
    counts over the gene list, sorted by (cell, token id); per-cell arrays have one value per cell."""

    cell: np.ndarray  # per entry: the cell
    column: np.ndarray  # per entry: position in the gene list
    counts: np.ndarray  # per entry: raw count c (> 0)
    thinned: np.ndarray  # per entry: down-sampled count c' (<= c; == c when the cell is not down-sampled)
    masked: np.ndarray  # per entry: masked, for entries with c' > 0 (False where c' == 0)
    zero_draws: np.ndarray  # cell * n_genes + column drawn for zero masking (masked where c' == 0)
    bounds: np.ndarray  # [n + 1]: cell i's entries are [bounds[i], bounds[i + 1])
    raw_in: np.ndarray  # per cell: Σc over the gene list
    thinned_in: np.ndarray  # per cell: Σc' over the gene list
    raw_total: np.ndarray  # per cell: raw total over all input genes (T = log10)
    input_total: np.ndarray  # per cell: down-sampled total over all input genes (S = log10)
    downsampled: np.ndarray  # per cell: bool
    rate: np.ndarray  # per cell: γ (1.0 when not down-sampled)


@dataclass
class ContinuousEncoding:
    """Encoding ``continuous`` (scFoundation / xTrimoGene); see the module docstring for every definition.

    ``gene_list``: None = every gene token of the corpus vocabulary, in token order; else a text/TSV file of
    gene ids (Ensembl ids, or symbols matched to the vocabulary's symbols), e.g. scFoundation's 19,264 genes.
    Every listed gene must be in the corpus vocabulary (else ``ScfmInputError`` with the fix): a gene the data
    never measures is a position whose value is always 0, and it still needs a token id for its embedding.
    ``max_genes``: None = the whole list; else keep the ``max_genes`` genes of the list expressed in the most cells
    (the corpus's ``gene_stats`` ``n_nonzero``; ties by token id), in list order (``scale=tiny`` uses it).
    """

    gene_list: str | None = None
    target_sum: float = 1e4  # scFoundation: log1p(count / total × 10^4)
    log1p: bool = True
    downsample_prob: float = 0.5  # RDA: fraction of eligible cells that are down-sampled
    downsample_min_total: int = 1000  # RDA: cells with fewer raw counts are never down-sampled
    beta_a: float = 2.0  # RDA: γ ~ Beta(beta_a, beta_b)
    beta_b: float = 2.0
    mask_nonzero: float = 0.3  # value-regression masking of expressed genes (scFoundation: 30%)
    mask_zero: float = 0.03  # masking of zero genes
    depth_tokens: bool = True  # append T and S
    max_genes: int | None = None  # keep the N most often expressed genes of the list (small runs); None = all
    name: str = field(default="continuous", init=False)

    def __post_init__(self) -> None:
        for key in ("downsample_prob", "mask_nonzero", "mask_zero"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ScfmInputError(f"encoding.{key}={getattr(self, key)} must be in [0, 1]")
        if not (self.beta_a > 0 and self.beta_b > 0):
            raise ScfmInputError(f"encoding.beta_a={self.beta_a}, beta_b={self.beta_b} must be > 0")
        if not self.target_sum > 0:
            raise ScfmInputError(f"encoding.target_sum={self.target_sum} must be > 0")
        if self.max_genes is not None and self.max_genes < 1:
            raise ScfmInputError(f"encoding.max_genes={self.max_genes} must be >= 1 or null (every listed gene)")
        if self.downsample_min_total < 0:
            raise ScfmInputError(f"encoding.downsample_min_total={self.downsample_min_total} must be >= 0")
        self._tokens: np.ndarray | None = None

    # -- shape -----------------------------------------------------------------------------------
    @property
    def n_genes(self) -> int:
        if self._tokens is None:
            raise RuntimeError("ContinuousEncoding: call bind(corpus) first (the gene list sets the length)")
        return len(self._tokens)

    @property
    def n_specials(self) -> int:
        return 2 if self.depth_tokens else 0

    @property
    def max_len(self) -> int:
        """Every cell's length: the number of genes, + 2 depth tokens."""
        return self.n_genes + self.n_specials

    @property
    def gene_tokens(self) -> np.ndarray:
        """Token ids of the gene list, in layout order."""
        self.n_genes  # noqa: B018 - raises if unbound
        return self._tokens

    def bind(self, corpus) -> ContinuousEncoding:
        """Fix the gene list (token ids, layout order) and the token -> column map (call once, before iterating)."""
        vocab = corpus.vocab
        if self.gene_list is None:
            tokens = vocab.gene_token_ids()
        else:
            tokens = gene_list_tokens(read_gene_list(self.gene_list), vocab, where=str(self.gene_list))
        tokens = tokens.astype(np.int64)
        if self.max_genes is not None and len(tokens) > self.max_genes:
            stats = corpus.gene_stats.set_index("token_id")["n_nonzero"]
            n_nonzero = stats.reindex(tokens).fillna(0).to_numpy()
            top = np.lexsort((tokens, -n_nonzero))[: self.max_genes]  # most often expressed first, ties by token id
            tokens = tokens[np.sort(top)]  # kept in list order
        self._tokens = tokens
        self._column = np.full(len(vocab), -1, dtype=np.int64)
        self._column[self._tokens] = np.arange(len(self._tokens))
        self._row_ids = np.concatenate([self._tokens, np.zeros(self.n_specials, np.int64)]).astype(np.int32)
        self._row_kind = np.concatenate([np.zeros(len(self._tokens), np.int8),
                                         np.arange(1, self.n_specials + 1, dtype=np.int8)])
        return self

    def lengths(self, shard) -> np.ndarray:
        """Encoded length of every cell of a shard: always ``max_len``."""
        return np.full(len(shard.offsets) - 1, self.max_len, dtype=np.int64)

    # -- encoding --------------------------------------------------------------------------------
    def sample(self, gene_ids: np.ndarray, counts: np.ndarray, offsets: np.ndarray, totals: np.ndarray,
               cell_seeds: np.ndarray | None = None) -> Sample:
        """The random part of ``encode``, on the block's sparse entries (down-sampling and masks); see ``Sample``."""
        G = self.n_genes
        offsets = np.asarray(offsets, dtype=np.int64)
        n = len(offsets) - 1
        totals = np.asarray(totals, dtype=np.int64)
        if cell_seeds is None:
            cell_seeds = np.uint64(_FIXED_SEED) + np.arange(n, dtype=np.uint64)
        cell_seeds = np.asarray(cell_seeds, dtype=np.uint64)
        if len(totals) != n or len(cell_seeds) != n:
            raise ValueError(f"{n} cells but {len(totals)} totals and {len(cell_seeds)} seeds")

        # sparse entries over the gene list, sorted by (cell, token id): the order of the per-gene draws
        gene_ids = np.asarray(gene_ids, dtype=np.int64)
        counts = np.asarray(counts, dtype=np.int64)
        if len(counts) and counts.min() < 0:
            raise ScfmInputError("negative counts passed to the continuous encoding", fix="encode raw counts")
        cell_of = np.repeat(np.arange(n, dtype=np.int64), np.diff(offsets))
        col = self._column[gene_ids]
        keep = (col >= 0) & (counts > 0)
        cell_k, c, col = cell_of[keep], counts[keep], col[keep]
        key = cell_k * len(self._column) + gene_ids[keep]
        if not (np.diff(key) > 0).all():  # corpus cells are in token order already: sort only other input
            order = np.argsort(key)
            key, c, cell_k, col = key[order], c[order], cell_k[order], col[order]
            if (np.diff(key) == 0).any():
                raise ScfmInputError("a gene appears twice in one cell", fix="give each cell's genes once (sum first)")
        bounds = np.searchsorted(cell_k, np.arange(n + 1, dtype=np.int64))
        csum = np.concatenate([[0], np.cumsum(c)])
        raw_in = csum[bounds[1:]] - csum[bounds[:-1]]  # Σc over the gene list
        if (totals < raw_in).any():
            i = int(np.argmax(totals < raw_in))
            raise ScfmInputError(f"cell {i}: total_counts {totals[i]} < its counts over the gene list {raw_in[i]}",
                                 fix="totals must count all input genes (the corpus's total_counts)")

        # per-cell draws, in the module docstring's order (plain Python scalars: this loop is the hot part). The
        # mask draws of every cell land in one buffer, in the order of the entries with c' > 0 (all of a cell's
        # entries unless it is down-sampled), and are compared with p_nz once, after the loop.
        thin = c.copy()  # c', the down-sampled counts
        off_thin = (totals - raw_in).tolist()  # counts outside the gene list, thinned with the same rate
        draws = np.empty(len(c))
        zero_pick: list[np.ndarray] = []
        down, rate = [False] * n, [1.0] * n
        p_ds, p_nz, p_z, a, b = self.downsample_prob, self.mask_nonzero, self.mask_zero, self.beta_a, self.beta_b
        min_total = self.downsample_min_total
        bl, tl = bounds.tolist(), totals.tolist()
        streams = CellStreams(cell_seeds)
        at = 0  # next free slot of ``draws``
        for i in range(n):
            rng = streams(i)  # == cell_rng(cell_seeds[i])
            lo, hi = bl[i], bl[i + 1]
            if rng.random() < p_ds and tl[i] >= min_total:
                g = rng.beta(a, b)
                seg = rng.binomial(c[lo:hi], g)
                thin[lo:hi] = seg
                off_thin[i] = int(rng.binomial(off_thin[i], g))
                down[i], rate[i] = True, g
                k = int(np.count_nonzero(seg))
            else:
                k = hi - lo
            rng.random(out=draws[at:at + k])
            at += k
            zero_pick.append(rng.choice(G, rng.binomial(G, p_z), replace=False, shuffle=False))
        mask_nz = np.zeros(len(c), dtype=bool)
        mask_nz[thin > 0] = draws[:at] < p_nz

        tsum = np.concatenate([[0], np.cumsum(thin)])
        thin_in = tsum[bounds[1:]] - tsum[bounds[:-1]]  # Σc' over the gene list
        picks = np.concatenate(zero_pick) if n else np.zeros(0, np.int64)
        picks += np.repeat(np.arange(n, dtype=np.int64) * G, [len(z) for z in zero_pick])
        return Sample(cell=cell_k, column=col, counts=c, thinned=thin, masked=mask_nz, zero_draws=picks,
                      bounds=bounds, raw_in=raw_in, thinned_in=thin_in, raw_total=totals,
                      input_total=thin_in + np.array(off_thin, dtype=np.int64), downsampled=np.array(down, dtype=bool),
                      rate=np.array(rate, dtype=np.float64))

    def encode(self, gene_ids: np.ndarray, counts: np.ndarray, offsets: np.ndarray, totals: np.ndarray,
               cell_seeds: np.ndarray | None = None) -> dict:
        """Encode a block of cells (CSR: cell ``i`` is ``[offsets[i], offsets[i+1])``); see the module docstring."""
        smp = self.sample(gene_ids, counts, offsets, totals, cell_seeds)
        G, L = self.n_genes, self.max_len
        n = len(smp.raw_total)
        flat = smp.column + smp.cell * L  # cell * L + column
        values = np.zeros(n * L, dtype=np.float32)
        target = np.zeros(n * L, dtype=np.float32)
        value_mask = np.zeros(n * L, dtype=bool)
        enc = np.zeros(n * L, dtype=bool)
        target[flat] = self._normalise(smp.counts, smp.raw_in, smp.cell)
        nzt = smp.thinned > 0
        x = self._normalise(smp.thinned[nzt], smp.thinned_in, smp.cell[nzt])
        masked = smp.masked[nzt]
        x[masked] = 0.0
        flat_nz = flat[nzt]
        values[flat_nz] = x
        enc[flat_nz[~masked]] = True
        value_mask[flat_nz[masked]] = True
        # zero masking: of the columns drawn, those where c' == 0 (neither seen by the encoder nor already masked)
        pick = smp.zero_draws + (smp.zero_draws // G) * (L - G)
        value_mask[pick[~(enc[pick] | value_mask[pick])]] = True
        if self.depth_tokens:
            t_pos = np.arange(n, dtype=np.int64) * L + G
            depth_t = np.log10(np.maximum(smp.raw_total, 1)).astype(np.float32)
            depth_s = np.log10(np.maximum(smp.input_total, 1)).astype(np.float32)
            values[t_pos], values[t_pos + 1] = depth_t, depth_s
            target[t_pos] = target[t_pos + 1] = depth_t  # the target row is the raw cell: its S is T
            enc[t_pos] = enc[t_pos + 1] = True
        return {
            "gene_ids": np.tile(self._row_ids, n),
            "values": values,
            "target_values": target,
            "value_mask": value_mask,
            "encoder_mask": enc,
            "token_kind": np.tile(self._row_kind, n),
            "offsets": np.arange(n + 1, dtype=np.int64) * L,
            "cell": {"raw_total": smp.raw_total.astype(np.float32), "input_total": smp.input_total.astype(np.float32),
                     "downsampled": smp.downsampled, "rate": smp.rate.astype(np.float32)},
        }

    def _normalise(self, counts: np.ndarray, totals: np.ndarray, cell: np.ndarray) -> np.ndarray:
        """``log1p(count × (target_sum / total))`` (``totals`` per cell, ``cell`` per entry) in float64, as float32."""
        scale = float(self.target_sum) / np.maximum(totals, 1).astype(np.float64)
        x = counts * scale[cell]
        return (np.log1p(x) if self.log1p else x).astype(np.float32)
