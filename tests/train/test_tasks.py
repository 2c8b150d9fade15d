"""Built-in tasks: deterministic, verifiable answers, disjoint train / held-out splits."""

import re
from datetime import date

import pytest

from lorakit.errors import ConfigError
from lorakit.train.tasks import TASKS, split_of, task_examples


@pytest.mark.parametrize("task", sorted(TASKS))
def test_deterministic_and_disjoint(task):
    train = task_examples(task, "train", 400)
    held = task_examples(task, "heldout", 50)
    assert train == task_examples(task, "train", 400)
    assert train[:10] == task_examples(task, "train", 10)  # a prefix does not depend on n
    assert not {e.prompt for e in held} & {e.prompt for e in train}
    assert all(split_of(e.prompt) == "heldout" for e in held)
    assert task_examples(task, "train", 20, seed=1) != task_examples(task, "train", 20, seed=0)


def _check(task, prompt, answer):
    if task == "addition":
        a, b = map(int, re.findall(r"\d+", prompt)[:2])
        return int(answer) == a + b
    if task == "date":
        y, m, d = map(int, re.search(r"(\d{4})-(\d{2})-(\d{2})", prompt).groups())
        return answer == date(y, m, d).strftime("%d/%m/%Y")
    words = prompt.split(": ", 1)[1]
    if task == "sort":
        return answer.split(", ") == sorted(words.split(", "))
    return answer.split() == words.split()[::-1]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_answers_are_correct(task):
    for ex in task_examples(task, "train", 100) + task_examples(task, "heldout", 20):
        assert _check(task, ex.prompt, ex.answer), ex


def test_bad_task_or_split():
    with pytest.raises(ConfigError, match="unknown task 'nope'"):
        task_examples("nope", "train", 1)
    with pytest.raises(ConfigError, match="split must be"):
        task_examples("date", "test", 1)
