"""Our tokenizer (built from the demo GGUF's metadata) against transformers' tokenizer loaded from the same GGUF:
ids, decoded text and chat templates must be identical."""
import json
import os
import random
import unicodedata

import pytest

from qwen2_triton.model.gguf_file import read_gguf
from qwen2_triton.model.tokenizer import IncrementalDetokenizer, Tokenizer

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

IM_END, ENDOFTEXT = 151645, 151643

TEXTS = [
    "def quicksort(xs):\n    if len(xs) <= 1:\n        return xs\n    p, *rest = xs\n"
    "    return quicksort([x for x in rest if x < p]) + [p]\n",
    "#include <stdio.h>\nint main(void) {\n\tprintf(\"%d\\n\", 42);\n\treturn 0;\n}\n",
    "你好，世界！这是一个测试。机器学习和深度学习。",
    "日本語のテキストとカタカナ、한국어 문장도 있습니다.",
    "emoji 👍🏽 family 👨‍👩‍👧‍👦 flags 🇯🇵🇫🇷 party 🎉🎉",
    "   leading spaces,    runs of   spaces\t\ttabs  \n\n\n\nblank lines\r\n\r\nCRLF   \n  ",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "inline<|endoftext|>special<|fim_prefix|>tokens<|fim_suffix|><|fim_middle|>and <tool_call>{\"a\": 1}</tool_call>",
    "mixed Ελληνικά русский العربية עברית हिन्दी ไทย Tiếng Việt",
    "numbers 1234567890 3.14159 -42 1e-10 0x1F 1,000,000 ١٢٣",
    "I'm sure you'll see they've DON'T we'd he's",
    "",
    " ",
    "\n",
    "<|im_start|",  # an incomplete special token is plain text
]


@pytest.fixture(scope="module")
def ours(demo_gguf):
    # The runtime's own reading (model/gguf_file.py); test_gguf_file checks it builds the tokenizer that
    # gguf.GGUFReader's metadata builds, identical to the serialized JSON.
    return Tokenizer.from_gguf_metadata(read_gguf(demo_gguf))


@pytest.fixture(scope="module")
def hf(demo_gguf):
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(demo_gguf),
                                                      gguf_file=os.path.basename(demo_gguf))


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_encode_decode_match_hf(ours, hf, text):
    ids = ours.encode(text)
    assert ids == hf.encode(text)  # HF adds nothing for Qwen2 (no BOS), so its default call compares directly
    assert ours.decode(ids) == hf.decode(ids) == text
    assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)


def test_special_tokens_are_single_ids(ours):
    assert ours.encode("<|im_start|>user<|im_end|>") == [151644, 872, IM_END]
    assert ours.encode("<tool_call>") == [151657]  # user-defined (type 4): matched whole, not special
    assert ours.decode([151657, IM_END], skip_special_tokens=True) == "<tool_call>"


def test_nfc_normalization(ours, hf):
    # Qwen2's tokenizer.json normalizes to NFC; transformers' GGUF tokenizer has no normalizer, so it would encode
    # a decomposed "é" differently. We follow tokenizer.json: decomposed input encodes as its composed form.
    text = "cafe\u0301 and Å"
    composed = unicodedata.normalize("NFC", text)
    assert composed != text
    assert ours.encode(text) == ours.encode(composed) == hf.encode(composed)


def test_ids_past_tokenizer_decode_to_nothing(ours):
    # Embedding rows 151936 > tokenizer size 151665. tokenizer.json ends at 151665 and llama.cpp prints nothing
    # for its [PAD151665].. fillers; transformers' GGUF tokenizer would print "[PAD151700]" (it keeps them).
    assert ours.vocab_size == 151665
    hello = ours.encode("Hello")
    assert ours.decode(hello + [151665, 151700, 151935, 152063, 10**12]) == "Hello"
    with pytest.raises(ValueError, match="negative"):
        ours.decode([-1])


