"""scGPT: a post-LN transformer over ``<cls>`` + gene tokens, each token = gene embedding + value embedding.

Cui et al., *scGPT: toward building a foundation model for single-cell multi-omics using generative AI*
(Nature Methods 2024); code ``bowang-lab/scGPT`` ``scgpt/model/model.py`` (``TransformerModel``),
``flash_layers.py`` (``FlashscGPTLayer`` / ``FlashscGPTGenerator``) and ``generation_model.py``
(``TransformerGenerator``).

Parameter names are the original ones, so a converter is a rename (see ``scfm.convert.scgpt``):
``encoder.{embedding,enc_norm}`` (GeneEncoder), ``value_encoder.{linear1,linear2,norm}`` (continuous) or
``value_encoder.{embedding,enc_norm}`` (bins), ``flag_encoder`` (the "unknown gene" flag of generative training),
``batch_encoder``, ``dsbn.bns.{i}``, ``bn``, ``pert_encoder``,
``transformer_encoder.layers.{i}.{self_attn.in_proj_weight,self_attn.in_proj_bias,self_attn.out_proj,linear1,
linear2,norm1,norm2}``, ``decoder.fc.{0,2,4}`` / ``decoder.zero_logit.*`` (ExprDecoder),
``mvc_decoder.{gene2query,W,W_zero_logit}``, ``grad_reverse_discriminator.{_decoder,out_layer}``,
``cls_decoder.{_decoder,out_layer}``.

Generative training (scGPT's attention mask) is one forward pass over the whole cell with ``known`` [B, L]:
known tokens (``<cls>`` + genes whose value is given) get gene + value embedding and attend to known tokens
only; unknown tokens get gene embedding + ``flag_encoder(1)`` (no value) and attend to the known tokens and
themselves (``scfm.model.attention.Layout(known=...)``). scGPT lays this out as two segments (perception +
generation) and computes the unknown queries with a separate cross-attention whose projections are the identity
(``FlashscGPTMHA.cross_attn``): it skips ``out_proj`` for unknown tokens. ``unknown_out_proj=False`` reproduces
that (what a converted generative checkpoint expects); scfm's default applies ``out_proj`` to every token.

Differences from the original, all deliberate: DSBN normalises each cell with its own domain's BatchNorm (scGPT
uses the first cell's label for the whole batch; equal when a batch has one domain, as scGPT's sampler ensures);
``avg-pool`` averages a cell's real tokens (scGPT also averages padding).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scfm.errors import ScfmInputError, require_positive_ints
from scfm.model.attention import Layout, get_kernel
from scfm.model.backbone import GeneStates, cell_starts, check_pool, first_tokens, mean_over_cells
from scfm.model.blocks import BlockSpec, TransformerStack
from scfm.model.embeddings import ConditionEmbedding, ContinuousValueEncoder, TokenEncoder

__all__ = [
    "AdversarialDiscriminator",
    "ClsDecoder",
    "DomainSpecificBatchNorm",
    "ExprDecoder",
    "MVCDecoder",
    "ScGPTConfig",
    "ScGPTEncoder",
    "ScGPTModel",
    "ecs_loss",
    "grad_reverse",
]

VALUE_EMBEDDINGS = ("mlp", "bins")
VALUE_SOURCES = ("values_bin", "values")
CELL_EMB_STYLES = ("cls", "avg-pool")
MVC_STYLES = ("inner product", "inner product, detach")


@dataclass
class ScGPTConfig:
    """Shape and options of an scGPT model.

    Defaults are scGPT's whole-human pretraining (``args.json``: ``nlayers 12``, ``embsize 512``, ``nheads 8``,
    ``d_hid 512``, ``dropout 0.2``, ``n_bins 51``, ``input_style binned`` + ``input_emb_style continuous``: the
    bin index goes through the continuous value encoder, ``MVC true``, ``pad_value -2`` as ``<cls>``'s value).

    ``value_embedding``: ``mlp`` (``ContinuousValueEncoder`` on ``batch[value_source]``) or ``bins``
    (``CategoryValueEncoder`` on ``values_bin``; table of ``n_bins + 2``: scGPT's pad id ``n_bins`` is
    ``<cls>``'s input, ``n_bins + 1`` its mask id). ``cls_id``/``cls_value``: the value input at ``<cls>``
    tokens (``cls_id`` is filled in from the corpus by ``scfm.model.complete_config``). ``mvc``: the GEPC/MVC decoder;
    ``ecs_threshold`` > 0: elastic cell similarity; ``dab``: adversarial batch discriminator (gradient
    reversal); ``dsbn``: domain-specific batch norm; ``use_batch_labels``: batch embedding concatenated to the
    decoders' inputs; these three need batch labels (``data.conditions=[batch]``). ``n_cls`` > 1 adds a cell
    classifier (fine-tuning).
    """

    vocab_size: int
    pad_id: int = 0
    conditions: list[str] = field(default_factory=list)
    n_labels: dict[str, int] = field(default_factory=dict)
    layers: int = 12
    hidden: int = 512
    heads: int = 8
    ffn: int = 512
    pre_norm: bool = False
    dropout: float = 0.2
    attention: str = "sdpa"
    value_embedding: str = "mlp"
    value_source: str = "values_bin"
    n_bins: int = 51
    max_value: float = 512.0
    cls_id: int | None = None
    cls_value: float = -2.0
    layer_norm_eps: float = 1e-5
    cell_emb_style: str = "cls"
    mvc: bool = True
    mvc_style: str = "inner product"
    explicit_zero_prob: bool = False
    ecs_threshold: float = 0.0
    dab: bool = False
    dsbn: bool = False
    dsbn_affine: bool = False
    input_bn: bool = False
    use_batch_labels: bool = False
    n_cls: int = 0
    n_layers_cls: int = 3
    unknown_out_proj: bool = True

    def __post_init__(self) -> None:
        require_positive_ints(self, ("vocab_size", "hidden", "layers", "heads", "ffn", "n_bins", "n_layers_cls"),
                              "ScGPTConfig")
        if self.hidden % self.heads:
            raise ScfmInputError(f"hidden ({self.hidden}) is not divisible by heads ({self.heads})",
                                 where="ScGPTConfig.hidden", fix="choose heads that divide hidden, e.g. 512 / 8")
        if not 0.0 <= self.dropout < 1.0:
            raise ScfmInputError(f"dropout must be in [0, 1), got {self.dropout!r}", where="ScGPTConfig.dropout")
        if not 0 <= self.pad_id < self.vocab_size:
            raise ScfmInputError(f"pad_id {self.pad_id} is outside the vocabulary [0, {self.vocab_size})",
                                 where="ScGPTConfig.pad_id")
        choices = (("value_embedding", VALUE_EMBEDDINGS), ("value_source", VALUE_SOURCES),
                   ("cell_emb_style", CELL_EMB_STYLES), ("mvc_style", MVC_STYLES))
        for name, allowed in choices:
            if getattr(self, name) not in allowed:
                raise ScfmInputError(f"unknown {name} {getattr(self, name)!r}", where=f"ScGPTConfig.{name}",
                                     fix=f"use one of: {', '.join(allowed)}")
        if not 0.0 <= self.ecs_threshold < 1.0:
            raise ScfmInputError(f"ecs_threshold must be in [0, 1) (0 = off), got {self.ecs_threshold}",
                                 where="ScGPTConfig.ecs_threshold")
        unknown = sorted(set(self.conditions) - {"batch", "modality", "perturbation", "cell_type"})
        if unknown:
            raise ScfmInputError(f"unknown condition(s) {unknown}", where="data.conditions",
                                 fix="use any of: batch, modality, perturbation")
        needs_batch = [n for n in ("dab", "dsbn", "use_batch_labels") if getattr(self, n)]
        if needs_batch and int(self.n_labels.get("batch", 0)) <= 0:
            raise ScfmInputError(f"model.{'/'.join(needs_batch)} need batch labels, but the data has none",
                                 where="config groups model + data",
                                 fix="set data.conditions=[batch] on a corpus prepared with columns.batch=<obs column>,"
                                     f" or set model.{needs_batch[0]}=false")
        get_kernel(self.attention)  # unknown or unavailable kernels raise with the valid names

    @property
    def value_key(self) -> str:
        """The batch key of the value input: ``values_bin`` for bin embeddings, else ``value_source``."""
        return "values_bin" if self.value_embedding == "bins" else self.value_source

    @property
    def head_dim(self) -> int:
        """Per-head width, ``hidden // heads``."""
        return self.hidden // self.heads

    @property
    def n_batch_labels(self) -> int:
        return int(self.n_labels.get("batch", 0))

    @property
    def decoder_in(self) -> int:
        """Width of the decoders' input: hidden, doubled when the batch embedding is concatenated."""
        return 2 * self.hidden if self.use_batch_labels else self.hidden


# ---------------------------------------------------------------- parts


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: Tensor, lambd: float) -> Tensor:
        ctx.lambd = lambd
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return -ctx.lambd * grad, None


