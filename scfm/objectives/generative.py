"""scGPT's generative pretraining as a LightningModule (objective ``generative``), and cell / gene-prompt
generation.

Each step splits every cell's genes at random into *known* and *unknown* (scGPT ``DataCollator._call_both``:
a fraction is drawn from ``unknown_fractions`` = ``mask_ratio [0.25, 0.5, 0.75]`` for the batch, and
``floor(n_genes × fraction)`` of the cell's genes, chosen uniformly, become unknown). ``<cls>`` is always known.
Known genes get gene + value embedding, unknown genes gene embedding + a learned flag and no value; the
generative attention mask lets known tokens see only known tokens and each unknown token the known ones and
itself (``scfm.model.attention.Layout(known=...)``). Losses (``examples/pretrain.py``), on the unknown genes:

- GEP: MSE of the expression decoder's prediction from each unknown gene's output (``gep_mse``);
- GEPC (MVC): MSE of the prediction from the cell embedding (``<cls>`` output, which saw only known genes)
  × the gene's embedding (``gepc_mse``);
- after ``cls_feedback_after`` steps, scGPT's second pass: the detached cell embedding replaces the ``<cls>``
  input and GEP is computed again (``feedback_mse``);
- options: ECS (``model.ecs_threshold`` > 0), DAB (``model.dab``), explicit zero probabilities.

``mean_mse`` is the baseline of predicting each gene's running mean value over the training batches seen so far
(buffers ``gene_value_mean`` / ``gene_value_count``; genes never seen get the global mean): the model learns
something only when ``gep_mse`` falls below it.

Generation (:func:`generate_from_genes`, :func:`generate_cells`): start from a prompt of known genes (cell
prompt: ``<cls>`` only); each of K rounds predicts every remaining gene and fixes the 1/K of them (of those
still unknown, per cell) with the highest *confidence*. scGPT's paper does not define confidence for a
regression and its code has no cell-prompt generator, so scfm uses the agreement of the two independent heads,
``-|GEP - GEPC|``, when the model has the MVC decoder; else, with explicit zero probabilities,
``|P(non-zero) - 0.5|``; else the predicted value (highest expressed first).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from scfm.errors import ScfmInputError
from scfm.model.scgpt import ScGPTModel, ecs_loss
from scfm.objectives.base import Needs, PretrainingModule

__all__ = [
    "GenerativePretraining",
    "cell_index",
    "generate_cells",
    "generate_from_genes",
    "random_known_mask",
    "rank_within_cell",
    "split_known",
]


# ---------------------------------------------------------------- token bookkeeping


def cell_index(batch: Mapping[str, Any] | Any) -> tuple[Tensor, int]:
    """(cell of each token [B, L] long, number of cells); tokens outside any cell get ``n_cells``."""
    gene_ids = batch["gene_ids"]
    n = int(batch["lengths"].numel())
    doc = batch.get("doc_ids", None)
    if doc is not None:
        cell = doc.long().clamp(0, n)
    else:
        cell = torch.arange(gene_ids.shape[0], device=gene_ids.device)[:, None].expand_as(gene_ids)
    real = ScGPTModel.real_tokens(batch)
    return torch.where(real, cell, torch.full_like(cell, n)), n


def rank_within_cell(score: Tensor, cell: Tensor, eligible: Tensor, n_cells: int) -> Tensor:
    """Rank of each eligible token among its cell's eligible tokens by descending ``score`` (0 = highest);
    ineligible tokens get a rank no eligible token has. All [B, L]; ties keep token order."""
    s = torch.where(eligible, -score.double(), torch.full_like(score, math.inf, dtype=torch.float64)).reshape(-1)
    c = cell.reshape(-1)
    by_score = torch.argsort(s, stable=True)
    order = by_score[torch.argsort(c[by_score], stable=True)]  # cell-major, descending score within a cell
    counts = torch.bincount(c, minlength=n_cells + 1)
    starts = torch.cumsum(counts, 0) - counts  # first sorted position of each cell
    rank = torch.empty_like(c)
    rank[order] = torch.arange(c.numel(), device=c.device) - starts[c[order]]
    return torch.where(eligible.reshape(-1), rank, torch.full_like(rank, c.numel())).view_as(cell)


def split_known(genes: Tensor, cell: Tensor, n_cells: int, fractions: Tensor,
                generator: torch.Generator) -> Tensor:
    """Known mask [B, L]: per cell, ``floor(n_genes × fractions[cell])`` of its ``genes`` tokens, drawn
    uniformly, are unknown (False); every other token (``<cls>``, padding) is known."""
    u = torch.rand(genes.shape, generator=generator, device=genes.device)
    n_genes = torch.bincount(cell[genes], minlength=n_cells + 1)[:n_cells]
    k = torch.floor(n_genes.double() * fractions.double()).long()  # unknown genes per cell
    k = torch.cat([k, k.new_zeros(1)])  # tokens outside any cell: none
    unknown = genes & (rank_within_cell(u, cell, genes, n_cells) < k[cell])
    return ~unknown


def _bernoulli_nll(probs: Tensor, target: Tensor) -> Tensor:
    """Mean negative log-likelihood of ``target > 0`` under P(non-zero) = ``probs`` (scGPT's zero-prob loss)."""
    return F.binary_cross_entropy(probs.clamp(1e-6, 1 - 1e-6), (target > 0).to(probs.dtype))


# ---------------------------------------------------------------- the objective


class GenerativePretraining(PretrainingModule):
    """An injected scGPT model (:class:`~scfm.model.scgpt.ScGPTModel`) trained with the generative objective (GEP +
    GEPC); see the module docstring.

    Logs ``loss``, ``gep_mse``, ``gepc_mse`` (with ``model.mvc``), ``mean_mse`` (running per-gene mean
    baseline), ``unknown_fraction`` and, when enabled, ``feedback_mse``, ``ecs``, ``dab``, ``zero_nll``.
    """

    NAME: ClassVar[str] = "generative"
    NEEDS: ClassVar[Needs] = Needs(encodings=("bin",), architectures=("scgpt",), masks=frozenset({"generative"}),
                                   what="regresses scGPT's binned values (values + values_bin)")

    def __init__(self, backbone: nn.Module | None = None, data: dict[str, Any] | None = None,
                 unknown_fractions: Sequence[float] = (0.25, 0.5, 0.75), fraction_per: str = "batch",
                 gep_weight: float = 1.0, gepc_weight: float = 1.0, ecs_weight: float = 10.0,
                 dab_weight: float = 1.0, zero_prob_weight: float = 1.0, cls_feedback_after: int = 1000,
                 target: str | None = None, lr: float = 1e-4, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), warmup_steps: int = 10_000, scheduler: str = "cosine",
                 total_steps: int | None = None, seed: int = 0, architecture: dict[str, Any] | None = None) -> None:
        super().__init__(backbone, data, lr=lr, weight_decay=weight_decay, betas=betas, warmup_steps=warmup_steps,
                         scheduler=scheduler, total_steps=total_steps, seed=seed, architecture=architecture)
        fractions = [float(f) for f in unknown_fractions]
        if not fractions or not all(0.0 < f < 1.0 for f in fractions):
            raise ScfmInputError(f"unknown_fractions must be fractions in (0, 1), got {fractions}",
                                 where="objective.unknown_fractions", fix="e.g. [0.25, 0.5, 0.75] (scGPT)")
        if fraction_per not in ("batch", "cell"):
            raise ScfmInputError(f"fraction_per must be batch or cell, got {fraction_per!r}",
                                 where="objective.fraction_per")
        c = self.config
        self.target_key = target or c.value_key
        if self.target_key not in ("values_bin", "values"):
            raise ScfmInputError(f"objective.target must be values_bin or values, got {self.target_key!r}",
                                 where="objective.target")
        self.first_gene_id = int(data.get("first_gene_id", 0))
        self._fractions = fractions
        self.register_buffer("gene_value_mean", torch.zeros(c.vocab_size))
        self.register_buffer("gene_value_count", torch.zeros(c.vocab_size, dtype=torch.long))
        self.register_buffer("global_value_mean", torch.zeros(()))
        self.register_buffer("global_value_count", torch.zeros((), dtype=torch.long))

    # -- training ------------------------------------------------------------------------------------------
    def forward(self, batch: Any, known: Tensor | None = None) -> dict[str, Tensor]:
        return self.model(batch, known)

    def _fractions_for(self, n_cells: int, generator: torch.Generator, device: torch.device) -> Tensor:
        options = torch.tensor(self._fractions, dtype=torch.float64, device=device)
        size = n_cells if self.hparams.fraction_per == "cell" else 1
        pick = torch.randint(len(self._fractions), (size,), generator=generator, device=device)
        return options[pick].expand(n_cells)

    def mean_baseline(self, gene_ids: Tensor) -> Tensor:
        """Each gene's running mean value over the training batches so far (the global mean if never seen)."""
        seen = self.gene_value_count[gene_ids] > 0
        return torch.where(seen, self.gene_value_mean[gene_ids], self.global_value_mean)

    @torch.no_grad()
    def _update_means(self, gene_ids: Tensor, values: Tensor) -> None:
        V = self.gene_value_mean.numel()
        count = self.sum_across_ranks(torch.bincount(gene_ids, minlength=V))
        total = self.sum_across_ranks(torch.zeros(V, device=values.device).index_add_(0, gene_ids, values.float()))
        new_count = self.gene_value_count + count
        seen = count > 0
        self.gene_value_mean[seen] += (total[seen] - count[seen] * self.gene_value_mean[seen]) / new_count[seen]
        self.gene_value_count.copy_(new_count)
        n_sum = self.sum_across_ranks(torch.stack([torch.tensor(float(gene_ids.numel()), device=values.device),
                                                   values.float().sum()]))
        n = int(n_sum[0])
        if n:
            gc = self.global_value_count + n
            self.global_value_mean += (n_sum[1] - n * self.global_value_mean) / gc
            self.global_value_count.copy_(gc)

    def step(self, batch: Any, batch_idx: int, stage: str) -> Tensor:
        hp, c, model = self.hparams, self.config, self.model
        g = self.generator(batch_idx, stage)
        gene_ids = batch["gene_ids"]
        real = model.real_tokens(batch)
        genes = real & (gene_ids >= self.first_gene_id)
        if c.cls_id is not None:
            genes &= gene_ids != c.cls_id
        cell, n = cell_index(batch)
        fractions = self._fractions_for(n, g, gene_ids.device)
        known = split_known(genes, cell, n, fractions, g)
        unknown = genes & ~known
        target_all = batch[self.target_key].float()
        target = target_all[unknown]

        gene_embs = model.gene_input_embeddings(batch)  # the MVC/GEPC queries, also part of the input
        hidden = model.encode(batch, known, gene_embs=gene_embs)
        cell_emb = model.cell_embedding(batch, hidden)
        batch_emb = model.batch_embedding(batch)
        batch_u = model.per_token(batch_emb, batch)[unknown] if batch_emb is not None else None
        metrics: dict[str, Tensor | float] = {}
        if target.numel() == 0:  # cells too short to hide a gene: nothing to predict
            loss = hidden.sum() * 0.0
            self.log_metrics(stage, {"loss": loss}, self.batch_size_of(batch))
            return loss
        dec = model.decode(hidden[unknown], batch_u)
        gep = F.mse_loss(dec["pred"], target)
        loss = hp.gep_weight * gep
        metrics["gep_mse"] = gep
        if c.explicit_zero_prob:
            nll = _bernoulli_nll(dec["zero_probs"], target)
        if c.mvc:
            mvc = model.gepc(model.per_token(cell_emb, batch)[unknown], gene_embs[unknown], batch_u)
            gepc = F.mse_loss(mvc["pred"], target)
            loss = loss + hp.gepc_weight * gepc
            metrics["gepc_mse"] = gepc
            if c.explicit_zero_prob:
                nll = nll + _bernoulli_nll(mvc["zero_probs"], target)
        if c.explicit_zero_prob:
            loss = loss + hp.zero_prob_weight * nll
            metrics["zero_nll"] = nll
        if c.ecs_threshold > 0 and n > 1:
            ecs = ecs_loss(cell_emb, c.ecs_threshold)
            loss = loss + hp.ecs_weight * ecs
            metrics["ecs"] = ecs
        if c.dab:
            labels = batch["batch"].long()
            ok = labels >= 0
            if bool(ok.any()):
                dab = F.cross_entropy(model.grad_reverse_discriminator(cell_emb[ok]), labels[ok])
                loss = loss + hp.dab_weight * dab
                metrics["dab"] = dab
        if stage == "train" and 0 <= hp.cls_feedback_after <= self.global_step:
            hidden2 = model.encode(batch, known, cls_input=cell_emb.detach())
            feedback = F.mse_loss(model.decode(hidden2[unknown], batch_u)["pred"], target)
            loss = loss + feedback
            metrics["feedback_mse"] = feedback

        with torch.no_grad():
            metrics["mean_mse"] = F.mse_loss(self.mean_baseline(gene_ids[unknown]), target)
            metrics["unknown_fraction"] = unknown.sum() / genes.sum().clamp_min(1)
            if stage == "train":
                self._update_means(gene_ids[genes], target_all[genes])
        self.log_metrics(stage, {"loss": loss, **metrics}, self.batch_size_of(batch),
                         prog_bar=("loss", "gep_mse", "mean_mse") if stage == "val" else ("loss",))
        return loss

    # -- generation ----------------------------------------------------------------------------------------
    def generate_cells(self, batch: Any, rounds: int = 1) -> dict[str, Tensor]:
        """Cell-prompt generation (see :func:`generate_cells`)."""
        return generate_cells(self.model, batch, rounds)

    def generate_from_genes(self, batch: Any, known_mask: Tensor, rounds: int = 1) -> dict[str, Tensor]:
        """Gene-prompt generation (see :func:`generate_from_genes`)."""
        return generate_from_genes(self.model, batch, known_mask, rounds)


