"""The model's tokenizer: encoding, chat templates, and the fast backend for decoding."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tokenizers


class Tokenizer:
    def __init__(self, folder: Path) -> None:
        from transformers import AutoTokenizer

        self.hf = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
        self.backend: tokenizers.Tokenizer = self.hf.backend_tokenizer
        self.vocab_size = len(self.hf)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str:
        return self.backend.id_to_token(token_id) or ""

    def encode_with_offsets(self, text: str) -> list[tuple[int, int, int]]:
        """(token id, start, stop) per token, offsets in characters of `text`; the same
        ids as `encode`. Special tokens added by the tokenizer span (0, 0)."""
        enc = self.hf(text, return_offsets_mapping=True)
        return [(tid, start, stop) for tid, (start, stop) in zip(enc["input_ids"], enc["offset_mapping"])]

    @property
    def special_ids(self) -> frozenset[int]:
        """Ids of the special tokens (EOS, chat markers...)."""
        ids = getattr(self, "_special_ids", None)
        if ids is None:
            ids = self._special_ids = frozenset(self.hf.all_special_ids)
        return ids

    @property
    def has_chat_template(self) -> bool:
        return bool(self.hf.chat_template)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        if not self.has_chat_template:
            raise ValueError("this model has no chat template; use /v1/completions")
        return self.hf.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, tokenize=False
        )

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        # The template already wrote the special tokens: do not add them twice.
        return self.hf.encode(self.apply_chat_template(messages), add_special_tokens=False)
