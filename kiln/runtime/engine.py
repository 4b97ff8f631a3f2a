"""The engine: one step = schedule -> run the model -> sample -> detokenize and stop.

`Engine` is synchronous and single-threaded. `AsyncEngine` runs it in its own thread and
gives every request an asyncio stream of deltas; cancelling the stream aborts the request
and frees its blocks at once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pathlib import Path

import torch

from ..config import EngineConfig
from .backends.base import kv_bytes_per_block
from .backends.neuron import NeuronPlan
from .backends.select import available_memory, choose_device, create_backend
from .detokenizer import IncrementalDetokenizer
from .kv_cache import BlockPool
from .lora import Adapter, AdapterError, AdapterNotFoundError, LoraManager, LoraSettings
from .model_runner import ModelRunner
from .models.llama import LlamaForCausalLM
from .models.loader import ModelConfig, resolve_model
from .request import FinishReason, Request, RequestOutput, SamplingParams, TokenLogprob
from .sampler import SamplerRow, plain_greedy, sample
from .scheduler import Scheduler, SchedulerConfig, Sequence
from .tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_blocks: int
    num_free_blocks: int
    kv_cache_usage: float
    prefix_cache_queries: int  # prompt tokens looked up
    prefix_cache_hits: int  # of those, tokens found in the cache
    num_preemptions: int
    num_steps: int
    forward_seconds: float  # cumulative time in the model forward
    step_seconds: float  # cumulative time in whole steps
    num_adapters: int = 0
    num_adapters_resident: int = 0
    adapter_resident_bytes: int = 0
    adapter_loads: int = 0
    adapter_evictions: int = 0


@dataclass
class StepTiming:
    """Where the last step's time went (for benchmarks and profiling)."""

    num_seqs: int
    num_decode: int  # sequences computing exactly one token
    num_tokens: int
    forward_seconds: float
    total_seconds: float


