"""Text → token ids for the models given with `--tokenizer MODEL=PATH`.

Engines report what they cache as token ids; a gateway without a tokenizer sends text. With the
model's own `tokenizer.json` (Hugging Face `tokenizers`, special tokens added as the engine adds
them) the router cuts text requests into the same token blocks as the engine's events, so both
name the same tree nodes. Models without a tokenizer keep text-block routing.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer


class Tokenizers:
    """One loaded tokenizer per model name; loading happens once, at startup."""

    def __init__(self, paths: dict[str, str]) -> None:
        self._by_model: dict[str, Tokenizer] = {}
        for model, path in paths.items():
            file = Path(path)
            if file.is_dir():
                file = file / "tokenizer.json"
            try:
                self._by_model[model] = Tokenizer.from_file(str(file))
            except Exception as exc:  # the library raises its own exception type
                raise ValueError(f"--tokenizer {model}={path}: cannot load {file}: {exc}") from None

    def __contains__(self, model: str) -> bool:
        return model in self._by_model

    def __bool__(self) -> bool:
        return bool(self._by_model)

    def encode(self, model: str, text: str) -> list[int]:
        """Token ids of `text` with `model`'s tokenizer (KeyError for a model without one)."""
        return list(self._by_model[model].encode(text, add_special_tokens=True).ids)
