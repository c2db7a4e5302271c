"""Qwen2 tokenizer: a `tokenizers.Tokenizer` plus the chat template and stop ids, from an HF folder or a GGUF.

Two sources, one behaviour:
- an HF folder: tokenizer.json is the tokenizer; tokenizer_config.json / chat_template.jinja / generation_config.json
  add the chat template and the special tokens.
- a GGUF: llama.cpp stores the vocabulary, merges and token types as metadata; we rebuild the byte-level BPE that
  Qwen2's tokenizer.json describes (model, NFC normalizer, regex split, byte-level decoder), so both sources give
  the same ids.

The chat template is rendered with jinja2 configured as transformers configures it (section "chat template
rendering" below), because a template's output depends on those settings (trim_blocks, lstrip_blocks, tojson).
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend

# Qwen2's pre-tokenizer split (tokenizer.json of every Qwen2/2.5 release). Note `\p{N}`: one digit per piece.
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# llama.cpp token types (llama_token_type): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5
# Stop tokens every Qwen2 chat model ends a turn or a document with (generation_config: [151645, 151643]).
_QWEN_STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable-character table; byte-level BPE vocabularies are spelled in it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), 256)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:  # unprintable bytes move to 256.. in order, as GPT-2 does
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _token_text(value: Any) -> str | None:
    """tokenizer_config writes special tokens either as a string or as an AddedToken dict."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """What the runtime needs from a tokenizer: encode, decode, stop ids, chat template."""

    def __init__(self, backend: _Backend, *, chat_template: str | dict | None = None,
                 special_tokens: Mapping[str, str | None] | None = None, eos_token_ids: Iterable[int] = (),
                 pad_token_id: int | None = None):
        self.backend = backend
        self.chat_template = chat_template
        # bos/eos/pad/unk as strings: templates read them (`eos_token`), as transformers passes them.
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        vocab = backend.get_vocab(with_added_tokens=True)
        # One past the largest id: ids below it decode to something, ids at or past it (the padding rows of the
        # embedding, 151665..151935 for Qwen2.5) decode to "".
        self.vocab_size = max(vocab.values()) + 1
        eos_text = self.special_tokens.get("eos_token")
        ids = [vocab[eos_text]] if eos_text in vocab else []
        ids += list(eos_token_ids) + [vocab[t] for t in _QWEN_STOP_TOKENS if t in vocab]
        self.eos_token_ids = list(dict.fromkeys(ids))  # the tokenizer's eos first, no duplicates
        self.pad_token_id = pad_token_id
        self._compiled: dict[str, jinja2.Template] = {}  # template source -> compiled, filled on first use

    # ---- construction -------------------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        path = os.fspath(path)
        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok_file):
            raise FileNotFoundError(f"no tokenizer.json in {path!r}: a Qwen2 model folder needs one")
        backend = _Backend.from_file(tok_file)
        cfg = _read_json(os.path.join(path, "tokenizer_config.json"))
        gen = _read_json(os.path.join(path, "generation_config.json"))
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}] form
            template = {t["name"]: t["template"] for t in template}
        jinja_file = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(jinja_file):  # transformers lets the separate file win over tokenizer_config
            with open(jinja_file, encoding="utf-8") as f:
                template = f.read()
        special = {name: _token_text(cfg.get(name)) for name in ("bos_token", "eos_token", "pad_token", "unk_token")}
        gen_eos = gen.get("eos_token_id", [])
        eos_ids = gen_eos if isinstance(gen_eos, list) else [gen_eos]
        pad_id = backend.token_to_id(special["pad_token"]) if special["pad_token"] else gen.get("pad_token_id")
        return cls(backend, chat_template=template, special_tokens=special, eos_token_ids=eos_ids, pad_token_id=pad_id)

    @classmethod
    def from_gguf_metadata(cls, fields: Mapping[str, Any] | Any) -> "Tokenizer":
        """From GGUF metadata: a dict of key -> value, a `model.gguf_file.GGUFFile`, or a `gguf.GGUFReader` (its
        `fields` are read)."""
        meta = _gguf_fields_to_dict(fields)
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ValueError(f"GGUF tokenizer.ggml.model is {kind!r}; only 'gpt2' (byte-level BPE, Qwen2) is supported")
        tokens: list[str] = meta.get("tokenizer.ggml.tokens") or []
        types: list[int] = meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
        if not tokens or len(types) != len(tokens):
            raise ValueError(f"GGUF tokenizer metadata is inconsistent: {len(tokens)} tokens, {len(types)} token types")
        merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
        backend = _byte_level_bpe(tokens, types, merges)

        def token_at(key: str) -> str | None:
            i = meta.get(f"tokenizer.ggml.{key}")
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        special = {"bos_token": token_at("bos_token_id"), "eos_token": token_at("eos_token_id"),
                   "pad_token": token_at("padding_token_id"), "unk_token": token_at("unknown_token_id")}
        eos_ids = [meta[k] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                     "tokenizer.ggml.eom_token_id") if k in meta]
        return cls(backend, chat_template=meta.get("tokenizer.chat_template"), special_tokens=special,
                   eos_token_ids=eos_ids, pad_token_id=meta.get("tokenizer.ggml.padding_token_id"))

    # ---- text <-> ids -------------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Ids of `text`. Never adds BOS; special tokens written in the text (`<|im_start|>`) become their ids."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if any(i < 0 for i in ids):
            raise ValueError(f"negative token id in {ids[:8]}...: token ids are >= 0")
        # Ids past the tokenizer (embedding padding rows) have no text; tokenizers skips unknown ids but a
        # u32 overflow would raise, so drop them here.
        ids = [i for i in ids if i < self.vocab_size]
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    # ---- chat template ------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None, **kwargs: Any) -> str:
        """Render a conversation as transformers' `apply_chat_template(..., tokenize=False)` does."""
        _check_messages(messages)
        if tools is not None and not (isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
            raise ValueError("tools must be a list of JSON-schema dicts ({'type': 'function', 'function': {...}})")
        source = self._pick_template(tools)
        if source not in self._compiled:
            self._compiled[source] = _compile_template(source)
        # As in transformers: special-token strings first, caller's kwargs override them.
        variables = {**self.special_tokens, **_plain(kwargs)}
        return self._compiled[source].render(messages=_alias_reasoning(_plain(messages)), tools=_plain(tools),
                                             documents=None, add_generation_prompt=add_generation_prompt,
                                             **variables)

    def _pick_template(self, tools) -> str:
        template = self.chat_template
        if template is None:
            raise ValueError("this tokenizer has no chat template (tokenizer_config.json chat_template, "
                             "chat_template.jinja, or GGUF tokenizer.chat_template)")
        if isinstance(template, dict):  # named templates: transformers picks "tool_use" when tools are given
            name = "tool_use" if tools and "tool_use" in template else "default"
            if name not in template:
                raise ValueError(f"chat templates {sorted(template)} have no 'default'")
            template = template[name]
        return template


# ---- GGUF -> byte-level BPE ----------------------------------------------------------------------------------
def _byte_level_bpe(tokens: list[str], types: list[int], merges: list[tuple[str, str]]) -> _Backend:
    """The tokenizer Qwen2's tokenizer.json describes, from llama.cpp's token list.

    Unused tokens (type 5: llama.cpp's `[PAD151665]`.. fillers up to the embedding rows) are left out, so the
    tokenizer ends where the original does (151665) and those ids decode to "" as with tokenizer.json.
    Control (3) and user-defined (4) tokens go into the BPE vocabulary at their own ids *and* are registered as
    added tokens, so they are matched whole in text; putting them in the vocabulary is what pins their ids
    (tokenizers gives an added token its vocabulary id, else the next free one).
    """
    alphabet = _bytes_to_unicode()
    spelled = set(alphabet.values())
    vocab: dict[str, int] = {}
    control, user_defined = [], []
    for i, (tok, typ) in enumerate(zip(tokens, types, strict=True)):
        if typ == _UNUSED:
            continue
        if typ == _CONTROL and set(tok) <= spelled:
            control.append(tok)
        elif typ == _USER_DEFINED:
            user_defined.append(tok)
        elif not set(tok) <= spelled:  # a normal token stored as raw text: respell it in the byte alphabet
            tok = "".join(alphabet[b] for b in tok.encode("utf-8"))
        vocab[tok] = i
    try:
        bpe = models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
                         end_of_word_suffix="", fuse_unk=False, byte_fallback=False)
    except Exception as e:  # tokenizers raises a bare Exception, e.g. for a merge whose result is not a token
        raise ValueError(f"GGUF tokenizer metadata is inconsistent: {e}") from e
    backend = _Backend(bpe)
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)  # offsets only; adds no tokens
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user_defined])
    return backend