def grad_reverse(x: Tensor, lambd: float = 1.0) -> Tensor:
    """Identity forward, gradient multiplied by ``-lambd`` backward (domain-adversarial training)."""
    return _GradReverse.apply(x, lambd)


class ScGPTEncoder(TransformerStack):
    """``transformer_encoder``: ``layers.{i}``, scfm's :class:`~scfm.model.blocks.TransformerLayer` with scGPT's
    recipe (``nn.TransformerEncoderLayer``: ReLU, post-LN, one dropout, also inside the FFN and on the attention
    probabilities); ``pre_norm`` is scGPT's variant (``FlashTransformerEncoderLayer``: normalise, then add the
    sub-layer output to the normalised input); ``unknown_out_proj`` its generative quirk (module docstring)."""

    def __init__(self, config: ScGPTConfig) -> None:
        super().__init__(BlockSpec.of(config, norm="scgpt-pre" if config.pre_norm else "post",
                                      unknown_out_proj=config.unknown_out_proj))


def _mlp3(d_in: int, d: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d), nn.LeakyReLU(), nn.Linear(d, d), nn.LeakyReLU(), nn.Linear(d, 1))


class ExprDecoder(nn.Module):
    """GEP head: value per token from its hidden state (``fc``), and with ``explicit_zero_prob`` the probability
    that the value is non-zero (``zero_logit``; scGPT's ``zero_probs`` is used as P(value > 0))."""

    def __init__(self, d_in: int, d: int, explicit_zero_prob: bool = False) -> None:
        super().__init__()
        self.fc = _mlp3(d_in, d)
        if explicit_zero_prob:
            self.zero_logit = _mlp3(d_in, d)
        self.explicit_zero_prob = explicit_zero_prob

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """x: [..., d_in] -> {"pred": [...], "zero_probs": [...]}."""
        out = {"pred": self.fc(x).squeeze(-1)}
        if self.explicit_zero_prob:
            out["zero_probs"] = torch.sigmoid(self.zero_logit(x).squeeze(-1))
        return out


