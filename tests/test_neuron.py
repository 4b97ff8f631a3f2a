"""The neuron backend on this machine: the same bucketed static-shape runtime, its graphs
compiled with torch.jit.trace instead of torch_neuronx.trace.

Small shapes keep it quick: context buckets 16/32/64, 3 batch rows, 96 tokens per row. One
traced engine is shared by the module; a second start against the same graph cache must
load every graph and trace none."""

from __future__ import annotations

import asyncio
import dataclasses

import httpx
import pytest
import torch

from kiln.cli import main as kiln_main
from kiln.config import EngineConfig, load_config
from kiln.runtime.backends import neuron_graphs
from kiln.runtime.backends.neuron import NeuronPlan
from kiln.runtime.engine import AsyncEngine, Engine
from kiln.runtime.models.loader import ModelConfig, resolve_model
from kiln.runtime.request import FinishReason, Request, SamplingParams

BUCKETS = (16, 32, 64)
ROWS = 3
MAX_LENGTH = 96
TEXT = (
    "The history of bread begins in the Neolithic era, when people first ground grains into "
    "flour and mixed it with water. Early flatbreads were baked on hot stones. In ancient Egypt, "
    "bakers learned that dough left to rest would rise, and leavened bread spread across the "
    "Mediterranean. Roman bakeries were organised into guilds, and mills turned by donkeys "
    "ground the wheat. Def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2). "
    "Questions about science, history, cooking or programming are all welcome here."
)
# Prompt lengths: short, exactly at a bucket edge, one past it, mid-bucket, and two that need
# the largest bucket (one exactly at its edge).
LENGTHS = (5, 16, 17, 29, 50, 64)
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def neuron_config(cache_dir, **overrides) -> EngineConfig:
    config = EngineConfig(device="neuron", neuron_context_buckets=",".join(map(str, BUCKETS)),
                          neuron_batch_size=ROWS, neuron_max_length=MAX_LENGTH, neuron_cache_dir=str(cache_dir))
    return dataclasses.replace(config, **overrides)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("neuron-graphs")


@pytest.fixture(scope="module")
def engine(cache_dir) -> Engine:
    return Engine(neuron_config(cache_dir))


@pytest.fixture(scope="module")
def cpu_engine() -> Engine:
    return Engine(EngineConfig(device="cpu", kv_cache_bytes=64 << 20))


@pytest.fixture(scope="module")
def prompts(engine) -> list[list[int]]:
    ids = engine.tokenizer.encode(TEXT)
    assert len(ids) >= 7 * len(LENGTHS) + max(LENGTHS)
    # Different windows of the text, so no two prompts share a prefix.
    return [ids[7 * i:7 * i + n] for i, n in enumerate(LENGTHS)]


def test_the_plan_uses_the_configured_shapes(engine):
    plan = engine.neuron_plan
    assert plan.context_buckets == BUCKETS and plan.batch_size == ROWS and plan.max_length == MAX_LENGTH
    assert engine.max_model_len == MAX_LENGTH
    assert engine.scheduler.config.max_num_seqs == ROWS
    assert not engine.scheduler.config.chunked_prefill and not engine.pool.enable_prefix_caching
    assert engine.backend.compiler == "jit"
    assert engine.backend.graphs.num_traced == len(BUCKETS) + 1  # a fresh cache: everything traced


def test_greedy_matches_the_cpu_backend(engine, cpu_engine, prompts):
    # Six prompts over three rows: rows are freed and refilled between generation steps.
    got = engine.generate(prompts, GREEDY)
    want = cpu_engine.generate(prompts, GREEDY)
    for n, a, b in zip(LENGTHS, got, want):
        assert a == b, f"{n}-token prompt: neuron {a} != cpu {b}"
    assert engine.runner.num_free_rows == ROWS and not engine.runner.rows
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_blocks


def test_sampling_options_match_the_cpu_backend(engine, cpu_engine, prompts):
    """Sampling stays on the host in kiln's sampler: seeded sampling with penalties gives
    the same tokens as on the cpu backend."""
    params = SamplingParams(temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.2, seed=7,
                            max_tokens=8, ignore_eos=True)
    assert engine.generate(prompts[:3], params) == cpu_engine.generate(prompts[:3], params)


