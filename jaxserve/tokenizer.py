"""Tokenizer: a Hugging Face `tokenizers.Tokenizer` plus chat template and special ids, built from
a GGUF file's metadata or an HF tokenizer directory, and an incremental detokenizer for streaming.

Encoding never adds special tokens: chat templates write BOS themselves, and raw prompts are
passed through as given. Special-token text in the input (``"<|im_start|>"``) is matched as that
token, as HF does.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers

from jaxserve.errors import CheckpointError, ConfigError, InvalidRequestError

CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})

# llama.cpp token_type values (gguf.TokenType).
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER_DEFINED = 1, 3, 4

# Pre-tokenizer split patterns, named by GGUF `tokenizer.ggml.pre`. They follow llama.cpp's
# `llama-vocab.cpp` and the matching HF tokenizer.json files.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _gpt2_pre() -> tuple[Any, Any, bool]:
    return None, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), False


def _digits_gpt2_pre() -> tuple[Any, Any, bool]:
    # StarCoder-family vocabularies (SmolLM included) split every digit, then the GPT-2 regex.
    pre = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    return None, pre, False


def _split_pre(pattern: str, normalizer: Any = None, ignore_merges: bool = False):
    def build() -> tuple[Any, Any, bool]:
        pre = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        return normalizer() if normalizer else None, pre, ignore_merges

    return build


# GGUF pre-tokenizer name -> () -> (normalizer, pre_tokenizer, BPE ignore_merges).
_PRE_TOKENIZERS = {
    "default": _gpt2_pre,
    "gpt2": _gpt2_pre,
    "gpt-2": _gpt2_pre,
    "smollm": _digits_gpt2_pre,
    "starcoder": _digits_gpt2_pre,
    "refact": _digits_gpt2_pre,
    "codeshell": _digits_gpt2_pre,
    # Llama 3 looks a whole pre-token up in the vocab before merging (ignore_merges).
    "llama-bpe": _split_pre(_LLAMA3_SPLIT, ignore_merges=True),
    "llama3": _split_pre(_LLAMA3_SPLIT, ignore_merges=True),
    "llama-v3": _split_pre(_LLAMA3_SPLIT, ignore_merges=True),
    "qwen2": _split_pre(_QWEN2_SPLIT, normalizer=normalizers.NFC),
    "deepseek-r1-qwen": _split_pre(_QWEN2_SPLIT, normalizer=normalizers.NFC),
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map that byte-level BPE vocabularies are spelled in."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _token_str(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _as_id_list(value: Any) -> list[int]:
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: HF marks assistant spans for training masks with
    it; rendering only needs the body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _ChatTemplate:
    """A chat template compiled as transformers compiles one: sandboxed, trim/lstrip blocks."""

    def __init__(self, source: str):
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True,
            lstrip_blocks=True,
            extensions=[jinja2.ext.loopcontrols, _GenerationTag],
            undefined=jinja2.Undefined,
        )
        # Jinja's own tojson HTML-escapes; templates expect plain JSON.
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = env.from_string(source)
        except jinja2.TemplateError as e:
            raise ConfigError(f"chat_template: does not compile ({e})") from e
        self.source = source

    def render(self, **variables: Any) -> str:
        try:
            return self._template.render(**variables)
        except jinja2.TemplateError as e:
            raise InvalidRequestError(f"messages: rejected by the chat template ({e})") from e


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _validate_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, Sequence) or isinstance(messages, str | bytes):
        raise InvalidRequestError(
            f"messages: expected a list of dicts, got {type(messages).__name__}"
        )
    if not messages:
        raise InvalidRequestError("messages: empty")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidRequestError(
                f"messages[{i}]: expected a dict, got {type(message).__name__}"
            )
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise InvalidRequestError(
                f"messages[{i}].role: {role!r} is not one of {sorted(CHAT_ROLES)}"
            )
        content = message.get("content")
        if not isinstance(content, str):
            raise InvalidRequestError(
                f"messages[{i}].content: expected a string, got {type(content).__name__}"
            )
        out.append(dict(message))
    return out


class Tokenizer:
    """A `tokenizers.Tokenizer` with the model's special ids and chat template.

    Build with `from_gguf`, `from_dir` or `load_tokenizer`; the constructor takes parts.
    """

    def __init__(
        self,
        tokenizer: tokenizers.Tokenizer,
        *,
        bos_token_id: int | None,
        eos_token_ids: Iterable[int],
        chat_template: str | None = None,
        add_bos_token: bool = False,
    ):
        self._tok = tokenizer
        self.bos_token_id = bos_token_id
        # Whether the model expects BOS before a raw (non-chat) prompt; `encode` never adds it.
        self.add_bos_token = bool(add_bos_token)
        self.eos_token_ids = tuple(dict.fromkeys(eos_token_ids))
        n = self.vocab_size
        for name, ids in (("bos_token_id", [bos_token_id]), ("eos_token_ids", self.eos_token_ids)):
            for i in ids:
                if i is not None and not 0 <= i < n:
                    raise ConfigError(f"{name}: {i} is outside the vocabulary of {n} tokens")
        self.chat_template = chat_template
        self._template = _ChatTemplate(chat_template) if chat_template else None

    # ----- construction -------------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, path_or_metadata: str | Path | Mapping[str, Any]) -> Tokenizer:
        """From a GGUF file, or the dict `jaxserve.loading.gguf.read_metadata` returns for one."""
        if isinstance(path_or_metadata, Mapping):
            meta, where = path_or_metadata, "GGUF metadata"
        else:
            from jaxserve.loading.gguf import open_reader, read_metadata

            meta, where = read_metadata(open_reader(path_or_metadata)), str(path_or_metadata)

        def need(key: str) -> Any:
            if key not in meta:
                raise CheckpointError(f"{where}: missing {key}")
            return meta[key]

        model = need("tokenizer.ggml.model")
        if model != "gpt2":
            raise ConfigError(
                f"{where}: tokenizer.ggml.model {model!r} is not supported (only byte-level BPE "
                f"'gpt2'; sentencepiece 'llama' vocabularies are not implemented yet)"
            )
        pre_name = meta.get("tokenizer.ggml.pre", "default")
        if pre_name not in _PRE_TOKENIZERS:
            raise ConfigError(
                f"{where}: tokenizer.ggml.pre {pre_name!r} is not supported "
                f"(known: {sorted(_PRE_TOKENIZERS)})"
            )
        tokens: list[str] = list(need("tokenizer.ggml.tokens"))
        merges_raw: list[str] = list(need("tokenizer.ggml.merges"))
        token_types = list(meta.get("tokenizer.ggml.token_type") or [_TOKEN_NORMAL] * len(tokens))
        if len(token_types) != len(tokens):
            raise CheckpointError(
                f"{where}: tokenizer.ggml.token_type has {len(token_types)} entries "
                f"for {len(tokens)} tokens"
            )

        # A normal token stored as raw text (outside the byte alphabet) is respelled so BPE can
        # reach it; control and user-defined tokens are matched whole as added tokens instead.
        to_unicode = _bytes_to_unicode()
        alphabet = set(to_unicode.values())
        vocab: dict[str, int] = {}
        for i, (tok, ttype) in enumerate(zip(tokens, token_types, strict=True)):
            if ttype == _TOKEN_NORMAL and not set(tok) <= alphabet:
                tok = "".join(to_unicode[b] for b in tok.encode("utf-8"))
            vocab.setdefault(tok, i)
        merges = []
        for m in merges_raw:
            a, sep, b = m.partition(" ")
            if not sep:
                raise CheckpointError(f"{where}: tokenizer.ggml.merges entry {m!r} is not 'a b'")
            merges.append((a, b))

        normalizer, pre, ignore_merges = _PRE_TOKENIZERS[pre_name]()
        tok = tokenizers.Tokenizer(
            models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges, fuse_unk=False)
        )
        if normalizer is not None:
            tok.normalizer = normalizer
        tok.pre_tokenizer = pre
        tok.decoder = decoders.ByteLevel()
        specials = [
            AddedToken(t, special=True, normalized=False)
            for t, ty in zip(tokens, token_types, strict=True)
            if ty == _TOKEN_CONTROL
        ]
        user = [
            AddedToken(t, special=False, normalized=False)
            for t, ty in zip(tokens, token_types, strict=True)
            if ty == _TOKEN_USER_DEFINED
        ]
        tok.add_special_tokens(specials)
        tok.add_tokens(user)
        if tok.get_vocab_size(with_added_tokens=True) != len(tokens):
            raise CheckpointError(
                f"{where}: tokenizer has {tok.get_vocab_size(with_added_tokens=True)} ids after "
                f"building, the file lists {len(tokens)} tokens (duplicate token strings?)"
            )

        eos = [meta.get(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")]
        return cls(
            tok,
            bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=[e for e in eos if isinstance(e, int)],
            chat_template=meta.get("tokenizer.chat_template"),
            add_bos_token=meta.get("tokenizer.ggml.add_bos_token") is True,
        )

    @classmethod
    def from_dir(cls, directory: str | Path) -> Tokenizer:
        """From an HF-style directory: tokenizer.json, tokenizer_config.json, and the eos ids of
        generation_config.json / config.json when present."""
        directory = Path(directory)
        tok_path = directory / "tokenizer.json"
        if not tok_path.is_file():
            raise CheckpointError(f"{directory}: no tokenizer.json")
        try:
            tok = tokenizers.Tokenizer.from_file(str(tok_path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise CheckpointError(f"{tok_path}: not a readable tokenizer.json ({e})") from e

        def read_json(name: str) -> dict[str, Any]:
            path = directory / name
            if not path.is_file():
                return {}
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{path}: not valid JSON ({e})") from e
            if not isinstance(data, dict):
                raise CheckpointError(f"{path}: expected a JSON object")
            return data

        tcfg = read_json("tokenizer_config.json")
        gen = read_json("generation_config.json")
        cfg = read_json("config.json")

        def token_id(name: str) -> int | None:
            text = _token_str(tcfg.get(name))
            if text is None:
                return None
            i = tok.token_to_id(text)
            if i is None:
                raise CheckpointError(
                    f"{directory}: tokenizer_config.json {name} {text!r} not in vocab"
                )
            return i

        bos = token_id("bos_token")
        if bos is None:
            ids = _as_id_list(gen.get("bos_token_id")) + _as_id_list(cfg.get("bos_token_id"))
            bos = ids[0] if ids else None
        eos = _as_id_list(tcfg.get("eos_token_ids"))
        eos_tok = token_id("eos_token")
        eos += [eos_tok] if eos_tok is not None else []
        eos += _as_id_list(gen.get("eos_token_id")) + _as_id_list(cfg.get("eos_token_id"))

        template = tcfg.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        jinja_file = directory / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        if template is not None and not isinstance(template, str):
            raise CheckpointError(
                f"{directory}: tokenizer_config.json chat_template is not a string"
            )
        return cls(
            tok,
            bos_token_id=bos,
            eos_token_ids=eos,
            chat_template=template,
            add_bos_token=_adds_bos(tok, bos, tcfg.get("add_bos_token")),
        )

    def save(self, directory: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json; `from_dir(directory)` rebuilds this."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(directory / "tokenizer.json"))
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos_token,
            "add_eos_token": False,
            "bos_token": self._token_or_none(self.bos_token_id),
            "eos_token": self._token_or_none(self.eos_token_ids[0] if self.eos_token_ids else None),
            # Not an HF key: every stop id, where HF spreads them over several files.
            "eos_token_ids": list(self.eos_token_ids),
            "chat_template": self.chat_template,
        }
        (directory / "tokenizer_config.json").write_text(
            json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )

    def _token_or_none(self, i: int | None) -> str | None:
        return None if i is None else self.id_to_token(i)

    # ----- encode / decode ----------------------------------------------------------------------

    @cached_property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @cached_property
    def _special_ids(self) -> frozenset[int]:
        return frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)

    @property
    def backend(self) -> tokenizers.Tokenizer:
        return self._tok

    def encode(self, text: str) -> list[int]:
        """Ids for `text`; no BOS/EOS is added, special-token text is matched as that token."""
        if not isinstance(text, str):
            raise InvalidRequestError(f"prompt: expected a string, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, i: int) -> str:
        tok = self._tok.id_to_token(i)
        if tok is None:
            raise InvalidRequestError(
                f"token id {i} is outside the vocabulary of {self.vocab_size}"
            )
        return tok

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def is_special(self, i: int) -> bool:
        return i in self._special_ids

    # ----- chat ---------------------------------------------------------------------------------

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        """Render `messages` ([{"role": ..., "content": str}, ...]) with the model's template."""
        if self._template is None:
            raise InvalidRequestError(
                "messages: this model has no chat template; send a raw prompt"
            )
        return self._template.render(
            messages=_validate_messages(messages),
            add_generation_prompt=add_generation_prompt,
            bos_token=self._token_or_none(self.bos_token_id) or "",
            eos_token=self._token_or_none(self.eos_token_ids[0] if self.eos_token_ids else None)
            or "",
            tools=None,
            documents=None,
        )

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]:
        return self.encode(self.apply_chat_template(messages, add_generation_prompt))


