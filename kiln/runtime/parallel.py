"""Tensor parallelism over torch.distributed: one model split across N ranks.

Rank 0 is the engine process (scheduler, sampler, detokenizer, server); ranks 1..N-1 are
worker processes started with torch.multiprocessing (spawn) and joined to it in one process
group: NCCL on GPUs (one device per rank), gloo on CPUs.

Sharding is Megatron's: q/k/v and gate/up are column-parallel (each rank holds its attention
heads, its KV heads and its slice of the MLP's intermediate columns), o and down are
row-parallel (each rank holds the matching input rows; the partial outputs are all-reduced).
The embedding and the LM head are split by vocabulary: the embedding masks ids outside its
rows and all-reduces, the LM head all-gathers its logits. A model with fewer KV heads than
ranks replicates each KV head over the ranks whose query heads use it (GQA). Each rank reads
only its slices of the safetensors files (memory-mapped `get_slice`), keeps its own paged KV
cache for its KV heads, and runs the same forward as rank 0 on the same flat batch.

Per step, rank 0 broadcasts the step's layout (one `broadcast_object_list`): per sequence its
new tokens and position, and its block table only as a change (blocks appended since the
last step, or the whole table when it was replaced after a preemption), plus the ids of
finished sequences; workers mirror the tables. LoRA adapters are named by uid; a worker reads
an adapter the first time a step uses it and drops it when rank 0 no longer holds it.
Quantization runs on every rank (int8 row-parallel scales come from an all-reduced max, so
every rank's int8 weights are bitwise the slice of the unsharded quantization).

A worker that dies is seen by a watchdog thread on rank 0 (process sentinels): the engine
is marked failed (`fatal_error`), /health turns 503 and the server exits non-zero. Rank 0's
collectives carry a timeout; workers exit when rank 0 goes away.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import multiprocessing.connection
import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .models.loader import ModelConfig, ModelNotFoundError
from .model_runner import ModelRunner, build_inputs, lora_segments, run_model

log = logging.getLogger(__name__)

# Seconds rank 0 waits in a collective before giving up (a hung, not dead, worker).
COLLECTIVE_TIMEOUT_S = float(os.environ.get("KILN_TP_TIMEOUT", "300"))
# Workers wait for rank 0's next step for as long as the server is idle.
_WORKER_TIMEOUT = timedelta(days=7)


class TensorParallelError(ValueError):
    """Tensor parallelism cannot be set up as asked (the message says why)."""


# -- the sharding plan --------------------------------------------------------------------


def check_divisible(cfg: ModelConfig, world: int) -> None:
    """Raise TensorParallelError unless `world` ranks can split this model's heads."""
    h, kv, inter = cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size
    heads = f"{h} attention heads over {kv} KV heads"
    if world < 1:
        raise TensorParallelError(f"tensor parallel size must be >= 1, got {world}")
    sizes = [n for n in range(1, h + 1) if _divides(n, h, kv, inter)]
    hint = f"; sizes this model allows: {', '.join(map(str, sizes))}"
    if h % world:
        raise TensorParallelError(
            f"tensor parallel size {world} does not divide the model's {heads} "
            f"(the number of attention heads, {h}, must be a multiple of it){hint}")
    if kv >= world and kv % world:
        raise TensorParallelError(
            f"tensor parallel size {world} does not divide the model's {heads} "
            f"(the KV heads, {kv}, must be a multiple of it){hint}")
    if kv < world and world % kv:
        raise TensorParallelError(
            f"tensor parallel size {world} is larger than the model's {kv} KV heads and not a "
            f"multiple of them ({heads}), so KV heads cannot be replicated evenly{hint}")
    if inter % world:
        raise TensorParallelError(
            f"tensor parallel size {world} does not divide the MLP's intermediate size {inter}{hint}")


def _divides(n: int, h: int, kv: int, inter: int) -> bool:
    return h % n == 0 and inter % n == 0 and (kv % n == 0 if kv >= n else n % kv == 0)


