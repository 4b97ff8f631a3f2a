"""The CPU backend's decode loop (kiln/kernels/cpu/decode_step.cpp: every decoder layer of a
pure-decode step in one C++ call) against the module path it replaces, which is the
reference here: the same tokens and the same logprobs, to the bit, for dense bfloat16 and
float32 weights, int8 and GPTQ 4-bit weights. Steps the loop must not take (prefill rows
beside decodes, LoRA rows, quantized batches past the GEMV row limit) run the modules.
The module path itself is checked against transformers elsewhere (test_engine, test_quant)."""

from __future__ import annotations

import pytest
import torch

from kiln.config import EngineConfig
from kiln.runtime.backends import cpu_decode
from kiln.runtime.engine import Engine
from kiln.runtime.models.loader import resolve_model
from kiln.runtime.request import Request, SamplingParams


@pytest.fixture
def loop_calls(monkeypatch):
    """Counts DecodeLoop.run calls (the real method still runs) and the rows they decoded."""
    calls: list[int] = []
    original = cpu_decode.DecodeLoop.run

    def counted(self, model, input_ids, *args):
        calls.append(input_ids.numel())
        return original(self, model, input_ids, *args)

    monkeypatch.setattr(cpu_decode.DecodeLoop, "run", counted)
    return calls


def _run(config: EngineConfig, num_requests: int, late: int = 1) -> dict[str, list]:
    """Greedy and seeded-sampling requests with logprobs; `late` of them arrive while the
    others decode (a step with prefill and decode rows). Returns each request's
    (token, logprob entries) pairs."""
    engine = Engine(config)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(100, 49000, (9 + 13 * i,), generator=g).tolist() for i in range(num_requests)]

    def params(i: int) -> SamplingParams:
        if i % 3 == 2:
            return SamplingParams(temperature=0.8, top_p=0.9, seed=i, max_tokens=24, ignore_eos=True, logprobs=3)
        return SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=3)

    first = num_requests - late
    for i in range(first):
        engine.add_request(Request(f"r{i}", prompts[i], params(i)))
    out: dict[str, list] = {}
    steps = 0
    while engine.has_work:
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(zip(o.new_token_ids, map(repr, o.new_logprobs or [])))
        steps += 1
        if steps == 4:
            for i in range(first, num_requests):
                engine.add_request(Request(f"r{i}", prompts[i], params(i)))
    assert all(len(v) == 24 for v in out.values()) and len(out) == num_requests
    return out


@pytest.mark.parametrize("dtype,quantize", [("bfloat16", None), ("float32", None), ("bfloat16", "int8"),
                                            ("float32", "int8")])
def test_decode_loop_is_bit_identical_to_the_modules(monkeypatch, loop_calls, dtype, quantize):
    config = EngineConfig(dtype=dtype, quantize=quantize, kv_cache_bytes=64 << 20)
    monkeypatch.setenv("KILN_CPU_DECODE_LOOP", "0")
    want = _run(config, 4)
    assert loop_calls == []
    monkeypatch.setenv("KILN_CPU_DECODE_LOOP", "1")
    got = _run(config, 4)
    # The pure-decode steps took the loop: 3 rows before the late request, 4 with it, 1 at the end.
    assert len(loop_calls) >= 20 and {1, 3, 4} <= set(loop_calls)
    assert got == want


def test_decode_loop_of_many_sequences_is_bit_identical_to_the_modules(monkeypatch, loop_calls):
    """Steps of 19 and 20 sequences: bf16 rows past one run the multi-row linears (AVX-512
    passes, or AMX tiles) in both paths, and the loop must still give the modules' bits."""
    config = EngineConfig(dtype="bfloat16", kv_cache_bytes=64 << 20, max_num_seqs=32)
    monkeypatch.setenv("KILN_CPU_DECODE_LOOP", "0")
    want = _run(config, 20)
    monkeypatch.setenv("KILN_CPU_DECODE_LOOP", "1")
    got = _run(config, 20)
    assert {19, 20} <= set(loop_calls)
    assert got == want


@pytest.fixture(scope="module")
def rtn_folder(tmp_path_factory):
    """The default model with round-to-nearest 4-bit g128 weights, saved in GPTQ format."""
    from kiln.runtime.models.llama import LlamaForCausalLM
    from kiln.runtime.quant.calibrate import quantize_model_weights, save_quantized
    from kiln.runtime.quant.gptq import GptqConfig

    src = resolve_model("default")
    model = LlamaForCausalLM.from_folder(src)
    cfg = GptqConfig(bits=4, group_size=128, sym=False)
    weights = quantize_model_weights(model, torch.zeros(1, 8, dtype=torch.long), cfg, method="rtn", progress=False)
    return save_quantized(src, tmp_path_factory.mktemp("rtn") / "smollm2-rtn4", model, weights, cfg)


def test_decode_loop_runs_gptq_int4_weights_bit_identically(monkeypatch, loop_calls, rtn_folder):
    from kiln.runtime.quant.gptq import GptqLinear

    config = EngineConfig(model=str(rtn_folder), quantize="int8", kv_cache_bytes=64 << 20)  # int8 LM head
    monkeypatch.setenv("KILN_CPU_DECODE_LOOP", "0")
    want = _run(config, 3)
    monkeypatch.setenv("KILN_CPU_DECODE_LOOP", "1")
    engine = Engine(config)
    layers = [m for m in engine.model.modules() if isinstance(m, GptqLinear)]
    assert len(layers) == 120 and all(m.int4_group for m in layers)  # the int4pack kernel
    assert cpu_decode.build(engine.model, engine.backend.kv.dtype) is not None
    del engine
    got = _run(config, 3)
    assert len(loop_calls) >= 20
    assert got == want


