"""Tokenizer facade: an HF fast tokenizer from a local folder, or a byte-level one for dummy models."""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from kvscope.errors import ModelLoadError, RequestError

BYTE_LEVEL_EOS = "<|endoftext|>"
BYTE_LEVEL_EOS_ID = 256


class Tokenizer:
    """Text <-> token ids for one model.

    Args:
        hf_tokenizer: a transformers fast tokenizer.
        eos_token_ids: stop ids besides the tokenizer's own eos (e.g. from config.json).
        vocab_size: size of the model's id space when it exceeds the tokenizer's (padded
            embeddings, random dummy models); ids the tokenizer does not know decode to nothing.
    """

    def __init__(self, hf_tokenizer: Any, eos_token_ids: Iterable[int] = (), vocab_size: int | None = None) -> None:
        self._tok = hf_tokenizer
        self._known = len(hf_tokenizer)
        own = [hf_tokenizer.eos_token_id] if hf_tokenizer.eos_token_id is not None else []
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys([*own, *eos_token_ids]))
        self.vocab_size: int = max(self._known, vocab_size or 0)
        # transformers' decode adds ~4 us of argument handling per call around the Rust decode, and
        # streaming decodes twice per token per request; when it would not clean up spaces
        # afterwards, the Rust decode alone gives the same text.
        backend = getattr(hf_tokenizer, "backend_tokenizer", None)
        self._raw_decode = (backend.decode if backend is not None
                            and not getattr(hf_tokenizer, "clean_up_tokenization_spaces", True) else None)

    @classmethod
    def from_pretrained(
        cls, folder: str | Path, eos_token_ids: Iterable[int] = (), vocab_size: int | None = None
    ) -> Tokenizer:
        """Load the tokenizer files (tokenizer.json, tokenizer_config.json, ...) of a local folder."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoTokenizer

        try:
            tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as e:  # transformers raises many types (OSError, ValueError, JSON errors)
            raise ModelLoadError(f"cannot load the tokenizer of {folder}: {type(e).__name__}: {e}") from e
        if not getattr(tok, "is_fast", False):
            raise ModelLoadError(f"{folder}: only fast (tokenizer.json) tokenizers are supported")
        return cls(tok, eos_token_ids, vocab_size)

    @classmethod
    def byte_level(cls, vocab_size: int) -> Tokenizer:
        """Ids 0..255 are the UTF-8 bytes, 256 is ``<|endoftext|>`` (eos); for models of ``vocab_size`` >= 257."""
        if vocab_size <= BYTE_LEVEL_EOS_ID:
            raise ModelLoadError(f"a byte-level tokenizer needs vocab_size > {BYTE_LEVEL_EOS_ID}, got {vocab_size}")
        from tokenizers import Tokenizer as RawTokenizer
        from tokenizers import decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        # ByteLevel pre-tokenization maps each byte to a printable stand-in character; with no merges,
        # every stand-in is one token, and its id is the byte value.
        vocab = {ch: b for b, ch in _bytes_to_unicode().items()}
        raw = RawTokenizer(models.BPE(vocab=vocab, merges=[]))
        raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        raw.decoder = decoders.ByteLevel()
        raw.add_special_tokens([BYTE_LEVEL_EOS])
        return cls(PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=BYTE_LEVEL_EOS), (), vocab_size)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text`` (with BOS etc. when the tokenizer adds them and ``add_special_tokens``)."""
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; ids outside the tokenizer's vocabulary are dropped."""
        known = [i for i in map(int, ids) if 0 <= i < self._known]
        if self._raw_decode is not None:
            return self._raw_decode(known, skip_special_tokens=skip_special_tokens)
        return self._tok.decode(known, skip_special_tokens=skip_special_tokens)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self._tok, "chat_template", None))

    def apply_chat_template(self, messages: list[dict[str, Any]]) -> list[int]:
        """Prompt ids of a conversation (``[{"role": ..., "content": ...}, ...]``), ending with the
        assistant turn header (add_generation_prompt)."""
        if not self.has_chat_template:
            raise RequestError("this model's tokenizer has no chat template; send a plain prompt instead")
        out = self._tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        return list(out["input_ids"])


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by ByteLevel pre-tokenizers/decoders."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table