class MVCDecoder(nn.Module):
    """GEPC/MVC head, scGPT's "inner product" style: ``pred = <W·sigmoid(gene2query(gene_emb)), cell_emb>``."""

    def __init__(self, d: int, d_in: int, explicit_zero_prob: bool = False, detach: bool = False) -> None:
        super().__init__()
        self.gene2query = nn.Linear(d, d)
        self.query_activation = nn.Sigmoid()
        self.W = nn.Linear(d, d_in, bias=False)
        if explicit_zero_prob:
            self.W_zero_logit = nn.Linear(d, d_in)
        self.explicit_zero_prob, self.detach = explicit_zero_prob, detach

    def forward(self, cell_emb: Tensor, gene_embs: Tensor) -> dict[str, Tensor]:
        """cell_emb: [..., d_in] (each token's cell), gene_embs: [..., d] -> {"pred": [...], "zero_probs": [...]}."""
        gene_embs = gene_embs.detach() if self.detach else gene_embs
        query = self.query_activation(self.gene2query(gene_embs))  # [..., d]
        out = {"pred": (self.W(query) * cell_emb).sum(-1)}
        if self.explicit_zero_prob:
            out["zero_probs"] = torch.sigmoid((self.W_zero_logit(query) * cell_emb).sum(-1))
        return out