def _gguf_fields_to_dict(fields: Any) -> dict[str, Any]:
    if isinstance(fields, Mapping):
        return dict(fields)
    if isinstance(getattr(fields, "metadata", None), Mapping):  # model.gguf_file.GGUFFile
        return dict(fields.metadata)
    if hasattr(fields, "fields"):  # gguf.GGUFReader: only the tokenizer keys are needed
        return {k: f.contents() for k, f in fields.fields.items() if k.startswith("tokenizer.")}
    raise TypeError(f"expected a metadata dict, a GGUFFile or a gguf.GGUFReader, got {type(fields).__name__}")


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e


# ---- chat template rendering, configured as transformers' utils/chat_template_utils.py -----------------------
class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}..{% endgeneration %}` (transformers' assistant-mask marker) renders its body unchanged."""
    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Not jinja's built-in tojson: that one HTML-escapes (<, >, &, ') and sorts keys; templates expect plain JSON.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _compile_template(source: str) -> jinja2.Template:
    # Immutable sandbox: templates come from model files, i.e. untrusted code.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(source)


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, (list, tuple)):
        raise ValueError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {type(m).__name__}: {m!r}")
        if not isinstance(m.get("role"), str):
            raise ValueError(f"message {i} has no string 'role': {m!r}")
        if "content" not in m and "tool_calls" not in m:  # an assistant tool call may have no content
            raise ValueError(f"message {i} ({m['role']}) has no 'content': {m!r}")


def _plain(value: Any) -> Any:
    """A deep copy in plain JSON types, so a template can neither mutate nor call into the caller's objects.
    Anything else becomes a "<TypeName>" placeholder, as transformers does."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    for base in (str, bool, int, float):  # subclasses (enums, numpy scalars) back to the base type
        if isinstance(value, base):
            return base(value)
    return f"<{type(value).__name__}>"


def _alias_reasoning(messages: list[dict]) -> list[dict]:
    # transformers fills `reasoning_content` (and `thinking`) from whichever of the names the caller used.
    out = []
    for m in messages:
        reasoning = next((m[k] for k in ("reasoning_content", "thinking", "reasoning") if m.get(k) is not None), None)
        out.append(m if reasoning is None else {"thinking": reasoning, **m, "reasoning_content": reasoning})
    return out


# ---- streaming detokenization --------------------------------------------------------------------------------
class IncrementalDetokenizer:
    """Token ids in, text deltas out; the deltas never end inside a UTF-8 character.

    The prefix/read-offset scheme of vLLM and TGI: decode the window tokens[prefix:] and compare it with the
    already-emitted part tokens[prefix:read]; emit the difference unless it ends in U+FFFD (a character whose
    bytes have not all arrived: byte-level BPE splits CJK and emoji across tokens). Decoding a short window
    instead of everything keeps each step O(window); a few tokens of left context keep decoders that depend on
    the previous token correct. `flush()` at the end emits what is left, so the deltas joined equal
    `decode(ids)` (for ids given after an optional prompt: decode(prompt + ids) minus the prompt's text).

    Per token, tokenizers' own DecodeStream runs this scheme in Rust (0.4 us a token against 2.5 for the two
    Python-side decodes: ~0.5 ms of a 256-sequence step), seeded with the same left context; it decides exactly
    as the Python form does (tests/test_tokenizer.py checks them against each other on adversarial streams),
    and the offsets are mirrored here for `flush()`. The Python form runs where DecodeStream cannot be seeded
    the same way: a tokenizers without DecodeStream(ids=...), or left context that itself ends inside a
    character (a prompt of raw token ids), where the two schemes' first deltas differ.
    """

    _CONTEXT = 5  # tokens of prompt kept as left context, as vLLM does

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Iterable[int] = (), skip_special_tokens: bool = False,
                 stream: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list(prompt_ids)
        self.read_offset = len(self.ids)
        self.prefix_offset = max(self.read_offset - self._CONTEXT, 0)
        self._stream = _decode_stream(tokenizer, self.ids[self.prefix_offset:], skip_special_tokens) \
            if stream else None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        """Append one token id; return the text it completes (often "", e.g. mid-character)."""
        token_id = int(token_id)
        self.ids.append(token_id)
        if self._stream is None:
            return self._advance(final=False)
        if not 0 <= token_id < self.tokenizer.vocab_size:  # no text (decode drops it), or an error as decode gives
            return "" if token_id >= 0 else self._advance(final=False)
        text = self._stream.step(self.tokenizer.backend, token_id)
        if text is None:
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return text

    def flush(self) -> str:
        """Whatever is held back at the end of generation (an incomplete character decodes to U+FFFD here)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset:])
        if len(new_text) > len(prefix_text) and (final or not new_text.endswith("\ufffd")):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return new_text[len(prefix_text):]
        return ""


def _decode_stream(tokenizer: Tokenizer, context: list[int], skip_special_tokens: bool):
    """A tokenizers DecodeStream seeded with ``context``, or None where it would not decide as the Python form
    (see IncrementalDetokenizer)."""
    try:
        from tokenizers.decoders import DecodeStream
    except ImportError:
        return None
    if getattr(tokenizer, "backend", None) is None:  # a stand-in without a tokenizers.Tokenizer (benchmarks)
        return None
    if context and (not all(0 <= i < tokenizer.vocab_size for i in context)
                    or "\ufffd" in tokenizer.decode(context, skip_special_tokens=skip_special_tokens)):
        return None
    try:
        return DecodeStream(ids=context, skip_special_tokens=skip_special_tokens) if context else \
            DecodeStream(skip_special_tokens=skip_special_tokens)
    except TypeError:  # tokenizers < 0.22: no ids= to seed it with
        return None