@dataclass(frozen=True)
class ShardPlan:
    """What rank `rank` of `world` holds of a model with config `cfg`."""

    rank: int
    world: int
    cfg: ModelConfig

    def __post_init__(self) -> None:
        check_divisible(self.cfg, self.world)

    @property
    def head_dim(self) -> int:
        return self.cfg.head_dim

    @property
    def num_heads(self) -> int:  # query heads on this rank
        return self.cfg.num_heads // self.world

    @property
    def q_start(self) -> int:
        return self.rank * self.num_heads

    @property
    def num_kv_heads(self) -> int:
        return max(1, self.cfg.num_kv_heads // self.world)

    @property
    def kv_start(self) -> int:
        if self.cfg.num_kv_heads >= self.world:
            return self.rank * self.num_kv_heads
        group = self.cfg.num_heads // self.cfg.num_kv_heads  # replicated: the KV head of our q heads
        return self.q_start // group

    @property
    def inter(self) -> int:
        return self.cfg.intermediate_size // self.world

    @property
    def inter_start(self) -> int:
        return self.rank * self.inter

    @property
    def vocab(self) -> int:  # rows of the vocabulary per rank (the last one is zero-padded)
        return -(-self.cfg.vocab_size // self.world)

    @property
    def vocab_start(self) -> int:
        return self.rank * self.vocab

    def local_config(self, cfg: ModelConfig | None = None) -> ModelConfig:
        cfg = cfg or self.cfg
        return dataclasses.replace(cfg, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                                   intermediate_size=self.inter, vocab_size=self.vocab)

    # Slices of the checkpoint tensors: (dim, start, stop) in the full tensor.
    def q_rows(self) -> tuple[int, int]:
        d = self.head_dim
        return self.q_start * d, (self.q_start + self.num_heads) * d

    def kv_rows(self) -> tuple[int, int]:
        d = self.head_dim
        return self.kv_start * d, (self.kv_start + self.num_kv_heads) * d

    def inter_rows(self) -> tuple[int, int]:
        return self.inter_start, self.inter_start + self.inter

    def vocab_rows(self) -> tuple[int, int]:
        return self.vocab_start, min(self.cfg.vocab_size, self.vocab_start + self.vocab)

    def slice_of(self, module: str, kind: str = "weight") -> tuple[int, int, int] | None:
        """(dim of the output/input features in [out, in] terms: 0 = rows, 1 = columns,
        start, stop) for a checkpoint module name without "model.", None if replicated."""
        leaf = module.rsplit(".", 1)[-1]
        if leaf in ("embed_tokens", "lm_head"):
            return (0, *self.vocab_rows())
        if leaf == "q_proj":
            return (0, *self.q_rows())
        if leaf in ("k_proj", "v_proj"):
            return (0, *self.kv_rows())
        if leaf in ("gate_proj", "up_proj"):
            return (0, *self.inter_rows())
        if leaf == "o_proj":
            return (1, *self.q_rows())
        if leaf == "down_proj":
            return (1, *self.inter_rows())
        return None

    def iter_safetensors(self, folder: Path):
        """Yield (name, this rank's slice) of every tensor of a folder; slices are read
        memory-mapped (`get_slice`), never the whole tensor."""
        from safetensors import safe_open

        from .quant.checkpoint import read_quantization_config

        files = sorted(Path(folder).glob("*.safetensors"))
        if not files:
            raise ModelNotFoundError(f"{folder} has no *.safetensors files")
        gptq = read_quantization_config(Path(folder))
        pack = 32 // gptq.bits if gptq is not None else 8
        for f in files:
            with safe_open(str(f), framework="pt") as handle:
                for name in handle.keys():
                    yield name, self.read(handle, name, pack)

    def read(self, handle, name: str, gptq_pack: int = 8) -> torch.Tensor:
        short = name.removeprefix("model.")
        module, _, suffix = short.rpartition(".")
        spec = self.slice_of(module)
        if spec is None or suffix not in ("weight", "qweight", "qzeros", "scales", "g_idx"):
            return handle.get_tensor(name)
        dim, start, stop = spec
        sl = handle.get_slice(name)
        if suffix == "weight":
            t = sl[start:stop] if dim == 0 else sl[:, start:stop]
            if module.endswith(("embed_tokens", "lm_head")) and t.shape[0] < self.vocab:
                t = torch.cat([t, t.new_zeros(self.vocab - t.shape[0], t.shape[1])])  # pad the last rank
            return t.contiguous()
        return self._read_gptq(sl, suffix, dim, start, stop, module, gptq_pack)

    def _read_gptq(self, sl, suffix: str, dim: int, start: int, stop: int, module: str, pf: int) -> torch.Tensor:
        """GPTQ tensors (AutoGPTQ layout, [in, out] packed along `in` for qweight, along `out`
        for qzeros). Column-parallel: slice the output columns of qweight/qzeros/scales.
        Row-parallel: slice qweight's packed input rows and g_idx; scales and zeros keep every
        group (a slice may end mid-group: its columns still find their group by g_idx)."""
        from .quant.checkpoint import QuantizedCheckpointError

        if dim == 0:  # output columns
            if suffix == "qweight" or suffix == "scales":
                return sl[:, start:stop].contiguous()
            if suffix == "qzeros":
                if start % pf or stop % pf:
                    raise QuantizedCheckpointError(
                        f"model.{module}: its output slice [{start}, {stop}) is not a multiple of the "
                        f"{pf} zero points packed per int32; this tensor parallel size cannot split it")
                return sl[:, start // pf:stop // pf].contiguous()
            return sl[:]  # g_idx: every input column
        if suffix == "qweight":
            if start % pf or stop % pf:
                raise QuantizedCheckpointError(
                    f"model.{module}: its input slice [{start}, {stop}) is not a multiple of the {pf} "
                    f"values packed per int32; this tensor parallel size cannot split it")
            return sl[start // pf:stop // pf].contiguous()
        if suffix == "g_idx":
            return sl[start:stop].contiguous()
        return sl[:]  # scales, qzeros: all groups

    # -- LoRA adapters: the same slices of A (row-parallel) or B (column-parallel) --------

    def shard_adapter(self, weights: dict) -> dict:
        """{(layer, linear): (A_t [in, r], B_t [r, out])} -> this rank's slices. A column-
        parallel layer keeps B's columns of its outputs (A whole); a row-parallel one keeps A's
        rows of its inputs (B whole), and the all-reduce sums the partial LoRA terms."""
        q_full = self.cfg.num_heads * self.head_dim
        kv_full = self.cfg.num_kv_heads * self.head_dim
        inter_full = self.cfg.intermediate_size
        (q0, q1), (k0, k1), (i0, i1) = self.q_rows(), self.kv_rows(), self.inter_rows()
        cols = {
            "qkv_proj": torch.cat([torch.arange(q0, q1), q_full + torch.arange(k0, k1),
                                   q_full + kv_full + torch.arange(k0, k1)]),
            "gate_up_proj": torch.cat([torch.arange(i0, i1), inter_full + torch.arange(i0, i1)]),
        }
        rows = {"o_proj": (q0, q1), "down_proj": (i0, i1)}
        out = {}
        for (layer, linear), (a_t, b_t) in weights.items():
            if linear in cols:
                out[(layer, linear)] = (a_t, b_t.index_select(1, cols[linear].to(b_t.device)).contiguous())
            else:
                r0, r1 = rows[linear]
                out[(layer, linear)] = (a_t[r0:r1].contiguous(), b_t)
        return out


# -- the process group and the model's collectives ---------------------------------------


class TensorParallel:
    """One rank's view: its plan and the collectives the sharded model calls."""

    def __init__(self, plan: ShardPlan, device: torch.device, meta_group=None) -> None:
        self.plan = plan
        self.rank, self.world = plan.rank, plan.world
        self.device = device
        self.meta_group = meta_group  # gloo group for pickled metadata (the default one on CPU)

    def all_reduce(self, y: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(y)
        return y

    def all_reduce_max(self, y: torch.Tensor) -> torch.Tensor:
        """Elementwise max over the ranks (load-time int8 scales; the model may still be on
        the CPU while NCCL needs device tensors)."""
        t = y.to(self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.to(y.device)

    def embed(self, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        start = self.plan.vocab_start
        local = ids - start
        outside = (local < 0) | (local >= weight.shape[0])
        h = F.embedding(local.masked_fill(outside, 0), weight)
        h.masked_fill_(outside.unsqueeze(-1), 0)
        return self.all_reduce(h)

    def gather_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.contiguous()
        parts = [torch.empty_like(logits) for _ in range(self.world)]
        dist.all_gather(parts, logits)
        return torch.cat(parts, dim=-1)[..., : self.plan.cfg.vocab_size]

    def quantize(self, model: torch.nn.Module, method: str) -> None:
        """Load-time quantization of this rank's shard, consistent with the unsharded one."""
        if method != "int8":
            raise TensorParallelError(
                f"--quantize {method} is not supported with tensor parallelism (int8 and GPTQ "
                f"checkpoints are)")
        from .quant import quantize_model

        quantize_model(model, method, row_amax=self.all_reduce_max)


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the weights a rank holds: parameters, buffers and prepacked copies, each
    storage once (a tied LM head is the embedding), RoPE tables left out."""
    seen: set[int] = set()
    total = 0
    tensors = list(model.parameters()) + [b for n, b in model.named_buffers() if not n.startswith("rope.")]
    tensors += [m.packed for m in model.modules() if getattr(m, "packed", None) is not None]
    for t in tensors:
        try:
            key = t.untyped_storage().data_ptr()
        except (RuntimeError, NotImplementedError):  # mkldnn tensors have no storage
            key = id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_group(rank: int, world: int, port: int, use_cuda: bool, timeout: timedelta):
    """Join the process group; returns (device, group for pickled metadata)."""
    if use_cuda:
        torch.cuda.set_device(rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world, timeout=timeout)
    meta_group = dist.new_group(backend="gloo", timeout=timeout) if use_cuda else None
    return device, meta_group


def _use_cuda(config) -> bool:
    return config.attention_backend != "cpu" and torch.cuda.is_available()


def _threads(config, world: int) -> int:
    return config.num_threads or max(1, (os.cpu_count() or 1) // world)


# -- rank 0 -------------------------------------------------------------------------------

_active: "TensorParallelEngine | None" = None


class TensorParallelEngine:
    """Rank 0's side: starts the workers, joins the group, loads its shard, drives the steps."""

    def __init__(self, config, model_path: Path, cfg: ModelConfig, max_model_len: int) -> None:
        global _active
        world = config.tensor_parallel_size
        check_divisible(cfg, world)  # before anything is started: a clear error at once
        if _active is not None:
            raise TensorParallelError("this process already runs a tensor-parallel engine; close it first")
        if config.quantize not in (None, "int8"):
            raise TensorParallelError(
                f"--quantize {config.quantize} is not supported with tensor parallelism (int8 and "
                f"GPTQ checkpoints are)")
        self.config = config
        self.model_path = Path(model_path)
        self.model = None
        self.world = world
        self.cfg = cfg
        self.fatal_error: str | None = None
        self._closed = False
        self._lock = threading.RLock()  # one collective sequence at a time
        use_cuda = _use_cuda(config)
        if use_cuda and torch.cuda.device_count() < world:
            raise TensorParallelError(
                f"tensor parallel size {world} needs {world} CUDA devices; {torch.cuda.device_count()} visible")
        if not config.num_threads:
            torch.set_num_threads(_threads(config, world))
        port = _free_port()
        ctx = torch.multiprocessing.get_context("spawn")
        self.procs = []
        for rank in range(1, world):
            p = ctx.Process(target=_worker_main, name=f"kiln-tp-rank{rank}", daemon=True,
                            args=(rank, world, port, config, str(model_path), max_model_len, os.getpid()))
            p.start()
            self.procs.append(p)
        log.info("tensor parallel: %d ranks over %s; rank 0 pid %d; worker pids %s", world,
                 "nccl" if use_cuda else "gloo", os.getpid(),
                 " ".join(f"rank{r}={p.pid}" for r, p in enumerate(self.procs, 1)))
        self._watch_stop = threading.Event()
        self._worker_died = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="kiln-tp-watchdog", daemon=True)
        self._watchdog.start()
        _active = self
        atexit.register(self.close)
        try:
            device, meta_group = _init_group(0, world, port, use_cuda,
                                             timedelta(seconds=COLLECTIVE_TIMEOUT_S))
            self.tp = TensorParallel(ShardPlan(0, world, cfg), device, meta_group)
        except BaseException:
            self.close()
            raise
        self._keys: dict[str, int] = {}
        self._next_key = 1
        self._mirror: dict[int, list[int]] = {}  # the block tables the workers hold
        self._freed: list[int] = []
        self._worker_adapters: set[int] = set()

    @property
    def plan(self) -> ShardPlan:
        return self.tp.plan

    def load_model(self, dtype: torch.dtype, max_positions: int):
        from .models.llama import LlamaForCausalLM

        model = LlamaForCausalLM.from_folder(self.model_path, dtype, max_positions, tp=self.tp)
        if self.config.quantize:
            self.tp.quantize(model, self.config.quantize)
        self.model = model
        return model

    def start(self, num_blocks: int) -> None:
        """Tell the workers how many KV blocks to allocate (rank 0 sized the cache)."""
        self._broadcast(("start", num_blocks))

    def runner(self, model, backend, block_size: int, lora_manager) -> "TensorParallelRunner":
        return TensorParallelRunner(self, model, backend, block_size, lora_manager)

    # -- messages ---------------------------------------------------------------------

    def _broadcast(self, message) -> None:
        if self.fatal_error:
            raise RuntimeError(self.fatal_error)
        try:
            dist.broadcast_object_list([message], src=0, group=self.tp.meta_group)
        except Exception as exc:
            self.collective_failed(exc)
            raise

    def collective_failed(self, exc: BaseException) -> None:
        """A step failed on rank 0: the ranks are out of step, so the engine cannot go on.
        Name the worker that died, if one did (its socket may fail before its exit is seen)."""
        if not self._worker_died.wait(timeout=3.0):  # the watchdog alone reaps the workers
            self._fail(f"tensor parallel: a step failed on rank 0, the ranks are out of step: {exc}")

    def rank_stats(self) -> list[dict]:
        """Per rank: pid, weight bytes, RSS (collected from every rank)."""
        with self._lock:
            self._broadcast(("stats",))
            mine = _stats(self.model)
            out = [None] * self.world
            dist.gather_object(mine, out, dst=0, group=self.tp.meta_group)
            return out

    # -- failure ----------------------------------------------------------------------

    def _watch(self) -> None:
        sentinels = {p.sentinel: (rank, p) for rank, p in enumerate(self.procs, 1)}
        while not self._watch_stop.is_set():
            ready = multiprocessing.connection.wait(list(sentinels), timeout=0.5)
            if self._watch_stop.is_set():
                return
            for s in ready:
                rank, p = sentinels[s]
                p.join(timeout=1)
                self._fail(f"tensor parallel worker rank {rank} (pid {p.pid}) exited with code {p.exitcode}; "
                           f"the engine cannot run without it")
                self._worker_died.set()
                return

    def _fail(self, message: str) -> None:
        if self.fatal_error is None and not self._closed:
            self.fatal_error = message
            log.error("%s", message)

    def close(self) -> None:
        global _active
        if self._closed:
            return
        self._closed = True
        self._watch_stop.set()
        if self.fatal_error is not None:  # the group is broken: no goodbyes
            for p in self.procs:
                if p.is_alive():
                    p.terminate()
        if dist.is_initialized():
            if self.fatal_error is None:
                try:
                    with self._lock:
                        dist.broadcast_object_list([("stop",)], src=0, group=self.tp.meta_group)
                except Exception:
                    pass
            for p in self.procs:
                p.join(timeout=10)
            try:
                dist.destroy_process_group()
            except Exception:
                pass
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
        if _active is self:
            _active = None
        try:
            atexit.unregister(self.close)
        except Exception:
            pass


class TensorParallelRunner(ModelRunner):
    """Rank 0's model runner: sends each step's layout to the workers, then runs its shard."""

    def __init__(self, tpe: TensorParallelEngine, model, backend, block_size: int, lora_manager) -> None:
        super().__init__(model, backend, block_size, lora_manager.context)
        self.tpe = tpe
        self.lora = lora_manager

    def execute(self, batch, greedy: bool = False):
        with self.tpe._lock:
            try:  # vocab-parallel heads always return logits: `greedy` is not passed on
                return super().execute(batch)
            except Exception as exc:
                self.tpe.collective_failed(exc)
                raise

    def release(self, seq) -> None:
        key = self.tpe._keys.pop(seq.request_id, None)
        if key is not None and self.tpe._mirror.pop(key, None) is not None:
            self.tpe._freed.append(key)

    def _table(self, seq) -> tuple[int, tuple[int, list[int]] | None]:
        """The key of a sequence and its block table as a change against the workers' copy:
        None (unchanged), (0, appended ids) or (1, the whole table)."""
        tpe = self.tpe
        key = tpe._keys.get(seq.request_id)
        if key is None:
            key = tpe._keys[seq.request_id] = tpe._next_key
            tpe._next_key += 1
        cur = seq.block_table.block_ids
        have = tpe._mirror.get(key)
        if have is not None and len(have) <= len(cur) and cur[:len(have)] == have:
            if len(have) == len(cur):
                return key, None
            new = cur[len(have):]
            have.extend(new)
            return key, (0, new)
        tpe._mirror[key] = list(cur)
        return key, (1, list(cur))

    def before_forward(self, decodes, prefills, d_in, p_in) -> None:
        tpe = self.tpe
        loads, uids = [], []
        for seq in [*decodes, *(s for s, _ in prefills)]:
            a = seq.adapter
            uids.append(0 if a is None else a.uid)
            if a is not None and a.uid not in tpe._worker_adapters:
                tpe._worker_adapters.add(a.uid)
                loads.append((a.uid, str(a.path)))
        drops = []
        if tpe._worker_adapters:
            live = {a.uid for a in self.lora.list() if a.weights is not None} | set(uids)
            drops = [u for u in tpe._worker_adapters if u not in live]
            tpe._worker_adapters.difference_update(drops)
        dec = []
        for seq, (_, c, token), uid in zip(decodes, d_in, uids):
            key, table = self._table(seq)
            dec.append((key, table, c, token, uid))
        pre = []
        for (seq, _), (_, c, tokens, final), uid in zip(prefills, p_in, uids[len(decodes):]):
            key, table = self._table(seq)
            pre.append((key, table, c, tokens, final, uid))
        freed, tpe._freed = tpe._freed, []
        tpe._broadcast(("step", loads, drops, freed, dec, pre))


def _stats(model) -> dict:
    return {"rank": dist.get_rank() if dist.is_initialized() else 0, "pid": os.getpid(),
            "weight_bytes": weight_bytes(model), "rss_bytes": _rss()}


# -- ranks 1..N-1 -------------------------------------------------------------------------


def _watch_parent(parent_pid: int) -> None:
    while True:
        time.sleep(1.0)
        if os.getppid() != parent_pid:
            os._exit(3)  # rank 0 is gone: nothing left to serve


def _worker_main(rank: int, world: int, port: int, config, model_path: str, max_model_len: int,
                 parent_pid: int) -> None:
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s tp-rank{rank} %(levelname)s %(name)s: %(message)s")
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True).start()
    try:
        _worker(rank, world, port, config, Path(model_path), max_model_len)
    except Exception:
        log.exception("tensor parallel worker rank %d failed", rank)
        os._exit(1)
    os._exit(0)


def _worker(rank: int, world: int, port: int, config, model_path: Path, max_model_len: int) -> None:
    from .backends.select import choose_attention_backend, create_backend
    from .lora import Adapter, LoraManager, LoraSettings, read_adapter
    from .models.llama import LlamaForCausalLM

    torch.set_num_threads(_threads(config, world))
    use_cuda = _use_cuda(config)
    device, meta_group = _init_group(rank, world, port, use_cuda, _WORKER_TIMEOUT)
    cfg = ModelConfig.from_folder(model_path)
    tp = TensorParallel(ShardPlan(rank, world, cfg), device, meta_group)
    dtype = config.torch_dtype
    model = LlamaForCausalLM.from_folder(model_path, dtype, max_positions=max_model_len, tp=tp)
    if config.quantize:
        tp.quantize(model, config.quantize)
    model.eval()

    def recv():
        box = [None]
        dist.broadcast_object_list(box, src=0, group=meta_group)
        return box[0]

    message = recv()
    if message[0] == "stop":
        return
    assert message[0] == "start", message
    num_blocks = message[1]
    plan = tp.plan
    choice = choose_attention_backend(config.attention_backend)
    backend = create_backend(choice, cfg.num_layers, plan.num_heads, plan.num_kv_heads, cfg.head_dim,
                             num_blocks, config.block_size, dtype,
                             max_num_seqs=config.max_num_seqs, max_model_len=max_model_len)
    if hasattr(backend, "use_graphs"):
        backend.use_graphs = False  # graphs would have to capture the collectives on every rank
    backend.prepare_model(model)
    lora = LoraManager(model, cfg, LoraSettings(config.max_loras, config.max_lora_rank,
                                                config.lora_cache_bytes), dtype, shard=plan,
                       cpu_kernel=bool(getattr(backend, "kernels", False)))
    adapters: dict[int, Adapter] = {}
    tables: dict[int, list[int]] = {}
    log.info("tensor parallel rank %d ready: %d heads, %d KV heads, %d KV blocks, %.1f MiB of weights",
             rank, plan.num_heads, plan.num_kv_heads, num_blocks, weight_bytes(model) / 2**20)

    def table(key: int, change) -> list[int]:
        if change is not None:
            if change[0] == 0:
                tables[key].extend(change[1])
            else:
                tables[key] = change[1]
        return tables[key]

    with torch.inference_mode():
        while True:
            message = recv()
            kind = message[0]
            if kind == "stop":
                return
            if kind == "stats":
                dist.gather_object(_stats(model), None, dst=0, group=meta_group)
                continue
            _, loads, drops, freed, dec, pre = message
            for uid in drops:
                adapters.pop(uid, None)
            for uid, path in loads:
                _, weights, r = read_adapter(Path(path), cfg, config.max_lora_rank, dtype)
                weights = plan.shard_adapter(weights)
                if device.type != "cpu":
                    weights = {k: (a.to(device), b.to(device)) for k, (a, b) in weights.items()}
                adapters[uid] = Adapter(f"uid-{uid}", Path(path), uid, r, 0.0, (), 0, weights)
            for key in freed:
                tables.pop(key, None)
            d_in = [(table(key, change), c, token) for key, change, c, token, _ in dec]
            p_in = [(table(key, change), c, tokens, final) for key, change, c, tokens, final, _ in pre]
            inputs = build_inputs(config.block_size, d_in, p_in)
            segments = lora_segments([adapters.get(u) if u else None for *_, u in dec],
                                     [adapters.get(u) if u else None for *_, u in pre], inputs.meta.prefills)
            run_model(model, backend, inputs, lora.context, segments, use_graphs=False)


__all__ = ["ShardPlan", "TensorParallel", "TensorParallelEngine", "TensorParallelError", "check_divisible",
           "weight_bytes"]
