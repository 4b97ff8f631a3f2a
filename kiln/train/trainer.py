"""The LoRA training loop: a small hand-written loop, resumable at any optimizer step.

Data order is a pure function of (seed, epoch), so a resumed run replays exactly the
micro-batches an uninterrupted one would have seen. SIGTERM (SageMaker stop, spot reclaim)
finishes the current step, saves a checkpoint and the adapter, and returns `interrupted`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F

from .checkpoint import latest_checkpoint, load_checkpoint, read_state, save_checkpoint
from .data import IGNORE, collate, load_examples
from .options import TrainOptions, fingerprint

log = logging.getLogger(__name__)

MAX_GRAD_NORM = 1.0


@dataclass
class TrainResult:
    adapter_dir: Path
    steps: int  # optimizer steps completed (including those of resumed checkpoints)
    total_steps: int
    last_loss: float | None
    interrupted: bool  # stopped by SIGTERM before total_steps


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


class StopFlag:
    """Set by SIGTERM; the loop checks it at each step boundary."""

    def __init__(self) -> None:
        self.set = False
        self._previous: Any = None

    def __enter__(self) -> "StopFlag":
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.set = True

    def __exit__(self, *exc: Any) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def lr_at(step: int, opts: TrainOptions, total: int) -> float:
    """Learning rate of optimizer step `step` (1-based)."""
    if opts.warmup_steps and step <= opts.warmup_steps:
        return opts.lr * step / opts.warmup_steps
    if opts.lr_scheduler == "constant":
        return opts.lr
    # The first step after warm-up runs at the peak, the last one just above zero.
    progress = (step - opts.warmup_steps - 1) / max(1, total - opts.warmup_steps)
    if opts.lr_scheduler == "cosine":
        return opts.lr * 0.5 * (1 + math.cos(math.pi * progress))
    return opts.lr * (1 - progress)


def epoch_batches(n: int, opts: TrainOptions, epoch: int, dist: Dist) -> list[list[int]]:
    """Micro-batches (lists of example indices) of one epoch for this process."""
    g = torch.Generator().manual_seed(opts.seed * 1000 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    # Pad to a multiple of the world size (as DistributedSampler does): every rank must run the
    # same number of steps.
    padded = order + order[: (-len(order)) % dist.world] if n >= dist.world else (order * dist.world)[: dist.world]
    per_rank = padded[dist.rank :: dist.world]
    return [per_rank[i : i + opts.batch_size] for i in range(0, len(per_rank), opts.batch_size)]


def micro_batches(n: int, opts: TrainOptions, dist: Dist, start: int) -> Iterator[tuple[float, list[int]]]:
    """(fractional epoch, micro-batch) from global micro-batch index `start` on, forever."""
    per_epoch = len(epoch_batches(n, opts, 0, dist))
    index = start
    while True:
        epoch, pos = divmod(index, per_epoch)
        batches = epoch_batches(n, opts, epoch, dist)
        for b in batches[pos:]:
            index += 1
            yield index / per_epoch, b


def pick_dtype(opts: TrainOptions, device: torch.device) -> torch.dtype:
    if opts.dtype != "auto":
        return getattr(torch, opts.dtype)
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_model(folder: Path, opts: TrainOptions, device: torch.device) -> Any:
    from transformers import AutoModelForCausalLM

    dtype = pick_dtype(opts, device)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": False}
    if opts.qlora:
        kwargs.update(quantization_kwargs(dtype, device))
    model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    if not opts.qlora:
        model.to(device)
    model.config.use_cache = False  # no KV cache while training
    if opts.qlora:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=opts.gradient_checkpointing)
    elif opts.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.enable_input_require_grads()  # so checkpointed blocks see a tensor that needs grad
    return model


def quantization_kwargs(dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """from_pretrained arguments for 4-bit NF4 base weights (QLoRA)."""
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # ImportError, or a broken native library
        raise RuntimeError(
            "--qlora needs bitsandbytes (pip install 'kiln[qlora]', i.e. bitsandbytes==0.50.2) "
            f"and a device it supports (CUDA, or its CPU build): {exc}"
        ) from None
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    where = device.index if device.type == "cuda" else "cpu"
    return {"quantization_config": config, "device_map": {"": where}}


def add_lora(model: Any, opts: TrainOptions) -> Any:
    from peft import LoraConfig, get_peft_model

    # An integral alpha is written as an int: some adapter readers expect one.
    alpha = int(opts.alpha) if float(opts.alpha).is_integer() else opts.alpha
    config = LoraConfig(r=opts.rank, lora_alpha=alpha, lora_dropout=opts.dropout,
                        target_modules=opts.target_module_list, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def step_loss(model: Any, batch: dict[str, torch.Tensor], n_targets: int) -> torch.Tensor:
    """Summed next-token cross-entropy over the completion tokens, divided by the number of
    completion tokens of the whole optimizer step (so micro-batches weigh by tokens)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shifted = batch["labels"][:, 1:]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), shifted.reshape(-1),
                           ignore_index=IGNORE, reduction="sum")
    return loss / max(1, n_targets)


