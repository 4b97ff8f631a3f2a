"""Request and response models of the HTTP protocols, and their one translation into
`runtime.request` types. Pydantic lives here, at the edge, and nowhere in the runtime."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..runtime.request import SamplingParams

MAX_STOP_STRINGS = 64
MAX_STOP_LENGTH = 256
MAX_N = 16


class _Lenient(BaseModel):
    # Unknown fields are ignored, as vLLM and OpenAI-compatible servers do, so clients that
    # send newer OpenAI fields keep working.
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Lenient):
    include_usage: bool = False


class _SamplingFields(_Lenient):
    model: str | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    seed: int | None = None
    user: str | None = None
    # Extensions that vLLM also accepts.
    top_k: Annotated[int, Field(ge=-1)] = 0
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    repetition_penalty: Annotated[float, Field(gt=0.0, le=10.0)] = 1.0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings are allowed")
        for s in stops:
            if not s:
                raise ValueError("stop strings must not be empty")
            if len(s) > MAX_STOP_LENGTH:
                raise ValueError(f"stop strings must be at most {MAX_STOP_LENGTH} characters")
        return stops

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature,
            top_k=max(self.top_k, 0),
            top_p=self.top_p,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            seed=self.seed,
            max_tokens=max_tokens,
            ignore_eos=self.ignore_eos,
            stop=list(self.stop or []),
            stop_token_ids=list(self.stop_token_ids or []),
            include_stop_str_in_output=self.include_stop_str_in_output,
            logprobs=logprobs,
            skip_special_tokens=self.skip_special_tokens,
        )


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be empty")
        return value

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


class ContentPart(_Lenient):
    type: Literal["text"]
    text: str


class ChatMessage(_Lenient):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def as_template_input(self) -> dict[str, str]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": content or ""}


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None


# -- TGI (and the TGI / LMI bodies SageMaker endpoints receive) ---------------------

TGI_DEFAULT_MAX_NEW_TOKENS = 100  # TGI's default when a request gives none
TGI_MAX_TOP_N_TOKENS = 20


class TGIParameters(_Lenient):
    """TGI's `parameters` object; LMI's spelling `stop_sequences` is accepted for `stop`.
    Semantics follow TGI except `do_sample`: false means greedy, whatever the temperature
    (as Hugging Face `generate` and LMI do)."""

    do_sample: bool = False
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    typical_p: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: str | list[str] | None = Field(default=None, validation_alias=AliasChoices("stop", "stop_sequences"))
    seed: int | None = None
    details: bool = False
    decoder_input_details: bool = False
    return_full_text: bool | None = None
    top_n_tokens: int | None = None
    truncate: int | None = None
    best_of: int | None = None
    watermark: bool = False
    grammar: Any = None
    adapter_id: str | None = None

    @field_validator("max_new_tokens")
    @classmethod
    def _max_new_tokens(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError("`max_new_tokens` must be strictly positive")
        return v

    @field_validator("temperature")
    @classmethod
    def _temperature(cls, v: float | None) -> float | None:
        if v is not None and not v >= 0:  # 0 is taken as greedy rather than refused
            raise ValueError("`temperature` must be strictly positive")
        return v

    @field_validator("top_k")
    @classmethod
    def _top_k(cls, v: int | None) -> int | None:
        if v is not None and v < 0:
            raise ValueError("`top_k` must be strictly positive")
        return v

    @field_validator("top_p")
    @classmethod
    def _top_p(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 < v <= 1.0:
            raise ValueError("`top_p` must be > 0.0 and <= 1.0")
        return v

    @field_validator("typical_p")
    @classmethod
    def _typical_p(cls, v: float | None) -> float | None:
        if v is not None and v != 1.0:
            raise ValueError("`typical_p` is not supported by this server")
        return v

    @field_validator("repetition_penalty")
    @classmethod
    def _repetition_penalty(cls, v: float | None) -> float | None:
        if v is not None and not v > 0:
            raise ValueError("`repetition_penalty` must be strictly positive")
        return v

    @field_validator("frequency_penalty")
    @classmethod
    def _frequency_penalty(cls, v: float | None) -> float | None:
        if v is not None and not -2.0 <= v <= 2.0:
            raise ValueError("`frequency_penalty` must be >= -2.0 and <= 2.0")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"`stop_sequences` must have less than {MAX_STOP_STRINGS + 1} elements. "
                             f"Given: {len(stops)}")
        for s in stops:
            if not s:
                raise ValueError("stop sequences must not be empty")
            if len(s) > MAX_STOP_LENGTH:
                raise ValueError(f"stop sequences must be at most {MAX_STOP_LENGTH} characters")
        return stops

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int | None) -> int | None:
        if v is not None and not 0 <= v < 2**64:
            raise ValueError("`seed` must be a non-negative 64-bit integer")
        return v

    @field_validator("top_n_tokens")
    @classmethod
    def _top_n_tokens(cls, v: int | None) -> int | None:
        if v is not None and not 0 <= v <= TGI_MAX_TOP_N_TOKENS:
            raise ValueError(f"`top_n_tokens` must be >= 0 and <= {TGI_MAX_TOP_N_TOKENS}")
        return v

    @field_validator("truncate")
    @classmethod
    def _truncate(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError("`truncate` must be strictly positive")
        return v

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, v: int | None) -> int | None:
        if v is not None and v != 1:
            raise ValueError("`best_of` > 1 is not supported by this server; send several "
                             "requests with do_sample and different seeds")
        return v

    @field_validator("watermark")
    @classmethod
    def _watermark(cls, v: bool) -> bool:
        if v:
            raise ValueError("`watermark` is not supported by this server")
        return v

    @field_validator("grammar")
    @classmethod
    def _grammar(cls, v: Any) -> Any:
        if v is not None:
            raise ValueError("`grammar` (guided generation) is not supported by this server")
        return v

    @field_validator("decoder_input_details")
    @classmethod
    def _decoder_input_details(cls, v: bool) -> bool:
        if v:
            raise ValueError("`decoder_input_details` (prompt token logprobs) is not supported by this server")
        return v

    @property
    def sampling(self) -> bool:
        """Whether tokens are drawn at random (else greedy)."""
        return self.do_sample and (self.temperature is None or self.temperature > 0)

    def sampling_params(self, max_new_tokens: int, seed: int | None) -> SamplingParams:
        """The runtime parameters of this request. The stop sequence stays in the output, as
        TGI keeps it; every token carries its logprob (and the top N when asked)."""
        sample = self.sampling
        return SamplingParams(
            temperature=(1.0 if self.temperature is None else self.temperature) if sample else 0.0,
            top_k=(self.top_k or 0) if sample else 0,
            top_p=(1.0 if self.top_p is None else self.top_p) if sample else 1.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            frequency_penalty=self.frequency_penalty or 0.0,
            seed=seed if sample else None,
            max_tokens=max_new_tokens,
            stop=list(self.stop or []),
            include_stop_str_in_output=True,
            logprobs=self.top_n_tokens or 0,
            skip_special_tokens=True,
        )


class TGIRequest(_Lenient):
    """TGI's /generate, /generate_stream, / and /tokenize body."""

    inputs: str
    parameters: TGIParameters | None = None
    stream: bool = False

    @field_validator("inputs")
    @classmethod
    def _inputs(cls, v: str) -> str:
        if not v:
            raise ValueError("`inputs` cannot be empty")
        return v

    @property
    def params(self) -> TGIParameters:
        if self.parameters is None:
            self.parameters = TGIParameters()
        return self.parameters

    def prompts(self) -> list[str]:
        return [self.inputs]

    def adapter_ids(self) -> list[str | None]:
        """The adapter of each prompt (`parameters.adapter_id`); None or '' is the base model."""
        return [self.params.adapter_id or None] * len(self.prompts())


