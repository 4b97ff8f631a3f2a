"""Typed settings, one model for every door.

Precedence: CLI flags > KILN_* environment variables > the environment aliases that existing
SageMaker / TGI / LMI containers use > defaults. `SETTINGS` is the single table of which
variables feed which field; the README's settings table documents the same rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

SAGEMAKER_MODEL_DIR = Path("/opt/ml/model")
QUANTIZE_METHODS = ("int8", "bnb-int8", "bnb-nf4")  # load-time weight quantization
DEVICES = ("auto", "cpu", "cuda", "neuron")


@dataclass
class EngineConfig:
    model: str = "default"  # "default", a Hugging Face folder, or a .gguf file
    served_model_name: str | None = None
    dtype: str = "float32"  # float32 | bfloat16 | float16
    block_size: int = 16
    kv_cache_bytes: int | None = None  # explicit KV budget; else a fraction of free memory
    kv_cache_memory_fraction: float = 0.1
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    max_model_len: int | None = None  # default: the model's context length
    max_input_tokens: int | None = None  # longest prompt accepted; default: max_model_len - 1
    enable_prefix_caching: bool = True
    num_threads: int | None = None  # torch threads; default: all cores
    attention_backend: str = "auto"  # auto | cpu | triton | flash-attn
    device: str = "auto"  # auto | cpu | cuda | neuron
    quantize: str | None = None  # load-time weight quantization: one of QUANTIZE_METHODS
    # LoRA adapters
    loras: str | None = None  # adapters loaded at start: "NAME=PATH[,NAME=PATH...]"
    lora_roots: str | None = None  # folders runtime loads may read from ("DIR[,DIR...]")
    max_loras: int = 8  # distinct adapters in one running batch
    max_lora_rank: int = 64
    lora_cache_bytes: int = 1 << 30  # adapter weights kept in memory; LRU idle ones evicted
    # Neuron (static shapes; unset values derive from max_input_tokens / max_model_len /
    # max_num_seqs and the model's context, see runtime/backends/neuron.py)
    neuron_context_buckets: str | None = None  # prompt-length buckets, e.g. "128,512,2048"
    neuron_batch_size: int | None = None  # rows of the token-generation graph
    neuron_max_length: int | None = None  # prompt plus generated tokens, fixed at compile time
    neuron_compiler_args: str | None = None  # neuronx-cc arguments (shell words)
    neuron_cache_dir: str | None = None  # compiled graphs; default: <kiln cache>/neuron
    neuron_visible_cores: str | None = None  # NEURON_RT_VISIBLE_CORES, e.g. "0-1"
    tensor_parallel_size: int = 1  # ranks the model is split over (processes; one GPU each on CUDA)

    def startup_loras(self) -> list[tuple[str, str]]:
        pairs = []
        for item in filter(None, (s.strip() for s in (self.loras or "").split(","))):
            name, sep, path = item.partition("=")
            if not sep or not name.strip() or not path.strip():
                raise ValueError(f"adapter {item!r}: expected NAME=PATH")
            pairs.append((name.strip(), path.strip()))
        return pairs

    def context_buckets(self) -> tuple[int, ...] | None:
        """The configured Neuron prompt buckets, sorted; None: derive them."""
        if not self.neuron_context_buckets or not self.neuron_context_buckets.strip():
            return None
        try:
            buckets = sorted({int(b) for b in self.neuron_context_buckets.split(",") if b.strip()})
        except ValueError:
            raise ValueError(f"neuron_context_buckets {self.neuron_context_buckets!r}: expected "
                             "comma-separated token counts, e.g. 128,512,2048") from None
        if not buckets or buckets[0] < 1:
            raise ValueError(f"neuron_context_buckets {self.neuron_context_buckets!r}: buckets must be >= 1")
        return tuple(buckets)

    @property
    def torch_dtype(self) -> torch.dtype:
        try:
            return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.dtype]
        except KeyError:
            raise ValueError(f"unknown dtype {self.dtype!r}: use float32, bfloat16 or float16") from None

    def validate(self) -> None:
        self.torch_dtype  # noqa: B018 - raises on an unknown dtype
        if self.block_size < 1:
            raise ValueError("block_size must be >= 1")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ValueError("kv_cache_bytes must be > 0")
        if not 0 < self.kv_cache_memory_fraction <= 0.95:
            raise ValueError("kv_cache_memory_fraction must be in (0, 0.95]")
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
        if self.max_input_tokens is not None and self.max_input_tokens < 1:
            raise ValueError("max_input_tokens must be >= 1")
        if self.attention_backend not in ("auto", "cpu", "triton", "flash-attn"):
            raise ValueError(f"unknown attention_backend {self.attention_backend!r}: use auto, cpu, triton or flash-attn")
        if self.device not in DEVICES:
            raise ValueError(f"unknown device {self.device!r}: use {', '.join(DEVICES)}")
        if self.neuron_batch_size is not None and self.neuron_batch_size < 1:
            raise ValueError("neuron_batch_size must be >= 1")
        if self.neuron_max_length is not None and self.neuron_max_length < 2:
            raise ValueError("neuron_max_length must be >= 2")
        self.context_buckets()
        if self.max_loras < 1 or self.max_lora_rank < 1:
            raise ValueError("max_loras and max_lora_rank must be >= 1")
        if self.lora_cache_bytes < 0:
            raise ValueError("lora_cache_bytes must be >= 0")
        self.startup_loras()
        if self.tensor_parallel_size < 1:
            raise ValueError("tensor_parallel_size must be >= 1")
        if self.quantize is not None and self.quantize not in QUANTIZE_METHODS:
            raise ValueError(f"unknown quantize {self.quantize!r}: use {', '.join(QUANTIZE_METHODS)}")


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    grpc_port: int = 8081  # 0 disables gRPC
    api_key: str | None = None
    max_concurrent_requests: int = 256  # past this, HTTP 429 / gRPC RESOURCE_EXHAUSTED
    request_timeout: float | None = None  # seconds from arrival; None = no deadline
    shutdown_grace: float = 25.0  # seconds in-flight requests get after SIGTERM
    max_body_bytes: int = 6 * 1024 * 1024  # as SageMaker's invocation payload limit
    log_level: str = "info"
    engine: EngineConfig = field(default_factory=EngineConfig)

    def validate(self) -> None:
        self.engine.validate()
        if self.max_concurrent_requests < 1:
            raise ValueError("max_concurrent_requests must be >= 1")
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise ValueError("request_timeout must be > 0")
        if self.shutdown_grace < 0:
            raise ValueError("shutdown_grace must be >= 0")
        if self.grpc_port and self.grpc_port == self.port:
            raise ValueError(f"the HTTP and gRPC ports must differ (both {self.port})")


@dataclass(frozen=True)
class Setting:
    """One settings row: where the value lands and which variables can set it."""

    target: str  # "server.<field>" or "engine.<field>"
    kiln_env: str
    aliases: tuple[str, ...] = ()
    help: str = ""


SETTINGS: list[Setting] = [
    Setting("engine.model", "KILN_MODEL", ("HF_MODEL_ID", "OPTION_MODEL_ID"),
            "model: 'default', a Hugging Face folder or a .gguf file (/opt/ml/model when it holds one)"),
    Setting("engine.served_model_name", "KILN_SERVED_MODEL_NAME", ("SERVED_MODEL_NAME",), "name clients use in 'model'"),
    Setting("engine.dtype", "KILN_DTYPE", ("DTYPE", "OPTION_DTYPE"), "float32, bfloat16 or float16"),
    Setting("engine.block_size", "KILN_BLOCK_SIZE", (), "tokens per KV-cache block"),
    Setting("engine.kv_cache_bytes", "KILN_KV_CACHE_BYTES", (), "KV-cache budget (2G, 512M or bytes)"),
    Setting("engine.kv_cache_memory_fraction", "KILN_KV_CACHE_MEMORY_FRACTION", (),
            "share of available memory for the KV cache when no byte budget is set"),
    Setting("engine.max_num_batched_tokens", "KILN_MAX_NUM_BATCHED_TOKENS",
            ("MAX_BATCH_PREFILL_TOKENS", "OPTION_MAX_ROLLING_BATCH_PREFILL_TOKENS"),
            "token budget of one step; longer prompts are prefilled in chunks"),
    Setting("engine.max_num_seqs", "KILN_MAX_NUM_SEQS", ("MAX_BATCH_SIZE", "OPTION_MAX_ROLLING_BATCH_SIZE"),
            "most sequences running at once"),
    Setting("engine.max_model_len", "KILN_MAX_MODEL_LEN", ("MAX_TOTAL_TOKENS", "OPTION_MAX_MODEL_LEN"),
            "context limit: prompt plus generated tokens"),
    Setting("engine.max_input_tokens", "KILN_MAX_INPUT_TOKENS", ("MAX_INPUT_TOKENS", "MAX_INPUT_LENGTH", "OPTION_MAX_INPUT_LEN"),
            "longest prompt accepted"),
    Setting("engine.enable_prefix_caching", "KILN_ENABLE_PREFIX_CACHING", ("OPTION_ENABLE_PREFIX_CACHING",),
            "share KV blocks of common prompt prefixes"),
    Setting("engine.num_threads", "KILN_NUM_THREADS", (), "torch CPU threads"),
    Setting("engine.attention_backend", "KILN_ATTENTION_BACKEND", (),
            "auto (cuda backend when CUDA is present, else cpu), cpu, triton or flash-attn"),
    Setting("engine.device", "KILN_DEVICE", (),
            "auto (neuron when torch-neuronx and a Neuron device are present, else cuda when CUDA is, "
            "else cpu), cpu, cuda or neuron"),
    Setting("engine.neuron_context_buckets", "KILN_NEURON_CONTEXT_BUCKETS", (),
            "neuron: prompt-length buckets, comma-separated (default: powers of two from 128 up to "
            "the longest prompt)"),
    Setting("engine.neuron_batch_size", "KILN_NEURON_BATCH_SIZE", (),
            "neuron: batch rows of the token-generation graph (default: --max-num-seqs)"),
    Setting("engine.neuron_max_length", "KILN_NEURON_MAX_LENGTH", (),
            "neuron: prompt plus generated tokens, fixed at compile time (default: --max-model-len, "
            "else the model's context up to 4096)"),
    Setting("engine.neuron_compiler_args", "KILN_NEURON_COMPILER_ARGS", (),
            "neuron: neuronx-cc arguments (default --model-type=transformer)"),
    Setting("engine.neuron_cache_dir", "KILN_NEURON_CACHE_DIR", (),
            "neuron: folder of compiled graphs, reused when model, buckets and flags match "
            "(default $KILN_CACHE/neuron)"),
    Setting("engine.neuron_visible_cores", "KILN_NEURON_VISIBLE_CORES", ("NEURON_RT_VISIBLE_CORES",),
            "neuron: NeuronCores this server uses, e.g. 0-1 (passed to the runtime as NEURON_RT_VISIBLE_CORES)"),
    Setting("engine.loras", "KILN_LORAS", ("LORA_ADAPTERS",),
            "LoRA adapters loaded at start, NAME=PATH separated by commas (--lora, repeatable)"),
    Setting("engine.lora_roots", "KILN_LORA_ROOTS", (),
            "folders (comma-separated) that runtime adapter loads may read from; unset: runtime loads are refused"),
    Setting("engine.max_loras", "KILN_MAX_LORAS", ("OPTION_MAX_LORAS",), "distinct LoRA adapters in one running batch"),
    Setting("engine.max_lora_rank", "KILN_MAX_LORA_RANK", ("OPTION_MAX_LORA_RANK",), "largest adapter rank accepted"),
    Setting("engine.lora_cache_bytes", "KILN_LORA_CACHE_BYTES", (),
            "adapter weights kept in memory; least recently used idle adapters are evicted and re-read on demand"),
    Setting("engine.quantize", "KILN_QUANTIZE", (),
            "quantize weights at load time: int8, bnb-int8 or bnb-nf4 (GPTQ folders need none)"),
    Setting("engine.tensor_parallel_size", "KILN_TENSOR_PARALLEL_SIZE",
            ("OPTION_TENSOR_PARALLEL_DEGREE", "TENSOR_PARALLEL_DEGREE", "SM_NUM_GPUS"),
            "split the model over N ranks (tensor parallelism): N processes, one GPU each with CUDA "
            "(NCCL), CPU processes otherwise (gloo); 'max' = every visible GPU"),
    Setting("server.host", "KILN_HOST", (), "address to bind"),
    Setting("server.port", "KILN_PORT", ("SAGEMAKER_BIND_TO_PORT",), "HTTP port"),
    Setting("server.grpc_port", "KILN_GRPC_PORT", (), "gRPC port; 0 disables it (inside SAGEMAKER_SAFE_PORT_RANGE when that is set)"),
    Setting("server.api_key", "KILN_API_KEY", (), "require 'Authorization: Bearer KEY' (HTTP) or 'authorization' metadata (gRPC)"),
    Setting("server.max_concurrent_requests", "KILN_MAX_CONCURRENT_REQUESTS",
            ("MAX_CONCURRENT_REQUESTS", "OPTION_MAX_CONCURRENT_REQUESTS"),
            "requests in flight before new ones get 429 / RESOURCE_EXHAUSTED"),
    Setting("server.request_timeout", "KILN_REQUEST_TIMEOUT", ("OPTION_REQUEST_TIMEOUT",),
            "seconds a request may wait and run before it is ended"),
    Setting("server.shutdown_grace", "KILN_SHUTDOWN_GRACE", (), "seconds in-flight requests get to finish after SIGTERM"),
    Setting("server.max_body_bytes", "KILN_MAX_BODY_BYTES", (), "largest request body accepted"),
    Setting("server.log_level", "KILN_LOG_LEVEL", (), "debug, info, warning or error"),
]

_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16",
                  "float": "float32", "auto": "float32"}


def parse_size(text: str) -> int:
    """'2G', '512M', '64k' or a plain number of bytes."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def _convert(target: str, raw: str, current):
    name = target.split(".", 1)[1]
    if name == "dtype":
        value = _DTYPE_ALIASES.get(raw.strip().lower(), raw.strip().lower())
        if value not in ("float32", "bfloat16", "float16"):
            raise ValueError("expected float32, bfloat16 or float16")
        return value
    if name == "quantize":
        value = raw.strip().lower()
        if value not in QUANTIZE_METHODS:
            raise ValueError(f"expected one of {', '.join(QUANTIZE_METHODS)}")
        return value
    if name == "tensor_parallel_size":
        value = raw.strip().lower()
        if value in ("max", "auto"):  # LMI: every GPU of the instance
            return max(1, torch.cuda.device_count())
        return max(1, int(value))  # SageMaker CPU instances export SM_NUM_GPUS=0
    if name in ("kv_cache_bytes", "max_body_bytes", "lora_cache_bytes"):
        return parse_size(raw)
    if isinstance(current, bool) or name == "enable_prefix_caching":
        value = raw.strip().lower()
        if value not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            raise ValueError("expected true or false")
        return value in ("1", "true", "yes", "on")
    int_fields = {"block_size", "max_num_batched_tokens", "max_num_seqs", "max_model_len", "max_input_tokens",
                  "num_threads", "port", "grpc_port", "max_concurrent_requests", "max_loras", "max_lora_rank",
                  "neuron_batch_size", "neuron_max_length"}
    if name in int_fields:
        return int(raw)
    if name in ("kv_cache_memory_fraction", "request_timeout", "shutdown_grace"):
        return float(raw)
    return raw


