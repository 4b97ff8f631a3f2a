"""Which backend runs the model: chosen once at engine start, and logged.

The device comes first: 'auto' takes neuron when torch-neuronx imports and a Neuron device
exists (and no attention backend is forced), else cuda or cpu as below. For cuda and cpu,
the attention backend: 'auto' takes the cuda backend when CUDA is present (flash-attn
prefill when that package imports, else the Triton prefill kernel) and the cpu backend
otherwise; the other choices force one and fail clearly when the machine cannot run it."""

from __future__ import annotations

import importlib.util
import logging

import torch

log = logging.getLogger(__name__)

CHOICES = ("auto", "cpu", "triton", "flash-attn")


def _flash_attn_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def choose_attention_backend(requested: str = "auto") -> str:
    """Return 'cpu', 'triton' or 'flash-attn' (the last two run the cuda backend)."""
    if requested not in CHOICES:
        raise ValueError(f"unknown attention backend {requested!r}: use one of {', '.join(CHOICES)}")
    cuda = torch.cuda.is_available()
    if requested == "cpu":
        choice, why = "cpu", "forced by --attention-backend"
    elif requested == "auto":
        if not cuda:
            choice, why = "cpu", "no CUDA device"
        elif not _triton_available():
            choice, why = "cpu", "CUDA is present but triton is not installed"
        elif _flash_attn_available():
            choice, why = "flash-attn", "CUDA and flash-attn present"
        else:
            choice, why = "triton", "CUDA present, flash-attn not installed"
    else:
        if not cuda:
            raise ValueError(f"attention backend {requested!r} needs a CUDA device, and none is available")
        if not _triton_available():
            raise ValueError(f"attention backend {requested!r} needs triton, which is not installed")
        if requested == "flash-attn" and not _flash_attn_available():
            raise ValueError("attention backend 'flash-attn' needs the flash-attn package, which is not installed")
        choice, why = requested, "forced by --attention-backend"
    log.info("attention backend: %s (%s)", choice, why)
    return choice


def choose_device(device: str = "auto", attention: str = "auto") -> tuple[str, str | None]:
    """Return (device, attention backend): ('neuron', None), or ('cpu' | 'cuda', the
    choice of `choose_attention_backend`)."""
    if device == "neuron" or (device == "auto" and attention == "auto" and _neuron_available()):
        if attention != "auto":
            raise ValueError(f"--attention-backend {attention} does not apply to the neuron device")
        log.info("device: neuron (%s)", "forced by --device" if device == "neuron" else "torch-neuronx and a Neuron device present")
        return "neuron", None
    if device == "cpu":
        if attention not in ("auto", "cpu"):
            raise ValueError(f"--attention-backend {attention} needs CUDA; it contradicts --device cpu")
        return "cpu", choose_attention_backend("cpu")
    if device == "cuda":
        if attention == "cpu":
            raise ValueError("--attention-backend cpu contradicts --device cuda")
        if not torch.cuda.is_available():
            raise ValueError("--device cuda needs a CUDA device, and none is available")
        choice = choose_attention_backend(attention)
        if choice == "cpu":
            raise ValueError("--device cuda needs triton, which is not installed")
        return "cuda", choice
    if device != "auto":
        raise ValueError(f"unknown device {device!r}: use auto, cpu, cuda or neuron")
    choice = choose_attention_backend(attention)
    return ("cpu" if choice == "cpu" else "cuda"), choice


def _neuron_available() -> bool:
    from .neuron_graphs import neuron_available

    return neuron_available()


def available_memory(choice: str) -> int:
    """Bytes the KV cache may draw from: free device memory for cuda, free RAM for cpu."""
    if choice == "cpu":
        import psutil

        return psutil.virtual_memory().available
    free, _ = torch.cuda.mem_get_info()
    return free


def create_backend(choice: str, num_layers: int, num_heads: int, num_kv_heads: int, head_dim: int,
                   num_blocks: int, block_size: int, dtype: torch.dtype, *, max_num_seqs: int,
                   max_model_len: int):
    if choice == "cpu":
        from .cpu import CpuBackend

        return CpuBackend(num_layers, num_heads, num_kv_heads, head_dim, num_blocks, block_size, dtype)
    from .cuda import CudaBackend

    return CudaBackend(num_layers, num_heads, num_kv_heads, head_dim, num_blocks, block_size, dtype,
                       prefill=choice, max_num_seqs=max_num_seqs, max_model_len=max_model_len)
