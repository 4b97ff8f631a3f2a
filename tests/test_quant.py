"""Quantization: packing, the GPTQ algorithm, the int8 / GPTQ linear layers, and the default
model quantized end to end (quantize -> save -> load -> serve), against independent
references: hand-packed fixtures of the AutoGPTQ layout, round-to-nearest, and transformers
running the dequantized weights."""

from __future__ import annotations

import json
import os
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from kiln.config import EngineConfig
from kiln.runtime.engine import Engine
from kiln.runtime.models.llama import LlamaForCausalLM
from kiln.runtime.models.loader import resolve_model
from kiln.runtime.quant import packing
from kiln.runtime.quant.calibrate import (
    _DenseCausal, calibration_samples, default_calibration_text, install_gptq_layers,
    quantize_model_weights, save_quantized,
)
from kiln.runtime.quant.checkpoint import QuantizedCheckpointError
from kiln.runtime.quant.gptq import GptqConfig, GptqLinear, gptq_quantize, rtn_quantize
from kiln.runtime.quant.int8 import Int8Linear
from kiln.runtime.quant.qweight import QuantizedWeight
from kiln.runtime.request import SamplingParams

from kiln_process import KilnProcess

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "List three colours of the rainbow:\n1.",
    "Once upon a time, in a land far away, there lived a",
]
NEW_TOKENS = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
# kiln's CPU kernels take bfloat16 activations (and bfloat16 group scales for int4): its
# logits differ from a float32 forward of the same dequantized weights by up to ~0.1 here.
# Greedy choices must agree except where the reference's best and kiln's choice are that close.
LOGIT_TOL = 0.25


