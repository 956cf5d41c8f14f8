"""Tokenizer, chat template and incremental detokenizer: toy vocabularies built here, and the real
SmolLM2 GGUF against golden_smollm2.json (recorded from HF transformers by make_golden.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest

from jaxserve.errors import CheckpointError, ConfigError, InvalidRequestError
from jaxserve.tokenizer import IncrementalDetokenizer, Tokenizer, load_tokenizer

GOLDEN_PATH = Path(__file__).parent / "data" / "golden_smollm2.json"

# ----- a toy byte-level vocabulary ----------------------------------------------------------------


def _byte_alphabet() -> list[str]:
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return [table[b] for b in range(256)]


TOY_SPECIALS = ["<|end|>", "<|start|>"]
TOY_MERGES = ["1 2", "3 4", "12 3", "Ġ t", "h e", "Ġt he", "ä ¸", "ä¸ Ń"]
TOY_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'tool' %}{{ raise_exception('tools are not supported') }}{% endif %}"
    "<|start|>{{ m['role'] }}\n{{ m['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|start|>assistant\n{% endif %}"
)


def toy_metadata(pre: str = "smollm") -> dict:
    tokens = [*TOY_SPECIALS, *_byte_alphabet()]
    tokens += ["".join(m.split(" ")) for m in TOY_MERGES] + ["<think>"]
    types = [3] * len(TOY_SPECIALS) + [1] * (len(tokens) - len(TOY_SPECIALS) - 1) + [4]
    return {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": types,
        "tokenizer.ggml.merges": list(TOY_MERGES),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 0,
        "tokenizer.chat_template": TOY_TEMPLATE,
    }


@pytest.fixture(scope="module")
def toy() -> Tokenizer:
    return Tokenizer.from_gguf(toy_metadata())


def test_toy_gguf_file_roundtrip(tmp_path):
    meta = toy_metadata()
    path = tmp_path / "toy.gguf"
    w = gguf.GGUFWriter(str(path), arch="llama")
    w.add_tokenizer_model(meta["tokenizer.ggml.model"])
    w.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    w.add_token_merges(meta["tokenizer.ggml.merges"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(0)
    w.add_chat_template(TOY_TEMPLATE)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    tok = load_tokenizer(path)
    assert (tok.bos_token_id, tok.eos_token_ids, tok.vocab_size) == (1, (0,), 267)
    assert tok.encode("the 1234") == Tokenizer.from_gguf(meta).encode("the 1234")


def test_toy_encode_decode(toy):
    ids = toy.encode(" the<|end|>x<think>")
    assert [toy.id_to_token(i) for i in ids] == ["Ġthe", "<|end|>", "x", "<think>"]
    assert toy.decode(ids) == " the<|end|>x<think>"
    assert toy.decode(ids, skip_special_tokens=True) == " thex<think>"  # <think> is not special
    assert toy.is_special(0) and toy.is_special(1) and not toy.is_special(ids[-1])
    assert not toy.is_special(ids[0])
    assert toy.encode("中") == [toy.token_to_id("ä¸Ń")]
    assert toy.decode(toy.encode("héllo ✓ 日本")) == "héllo ✓ 日本"


@pytest.mark.parametrize(
    ("pre", "pieces"),
    [
        ("smollm", ["1", "2", "3", "4"]),  # every digit alone
        ("qwen2", ["1", "2", "3", "4"]),
        ("llama-bpe", ["123", "4"]),  # digits in runs of up to three
        ("default", ["12", "34"]),  # GPT-2: the whole number is one word
    ],
)
def test_pre_tokenizers(pre, pieces):
    tok = Tokenizer.from_gguf(toy_metadata(pre))
    assert [tok.id_to_token(i) for i in tok.encode("1234")] == pieces


def test_unsupported_tokenizers_raise_config_error():
    with pytest.raises(ConfigError, match="'made-up-pre'"):
        Tokenizer.from_gguf(toy_metadata("made-up-pre"))
    with pytest.raises(ConfigError, match="'llama'"):
        Tokenizer.from_gguf({**toy_metadata(), "tokenizer.ggml.model": "llama"})
    with pytest.raises(CheckpointError, match="tokenizer.ggml.merges"):
        meta = toy_metadata()
        del meta["tokenizer.ggml.merges"]
        Tokenizer.from_gguf(meta)


def test_load_tokenizer_rejects_other_paths(tmp_path):
    with pytest.raises(CheckpointError):
        load_tokenizer(tmp_path)
    with pytest.raises(CheckpointError):
        load_tokenizer(tmp_path / "missing.gguf")


def test_save_from_dir_roundtrip(toy, tmp_path):
    toy.save(tmp_path)
    back = load_tokenizer(tmp_path)
    text = " the 1234 <|start|>héllo<think>中"
    assert back.encode(text) == toy.encode(text)
    assert (back.bos_token_id, back.eos_token_ids, back.vocab_size) == (1, (0,), toy.vocab_size)
    assert back.chat_template == toy.chat_template
    msgs = [{"role": "user", "content": "hi"}]
    assert back.encode_chat(msgs) == toy.encode_chat(msgs)


def test_from_dir_hf_layout(toy, tmp_path):
    """HF spellings: AddedToken dicts, a chat_template.jinja file, eos from generation_config."""
    toy.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": {"content": "<|start|>"}, "eos_token": "<|end|>"})
    )
    (tmp_path / "chat_template.jinja").write_text(TOY_TEMPLATE)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, 5]}))
    tok = Tokenizer.from_dir(tmp_path)
    assert (tok.bos_token_id, tok.eos_token_ids) == (1, (0, 5))
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]).startswith("<|start|>")


def test_from_dir_bos_from_post_processor(toy, tmp_path):
    """Llama 3 style: no add_bos_token key, the post-processor of tokenizer.json prepends BOS."""
    from tokenizers.processors import TemplateProcessing

    backend = Tokenizer.from_gguf(toy_metadata()).backend
    backend.post_processor = TemplateProcessing(
        single="<|start|> $A", special_tokens=[("<|start|>", 1)]
    )
    Tokenizer(backend, bos_token_id=1, eos_token_ids=[0]).save(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del cfg["add_bos_token"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.add_bos_token and tok.encode("x") == [tok.token_to_id("x")]  # encode never adds it
    assert not toy.add_bos_token


def test_chat_template_generation_tag(toy):
    template = (
        "{% for m in messages %}{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}"
    )
    tok = Tokenizer(toy.backend, bos_token_id=1, eos_token_ids=[0], chat_template=template)
    assert tok.apply_chat_template([{"role": "assistant", "content": "ok"}]) == "ok"


def test_chat_template(toy):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    text = toy.apply_chat_template(msgs)
    assert text == (
        "<|start|><|start|>system\nbe brief<|end|>\n<|start|>user\nhi<|end|>\n<|start|>assistant\n"
    )
    assert not toy.apply_chat_template(msgs, add_generation_prompt=False).endswith("assistant\n")
    ids = toy.encode_chat(msgs)
    assert ids[:2] == [1, 1] and ids == toy.encode(text)


@pytest.mark.parametrize(
    ("messages", "field"),
    [
        ("hello", "messages"),
        ([], "messages"),
        (["hello"], r"messages\[0\]"),
        ([{"role": "robot", "content": "x"}], r"messages\[0\]\.role"),
        ([{"content": "x"}], r"messages\[0\]\.role"),
        ([{"role": "user", "content": "a"}, {"role": "user"}], r"messages\[1\]\.content"),
        ([{"role": "user", "content": ["a"]}], r"messages\[0\]\.content"),
        ([{"role": "tool", "content": "x"}], "tools are not supported"),  # raise_exception
    ],
)
def test_bad_messages(toy, messages, field):
    with pytest.raises(InvalidRequestError, match=field):
        toy.apply_chat_template(messages)


def test_no_chat_template(toy):
    bare = Tokenizer(toy.backend, bos_token_id=1, eos_token_ids=[0])
    with pytest.raises(InvalidRequestError, match="no chat template"):
        bare.encode_chat([{"role": "user", "content": "x"}])


# ----- incremental detokenizer --------------------------------------------------------------------


def stream(tok, ids, prompt_ids=(), skip_special_tokens=True) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt_ids, skip_special_tokens=skip_special_tokens)
    deltas = [detok.add(i) for i in ids]
    deltas.append(detok.finish())
    assert detok.text == "".join(deltas)
    return deltas


@pytest.mark.parametrize("skip", [True, False])
def test_detokenizer_multibyte_split_across_tokens(toy, skip):
    text = "a 日本語 ✓ 🤖🎉 <|end|> the 中x"
    ids = toy.encode(text)
    assert len(ids) > len(text)  # most multi-byte characters span several byte tokens
    deltas = stream(toy, ids, prompt_ids=toy.encode("prompt"), skip_special_tokens=skip)
    assert "".join(deltas) == toy.decode(ids, skip_special_tokens=skip)
    assert not any("\ufffd" in d for d in deltas)
    assert deltas[-1] == ""  # nothing was left held back


def test_detokenizer_prompt_ending_mid_character(toy):
    ids = toy.encode("日本")
    deltas = stream(toy, ids[2:], prompt_ids=ids[:2])  # prompt ends inside 本
    assert "".join(deltas) == toy.decode(ids[2:])


def test_detokenizer_invalid_utf8_is_flushed(toy):
    lone = toy.token_to_id(_byte_alphabet()[0x80])  # a continuation byte with no lead byte
    ids = [lone] * 40 + toy.encode("ok") + [lone]
    deltas = stream(toy, ids)
    assert "".join(deltas) == toy.decode(ids)
    assert deltas[-1] == "\ufffd"


def test_detokenizer_window_stays_small(toy):
    """The per-token cost must not grow with output length: every decode sees a short window."""
    longest = 0
    decode = toy.decode

    class Spy(Tokenizer):
        def decode(self, ids, skip_special_tokens=False):
            nonlocal longest
            longest = max(longest, len(ids))
            return decode(ids, skip_special_tokens)

    spy = Spy(toy.backend, bos_token_id=1, eos_token_ids=[0])
    ids = toy.encode("the 日本語 🤖 and 1234 " * 200)
    assert "".join(stream(spy, ids)) == toy.decode(ids, skip_special_tokens=True)
    assert longest <= 16, longest


# ----- the real SmolLM2 GGUF against transformers' golden data ------------------------------------


@pytest.fixture(scope="module")
def golden() -> dict:
    return json.loads(GOLDEN_PATH.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def smol(real_gguf_path) -> Tokenizer:
    return Tokenizer.from_gguf(real_gguf_path)


@pytest.mark.slow
def test_golden_special_ids(smol, golden):
    special = golden["special"]
    assert smol.vocab_size == special["vocab_size"]
    assert smol.bos_token_id == special["bos_token_id"]
    assert list(smol.eos_token_ids) == special["eos_token_ids"]
    assert smol.add_bos_token == special["add_bos_token"]


@pytest.mark.slow
def test_golden_tokenize(smol, golden):
    for case in golden["tokenize"]:
        assert smol.encode(case["text"]) == case["ids"], case["text"]
        assert smol.decode(case["ids"]) == case["text"]


@pytest.mark.slow
def test_golden_chat(smol, golden):
    for case in golden["chat"]:
        text = smol.apply_chat_template(case["messages"], case["add_generation_prompt"])
        assert text == case["text"]
        assert smol.encode_chat(case["messages"], case["add_generation_prompt"]) == case["ids"]


@pytest.mark.slow
def test_golden_generations_detokenize(smol, golden):
    for case in golden["generate"]:
        out = case["output_ids"]
        assert smol.decode(out) == case["output_text"]
        for skip in (True, False):
            deltas = stream(smol, out, case["prompt_ids"], skip_special_tokens=skip)
            assert "".join(deltas) == smol.decode(out, skip_special_tokens=skip)
            assert not any("\ufffd" in d for d in deltas)


@pytest.mark.slow
def test_golden_detokenize_cjk_emoji(smol, golden):
    for case in golden["tokenize"]:
        deltas = stream(smol, case["ids"], skip_special_tokens=False)
        assert "".join(deltas) == case["text"]
        assert not any("\ufffd" in d for d in deltas), case["text"]


@pytest.mark.slow
def test_real_save_from_dir_roundtrip(smol, golden, tmp_path):
    smol.save(tmp_path)
    back = load_tokenizer(tmp_path)
    for case in golden["tokenize"]:
        assert back.encode(case["text"]) == case["ids"]
    for case in golden["chat"]:
        assert back.encode_chat(case["messages"]) == case["ids"]
    assert (back.bos_token_id, back.eos_token_ids) == (smol.bos_token_id, smol.eos_token_ids)