def test_stop_and_pad_ids(ours):
    assert ours.eos_token_ids == [IM_END, ENDOFTEXT]
    assert ours.pad_token_id == ENDOFTEXT
    assert ours.special_tokens["eos_token"] == "<|im_end|>"


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city, in °C <today> & \"now\"",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CONVERSATIONS = {
    "user_only": [{"role": "user", "content": "Write quicksort in Python."}],
    "system": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"}],
    "multi_turn": [
        {"role": "system", "content": "Reply in 中文."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "你好！"},
        {"role": "user", "content": "  spaces \n and newlines\n\n"},
    ],
    "tool_call": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris <FR> & co"}}}]},
        {"role": "tool", "content": "{\"temp\": 21}"},
        {"role": "tool", "content": "{\"wind\": \"5 km/h\"}"},
    ],
}


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_chat_template_matches_hf(ours, hf, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    tools = [WEATHER_TOOL] if name == "tool_call" else None
    expected = hf.apply_chat_template(messages, tools=tools, tokenize=False,
                                      add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tools=tools) == expected


def test_chat_template_default_adds_generation_prompt(ours):
    text = ours.apply_chat_template(CONVERSATIONS["user_only"])
    assert text.startswith("<|im_start|>system\nYou are Qwen")  # Qwen2.5's default system prompt
    assert text.endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("bad, match", [
    ("hello", "list"),
    ([("user", "hi")], "dict"),
    ([{"content": "hi"}], "role"),
    ([{"role": "user"}], "content"),
])
def test_chat_template_rejects_malformed_messages(ours, bad, match):
    with pytest.raises(ValueError, match=match):
        ours.apply_chat_template(bad)


STREAM_TEXTS = ["你好，世界！机器学习。龘鱻", "emoji 👍🏽👨‍👩‍👧‍👦🇯🇵🪐🫠 end",
                "mixed 日本語 and 한국어 🎉 ok 𠀋", TEXTS[0]]


@pytest.mark.parametrize("text", STREAM_TEXTS, ids=range(len(STREAM_TEXTS)))
def test_incremental_detokenizer(ours, text):
    ids = ours.encode(text)
    detok = IncrementalDetokenizer(ours)
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == ours.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("char", ["🪐", "𠀋", "龘", "🦜"])
def test_incremental_detokenizer_holds_partial_characters(ours, char):
    # Each of these is one character that byte-level BPE spends 2-3 tokens on (no single token decodes to it).
    ids = ours.encode(char)
    assert len(ids) > 1
    detok = IncrementalDetokenizer(ours)
    assert [detok.add(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.add(ids[-1]) == char


def test_incremental_detokenizer_after_prompt(ours):
    prompt = ours.encode("<|im_start|>user\n写代码<|im_end|>\n")
    completion = ours.encode("好的 🎉 def f(): pass")
    detok = IncrementalDetokenizer(ours, prompt_ids=prompt, skip_special_tokens=True)
    out = "".join(detok.add(i) for i in completion) + detok.flush()
    assert out == ours.decode(completion, skip_special_tokens=True)


def test_incremental_detokenizer_random_ids(ours):
    # Random tokens make invalid UTF-8 on purpose; joined deltas (with flush) must still equal decode().
    rng = random.Random(0)
    ids = [rng.randrange(ours.vocab_size + 100) for _ in range(300)]
    detok = IncrementalDetokenizer(ours)
    out = "".join(detok.add(i) for i in ids) + detok.flush()
    assert out == ours.decode(ids)


def _adversarial_stream(ours, rng):
    """A prompt whose last 5 tokens decode to whole characters and a completion of random ids mixing text
    tokens, lone UTF-8 bytes (CJK and emoji split across tokens), special tokens and ids past the vocabulary."""
    words = sorted({i for t in STREAM_TEXTS for i in ours.encode(t)})
    partial = _partial_byte_tokens(ours)
    special = list(range(151643, ours.vocab_size))
    prompt = [rng.choice(words) for _ in range(rng.randrange(0, 12))]
    while prompt and "\ufffd" in ours.decode(prompt[-5:]):  # a text's tokens can split a character too
        prompt.pop()
    ids = [rng.choice(rng.choice([words, partial, special, range(ours.vocab_size + 50)]))
           for _ in range(rng.randrange(1, 30))]
    return prompt, ids


_PARTIAL: list[int] = []


def _partial_byte_tokens(ours) -> list[int]:
    if not _PARTIAL:
        _PARTIAL.extend(i for i in range(ours.vocab_size) if "\ufffd" in ours.decode([i]))
    return _PARTIAL


def test_decode_stream_decides_as_the_python_scheme(ours):
    """tokenizers' DecodeStream (the per-token path) against the prefix/read-offset scheme in Python, delta by
    delta and at flush, with and without skipping special tokens."""
    rng = random.Random(0)
    for trial in range(400):
        prompt, ids = _adversarial_stream(ours, rng)
        skip = trial % 2 == 0
        fast = IncrementalDetokenizer(ours, prompt, skip_special_tokens=skip)
        slow = IncrementalDetokenizer(ours, prompt, skip_special_tokens=skip, stream=False)
        assert fast._stream is not None, "the prompt's context is whole characters: the stream path must run"
        assert [fast.add(i) for i in ids] == [slow.add(i) for i in ids], (prompt, ids, skip)
        assert fast.flush() == slow.flush()


def test_decode_stream_is_not_seeded_with_context_ending_mid_character(ours):
    """Left context that ends inside a character (raw token ids) takes the Python scheme, whose deltas the
    stream's would differ from; the joined text still equals decode()."""
    char = ours.encode("🪐")
    prompt, completion = ours.encode("hi ") + char[:1], char[1:] + ours.encode(" ok")
    detok = IncrementalDetokenizer(ours, prompt)
    assert detok._stream is None
    out = "".join(detok.add(i) for i in completion) + detok.flush()
    assert out == ours.decode(prompt + completion)[len(ours.decode(prompt)):]


def test_from_dir_matches_hf(hf, ours, tmp_path):
    hf.save_pretrained(tmp_path)  # tokenizer.json, tokenizer_config.json, chat_template.jinja
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [IM_END, ENDOFTEXT]}))
    from_dir = Tokenizer.from_dir(tmp_path)
    for text in TEXTS:
        assert from_dir.encode(text) == hf.encode(text)
        assert from_dir.decode(from_dir.encode(text)) == text
    assert from_dir.eos_token_ids == [IM_END, ENDOFTEXT]
    assert from_dir.pad_token_id == ENDOFTEXT
    for messages in CONVERSATIONS.values():
        assert from_dir.apply_chat_template(messages) == ours.apply_chat_template(messages)


def test_from_dir_chat_template_file_wins(hf, tmp_path):
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["chat_template"] = "from tokenizer_config"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "chat_template.jinja").write_text("{{ eos_token }} from the .jinja file")
    assert Tokenizer.from_dir(tmp_path).apply_chat_template([]) == "<|im_end|> from the .jinja file"
    (tmp_path / "chat_template.jinja").unlink()
    assert Tokenizer.from_dir(tmp_path).apply_chat_template([]) == "from tokenizer_config"


def test_from_dir_without_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
