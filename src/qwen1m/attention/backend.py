"""Attention backends: one signature, chosen once per model from the config.

A backend receives the *unrotated* q, k, v of a step (RoPE is position-dependent and DCA needs
three query rotations, so rotation belongs to the attention algorithm), writes the step's keys
and values into each sequence's cache and returns the attention output.

    q: [num_tokens, num_heads, head_dim]   k, v: [num_tokens, num_kv_heads, head_dim]
    -> out: [num_tokens, num_heads, head_dim]

``DenseBackend`` is plain causal RoPE attention; ``DCABackend`` is Dual Chunk Attention with the
YaRN temperature (design §2). The attention arithmetic itself (``attend_fn``) is picked per
device by ``qwen1m.attention.ops``: the pure-PyTorch reference on CPU, kernels on GPU.

Decoding sequences (one new token each) are handled together on the GPU: one scatter writes their
keys, and the split-K paged decode kernel reads every sequence's cache through its block table
directly (no gather), once per key range (one range dense, up to three under DCA, merged by LSE).
"""

from __future__ import annotations

import math

import torch

from qwen1m.attention.dense_hint import DenseHints
from qwen1m.attention.kernel_choice import KernelChoice
from qwen1m.attention.metadata import AttentionMetadata, DecodeInputs, SequenceSlice
from qwen1m.cache.paged_kv import write_slots
from qwen1m.config import DCAConfig, ModelConfig
from qwen1m.rope import RotaryEmbedding, dca_positions
from qwen1m.sparse_config import SparseConfig


def _default_attend_fn(device: torch.device):
    try:
        from qwen1m.attention.ops import get_attend_fn
    except ImportError:  # ops module absent: the reference is always correct
        from qwen1m.attention.reference import attend

        return attend
    return get_attend_fn(device)


def _merge_fn(device: torch.device):
    try:
        from qwen1m.attention.ops import get_merge_fn
    except ImportError:
        from qwen1m.attention.reference import merge_attn_states

        return merge_attn_states
    return get_merge_fn(device)


