"""Training data: formats, loss masks (completion / assistant tokens only), packing, malformed input."""

import json

import pytest
from transformers import AutoTokenizer

from lorakit.errors import ConfigError
from lorakit.train.data import IGNORE, collate, encode_messages, encode_prompt_completion, encode_rows, pack, read_jsonl


@pytest.fixture(scope="module")
def tok(tiny_checkpoint):
    return AutoTokenizer.from_pretrained(tiny_checkpoint)


def _write(tmp_path, lines):
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def _roundtrip(tok, text):
    """``text`` as the tokenizer gives it back (the tiny char tokenizer maps newlines to <unk>)."""
    return tok.decode(tok(text, add_special_tokens=False)["input_ids"])


def _supervised_text(tok, rec):
    return tok.decode([i for i, lab in zip(rec.input_ids, rec.labels, strict=True) if lab != IGNORE])


def test_plain_prompt_completion_masks_the_prompt(tok):
    rec = encode_prompt_completion(tok, "Q: hi", " A: yo", chat=False)
    n_prompt = len(tok("Q: hi", add_special_tokens=False)["input_ids"])
    assert rec.labels[:n_prompt] == [IGNORE] * n_prompt
    assert rec.labels[n_prompt:] == rec.input_ids[n_prompt:]
    assert rec.input_ids[-1] == tok.eos_token_id
    assert _supervised_text(tok, rec) == " A: yo</s>"


def test_chat_masks_everything_but_the_assistant_turn(tok):
    rec = encode_prompt_completion(tok, "reverse ab", "ba", chat=True)
    full = tok.decode(rec.input_ids)
    assert full == _roundtrip(tok, "user: reverse ab\nassistant: ba\n")
    assert _supervised_text(tok, rec) == _roundtrip(
        tok, " ba\n"
    )  # the template's own text after "assistant:" up to the turn's end


def test_multi_turn_messages_supervise_each_assistant_turn(tok):
    msgs = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "1"},
        {"role": "user", "content": "two"},
        {"role": "assistant", "content": "2"},
    ]
    rec = encode_messages(tok, msgs)
    assert len(rec.input_ids) == len(rec.labels)
    assert _supervised_text(tok, rec) == _roundtrip(tok, " 1\n 2\n")


def test_text_records_supervise_every_token(tmp_path, tok):
    fmt, rows = read_jsonl(_write(tmp_path, [json.dumps({"text": "abc"})]))
    (rec,) = encode_rows(tok, fmt, rows, chat=False, max_len=64)
    assert fmt == "text" and rec.labels == rec.input_ids


@pytest.mark.parametrize(
    "lines, fragment",
    [
        (['{"prompt": "a", "completion": "b"}', "{not json"], "data.jsonl:2: not valid JSON"),
        (['{"question": "a"}'], "data.jsonl:1: unknown record"),
        (['{"prompt": "a", "completion": "b"}', '{"text": "c"}'], "data.jsonl:2: a 'text' record"),
        (['{"prompt": "", "completion": "b"}'], "data.jsonl:1: field 'prompt' must be a non-empty string"),
        (['{"messages": [{"role": "user", "content": "hi"}]}'], "data.jsonl:1: the conversation has no assistant"),
        (['{"messages": [{"role": "user"}]}'], "data.jsonl:1: 'messages' must be"),
        (["[1, 2]"], "data.jsonl:1: expected a JSON object"),
        (["", "  "], "holds no records"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, lines, fragment):
    with pytest.raises(ConfigError) as e:
        read_jsonl(_write(tmp_path, lines))
    assert fragment in str(e.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_max_len_truncates(tok):
    (rec,) = encode_rows(tok, "text", [{"text": "x" * 100}], chat=False, max_len=10)
    assert len(rec.input_ids) == len(rec.labels) == 10


def test_packing_keeps_every_token_and_respects_max_len(tok):
    rows = [{"prompt": "p" * n, "completion": "c" * n} for n in range(1, 12)]
    recs = encode_rows(tok, "prompt_completion", rows, chat=False, max_len=64)
    packed = pack(recs, 30)
    assert len(packed) < len(recs)
    assert [t for r in packed for t in r.input_ids] == [t for r in recs for t in r.input_ids]
    assert [t for r in packed for t in r.labels] == [t for r in recs for t in r.labels]
    assert all(len(r.input_ids) <= 30 for r in packed if len(r.input_ids) > 0)


def test_collate_right_pads_and_masks(tok):
    recs = encode_rows(tok, "text", [{"text": "ab"}, {"text": "abcdef"}], chat=False, max_len=64)
    batch = collate(recs, pad_id=3)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, 7)
    assert batch["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0, 0]
    assert batch["input_ids"][0, 3:].tolist() == [3] * 4
    assert batch["labels"][0, 3:].tolist() == [IGNORE] * 4