def _set(config: ServerConfig, target: str, value) -> None:
    scope, name = target.split(".", 1)
    setattr(config.engine if scope == "engine" else config, name, value)


def _get(config: ServerConfig, target: str):
    scope, name = target.split(".", 1)
    return getattr(config.engine if scope == "engine" else config, name)


def load_config(cli: dict[str, object] | None = None, environ: dict[str, str] | None = None) -> ServerConfig:
    """Build the settings: defaults, then aliases, then KILN_* variables, then CLI values
    (keys like "engine.max_num_seqs"; None means "not given")."""
    env = os.environ if environ is None else environ
    config = ServerConfig()
    if SAGEMAKER_MODEL_DIR.is_dir() and (
        (SAGEMAKER_MODEL_DIR / "config.json").is_file() or any(SAGEMAKER_MODEL_DIR.glob("*.gguf"))
    ):
        ggufs = sorted(SAGEMAKER_MODEL_DIR.glob("*.gguf"))
        config.engine.model = str(ggufs[0] if ggufs and not (SAGEMAKER_MODEL_DIR / "config.json").is_file()
                                  else SAGEMAKER_MODEL_DIR)
    for setting in SETTINGS:
        for name in (*reversed(setting.aliases), setting.kiln_env):  # KILN_* wins, then the first alias
            raw = env.get(name)
            if raw is None or raw == "":
                continue
            try:
                _set(config, setting.target, _convert(setting.target, raw, _get(config, setting.target)))
            except ValueError as exc:
                raise ValueError(f"{name}={raw!r}: {exc}") from None
    safe_range = env.get("SAGEMAKER_SAFE_PORT_RANGE")
    if safe_range and not env.get("KILN_GRPC_PORT"):
        config.grpc_port = grpc_port_in_range(safe_range, config.port)
    for target, value in (cli or {}).items():
        if value is not None:
            _set(config, target, value)
    config.validate()
    return config


def grpc_port_in_range(safe_range: str, http_port: int) -> int:
    """The first port of SageMaker's 'LOW-HIGH' safe range that is not the HTTP port."""
    try:
        low, high = (int(p) for p in safe_range.split("-"))
    except ValueError:
        raise ValueError(f"SAGEMAKER_SAFE_PORT_RANGE={safe_range!r}: expected LOW-HIGH") from None
    for port in range(low, high + 1):
        if port != http_port:
            return port
    raise ValueError(f"SAGEMAKER_SAFE_PORT_RANGE={safe_range!r} has no port besides {http_port}")
