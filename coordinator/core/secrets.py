"""Secrets in the configuration: named where they live, never written in it.

A secret is ``{env: NAME}`` (an environment variable of the driver that loads
the config, or of the ``environ`` that ``load_config`` is given, which it
passes as the validation context) or ``{file: PATH}`` (a file's content,
surrounding whitespace removed). It is read once, when the config is
validated, and travels with the config to the actors (pickled, with its
value: an actor reads no environment of its own). What the config shows of it
— ``model_dump()``, JSON, ``repr()``, validation errors — is only the
reference; the value is reached with :meth:`Secret.reveal` and nowhere else.

A literal in the config (``token: s3cret``) is refused, without echoing it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, PrivateAttr, ValidationInfo, model_validator

REDACTED = "***"


class Secret(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, hide_input_in_errors=True)

    env: str | None = None
    file: Path | None = None
    _value: str = PrivateAttr(default="")

    @model_validator(mode="before")
    @classmethod
    def _not_a_literal(cls, data: Any) -> Any:
        if isinstance(data, (str, bytes, int, float)):
            raise ValueError("a secret is given as {env: NAME} or {file: PATH}, never in clear")
        return data

    @model_validator(mode="after")
    def _read(self, info: ValidationInfo) -> Self:
        if (self.env is None) == (self.file is None):
            raise ValueError("a secret needs exactly one of 'env' or 'file'")
        if self.env is not None:
            environ = (info.context or {}).get("environ") if isinstance(info.context, dict) else None
            value = (os.environ if environ is None else environ).get(self.env, "")
            if not value.strip():
                raise ValueError(f"environment variable {self.env} is not set or empty")
        else:
            try:
                value = Path(self.file).read_text()
            except (OSError, UnicodeDecodeError) as exc:
                raise ValueError(f"cannot read secret file {self.file}: {exc.__class__.__name__}") from None
            if not value.strip():
                raise ValueError(f"secret file {self.file} is empty")
        self._value = value.strip()
        return self

    def reveal(self) -> str:
        return self._value

    def __repr_args__(self):
        yield from ((k, v) for k, v in super().__repr_args__() if v is not None)
        yield "value", REDACTED

    def __str__(self) -> str:
        return REDACTED


def redact(text: str, secrets: list[str]) -> str:
    """``text`` with every occurrence of any of ``secrets`` replaced by ``***``."""
    for value in secrets:
        if value:
            text = text.replace(value, REDACTED)
    return text