class _MLPHead(nn.Module):
    """(Linear, activation, LayerNorm) x (nlayers - 1), then ``out_layer`` (scGPT ClsDecoder / discriminator)."""

    def __init__(self, d: int, n_out: int, nlayers: int, activation: type[nn.Module]) -> None:
        super().__init__()
        self._decoder = nn.ModuleList()
        for _ in range(nlayers - 1):
            self._decoder.extend([nn.Linear(d, d), activation(), nn.LayerNorm(d)])
        self.out_layer = nn.Linear(d, n_out)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self._decoder:
            x = layer(x)
        return self.out_layer(x)


class ClsDecoder(_MLPHead):
    """Cell classifier on the cell embedding (ReLU)."""

    def __init__(self, d: int, n_cls: int, nlayers: int = 3) -> None:
        super().__init__(d, n_cls, nlayers, nn.ReLU)


class AdversarialDiscriminator(_MLPHead):
    """DAB: batch classifier on the cell embedding behind a gradient reversal (LeakyReLU)."""

    def __init__(self, d: int, n_cls: int, nlayers: int = 3) -> None:
        super().__init__(d, n_cls, nlayers, nn.LeakyReLU)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(grad_reverse(x, 1.0))


class DomainSpecificBatchNorm(nn.Module):
    """One ``BatchNorm1d`` per batch label (``bns.{i}``), applied to each cell's real tokens (eps 6.1e-5 as
    scGPT); tokens of cells without a label (-1) pass unchanged."""

    def __init__(self, d: int, n_domains: int, affine: bool = False, eps: float = 6.1e-5) -> None:
        super().__init__()
        self.bns = nn.ModuleList(nn.BatchNorm1d(d, eps=eps, affine=affine) for _ in range(n_domains))

    def forward(self, x: Tensor, domain: Tensor, real: Tensor) -> Tensor:
        """x: [B, L, D], domain: [B, L] long, real: [B, L] bool -> [B, L, D]."""
        out = x
        for d in torch.unique(domain[real & (domain >= 0)]).tolist():
            sel = real & (domain == d)
            out = out.index_put((sel,), self.bns[d](x[sel]))  # BatchNorm1d over [N_d, D]
        return out


def ecs_loss(cell_emb: Tensor, threshold: float) -> Tensor:
    """scGPT's elastic cell similarity: ``mean(1 - (relu(cos_ij) - threshold)^2)`` over pairs (diagonal 0)."""
    normed = F.normalize(cell_emb, p=2, dim=1)
    cos = normed @ normed.T  # [n, n]
    cos = F.relu(cos.masked_fill(torch.eye(cos.shape[0], dtype=torch.bool, device=cos.device), 0.0))
    return torch.mean(1 - (cos - threshold) ** 2)


# ---------------------------------------------------------------- model