def test_more_concurrent_requests_than_rows_all_complete(engine, prompts):
    async_engine = AsyncEngine(engine)

    async def one(i: int) -> tuple[int, FinishReason]:
        params = dataclasses.replace(GREEDY, max_tokens=4 + i)
        tokens = []
        async for out in async_engine.generate(Request(f"many-{i}", prompts[i % len(prompts)], params)):
            tokens += out.new_token_ids
        return len(tokens), out.finish_reason

    async def run() -> list[tuple[int, FinishReason]]:
        return await asyncio.gather(*(one(i) for i in range(3 * ROWS)))

    try:
        results = asyncio.run(run())
    finally:
        async_engine.shutdown()
    assert results == [(4 + i, FinishReason.LENGTH) for i in range(3 * ROWS)]
    assert engine.runner.num_free_rows == ROWS
    assert not engine.has_work


def test_an_aborted_request_frees_its_row_at_once(engine, prompts):
    engine.add_request(Request("gone", prompts[0], GREEDY))
    engine.add_request(Request("stays", prompts[1], dataclasses.replace(GREEDY, max_tokens=3)))
    engine.step()
    assert engine.runner.num_free_rows == ROWS - 2
    assert engine.abort("gone")
    assert engine.runner.num_free_rows == ROWS - 1
    while engine.has_work:
        engine.step()
    assert engine.runner.num_free_rows == ROWS


def test_a_prompt_longer_than_the_largest_bucket_is_refused(engine, prompts):
    too_long = [5] * (BUCKETS[-1] + 1)
    with pytest.raises(ValueError, match="largest context-encoding bucket is 64"):
        engine.check_request(too_long, GREEDY)
    with pytest.raises(ValueError, match="largest context-encoding bucket"):
        engine.add_request(Request("long", too_long, GREEDY))
    with pytest.raises(ValueError, match="context of 96"):  # fits a bucket, not the max length
        engine.check_request(prompts[-1], dataclasses.replace(GREEDY, max_tokens=40))
    assert not engine.has_work


def test_a_prompt_longer_than_the_largest_bucket_is_a_400(engine):
    from kiln.server.app import ServerState, create_app

    async_engine = AsyncEngine(engine)
    app = create_app(ServerState(engine=async_engine))

    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://kiln") as client:
            return await client.post("/v1/completions", json={
                "model": engine.model_name, "prompt": [5] * (BUCKETS[-1] + 1), "max_tokens": 4})

    try:
        response = asyncio.run(post())
    finally:
        async_engine.shutdown()
    assert response.status_code == 400, response.text
    assert "largest context-encoding bucket" in response.text


def test_a_second_start_reuses_the_graph_cache(engine, cache_dir, prompts):
    traced = neuron_graphs.TRACE_COUNT
    again = Engine(neuron_config(cache_dir))
    assert neuron_graphs.TRACE_COUNT == traced, "the second start traced graphs again"
    assert again.backend.graphs.num_traced == 0
    assert again.backend.graphs.num_loaded == len(BUCKETS) + 1
    assert again.backend.graphs.folder == engine.backend.graphs.folder
    assert again.generate(prompts[:2], GREEDY) == engine.generate(prompts[:2], GREEDY)


def test_other_shapes_or_flags_get_their_own_graphs(engine, cache_dir):
    from kiln.runtime.backends.neuron_graphs import cache_key

    g = engine.backend
    base = cache_key(g.dims, BUCKETS, engine.model_path, torch.float32, (), 1, "jit")[0]
    assert base == g.graphs.folder.name
    assert cache_key(g.dims, (16, 64), engine.model_path, torch.float32, (), 1, "jit")[0] != base
    assert cache_key(g.dims, BUCKETS, engine.model_path, torch.bfloat16, (), 1, "jit")[0] != base
    assert cache_key(g.dims, BUCKETS, engine.model_path, torch.float32, ("-O2",), 1, "neuron")[0] != \
        cache_key(g.dims, BUCKETS, engine.model_path, torch.float32, ("-O1",), 1, "neuron")[0]


def test_kiln_compile_fills_and_reuses_the_cache(cache_dir, capsys):
    traced = neuron_graphs.TRACE_COUNT
    argv = ["compile", "--neuron-context-buckets", ",".join(map(str, BUCKETS)), "--neuron-batch-size",
            str(ROWS), "--neuron-max-length", str(MAX_LENGTH), "--neuron-cache-dir", str(cache_dir)]
    assert kiln_main(argv) == 0
    assert "0 graphs compiled, 4 reused" in capsys.readouterr().out
    assert neuron_graphs.TRACE_COUNT == traced


def test_kiln_compile_has_help(capsys):
    with pytest.raises(SystemExit) as exc:
        kiln_main(["compile", "--help"])
    assert exc.value.code == 0
    assert "--neuron-context-buckets" in capsys.readouterr().out


# -- the plan: defaults and refusals (no model load) -----------------------------------------