def test_quantized_batches_past_the_gemv_limit_take_the_modules(monkeypatch, loop_calls):
    """int8's GEMV runs up to 32 rows; the module path dequantizes past that, so 40
    decoding rows must not enter the loop (it would run the GEMV: other rounding)."""
    from kiln.runtime.quant.int8 import GEMV_MAX_ROWS

    config = EngineConfig(quantize="int8", kv_cache_bytes=128 << 20, max_num_seqs=64)
    engine = Engine(config)
    loop = cpu_decode.build(engine.model, torch.float32)
    assert loop is not None and loop.max_rows == GEMV_MAX_ROWS
    p = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    for i in range(40):
        engine.add_request(Request(f"r{i}", [100 + i, 200, 300], p))
    while engine.has_work:
        engine.step()
    assert loop_calls == []


def test_lora_rows_take_the_modules_and_base_rows_the_loop(monkeypatch, loop_calls, tmp_path):
    """A decode step whose rows carry an adapter runs the modules (the loop has no LoRA
    term); base-only steps run the loop. Both give what the module path gives."""
    from lora_adapters import make_adapter

    adapter = make_adapter(tmp_path / "a1", rank=8, seed=3)
    p = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=2)

    def run() -> list[list]:
        engine = Engine(EngineConfig(kv_cache_bytes=64 << 20, loras=f"a1={adapter}", lora_roots=str(tmp_path)))
        results = []
        for adapter_name in ("a1", None):
            engine.add_request(Request(f"x-{adapter_name}", [5, 6, 7, 8], p, lora_name=adapter_name))
            out = []
            while engine.has_work:
                for o in engine.step():
                    out.extend(zip(o.new_token_ids, map(repr, o.new_logprobs)))
            results.append(out)
        return results

    monkeypatch.setenv("KILN_CPU_DECODE_LOOP", "0")
    want = run()
    monkeypatch.setenv("KILN_CPU_DECODE_LOOP", "1")
    got = run()
    assert got == want
    assert len(loop_calls) == 11  # the base request's decode steps only


def test_one_bf16_sequence_agrees_with_transformers_float32(monkeypatch, loop_calls):
    """A single bf16 stream runs the decode loop with the one-row kernel (gemv.cpp) at every
    step, and three streams together its several-row path (AMX tiles where the CPU has them).
    Teacher-forced on its tokens, transformers' float32 forward must rank each chosen
    token at or near its top (bf16 weights and activations move logits by a few tenths)."""
    from transformers import AutoModelForCausalLM

    from kiln.runtime.models.layers import Linear

    monkeypatch.setenv("KILN_CPU_GEMV", "1")
    engine = Engine(EngineConfig(dtype="bfloat16", kv_cache_bytes=64 << 20))
    linears = [m for m in engine.model.modules() if type(m) is Linear]
    from kiln.kernels import cpu_ops

    # The copies exist where the CPU runs the kernel (AVX512-BF16); elsewhere oneDNN does one row.
    assert len(linears) == 121 and all((m.gemv is not None) == cpu_ops.gemv_bf16_supported() for m in linears)
    assert all(m.gemv_rows == cpu_ops.gemv_bf16_max_rows() for m in linears if m.gemv is not None)
    prompts = [engine.tokenizer.encode(p) for p in (
        "The capital of France is", "def fibonacci(n):", "Water boils at a temperature of")]
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    outputs = [engine.generate([p], params)[0] for p in prompts]  # one sequence at a time
    assert len(loop_calls) == 3 * 15 and set(loop_calls) == {1}
    together = engine.generate(prompts, params)  # three rows a step
    assert len(loop_calls) == 3 * 15 + 15 and set(loop_calls[-15:]) == {3}
    hf = AutoModelForCausalLM.from_pretrained(str(resolve_model("default")), dtype=torch.float32).eval()
    exact = total = 0
    with torch.inference_mode():
        for prompt, toks in zip(prompts + prompts, outputs + together):
            logits = hf(torch.tensor([prompt + toks])).logits[0, len(prompt) - 1:-1]
            gap = logits.max(dim=1).values - logits.gather(1, torch.tensor(toks)[:, None])[:, 0]
            assert float(gap.max()) < 0.5, gap
            exact += int((gap == 0).sum())
            total += len(toks)
    assert exact >= 0.9 * total, (exact, total)


def test_gemv_copies_follow_the_memory_rule(monkeypatch):
    from kiln.runtime.backends.cpu import _want_gemv_copies
    from kiln.runtime.models.layers import Linear

    with torch.device("meta"):
        small, huge = Linear(576, 576), Linear(200_000, 200_000)  # 40 G parameters: more than any test host's share
    small.weight.data, huge.weight.data = small.weight.bfloat16(), huge.weight.bfloat16()
    monkeypatch.delenv("KILN_CPU_GEMV", raising=False)
    assert _want_gemv_copies([small]) and not _want_gemv_copies([huge])
    monkeypatch.setenv("KILN_CPU_GEMV", "1")
    assert _want_gemv_copies([huge])
    monkeypatch.setenv("KILN_CPU_GEMV", "0")
    assert not _want_gemv_copies([small])
    monkeypatch.setenv("KILN_CPU_GEMV", "yes")
    with pytest.raises(ValueError, match="use auto, 0 or 1"):
        _want_gemv_copies([small])
