"""Typed errors that the CLI maps to exit codes.

A user error names where it happened (file, YAML line and column, pass, node) and says what to do. Anything
that is not one of these is a bug in llmc and shows a traceback only with ``--debug``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


class LlmcError(Exception):
    """Base of every error meant for a person; ``exit_code`` is what the CLI returns."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


@dataclass
class Location:
    """Where in a file something is: 1-based line and column, as editors show them."""

    file: Path | str | None = None
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        parts = [str(self.file) if self.file else "<spec>"]
        if self.line is not None:
            parts.append(str(self.line))
            if self.column is not None:
                parts.append(str(self.column))
        return ":".join(parts)


class SpecError(LlmcError):
    """The spec file is missing, malformed or asks for something that does not exist."""

    def __init__(self, message: str, *, location: Location | None = None, hint: str | None = None):
        self.location = location or Location()
        self.detail = message  # the message without its location, to re-raise it elsewhere
        super().__init__(f"{self.location}: {message}", hint=hint)


class ModelError(LlmcError):
    """The model cannot be read or imported (missing, truncated, not ONNX, cyclic, undefined inputs...)."""


class IRError(ModelError):
    """The IR is structurally broken; raised by the verifier and by illegal mutations."""

    def __init__(self, message: str, *, node: str | None = None, hint: str | None = None):
        self.node = node
        super().__init__(message if node is None else f"{message} (at node {node})", hint=hint)


class PassError(LlmcError):
    """A pass raised or left a broken graph; the dumps named in ``dumps`` stay on disk."""

    def __init__(
        self, pass_name: str, message: str, *, dumps: list[Path] | None = None, hint: str | None = None
    ):
        self.pass_name = pass_name
        self.detail = message  # without the "pass '<name>':" prefix
        self.dumps = dumps or []
        text = f"pass '{pass_name}': {message}"
        if self.dumps:
            text += "\n  IR dumps kept: " + ", ".join(str(d) for d in self.dumps)
        super().__init__(text, hint=hint)


class TargetError(LlmcError):
    """A target cannot emit or load an artifact (missing optional dependency, unsupported op...)."""


@dataclass
class Mismatch:
    """One output that missed its tolerance in a golden check."""

    output: str
    max_abs: float
    max_rel: float
    cosine: float
    detail: str = ""


class VerificationError(LlmcError):
    """The compiled model does not match the reference within the spec's tolerances."""

    exit_code = 1

    def __init__(self, message: str, *, table: list[Mismatch] | None = None, hint: str | None = None):
        self.table: list[Mismatch] = list(table or [])
        super().__init__(message, hint=hint)