def _setup_dist() -> tuple[Dist, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dist = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    if torch.cuda.is_available():
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist, device


def _all_reduce(dist: Dist, device: torch.device, value: float, op: str) -> float:
    """A scalar agreed by all ranks (the value itself in a single process)."""
    if dist.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    if op == "broadcast":
        torch.distributed.broadcast(t, src=0)
    else:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX if op == "max" else torch.distributed.ReduceOp.SUM)
    return float(t.item())


def _progress(line: str) -> None:
    print(line, flush=True)


def train(opts: TrainOptions) -> TrainResult:
    from transformers import AutoTokenizer

    # peft imports bitsandbytes when installed; on CPUs without the optional `kernels` package
    # it warns once that it uses its plain fallback, which is fine.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

    from ..runtime.models.loader import resolve_model

    if opts.num_threads:
        torch.set_num_threads(opts.num_threads)
    dist, device = _setup_dist()
    torch.manual_seed(opts.seed)
    folder = resolve_model(opts.model)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    # Data first: bad data should fail in seconds, not after loading the model.
    examples = load_examples(opts.data, tokenizer, opts.max_seq_len)
    out_dir = Path(opts.out)
    ckpt_dir = Path(opts.checkpoint_dir) if opts.checkpoint_dir else out_dir / "checkpoints"

    per_epoch = len(epoch_batches(len(examples), opts, 0, dist))
    steps_per_epoch = max(1, math.ceil(per_epoch / opts.grad_accum))
    total = opts.max_steps or max(1, math.ceil(opts.epochs * steps_per_epoch))

    model = add_lora(load_model(folder, opts, device), opts)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(list(params.values()), lr=opts.lr, weight_decay=opts.weight_decay)
    print_fn = _progress if dist.main else (lambda line: None)
    trainable = sum(p.numel() for p in params.values())
    print_fn(f"kiln train: base={folder} records={len(examples)} trainable_params={trainable} "
             f"steps={total} device={device} world_size={dist.world}")

    fp = fingerprint(opts)
    start = 0
    latest = latest_checkpoint(ckpt_dir) if opts.resume else None
    if latest is not None:
        saved = read_state(latest)
        if saved.fingerprint != fp:
            diff = {k: (saved.fingerprint.get(k), v) for k, v in fp.items() if saved.fingerprint.get(k) != v}
            raise ValueError(f"checkpoint {latest} was made with other settings {diff} (saved, now); "
                             "delete it, pass another --checkpoint-dir, or --no-resume")
        start = load_checkpoint(latest, model, optimizer, params).step
        print_fn(f"kiln train: resumed from {latest} at step={start}")

    train_model: Any = model
    if dist.world > 1:
        # Rank 0's step is the run's step (DDP also copies rank 0's weights to every rank).
        agreed = _all_reduce(dist, device, float(start), "broadcast")
        if int(agreed) != start:
            log.warning("rank %d resumed at step %d, rank 0 at step %d: following rank 0", dist.rank, start, int(agreed))
            start = int(agreed)
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    def save(step: int) -> None:
        if dist.main:
            save_checkpoint(ckpt_dir, step, model, optimizer, params, fp, opts.keep_checkpoints)

    def report(step: int, lr: float, epoch: float) -> None:
        """One progress line for the steps since the last one (mean loss over ranks)."""
        nonlocal window_loss, window_steps, window_tokens, window_start
        elapsed = max(1e-9, time.perf_counter() - window_start)
        tps = _all_reduce(dist, device, float(window_tokens), "sum") / elapsed
        mean_loss = _all_reduce(dist, device, window_loss / window_steps, "sum") / dist.world
        print_fn(f"step={step}/{total} loss={mean_loss:.4f} lr={lr:.3e} tokens_per_s={tps:.1f} epoch={epoch:.2f}")
        window_loss, window_steps, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()

    batches = micro_batches(len(examples), opts, dist, start * opts.grad_accum)
    model.train()
    step, epoch = start, start / steps_per_epoch
    window_loss, window_steps, window_tokens, window_start = 0.0, 0, 0, time.perf_counter()
    last_loss: float | None = None
    interrupted = False
    with StopFlag() as stop:
        while step < total:
            # Every rank must stop at the same step, or the others wait forever in all-reduce.
            if _all_reduce(dist, device, float(stop.set), "max") > 0:
                interrupted = True
                break
            step += 1
            lr = lr_at(step, opts, total)
            for group in optimizer.param_groups:
                group["lr"] = lr
            micro = []
            for _ in range(opts.grad_accum):
                epoch, idx = next(batches)
                micro.append(collate([examples[i] for i in idx], pad_id))
            n_targets = sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in micro)
            step_total = 0.0
            for i, batch in enumerate(micro):
                batch = {k: v.to(device) for k, v in batch.items()}
                last = i == len(micro) - 1
                ctx = train_model.no_sync() if dist.world > 1 and not last else nullcontext()
                with ctx:
                    loss = step_loss(train_model, batch, n_targets)
                    loss.backward()
                step_total += float(loss.detach())
                window_tokens += int(batch["attention_mask"].sum())
            torch.nn.utils.clip_grad_norm_(list(params.values()), MAX_GRAD_NORM)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            last_loss = step_total
            window_loss += step_total
            window_steps += 1
            if step % opts.log_every == 0 or step == total:
                report(step, lr, epoch)
            if opts.checkpoint_every and step % opts.checkpoint_every == 0 and step < total:
                save(step)
        if window_steps:  # stopped inside a log window: report its steps too
            report(step, lr_at(step, opts, total), epoch)
        # Save the resume point and the adapter: at the end, or on SIGTERM.
        save(step)
        if dist.main:
            export_adapter(model, out_dir, opts, folder, step, total, last_loss)
        if dist.world > 1:
            torch.distributed.barrier()
    if interrupted:
        print_fn(f"kiln train: stopped by SIGTERM at step={step}/{total}; checkpoint in {ckpt_dir}")
    else:
        print_fn(f"kiln train: done step={step}/{total} adapter={out_dir}")
    return TrainResult(out_dir, step, total, last_loss, interrupted)


def export_adapter(model: Any, out_dir: Path, opts: TrainOptions, base_folder: Path, step: int,
                   total: int, last_loss: float | None) -> None:
    """Write the standard PEFT folder (adapter_config.json + adapter_model.safetensors; its
    base_model_name_or_path is the base folder) plus kiln_train.json describing the run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    meta = {"base_model": opts.model, "base_model_path": str(base_folder), "steps": step,
            "total_steps": total, "last_loss": last_loss, "rank": opts.rank, "alpha": opts.alpha,
            "target_modules": opts.target_module_list, "qlora": opts.qlora}
    (out_dir / "kiln_train.json").write_text(json.dumps(meta, indent=2) + "\n")
