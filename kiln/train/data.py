"""Training data: JSON-lines records → token ids with labels masked to the completion.

Two record formats, one per line:
  {"prompt": "...", "completion": "..."}   plain text: the model sees prompt + completion + EOS,
                                           exactly as /v1/completions would send the prompt
  {"messages": [{"role": ..., "content": ...}, ...]}   rendered with the tokenizer's chat
                                           template; only the assistant turns are learned
Labels follow the Hugging Face convention: aligned with input_ids (the model shifts them), and
IGNORE (-100) where no loss is taken.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

IGNORE = -100
DATA_SUFFIXES = (".jsonl", ".json", ".jsonlines")


class DataError(ValueError):
    """Bad training data; the message names the file and line."""


@dataclass
class Record:
    source: str  # file path
    line: int  # 1-based
    data: dict[str, Any]

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]

    @property
    def num_target_tokens(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE)


def find_data_files(path: str | Path) -> list[Path]:
    """A file as given, or every JSON-lines file under a folder (sorted, so order is stable)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES)
        if not files:
            raise DataError(f"{path}: no {'/'.join(DATA_SUFFIXES)} files in this folder")
        return files
    raise DataError(f"{path}: no such file or folder")


def read_records(files: list[Path]) -> list[Record]:
    records: list[Record] = []
    for file in files:
        count = 0
        with open(file, encoding="utf-8") as f:
            for number, text in enumerate(f, start=1):
                if not text.strip():
                    continue
                try:
                    data = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{file}:{number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
                record = Record(str(file), number, data)
                check_record(record)
                records.append(record)
                count += 1
        if count == 0:
            raise DataError(f"{file}: empty file (no JSON-lines records)")
    return records


def check_record(rec: Record) -> None:
    data = rec.data
    if not isinstance(data, dict):
        raise DataError(f"{rec.where}: a record must be a JSON object, got {type(data).__name__}")
    if "messages" in data:
        messages = data["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{rec.where}: 'messages' must be a non-empty list")
        for i, m in enumerate(messages):
            if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
                raise DataError(f"{rec.where}: messages[{i}] must be an object with string 'role' and 'content'")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{rec.where}: no assistant message to learn from")
        return
    if "prompt" in data and "completion" in data:
        if not isinstance(data["prompt"], str) or not isinstance(data["completion"], str):
            raise DataError(f"{rec.where}: 'prompt' and 'completion' must be strings")
        if not data["completion"]:
            raise DataError(f"{rec.where}: 'completion' is empty")
        return
    keys = ", ".join(sorted(map(str, data))) or "none"
    raise DataError(f"{rec.where}: a record needs 'prompt' and 'completion', or 'messages' (keys found: {keys})")


def tokenize_record(tokenizer: Any, rec: Record, max_seq_len: int) -> Example:
    if "messages" in rec.data:
        ex = _tokenize_chat(tokenizer, rec)
    else:
        ex = _tokenize_prompt_completion(tokenizer, rec)
    return Example(ex.input_ids[:max_seq_len], ex.labels[:max_seq_len])


def _ids(tokenizer: Any, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _tokenize_prompt_completion(tokenizer: Any, rec: Record) -> Example:
    # Tokenized apart, so the prompt's ids are exactly what serving will see for that prompt.
    prompt = _ids(tokenizer, rec.data["prompt"], special=True)
    completion = _ids(tokenizer, rec.data["completion"], special=False)
    eos = tokenizer.eos_token_id
    if eos is not None and (not completion or completion[-1] != eos):
        completion.append(eos)  # teach the model to stop
    return Example(prompt + completion, [IGNORE] * len(prompt) + completion)


def _render(tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return _ids(tokenizer, text, special=False)  # the template wrote the special tokens


def _tokenize_chat(tokenizer: Any, rec: Record) -> Example:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{rec.where}: 'messages' records need a tokenizer with a chat template")
    messages = rec.data["messages"]
    ids = _render(tokenizer, messages, generation_prompt=False)
    labels = [IGNORE] * len(ids)
    # Each assistant turn is the span between the conversation before it (with the generation
    # prompt, i.e. what serving sends) and the conversation through it (its content + end marker).
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0:
            raise DataError(f"{rec.where}: messages[0] is an assistant turn; start with a system or user message")
        start = len(_render(tokenizer, messages[:i], generation_prompt=True))
        through = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if through != ids[: len(through)] or start > len(through):
            raise DataError(f"{rec.where}: the chat template does not render messages[{i}] as an extension "
                            "of the conversation before it; cannot tell which tokens are the assistant's")
        labels[start : len(through)] = ids[start : len(through)]
    return Example(ids, labels)


def load_examples(path: str | Path, tokenizer: Any, max_seq_len: int) -> list[Example]:
    """Read, check and tokenize every record under `path`; raises DataError with file:line."""
    files = find_data_files(path)
    records = read_records(files)
    examples = []
    for rec in records:
        ex = tokenize_record(tokenizer, rec, max_seq_len)
        if ex.num_target_tokens == 0:
            log.warning("%s: no completion tokens within max-seq-len=%d; record skipped", rec.where, max_seq_len)
            continue
        examples.append(ex)
    if not examples:
        raise DataError(f"{path}: no record has completion tokens within max-seq-len={max_seq_len}")
    return examples


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch to its longest example."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