def _adds_bos(tok: tokenizers.Tokenizer, bos: int | None, flag: Any) -> bool:
    """tokenizer_config.json's add_bos_token, or else whether tokenizer.json's post-processor
    prepends BOS (Llama 3 says so only there)."""
    if isinstance(flag, bool):
        return flag
    if bos is None:
        return False
    with_special = tok.encode("a", add_special_tokens=True).ids
    plain = tok.encode("a", add_special_tokens=False).ids
    return with_special[:1] == [bos] and plain[:1] != [bos]


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A `.gguf` file, or a directory holding tokenizer.json."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        return Tokenizer.from_gguf(path)
    if path.is_dir() and (path / "tokenizer.json").is_file():
        return Tokenizer.from_dir(path)
    raise CheckpointError(f"{path}: neither a .gguf file nor a directory with tokenizer.json")


class IncrementalDetokenizer:
    """Turns generated ids into text deltas for streaming.

    Each `add` decodes only a short window of recent tokens: the ones since the last point where
    the text ended on a whole character, plus that earlier stretch as context (decoders such as
    sentencepiece's treat a leading space differently at the start of a string). Characters whose
    UTF-8 bytes are still incomplete (the decoded tail ends in U+FFFD) are held back, so a delta
    never carries half a character. Concatenated deltas, after `finish()`, equal
    `tokenizer.decode(generated_ids, skip_special_tokens)`.

    A window that runs past `max_window` tokens without ever ending on a whole character (only
    invalid UTF-8 does that) is emitted as is, U+FFFD included, to keep the per-token cost bounded.
    """

    max_window = 32
    _context_tokens = 4

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        context = list(prompt_ids[-self._context_tokens :])
        # Context that ends mid-character would glue prompt bytes onto the first output character.
        if context and self._decode(context).endswith("\ufffd"):
            context = []
        self._tokens: list[int] = context
        self._prefix_offset = 0  # window start (tokens[prefix:read] is already-emitted context)
        self._read_offset = len(context)  # end of the context part of the window
        self._prefix_len = len(self._decode(context)) if context else 0
        self._emitted = self._prefix_len  # chars of decode(tokens[prefix:]) already emitted
        self._deltas: list[str] = []

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip)

    def add(self, token_id: int) -> str:
        """Append one generated id; return the text it completes (possibly "")."""
        self._tokens.append(int(token_id))
        window = self._decode(self._tokens[self._prefix_offset :])
        stable = window.rstrip("\ufffd")
        complete = len(stable) == len(window)
        n_window = len(self._tokens) - self._read_offset
        if not complete and n_window >= self.max_window:
            stable, complete = window, True
        delta = stable[self._emitted :] if len(stable) > self._emitted else ""
        self._emitted = max(self._emitted, len(stable))
        if complete:
            # Slide: what was the new part becomes the context of the next window.
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._tokens)
            self._prefix_len = len(self._decode(self._tokens[self._prefix_offset :]))
            self._emitted = self._prefix_len
            # Drop tokens no window will read again, so memory stays bounded as well.
            if self._prefix_offset > 256:
                del self._tokens[: self._prefix_offset]
                self._read_offset -= self._prefix_offset
                self._prefix_offset = 0
        if delta:
            self._deltas.append(delta)
        return delta

    def finish(self) -> str:
        """Emit whatever is still held back (an incomplete character at the very end, as U+FFFD)."""
        window = self._decode(self._tokens[self._prefix_offset :])
        delta = window[self._emitted :]
        self._prefix_offset = self._read_offset = len(self._tokens)
        self._prefix_len = self._emitted = 0
        if delta:
            self._deltas.append(delta)
        return delta

    @property
    def text(self) -> str:
        """All text emitted so far."""
        if len(self._deltas) > 1:
            self._deltas = ["".join(self._deltas)]
        return self._deltas[0] if self._deltas else ""
