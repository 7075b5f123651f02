"""Tokenizer and chat template, from the same source as the weights (HF directory or GGUF).

GGUF files carry a byte-level BPE vocabulary (`tokenizer.ggml.tokens`, `merges`,
`token_type`) and a Jinja chat template; we rebuild a `tokenizers` BPE from them the way
GPT-2 style tokenizers are defined (byte-level pre-tokenizer without a prefix space), so
the ids equal HF transformers' for the same file.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from functools import cached_property

import jinja2
import jinja2.sandbox
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

# llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
_CONTROL, _USER_DEFINED = 3, 4


class ChatTemplateError(ValueError):
    """The chat template could not render the given messages."""


class TextTokenizer:
    """Text <-> token ids, plus the chat template and the special ids the engine needs."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        chat_template: str | None,
        bos_token_id: int | None,
        eos_token_ids: Sequence[int],
        add_bos: bool = False,
    ):
        self._tok = tokenizer
        self.chat_template = chat_template
        self.bos_token_id = bos_token_id
        self.eos_token_ids = tuple(eos_token_ids)
        self.add_bos = add_bos

    # ---- construction --------------------------------------------------------------------

    @classmethod
    def from_gguf_fields(cls, fields: dict) -> TextTokenizer:
        """Build from the `tokenizer.*` metadata of a GGUF file (see `engine.loader.gguf`)."""
        kind = fields.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"GGUF tokenizer type {kind!r} is not supported (only 'gpt2' BPE)")
        tokens: list[str] = fields["tokenizer.ggml.tokens"]
        types: list[int] = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
        vocab = {t: i for i, t in enumerate(tokens)}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        specials = [
            AddedToken(t, special=True, normalized=False)
            for t, ty in zip(tokens, types)
            if ty in (_CONTROL, _USER_DEFINED)
        ]
        tok.add_special_tokens(specials)
        eos = fields.get("tokenizer.ggml.eos_token_id")
        bos = fields.get("tokenizer.ggml.bos_token_id")
        return cls(
            tok,
            fields.get("tokenizer.chat_template"),
            bos,
            [eos] if eos is not None else [],
            add_bos=bool(fields.get("tokenizer.ggml.add_bos_token", False)),
        )

    @classmethod
    def from_hf_dir(cls, path: str, eos_token_ids: Sequence[int] = ()) -> TextTokenizer:
        """Build from `tokenizer.json` + `tokenizer_config.json` of an HF model directory."""
        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.exists(tok_file):
            raise FileNotFoundError(f"{path} has no tokenizer.json")
        tok = Tokenizer.from_file(tok_file)
        cfg: dict = {}
        cfg_file = os.path.join(path, "tokenizer_config.json")
        if os.path.exists(cfg_file):
            with open(cfg_file) as f:
                cfg = json.load(f)
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)

        def token_id(name: str) -> int | None:
            value = cfg.get(name)
            if isinstance(value, dict):
                value = value.get("content")
            return tok.token_to_id(value) if value else None

        eos = list(eos_token_ids) or [i for i in [token_id("eos_token")] if i is not None]
        return cls(tok, template, token_id("bos_token"), eos,
                   add_bos=bool(cfg.get("add_bos_token", False)))

    # ---- use -----------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @cached_property
    def fingerprint(self) -> str:
        """A digest of the vocabulary, merges and special ids: part of the content key, so
        that two sides whose same token ids mean different text never share KV."""
        h = hashlib.sha256(self._tok.to_str().encode())
        h.update(json.dumps([self.bos_token_id, list(self.eos_token_ids), self.add_bos]).encode())
        return "tok:" + h.hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True):
        """Render chat messages (`{"role", "content"}` dicts) to the prompt text."""
        if not self.chat_template:
            raise ChatTemplateError("this model has no chat template; send a plain prompt")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str) or not m.get(
                "role"
            ):
                raise ChatTemplateError(f"message {i} needs a 'role' and a string 'content'")
        try:
            return self._template.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=self._token_text(self.bos_token_id),
                eos_token=self._token_text(self.eos_token_ids[0] if self.eos_token_ids else None),
            )
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"chat template failed: {e}") from e

    @cached_property
    def _template(self) -> jinja2.Template:
        # Sandboxed: templates come with model files and must not reach Python internals.
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(msg: str):
            raise jinja2.TemplateError(msg)

        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template)

    def _token_text(self, token_id: int | None) -> str:
        return self._tok.id_to_token(token_id) if token_id is not None else ""
