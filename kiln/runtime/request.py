"""Plain data that flows between the server and the engine.

Every protocol (OpenAI, TGI, SageMaker, gRPC) is translated into these types once, at the
edge; the engine never knows which protocol asked.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the model's context reached
    ABORT = "abort"  # cancelled by the client or the server
    ERROR = "error"  # the request could not be served


@dataclass
class SamplingParams:
    """Per-request sampling settings; one batch mixes any combination of them.

    temperature == 0 means greedy. top_k <= 0 and top_p == 1 and min_p == 0 disable
    those filters. Penalties equal to their neutral value (1, 0, 0) are off.
    """

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    ignore_eos: bool = False
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # None: no logprobs; N >= 0: sampled token plus top-N
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError with a user-facing message for any out-of-range setting."""
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be in [0, 20], got {self.logprobs}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.frequency_penalty != 0.0
            or self.presence_penalty != 0.0
        )


@dataclass
class TokenLogprob:
    """The log-probability of one generated token and its top alternatives."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # (token id, logprob), best first


_request_counter = itertools.count()


def new_request_id(prefix: str = "req") -> str:
    return f"{prefix}-{next(_request_counter)}-{time.time_ns() & 0xFFFFFFFF:08x}"


@dataclass
class Request:
    """A tokenized prompt and how to continue it. Mutable engine state lives in Sequence."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    prompt: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    lora_name: str | None = None  # a loaded LoRA adapter; None: the base model


@dataclass
class RequestOutput:
    """One delta of a request's stream: what is new since the previous delta.

    `finished` is set on the last delta, with `finish_reason` (and `stop_reason`, the stop
    string or token id that matched, when one did).
    """

    request_id: str
    new_text: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob] | None
    num_prompt_tokens: int
    num_generated_tokens: int
    finished: bool = False
    finish_reason: FinishReason | None = None
    stop_reason: str | int | None = None
    error: str | None = None
    num_cached_prompt_tokens: int = 0
