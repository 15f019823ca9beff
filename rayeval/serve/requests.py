"""The gateway's request models (pydantic v2): what ``POST /v1/chat/completions`` and ``POST
/v1/route`` accept, declared once instead of validated by hand.

A body that does not fit gets OpenAI's error shape from the ingress: HTTP 400, ``type:
invalid_request_error``, a message naming the field (``messages.0.role: Input should be ...``)
and a stable ``code`` per field (:func:`error_code`).  Fields OpenAI clients send that rayeval
does not use (``user``, ``logprobs`` ...) are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

Number = Union[StrictInt, StrictFloat]


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "user", "assistant", "developer"]
    content: Union[StrictStr, list[TextPart]]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(BaseModel):
    """An OpenAI chat-completions request, text only, one choice."""

    model_config = ConfigDict(extra="ignore")
    model: Annotated[StrictStr, Field(min_length=1)]
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Optional[StrictInt] = None
    max_completion_tokens: Optional[StrictInt] = None  # OpenAI's newer name; wins over max_tokens
    temperature: Optional[Annotated[Number, Field(ge=0, le=2)]] = 0.0
    top_p: Optional[Annotated[Number, Field(gt=0, le=1)]] = 1.0
    stream: StrictBool = False
    n: Optional[Literal[1]] = 1
    stop: Union[StrictStr, list[StrictStr], None] = None
    seed: Optional[StrictInt] = None
    stream_options: Optional[dict] = None


# The first failing field names the error code (kept stable for clients; tests pin them).
_CODES = {"model": "missing_model", "messages": "empty_messages", "max_tokens": "invalid_max_tokens",
          "max_completion_tokens": "invalid_max_tokens", "temperature": "invalid_temperature",
          "top_p": "invalid_top_p", "stream": "invalid_stream", "n": "invalid_n", "stop": "invalid_stop",
          "seed": "invalid_seed", "stream_options": "invalid_request"}


def error_code(loc: tuple) -> str:
    """The OpenAI-style error code for a pydantic error location."""
    if loc and loc[0] == "messages" and len(loc) >= 2:
        if len(loc) == 2:
            return "invalid_message"  # an entry that is not an object
        return {"role": "invalid_role", "content": "invalid_content"}.get(loc[2], "invalid_message")
    return _CODES.get(loc[0] if loc else "", "invalid_request")


def first_error(e: ValidationError) -> tuple[str, str]:
    """(code, message) for the first problem of a validation error, the message path-qualified."""
    err = e.errors(include_url=False)[0]
    loc = tuple(err.get("loc") or ())
    # up to the field itself: pydantic appends the union member it tried (``content.str``)
    field = loc[:3] if loc[:1] == ("messages",) else loc[:1]
    where = ".".join(str(x) for x in field) or "body"
    return error_code(loc), f"{where}: {err.get('msg')}"
