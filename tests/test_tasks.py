"""Tasks: formats, metadata worked out on paper, counterfactuals, tokenizer-aware scoring, persistence."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from arithinterp import ArithInterpError
from arithinterp.tasks import TaskConfig, correct_mask, load_jsonl, make_dataset, operand_metadata, year_tokens


def test_addition_metadata_worked_on_paper():
    # 457 + 368 = 825: 7+8=15 (carry 1), 5+6+1=12 (carry 1), 4+3+1=8 (carry 0)
    m = operand_metadata("add", 457, 368, 3)
    assert m["result"] == 825
    assert m["a_digits"] == [7, 5, 4] and m["b_digits"] == [8, 6, 3]
    assert m["carries"] == [1, 1, 0]
    assert m["result_digits"] == [5, 2, 8, 0]
    assert operand_metadata("add", 999, 1, 3)["carries"] == [1, 1, 1]
    # 503 - 278 = 225: 3-8 borrows, 0-7-1 borrows, 5-2-1 no borrow
    s = operand_metadata("sub", 503, 278, 3)
    assert s["result"] == 225 and s["borrows"] == [1, 1, 0]


def test_digit_format_and_teacher_forcing(char_tokenizer):
    ds = make_dataset(char_tokenizer, task="add", n=50, seed=1)
    for ex in ds.examples:
        a, b = ex.meta["a"], ex.meta["b"]
        assert ex.clean == f"{a:03d}+{b:03d}="
        assert ex.full_answer == str(a + b).zfill(4)[::-1]
        assert ex.answer == ex.full_answer[0]
    ds2 = make_dataset(char_tokenizer, task="add", n=50, seed=1, answer_token=2)
    for ex in ds2.examples:
        assert ex.clean.endswith("=" + ex.full_answer[:2]) and ex.answer == ex.full_answer[2]
    assert ds2.clean_tokens.shape[1] == ds.clean_tokens.shape[1] + 2


def test_deterministic_given_seed(char_tokenizer):
    a = make_dataset(char_tokenizer, task="sub", n=30, seed=3)
    b = make_dataset(char_tokenizer, task="sub", n=30, seed=3)
    c = make_dataset(char_tokenizer, task="sub", n=30, seed=4)
    assert a.fingerprint() == b.fingerprint() and torch.equal(a.clean_tokens, b.clean_tokens)
    assert a.fingerprint() != c.fingerprint()


@pytest.mark.parametrize("task", ["add", "sub", "mul", "div"])
def test_operand_counterfactual_changes_the_scored_token(char_tokenizer, task):
    ds = make_dataset(char_tokenizer, task=task, n=40)
    assert ds.clean_tokens.shape == ds.corrupted_tokens.shape
    assert (ds.answer_ids != ds.counterfactual_ids).all()
    dec = [char_tokenizer.decode([i]) for i in ds.answer_ids.tolist()]
    assert dec == [e.answer for e in ds.examples]


def test_same_result_control_and_null_operator(char_tokenizer):
    ds = make_dataset(char_tokenizer, task="add", n=30, counterfactual="same-result")
    for ex in ds.examples:
        cf = ex.meta["counterfactual"]
        assert cf["result"] == ex.meta["result"] and (cf["a"], cf["b"]) != (ex.meta["a"], ex.meta["b"])
    assert torch.equal(ds.answer_ids, ds.counterfactual_ids)
    nul = make_dataset(char_tokenizer, task="add", n=10, counterfactual="null-operator")
    assert all(e.corrupted == e.clean.replace("+", "|") for e in nul.examples)
    assert not nul.has_counterfactual_answer


def test_gpt2_single_token_numbers(gpt2_tokenizer):
    ds = make_dataset(gpt2_tokenizer, task="add", n=50, style="equation", answers="single-token")
    for ex, aid in zip(ds.examples, ds.answer_ids.tolist()):
        assert gpt2_tokenizer.encode(ex.full_answer) == [aid]
        assert ex.full_answer == f" {ex.meta['a'] + ex.meta['b']}"
    # 7- and 8-digit products are never one GPT-2 token: refused under single-token, scored token by token otherwise
    with pytest.raises(ArithInterpError, match="single"):
        make_dataset(gpt2_tokenizer, task="mul", n=20, operand_range=(1000, 9999), answers="single-token")
    by_tok = make_dataset(gpt2_tokenizer, task="mul", n=20, operand_range=(1000, 9999), answers="by-token")
    for ex, aid in zip(by_tok.examples, by_tok.answer_ids.tolist()):
        assert len(gpt2_tokenizer.encode(ex.full_answer)) > 1
        assert gpt2_tokenizer.encode(ex.clean + ex.full_answer)[len(gpt2_tokenizer.encode(ex.clean))] == aid


@pytest.mark.parametrize("style", ["equation", "statement", "question"])
def test_gpt2_styles(gpt2_tokenizer, style):
    ds = make_dataset(gpt2_tokenizer, task="add", n=10, style=style)
    assert ds.style == style and len(ds) == 10
    assert {"equation": "+", "statement": "sum", "question": "plus"}[style] in ds.examples[0].clean


def test_greater_than(gpt2_tokenizer, char_tokenizer):
    ds = make_dataset(gpt2_tokenizer, task="greater-than", n=20)
    ys = year_tokens(gpt2_tokenizer)
    assert len(set(ys)) == 100 and torch.equal(ds.token_set, torch.tensor(ys))
    for ex, row in zip(ds.examples, ds.positive):
        yy = ex.meta["start_yy"]
        assert row.tolist() == [y > yy for y in range(100)]
        assert ex.corrupted.endswith(f"{ex.meta['century']}01 to the year {ex.meta['century']}")
    with pytest.raises(ArithInterpError, match="two-digit year"):
        make_dataset(char_tokenizer, task="greater-than", n=5)


def test_jsonl_round_trip(tmp_path, char_tokenizer):
    ds = make_dataset(char_tokenizer, task="mul", n=15, seed=2)
    path = ds.save_jsonl(tmp_path / "mul.jsonl")
    back = load_jsonl(path, char_tokenizer)
    assert back.fingerprint() == ds.fingerprint()
    for name in ("clean_tokens", "corrupted_tokens", "answer_ids", "counterfactual_ids"):
        assert torch.equal(getattr(back, name), getattr(ds, name))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"hello": 1}\n')
    with pytest.raises(ArithInterpError, match="not an arithinterp dataset"):
        load_jsonl(bad, char_tokenizer)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"n": 0}, "empty"), ({"task": "pow"}, "unknown task"), ({"operand_range": (5, 2)}, "operand_range"),
     ({"counterfactual": "x"}, "unknown counterfactual")],
)  # fmt: skip
def test_bad_config(kwargs, match):
    with pytest.raises(ArithInterpError, match=match):
        TaskConfig(**kwargs)


def test_correct_mask_on_copy_head_model(copy_head_dir, char_tokenizer):
    from arithinterp.models import load

    model = load(str(copy_head_dir))  # outputs operand a (one digit)
    ds = make_dataset(char_tokenizer, task="add", n=40, digits=1)
    a_ids = torch.tensor([char_tokenizer.convert_tokens_to_ids(str(e.meta["a"])) for e in ds.examples])
    expected = a_ids == ds.answer_ids  # correct exactly when (a + b) % 10 == a
    assert torch.equal(correct_mask(model, ds), expected)
    copy_ds = dataclasses.replace(ds, answer_ids=a_ids)
    assert correct_mask(model, copy_ds).all()


def test_answer_correct_worked_by_hand(char_tokenizer):
    """Greedy-answer scoring with a leading axis (one row per ablation), on both scoring kinds."""
    import dataclasses

    from arithinterp.tasks import answer_correct

    ds = make_dataset(char_tokenizer, task="add", n=3, seed=0)
    logits = torch.zeros(2, 3, len(char_tokenizer))  # (set, batch, d_vocab)
    logits[0, torch.arange(3), ds.answer_ids] = 1.0  # set 0: every answer is the argmax
    logits[1, 1, ds.answer_ids[1]] = 1.0  # set 1: only example 1's (argmax of all-zero rows is token 0)
    wrong0 = [bool(ds.answer_ids[i] == 0) for i in range(3)]
    assert answer_correct(logits, ds).tolist() == [[True] * 3, [wrong0[0], True, wrong0[2]]]
    assert answer_correct(logits[1, 1:], ds, slice(1, 3)).tolist() == [True, wrong0[2]]
    # set-valued scoring (greater-than): tokens 5, 6, 7 form the set; example i accepts only set member i
    sets = dataclasses.replace(ds, token_set=torch.tensor([5, 6, 7]), positive=torch.eye(3, dtype=torch.bool))
    logits = torch.zeros(2, 3, len(char_tokenizer))
    logits[:, :, 6] = 1.0  # everyone picks set member 1
    assert answer_correct(logits, sets).tolist() == [[False, True, False]] * 2
    assert answer_correct(logits[0, 1:], sets, slice(1, 3)).tolist() == [True, False]
