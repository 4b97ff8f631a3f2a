"""LoRA adapters in the engine, against transformers + peft: greedy equality per adapter, a
batch mixing adapters and the base model, prefix-cache isolation, eviction and reload, the
max_loras limit, and every bad adapter refused with its reason."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kiln.config import EngineConfig
from kiln.runtime.engine import Engine
from kiln.runtime.lora import AdapterError, AdapterNotFoundError
from kiln.runtime.request import Request, SamplingParams
from lora_adapters import make_adapter, peft_greedy, rewrite_config
from test_engine import assert_matches_reference

NEW_TOKENS = 16
PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea:\n",
    "def add(a, b):\n    return",
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    return {
        "all": make_adapter(root / "all", seed=1, rank=8, alpha=16),
        # a subset of the fused q/k/v and gate/up parts, another rank, rsLoRA scaling
        "qv": make_adapter(root / "qv", seed=2, rank=4, alpha=8, targets=["q_proj", "v_proj", "up_proj"],
                           rslora=True, b_scale=0.6),
    }


@pytest.fixture(scope="module")
def prompt_ids(engine) -> list[list[int]]:
    return [engine.tokenizer.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def references(adapters, prompt_ids) -> dict[str | None, list]:
    refs = {name: peft_greedy(path, prompt_ids, NEW_TOKENS) for name, path in adapters.items()}
    refs[None] = peft_greedy(None, prompt_ids, NEW_TOKENS)
    for name in adapters:  # the adapters really change the output
        assert [t for t, _ in refs[name]] != [t for t, _ in refs[None]], name
    return refs


def _engine(adapters: dict[str, Path], **overrides) -> Engine:
    loras = ",".join(f"{name}={path}" for name, path in adapters.items())
    config = EngineConfig(kv_cache_bytes=256 << 20, loras=loras, lora_roots=str(next(iter(adapters.values())).parent))
    return Engine(dataclasses.replace(config, **overrides))


@pytest.fixture(scope="module")
def engine(adapters) -> Engine:
    return _engine(adapters)


def _run(engine: Engine, jobs: list[tuple[list[int], str | None]]) -> list[list[int]]:
    """Submit every (prompt, adapter) at once; return each one's tokens."""
    ids = []
    for i, (prompt, lora) in enumerate(jobs):
        request = Request(f"lora-{i}-{len(engine._tracked)}", prompt, GREEDY, lora_name=lora)
        engine.add_request(request)
        ids.append(request.request_id)
    results: dict[str, list[int]] = {i: [] for i in ids}
    while engine.has_work:
        for out in engine.step():
            results[out.request_id].extend(out.new_token_ids)
    return [results[i] for i in ids]


@pytest.mark.parametrize("lora", ["all", "qv", None])
def test_greedy_matches_transformers_with_peft(engine, prompt_ids, references, lora):
    got = _run(engine, [(p, lora) for p in prompt_ids])
    assert_matches_reference(got, references[lora])
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_blocks


def test_mixed_batch_gives_each_row_its_own_tokens(engine, prompt_ids, references):
    # A prompt whose output the "all" adapter changes (per the transformers + peft reference).
    shared = next(i for i, ((a, _), (b, _)) in enumerate(zip(references["all"], references[None])) if a != b)
    p = prompt_ids[shared]
    others = [q for i, q in enumerate(prompt_ids) if i != shared]
    alone = {lora: _run(engine, [(p, lora)])[0] for lora in ("all", "qv", None)}
    assert alone["all"] != alone[None]
    # The same prompt under different adapters, interleaved with other prompts: a wrong row
    # index, or KV shared through the prefix cache, would mix them up.
    jobs = [(p, "all"), (others[0], None), (p, None), (others[1], "qv"), (p, "qv"), (others[0], "all")]
    got = _run(engine, jobs)
    assert got[0] == alone["all"] and got[2] == alone[None] and got[4] == alone["qv"]
    singles = [_run(engine, [job])[0] for job in jobs]
    assert got == singles


def test_prefix_cache_is_shared_within_an_adapter_only(engine, prompt_ids):
    long_prompt = prompt_ids[1] * 6  # several full blocks
    first = _run(engine, [(long_prompt, "all")])[0]
    hits_before = engine.pool.prefix_hits
    again = _run(engine, [(long_prompt, "all")])[0]
    assert engine.pool.prefix_hits > hits_before, "the same adapter and prompt should hit the cache"
    assert again == first
    hits_before = engine.pool.prefix_hits
    base = _run(engine, [(long_prompt, None)])[0]
    assert engine.pool.prefix_hits == hits_before, "the base model must not reuse the adapter's KV"
    assert base != first


def test_max_loras_limits_the_batch_but_every_request_completes(adapters, prompt_ids, references):
    engine = _engine(adapters, max_loras=1)
    jobs = [(p, lora) for lora in ("all", "qv") for p in prompt_ids[:2]] + [(prompt_ids[2], None)]
    seen: list[set] = []
    original = engine.runner.execute

    def spy(batch, **kwargs):
        seen.append({s.adapter.name for s in batch.seqs if s.adapter is not None})
        return original(batch, **kwargs)

    engine.runner.execute = spy
    got = _run(engine, jobs)
    assert max(len(s) for s in seen) == 1, "never two adapters in one batch with max_loras=1"
    assert {"all", "qv"} <= set().union(*seen)
    assert got[0] == references["all"][0][0] and got[2] == references["qv"][0][0]


