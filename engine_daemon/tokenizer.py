"""The model's tokenizer and chat template, from an HF directory or a GGUF file's metadata."""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

from engine_daemon.model_source import ModelSource, read_gguf_tokenizer_fields

# GGUF token types (llama.cpp): 3 = control, 4 = user-defined; both must never be split by BPE.
_GGUF_SPECIAL_TYPES = (3, 4)


class Tokenizer:
    def __init__(
        self,
        backend: Any,  # tokenizers.Tokenizer
        *,
        chat_template: str | None,
        bos_token: str | None,
        eos_token: str | None,
        eos_token_ids: tuple[int, ...],
        add_bos: bool,
    ) -> None:
        self.backend = backend
        self.chat_template = chat_template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.eos_token_ids = eos_token_ids
        self.add_bos = add_bos
        self.bos_token_id = backend.token_to_id(bos_token) if bos_token else None
        self._template = None
        self._token_bytes: list[bytes] | None = None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if self.add_bos and self.bos_token_id is not None and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The UTF-8 bytes a token stands for (a byte-level token may hold part of a character)."""
        if self._token_bytes is None:
            self._token_bytes = _vocab_bytes(self.backend)
        return self._token_bytes[token_id] if 0 <= token_id < len(self._token_bytes) else b""

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None) -> str:
        if not self.chat_template:
            raise ValueError("this model has no chat template; send a plain prompt instead of messages")
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            tools=tools,
        )

    def encode_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
        text = self.apply_chat_template(messages, tools=tools)
        # The template writes the BOS itself where the model wants one.
        return self.backend.encode(text, add_special_tokens=False).ids


_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _vocab_bytes(backend: Any) -> list[bytes]:
    """Every token's bytes: byte-level BPE spells bytes as printable characters (GPT-2's table);
    SentencePiece-style vocabularies write a space as "▁" and a raw byte as "<0xNN>"."""
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    byte_level = decoder.get("type") == "ByteLevel"
    specials = {token.content for token in backend.get_added_tokens_decoder().values()}
    table = _byte_level_table()
    vocab = [b""] * backend.get_vocab_size(with_added_tokens=True)
    for token, index in backend.get_vocab(with_added_tokens=True).items():
        if token in specials:
            vocab[index] = token.encode()
        elif byte_level:
            vocab[index] = bytes(table[c] for c in token if c in table)
        elif (match := _BYTE_TOKEN.fullmatch(token)) is not None:
            vocab[index] = bytes([int(match.group(1), 16)])
        else:
            vocab[index] = token.replace("\u2581", " ").encode()
    return vocab


@cache
def _byte_level_table() -> dict[str, int]:
    """GPT-2's map from the printable character standing for a byte back to the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _compile_template(source: str) -> Any:
    # Sandboxed like HF's apply_chat_template: a chat template is data shipped with a model file.
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(f"chat template: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def load_tokenizer(source: ModelSource) -> Tokenizer | None:
    """None when the model ships no tokenizer (random presets): it then accepts token ids only."""
    if source.kind == "gguf":
        return _gguf_tokenizer(source.path)
    if source.kind == "hf" and (source.path / "tokenizer.json").is_file():
        return _hf_tokenizer(source.path, source.config)
    return None


def _hf_tokenizer(folder: Path, config: dict[str, Any]) -> Tokenizer:
    from tokenizers import Tokenizer as Backend

    backend = Backend.from_file(str(folder / "tokenizer.json"))
    settings: dict[str, Any] = {}
    if (folder / "tokenizer_config.json").is_file():
        settings = json.loads((folder / "tokenizer_config.json").read_text())
    template = settings.get("chat_template")
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    bos, eos = _token_text(settings.get("bos_token")), _token_text(settings.get("eos_token"))
    eos_ids = set()
    config_eos = config.get("eos_token_id")
    eos_ids.update(config_eos if isinstance(config_eos, list) else [] if config_eos is None else [config_eos])
    if eos and backend.token_to_id(eos) is not None:
        eos_ids.add(backend.token_to_id(eos))
    return Tokenizer(
        backend,
        chat_template=template,
        bos_token=bos,
        eos_token=eos,
        eos_token_ids=tuple(sorted(eos_ids)),
        add_bos=bool(settings.get("add_bos_token", False)),
    )


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # AddedToken serialised as a dict
        return value.get("content")
    return value


def _gguf_tokenizer(path: Path) -> Tokenizer:
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as Backend

    meta = read_gguf_tokenizer_fields(path)
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    tokens = list(meta["tokenizer.ggml.tokens"])
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    vocab = {token: i for i, token in enumerate(tokens)}
    backend = Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    pre = meta.get("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact", "deepseek-coder"):
        # These split every digit on its own before the GPT-2 rules (as their tokenizer.json does).
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in ("qwen2", "llama-bpe", "llama3"):
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    types = list(meta.get("tokenizer.ggml.token_type", []))
    special = [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t in _GGUF_SPECIAL_TYPES]
    backend.add_special_tokens(special)

    def token_at(key: str) -> str | None:
        index = meta.get(key)
        return tokens[int(index)] if index is not None else None

    eos = token_at("tokenizer.ggml.eos_token_id")
    eos_ids = {int(meta["tokenizer.ggml.eos_token_id"])} if eos else set()
    if meta.get("tokenizer.ggml.eot_token_id") is not None:
        eos_ids.add(int(meta["tokenizer.ggml.eot_token_id"]))
    template = meta.get("tokenizer.chat_template")
    if template and "<|im_end|>" in template and "<|im_end|>" in vocab:
        # ChatML models end a turn with <|im_end|>; HF's generation_config lists it among the EOS ids.
        eos_ids.add(vocab["<|im_end|>"])
    return Tokenizer(
        backend,
        chat_template=template,
        bos_token=token_at("tokenizer.ggml.bos_token_id"),
        eos_token=eos,
        eos_token_ids=tuple(sorted(eos_ids)),
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
    )


_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
