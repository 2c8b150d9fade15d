"""Sequence classification through ``run_training``: the ``{"text","label"}`` format, training on a
separable toy set, reload of the saved adapter (LoRA factors + the ``classifier`` modules_to_save
copy) with identical logits, and PEFT loading the same directory with identical logits."""

import json
import random

import pytest
import torch

import lorakit as lk
from lorakit.errors import ConfigError
from lorakit.train.data import collate, encode_labelled, label_names, read_jsonl
from lorakit.train.loop import TrainConfig
from lorakit.train.run import RunSpec, run_training

WORDS = ["the", "film", "plot", "was", "very", "really", "quite", "acting", "story", "and"]


def save_tiny_bert(folder):
    """A tiny BERT encoder (BertModel, as MiniLM is saved) with a char-level tokenizer, in ``folder``."""
    from tokenizers import Tokenizer, models
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    specials = ["<unk>", "<cls>", "<sep>", "<pad>"]
    vocab = {t: i for i, t in enumerate(specials + [chr(c) for c in range(32, 127)])}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>")
    cfg = BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        vocab_size=len(vocab),
        max_position_embeddings=128,
        pad_token_id=3,
    )
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return str(save_tiny_bert(tmp_path_factory.mktemp("tiny-bert")))


def toy_rows(n, seed=0):
    """Texts with 'good' (label 'pos') or 'bad' (label 'neg') among random filler words."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        word, label = ("good", "pos") if i % 2 else ("bad", "neg")
        words = rng.sample(WORDS, 3)
        words.insert(rng.randrange(4), word)
        rows.append({"text": " ".join(words), "label": label})
    return rows


def write_jsonl(path, rows):
    path.write_text("".join((json.dumps(r) if not isinstance(r, str) else r) + "\n" for r in rows))
    return path


# --- the format ---


def test_text_label_format_int_and_str(tmp_path):
    fmt, rows = read_jsonl(write_jsonl(tmp_path / "a.jsonl", [{"text": "x", "label": 2}, {"text": "y", "label": 0}]))
    assert fmt == "text_label" and label_names(rows) == [0, 1, 2]
    fmt, rows = read_jsonl(
        write_jsonl(tmp_path / "b.jsonl", [{"text": "x", "label": "pos"}, {"text": "y", "label": "neg"}])
    )
    assert fmt == "text_label" and label_names(rows) == ["neg", "pos"]  # sorted -> ids 0, 1


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ({"text": "y"}, "missing 'label'"),
        ({"text": "y", "label": 1.5}, "'label' must be an integer class id or a non-empty string"),
        ({"text": "y", "label": True}, "'label' must be an integer"),
        ({"text": "y", "label": ""}, "non-empty string"),
        ({"text": "y", "label": -1}, "class id >= 0"),
        ({"text": "", "label": 1}, "'text' must be a non-empty string"),
        ({"text": "y", "label": "pos"}, "mixes integer and string labels"),
        ('{"text": "y", "label": ', "not valid JSON"),
    ],
)
def test_malformed_lines_name_the_line(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "fine", "label": 0}, {"text": "also", "label": 1}, bad])
    with pytest.raises(ConfigError, match=f"d.jsonl:3: .*{message}"):
        read_jsonl(path)


def test_single_class_and_packing_rejected(tmp_path, tiny_bert):
    with pytest.raises(ConfigError, match="at least 2 classes"):
        label_names([{"text": "a", "label": "pos"}, {"text": "b", "label": "pos"}])
    data = write_jsonl(tmp_path / "t.jsonl", toy_rows(10))
    with pytest.raises(ConfigError, match="packing"):
        run_training(RunSpec(base=tiny_bert, data=str(data), packing=True), TrainConfig(steps=1), tmp_path / "o")


def test_collate_gives_one_class_id_per_sequence(tiny_bert):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_bert)
    recs = encode_labelled(tok, [{"text": "ab", "label": "pos"}, {"text": "abcd", "label": "neg"}], ["neg", "pos"], 64)
    batch = collate(recs, 3)
    assert batch["labels"].tolist() == [1, 0]
    assert batch["input_ids"].shape == (2, 4) and batch["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]


# --- a run ---


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_bert):
    folder = tmp_path_factory.mktemp("seqcls")
    data = write_jsonl(folder / "reviews.jsonl", toy_rows(200))
    spec = RunSpec(base=tiny_bert, data=str(data), method_options={"r": 8, "alpha": 16}, eval_examples=40)
    cfg = TrainConfig(steps=60, batch_size=16, lr=1e-2, seed=0)
    report = run_training(spec, cfg, folder / "out", progress=False)
    return report, folder / "out", tiny_bert


def test_training_raises_heldout_accuracy(trained):
    report, out, _ = trained
    assert report.labels == ["neg", "pos"]
    assert report.after["accuracy"] >= report.before["accuracy"] + 0.2
    assert report.after["accuracy"] >= 0.9
    assert report.after["loss"] < report.before["loss"]
    saved = json.loads((out / "train_report.json").read_text())
    assert saved["labels"] == ["neg", "pos"] and saved["after"]["accuracy"] == report.after["accuracy"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["task_type"] == "SEQ_CLS" and cfg["modules_to_save"] == ["classifier"]
    assert "classifier" not in str(cfg["target_modules"])


def _classifier(base, seed):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)  # a head different from the trained run's: the adapter must restore it
    return AutoModelForSequenceClassification.from_pretrained(base, num_labels=2).eval()


def _inputs(base):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    return tok(["the film was good", "bad acting and story"], return_tensors="pt", padding=True)


def _trained_logits(trained):
    """Logits of the model as training left it: rebuild it the way run_training does and reload."""
    _, out, base = trained
    model = _classifier(base, seed=123)
    lk.load_adapter(model, out)
    with torch.no_grad():
        return model(**_inputs(base)).logits  # (2, 2)


def test_reload_restores_adapter_and_head(trained):
    from transformers import AutoTokenizer

    from lorakit.train.evaluate import classification_accuracy
    from lorakit.train.run import _split

    report, out, base = trained
    fresh = _classifier(base, seed=123)
    with torch.no_grad():
        plain = fresh(**_inputs(base)).logits  # (2, 2)
    reloaded = _trained_logits(trained)
    assert not torch.allclose(plain, reloaded, atol=1e-3)  # the adapter + saved head change the output
    assert reloaded.argmax(-1).tolist() == [1, 0]  # 'good' -> pos (id 1), 'bad' -> neg (id 0)
    # on the run's own held-out split the reloaded model scores exactly what the trained one did
    spec = RunSpec(base=base, data=report.spec["data"], eval_examples=report.spec["eval_examples"])
    held_rows, _ = _split(spec, read_jsonl(spec.data)[1], report.train["seed"])
    held = encode_labelled(AutoTokenizer.from_pretrained(base), held_rows, report.labels, spec.max_len)
    lk.load_adapter(fresh, out)
    acc, loss = classification_accuracy(fresh, held, pad_id=3)
    assert acc == report.after["accuracy"]
    assert loss == pytest.approx(report.after["loss"], rel=1e-5)


def test_peft_loads_the_same_logits(trained):
    peft = pytest.importorskip("peft")
    _, out, base = trained
    ours = _trained_logits(trained)
    model = peft.PeftModel.from_pretrained(_classifier(base, seed=7), str(out)).eval()
    with torch.no_grad():
        theirs = model(**_inputs(base)).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