def test_eviction_and_reload_from_disk(adapters, prompt_ids, references):
    one_adapter = sum(p.stat().st_size for p in adapters["all"].glob("*.safetensors"))
    engine = _engine({"all": adapters["all"]}, lora_cache_bytes=one_adapter + one_adapter // 2)
    engine.lora.load("qv", adapters["qv"])  # over the budget: the idle "all" is evicted
    stats = engine.stats()
    assert stats.adapter_evictions == 1 and stats.num_adapters_resident == 1
    assert engine.lora.get("all").weights is None
    got = _run(engine, [(prompt_ids[0], "all")])[0]  # re-read on demand
    assert engine.stats().adapter_loads == 3
    assert got == references["all"][0][0]


def test_unload_lets_running_requests_finish_and_refuses_new_ones(adapters, prompt_ids):
    engine = _engine({"all": adapters["all"]})
    alone = _run(engine, [(prompt_ids[0], "all")])[0]
    engine.add_request(Request("running", prompt_ids[0], GREEDY, lora_name="all"))
    tokens = [t for out in engine.step() for t in out.new_token_ids]
    engine.lora.unload("all")
    with pytest.raises(AdapterNotFoundError):
        engine.check_request(prompt_ids[1], GREEDY, "all")
    assert engine.lora.list() == [] and engine.stats().num_adapters == 0
    while engine.has_work:
        for out in engine.step():
            tokens.extend(out.new_token_ids)
    assert tokens == alone
    # the name is free at once: a new version loads under it, with its own prefix-cache salt
    reloaded = engine.lora.load("all", adapters["all"])
    assert _run(engine, [(prompt_ids[0], "all")])[0] == alone
    assert reloaded.in_use == 0


# -- bad adapters ------------------------------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_bad_adapters_are_refused_with_their_reason(engine, adapters, tmp_path):
    root = adapters["all"].parent
    lora = engine.lora

    def refused(path: Path | str, *words: str) -> None:
        with pytest.raises(AdapterError) as info:
            lora.load(f"bad-{Path(path).name}", path)
        message = str(info.value)
        for word in words:
            assert word in message, message
        assert all(a.name != f"bad-{Path(path).name}" for a in lora.list())

    refused(root / "missing", "does not exist")
    no_weights = _copy(adapters["all"], root / "no-weights")
    (no_weights / "adapter_model.safetensors").unlink()
    refused(no_weights, "adapter_model.safetensors", "missing")
    no_config = _copy(adapters["all"], root / "no-config")
    (no_config / "adapter_config.json").unlink()
    refused(no_config, "adapter_config.json", "missing")
    bad_json = _copy(adapters["all"], root / "bad-json")
    (bad_json / "adapter_config.json").write_text("{not json")
    refused(bad_json, "not valid JSON")
    high_rank = make_adapter(root / "rank-128", seed=3, rank=128, targets=["q_proj"])
    refused(high_rank, "rank 128", "--max-lora-rank 64")
    # an adapter made for another base model: q_proj B of the wrong width
    wrong = _copy(adapters["all"], root / "wrong-shape")
    tensors = load_file(str(wrong / "adapter_model.safetensors"))
    key = next(k for k in tensors if "layers.0.self_attn.q_proj.lora_B" in k)
    tensors[key] = torch.zeros(tensors[key].shape[0] * 2, tensors[key].shape[1])
    save_file(tensors, str(wrong / "adapter_model.safetensors"))
    refused(wrong, "q_proj", "another base model")
    # a target kiln does not serve (the embedding)
    embed = _copy(adapters["all"], root / "embed-target")
    tensors = load_file(str(embed / "adapter_model.safetensors"))
    tensors["base_model.model.lm_head.lora_A.weight"] = torch.zeros(8, 576)
    save_file(tensors, str(embed / "adapter_model.safetensors"))
    refused(embed, "lm_head")
    dora = _copy(adapters["all"], root / "dora")
    rewrite_config(dora, use_dora=True)
    refused(dora, "DoRA")
    truncated = _copy(adapters["all"], root / "truncated")
    data = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    refused(truncated, "safetensors")
    # outside the adapter root, directly and through ..
    outside = _copy(adapters["all"], tmp_path / "outside")
    refused(outside, "outside the allowed adapter roots")
    refused(str(root / ".." / tmp_path.name / "outside"), "outside the allowed adapter roots")
    # a name already in use
    with pytest.raises(AdapterError, match="already loaded"):
        lora.load("all", adapters["all"])
    # none of this disturbed serving
    assert _run(engine, [(engine.tokenizer.encode("Hello"), "all")])[0]
    assert json.loads((adapters["all"] / "adapter_config.json").read_text())["r"] == 8