class AttentionBackend:
    """kernels: which kernels this backend uses (None: a fresh ``KernelChoice``, kernels on CUDA); a
    kernel that cannot be built is turned off there, for this backend only. telemetry: a
    ``sparse_prefill.SparseTelemetry`` when the user asks for density / recall reports. probe: a
    ``calibrate.RecallProbe`` while ``qwen1m calibrate`` runs (dense output, sparse recall measured)."""

    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, sparse: SparseConfig | None = None, *,
                 kernels: KernelChoice | None = None, telemetry=None, probe=None):
        self.cfg = cfg
        self.rotary = rotary
        self.sparse = sparse
        self.kernels = kernels if kernels is not None else KernelChoice()
        self.telemetry = telemetry
        self.probe = probe
        self._attend_fns: dict[torch.device, object] = {}
        self._dense_hints: tuple[SparseConfig, DenseHints] | None = None  # for the config they were made under

    def key_scale(self, prompt_len: int) -> float:
        """The factor a prompt's keys are written with in prefill (prefix caching compares it): 1
        here; DCA's backend writes them times the YaRN temperature of the prompt length."""
        return 1.0

    def _sparse_applies(self, seq: SequenceSlice) -> bool:
        """Sparse attention in prefill only, for prompts longer than the threshold (design §3.1)."""
        return (self.sparse is not None and seq.prompt_len > self.sparse.threshold and seq.num_query > 1
                and seq.num_total <= seq.prompt_len)

    def _sparse_attention(self, layer, queries, keys, values, seq, chunk_len, scale, dense_fn):
        from qwen1m.attention.sparse_batched import causal_pairs
        from qwen1m.attention.sparse_prefill import get_sparse_fn, sparse_prefill_attention

        if self.probe is not None:
            out, full_lse = dense_fn(queries, keys, values)
            self.probe.measure(layer, queries, keys, values, seq, chunk_len, scale, full_lse, self.kernels)
            return out
        device = keys.device
        hints = self._hints()
        recall = self.telemetry is not None and self.telemetry.measure_recall
        fp8_kv = (lambda: self._prefill_keys(seq, layer)) if self._fp8(seq) else None
        if not recall and hints.all_dense(layer, seq):  # every region was dense a step ago (dense_hint)
            out, lse = dense_fn(queries, *(fp8_kv() if fp8_kv is not None else (keys, values)))
            if self.telemetry is not None:
                pairs = causal_pairs(seq.num_cached, seq.num_total, chunk_len, queries["intra"].shape[1])
                self.telemetry.record(layer, {"computed": pairs, "causal": pairs}, lse, queries, keys, values,
                                      dense_fn)
            return out
        v_sizes, s_sizes = self.sparse.budgets(layer)
        stats = {} if self.telemetry is not None else None
        decisions: dict = {}
        out, lse = sparse_prefill_attention(
            queries, keys, values, begin=seq.num_cached, chunk_len=chunk_len, softmax_scale=scale,
            vertical_sizes=v_sizes, slash_sizes=s_sizes, cfg=self.sparse, sparse_fn=get_sparse_fn(device),
            merge_fn=_merge_fn(device), attend_fn=self.prefill_attend_fn(device, seq), stats=stats,
            kernels=self.kernels, decisions=decisions, fp8_kv=fp8_kv)
        if "dense" in decisions:
            hints.record(layer, seq, decisions["dense"])
        if self.telemetry is not None:
            self.telemetry.record(layer, stats, lse, queries, keys, values, dense_fn)
        return out

    def _hints(self) -> DenseHints:
        """The dense hints of the current sparse config (a new config, e.g. a benchmark's switch,
        starts afresh)."""
        if self._dense_hints is None or self._dense_hints[0] is not self.sparse:
            self._dense_hints = (self.sparse, DenseHints(self.sparse.dense_hint_growth))
        return self._dense_hints[1]

    def attend_fn(self, device: torch.device):
        if device not in self._attend_fns:
            self._attend_fns[device] = _default_attend_fn(device)
        return self._attend_fns[device]

    def _fp8(self, seq: SequenceSlice) -> bool:
        """attention_dtype="fp8" applies to this step of ``seq``: prefill rows (a decode step, one
        query, keeps the model dtype on every device, as the paged decode kernel does on CUDA)."""
        return self.kernels.prefill_fp8 and seq.num_query > 1

    def prefill_attend_fn(self, device: torch.device, seq: SequenceSlice):
        """The dense prefill's attention: ``attend_fn``, or in e4m3 under attention_dtype="fp8"
        (``attention/fp8.py``; it takes 16-bit or ``Fp8Tensor`` keys)."""
        if self._fp8(seq):
            from qwen1m.attention.fp8 import fp8_attend

            return fp8_attend
        return self.attend_fn(device)

    def _prefill_keys(self, seq: SequenceSlice, layer: int):
        """The sequence's keys and values for dense prefill: the cache's view, or under FP8 attention
        ``Fp8Tensor``s, the FP8 cache's bytes as stored or a 16-bit cache quantised once per layer."""
        if not self._fp8(seq):
            return seq.cache.view(layer, seq.num_total)
        from qwen1m.attention.fp8 import Fp8Tensor, quantize

        if seq.cache.cache.fp8:
            k8, ks, v8, vs = seq.cache.view_stored_fp8(layer, seq.num_total)
            return Fp8Tensor(k8, ks), Fp8Tensor(v8, vs)
        keys, values = seq.cache.view(layer, seq.num_total)
        return quantize(keys), quantize(values, token_minor=keys.is_cuda)

    def _use_decode_kernel(self, device: torch.device) -> bool:
        choice = self.kernels.decode_kernel
        return device.type == "cuda" if choice is None else choice

    def __call__(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        out = torch.empty_like(q)
        batched = self.decode_batch(meta.seqs, q.device)
        if batched and len(batched) == q.shape[0]:  # a pure decode step: no row gather or scatter
            return self.forward_decode_batch(layer, q, k, v, meta, batched)
        if batched:
            rows = _decode(meta).rows
            out[rows] = self.forward_decode_batch(layer, q[rows], k[rows], v[rows], meta, batched)
        for seq in meta.seqs:
            if batched and seq in batched:
                continue
            rows = slice(seq.query_start, seq.query_start + seq.num_query)
            out[rows] = self.forward_sequence(layer, q[rows], k[rows], v[rows], meta.positions[rows], seq)
        return out

    def decode_batch(self, seqs: list[SequenceSlice], device: torch.device) -> list[SequenceSlice]:
        """The sequences this backend decodes together (one new token each, on the paged decode
        kernel); the step's ``meta.decode`` holds their inputs (``metadata.decode_inputs``)."""
        if not self._use_decode_kernel(device):
            return []
        return [s for s in seqs if s.num_query == 1 and s.num_cached > 0]

    def forward_sequence(self, layer, q, k, v, positions, seq: SequenceSlice) -> torch.Tensor:
        raise NotImplementedError

    # (chunk_len, chunk_size) under DCA, for the decode kernels; None: dense
    decode_dca: tuple[int, int] | None = None

    def forward_decode_batch(self, layer, q, k, v, meta: AttentionMetadata, seqs: list[SequenceSlice]):
        """q: [B, num_heads, head_dim], k, v: [B, num_kv_heads, head_dim], one new token per sequence."""
        d = _decode(meta)
        positions = _decode_positions(meta, d, len(seqs))
        cache = seqs[0].cache.cache
        if self.kernels.fused_decode:
            return _fused_decode(layer, q, k, v, positions, d, cache, self.rotary, self.decode_dca)
        return self.decode_per_region(layer, q, k, v, positions, d, cache)

    def decode_per_region(self, layer, q, k, v, positions, d: DecodeInputs, cache) -> torch.Tensor:
        """The same maths as ``_fused_decode`` in PyTorch ops and one kernel call per key region."""
        raise NotImplementedError


def _decode(meta: AttentionMetadata) -> DecodeInputs:
    if meta.decode is None:
        raise ValueError("AttentionMetadata.decode is None in a step with rows that decode in one batch: "
                         "build it before the forward (metadata.decode_inputs of decode_batch's sequences).")
    return meta.decode


def _fused_decode(layer, q, k, v, positions, d: DecodeInputs, cache, rotary: RotaryEmbedding,
                  dca: tuple[int, int] | None) -> torch.Tensor:
    """The GPU decode path in three launches: ``decode_prep`` (every RoPE rotation, the YaRN factor
    and the cache write) and ``paged_decode_attention_multi`` (all key regions, merged by LSE).
    An fp8 cache is written by ``write_slots`` (it quantises) from the rotated keys."""
    from qwen1m.kernels.decode_prep import decode_prep
    from qwen1m.kernels.paged_decode import paged_decode_attention_multi

    k_cache, v_cache, k_scale, v_scale = cache.kernel_view(layer)
    direct = not cache.fp8
    # the batch's non-empty ranges only (``metadata.decode_inputs``): the first R query rotations
    num_ranges = d.bounds.shape[1]
    q_all, k_rot = decode_prep(q, k, v, positions, rotary.inv_freq_on(q.device), rotary.attention_scaling,
                               d.scale, k_cache if direct else None, v_cache if direct else None, d.slots,
                               dca=dca, num_ranges=num_ranges if dca is not None else None)
    if k_rot is not None:
        write_slots(cache, layer, d.slots, k_rot, v)
    out, _ = paged_decode_attention_multi(q_all, k_cache, v_cache, d.tables, d.bounds[0], d.bounds[1],
                                          1.0 / math.sqrt(q.shape[-1]), k_scale=k_scale, v_scale=v_scale)
    return out


def _decode_positions(meta: AttentionMetadata, d: DecodeInputs, num_rows: int) -> torch.Tensor:
    """Positions of the decoding rows: all of the step's when every row decodes (no gather)."""
    return meta.positions if num_rows == meta.positions.shape[0] else meta.positions[d.rows]


def _paged_decode(q, cache, layer, tables, starts, ends, softmax_scale):
    from qwen1m.kernels.paged_decode import paged_decode_attention

    k_cache, v_cache, k_scale, v_scale = cache.kernel_view(layer)
    return paged_decode_attention(q, k_cache, v_cache, tables, starts, ends, softmax_scale,
                                  k_scale=k_scale, v_scale=v_scale)


class DenseBackend(AttentionBackend):
    """Causal attention with RoPE at the true positions."""

    def forward_sequence(self, layer, q, k, v, positions, seq):
        seq.cache.write(layer, seq.num_cached, self.rotary.rotate(k, positions), v)
        q = self.rotary.rotate(q, positions)
        scale = 1.0 / math.sqrt(q.shape[-1])
        attend = self.prefill_attend_fn(q.device, seq)
        if self._sparse_applies(seq):
            def dense_fn(qs, ks, vs):
                return attend(qs["intra"], ks, vs, softmax_scale=scale, causal=True)

            keys, values = seq.cache.view(layer, seq.num_total)
            return self._sparse_attention(layer, {"intra": q}, keys, values, seq, None, scale, dense_fn)
        keys, values = self._prefill_keys(seq, layer)
        out, _ = attend(q, keys, values, softmax_scale=scale, causal=True)
        return out

    def decode_per_region(self, layer, q, k, v, positions, d, cache):
        write_slots(cache, layer, d.slots, self.rotary.rotate(k, positions), v)
        (starts, ends), = d.ranges
        out, _ = _paged_decode(self.rotary.rotate(q, positions), cache, layer, d.tables, starts, ends,
                               1.0 / math.sqrt(q.shape[-1]))
        return out


class DCABackend(AttentionBackend):
    """Dual Chunk Attention (design §2.2-§2.5); equals DenseBackend while the sequence fits one chunk."""

    def __init__(self, cfg: ModelConfig, rotary: RotaryEmbedding, dca: DCAConfig,
                 sparse: SparseConfig | None = None, **wiring):
        super().__init__(cfg, rotary, sparse, **wiring)
        self.dca = dca
        self.decode_dca = (dca.chunk_len, dca.chunk_size)

    def forward_sequence(self, layer, q, k, v, positions, seq):
        from qwen1m.attention.dca import dca_attention
        from qwen1m.attention.dca_rope import needed_rotations, rotate_critical, rotate_for_dca

        num_rot = needed_rotations(seq.num_total, self.dca)
        q_intra, q_succ, q_inter, k_rot, scale = rotate_for_dca(
            q, k, positions, self.rotary, self.dca, seq.scale_len, num_rot
        )
        seq.cache.write(layer, seq.num_cached, k_rot, v)
        attend = self.prefill_attend_fn(q.device, seq)

        def dense_fn(qs, ks, vs):
            return dca_attention(qs["intra"], qs.get("succ"), qs.get("inter"), ks, vs, begin=seq.num_cached,
                                 dca=self.dca, softmax_scale=scale, attend_fn=attend)

        # only the rotations some query of this step reads (``needed_rotations``)
        queries = {name: t for name, t in (("intra", q_intra), ("succ", q_succ), ("inter", q_inter)) if t is not None}
        if self._sparse_applies(seq):
            critical = rotate_critical(q, positions, self.rotary, self.dca, num_rot)
            queries.update({name: t for name, t in zip(("succ_critical", "inter_critical"), critical) if t is not None})
            keys, values = seq.cache.view(layer, seq.num_total)
            return self._sparse_attention(layer, queries, keys, values, seq, self.dca.chunk_len, scale, dense_fn)
        out, _ = dense_fn(queries, *self._prefill_keys(seq, layer))
        return out

    def key_scale(self, prompt_len: int) -> float:
        return self.dca.yarn_scale(prompt_len)

    def decode_per_region(self, layer, q, k, v, positions, d, cache):
        pos = dca_positions(positions, self.dca)
        write_slots(cache, layer, d.slots, self.rotary.rotate(k, pos.key) * d.scale, v)
        scale = 1.0 / math.sqrt(q.shape[-1])
        parts = [
            _paged_decode(self.rotary.rotate(q, p) * d.scale, cache, layer, d.tables, a, b, scale)
            for p, (a, b) in zip((pos.intra, pos.succ, pos.inter), d.ranges)
        ]
        # kernel LSE is [B, heads]; the merge contract is [heads, num_q]
        out, _ = _merge_fn(q.device)([(o, lse.t()) for o, lse in parts])
        return out


def make_backend(
    cfg: ModelConfig, rotary: RotaryEmbedding, dca: DCAConfig | None, sparse: SparseConfig | None = None, *,
    kernels: KernelChoice | None = None, telemetry=None, probe=None,
) -> AttentionBackend:
    """The registry: DCA when the checkpoint or the user asks for it, dense otherwise; either with
    sparse prefill when a sparse config is given (kernels, telemetry, probe: see AttentionBackend)."""
    wiring = dict(kernels=kernels, telemetry=telemetry, probe=probe)
    if dca is not None:
        return DCABackend(cfg, rotary, dca, sparse, **wiring)
    return DenseBackend(cfg, rotary, sparse, **wiring)
