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
