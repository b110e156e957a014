"""Text <-> token ids for artifacts, from the tokenizer files they carry (no transformers needed).

``Tokenizer`` wraps a ``tokenizers.Tokenizer`` (tokenizer.json) and renders the chat template of
tokenizer_config.json / chat_template.jinja with Jinja2, as transformers does. ``StreamDecoder`` turns tokens
into text pieces as they are generated, holding back incomplete UTF-8 sequences.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llmc.errors import ModelError


class Tokenizer:
    """Encode/decode with a tokenizer.json; ``chat`` renders the model's chat template when it has one."""

    def __init__(
        self, tokenizer_json: Path, *, config: dict[str, Any] | None = None, chat_template: str | None = None
    ):
        from tokenizers import Tokenizer as _Tokenizer

        try:
            self._tk = _Tokenizer.from_file(str(tokenizer_json))
        except Exception as exc:
            raise ModelError(f"cannot read tokenizer {tokenizer_json}: {exc}") from None
        self._tk.no_padding()  # prompts are encoded one at a time; padding (MiniLM pads to 128) is the caller's
        self.config = config or {}
        self.chat_template = chat_template or self.config.get("chat_template")

    @classmethod
    def from_files(cls, files: Mapping[str, Path]) -> Tokenizer:
        """From an asset mapping (file name -> path); needs ``tokenizer.json``."""
        if "tokenizer.json" not in files:
            raise ModelError("no tokenizer.json among the model's files: pass token ids instead of text")
        config_path = files.get("tokenizer_config.json")
        config = json.loads(Path(config_path).read_text()) if config_path else {}
        template_path = files.get("chat_template.jinja")
        template = Path(template_path).read_text() if template_path else None
        return cls(Path(files["tokenizer.json"]), config=config, chat_template=template)

    @classmethod
    def from_dir(cls, folder: Path) -> Tokenizer:
        folder = Path(folder)
        names = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
        return cls.from_files({n: folder / n for n in names if (folder / n).is_file()})

    @property
    def vocab_size(self) -> int:
        return self._tk.get_vocab_size()

    def token_id(self, token: str | None) -> int | None:
        return None if token is None else self._tk.token_to_id(token)

    def _special(self, key: str) -> str | None:
        value = self.config.get(key)
        return value.get("content") if isinstance(value, dict) else value

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self._tk.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [list(e.ids) for e in self._tk.encode_batch(list(texts))]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self._tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def chat(self, prompt: str, *, system: str | None = None) -> str:
        """The prompt wrapped in the chat template as a user turn, with the generation prompt appended."""
        if not self.chat_template:
            raise ModelError("this model has no chat template: drop --chat and pass the raw prompt")
        import jinja2.sandbox

        def raise_exception(message: str) -> None:
            raise ModelError(f"chat template: {message}")

        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": prompt}
        ]
        return env.from_string(self.chat_template).render(
            messages=messages,
            add_generation_prompt=True,
            bos_token=self._special("bos_token") or "",
            eos_token=self._special("eos_token") or "",
        )


class StreamDecoder:
    """Feeds generated tokens one at a time and returns the new text each adds (``""`` while incomplete)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # the token ends inside a multi-byte character: wait for the rest
            return ""
        piece, self.emitted = text[self.emitted :], len(text)
        return piece
