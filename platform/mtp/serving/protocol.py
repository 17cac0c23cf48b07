"""The OpenAI completions protocol: request validation, errors, response bodies.

Plain pydantic and dataclasses, no Ray: the ingress parses and answers with
these, and the model replica raises the same errors. Every rejection is an ``APIError``
whose body is OpenAI's ``{"error": {"message", "type", "param", "code"}}`` with
``param`` naming the offending field, so existing clients surface it unchanged.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from mtp.decoding.api import Generation, SamplingParams

MAX_STOP_SEQUENCES = 4
MAX_SEED = 2**63 - 1


class APIError(Exception):
    """A request that cannot be served, with the HTTP status and the field to blame."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        type: str = "invalid_request_error",
        code: str | None = None,
    ) -> None:
        super().__init__(status, message, param, type, code)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def __str__(self) -> str:
        return f"{self.status} {self.message}"

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


Number = StrictFloat | StrictInt
NonEmptyStr = Annotated[StrictStr, Field(min_length=1)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: StrictBool = False


class CompletionRequest(BaseModel):
    """``POST /v1/completions``; ``top_k`` and ``speculative`` extend OpenAI's fields."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: StrictStr | Annotated[list[StrictStr], Field(min_length=1)]
    model: StrictStr | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1)] = 16
    temperature: Annotated[Number, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[Number, Field(gt=0, le=1)] = 1.0
    top_k: Annotated[StrictInt, Field(ge=1)] | None = None
    n: Annotated[StrictInt, Field(ge=1)] = 1
    stop: NonEmptyStr | Annotated[list[NonEmptyStr], Field(max_length=MAX_STOP_SEQUENCES)] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    seed: Annotated[StrictInt, Field(ge=0, le=MAX_SEED)] | None = None
    speculative: StrictBool = True
    user: StrictStr | None = None

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def rows(self) -> list[tuple[str, SamplingParams]]:
        """One (prompt, params) per choice, in OpenAI's order (prompt-major, then n).

        With a seed, choice ``j`` of a prompt uses ``seed + j`` so that n samples
        differ but the whole response is reproducible.
        """
        out = []
        for prompt in self.prompts:
            for j in range(self.n):
                seed = None if self.seed is None else (self.seed + j) % (MAX_SEED + 1)
                params = SamplingParams(
                    max_new_tokens=self.max_tokens,
                    temperature=float(self.temperature),
                    top_k=self.top_k,
                    top_p=float(self.top_p),
                    stop=self.stop_list,
                    seed=seed,
                    speculative=self.speculative,
                )
                out.append((prompt, params))
        return out


def parse_completion_request(raw: bytes, max_tokens_cap: int, max_choices: int) -> CompletionRequest:
    """Bytes of a request body -> a validated request, or an APIError naming the field."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise APIError(400, f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    try:
        request = CompletionRequest.model_validate(data)
    except ValidationError as exc:
        raise _as_api_error(exc) from None
    if request.max_tokens > max_tokens_cap:
        raise APIError(400, f"max_tokens={request.max_tokens} exceeds this server's cap of {max_tokens_cap}",
                       "max_tokens", code="invalid_value")
    choices = len(request.prompts) * request.n
    if choices > max_choices:
        raise APIError(400, f"{choices} choices (prompts x n) exceed this server's cap of {max_choices}", "n",
                       code="invalid_value")
    if request.stream_options is not None and not request.stream:
        raise APIError(400, "stream_options is only allowed with stream=true", "stream_options")
    return request


def _as_api_error(exc: ValidationError) -> APIError:
    error = exc.errors()[0]
    loc = error["loc"]
    param = str(loc[0]) if loc else None
    if error["type"] == "extra_forbidden":
        return APIError(400, f"unrecognized request argument: {param}", param, code="unrecognized_argument")
    if error["type"] == "missing":
        return APIError(400, f"{param} is required", param, code="missing_required_parameter")
    if len(exc.errors()) > 1 and all(str(e["loc"][:1]) == str(loc[:1]) for e in exc.errors()):
        # a union field (prompt, stop): say what fits instead of one alternative's complaint
        expected = {"prompt": "a string or a non-empty list of strings",
                    "stop": f"a non-empty string or a list of at most {MAX_STOP_SEQUENCES} non-empty strings"}
        if param in expected:
            return APIError(400, f"{param} must be {expected[param]}", param, code="invalid_type")
    return APIError(400, f"{param}: {error['msg']} (got {error.get('input')!r})", param, code="invalid_value")


# ------------------------------------------------------------------------ responses


@dataclass
class Usage:
    """Token counts plus the speculative statistics summed over a request's choices."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    forwards: int = 0

    def add(self, generation: Generation) -> None:
        self.prompt_tokens += len(generation.prompt_tokens)
        self.completion_tokens += len(generation.tokens)
        self.forwards += generation.stats.forwards

    def body(self, speculative: bool) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "speculative": speculative,
            "forwards": self.forwards,
            "tokens_per_forward": round(self.completion_tokens / self.forwards, 4) if self.forwards else 0.0,
        }


def new_completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def completion_body(
    request: CompletionRequest, model: str, generations: list[Generation], completion_id: str
) -> dict[str, Any]:
    usage = Usage()
    choices = []
    for index, generation in enumerate(generations):
        usage.add(generation)
        choices.append({
            "index": index,
            "text": generation.text,
            "logprobs": None,
            "finish_reason": generation.finish_reason,
            "accepted_histogram": list(generation.stats.accepted_histogram),
        })
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
        "usage": usage.body(request.speculative),
    }


def chunk_body(
    completion_id: str,
    model: str,
    choices: list[dict[str, Any]],
    usage: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One SSE chunk: OpenAI streams ``text_completion`` objects with partial choices."""
    body = {
        "id": completion_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": choices,
    }
    if usage is not None:
        body["usage"] = usage
    return body


def stream_choice(index: int, text: str, finish_reason: Literal["stop", "length"] | None = None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


def sse(data: dict[str, Any] | str) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n"


SSE_DONE = sse("[DONE]")