class _Tracked:
    """A sequence plus its output-side state."""

    __slots__ = ("seq", "detok", "stop_ids", "emitted_tokens")

    def __init__(self, seq: Sequence, detok: IncrementalDetokenizer, stop_ids: frozenset[int]) -> None:
        self.seq = seq
        self.detok = detok
        self.stop_ids = stop_ids
        self.emitted_tokens = 0


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        try:
            self._init(config)
        except BaseException:
            if getattr(self, "tp", None) is not None:  # started tensor-parallel workers: stop them
                self.tp.close()
            raise

    def _init(self, config: EngineConfig) -> None:
        config.validate()
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.model_path = resolve_model(config.model)
        self.model_config = ModelConfig.from_folder(self.model_path)
        mc = self.model_config
        self.model_name = config.served_model_name or (
            "SmolLM2-135M-Instruct" if config.model == "default" else self.model_path.name
        )
        self.device, choice = choose_device(config.device, config.attention_backend)
        self.neuron_plan: NeuronPlan | None = None
        if self.device == "neuron":
            self.neuron_plan = NeuronPlan.from_config(config, mc)  # refuses shapes that do not fit
            self.max_model_len = self.neuron_plan.max_length
            if config.quantize or config.startup_loras():
                raise ValueError("the neuron backend runs dense weights without LoRA adapters: "
                                 "drop --quantize and --lora")
        else:
            self.max_model_len = min(config.max_model_len or mc.max_position_embeddings, mc.max_position_embeddings)
        self.tokenizer = Tokenizer(self.model_path)
        dtype = config.torch_dtype
        self.tp = None  # tensor parallelism: rank 0's side (runtime/parallel.py)
        num_heads, num_kv_heads = mc.num_heads, mc.num_kv_heads
        if config.tensor_parallel_size > 1 and self.device != "neuron":  # neuron: the plan's degree
            from .parallel import TensorParallelEngine

            self.tp = TensorParallelEngine(config, self.model_path, mc, self.max_model_len)
            self.model = self.tp.load_model(dtype, self.max_model_len)
            num_heads, num_kv_heads = self.tp.plan.num_heads, self.tp.plan.num_kv_heads
        else:
            self.model = LlamaForCausalLM.from_folder(self.model_path, dtype, max_positions=self.max_model_len)
            if config.quantize:
                from .quant import quantize_model

                quantize_model(self.model, config.quantize)
        self.model.eval()

        # With tensor parallelism every rank holds the same blocks for its own KV heads.
        per_block = kv_bytes_per_block(mc.num_layers, num_kv_heads, mc.head_dim, config.block_size, dtype)
        if self.neuron_plan is not None:
            from .backends.neuron import NeuronBackend
            from .neuron_runner import NeuronModelRunner

            plan = self.neuron_plan
            self.backend = NeuronBackend(self.model, plan, self.model_path, dtype)
            # The KV tensors are the backend's fixed rows; the block pool only does the
            # bookkeeping, sized so that every row can reach the max length (no preemption).
            num_blocks = plan.batch_size * -(-plan.max_length // config.block_size)
            enable_prefix_caching = False  # a row is encoded whole: nothing to share
            sched = SchedulerConfig(max(config.max_num_batched_tokens, plan.context_buckets[-1] + plan.batch_size),
                                    plan.batch_size, config.max_loras, chunked_prefill=False)
        else:
            budget = config.kv_cache_bytes or int(available_memory(choice) * config.kv_cache_memory_fraction)
            num_blocks = budget // per_block
            if num_blocks < 1:
                raise ValueError(f"KV budget of {budget} bytes is smaller than one block ({per_block} bytes)")
            self.backend = create_backend(choice, mc.num_layers, num_heads, num_kv_heads, mc.head_dim,
                                          num_blocks, config.block_size, dtype,
                                          max_num_seqs=config.max_num_seqs, max_model_len=self.max_model_len)
            if self.tp is not None:
                if hasattr(self.backend, "use_graphs"):
                    self.backend.use_graphs = False  # graphs would have to capture the collectives
                self.tp.start(num_blocks)
            self.backend.prepare_model(self.model)
            enable_prefix_caching = config.enable_prefix_caching
            sched = SchedulerConfig(config.max_num_batched_tokens, config.max_num_seqs, config.max_loras)
        roots = tuple(Path(r.strip()) for r in (config.lora_roots or "").split(",") if r.strip())
        self.lora = LoraManager(self.model, mc, LoraSettings(
            config.max_loras, config.max_lora_rank, config.lora_cache_bytes, roots), dtype,
            shard=self.tp.plan if self.tp is not None else None,
            cpu_kernel=bool(getattr(self.backend, "kernels", False)))  # the CPU backend's C++ kernels built
        for name, path in config.startup_loras():
            self.lora.load(name, path, confine=False)  # the operator's own choice at start
        self.pool = BlockPool(num_blocks, config.block_size, enable_prefix_caching)
        self.scheduler = Scheduler(sched, self.pool)
        if self.neuron_plan is not None:
            self.runner = NeuronModelRunner(self.backend)
        elif self.tp is not None:
            self.runner = self.tp.runner(self.model, self.backend, config.block_size, self.lora)
        else:
            self.runner = ModelRunner(self.model, self.backend, config.block_size, self.lora.context)
        self._tracked: dict[str, _Tracked] = {}
        self._eos = frozenset(mc.eos_token_ids)
        self.num_steps = 0
        self.forward_seconds = 0.0
        self.step_seconds = 0.0
        self.last_step: StepTiming | None = None
        log.info(
            "engine ready: model=%s dtype=%s kv_blocks=%d x %d tokens (%.0f MiB) max_model_len=%d",
            self.model_name, config.dtype, num_blocks, config.block_size,
            num_blocks * per_block / 2**20, self.max_model_len,
        )

    # -- requests ---------------------------------------------------------------------

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams,
                      lora_name: str | None = None) -> None:
        """Raise ValueError (a client error) if the request can never be served, and
        AdapterNotFoundError for an adapter that is not loaded."""
        if lora_name is not None:
            self.lora.get(lora_name)
        n = len(prompt_token_ids)
        if n == 0:
            raise ValueError("the prompt is empty")
        if self.neuron_plan is not None and n > self.neuron_plan.context_buckets[-1]:
            raise ValueError(self.neuron_plan.too_long(n))
        limit = self.config.max_input_tokens
        if limit is not None and n > limit:
            raise ValueError(f"the prompt has {n} tokens; this server accepts at most {limit}")
        if n >= self.max_model_len:
            raise ValueError(
                f"the prompt has {n} tokens, but this model's context is {self.max_model_len} "
                f"tokens and at least one must be left to generate"
            )
        if n + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"the prompt ({n} tokens) plus max_tokens ({params.max_tokens}) exceeds the "
                f"model's context of {self.max_model_len} tokens"
            )
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        self.scheduler.check_fits(n, params.max_tokens)

    def add_request(self, request: Request) -> None:
        if request.request_id in self._tracked:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        params = request.params
        params.validate()
        self.check_request(request.prompt_token_ids, params)
        seq = Sequence(request, list(request.prompt_token_ids), len(request.prompt_token_ids))
        if request.lora_name is not None:
            seq.adapter = self.lora.acquire(request.lora_name)
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self._eos)
        detok = IncrementalDetokenizer(
            self.tokenizer.backend,
            stop=params.stop,
            include_stop_str_in_output=params.include_stop_str_in_output,
            skip_special_tokens=params.skip_special_tokens,
        )
        try:
            self.scheduler.add(seq)
        except ValueError:
            self._release(seq)
            raise
        self._tracked[request.request_id] = _Tracked(seq, detok, stop_ids)

    def abort(self, request_id: str) -> bool:
        tracked = self._tracked.pop(request_id, None)
        if tracked is None:
            return False
        self._finish(tracked.seq)
        return True

    def _finish(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        self.runner.release(seq)
        self._release(seq)

    def _release(self, seq: Sequence) -> None:
        if seq.adapter is not None:
            self.lora.release(seq.adapter)
            seq.adapter = None

    # -- adapters (thread-safe; loads read files: call them off the event loop) --------

    def load_adapter(self, name: str, path: str) -> Adapter:
        if self.neuron_plan is not None:
            raise AdapterError("the neuron backend does not run LoRA adapters")
        return self.lora.load(name, path)

    def unload_adapter(self, name: str) -> None:
        self.lora.unload(name)

    def list_adapters(self) -> list[Adapter]:
        return self.lora.list()

    @property
    def fatal_error(self) -> str | None:
        """Set when the engine can no longer run (a tensor-parallel worker died)."""
        return self.tp.fatal_error if self.tp is not None else None

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any."""
        if self.tp is not None:
            self.tp.close()

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    @property
    def num_requests(self) -> int:
        return len(self._tracked)

    # -- the step ---------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        t0 = time.perf_counter()
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return []
        result = self.runner.execute(batch, greedy=all(plain_greedy(s.request.params) for s in batch.seqs))
        self.scheduler.after_step(batch)
        outputs: list[RequestOutput] = []
        if result.tokens is not None:  # the model picked plain-greedy tokens itself
            for seq, token in zip(result.sampled, result.tokens.tolist()):
                outputs.append(self._append_token(seq, token, None))
        elif result.sampled:
            rows = [
                SamplerRow(s.request.params, s.token_ids[: s.num_prompt_tokens], s.output_token_ids)
                for s in result.sampled
            ]
            sampled = sample(result.logits, rows)
            for seq, token, logprob in zip(result.sampled, sampled.token_ids, sampled.logprobs):
                outputs.append(self._append_token(seq, token, logprob))
        total = time.perf_counter() - t0
        self.num_steps += 1
        self.forward_seconds += result.forward_seconds
        self.step_seconds += total
        self.last_step = StepTiming(
            len(batch.seqs), sum(1 for n in batch.num_new_tokens if n == 1),
            sum(batch.num_new_tokens), result.forward_seconds, total,
        )
        return outputs

    def _append_token(self, seq: Sequence, token: int, logprob: TokenLogprob | None) -> RequestOutput:
        tracked = self._tracked[seq.request_id]
        params = seq.request.params
        seq.token_ids.append(token)
        finish: FinishReason | None = None
        stop_reason: str | int | None = None
        text = ""
        if token in tracked.stop_ids:
            finish = FinishReason.STOP
            stop_reason = None if token in self._eos and token not in params.stop_token_ids else token
        else:
            step = tracked.detok.add_tokens((token,))
            text = step.text
            if step.stop is not None:
                finish, stop_reason = FinishReason.STOP, step.stop
        num_generated = seq.num_tokens - seq.num_prompt_tokens
        if finish is None and (num_generated >= params.max_tokens or seq.num_tokens >= self.max_model_len):
            finish = FinishReason.LENGTH
        if finish is not None and not isinstance(stop_reason, str):
            text += tracked.detok.flush()
        out = RequestOutput(
            request_id=seq.request_id,
            new_text=text,
            new_token_ids=[token],
            new_logprobs=[logprob] if logprob is not None else None,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_generated_tokens=num_generated,
            finished=finish is not None,
            finish_reason=finish,
            stop_reason=stop_reason,
            num_cached_prompt_tokens=seq.num_cached_prompt_tokens,
        )
        if finish is not None:
            del self._tracked[seq.request_id]
            self._finish(seq)
        return out

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_blocks=self.pool.num_blocks,
            num_free_blocks=self.pool.num_free,
            kv_cache_usage=self.pool.usage,
            prefix_cache_queries=self.pool.prefix_queries,
            prefix_cache_hits=self.pool.prefix_hits,
            num_preemptions=self.scheduler.num_preemptions,
            num_steps=self.num_steps,
            forward_seconds=self.forward_seconds,
            step_seconds=self.step_seconds,
            **self.lora.stats(),
        )

    def fail_all(self, message: str) -> list[RequestOutput]:
        """End every request with an error (after an internal failure), freeing all blocks."""
        outs = []
        for request_id, tracked in list(self._tracked.items()):
            seq = tracked.seq
            self.abort(request_id)
            outs.append(RequestOutput(
                request_id, "", [], None, seq.num_prompt_tokens,
                seq.num_tokens - seq.num_prompt_tokens, True, FinishReason.ERROR, error=message,
            ))
        return outs

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
        """Offline batch generation: all prompts at once, returns the generated token ids."""
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = []
        for i, (prompt, p) in enumerate(zip(prompts, params_list)):
            request = Request(f"offline-{i}-{time.monotonic_ns()}", prompt, p)
            self.add_request(request)
            ids.append(request.request_id)
        results: dict[str, list[int]] = {i: [] for i in ids}
        while self.has_work:
            for out in self.step():
                results[out.request_id].extend(out.new_token_ids)
        return [results[i] for i in ids]


class EngineDeadError(RuntimeError):
    """The engine loop is not running (stopped or draining): the server is unavailable."""


class QueueFullError(RuntimeError):
    """Admission refused: too many requests in flight. Retry later."""


class DeadlineExceededError(RuntimeError):
    """The request waited or ran longer than the server's request timeout."""


class AsyncEngine:
    """Runs an Engine in a background thread; requests are asyncio streams of deltas.

    Admission is bounded: past `max_concurrent_requests` in flight, `generate` raises
    QueueFullError instead of queueing without limit. With `request_timeout` set, a request
    that has waited or run longer is aborted and its stream raises DeadlineExceededError.
    """

    def __init__(self, engine: Engine, max_concurrent_requests: int | None = None,
                 request_timeout: float | None = None) -> None:
        self.engine = engine
        self.max_concurrent_requests = max_concurrent_requests
        self.request_timeout = request_timeout
        self._deadlines: dict[str, float] = {}
        self._accepting = True
        self._lock = threading.Lock()
        self._adds: list[Request] = []
        self._aborts: list[str] = []
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = False
        self._adapter_loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kiln-adapter-load")
        self._thread = threading.Thread(target=self._loop, name="kiln-engine", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.model_config.vocab_size

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and self.engine.fatal_error is None

    @property
    def fatal_error(self) -> str | None:
        return self.engine.fatal_error

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    def stop_accepting(self) -> None:
        """Refuse new requests (EngineDeadError) while those in flight finish: draining."""
        self._accepting = False

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def check_request(self, prompt_token_ids: list[int], params: SamplingParams,
                      lora_name: str | None = None) -> None:
        params.validate()
        self.engine.check_request(prompt_token_ids, params, lora_name)

    # Adapter management is thread-safe. Loads read and convert files: they run on one
    # dedicated thread (off the event loop, and in one malloc arena rather than many).
    async def load_adapter(self, name: str, path: str) -> Adapter:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._adapter_loader, self.engine.load_adapter, name, path)

    def unload_adapter(self, name: str) -> None:
        self.engine.unload_adapter(name)

    def list_adapters(self) -> list[Adapter]:
        return self.engine.list_adapters()

    def submit(self, request: Request) -> "RequestStream":
        """Admit a request and return its stream of deltas. Raises at once, before anything
        is streamed: ValueError (bad request), AdapterNotFoundError (unknown adapter),
        QueueFullError (too many in flight), EngineDeadError (stopped or draining). Closing
        the stream early aborts the request."""
        if not self.is_alive:
            raise EngineDeadError("the engine loop is not running")
        if not self._accepting:
            raise EngineDeadError("the server is shutting down")
        self.check_request(request.prompt_token_ids, request.params, request.lora_name)
        limit = self.max_concurrent_requests
        if limit is not None and len(self._streams) >= limit:
            raise QueueFullError(f"the server is at its limit of {limit} requests in flight; retry later")
        if request.request_id in self._streams:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        queue: asyncio.Queue = asyncio.Queue()
        self._streams[request.request_id] = (asyncio.get_running_loop(), queue)
        with self._lock:
            self._adds.append(request)
            if self.request_timeout is not None:
                self._deadlines[request.request_id] = request.arrival_time + self.request_timeout
        self._wake.set()
        return RequestStream(self, request, queue)

    async def generate(self, request: Request) -> AsyncIterator[RequestOutput]:
        """Convenience: submit and iterate."""
        stream = self.submit(request)
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._aborts.append(request_id)
        self._wake.set()

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        self._thread.join(timeout=10)
        self._adapter_loader.shutdown(wait=False, cancel_futures=True)
        self.engine.close()

    # -- the engine thread ----------------------------------------------------------

    def _deliver(self, outputs: list[RequestOutput | tuple[str, Exception]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for out in outputs:
            request_id, item = (out.request_id, out) if isinstance(out, RequestOutput) else out
            stream = self._streams.get(request_id)
            if stream is not None:
                by_loop.setdefault(stream[0], []).append((stream[1], item))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the loop is closed
                pass

    def _loop(self) -> None:
        engine = self.engine
        with torch.inference_mode():
            while not self._stop:
                with self._lock:
                    adds, self._adds = self._adds, []
                    aborts, self._aborts = self._aborts, []
                errors = []
                for request in adds:
                    try:
                        engine.add_request(request)
                    except (ValueError, AdapterNotFoundError) as exc:  # e.g. unloaded meanwhile
                        errors.append((request.request_id, exc))
                for request_id in aborts:
                    engine.abort(request_id)
                    self._deadlines.pop(request_id, None)
                if self._deadlines:
                    errors.extend(self._expire())
                if errors:
                    self._deliver(errors)
                if not engine.has_work:
                    self._wake.wait(timeout=0.1 if self._deadlines else 0.5)
                    self._wake.clear()
                    continue
                try:
                    outputs = engine.step()
                except Exception:  # never let one bad step kill the server
                    log.exception("engine step failed; failing the requests in flight")
                    outputs = engine.fail_all("internal error in the engine step")
                if engine.fatal_error is not None:  # e.g. a tensor-parallel worker died
                    self._deliver(outputs + engine.fail_all(engine.fatal_error))
                    break
                if outputs:
                    if self._deadlines:
                        for out in outputs:
                            if out.finished:
                                self._deadlines.pop(out.request_id, None)
                    self._deliver(outputs)

    def _expire(self) -> list[tuple[str, Exception]]:
        """Abort requests past their deadline (called on the engine thread)."""
        now = time.monotonic()
        with self._lock:
            expired = [rid for rid, deadline in self._deadlines.items() if deadline <= now]
            for rid in expired:
                del self._deadlines[rid]
        for rid in expired:
            self.engine.abort(rid)
        return [
            (rid, DeadlineExceededError(f"the request exceeded the server's timeout of {self.request_timeout:g} s"))
            for rid in expired
        ]


class RequestStream:
    """The deltas of one admitted request. Iterate it; close() (or leaving it unfinished and
    dropping it) aborts the request and frees its blocks."""

    def __init__(self, engine: AsyncEngine, request: Request, queue: asyncio.Queue) -> None:
        self._engine = engine
        self.request = request
        self._queue = queue
        self.finished = False
        self._closed = False

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished or self._closed:
            raise StopAsyncIteration
        try:
            item = await self._queue.get()
        except BaseException:  # cancelled while waiting: the client went away
            self.close()
            raise
        if isinstance(item, Exception):
            self.close()
            raise item
        if item.finished:
            self.finished = True
            self._engine._streams.pop(self.request.request_id, None)
        return item

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._engine._streams.pop(self.request.request_id, None)
        if not self.finished:
            self._engine.abort(self.request.request_id)

    def __del__(self) -> None:  # a safety net for streams never iterated to the end
        try:
            self.close()
        except Exception:
            pass


def _put_all(items: list[tuple[asyncio.Queue, object]]) -> None:
    for queue, item in items:
        queue.put_nowait(item)