class ScGPTModel(nn.Module):
    """scGPT over padded or packed batches (``gene_ids``, ``values_bin`` / ``values``, layout keys).

    :meth:`forward` returns ``hidden`` [B, L, D], ``gene_embs`` [B, L, D] (GeneEncoder output, MVC's queries),
    ``cell_emb`` [n_cells, D], ``pred`` [B, L] (GEP), and with the options ``mvc_pred`` [B, L] (GEPC),
    ``zero_probs`` / ``mvc_zero_probs``, ``cls_logits`` [n, n_cls], ``dab_logits`` [n, n_batch].
    ``known`` [B, L] switches on the generative mask (see the module docstring).

    A :class:`~scfm.model.backbone.Backbone`: ``encode(batch)`` -> hidden [B, L, D]; cell embeddings ``cls``
    (``<cls>``'s output), ``mean`` / ``avg-pool`` (the mean over the cell's real tokens); the default is
    ``config.cell_emb_style``.
    """

    POOLS: ClassVar[tuple[str, ...]] = ("cls", "mean", "avg-pool")

    def __init__(self, config: ScGPTConfig) -> None:
        super().__init__()
        c = self.config = config
        D = c.hidden
        self.encoder = TokenEncoder(c.vocab_size, D, padding_idx=c.pad_id)
        self.flag_encoder = nn.Embedding(2, D)
        if c.value_embedding == "mlp":
            self.value_encoder: nn.Module = ContinuousValueEncoder(D, c.dropout, c.max_value)
        else:
            self.value_encoder = TokenEncoder(c.n_bins + 2, D, padding_idx=c.n_bins)
        if c.use_batch_labels:
            self.batch_encoder = TokenEncoder(c.n_batch_labels, D)
        if c.dsbn:
            self.dsbn = DomainSpecificBatchNorm(D, c.n_batch_labels, affine=c.dsbn_affine)
        if c.input_bn:
            self.bn = nn.BatchNorm1d(D, eps=6.1e-5)
        if "perturbation" in c.conditions:
            self.pert_encoder = nn.Embedding(3, D, padding_idx=2)  # TransformerGenerator: 0/1 flag, 2 = pad
        self.condition_embeddings = (ConditionEmbedding(D, ["modality"], c.n_labels)
                                     if "modality" in c.conditions else None)
        self.transformer_encoder = ScGPTEncoder(c)
        self.decoder = ExprDecoder(c.decoder_in, D, c.explicit_zero_prob)
        if c.n_cls > 1:
            self.cls_decoder = ClsDecoder(D, c.n_cls, c.n_layers_cls)
        if c.mvc:
            self.mvc_decoder = MVCDecoder(D, c.decoder_in, c.explicit_zero_prob, detach=c.mvc_style.endswith("detach"))
        if c.dab:
            self.grad_reverse_discriminator = AdversarialDiscriminator(D, c.n_batch_labels)
        nn.init.uniform_(self.encoder.embedding.weight, -0.1, 0.1)  # scGPT's init_weights

    # -- layout helpers ------------------------------------------------------------------------
    cell_starts = staticmethod(cell_starts)  # (row, column) of each cell's <cls> (scfm.model.backbone)

    @staticmethod
    def per_token(cell_values: Tensor, batch: Mapping[str, Any] | Any) -> Tensor:
        """Broadcast per-cell values [n, ...] to the token grid [B, L, ...]."""
        gene_ids = batch["gene_ids"]
        doc = batch.get("doc_ids", None)
        if doc is not None:
            return cell_values[doc.long().clamp(0, cell_values.shape[0] - 1)]
        return cell_values[:, None].expand(gene_ids.shape[0], gene_ids.shape[1], *cell_values.shape[1:])

    @staticmethod
    def real_tokens(batch: Mapping[str, Any] | Any) -> Tensor:
        """[B, L] bool, True for real tokens (inside a cell and not padding)."""
        gene_ids = batch["gene_ids"]
        real = batch.get("padding_mask", None)
        real = torch.ones_like(gene_ids, dtype=torch.bool) if real is None else real
        doc, cu = batch.get("doc_ids", None), batch.get("cu_seqlens", None)
        if doc is not None and cu is not None:
            real = real & (doc < cu.numel() - 1)
        return real

    # -- embedding -----------------------------------------------------------------------------
    def value_input(self, batch: Mapping[str, Any] | Any) -> Tensor:
        """The value embedding's input [B, L] (float for ``mlp``, bin ids for ``bins``), ``<cls>`` filled."""
        c = self.config
        key = c.value_key
        values = batch.get(key, None)
        if values is None:
            raise ScfmInputError(f"the scgpt model reads batch[{key!r}], which this batch lacks",
                                 where="config groups model + encoding", fix="use encoding=bin")
        gene_ids = batch["gene_ids"]
        if c.value_embedding == "bins":
            values = values.long()
            cls_fill: float | int = c.n_bins  # scGPT category style: <cls> carries the pad value n_bins
        else:
            values = values.float()
            cls_fill = c.cls_value
        if c.cls_id is not None and c.cls_id >= 0:
            values = values.masked_fill(gene_ids == c.cls_id, cls_fill)
        return values

    def gene_input_embeddings(self, batch: Mapping[str, Any] | Any) -> Tensor:
        """The GeneEncoder output [B, L, D] (gene embedding + LayerNorm; no value, no context): part of every
        token's input and the MVC/GEPC head's queries. Pass it to :meth:`encode` as ``gene_embs`` so that one
        lookup serves both."""
        return self.encoder(batch["gene_ids"])

    def embed(self, batch: Mapping[str, Any] | Any, known: Tensor | None = None, cls_input: Tensor | None = None,
              gene_embs: Tensor | None = None) -> Tensor:
        """Token embeddings [B, L, D], the transformer's input.

        Known tokens (all when ``known`` is None): gene + value embedding; unknown tokens: gene embedding +
        ``flag_encoder(1)``. ``cls_input`` [n_cells, D] replaces each cell's ``<cls>`` input (scGPT's
        ``input_cell_emb``); ``gene_embs``: :meth:`gene_input_embeddings`, when already computed."""
        c = self.config
        gene_ids = batch["gene_ids"]
        gene = self.gene_input_embeddings(batch) if gene_embs is None else gene_embs  # [B, L, D]
        values = self.value_encoder(self.value_input(batch))  # [B, L, D]
        if known is None:
            x = gene + values
        else:
            x = torch.where(known[..., None], gene + values, gene + self.flag_encoder.weight[1])
        if "perturbation" in c.conditions:
            x = x + self.pert_encoder(batch["perturbed"].long())
        if self.condition_embeddings is not None:
            x = x + self.condition_embeddings(batch, gene_ids.shape)
        if c.dsbn:
            x = self.dsbn(x, self.per_token(batch["batch"].long(), batch), self.real_tokens(batch))
        if c.input_bn:
            real = self.real_tokens(batch)
            x = x.index_put((real,), self.bn(x[real]))
        if cls_input is not None:
            rows, cols = self.cell_starts(batch)
            x = x.index_put((rows, cols), cls_input.to(x.dtype))
        return x

    @property
    def hidden_size(self) -> int:
        """Width of ``encode``'s hidden states."""
        return self.config.hidden

    def encode(self, batch: Mapping[str, Any] | Any, known: Tensor | None = None, cls_input: Tensor | None = None,
               gene_embs: Tensor | None = None) -> Tensor:
        """Final hidden states [B, L, D]; ``known`` [B, L] applies the generative mask, ``cls_input`` and
        ``gene_embs`` as in :meth:`embed`."""
        layout = Layout.from_batch(batch)
        if known is not None:
            layout = Layout(padding_mask=layout.padding_mask, doc_ids=layout.doc_ids, cu_seqlens=layout.cu_seqlens,
                            known=known)
        return self.transformer_encoder(self.embed(batch, known, cls_input, gene_embs), layout)

    # -- heads ---------------------------------------------------------------------------------
    def _pool(self, pool: str | None) -> str:
        pool = check_pool(self.config.cell_emb_style if pool is None else pool, self.POOLS, type(self).__name__)
        return "mean" if pool == "avg-pool" else pool

    def cell_embedding_size(self, pool: str | None = None) -> int:
        """``hidden`` for every pool."""
        self._pool(pool)
        return self.config.hidden

    def cell_embedding(self, batch: Mapping[str, Any] | Any, hidden: Tensor, pool: str | None = None) -> Tensor:
        """[n_cells, D]: the ``<cls>`` output (``cls``) or the mean of the cell's real tokens (``mean`` =
        ``avg-pool``); None: ``config.cell_emb_style``."""
        if self._pool(pool) == "cls":
            return first_tokens(hidden, batch)
        return mean_over_cells(hidden, batch.get("padding_mask", None), batch.get("doc_ids", None),
                               batch.get("cu_seqlens", None))

    def gene_embeddings(self, batch: Mapping[str, Any] | Any, hidden: Tensor) -> GeneStates:
        """``GeneStates(hidden [B, L, D], is_gene [B, L])``: ``is_gene`` marks real tokens other than ``<cls>``
        (``config.cls_id``) and ``<pad>``."""
        gene_ids = batch["gene_ids"]
        is_gene = self.real_tokens(batch) & (gene_ids != self.config.pad_id)
        if self.config.cls_id is not None and self.config.cls_id >= 0:
            is_gene = is_gene & (gene_ids != self.config.cls_id)
        return GeneStates(hidden, is_gene)

    def batch_embedding(self, batch: Mapping[str, Any] | Any) -> Tensor | None:
        """[n_cells, D] batch-label embedding (``use_batch_labels``), else None."""
        if not self.config.use_batch_labels:
            return None
        return self.batch_encoder(batch["batch"].long().clamp_min(0))

    def decode(self, hidden: Tensor, batch_emb: Tensor | None = None) -> dict[str, Tensor]:
        """GEP on hidden states [..., D] (+ each token's batch embedding [..., D] when configured)."""
        if batch_emb is not None:
            hidden = torch.cat([hidden, batch_emb], dim=-1)
        return self.decoder(hidden)

    def gepc(self, cell_emb: Tensor, gene_embs: Tensor, batch_emb: Tensor | None = None) -> dict[str, Tensor]:
        """GEPC/MVC: values from each token's cell embedding [..., D] and its gene embedding [..., D]."""
        if batch_emb is not None:
            cell_emb = torch.cat([cell_emb, batch_emb], dim=-1)
        return self.mvc_decoder(cell_emb, gene_embs)

    def forward(self, batch: Mapping[str, Any] | Any, known: Tensor | None = None,
                cls_input: Tensor | None = None) -> dict[str, Tensor]:
        """All outputs over the whole token grid (see the class docstring)."""
        gene = self.gene_input_embeddings(batch)
        hidden = self.encode(batch, known, cls_input, gene_embs=gene)
        cell = self.cell_embedding(batch, hidden)
        batch_emb = self.batch_embedding(batch)
        batch_tok = self.per_token(batch_emb, batch) if batch_emb is not None else None
        out: dict[str, Tensor] = {"hidden": hidden, "gene_embs": gene, "cell_emb": cell}
        dec = self.decode(hidden, batch_tok)
        out["pred"] = dec["pred"]
        if "zero_probs" in dec:
            out["zero_probs"] = dec["zero_probs"]
        if self.config.mvc:
            mvc = self.gepc(self.per_token(cell, batch), gene, batch_tok)
            out["mvc_pred"] = mvc["pred"]
            if "zero_probs" in mvc:
                out["mvc_zero_probs"] = mvc["zero_probs"]
        if self.config.n_cls > 1:
            out["cls_logits"] = self.cls_decoder(cell)
        if self.config.dab:
            out["dab_logits"] = self.grad_reverse_discriminator(cell)
        return out