# -- packing ------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("k,n", [(576, 192), (64, 16), (1536, 576)])
def test_pack_unpack_round_trip(bits, k, n):
    g = torch.Generator().manual_seed(k + n + bits)
    values = torch.randint(0, 2**bits, (k, n), generator=g, dtype=torch.int32)
    packed = packing.pack_rows(values, bits)
    assert packed.dtype == torch.int32 and packed.shape == (k * bits // 32, n)
    assert torch.equal(packing.unpack_rows(packed, bits), values)
    zeros = torch.randint(0, 2**bits, (5, n), generator=g, dtype=torch.int32)  # includes 0 and 2**bits-1
    qzeros = packing.pack_zeros(zeros, bits)
    assert qzeros.shape == (5, n * bits // 32)
    assert torch.equal(packing.unpack_zeros(qzeros, bits), zeros)


def test_quantized_weight_round_trip_with_partial_last_group():
    """576 inputs in groups of 128: five groups, the last of 64 columns (as the default
    model's real GPTQ checkpoints have). Pack -> checkpoint tensors -> unpack is exact."""
    from kiln.runtime.quant.checkpoint import packed_tensors

    w = torch.randn(192, 576, generator=torch.Generator().manual_seed(1))
    qw = rtn_quantize(w, bits=4, group_size=128, sym=False)
    assert qw.num_groups == 5 and int((qw.g_idx == 4).sum()) == 64
    t = packed_tensors("m", qw)
    assert t["m.qweight"].shape == (72, 192) and t["m.qzeros"].shape == (5, 24)
    assert t["m.scales"].shape == (5, 192) and t["m.scales"].dtype == torch.float16
    q = packing.unpack_rows(t["m.qweight"], 4).t()
    assert torch.equal(q, qw.qint.to(torch.int32))
    assert torch.equal(packing.unpack_zeros(t["m.qzeros"], 4), qw.zeros)
    # RTN error is bounded by half a step of each group's grid, the short group included.
    step = qw.scales[qw.g_idx.long()].t()
    assert ((qw.dequantize() - w).abs() <= step / 2 + 1e-6).all()


def _hand_packed_fixture() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A 16 -> 8 layer, 4-bit, group size 8, asymmetric, written by hand from the format's
    documentation (AutoGPTQ `QuantLinear.pack`): eight 4-bit values per int32, value j of a
    word in bits 4j..4j+3; qweight packs 8 consecutive input rows; qzeros packs 8
    consecutive output columns and stores zero - 1; weight = scale * (q - zero)."""
    K, N, G = 16, 8, 8
    q = [[(3 * k + 5 * n) % 16 for n in range(N)] for k in range(K)]
    zeros = [[(n + 2 * g) % 16 for n in range(N)] for g in range(K // G)]
    zeros[0][0] = 0  # the v1 off-by-one wraps: stored as 15
    scales = [[0.01 * (1 + n + 3 * g) for n in range(N)] for g in range(K // G)]

    def word(nibbles):
        v = sum((x & 15) << (4 * j) for j, x in enumerate(nibbles))
        return v - (1 << 32) if v >= 1 << 31 else v

    qweight = [[word([q[8 * r + j][n] for j in range(8)]) for n in range(N)] for r in range(K // 8)]
    qzeros = [[word([zeros[g][n] - 1 for n in range(8)])] for g in range(K // G)]
    tensors = {
        "qweight": torch.tensor(qweight, dtype=torch.int32),
        "qzeros": torch.tensor(qzeros, dtype=torch.int32),
        "scales": torch.tensor(scales, dtype=torch.float16),
        "g_idx": torch.tensor([k // G for k in range(K)], dtype=torch.int32),
    }
    weight = torch.tensor([[float(torch.tensor(scales[k // G][n], dtype=torch.float16)) * (q[k][n] - zeros[k // G][n])
                            for k in range(K)] for n in range(N)])
    return tensors, weight


def test_packing_matches_hand_built_autogptq_fixture():
    from kiln.runtime.quant.checkpoint import packed_tensors

    tensors, weight = _hand_packed_fixture()
    qint = packing.unpack_rows(tensors["qweight"], 4).t().to(torch.uint8)
    zeros = packing.unpack_zeros(tensors["qzeros"], 4)
    qw = QuantizedWeight(qint, tensors["scales"].float(), zeros, tensors["g_idx"], 4, 8, sym=False)
    assert torch.allclose(qw.dequantize(), weight, atol=0, rtol=0)
    # and the writer produces the very same words
    out = packed_tensors("m", qw)
    for name in ("qweight", "qzeros", "scales", "g_idx"):
        assert torch.equal(out[f"m.{name}"], tensors[name]), name
    # symmetric 4-bit zero points are 8, stored as 7 in every nibble: 0x77777777
    sym = packing.pack_zeros(torch.full((1, 8), 8, dtype=torch.int32), 4)
    assert int(sym[0, 0]) == 0x77777777


# -- the GPTQ algorithm -------------------------------------------------------------------

def _correlated_inputs(rows: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5
    scale = torch.logspace(-1, 1, k)[torch.randperm(k, generator=g)]  # uneven channel energy, as in LLMs
    return (torch.randn(rows, k, generator=g) @ mix) * scale


@pytest.mark.parametrize("desc_act,sym,k", [(False, True, 512), (True, True, 512), (False, False, 576), (True, False, 576)])
def test_gptq_beats_round_to_nearest(desc_act, sym, k):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(256, k, generator=g)
    x = _correlated_inputs(2048, k, seed=1)
    hessian = 2 * x.t() @ x / x.shape[0]
    cfg = GptqConfig(bits=4, group_size=128, desc_act=desc_act, sym=sym)
    gq = gptq_quantize(w, hessian, cfg)
    rq = rtn_quantize(w, bits=4, group_size=128, sym=sym)
    ref = x @ w.t()
    err_gptq = (x @ gq.dequantize().t() - ref).pow(2).mean()
    err_rtn = (x @ rq.dequantize().t() - ref).pow(2).mean()
    assert err_gptq < 0.8 * err_rtn, (float(err_gptq), float(err_rtn))
    assert gq.num_groups == -(-k // 128)
    if desc_act:
        assert not torch.equal(gq.g_idx, torch.arange(k, dtype=torch.int32) // 128)
        assert torch.equal(torch.bincount(gq.g_idx.long()), torch.bincount(torch.arange(k) // 128))


# -- the linear layers ----------------------------------------------------------------------

@pytest.mark.parametrize("rows", [1, 5, 80])  # 80 > GEMV_MAX_ROWS: dequantize + GEMM
@pytest.mark.parametrize("bits,group_size,desc_act,k", [
    (4, 128, False, 576),  # short last group, int4pack path
    (4, 128, True, 576),   # act-order: permuted input
    (4, 32, False, 64),
    (4, 100, False, 304),  # groups that fit no int4pack size (last of 4): dequantize path
    (8, 128, True, 576),   # 8-bit: dequantize path
])
def test_gptq_linear_matches_dequantized_reference(rows, bits, group_size, desc_act, k):
    g = torch.Generator().manual_seed(rows + k)
    w = torch.randn(192, k, generator=g) * 0.05
    x = _correlated_inputs(512, k, seed=2)
    qw = gptq_quantize(w, 2 * x.t() @ x / 512, GptqConfig(bits=bits, group_size=group_size, desc_act=desc_act, sym=False))
    layer = GptqLinear(qw)
    inp = torch.randn(rows, k, generator=g)
    ref = inp.double() @ qw.dequantize(torch.float64).t()
    got = layer(inp)
    assert got.dtype == torch.float32 and got.shape == (rows, 192)
    # bfloat16 activations (8 bits of mantissa) and bfloat16 scales: ~1% of the output scale.
    assert (got.double() - ref).abs().max() <= 0.02 * ref.abs().max()
    # bfloat16 scales and zero terms (8 bits of mantissa, values up to 15 steps): < 1/16 step.
    step = qw.scales.double()[qw.g_idx.long()].t()
    assert ((layer.dequantize(torch.float64) - qw.dequantize(torch.float64)).abs() <= step / 16).all()


@pytest.mark.parametrize("rows", [1, 8, 33])
def test_int8_linear_matches_dequantized_reference(rows):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(384, 576, generator=g) * 0.05
    layer = Int8Linear.from_float(w)
    assert layer.qweight.dtype == torch.int8 and layer.scales.shape == (384,)
    deq = layer.qweight.double() * layer.scales.double()[:, None]
    assert (deq - w.double()).abs().max() <= layer.scales.double().max() * 0.51  # half a step
    inp = torch.randn(rows, 576, generator=g)
    ref = inp.double() @ deq.t()
    assert (layer(inp).double() - ref).abs().max() <= 0.02 * ref.abs().max()


# -- the default model, end to end ------------------------------------------------------------

@pytest.fixture(scope="module")
def model_path() -> Path:
    return resolve_model("default")


@pytest.fixture(scope="module")
def prompt_ids(model_path):
    from kiln.runtime.tokenizer import Tokenizer

    tok = Tokenizer(model_path)
    return [tok.encode(p) for p in PROMPTS]


def _hf_with_weights(model_path: Path, weights: dict[str, torch.Tensor]):
    """transformers' Llama on the checkpoint, with some linear weights replaced (HF names)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).eval()
    params = dict(model.named_parameters())
    for name, w in weights.items():
        if name == "lm_head.weight":  # untie: the embedding keeps its float weights
            model.lm_head.weight = torch.nn.Parameter(w.float().clone(), requires_grad=False)
        else:
            params[name].data.copy_(w)
    return model


def assert_greedy_agrees(tokens: list[list[int]], prompts: list[list[int]], hf_model) -> None:
    """Teacher-force the reference on kiln's tokens: every kiln token must be the
    reference's argmax, or within LOGIT_TOL of it; most must be exact."""
    exact = total = 0
    with torch.inference_mode():
        for prompt, toks in zip(prompts, tokens):
            ids = torch.tensor([prompt + toks])
            logits = hf_model(ids).logits[0, len(prompt) - 1: len(prompt) - 1 + len(toks)]
            chosen = logits.gather(1, torch.tensor(toks).unsqueeze(1)).squeeze(1)
            gap = logits.max(dim=1).values - chosen
            assert float(gap.max()) <= LOGIT_TOL, f"kiln chose a token {float(gap.max()):.3f} below the reference's best"
            exact += int((gap == 0).sum())
            total += len(toks)
    assert exact >= 0.9 * total, f"only {exact}/{total} greedy tokens are the reference's argmax"


def test_int8_model_matches_dequantized_reference(model_path, prompt_ids):
    engine = Engine(EngineConfig(kv_cache_bytes=64 << 20, quantize="int8"))
    swapped = [m for m in engine.model.modules() if isinstance(m, Int8Linear)]
    assert len(swapped) == 30 * 4 + 1  # qkv, o, gate_up, down per layer, and the LM head
    tokens = engine.generate(prompt_ids, GREEDY)
    weights = {}
    cfg = engine.model_config
    q, kv, inter = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    for i, layer in enumerate(engine.model.layers):
        # the engine wraps every linear for LoRA: the quantized layer is its `base`
        deq = lambda m: m.base.qweight.float() * m.base.scales.float()[:, None]  # noqa: E731
        for name, w in zip(("q_proj", "k_proj", "v_proj"), deq(layer.self_attn.qkv_proj).split([q, kv, kv])):
            weights[f"model.layers.{i}.self_attn.{name}.weight"] = w
        weights[f"model.layers.{i}.self_attn.o_proj.weight"] = deq(layer.self_attn.o_proj)
        for name, w in zip(("gate_proj", "up_proj"), deq(layer.mlp.gate_up_proj).split([inter, inter])):
            weights[f"model.layers.{i}.mlp.{name}.weight"] = w
        weights[f"model.layers.{i}.mlp.down_proj.weight"] = deq(layer.mlp.down_proj)
    lm_head = engine.model.lm_head  # not a LoRA target: not wrapped
    weights["lm_head.weight"] = lm_head.qweight.float() * lm_head.scales.float()[:, None]
    assert_greedy_agrees(tokens, prompt_ids, _hf_with_weights(model_path, weights))


def test_default_calibration_text_is_shipped_and_long_enough_for_the_defaults(model_path):
    """The package ships both calibration files, and their tokens cover `kiln quantize`'s
    default sample (128 windows of 256 tokens), so the windows are not copies of each other."""
    from kiln.runtime.quant.calibrate import QuantizeJob
    from kiln.runtime.tokenizer import Tokenizer

    text = default_calibration_text()
    assert "def binary_search" in text  # the hand-written part
    assert "printing press" in text  # the model-generated part
    ids = Tokenizer(model_path).encode(text)
    job = QuantizeJob()
    assert len(ids) >= job.num_samples * job.seq_len  # 32k tokens: windows overlap little
    windows = calibration_samples(ids, job.num_samples, job.seq_len)
    assert windows.shape == (job.num_samples, job.seq_len)
    assert len({tuple(w.tolist()) for w in windows}) == job.num_samples


@pytest.fixture(scope="module")
def gptq_folder(model_path, tmp_path_factory):
    """The default model, GPTQ 4-bit g128 act-order, on a small calibration sample; saved.
    Returns (folder, in-memory kiln model with GPTQ layers)."""
    from kiln.runtime.tokenizer import Tokenizer

    model = LlamaForCausalLM.from_folder(model_path)
    samples = calibration_samples(Tokenizer(model_path).encode(default_calibration_text()), 4, 64)
    cfg = GptqConfig(bits=4, group_size=128, desc_act=True, sym=True)
    weights = quantize_model_weights(model, samples, cfg, progress=False)
    out = save_quantized(model_path, tmp_path_factory.mktemp("gptq") / "smollm2-gptq", model, weights, cfg)
    install_gptq_layers(model, weights)
    return out, model


def _reference_dequantize(t: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    """weight = scales[g_idx] * (q - (qzeros + 1)), unpacked with plain shifts (the format's
    documentation, independent of kiln's packing module)."""
    pf, mask = 32 // bits, (1 << bits) - 1
    qweight, qzeros = t["qweight"].long() & 0xFFFFFFFF, t["qzeros"].long() & 0xFFFFFFFF
    q = torch.stack([(qweight >> (bits * j)) & mask for j in range(pf)], 1).reshape(-1, qweight.shape[1])
    z = torch.stack([(qzeros >> (bits * j)) & mask for j in range(pf)], 2).reshape(qzeros.shape[0], -1)
    z = (z + 1) & mask
    g = t["g_idx"].long()
    return ((q - z[g]) * t["scales"].float()[g]).t()  # [out, in]


def test_gptq_folder_is_autogptq_format(gptq_folder, model_path):
    folder, _ = gptq_folder
    config = json.loads((folder / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "gptq" and qc["bits"] == 4 and qc["group_size"] == 128
    assert qc["desc_act"] is True and qc["sym"] is True
    tensors = load_file(str(folder / "model.safetensors"))
    prefix = "model.layers.3.mlp.gate_proj"
    assert tensors[f"{prefix}.qweight"].dtype == torch.int32 and tensors[f"{prefix}.qweight"].shape == (72, 1536)
    assert tensors[f"{prefix}.qzeros"].shape == (5, 192) and tensors[f"{prefix}.scales"].shape == (5, 1536)
    assert tensors[f"{prefix}.scales"].dtype == torch.float16 and tensors[f"{prefix}.g_idx"].shape == (576,)
    assert int(tensors[f"{prefix}.qzeros"][0, 0]) == 0x77777777  # symmetric: zero 8 stored as 7
    assert f"{prefix}.weight" not in tensors and "model.embed_tokens.weight" in tensors
    # quantized weights stay close to the originals (4-bit grid: within a step of each group)
    original = load_file(str(model_path / "model.safetensors"))[f"{prefix}.weight"]
    deq = _reference_dequantize({k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.startswith(prefix + ".")}, 4)
    assert (deq - original).abs().mean() < 0.3 * original.abs().mean()


def test_gptq_model_matches_dequantized_reference_and_survives_save_load_serve(gptq_folder, model_path, prompt_ids, tmp_path):
    folder, in_memory = gptq_folder
    # 1. kiln serves the saved folder (the engine under `kiln serve --model DIR`)
    engine = Engine(EngineConfig(model=str(folder), kv_cache_bytes=64 << 20))
    loaded = [m for m in engine.model.modules() if isinstance(m, GptqLinear)]
    assert len(loaded) == 30 * 4 and all(m.perm is not None for m in loaded)  # act-order, fused q/k/v
    tokens = engine.generate(prompt_ids, GREEDY)

    # 2. reference: transformers on weights dequantized straight from the saved tensors
    tensors = load_file(str(folder / "model.safetensors"))
    modules = {k.rsplit(".", 1)[0] for k in tensors if k.endswith(".qweight")}
    weights = {f"{m}.weight": _reference_dequantize(
        {s: tensors[f"{m}.{s}"] for s in ("qweight", "qzeros", "scales", "g_idx")}, 4) for m in modules}
    assert len(weights) == 30 * 7
    assert_greedy_agrees(tokens, prompt_ids, _hf_with_weights(model_path, weights))

    # 3. the loaded layers hold exactly the weights quantized in memory
    for name, module in in_memory.named_modules():
        if isinstance(module, GptqLinear):
            served = engine.model.get_submodule(name)
            served = getattr(served, "base", served)  # the engine wraps linears for LoRA
            assert isinstance(served, GptqLinear), name
            assert torch.equal(served.dequantize(), module.dequantize()), name

    # 4. before saving: the in-memory model, teacher-forced on the served tokens, picks the
    #    same tokens (its batch of many rows runs the dequantize+GEMM kernel, the engine's
    #    decode the int4 GEMV kernel: allow only a near-tie between them)
    with torch.inference_mode():
        for prompt, toks in zip(prompt_ids, tokens):
            ids = prompt + toks
            n = len(ids)
            rows = torch.arange(len(prompt) - 1, n - 1)
            logits = in_memory(torch.tensor(ids), torch.arange(n), _DenseCausal(1, n), None, rows)
            gap = logits.max(dim=1).values - logits.gather(1, torch.tensor(toks).unsqueeze(1)).squeeze(1)
            assert float(gap.max()) < 0.05 and int((gap > 0).sum()) <= 1

    # 5. `kiln serve --model DIR` over HTTP returns the same text
    server = KilnProcess(tmp_path, "--model", str(folder))
    try:
        for prompt, toks in zip(PROMPTS[:1], tokens[:1]):
            r = httpx.post(f"{server.base_url}/v1/completions", timeout=120, json={
                "model": engine.model_name, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == engine.tokenizer.decode(toks)
    finally:
        assert server.stop() == 0


# -- bad folders ------------------------------------------------------------------------------

def _bad_copy(src: Path, dst: Path, config_edit=None, tensor_edit=None) -> Path:
    """A copy of the folder with one edit. Files it leaves alone are hard links (a copy of the
    165 MB checkpoint per case filled a CI machine's disk)."""
    dst.mkdir()
    for f in src.iterdir():
        if f.name == "config.json" and config_edit:
            raw = json.loads(f.read_text())
            config_edit(raw["quantization_config"])
            (dst / f.name).write_text(json.dumps(raw))
        elif f.name == "model.safetensors" and tensor_edit:
            tensors = load_file(str(f))
            tensor_edit(tensors)
            save_file(tensors, str(dst / f.name))
        else:
            os.link(f, dst / f.name)
    return dst


M = "model.layers.2.self_attn.k_proj"


@pytest.mark.parametrize("case,config_edit,tensor_edit,message", [
    ("unknown method", lambda c: c.update(quant_method="awq"), None, "quant_method 'awq'"),
    ("bits 3", lambda c: c.update(bits=3), None, "bits=3"),
    ("bits missing", lambda c: c.pop("bits"), None, "'bits'"),
    ("group size mismatch", lambda c: c.update(group_size=64), None, "model.layers.0.self_attn.q_proj.qzeros has shape (5, 72), expected (9, 72)"),
    ("missing g_idx", None, lambda t: t.pop(f"{M}.g_idx"), f"{M}.g_idx is missing"),
    ("missing scales", None, lambda t: t.pop(f"{M}.scales"), f"{M}.scales is missing"),
    ("qweight shape", None, lambda t: t.update({f"{M}.qweight": t[f"{M}.qweight"][:-1].clone()}),
     f"{M}.qweight has shape (71, 192), expected (72, 192)"),
    ("g_idx out of range", None, lambda t: t[f"{M}.g_idx"].__setitem__(0, 7), f"{M}.g_idx has values outside [0, 5)"),
    ("missing sibling", None, lambda t: [t.pop(k) for k in list(t) if k.startswith("model.layers.2.self_attn.v_proj.")],
     "model.layers.2.self_attn.v_proj.qweight is missing"),
])
def test_bad_gptq_folder_fails_at_load_naming_the_problem(gptq_folder, tmp_path, case, config_edit, tensor_edit, message):
    folder, _ = gptq_folder
    bad = _bad_copy(folder, tmp_path / "bad", config_edit, tensor_edit)
    with pytest.raises(QuantizedCheckpointError) as err:
        LlamaForCausalLM.from_folder(bad)
    assert message in str(err.value), str(err.value)


def test_bad_gptq_folder_cli_error(gptq_folder, tmp_path, capsys):
    from kiln.cli import main

    folder, _ = gptq_folder
    bad = _bad_copy(folder, tmp_path / "bad", lambda c: c.update(bits=2))
    assert main(["generate", "hi", "--model", str(bad), "--max-tokens", "1"]) == 2
    assert "bits=2 is not supported" in capsys.readouterr().err


# -- bitsandbytes ---------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["bnb-int8", "bnb-nf4"])
def test_bitsandbytes_linear(method):
    import bitsandbytes as bnb  # a dev dependency: `make test` always runs these

    from kiln.runtime.quant.bnb import bnb_linear_factory

    g = torch.Generator().manual_seed(3)
    w = torch.randn(256, 576, generator=g) * 0.05
    layer = bnb_linear_factory(method)(w)
    x = torch.randn(5, 576, generator=g)
    y = layer(x)
    assert y.shape == (5, 256) and y.dtype == torch.float32
    if method == "bnb-nf4":
        p = layer.inner.weight
        ref = x @ bnb.functional.dequantize_4bit(p.data, p.quant_state).float().t()
        assert (y - ref).abs().max() <= 1e-3 * ref.abs().max() + 1e-5
        err = 0.15  # NF4: 4-bit blocks of 64
    else:
        err = 0.02  # int8 rows (and float outlier columns)
    exact = x @ w.t()
    assert (y - exact).norm() <= err * exact.norm()


def test_bitsandbytes_model_generates(prompt_ids):
    from kiln.runtime.quant.bnb import BnbLinear

    engine = Engine(EngineConfig(kv_cache_bytes=64 << 20, quantize="bnb-nf4"))
    assert sum(isinstance(m, BnbLinear) for m in engine.model.modules()) == 30 * 4 + 1
    tokens = engine.generate(prompt_ids[:1], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    assert "Paris" in engine.tokenizer.decode(tokens[0])
