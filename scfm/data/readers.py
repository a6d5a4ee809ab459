"""Stream raw-count cells from ``.h5ad`` files and 10x Genomics outputs, chunk by chunk, validating them.

``open_source(path)`` recognises, by content rather than by name:

* an AnnData ``.h5ad`` file: ``X``, a named layer or ``.raw``; CSR sparse or dense; read with h5py so
  memory stays bounded by one chunk;
* a 10x mtx folder: Cell Ranger v2 (``genes.tsv``, ``barcodes.tsv``, ``matrix.mtx``) or v3
  (``features.tsv.gz``, ``barcodes.tsv.gz``, ``matrix.mtx.gz``); plain or gzipped files of either naming;
* a 10x ``.h5``: Cell Ranger v2 (one group per genome) or v3 (``matrix/`` with ``features/``).

Every chunk is checked (vectorised) before it is handed out: counts must be finite, non-negative integers
that fit int32; otherwise ``ScfmInputError`` names the file, the first offending cell and gene, the value
and the fix. Cells with no counts are passed through (what to do with them is the writer's decision).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp

from scfm.errors import ScfmInputError

__all__ = ["Chunk", "Source", "open_source"]

_ENSEMBL = r"^(ENS[A-Z]*G\d+)(?:\.\d+)?(.*)$"  # groups: id without version, suffix (e.g. "_PAR_Y")
_ID_COLUMNS = ("gene_ids", "gene_id", "ensembl_id", "feature_id")
_SYMBOL_COLUMNS = ("gene_symbols", "gene_symbol", "symbol", "gene_name", "feature_name")
_COUNTS_LAYER = re.compile(r"count|raw|umi", re.IGNORECASE)
_INT32_MAX = np.iinfo(np.int32).max
_DENSE_BLOCK = 1 << 24  # elements per dense read (64 MiB of float32)
_MTX_ROWS = 1 << 20  # mtx lines parsed per pandas chunk
_RAW_FIX = "scfm needs raw counts: pass `layer=counts` / `use_raw=true`, or the raw matrix"
_UNREADABLE_FIX = "check the path, re-copy or re-download the file, and compare its size or checksum"


@dataclass
class Chunk:
    """Consecutive cells of a source."""

    start: int  # index of the first cell of the chunk in the source
    counts: sp.csr_matrix  # cells × source genes, int32 raw counts, canonical (sorted, no duplicates/zeros)
    obs: pd.DataFrame  # rows for these cells; index = cell id (str); original obs columns kept


class Source:
    """One input (a file or a 10x folder). Build with :func:`open_source`.

    ``var`` has one row per source gene, in column order (RangeIndex): ``gene_id`` (version-less Ensembl id
    or None), ``symbol`` (or None), plus ``feature_type`` / ``modality`` when the input has them.
    """

    format: str = ""

    def __init__(self, path: Path, var: pd.DataFrame, obs: pd.DataFrame, raw_fix: str = _RAW_FIX) -> None:
        obs.index = obs.index.astype(str)
        _check_unique_cells(obs.index, path)
        self.path = path
        self.var = var.reset_index(drop=True)
        self.n_cells = len(obs)
        self._obs = obs
        self._raw_fix = raw_fix

    @property
    def n_genes(self) -> int:
        return len(self.var)

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} {self.format} {self.path}: {self.n_cells} cells × {self.n_genes} genes>"
        )

    def read_obs(self) -> pd.DataFrame:
        """All cell metadata (a copy; index = cell id)."""
        return self._obs.copy()

    def sha256(self) -> str:
        """SHA-256 of the file, or of the concatenated files of a 10x folder in sorted-name order."""
        h = hashlib.sha256()
        for file in self._files():
            with open(file, "rb") as fh:
                while block := fh.read(1 << 20):
                    h.update(block)
        return h.hexdigest()

    def iter_chunks(self, chunk_size: int = 8192) -> Iterator[Chunk]:
        """Yield validated chunks of at most ``chunk_size`` cells, in source order."""
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        try:
            for start, block in self._blocks(chunk_size):
                counts = self._validate(start, block)
                yield Chunk(start, counts, self._obs.iloc[start : start + counts.shape[0]].copy())
        except (OSError, EOFError) as e:
            raise _unreadable(self.path, e) from e

    # -- to implement per format -------------------------------------------------------------------------
    def _files(self) -> list[Path]:
        return [self.path]

    def _blocks(self, chunk_size: int) -> Iterator[tuple[int, sp.csr_matrix]]:
        """Yield (start, raw CSR rows) for consecutive row ranges."""
        raise NotImplementedError

    # -- validation --------------------------------------------------------------------------------------
    def _validate(self, start: int, m: sp.csr_matrix) -> sp.csr_matrix:
        m.sum_duplicates()  # sorts column indices within rows (mtx may repeat entries; they add up)
        data = m.data
        kind = data.dtype.kind
        if kind == "f":
            self._reject(start, m, ~np.isfinite(data), "is not finite", "the matrix holds NaN or infinity")
            self._reject(start, m, data < 0, "is negative", "raw counts cannot be negative (scaled data?)")
            self._reject(
                start,
                m,
                data != np.rint(data),
                "is not an integer",
                "this looks like normalised or log-transformed data, not raw counts",
            )
        elif kind == "i":
            self._reject(start, m, data < 0, "is negative", "raw counts cannot be negative")
        elif kind not in "ub":
            raise ScfmInputError(
                f"unsupported matrix dtype {data.dtype}", where=str(self.path), fix=self._raw_fix
            )
        if data.size and data.max() > _INT32_MAX:
            self._reject(start, m, data > _INT32_MAX, "does not fit int32", "counts this large are not UMIs")
        m.eliminate_zeros()
        index_dtype = np.int32 if m.nnz <= _INT32_MAX else np.int64
        return sp.csr_matrix(
            (m.data.astype(np.int32), m.indices.astype(index_dtype), m.indptr.astype(index_dtype)),
            shape=m.shape,
        )

    def _reject(self, start: int, m: sp.csr_matrix, bad: np.ndarray, what: str, why: str) -> None:
        if not bad.any():
            return
        k = int(np.argmax(bad))
        row = int(np.searchsorted(m.indptr, k, side="right")) - 1
        col = int(m.indices[k])
        gene = self.var.iloc[col]
        label = gene["symbol"] or gene["gene_id"] or "?"
        cell = self._obs.index[start + row]
        raise ScfmInputError(
            f"value {m.data[k].item():.7g} {what} at cell {cell!r} (row {start + row}), "
            f"gene {label!r} (column {col}); {why} ({int(bad.sum())} such values in this chunk)",
            where=str(self.path),
            fix=self._raw_fix,
        )


def open_source(
    path: str | Path,
    *,
    layer: str | None = None,
    use_raw: bool = False,
    gene_id_column: str | None = None,
    symbol_column: str | None = None,
    genome: str | None = None,
) -> Source:
    """Open an ``.h5ad`` file, a 10x mtx folder (or its ``matrix.mtx[.gz]``) or a 10x ``.h5`` file.

    ``layer`` / ``use_raw`` / ``gene_id_column`` / ``symbol_column`` apply to ``.h5ad`` only; ``genome``
    to 10x ``.h5`` only (v2: the genome group; v3: keep the features of that genome).
    Reads metadata only (obs, var, shapes); counts are read by :meth:`Source.iter_chunks`.
    """
    p = Path(path)
    if not p.exists():
        raise ScfmInputError("no such file or folder", where=str(p), fix="check the path")
    h5ad_opts = {
        "layer": layer,
        "use_raw": use_raw,
        "gene_id_column": gene_id_column,
        "symbol_column": symbol_column,
    }
    if (p / ".zgroup").exists() or (p / "zarr.json").exists():
        raise ScfmInputError(
            "zarr stores are not supported",
            where=str(p),
            fix="convert it once: `anndata.read_zarr(p).write_h5ad(p2)`",
        )
    if p.is_dir() or p.name in ("matrix.mtx", "matrix.mtx.gz"):
        _no_options(p, "a 10x mtx folder", **h5ad_opts, genome=genome)
        return _MtxSource(p if p.is_dir() else p.parent)
    if not h5py.is_hdf5(p):
        raise ScfmInputError(
            "not an HDF5 file: it is unreadable, truncated, or in an unsupported format",
            where=str(p),
            fix="give an .h5ad file, a 10x .h5 file or a 10x mtx folder; " + _UNREADABLE_FIX,
        )
    try:
        with _open_h5(p) as f:
            kind = _sniff_h5(f, p)
        if kind == "h5ad":
            _no_options(p, "an .h5ad file", genome=genome)
            return _H5adSource(p, layer, use_raw, gene_id_column, symbol_column)
        _no_options(p, "a 10x .h5 file", **h5ad_opts)
        return _TenxH5Source(p, genome)
    except (OSError, EOFError) as e:
        raise _unreadable(p, e) from e
    except KeyError as e:  # h5py: a dataset the layout requires is missing
        raise ScfmInputError(
            f"incomplete file, missing an HDF5 element ({e})",
            where=str(p),
            fix="re-export the file (Cell Ranger .h5 or anndata.write_h5ad)",
        ) from e


# ---------------------------------------------------------------------------------------------------------
# .h5ad
# ---------------------------------------------------------------------------------------------------------
class _H5adSource(Source):
    """AnnData file read with h5py: obs/var via ``anndata.io.read_elem``, counts by row ranges."""

    format = "h5ad"

    def __init__(
        self,
        path: Path,
        layer: str | None,
        use_raw: bool,
        gene_id_column: str | None,
        symbol_column: str | None,
    ) -> None:
        where = str(path)
        with _open_h5(path) as f:
            layers = list(f["layers"]) if "layers" in f else []
            has_raw = "raw" in f and "X" in f["raw"]
            self._key = _h5ad_key(f, path, layer, use_raw, layers, has_raw)
            self._dense, shape = _h5ad_matrix(f[self._key], path, self._key)
            obs = _read_frame(f, "obs", path)
            var = _read_frame(f, "raw/var" if self._key == "raw/X" else "var", path)
        if tuple(shape) != (len(obs), len(var)):
            raise ScfmInputError(
                f"{self._key} has shape {tuple(shape)} but obs × var is {len(obs)} × {len(var)}",
                where=where,
                fix="re-write the file with anndata",
            )
        alternatives = ["`use_raw=true` (this file has .raw)"] if has_raw and not use_raw else []
        alternatives += [
            f"`layer={name}` (this file has that layer)"
            for name in layers
            if name != layer and _COUNTS_LAYER.search(name)
        ]
        raw_fix = "scfm needs raw counts: pass " + " or ".join(alternatives) if alternatives else _RAW_FIX
        super().__init__(path, _h5ad_var(var, path, gene_id_column, symbol_column), obs, raw_fix)

    def _blocks(self, chunk_size: int) -> Iterator[tuple[int, sp.csr_matrix]]:
        with _open_h5(self.path) as f:
            elem = f[self._key]
            for start in range(0, self.n_cells, chunk_size):
                stop = min(start + chunk_size, self.n_cells)
                if self._dense:
                    yield start, _read_dense_rows(elem, start, stop)
                else:
                    yield start, _read_csr_rows(elem, start, stop, self.n_genes)


def _h5ad_key(
    f: h5py.File, path: Path, layer: str | None, use_raw: bool, layers: list[str], has_raw: bool
) -> str:
    """HDF5 key of the matrix to read: ``X``, ``layers/<layer>`` or ``raw/X``."""
    where = str(path)
    if layer is not None and use_raw:
        raise ScfmInputError("both layer= and use_raw= given", where=where, fix="pass only one of them")
    if layer is not None:
        if layer not in layers:
            raise ScfmInputError(
                f"no layer {layer!r} (layers: {layers or 'none'})",
                where=where,
                fix="pass one of the layers, or leave `layer` unset to use X",
            )
        return f"layers/{layer}"
    if use_raw:
        if not has_raw:
            raise ScfmInputError(
                "use_raw given but the file has no .raw",
                where=where,
                fix="leave `use_raw` unset" + (f" or pass layer= one of {layers}" if layers else ""),
            )
        return "raw/X"
    if "X" not in f:
        raise ScfmInputError(
            f"the file has no X (layers: {layers or 'none'})",
            where=where,
            fix="pass `layer=<name>` or `use_raw=true`",
        )
    return "X"


def _h5ad_matrix(elem: h5py.Group | h5py.Dataset, path: Path, key: str) -> tuple[bool, tuple[int, int]]:
    """(is_dense, shape) of an AnnData matrix element; CSC and other encodings are rejected."""
    if isinstance(elem, h5py.Dataset):
        if elem.ndim != 2:
            raise ScfmInputError(f"{key} is a {elem.ndim}-D dataset, not a matrix", where=str(path))
        return True, elem.shape
    attrs = elem.attrs
    encoding = _as_str(attrs.get("encoding-type", attrs.get("h5sparse_format", "")))
    shape = attrs.get("shape", attrs.get("h5sparse_shape"))
    if encoding in ("csr_matrix", "csr") and shape is not None:
        return False, (int(shape[0]), int(shape[1]))
    if encoding in ("csc_matrix", "csc"):
        raise ScfmInputError(
            f"{key} is stored as CSC (column-compressed); cells can only be streamed from CSR or dense",
            where=str(path),
            fix="convert once and re-save, e.g. "
            "`a = anndata.read_h5ad(p); a.X = a.X.tocsr(); a.write_h5ad(p2)` (same for a layer or a.raw)",
        )
    raise ScfmInputError(
        f"{key} has unsupported encoding {encoding or 'unknown'!r}",
        where=str(path),
        fix="re-write the file with a recent anndata (CSR sparse or dense X)",
    )


def _read_frame(f: h5py.File, key: str, path: Path) -> pd.DataFrame:
    if key not in f:
        raise ScfmInputError(f"the file has no {key}", where=str(path), fix="re-write the file with anndata")
    try:
        return anndata.io.read_elem(f[key])
    except (OSError, EOFError):
        raise
    except Exception as e:  # anndata raises many kinds for old or odd encodings
        raise ScfmInputError(
            f"cannot read {key}: {e}",
            where=str(path),
            fix="re-write the file with a recent anndata (anndata.read_h5ad + write_h5ad)",
        ) from e


def _h5ad_var(
    var: pd.DataFrame, path: Path, gene_id_column: str | None, symbol_column: str | None
) -> pd.DataFrame:
    """Gene ids and symbols from an AnnData var.

    Columns named explicitly win; otherwise an Ensembl-looking index gives ``gene_id`` and a symbol column
    (``gene_symbols``, ``gene_symbol``, ...) the symbol; a symbol-looking index gives ``symbol`` (unless a
    symbol column exists: indexes are often made unique with ``-1`` suffixes) and an id column
    (``gene_ids``, ...) the ids. An index mixing both kinds is an error unless a column is named.
    """
    where = str(path)
    for name in (gene_id_column, symbol_column):
        if name is not None and name not in var.columns:
            raise ScfmInputError(
                f"var has no column {name!r} (columns: {list(var.columns)})",
                where=where,
                fix="pass one of the var columns",
            )
    index = _clean(var.index)
    gene_ids_in_index = _ensembl(index)
    looks = gene_ids_in_index.notna()
    frac = looks.sum() / max(1, index.notna().sum())
    kind = "ensembl" if frac >= 0.99 else "symbol" if frac <= 0.01 else "mixed"
    if kind == "mixed" and gene_id_column is None and symbol_column is None:
        raise ScfmInputError(
            f"var index mixes Ensembl ids ({frac:.1%}, e.g. {list(index[looks][:3])}) and other names "
            f"(e.g. {list(index[~looks & index.notna()][:3])})",
            where=where,
            fix="pass `gene_id_column=` / `symbol_column=` naming var columns with clean ids / symbols "
            f"(columns: {list(var.columns)}), or map the index to one kind first",
        )
    id_col = gene_id_column or next((c for c in _ID_COLUMNS if c in var.columns), None)
    sym_col = symbol_column or next((c for c in _SYMBOL_COLUMNS if c in var.columns), None)
    if gene_id_column is not None:
        gene_id = _ensembl(_clean(var[gene_id_column]))
        if gene_id.isna().all():
            raise ScfmInputError(
                f"var column {gene_id_column!r} holds no Ensembl ids (e.g. {list(var[gene_id_column][:3])})",
                where=where,
                fix="name a column of Ensembl gene ids (ENSG...), or leave gene_id_column unset",
            )
    elif kind == "ensembl":
        gene_id = gene_ids_in_index
    else:
        gene_id = _ensembl(_clean(var[id_col])) if id_col else pd.Series([None] * len(var), dtype=object)
    if sym_col is not None:
        symbol = _clean(var[sym_col])
    else:
        symbol = index if kind == "symbol" else pd.Series([None] * len(var), dtype=object)
    out = pd.DataFrame({"gene_id": gene_id.to_numpy(), "symbol": symbol.to_numpy()})
    for names, target in ((("feature_type", "feature_types"), "feature_type"), (("modality",), "modality")):
        column = next((c for c in names if c in var.columns), None)
        if column is not None:
            out[target] = _clean(var[column]).to_numpy()
    return out


# ---------------------------------------------------------------------------------------------------------
# 10x .h5
# ---------------------------------------------------------------------------------------------------------
class _TenxH5Source(Source):
    """Cell Ranger .h5: CSC genes × cells, i.e. CSR cells × genes, read by indptr slices."""

    format = "10x_h5"

    def __init__(self, path: Path, genome: str | None) -> None:
        where = str(path)
        with _open_h5(path) as f:
            if isinstance(f.get("matrix"), h5py.Group):  # Cell Ranger >= 3
                self._group = "matrix"
                g = f["matrix"]
                feats = g["features"]
                ids, names = _strings(feats["id"]), _strings(feats["name"])
                types = _strings(feats["feature_type"]) if "feature_type" in feats else None
                self._cols: np.ndarray | None = None
                if genome is not None:
                    genomes = _strings(feats["genome"]) if "genome" in feats else np.array([], dtype=object)
                    if genome not in set(genomes):
                        raise ScfmInputError(
                            f"no features of genome {genome!r} (genomes: {sorted(set(genomes))})",
                            where=where,
                            fix="pass one of these",
                        )
                    self._cols = np.flatnonzero(genomes == genome)
            else:  # Cell Ranger 1-2: one group per genome
                genomes = sorted(k for k, v in f.items() if isinstance(v, h5py.Group) and "indptr" in v)
                if genome is None and len(genomes) > 1:
                    raise ScfmInputError(
                        f"the file holds several genomes: {genomes}",
                        where=where,
                        fix="pass `genome=` one of them",
                    )
                if genome is not None and genome not in genomes:
                    raise ScfmInputError(
                        f"no genome {genome!r} (genomes: {genomes})", where=where, fix="pass one of these"
                    )
                self._group = genome or genomes[0]
                g = f[self._group]
                ids, names, types, self._cols = _strings(g["genes"]), _strings(g["gene_names"]), None, None
            n_genes, n_cells = (int(x) for x in g["shape"][:])
            barcodes = _strings(g["barcodes"])
        if (len(ids), len(barcodes)) != (n_genes, n_cells):
            raise ScfmInputError(
                f"shape {n_genes} × {n_cells} does not match {len(ids)} features × {len(barcodes)} barcodes",
                where=where,
                fix="re-export the matrix",
            )
        self._n_all_genes = n_genes
        var = _tenx_var(ids, names, types)
        if self._cols is not None:
            var = var.iloc[self._cols]
        super().__init__(path, var, pd.DataFrame(index=pd.Index(barcodes, dtype=object)))

    def _blocks(self, chunk_size: int) -> Iterator[tuple[int, sp.csr_matrix]]:
        with _open_h5(self.path) as f:
            g = f[self._group]
            for start in range(0, self.n_cells, chunk_size):
                stop = min(start + chunk_size, self.n_cells)
                m = _read_csr_rows(g, start, stop, self._n_all_genes)
                yield start, (m if self._cols is None else m[:, self._cols])


# ---------------------------------------------------------------------------------------------------------
# 10x mtx folder
# ---------------------------------------------------------------------------------------------------------
class _MtxSource(Source):
    """Cell Ranger mtx folder. Matrix Market has no row index, so the whole matrix is parsed (streamed, in
    blocks of lines) into one CSR before the first chunk: memory is O(nnz) (~16 bytes per non-zero), freed
    when iteration ends."""

    format = "10x_mtx"

    def __init__(self, folder: Path) -> None:
        self._matrix = _pick(folder, "matrix.mtx.gz", "matrix.mtx")
        features = _pick(folder, "features.tsv.gz", "features.tsv", "genes.tsv.gz", "genes.tsv")
        barcodes = _pick(folder, "barcodes.tsv.gz", "barcodes.tsv")
        self._paths = sorted([self._matrix, features, barcodes])
        feats = _read_tsv(features)
        cells = _read_tsv(barcodes)[0].to_numpy(dtype=object)
        types = feats[2] if feats.shape[1] > 2 else None
        var = _tenx_var(feats[0], feats[1] if feats.shape[1] > 1 else feats[0], types)
        self._n_genes, n_cells, self._nnz, self._skip, self._field = _mtx_header(self._matrix)
        if (self._n_genes, n_cells) != (len(var), len(cells)):
            raise ScfmInputError(
                f"matrix is {self._n_genes} × {n_cells} but there are {len(var)} features and {len(cells)} "
                "barcodes (10x matrices are genes × cells)",
                where=str(self._matrix),
                fix="check that the three files belong together (or transpose the matrix)",
            )
        super().__init__(folder, var, pd.DataFrame(index=pd.Index(cells, dtype=object)))

    def _files(self) -> list[Path]:
        return self._paths

    def _blocks(self, chunk_size: int) -> Iterator[tuple[int, sp.csr_matrix]]:
        m = self._load()
        for start in range(0, self.n_cells, chunk_size):
            yield start, m[start : start + chunk_size]

    def _load(self) -> sp.csr_matrix:
        nnz, where = self._nnz, str(self._matrix)
        genes, cells, values = np.empty(nnz, np.int32), np.empty(nnz, np.int32), np.ones(nnz, np.float64)
        pos = 0
        try:
            reader = pd.read_csv(
                self._matrix,
                sep=" ",
                header=None,
                skiprows=self._skip,
                chunksize=_MTX_ROWS,
                usecols=[0, 1] if self._field == "pattern" else [0, 1, 2],
                dtype=np.float64,
            )
            for block in reader:
                n = len(block)
                if pos + n > nnz:
                    raise ValueError(f"more entries than the {nnz} the header announces")
                a = block.to_numpy()
                genes[pos : pos + n], cells[pos : pos + n] = a[:, 0], a[:, 1]
                if a.shape[1] > 2:
                    values[pos : pos + n] = a[:, 2]
                pos += n
        except (OSError, EOFError, ValueError, zlib.error) as e:
            raise ScfmInputError(
                f"cannot parse the matrix: {e}; unreadable or truncated", where=where, fix=_UNREADABLE_FIX
            ) from e
        if pos != nnz:
            raise ScfmInputError(
                f"the matrix has {pos} entries but its header announces {nnz}: truncated?",
                where=where,
                fix=_UNREADABLE_FIX,
            )
        genes -= 1
        cells -= 1
        if nnz and (
            genes.min() < 0 or genes.max() >= self._n_genes or cells.min() < 0 or cells.max() >= self.n_cells
        ):
            raise ScfmInputError(
                "matrix entry indices are outside the header's dimensions", where=where, fix=_UNREADABLE_FIX
            )
        if np.all(cells[1:] >= cells[:-1]):  # Cell Ranger writes entries sorted by cell: no sort needed
            indptr = np.concatenate([[0], np.cumsum(np.bincount(cells, minlength=self.n_cells))])
            return sp.csr_matrix((values, genes, indptr), shape=(self.n_cells, self._n_genes))
        return sp.coo_matrix((values, (cells, genes)), shape=(self.n_cells, self._n_genes)).tocsr()


def _mtx_header(path: Path) -> tuple[int, int, int, int, str]:
    """(rows, cols, nnz, lines before the first entry, field) of a coordinate Matrix Market file."""
    where = str(path)
    try:
        with gzip.open(path, "rt") if path.suffix == ".gz" else open(path) as fh:
            banner = fh.readline().split()
            skip = 1
            for line in fh:
                skip += 1
                if line.strip() and not line.startswith("%"):
                    dims = line.split()
                    break
            else:
                dims = []
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as e:
        raise _unreadable(path, e) from e
    if len(banner) < 5 or banner[0] != "%%MatrixMarket" or banner[2].lower() != "coordinate":
        raise ScfmInputError(
            f"not a coordinate Matrix Market file (first line: {' '.join(banner)!r})",
            where=where,
            fix=_UNREADABLE_FIX,
        )
    field, symmetry = banner[3].lower(), banner[4].lower()
    if field not in ("integer", "real", "double", "pattern") or symmetry != "general":
        raise ScfmInputError(
            f"unsupported Matrix Market type {field} {symmetry}",
            where=where,
            fix="write a general integer/real coordinate matrix (as Cell Ranger does)",
        )
    if len(dims) != 3:
        raise ScfmInputError("missing the 'rows cols entries' size line", where=where, fix=_UNREADABLE_FIX)
    return int(dims[0]), int(dims[1]), int(dims[2]), skip, field


def _pick(folder: Path, *names: str) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise ScfmInputError(
        f"no {' / '.join(names)} in this folder (it has: {sorted(p.name for p in folder.iterdir())})",
        where=str(folder),
        fix="give a 10x mtx folder, an .h5ad file or a 10x .h5 file",
    )


def _read_tsv(path: Path) -> pd.DataFrame:
    try:
        return pd.read_csv(
            path, sep="\t", header=None, dtype=str, keep_default_na=False, quoting=csv.QUOTE_NONE
        )
    except (OSError, EOFError, ValueError, zlib.error) as e:  # EmptyDataError / ParserError are ValueErrors
        raise ScfmInputError(
            f"cannot read: {e}; empty, unreadable or truncated", where=str(path), fix=_UNREADABLE_FIX
        ) from e


# ---------------------------------------------------------------------------------------------------------
# shared helpers
# ---------------------------------------------------------------------------------------------------------
def _read_csr_rows(g: h5py.Group, start: int, stop: int, n_cols: int) -> sp.csr_matrix:
    """Rows [start, stop) of a CSR matrix stored as data/indices/indptr (also 10x CSC over cells)."""
    indptr = g["indptr"][start : stop + 1].astype(np.int64)
    a, b = int(indptr[0]), int(indptr[-1])
    return sp.csr_matrix((g["data"][a:b], g["indices"][a:b], indptr - a), shape=(stop - start, n_cols))


def _read_dense_rows(ds: h5py.Dataset, start: int, stop: int) -> sp.csr_matrix:
    """Rows [start, stop) of a dense dataset, read in blocks of ~64 MiB so the dense copy stays small."""
    step = max(1, _DENSE_BLOCK // max(1, ds.shape[1]))
    return sp.vstack(
        [sp.csr_matrix(ds[i : min(i + step, stop)]) for i in range(start, stop, step)], format="csr"
    )


def _tenx_var(ids: object, names: object, types: object | None) -> pd.DataFrame:
    var = pd.DataFrame({"gene_id": _ensembl(_clean(ids)).to_numpy(), "symbol": _clean(names).to_numpy()})
    if types is not None:
        var["feature_type"] = _clean(types).to_numpy()
    return var


def _clean(values: object) -> pd.Series:
    """Strings stripped of whitespace; missing or empty → None (object dtype)."""
    s = pd.Series(np.asarray(values, dtype=object), dtype=object)
    s = s.map(lambda v: v.decode() if isinstance(v, bytes) else v).astype("string").str.strip()
    return s.astype(object).where(s.notna() & (s != ""), None)


def _ensembl(s: pd.Series) -> pd.Series:
    """Version-less Ensembl id where a value looks like one (``ENSG00000141510.17`` → ``ENSG00000141510``),
    else None. A suffix after the version (``_PAR_Y``) is kept so such copies stay distinct."""
    parts = s.astype("string").str.extract(_ENSEMBL)
    ids = parts[0] + parts[1]
    return ids.astype(object).where(ids.notna(), None)


def _strings(ds: h5py.Dataset) -> np.ndarray:
    return np.asarray(ds.asstr()[()], dtype=object)


def _as_str(v: object) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _open_h5(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise _unreadable(path, e) from e


def _unreadable(path: Path, e: BaseException) -> ScfmInputError:
    return ScfmInputError(
        f"unreadable or truncated file ({type(e).__name__}: {e})", where=str(path), fix=_UNREADABLE_FIX
    )


def _sniff_h5(f: h5py.File, path: Path) -> str:
    if _as_str(f.attrs.get("encoding-type", "")) == "anndata" or ("obs" in f and "var" in f):
        return "h5ad"
    if isinstance(f.get("matrix"), h5py.Group) or any(
        isinstance(v, h5py.Group) and "indptr" in v for v in f.values()
    ):
        return "10x_h5"
    raise ScfmInputError(
        f"HDF5 file is neither an .h5ad nor a 10x .h5 (top-level keys: {list(f)[:10]})",
        where=str(path),
        fix="convert it to .h5ad with anndata (e.g. loom: anndata.read_loom)",
    )


def _no_options(path: Path, what: str, **options: object) -> None:
    given = [k for k, v in options.items() if v not in (None, False)]
    if given:
        raise ScfmInputError(
            f"{', '.join(given)} do(es) not apply to {what}", where=str(path), fix=f"drop {', '.join(given)}"
        )


def _check_unique_cells(index: pd.Index, path: Path) -> None:
    dup = index[index.duplicated()]
    if len(dup):
        raise ScfmInputError(
            f"{dup.nunique()} cell ids occur more than once (e.g. {list(dup.unique()[:5])})",
            where=str(path),
            fix="make cell ids unique within a file, e.g. `adata.obs_names_make_unique()` or prefix them "
            "with the sample name",
        )