@pytest.fixture(scope="module")
def model_config() -> ModelConfig:
    return ModelConfig.from_folder(resolve_model("default"))


def test_defaults_derive_from_the_tgi_limits(model_config):
    config = load_config(environ={"KILN_DEVICE": "neuron", "MAX_INPUT_TOKENS": "1000", "MAX_TOTAL_TOKENS": "2048",
                                  "MAX_BATCH_SIZE": "4"}).engine
    assert config.device == "neuron"
    plan = NeuronPlan.from_config(config, model_config)
    assert plan.context_buckets == (128, 256, 512, 1024)
    assert (plan.batch_size, plan.max_length) == (4, 2048)
    assert plan.compiler_args == ("--model-type=transformer",)
    bare = NeuronPlan.from_config(EngineConfig(device="neuron"), model_config)
    assert bare.max_length == min(model_config.max_position_embeddings, 4096)
    assert bare.context_buckets[-1] == bare.max_length and bare.context_buckets[0] == 128


def test_explicit_settings_win(model_config):
    config = load_config(
        {"engine.neuron_context_buckets": "512,128", "engine.neuron_batch_size": 2},
        environ={"KILN_NEURON_CONTEXT_BUCKETS": "64", "MAX_BATCH_SIZE": "8", "KILN_NEURON_MAX_LENGTH": "1024",
                 "KILN_NEURON_COMPILER_ARGS": "--model-type=transformer -O2", "TENSOR_PARALLEL_DEGREE": "3",
                 "NEURON_RT_VISIBLE_CORES": "0-2"}).engine
    plan = NeuronPlan.from_config(config, model_config)
    assert plan.context_buckets == (128, 512) and plan.batch_size == 2 and plan.max_length == 1024
    assert plan.compiler_args == ("--model-type=transformer", "-O2")
    assert plan.tp_degree == 3 and plan.visible_cores == "0-2"


@pytest.mark.parametrize("overrides, message", [
    ({"neuron_max_length": 100_000}, "model's context is only"),
    ({"neuron_context_buckets": "16,128", "neuron_max_length": 96}, "context bucket 128 exceeds"),
    ({"neuron_context_buckets": "16,32", "max_input_tokens": 48}, "largest context bucket is 32"),
    ({"tensor_parallel_size": 2}, "does not divide"),
    ({"neuron_context_buckets": "16,x"}, "comma-separated"),
])
def test_shapes_that_do_not_fit_are_refused_at_start(model_config, overrides, message):
    config = dataclasses.replace(EngineConfig(device="neuron"), **overrides)
    with pytest.raises(ValueError, match=message):
        config.validate()
        NeuronPlan.from_config(config, model_config)
    with pytest.raises(ValueError, match=message):
        Engine(config)


def test_device_flags_that_contradict_are_refused():
    with pytest.raises(ValueError, match="does not apply to the neuron device"):
        Engine(EngineConfig(device="neuron", attention_backend="triton"))
    with pytest.raises(ValueError, match="unknown device"):
        EngineConfig(device="tpu").validate()


def test_without_chunked_prefill_a_prompt_waits_for_a_budget_that_holds_it():
    from kiln.runtime.kv_cache import BlockPool
    from kiln.runtime.scheduler import Scheduler, SchedulerConfig, Sequence

    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=40, max_num_seqs=4, chunked_prefill=False),
                          BlockPool(64, 16, enable_prefix_caching=False))
    for i, n in enumerate((30, 20)):
        scheduler.add(Sequence(Request(f"s{i}", [1] * n, GREEDY), [1] * n, n))
    batch = scheduler.schedule()
    assert batch.num_new_tokens == [30]  # the second prompt does not fit the 10 left: no chunk
    scheduler.after_step(batch)
    for seq in batch.seqs:
        seq.token_ids.append(2)
    assert scheduler.schedule().num_new_tokens == [1, 20]


def test_a_damaged_cache_file_is_compiled_again(engine, tmp_path):
    from kiln.runtime.backends.neuron_graphs import GraphSet

    dims = dataclasses.replace(engine.backend.dims, rows=2, max_length=32)
    args = (dims, (16,), engine.backend.weights, engine.model_path, torch.float32, (), 1, tmp_path, "jit")
    first = GraphSet.load_or_compile(*args)
    assert (first.num_traced, first.num_loaded) == (2, 0)
    (first.folder / "token_gen.pt").write_bytes(b"truncated")
    again = GraphSet.load_or_compile(*args)
    assert (again.num_traced, again.num_loaded) == (1, 1)
    assert not list(first.folder.glob("*.tmp"))
