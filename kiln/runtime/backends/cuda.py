"""CUDA execution: kiln's Triton kernels over a paged KV cache on the device.

Per layer: the KV write kernel stores the new tokens' K/V, decode rows (the first
`num_decode` of the flat batch) go through the decode-attention kernel, prefill rows through
flash-attn's varlen kernel when it is installed and no prefill of the step has cached context,
or the Triton prefill kernel otherwise (it reads K/V through the block table, so prefix-cache
hits and later prefill chunks need no gather). RMSNorm, RoPE and SwiGLU run as Triton kernels
by swapping the model's modules for kernel-backed ones. Pure-decode steps replay CUDA graphs
captured for a ladder of batch sizes (the batch is padded up to the next rung).

LoRA: on this backend the wrapped linears compute the LoRA term with the segmented Triton
kernels (kiln/kernels/lora.py) over adapter weights stacked per slot on the device and a
per-row slot index built once per step (runtime/lora.py, lora_slots.py). Batches with
adapters run eagerly: the graphs are captured before the LoRA wrappers exist. The kernels
themselves are graph-safe (static grid, no host sync); capturing them would also need slot
buffers allocated at their full size up front and a second set of graphs, so that base-only
batches do not pay for the LoRA kernels.

Every tensor lives on `device`, so the same code runs on CPU tensors under
TRITON_INTERPRET=1, which is how it is tested on machines without a GPU.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ...kernels.decode_attention import decode_attention, num_splits_for
from ...kernels.kv_write import kv_write
from ...kernels.prefill_attention import prefill_attention
from ...kernels.rmsnorm import rmsnorm
from ...kernels.rotary import rotary_inplace
from ...kernels.swiglu import swiglu
from ..models.layers import RMSNorm, RotaryEmbedding
from ..models.llama import MLP, reduce_row_parallel
from .base import AttentionMetadata

log = logging.getLogger(__name__)

GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


@dataclass
class CudaStepState:
    slot_mapping: torch.Tensor  # [T] int64, -1 = skip
    num_decode: int
    decode_context_lens: torch.Tensor  # [num_decode] int32
    decode_block_tables: torch.Tensor  # [num_decode, blocks] int32
    decode_max_context: int  # upper bound of decode_context_lens (fixed inside a graph)
    decode_splits: int
    num_prefill_tokens: int
    prefill_cu_q: torch.Tensor | None  # [S+1] int32
    prefill_context_lens: torch.Tensor | None  # [S] int32
    prefill_block_tables: torch.Tensor | None  # [S, blocks] int32
    prefill_max_query: int
    prefill_fresh: bool  # no prefill has cached context: flash-attn may run on the new K/V alone


class TritonRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rmsnorm(x, self.weight, self.eps)[0]


class TritonRotaryEmbedding(RotaryEmbedding):
    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rotary_inplace(q, k, self.cos, self.sin, positions)
        return q, k


class TritonMLP(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return reduce_row_parallel(self.tp, self.down_proj(swiglu(self.gate_up_proj(x))))


def _flash_attn_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


class CudaBackend:
    name = "cuda"

    def __init__(self, num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 num_blocks: int, block_size: int, dtype: torch.dtype, *, device: str | torch.device = "cuda",
                 prefill: str = "triton", max_num_seqs: int = 64, max_model_len: int = 2048,
                 cuda_graphs: bool = True) -> None:
        self.device = torch.device(device)
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.block_size = block_size
        self.scale = head_dim ** -0.5
        self.max_model_len = max_model_len
        self.max_blocks = -(-max_model_len // block_size)
        self.flash_varlen = _flash_attn_varlen() if prefill == "flash-attn" else None
        if prefill == "flash-attn" and self.flash_varlen is None:
            raise ValueError("attention backend 'flash-attn' needs the flash-attn package")
        self.prefill_impl = prefill
        # Zeros, not empty: padding rows of a graph read slot 0 and must stay finite.
        shape = (num_layers, num_blocks * block_size, num_kv_heads, head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=self.device)
        self.num_sms = (torch.cuda.get_device_properties(self.device).multi_processor_count
                        if self.device.type == "cuda" else 132)
        self.graph_sizes = [b for b in GRAPH_BATCH_SIZES if b <= max_num_seqs]
        if GRAPH_BATCH_SIZES and max_num_seqs not in self.graph_sizes and max_num_seqs < GRAPH_BATCH_SIZES[-1]:
            self.graph_sizes.append(max_num_seqs)
        self.use_graphs = cuda_graphs and self.device.type == "cuda" and bool(self.graph_sizes)
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        log.info("cuda backend: prefill=%s, decode=triton, cuda_graphs=%s, device=%s",
                 prefill, self.use_graphs, self.device)

    # -- model --------------------------------------------------------------------------

    def prepare_model(self, model: torch.nn.Module) -> None:
        """Move the model to the device, swap in the Triton-backed RMSNorm, RoPE and
        SwiGLU, and capture the decode graphs."""
        model.to(self.device)
        for module in model.modules():
            if type(module) is RMSNorm:
                module.__class__ = TritonRMSNorm
            elif type(module) is MLP:
                module.__class__ = TritonMLP
        if type(model.rope) is RotaryEmbedding:
            model.rope.__class__ = TritonRotaryEmbedding
            model.rope.cos = model.rope.cos.contiguous()
            model.rope.sin = model.rope.sin.contiguous()
        if self.use_graphs:
            self._capture(model)

    # -- per step -----------------------------------------------------------------------

    def prepare(self, meta: AttentionMetadata) -> CudaStepState:
        dev, i32 = self.device, torch.int32
        nd = meta.num_decode
        max_ctx = int(meta.decode_context_lens.max()) if nd else 0
        state = CudaStepState(
            slot_mapping=meta.slot_mapping.to(dev, non_blocking=True),
            num_decode=nd,
            decode_context_lens=meta.decode_context_lens.to(dev, i32, non_blocking=True),
            decode_block_tables=meta.decode_block_tables.to(dev, i32, non_blocking=True),
            decode_max_context=max_ctx,
            decode_splits=num_splits_for(nd, self.num_kv_heads, max_ctx, self.num_sms) if nd else 1,
            num_prefill_tokens=sum(p.query_len for p in meta.prefills),
            prefill_cu_q=None, prefill_context_lens=None, prefill_block_tables=None,
            prefill_max_query=0, prefill_fresh=True,
        )
        if meta.prefills:
            lens = [p.query_len for p in meta.prefills]
            cu = [0]
            for n in lens:
                cu.append(cu[-1] + n)
            width = max(p.block_ids.numel() for p in meta.prefills)
            tables = torch.zeros(len(meta.prefills), width, dtype=i32)
            for row, p in enumerate(meta.prefills):
                tables[row, :p.block_ids.numel()] = p.block_ids
            state.prefill_cu_q = torch.tensor(cu, dtype=i32).to(dev, non_blocking=True)
            state.prefill_context_lens = torch.tensor([p.context_len for p in meta.prefills], dtype=i32).to(dev)
            state.prefill_block_tables = tables.to(dev, non_blocking=True)
            state.prefill_max_query = max(lens)
            state.prefill_fresh = all(p.context_len == p.query_len for p in meta.prefills)
        return state

    def attention(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  state: CudaStepState) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D] -> [T, H*D]."""
        k_cache, v_cache = self.k_cache[layer], self.v_cache[layer]
        kv_write(k, v, k_cache, v_cache, state.slot_mapping)
        T = q.shape[0]
        out = torch.empty(T, self.num_heads, self.head_dim, dtype=q.dtype, device=q.device)
        nd = state.num_decode
        if nd:
            decode_attention(q[:nd], k_cache, v_cache, state.decode_block_tables, state.decode_context_lens,
                             self.scale, self.block_size, state.decode_max_context, state.decode_splits,
                             out=out[:nd])
        if state.num_prefill_tokens:
            qp = q[nd:]
            if self.flash_varlen is not None and state.prefill_fresh:
                out[nd:] = self.flash_varlen(
                    qp, k[nd:], v[nd:], state.prefill_cu_q, state.prefill_cu_q,
                    state.prefill_max_query, state.prefill_max_query, softmax_scale=self.scale, causal=True,
                )
            else:
                prefill_attention(qp, k_cache, v_cache, state.prefill_block_tables, state.prefill_cu_q,
                                  state.prefill_context_lens, state.prefill_max_query, self.scale,
                                  self.block_size, out=out[nd:])
        return out.view(T, self.num_heads * self.head_dim)

    def forward(self, model: torch.nn.Module, input_ids: torch.Tensor, positions: torch.Tensor,
                state: CudaStepState, logits_indices: torch.Tensor, use_graphs: bool = True,
                greedy: bool = False) -> torch.Tensor:
        """Run one step on the device; float32 logits come back on the CPU for the sampler
        (`greedy` is the CPU backend's hint: here logits are always returned).
        Pure-decode steps replay a captured graph unless `use_graphs` is False (a batch whose
        rows carry LoRA adapters: the graphs were captured without them)."""
        n = state.num_decode
        if use_graphs and n and not state.num_prefill_tokens and len(logits_indices) == n:
            size = next((b for b in self.graph_sizes if b >= n), None)
            if size in self._graphs:
                return self._replay(size, input_ids, positions, state).cpu()
        dev = self.device
        logits = model(input_ids.to(dev, non_blocking=True), positions.to(dev, non_blocking=True), self, state,
                       logits_indices.to(dev, non_blocking=True))
        return logits.cpu()

    # -- CUDA graphs --------------------------------------------------------------------

    def _capture(self, model: torch.nn.Module) -> None:
        dev, bmax = self.device, max(self.graph_sizes)
        self._ids = torch.zeros(bmax, dtype=torch.long, device=dev)
        self._pos = torch.zeros(bmax, dtype=torch.long, device=dev)
        self._slots = torch.full((bmax,), -1, dtype=torch.long, device=dev)
        self._ctx = torch.ones(bmax, dtype=torch.int32, device=dev)
        self._tables = torch.zeros(bmax, self.max_blocks, dtype=torch.int32, device=dev)
        self._rows = torch.arange(bmax, device=dev)
        pool = None
        for size in sorted(self.graph_sizes, reverse=True):  # largest first: smaller ones reuse its pool
            state = self._graph_state(size)
            args = (self._ids[:size], self._pos[:size], self, state, self._rows[:size])
            stream = torch.cuda.Stream(dev)
            stream.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(stream):
                model(*args)  # compiles the kernels outside the capture
            torch.cuda.current_stream(dev).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = model(*args)
            pool = graph.pool()
            self._graphs[size] = (graph, out)
        torch.cuda.synchronize(dev)
        log.info("captured CUDA graphs for decode batch sizes %s", sorted(self._graphs))

    def _graph_state(self, size: int) -> CudaStepState:
        return CudaStepState(
            slot_mapping=self._slots[:size], num_decode=size, decode_context_lens=self._ctx[:size],
            decode_block_tables=self._tables[:size], decode_max_context=self.max_model_len,
            decode_splits=num_splits_for(size, self.num_kv_heads, self.max_model_len, self.num_sms),
            num_prefill_tokens=0, prefill_cu_q=None, prefill_context_lens=None, prefill_block_tables=None,
            prefill_max_query=0, prefill_fresh=True,
        )

    def _replay(self, size: int, input_ids: torch.Tensor, positions: torch.Tensor,
                state: CudaStepState) -> torch.Tensor:
        n = state.num_decode
        self._ids[:n].copy_(input_ids, non_blocking=True)
        self._pos[:n].copy_(positions, non_blocking=True)
        self._slots[:n].copy_(state.slot_mapping)
        self._ctx[:n].copy_(state.decode_context_lens)
        width = state.decode_block_tables.shape[1]
        self._tables[:n, :width].copy_(state.decode_block_tables)
        # Padding rows: no KV write, a one-token context at slot 0.
        self._slots[n:size].fill_(-1)
        self._ctx[n:size].fill_(1)
        self._tables[n:size].zero_()
        graph, out = self._graphs[size]
        graph.replay()
        return out[:n]
