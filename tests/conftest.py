"""Shared test set-up: everything offline, deterministic, few threads."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# One thread: the test models are tiny, and on a busy 2-core machine OpenMP's spinning threads
# made small SVDs and forwards 10-300x slower than single-threaded.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --- shared base-model fixtures (CLI, bundled models, README tests) ---


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the bundled SmolLM2, loaded once per session. Read-only: do not attach to it."""
    import lorakit as lk

    return lk.load_base("smollm2-135m")


def save_tiny_checkpoint(folder):
    """A local HF checkpoint dir: lorakit.testing.tiny_llama + a char-level tokenizer with a chat template."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    from lorakit.testing import tiny_llama

    specials = ["<unk>", "<s>", "</s>", "<pad>"]  # ids 0..3; tiny_llama's bos/eos are 1/2
    vocab = {t: i for i, t in enumerate(specials + [chr(c) for c in range(32, 127)])}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: one token per char
    core.add_special_tokens(specials)
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    tiny_llama(seed=0).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """Path of a saved tiny Llama checkpoint with its tokenizer (see save_tiny_checkpoint)."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-checkpoint"))