# ---------------------------------------------------------------- generation


def _as_model(model: ScGPTModel | GenerativePretraining) -> ScGPTModel:
    inner = getattr(model, "model", model)
    if not isinstance(inner, ScGPTModel):
        raise ScfmInputError(f"generation needs an scGPT model, got {type(model).__name__}",
                             fix="load a checkpoint trained with objective=generative")
    return inner


def _confidence(out: Mapping[str, Tensor]) -> Tensor:
    if "mvc_pred" in out:
        return -(out["pred"] - out["mvc_pred"]).abs()
    if "zero_probs" in out:
        return (out["zero_probs"] - 0.5).abs()
    return out["pred"]


@torch.no_grad()
def generate_from_genes(model: ScGPTModel | GenerativePretraining, batch: Any, known_mask: Tensor,
                        rounds: int = 1) -> dict[str, Tensor]:
    """Gene-prompt generation: genes with ``known_mask`` [B, L] True keep their values; the other genes of each
    cell are predicted over ``rounds`` rounds, each fixing the most confident ``1/(rounds - r)`` of those left.

    Returns ``values`` [B, L] (prompt values + generated values, in the model's value space: bins for scGPT's
    binned input), ``known`` [B, L] (all real tokens True at the end), ``round`` [B, L] (round in which a gene
    was fixed, -1 for the prompt, ``<cls>`` and padding) and ``pred`` [B, L] (the last round's predictions).
    """
    if not isinstance(rounds, int) or rounds < 1:
        raise ScfmInputError(f"rounds must be a positive integer, got {rounds!r}", where="generate(rounds=...)")
    net = _as_model(model)
    c = net.config
    key = c.value_key
    gene_ids = batch["gene_ids"]
    base = dict(batch.items())
    values = base[key].float().clone() if key in base else torch.zeros(gene_ids.shape, device=gene_ids.device)
    real = net.real_tokens(batch)
    genes = real & (gene_ids != c.cls_id) if c.cls_id is not None else real.clone()
    known = known_mask.bool() | ~genes
    cell, n = cell_index(batch)
    fixed_round = torch.full(gene_ids.shape, -1, dtype=torch.long, device=gene_ids.device)
    pred = torch.zeros_like(values)
    was_training = net.training
    net.eval()
    try:
        for r in range(rounds):
            remaining = genes & ~known
            if not bool(remaining.any()):
                break
            out = net({**base, key: values.long() if c.value_embedding == "bins" else values}, known=known)
            pred = out["pred"]
            if c.value_embedding == "bins":  # a generated bin id: a non-zero bin
                pred = pred.round().clamp(1, c.n_bins - 1)
            left = torch.bincount(cell[remaining], minlength=n + 1)
            take = torch.ceil(left.double() / (rounds - r)).long()  # the last round takes all that are left
            take[n] = 0
            chosen = remaining & (rank_within_cell(_confidence(out), cell, remaining, n) < take[cell])
            values = torch.where(chosen, pred, values)
            known = known | chosen
            fixed_round[chosen] = r
    finally:
        net.train(was_training)
    return {"values": values, "known": known, "round": fixed_round, "pred": pred}


def generate_cells(model: ScGPTModel | GenerativePretraining, batch: Any, rounds: int = 1) -> dict[str, Tensor]:
    """Cell-prompt generation: only ``<cls>`` is known; every gene of each cell (the batch's ``gene_ids``) is
    generated over ``rounds`` rounds. Values in the batch, if any, are ignored."""
    gene_ids = batch["gene_ids"]
    return generate_from_genes(model, batch, torch.zeros_like(gene_ids, dtype=torch.bool), rounds)


def random_known_mask(batch: Any, fraction: float, seed: int = 0, cls_id: int | None = None) -> Tensor:
    """A gene prompt for tests and the CLI: ``fraction`` of each cell's genes (at least one) known, at random."""
    gene_ids = batch["gene_ids"]
    real = ScGPTModel.real_tokens(batch)
    genes = real & (gene_ids != cls_id) if cls_id is not None else real
    cell, n = cell_index(batch)
    g = torch.Generator(device=gene_ids.device).manual_seed(seed)
    fractions = torch.full((n,), 1.0 - fraction, dtype=torch.float64, device=gene_ids.device)
    known = split_known(genes, cell, n, fractions, g)
    return known & genes