class LMIRequest(TGIRequest):
    """The TGI / LMI body of SageMaker's /invocations: `inputs` may also be a batch of
    prompts (answered without streaming, one result per prompt)."""

    inputs: str | list[str]  # type: ignore[assignment]
    # LMI's adapter choice: one name for every prompt, or one per prompt of a batch.
    adapters: str | list[str] | None = None

    @field_validator("inputs")
    @classmethod
    def _inputs(cls, v: str | list[str]) -> str | list[str]:
        if not v or (isinstance(v, list) and not all(v)):
            raise ValueError("`inputs` cannot be empty")
        return v

    def prompts(self) -> list[str]:
        return [self.inputs] if isinstance(self.inputs, str) else list(self.inputs)

    def adapter_ids(self) -> list[str | None]:
        n = len(self.prompts())
        if self.adapters is None:
            return super().adapter_ids()
        if isinstance(self.adapters, str):
            return [self.adapters or None] * n
        if len(self.adapters) != n:
            raise ValueError(f"`adapters` has {len(self.adapters)} names for {n} inputs")
        return [a or None for a in self.adapters]


def tgi_validation_message(exc: ValidationError) -> str:
    """One line in TGI's words: 'Input validation error: `field`: why'."""
    errors = exc.errors()
    if not errors:
        return "Input validation error: invalid request"
    first = errors[0]
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    loc = [str(p) for p in first.get("loc", ()) if p != "parameters"]
    # pydantic tags union members in the location (`str`, `list[str]`); keep the field names.
    loc = [p for p in loc if p not in ("str", "int", "float", "bool", "list", "dict") and "[" not in p]
    if first.get("type") == "missing":
        msg = "field required"
    field = ".".join(loc)
    if field and f"`{field}`" not in msg and f"`{loc[-1]}`" not in msg:
        msg = f"`{field}`: {msg}"
    return f"Input validation error: {msg}"


# -- responses -----------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kiln"
    max_model_len: int
    root: str | None = None  # where the weights were read from
    parent: str | None = None  # for a LoRA adapter: its base model


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
