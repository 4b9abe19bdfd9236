"""Request models of the OpenAI-compatible API (pydantic), and OpenAI's error JSON.

Unknown fields are accepted and ignored, as OpenAI's own server does for forward compatibility; OpenAI's own
parameters that this server does not apply (penalties, logit_bias, best_of, suffix, echo) pass only at their
neutral values. An explicit null for an optional field means "not given" (OpenAI marks them nullable, and
clients send nulls). Values are checked here so that bad input is a 400 with one line naming the field, never
a 500.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_TOP_LOGPROBS = 20
MAX_N = 16
MAX_STOPS = 4
MAX_STOP_CHARS = 512          # per stop string: generous for real stops, and bounds the per-token stop search


def _utf8(s: str | None) -> str | None:
    return s if s is None or s.isascii() else s.encode("utf-8", "backslashreplace").decode("utf-8")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        # a lone surrogate quoted from the request (a key in a path) would make the error itself unencodable
        message, param = _utf8(message), _utf8(param)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# OpenAI parameters this server does not apply -> (their neutral values, what a client sending another is told):
# anything but a neutral value is a 400, since ignoring it would answer as if it had been applied
_PENALTY = ((None, 0), lambda v: f"penalties are not applied by this server (got {v}); drop it or send 0")
NOT_APPLIED = {
    "presence_penalty": _PENALTY,
    "frequency_penalty": _PENALTY,
    "logit_bias": ((None, {}), lambda v: "logit_bias is not applied by this server; drop it or send {}"),
    "best_of": ((None, 1), lambda v: f"best_of {v} is not supported by this server; use n for several completions"),
    "suffix": ((None, ""), lambda v: "suffix (insertion) is not supported by this server; drop it"),
    "echo": ((None, False), lambda v: "echo (the prompt returned with the completion) is not supported by this "
                                      "server; drop it or send false"),
}


class _Base(BaseModel):
    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _null_is_absent(cls, data):
        # `"temperature": null` is the field left out (its default), as in OpenAI's API; a null for a required
        # field (model, messages, prompt) stays, and is refused by name
        if isinstance(data, dict):
            fields = cls.model_fields
            return {k: v for k, v in data.items() if v is not None or k not in fields or fields[k].is_required()}
        return data


class StreamOptions(_Base):
    include_usage: bool = False


class Sampling(_Base):
    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: Optional[int] = Field(None, ge=-(2 ** 63), le=2 ** 63 - 1 - MAX_N)
    stop: Optional[Union[str, list[str]]] = None
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    ignore_eos: bool = False
    presence_penalty: Optional[float] = None           # NOT_APPLIED: neutral values only
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, Any]] = None

    @field_validator(*NOT_APPLIED, check_fields=False)   # (best_of, suffix: CompletionRequest's fields)
    @classmethod
    def _not_applied(cls, v, info):
        neutral, why = NOT_APPLIED[info.field_name]
        if v not in neutral:
            raise ValueError(why(v))
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if v is None:
            return []
        v = [v] if isinstance(v, str) else v
        if len(v) > MAX_STOPS or any(not s for s in v):
            raise ValueError(f"stop takes up to {MAX_STOPS} non-empty strings")
        long = max(len(s) for s in v)
        if long > MAX_STOP_CHARS:
            raise ValueError(f"stop strings are limited to {MAX_STOP_CHARS} characters each (got one of {long:,}); "
                             "send shorter stop strings")
        return v


class ChatPromptFields(_Base):
    """What decides a chat prompt (chat_prompt.py): shared by /v1/chat/completions and /tokenize."""
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Union[Literal["none", "auto", "required"], dict[str, Any]]] = None
    response_format: Optional[dict[str, Any]] = None
    thinking: Optional[Union[bool, dict[str, Any]]] = None
    reasoning_effort: Optional[str] = None

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _tool_choice(cls, v):
        shape = 'tool_choice must be "none", "auto", "required" or {"type": "function", "function": {"name": "..."}}'
        if v is None or v in ("none", "auto", "required"):
            return v
        if not isinstance(v, dict):
            raise ValueError(f"{shape}, got {v!r:.60}")
        fn = v.get("function")
        if v.get("type", "function") != "function" or not isinstance(fn, dict) or \
                not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"{shape}, got {v!r:.80}")
        return v


class ChatRequest(Sampling, ChatPromptFields):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class CompletionRequest(Sampling):
    prompt: Union[str, list[int]]
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: Optional[bool] = None                        # NOT_APPLIED: neutral values only
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and all(isinstance(p, (str, list)) for p in v):
            raise ValueError("one prompt per request: a string or a list of token ids (batches of prompts are not "
                             "taken; send them as separate requests)")
        return v

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt is an empty token list")
        return v


class TokenizeRequest(ChatPromptFields):
    """`prompt` (a plain text), or `messages` with the chat fields: the ids /v1/chat/completions would feed."""
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[dict[str, Any]]] = None
    add_special_tokens: bool = True


class DetokenizeRequest(_Base):
    model: Optional[str] = None
    tokens: list[int]
