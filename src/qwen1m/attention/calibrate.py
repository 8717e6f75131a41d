"""Sparsity refinement by attention recall (design §3.5, the report's Algorithm 1).

For every layer and head, on long calibration sequences processed in prefill chunks:

    recall(q_i) = exp(lse_sparse(q_i) - lse_full(q_i))  in (0, 1]

is measured for the head's current budget (vertical, slash) and for budgets raised by k * step on
both sizes (k = 1 .. max_steps). Each head keeps the smallest budget whose mean recall reaches the
target. All candidates are measured in one prefill: the model's hidden states flow through *dense*
attention (so every layer sees the activations it sees in dense inference) while each candidate's
sparse LSE is computed beside it. Design §3.5 infers step = 2048 and base (1000, 6096) from the
released configs; both are options.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import torch

from qwen1m.attention.sparse_prefill import get_sparse_fn, sparse_prefill_attention
from qwen1m.sparse_config import SparseConfig

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class RecallProbe:
    """Given to an attention backend (``probe=``): measures candidate budgets' recall during dense prefill."""

    base: SparseConfig
    step: int  # budget increment on both vertical and slash (design §3.5: 2048)
    max_steps: int  # candidates k = 0 .. max_steps
    # [layer] -> recall sums [num_candidates, num_heads] and the number of queries summed
    sums: dict[int, torch.Tensor] = field(default_factory=dict)
    counts: dict[int, int] = field(default_factory=dict)

    def candidate(self, layer: int, k: int) -> tuple[list[int], list[int]]:
        v, s = self.base.budgets(layer)
        return [x + k * self.step for x in v], [x + k * self.step for x in s]

    def measure(self, layer, queries, keys, values, seq, chunk_len, scale, full_lse, kernels=None) -> None:
        """One prefill step's recall for every candidate budget; kernels: the backend's KernelChoice."""
        device = keys.device
        recalls = []
        for k in range(self.max_steps + 1):
            v_sizes, s_sizes = self.candidate(layer, k)
            _, lse = sparse_prefill_attention(
                queries, keys, values, begin=seq.num_cached, chunk_len=chunk_len, softmax_scale=scale,
                vertical_sizes=v_sizes, slash_sizes=s_sizes, cfg=self.base, sparse_fn=get_sparse_fn(device),
                kernels=kernels)
            recalls.append(torch.exp(lse - full_lse).sum(-1).double().cpu())  # [num_heads]
        total = torch.stack(recalls)
        self.sums[layer] = self.sums.get(layer, 0) + total
        self.counts[layer] = self.counts.get(layer, 0) + full_lse.shape[1]

    def mean_recall(self, layer: int) -> torch.Tensor:
        """[num_candidates, num_heads] mean recall over every calibration query."""
        return self.sums[layer] / max(1, self.counts[layer])


@dataclass(frozen=True, slots=True)
class LayerSummary:
    layer: int
    base_recall: float  # mean over heads at the base budget
    final_recall: float  # mean over heads at the chosen budgets
    raised: int  # heads given a larger budget
    below_target: int  # heads still below target at the largest candidate


def refine(probe: RecallProbe, target: float) -> tuple[SparseConfig, list[LayerSummary]]:
    """Pick, per head, the smallest candidate reaching ``target``; the score field gets its recall."""
    vertical, slash, scores, summary = [], [], [], []
    num_layers = probe.base.num_layers
    for layer in range(num_layers):
        if layer not in probe.sums:
            raise ValueError(f"no calibration data reached layer {layer}: use sequences longer than the "
                             f"sparse threshold ({probe.base.threshold} tokens)")
        recall = probe.mean_recall(layer)  # [candidates, heads]
        ok = recall >= target
        # first candidate meeting the target, else the largest one
        first = torch.where(ok.any(0), ok.float().argmax(0), torch.full_like(ok[0], probe.max_steps,
                                                                            dtype=torch.long))
        lv, ls, lsc = [], [], []
        base_v, base_s = probe.base.vertical_sizes[layer], probe.base.slash_sizes[layer]
        for h, k in enumerate(first.tolist()):
            lv.append(base_v[h] + k * probe.step)
            ls.append(base_s[h] + k * probe.step)
            lsc.append(float(recall[k, h]))
        vertical.append(tuple(lv))
        slash.append(tuple(ls))
        scores.append(tuple(lsc))
        summary.append(LayerSummary(layer, float(recall[0].mean()), float(sum(lsc) / len(lsc)),
                                    int((first > 0).sum()), int((~ok.any(0)).sum())))
    cfg = replace(probe.base, vertical_sizes=tuple(vertical), slash_sizes=tuple(slash), scores=tuple(scores))
    return cfg, summary


def save_heatmap(cfg: SparseConfig, path: str) -> bool:
    """Recall per layer x head as a PNG; False (nothing written) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no heatmap written (pip install 'qwen1m[eval]')")
        return False
    data = torch.tensor([[s if s is not None else float("nan") for s in row] for row in cfg.scores])
    fig, ax = plt.subplots(figsize=(max(4.5, data.shape[1] * 0.3 + 2), max(3, data.shape[0] * 0.25 + 1)))
    im = ax.imshow(data.numpy(), aspect="auto", cmap="viridis", vmin=min(0.5, float(data.nan_to_num(1).min())),
                   vmax=1.0)
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title("attention recall per head", fontsize=10)
    fig.colorbar(im, ax=ax, label="recall")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
