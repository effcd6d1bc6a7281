"""4x4 multiplication: data and metadata worked on paper, the internalization schedule, the auxiliary head,
resumable training, and the analyses against planted truths."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from arithinterp import ArithInterpError, models, mul4, plots
from arithinterp import mul4_analysis as ma
from arithinterp.tokenizer import build_char_tokenizer
from arithinterp.train import TRAIN_TASKS, TrainConfig, build_model, default_config, train

TINY = dict(n_layer=2, n_head=2, d_model=32, d_mlp=64, batch_size=16, n_test=20, eval_every=4, checkpoint_every=3,
            warmup=2)  # fmt: skip


def _text(ids) -> str:
    return build_char_tokenizer().decode(list(ids))


# ---------------------------------------------------------------------------------------------------------
# Data, worked on paper: 1234 * 5678 = 7006652


def test_metadata_worked_on_paper():
    m = mul4.mul4_meta(1234, 5678)
    assert m["a_digits"] == [4, 3, 2, 1] and m["b_digits"] == [8, 7, 6, 5]
    assert m["partial_products"] == [[32, 28, 24, 20], [24, 21, 18, 15], [16, 14, 12, 10], [8, 7, 6, 5]]
    # s_k = sum over i + j = k: 4*8; 4*7+3*8; 4*6+3*7+2*8; 4*5+3*6+2*7+1*8; 3*5+2*6+1*7; 2*5+1*6; 1*5; 0
    assert m["column_sums"] == [32, 52, 61, 60, 34, 16, 5, 0]
    assert m["carries"] == [0, 3, 5, 6, 6, 4, 2, 0]  # carry into place k
    assert m["running_sums"] == [32, 55, 66, 66, 40, 20, 7, 0]  # ĉ_k = s_k + carry
    assert m["result_digits"] == [2, 5, 6, 6, 0, 0, 7, 0]  # 7006652, LSB first
    assert m["result"] == 7006652
    json.dumps(m)  # plain JSON for the stores and probes


def test_chain_of_thought_worked_on_paper():
    # P0 = 1234*8 = 9872; P1 = 1234*7*10 = 86380; S1 = 96252; P2 = 740400; S2 = 836652; P3 = 6170000; all LSB first
    assert mul4.cot_text(1234, 5678) == "27890+083680:252690+0040470:2566380+00007160"
    assert len(mul4.cot_text(1234, 5678)) == mul4.COT_LEN == 44
    assert mul4.problem_text(1234, 5678) == ("4321*8765$", "=25660070")
    assert mul4.problem_text(1234, 5678, removed=28) == ("4321*8765$", "2566380+00007160=25660070")  # 5+1+6+1+6+1+7+1
    with pytest.raises(ArithInterpError, match="removed=45"):
        mul4.problem_text(1, 2, removed=45)


def test_target_labels_name_the_tokens_of_the_chain_of_thought():
    _, target = mul4.problem_text(1234, 5678, removed=0)
    named = dict(zip(mul4.target_labels(0), target, strict=True))  # one name per target character
    s2 = "".join(named[f"S2[{d}]"] for d in range(7))
    assert s2 == "2566380" and named["P0[0]"] == "2" and named["P1[0]"] == "0"  # S2 = 836652, LSB first
    assert "".join(named[f"c{k}"] for k in range(8)) == "25660070" and named["="] == "="
    assert (named["+1"], named[":1"], named["+3"]) == ("+", ":", "+") and len(named) == len(target)  # all distinct
    assert mul4.target_labels(28)[:3] == ["S2[0]", "S2[1]", "S2[2]"] and len(mul4.target_labels()) == 9


def test_token_accuracy_agrees_with_evaluate():
    cfg = TrainConfig(task="mul4-icot", steps=1, **TINY)
    model = build_model(cfg, mul4.N_POSITIONS_MODEL).eval()
    for removed in (0, 20, 44):
        acc, ev = mul4.token_accuracy(model, 0, 50, removed), mul4.evaluate(model, 0, 50, removed)
        assert list(acc) == mul4.target_labels(removed)
        assert np.mean([acc[f"c{k}"] for k in range(8)]) == pytest.approx(ev["digit_accuracy"])


@pytest.mark.parametrize("removed", [0, 8, 17, 44])
def test_vectorised_encoding_matches_text(removed):
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 10_000, (20,), generator=g), torch.randint(0, 10_000, (20,), generator=g)
    seq = mul4.encode(a, b, removed)
    for row, x, y in zip(seq, a.tolist(), b.tolist()):
        prompt, target = mul4.problem_text(x, y, removed=removed)
        assert _text(row) == "<bos>" + prompt + target + "<eos>"
    cs = mul4.running_sums(a, b)
    assert cs.tolist() == [
        [float(v) for v in mul4.mul4_meta(x, y)["running_sums"]] for x, y in zip(a.tolist(), b.tolist())
    ]


def test_per_example_removal_pads_each_row_after_its_eos():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randint(0, 10_000, (6,), generator=g), torch.randint(0, 10_000, (6,), generator=g)
    removed = torch.tensor([0, 3, 44, 17, 3, 43])
    seq = mul4.encode_removed(a, b, removed)
    assert seq.shape == (6, mul4.N_POSITIONS)  # as long as the row with nothing removed
    for row, x, y, r in zip(seq, a, b, removed.tolist()):
        own = mul4.encode(x[None], y[None], r)[0]
        assert torch.equal(row[: len(own)], own) and _text(row[len(own) :]) == "<pad>" * r
    assert torch.equal(mul4.encode_removed(a, b, torch.full((6,), 17)), mul4.encode(a, b, 17))  # no padding
    for bad in (torch.tensor([0, 45, 0, 0, 0, 0]), torch.tensor([1, 2])):
        with pytest.raises(ArithInterpError, match="one count in 0..44 per example"):
            mul4.encode_removed(a, b, bad)


def test_padded_rows_cost_what_they_cost_alone():
    """The loss of a ragged batch is the mean over the real target tokens of all rows: each row run on its own,
    unpadded, gives the same per-token cross-entropies (the pads after <eos> change no logit before them)."""
    cfg = TrainConfig(task="mul4-icot", steps=1, **TINY)
    model = build_model(cfg, mul4.N_POSITIONS_MODEL).eval()
    a, b, removed = torch.tensor([1234, 9876, 5]), torch.tensor([5678, 4321, 7]), torch.tensor([2, 30, 44])
    seq = mul4.encode_removed(a, b, removed)
    with torch.no_grad():
        loss = mul4.target_cross_entropy(model(seq[:, :-1]).logits, seq)
        total, count = 0.0, 0
        for x, y, r in zip(a, b, removed.tolist()):
            own = mul4.encode(x[None], y[None], r)
            per_token = torch.nn.functional.cross_entropy(
                model(own[:, :-1]).logits[0, mul4.PREFIX - 1 :], own[0, mul4.PREFIX :], reduction="sum"
            )
            total, count = total + per_token.item(), count + own.shape[1] - mul4.PREFIX
    assert count == 3 * (mul4.N_POSITIONS - mul4.PREFIX) - 76
    assert loss.item() == pytest.approx(total / count, rel=1e-5)


def test_removal_offsets_follow_the_smoothing_distribution():
    """P(o) ∝ exp(-λ·o), o = 0..44 - base: with λ = 1, P(0) = 1 - e^-1 ≈ 0.632 and P(1) ≈ 0.233 (worked by
    hand; the truncation at 44 - base = 4 changes them by under 1%), drawn per example and per batch alike."""
    sched = mul4.Mul4Schedule(smoothing=1.0, smoothing_per="example")
    g = torch.Generator().manual_seed(0)
    per_example = mul4._smoothed_removals(sched, 40, 100_000, g) - 40
    per_batch = torch.tensor([mul4._smoothed_removal(sched, 40, g) - 40 for _ in range(20_000)])
    z = sum(np.exp(-o) for o in range(5))
    for draws in (per_example, per_batch):
        assert draws.min() >= 0 and draws.max() <= 4
        for o in (0, 1, 2):
            assert (draws == o).float().mean().item() == pytest.approx(np.exp(-o) / z, abs=0.01)
    assert (mul4._smoothed_removals(dataclasses.replace(sched, smoothing=0.0), 40, 5, g) == 40).all()
    assert (mul4._smoothed_removals(sched, 44, 5, g) == 44).all()
    with pytest.raises(ArithInterpError, match="smoothing_per='row'"):
        mul4.Mul4Schedule(smoothing_per="row")


def test_training_batches_remove_per_example_or_per_batch_and_keep_positions():
    """Each row is its problem's own format at the drawn removal, and with keep_position its position ids are the
    full format's: the first target token (index PREFIX of the row) sits at PREFIX + removed."""
    sampler = mul4.ProblemSampler(0, 1000)
    for per, keep in (("example", True), ("batch", False), ("batch", True)):
        sched = mul4.Mul4Schedule(smoothing=0.5, smoothing_per=per, keep_position=keep)
        a, b, seq, pos = mul4.training_batch(sched, 30, sampler, 400, torch.Generator().manual_seed(3))
        assert seq.shape[0] == len(a) == len(b) == 400 and (pos is not None) == keep
        removed = []
        for row, x, y in zip(seq, a.tolist(), b.tolist()):
            text = _text(row).replace("<pad>", "")
            fits = [r for r in range(30, mul4.COT_LEN + 1)
                    if text == "<bos>" + "".join(mul4.problem_text(x, y, removed=r)) + "<eos>"]  # fmt: skip
            assert len(fits) == 1, text
            removed.append(fits[0])
        removed = torch.tensor(removed)
        if per == "example":  # smoothing 0.5: P(o = 0) = 1 - e^-0.5 ≈ 0.39
            assert removed.min() == 30 and (removed == 30).float().mean().item() == pytest.approx(0.39, abs=0.08)
        else:
            assert removed.unique().numel() == 1
            g = torch.Generator().manual_seed(4)
            per_batch = [len(mul4.training_batch(sched, 30, sampler, 2, g)[2][0]) for _ in range(40)]
            assert len(set(per_batch)) > 1  # the one offset is drawn anew for every batch
        if keep:
            assert pos.shape == (400, seq.shape[1] - 1)
            assert (pos[:, mul4.PREFIX - 1] == mul4.PREFIX - 1).all()
            assert torch.equal(pos[:, mul4.PREFIX], mul4.PREFIX + removed)


def test_cot_reliance_finds_the_token_an_oracle_copies():
    """An oracle that predicts each next token as a copy of the current one reads exactly the token before each
    target: [t, s] is 1 where s is the digit just before target t, 0 at every other visible source, NaN where s
    comes at or after t."""
    from types import SimpleNamespace

    vocab = len(mul4.VOCAB)
    copy = lambda tokens: SimpleNamespace(logits=torch.nn.functional.one_hot(tokens, vocab).float())  # noqa: E731
    a, b = torch.tensor([1234, 9876, 40]), torch.tensor([5678, 4321, 3])
    labels, sources, changed = mul4.cot_reliance(copy, a, b, 30)
    assert labels == mul4.target_labels(30) and sources == [x for x in labels if x[0] in "PS"]
    for t, target in enumerate(labels):
        for col, source in enumerate(sources):
            s = labels.index(source)
            if t <= s:
                assert torch.isnan(changed[t, col])
            else:
                assert changed[t, col] == (1.0 if t == s + 1 else 0.0), (target, source)


def test_errors_by_carry_finds_a_miss_planted_on_large_carries():
    """An oracle that writes every next token right, except c_4 wherever the carry into column 4 (⌊ĉ_3 / 10⌋,
    worked out from the operands here) is 14 or more: the table has miss 1 in exactly those groups, 0 elsewhere."""
    from types import SimpleNamespace

    a, b = mul4.held_out(3, 300)
    carry4 = mul4.running_sums(a, b)[:, 3].long() // 10
    bad = carry4 >= 14
    full = mul4.encode(a, b)

    def oracle(tokens):  # tokens: the rows without their last token, in one batch
        nxt = full[:, 1 : tokens.shape[1] + 1].clone()
        nxt[bad, mul4.EQ_POS + 4] = (nxt[bad, mul4.EQ_POS + 4] - mul4._D0 + 1) % 10 + mul4._D0  # a wrong c_4
        return SimpleNamespace(logits=torch.nn.functional.one_hot(nxt, len(mul4.VOCAB)).float())

    table = mul4.errors_by_carry(oracle, a, b, edges=(0, 7, 14), batch_size=len(a))
    assert len(table) == mul4.N_OUT
    assert [r["carry"] for r in table[4]] == ["0-6", "7-13", "14+"]
    assert [r["n"] for r in table[4]] == [int(((carry4 >= lo) & (carry4 < hi)).sum()) for lo, hi in
                                          ((0, 7), (7, 14), (14, 99))]  # fmt: skip
    assert [r["miss"] for r in table[4]] == [0.0, 0.0, 1.0] and table[4][2]["n"] > 0
    assert table[0] == [{"carry": "0-6", "n": 300, "miss": 0.0}]  # nothing carries into column 0
    assert all(r["miss"] == 0.0 for k in (1, 2, 3, 5, 6, 7) for r in table[k])
    with pytest.raises(ArithInterpError, match="must rise strictly from 0"):
        mul4.errors_by_carry(oracle, a, b, edges=(5, 10))


def test_kept_positions_are_those_of_the_full_format():
    ids = mul4.kept_position_ids(torch.tensor([0, 3]), 15)
    assert ids[0].tolist() == list(range(15))
    assert ids[1].tolist() == list(range(11)) + [14, 15, 16, 17]  # the prompt <bos>a*b$ is 11 tokens


def test_baked_positions_compute_what_kept_positions_compute():
    cfg = TrainConfig(task="mul4-icot", steps=1, **TINY)
    model = build_model(cfg, mul4.N_POSITIONS_MODEL).eval()
    with torch.no_grad():
        model.transformer.wpe.weight.normal_()  # positions that matter (a fresh table is nearly 0)
    a, b = torch.tensor([1234, 9876, 5]), torch.tensor([5678, 4321, 7])
    for removed in (0, 17, 44):
        seq = mul4.encode(a, b, removed)
        kept = mul4.kept_position_ids(torch.full((3,), removed), seq.shape[1])
        with torch.no_grad():
            want = model(seq, position_ids=kept).logits
            got = mul4.bake_positions(model, removed)(seq).logits
            plain = model(seq).logits
        torch.testing.assert_close(got, want)
        assert removed == 0 or not torch.allclose(plain, want, atol=1e-3)  # the positions do change the logits
    sched = mul4.Mul4Schedule(keep_position=True)
    assert mul4.format_model(model, mul4.Mul4Schedule(), 17) is model
    assert mul4.format_model(model, sched, 17) is not model
    with pytest.raises(ArithInterpError, match="keep_position=true only applies"):
        mul4.Mul4Schedule(remove_per_stage=0, keep_position=True)


def test_a_keep_position_run_exports_a_model_with_ordinary_positions(tmp_path, monkeypatch):
    """The exported no-cot model, run with ordinary positions, is the checkpoint's model run with kept ones."""
    from transformers import GPT2LMHeadModel

    sched = mul4.Mul4Schedule(remove_per_stage=22, steps_per_stage=2, smoothing=1.0, smoothing_per="example",
                              keep_position=True)  # fmt: skip
    monkeypatch.setitem(mul4.SCHEDULES, "mul4-icot", sched)
    cfg = TrainConfig(task="mul4-icot", steps=8, **TINY)
    assert train(cfg, tmp_path / "run", progress=False, max_steps_this_run=5)["step"] == 5
    raw, *_ = mul4.checkpoint_model(tmp_path / "run")
    summary = mul4.export_checkpoint(tmp_path / "run", tmp_path / "shipped")
    shipped = GPT2LMHeadModel.from_pretrained(tmp_path / "shipped").eval()
    seq = mul4.encode(*mul4.held_out(0, 20))
    with torch.no_grad():
        want = raw(seq, position_ids=mul4.kept_position_ids(torch.full((20,), 44), seq.shape[1])).logits
        torch.testing.assert_close(shipped(seq).logits, want)
    assert summary["schedule"]["keep_position"] is True
    baked = []  # the finished run too ships the model baked for the no-cot format
    bake = mul4.bake_positions
    monkeypatch.setattr(mul4, "bake_positions", lambda m, r: baked.append((r, bake(m, r))) or baked[-1][1])
    train(cfg, tmp_path / "run", progress=False)
    removed, final = baked[-1]
    saved = load_file(tmp_path / "run" / "model.safetensors")
    assert removed == mul4.COT_LEN
    assert torch.equal(saved["transformer.wpe.weight"], final.transformer.wpe.weight.detach())


def test_positions_of_the_no_cot_format():
    seq = mul4.encode(torch.tensor([1234]), torch.tensor([5678]))[0]
    assert (
        len(seq) == mul4.NO_COT_LEN == 21
        and mul4.encode(torch.tensor([1]), torch.tensor([2]), 0).shape[1] == mul4.N_POSITIONS == 65
    )
    assert _text(seq[mul4.EQ_POS : mul4.EQ_POS + 1]) == "="
    assert _text(seq[ma.A_POS]) == "4321" and _text(seq[ma.B_POS]) == "8765"


def test_sampler_never_draws_a_held_out_problem():
    n = 50
    g = torch.Generator().manual_seed(3)
    a, b = torch.randint(0, 10**4, (2 * n,), generator=g), torch.randint(0, 10**4, (2 * n,), generator=g)
    keys = a * 10**4 + b
    sampler = mul4.ProblemSampler(seed=0, n_test=10)
    sampler.banned = torch.sort(keys[::2]).values  # ban every other pair the sampler is about to draw
    x, y = sampler(n, torch.Generator().manual_seed(3))
    assert (x * 10**4 + y).tolist() == keys[1::2].tolist()
    ta, tb = mul4.held_out(0, 10)
    assert set((ta * 10**4 + tb).tolist()) == set(mul4.ProblemSampler(seed=0, n_test=10).banned.tolist())


def test_large_digit_share_mixes_problems_with_every_digit_in_5_to_9():
    """share 0 draws exactly what the uniform sampler always drew (worked out here from the generator); share 0.25
    puts round(0.25 n) problems with all eight digits in 5..9 at the end of the batch, none of them held out."""
    n = 40
    g = torch.Generator().manual_seed(5)
    a, b = torch.randint(0, 10**4, (2 * n,), generator=g), torch.randint(0, 10**4, (2 * n,), generator=g)
    x, y = mul4.ProblemSampler(seed=0, n_test=10, large_digit_share=0.0)(n, torch.Generator().manual_seed(5))
    assert x.tolist() == a[:n].tolist() and y.tolist() == b[:n].tolist()  # nothing of these 80 is held out

    sampler = mul4.ProblemSampler(seed=0, n_test=10, large_digit_share=0.25)
    x, y = sampler(n, torch.Generator().manual_seed(5))
    assert len(x) == len(y) == n
    g = torch.Generator().manual_seed(5)  # the uniform part comes first, drawn as a uniform batch of 30
    a, b = torch.randint(0, 10**4, (60,), generator=g), torch.randint(0, 10**4, (60,), generator=g)
    assert x[:30].tolist() == a[:30].tolist() and y[:30].tolist() == b[:30].tolist()

    def all_large(v):
        return all(int(d) >= 5 for d in f"{v:04d}")

    assert all(all_large(v) for v in x[30:].tolist() + y[30:].tolist())
    assert not all(all_large(v) for v in x[:30].tolist())
    # the large part skips held-out problems too: ban the first large pair the sampler would draw
    la, lb = sampler._large(1, torch.Generator().manual_seed(9))
    sampler.banned = torch.sort(torch.cat([sampler.banned, la * 10**4 + lb])).values
    ma, mb = sampler._large(1, torch.Generator().manual_seed(9))
    assert (ma * 10**4 + mb).item() != (la * 10**4 + lb).item() and all_large(ma.item()) and all_large(mb.item())
    # the running sums of the large part are the tail of the uniform draw: ĉ_3 >= 4·25 = 100
    assert (mul4.running_sums(x[30:], y[30:])[:, 3] >= 100).all()
    with pytest.raises(ArithInterpError, match="large_digit_share=1.5 must lie in 0..1"):
        mul4.Mul4Schedule(large_digit_share=1.5)


def test_dataset_of_task_mul4(char_tokenizer):
    from arithinterp.tasks import make_dataset

    ds = make_dataset(char_tokenizer, task="mul4", n=5, answer_token=3, seed=1)
    ex = ds.examples[0]
    m = ex.meta
    assert _text(ds.clean_tokens[0]) == "<bos>" + ex.clean
    assert ex.clean.endswith("=" + "".join(map(str, m["result_digits"][:3])))
    assert ex.answer == str(m["result_digits"][3]) and _text([ds.answer_ids[0]]) == ex.answer
    assert ds.clean_tokens.shape == ds.corrupted_tokens.shape == (5, mul4.EQ_POS + 1 + 3)
    with pytest.raises(ArithInterpError, match="answer_token=8"):
        make_dataset(char_tokenizer, task="mul4", n=5, answer_token=8)


# ---------------------------------------------------------------------------------------------------------
# Schedule, auxiliary head, training


def test_stage_schedule():
    s = mul4.SCHEDULES["mul4-icot"]
    assert s.removals == [0, 8, 16, 24, 32, 40, 44]
    assert [s.stage_at(t) for t in (0, 3499, 3500, 20_999, 21_000, 29_999)] == [0, 0, 1, 5, 6, 6]
    assert mul4.SCHEDULES["mul4-sft"].removals == [44] and mul4.SCHEDULES["mul4-aux"].aux_weight > 0
    assert all(TRAIN_TASKS[t].loop is not None for t in mul4.TASKS)
    steps = {t: TRAIN_TASKS[t].defaults["steps"] for t in mul4.TASKS}
    assert steps == {"mul4-icot": 30_000, "mul4-sft": 30_000, "mul4-aux": 30_000}  # the same budget for all three
    assert all((default_config(t).n_layer, default_config(t).n_head) == (2, 4) for t in mul4.TASKS)  # Bai et al.
    cfg = dataclasses.replace(default_config("mul4-icot"), warmup=10)
    clock = mul4.StageClock(s)
    assert mul4._lr(cfg, clock, 3500) == pytest.approx(cfg.lr / 10)  # warm-up restarts with the fresh optimiser
    assert mul4._lr(cfg, clock, 3510) == pytest.approx(cfg.lr)
    with pytest.raises(ArithInterpError, match="remove_per_stage=45"):
        mul4.Mul4Schedule(remove_per_stage=45)


def test_adaptive_stage_clock():
    """A stage ends when `advance` is called or after steps_per_stage steps, whichever is first; the last stage
    never ends; the starts survive a state_dict round trip."""
    sched = mul4.Mul4Schedule(remove_per_stage=20, steps_per_stage=100, advance_at=0.9)  # stages: 0, 20, 40, 44
    clock = mul4.StageClock(sched)
    assert [clock.stage(t) for t in (0, 39)] == [0, 0]
    clock.advance(40)  # stage 0 learnt at step 40
    assert (clock.stage(40), clock.start(1), clock.stage(139)) == (1, 40, 1)
    assert (clock.stage(140), clock.start(2)) == (2, 140)  # stage 1 ran out of steps
    assert clock.starts == [0, 40] and clock.starts_at(140) == [0, 40, 140]  # reading records nothing
    assert clock.starts_at(10_000) == [0, 40, 140, 240]  # stage 2 would run out too: the last stage from 240
    capped = mul4.StageClock(sched)
    capped.load_state_dict(clock.state_dict())
    capped.advance(140)  # stage 1 reached advance_at at the evaluation where it ran out of steps anyway
    assert (capped.stage(140), capped.stage(239), capped.start(2)) == (2, 2, 140)  # stage 2 is not skipped
    clock.advance(150)
    assert (clock.stage(10_000), clock.start(3)) == (3, 150)
    clock.advance(10_000)  # the last stage runs to the end
    assert clock.starts == [0, 40, 140, 150]
    other = mul4.StageClock(sched)
    other.load_state_dict(clock.state_dict())
    assert other.starts == clock.starts and other.stage(10_001) == 3
    fixed = mul4.StageClock(dataclasses.replace(sched, advance_at=None))
    assert [fixed.stage(t) for t in (0, 99, 100, 250, 99_999)] == [0, 0, 1, 2, 3] and fixed.start(2) == 200
    with pytest.raises(ArithInterpError, match="advance_at=0.0 must lie in"):
        mul4.Mul4Schedule(advance_at=0.0)


def test_configure_overrides_config_and_schedule():
    from arithinterp.train import configure

    cfg, sched = configure("mul4-icot", ["lr=3e-4", "d_model=64", "steps_per_stage=7", "advance-at=0.95"])
    assert (cfg.lr, cfg.d_model, cfg.n_head, sched.steps_per_stage, sched.advance_at) == (3e-4, 64, 4, 7, 0.95)
    assert sched.remove_per_stage == mul4.SCHEDULES["mul4-icot"].remove_per_stage  # the rest stays the default
    assert configure("mul4-icot", ["advance_at=none"])[1].advance_at is None
    assert configure("mul4-icot", ["keep_position=true"])[1].keep_position is True
    assert configure("mul4-icot", ["keep-position=0"])[1].keep_position is False
    with pytest.raises(ArithInterpError, match="keep_position='maybe': the value must be true or false"):
        configure("mul4-icot", ["keep_position=maybe"])
    cfg, sched = configure("add", ["steps=10"])
    assert cfg.steps == 10 and sched is None
    with pytest.raises(ArithInterpError, match="d_model=66 must be divisible by n_head=4"):
        configure("mul4-sft", ["d_model=66"])
    with pytest.raises(ArithInterpError, match="does not fit task 'mul4-sft'"):
        train(default_config("mul4-sft"), "unused", schedule=mul4.SCHEDULES["mul4-icot"])
    with pytest.raises(ArithInterpError, match="does not fit task 'mul4-sft'.*mul4-sft has none"):
        train(default_config("mul4-sft"), "unused", schedule=mul4.Mul4Schedule(remove_per_stage=0, aux_weight=1.0))
    with pytest.raises(ArithInterpError, match="does not fit task 'mul4-aux'.*mul4-aux has aux_weight > 0"):
        train(default_config("mul4-aux"), "unused", schedule=mul4.SCHEDULES["mul4-sft"])


@pytest.mark.parametrize("task", mul4.TASKS)
def test_shipped_models_were_trained_as_their_cards_say(task, monkeypatch):
    """A built-in trained in one run: `arithinterp train --task mul4-*` with the defaults reproduces its settings
    (its arithinterp.json). One taken up from other runs (a `lineage` in its card): every run of the chain is
    committed under data/runs, replays to the generator state of its checkpoint (so the recorded settings drew
    those batches), and the held-out figures, the strict one included, are re-measured."""
    from arithinterp.models import resolve

    monkeypatch.chdir(Path(__file__).parents[1])  # the lineage names its runs from the project root
    name = {"mul4-icot": "icot-mul4", "mul4-sft": "sft-mul4", "mul4-aux": "aux-mul4"}[task]
    folder = Path(resolve(name)[1])
    card = json.loads((folder / "arithinterp.json").read_text())
    if "lineage" in card:
        links = json.loads(json.dumps(mul4.run_lineage(folder)))
        assert [link | {"run": None} for link in links] == [link | {"run": None} for link in card["lineage"]]
        assert all(link["run"].startswith("data/runs/") for link in card["lineage"][:-1])
        report = mul4.held_out_unseen(folder)  # replays every source run
        seen = report["seen_by_sources"]
        assert card["held_out_unseen"] == {"seen_by_sources": seen, "n": report["n"] - seen, **report["unseen"]}
        assert card["held_out"] == report["all"]
        return
    assert card["train_config"] == dataclasses.asdict(default_config(task))
    # fields added since (start_removed, init_from) take their defaults, which is what the run did
    assert dataclasses.asdict(mul4.Mul4Schedule(**card["schedule"])) == dataclasses.asdict(mul4.SCHEDULES[task])
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(resolve(name)[1]).eval()  # the recorded result is this model's
    assert card["held_out"] == mul4.greedy_eval(model, card["train_config"]["seed"], card["n_test"])


def test_aux_heads_read_the_positions_predicting_each_digit():
    heads = mul4.AuxHeads(4)
    with torch.no_grad():
        heads.linear.weight.zero_()
        heads.linear.weight[:, 0] = torch.arange(1.0, 9.0)  # head k scales feature 0 by k + 1
        heads.linear.bias.zero_()
    x = torch.zeros(2, 20, 4)
    x[:, :, 0] = torch.arange(20.0)  # feature 0 = the position
    out = heads(x)
    k = torch.arange(8.0)
    assert torch.allclose(out, ((mul4.EQ_POS + k) * (k + 1)).expand(2, 8))


def test_aux_heads_follow_the_equals_sign_in_chain_of_thought_formats():
    """In an internalization stage the answer sits after the remaining chain of thought, at a different index in
    each row under per-example removal smoothing: the heads read eq + k, with eq the row's "=" (worked out from
    the format: PREFIX + COT_LEN - removed)."""
    a, b = torch.tensor([1234, 9999, 5]), torch.tensor([4321, 1, 7777])
    removed = torch.tensor([0, 30, 44])
    seq = mul4.encode_removed(a, b, removed)
    eq = mul4.equals_index(seq)
    assert eq.tolist() == (mul4.PREFIX + mul4.COT_LEN - removed).tolist() == [55, 25, 11]
    assert mul4.equals_index(mul4.encode(a, b)).tolist() == [mul4.EQ_POS] * 3
    heads = mul4.AuxHeads(4)
    with torch.no_grad():
        heads.linear.weight.zero_()
        heads.linear.weight[:, 0] = 1.0
        heads.linear.bias.zero_()
    x = torch.zeros(3, seq.shape[1], 4)
    x[:, :, 0] = torch.arange(float(seq.shape[1]))  # feature 0 = the position
    assert heads(x, eq).tolist() == [[float(e + k) for k in range(8)] for e in eq.tolist()]
    with pytest.raises(ArithInterpError, match='exactly one "="'):
        mul4.equals_index(seq[:, :10])


def test_aux_targets_give_back_the_digits_worked_out_on_paper():
    a, b = mul4.held_out(0, 200)
    true = torch.tensor([mul4.mul4_meta(x, y)["result_digits"] for x, y in zip(a.tolist(), b.tolist(), strict=True)])
    sums = torch.tensor([mul4.mul4_meta(x, y)["running_sums"] for x, y in zip(a.tolist(), b.tolist(), strict=True)])
    units = torch.tensor([mul4.mul4_meta(x, y)["unit_sums"] for x, y in zip(a.tolist(), b.tolist(), strict=True)])
    heads = {target: mul4.AuxHeads(16, target) for target in mul4.AUX_TARGETS}
    assert torch.equal(heads["sum"].targets(a, b), sums / 10)
    assert torch.equal(heads["units"].targets(a, b), units / 10) and torch.equal(mul4.unit_sums(a, b), units.float())
    # 1234 x 5678 by hand: products a_i*b_j (a = 4,3,2,1 and b = 8,7,6,5 LSB first), column by column, units digits
    # 2 | 8+4 | 4+1+6 | 0+8+4+8 | 5+2+7 | 0+6 | 5 plus the carries 0,3,5,6,6,4,2,0 of c-hat = 32,55,66,66,40,20,7,0
    meta = mul4.mul4_meta(1234, 5678)
    assert meta["running_sums"] == [32, 55, 66, 66, 40, 20, 7, 0] and meta["carries"] == [0, 3, 5, 6, 6, 4, 2, 0]
    assert meta["unit_sums"] == [2, 15, 16, 26, 20, 10, 7, 0]
    assert mul4.unit_sums(torch.tensor([1234]), torch.tensor([5678])).tolist() == [meta["unit_sums"]]
    assert [u % 10 for u in meta["unit_sums"]] == meta["result_digits"] == [2, 5, 6, 6, 0, 0, 7, 0]
    assert units.max() <= 4 * 9 + 35 < sums.max()  # a seventh of c-hat's range or less
    phase = heads["phase"].targets(a, b)
    assert phase.shape == (200, 8, 2) and torch.allclose(phase[..., 0], torch.cos(2 * torch.pi * sums / 10))
    for h in heads.values():
        assert torch.equal(h.digits(h.targets(a, b)), true)
        assert h(torch.zeros(3, 30, 16)).shape == (3, 8) + ((2,) if h.target == "phase" else ())
    with pytest.raises(ArithInterpError, match="aux_target='carry' must be one of sum, phase"):
        mul4.Mul4Schedule(remove_per_stage=0, aux_weight=1.0, aux_target="carry")


@pytest.mark.parametrize("target", mul4.AUX_TARGETS)
def test_aux_readout_against_values_worked_out_on_paper(target):
    """Heads that always say 50 (bias 5, scale 10), or the phase of 3: the running-sum heads' error per k is the
    mean |ĉ_k - 50| of `mul4_meta`, they are exact where ĉ_k = 50; the digit they imply is right where c_k is 0
    (3). The model's side is `token_accuracy`'s c_k."""
    a, b = mul4.held_out(0, 60)
    heads = mul4.AuxHeads(32, target)
    scalar = target in mul4.SCALAR_AUX_TARGETS
    with torch.no_grad():
        heads.linear.weight.zero_()
        angle = torch.tensor(2 * torch.pi * 3 / 10)
        heads.linear.bias.copy_(torch.full((8,), 5.0) if scalar else torch.stack([angle.cos(), angle.sin()]).repeat(8))
    torch.manual_seed(0)
    model = build_model(TrainConfig(task="mul4-aux", **TINY), mul4.N_POSITIONS_MODEL).eval()
    got = mul4.aux_readout(model, heads, a, b, batch_size=25)
    metas = [mul4.mul4_meta(x, y) for x, y in zip(a.tolist(), b.tolist(), strict=True)]
    digit = 0 if scalar else 3
    for k in range(8):
        sums = [m["unit_sums" if target == "units" else "running_sums"][k] for m in metas]
        assert got["head_digit"][k] == pytest.approx(sum(m["result_digits"][k] == digit for m in metas) / 60, abs=1e-4)
        if scalar:
            assert got["mae"][k] == pytest.approx(sum(abs(s - 50) for s in sums) / 60, abs=1e-4)
            assert got["head_exact"][k] == pytest.approx(sum(s == 50 for s in sums) / 60, abs=1e-4)
    assert ("mae" in got) == scalar
    tf = mul4.token_accuracy(model, 0, 60)
    assert got["model_digit"] == pytest.approx([tf[f"c{k}"] for k in range(8)], abs=1e-4)
    with pytest.raises(ArithInterpError, match="no auxiliary heads"):
        mul4.load_aux_heads("sft-mul4")


def test_an_internalization_run_can_carry_the_aux_loss(tmp_path):
    sched = mul4.Mul4Schedule(remove_per_stage=20, steps_per_stage=3, smoothing_per="example", aux_weight=1.0)
    cfg = TrainConfig(task="mul4-icot", steps=12, **TINY)
    done = train(cfg, tmp_path / "icot-aux", progress=False, schedule=sched)
    log = mul4.run_log(tmp_path / "icot-aux")
    assert {e["removed"] for e in log} == {20, 40, 44} and all(e["aux_mse"] > 0 for e in log)
    assert done["schedule"]["aux_weight"] == 1.0
    assert (tmp_path / "icot-aux" / "aux_heads.safetensors").is_file()


def test_a_phase_aux_run_trains_and_ships_two_heads_per_digit(tmp_path):
    sched = mul4.Mul4Schedule(remove_per_stage=0, smoothing=0.0, aux_weight=1.0, aux_target="phase")
    done = train(TrainConfig(task="mul4-aux", steps=6, **TINY), tmp_path / "phase", progress=False, schedule=sched)
    assert done["schedule"]["aux_target"] == "phase"
    heads = mul4.load_aux_heads(tmp_path / "phase")
    assert heads.target == "phase" and heads.linear.weight.shape == (16, TINY["d_model"])
    # cos and sin lie in [-1, 1]: near-zero heads at the start are off by about 1/2 in the mean square, not by ĉ²
    assert all(0.05 < e["aux_mse"] < 2 for e in mul4.run_log(tmp_path / "phase"))


def test_aux_hook_is_transformer_lens_attn_out(tmp_path, char_tokenizer):
    from transformers import GPT2LMHeadModel

    from arithinterp.models import load
    from tests.conftest import build_random_gpt2

    folder = build_random_gpt2(tmp_path / "m", char_tokenizer, n_layer=2, d_model=32)
    hf = GPT2LMHeadModel.from_pretrained(folder).eval()
    box, handle = mul4._last_attn_capture(hf)
    seq = mul4.encode(torch.tensor([1234, 99]), torch.tensor([5678, 7]))[:, :-1]
    with torch.no_grad():
        hf(seq)
    handle.remove()
    _, cache = load(str(folder)).run_with_cache(seq)
    torch.testing.assert_close(box["attn_out"], cache["blocks.1.hook_attn_out"], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("per", ["batch", "example"])
def test_icot_resume_is_bit_identical_across_stages(tmp_path, monkeypatch, per):
    # smoothing 1: about a third of the removal offsets are nonzero, so "example" batches are padded
    sched = mul4.Mul4Schedule(remove_per_stage=20, steps_per_stage=2, smoothing=1.0, smoothing_per=per)
    monkeypatch.setitem(mul4.SCHEDULES, "mul4-icot", sched)
    cfg = TrainConfig(task="mul4-icot", steps=8, **TINY)  # stages remove 0, 20, 40, 44 tokens
    full = train(cfg, tmp_path / "full", progress=False)
    part = train(cfg, tmp_path / "resumed", progress=False, max_steps_this_run=5)
    assert part == {"finished": False, "step": 5, "stage": 2}
    state = torch.load(tmp_path / "resumed" / "checkpoint" / "checkpoint.pt", weights_only=True)
    assert int(state["opt"]["state"][0]["step"]) == 1  # the optimiser was reset at the start of stage 2 (step 4)
    settings_path = tmp_path / "resumed" / "checkpoint" / "settings.json"
    old = json.loads(settings_path.read_text())
    newer = ("smoothing_per", "keep_position") if per == "batch" else ()  # "example" runs postdate the field
    for field in ("advance_at", "start_removed", "init_from", *newer):
        del old["schedule"][field]  # a run checkpointed before these fields existed still resumes
    settings_path.write_text(json.dumps(old))
    done = train(cfg, tmp_path / "resumed", progress=False)
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert full["held_out"] == done["held_out"]
    log = [json.loads(line) for line in (tmp_path / "full" / "training_log.jsonl").read_text().splitlines()]
    assert log[-1]["stage"] == 3 and log[-1]["removed"] == 44
    train(dataclasses.replace(cfg, lr=0.5), tmp_path / "resumed2", progress=False, max_steps_this_run=1)
    with pytest.raises(ArithInterpError, match="other settings"):
        train(cfg, tmp_path / "resumed2", progress=False)


@pytest.mark.slow
def test_adaptive_stages_advance_on_validation_and_resume(tmp_path, monkeypatch):
    """With advance_at, a stage ends at the first evaluation whose validation exact match reaches it (here forced
    to 1.0 from step 4 on), the optimiser is reset there, and a run resumed mid-way matches one run straight."""
    real = mul4.evaluate

    def evaluate(model, seed, n, removed=mul4.COT_LEN, batch_size=500, problems=None):
        out = real(model, seed, n, removed, batch_size, problems)
        if problems is not None:  # the validation problems; only these may decide a stage's end
            assert torch.equal(problems[0], mul4.validation(seed)[0]) and n == mul4.VALIDATION_N
            return out | {"exact_match": 1.0}
        return out

    monkeypatch.setattr(mul4, "evaluate", evaluate)
    sched = mul4.Mul4Schedule(remove_per_stage=20, steps_per_stage=5, advance_at=0.5)  # caps would end 5, 10, 15
    cfg = TrainConfig(task="mul4-icot", steps=16, **TINY)  # evaluations at steps 4, 8, 12, 16
    full = train(cfg, tmp_path / "full", progress=False, schedule=sched)
    assert full["stage_starts"] == [0, 4, 8, 12]
    log = [json.loads(line) for line in (tmp_path / "full" / "training_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if e.get("advanced")] == [4, 8, 12]
    part = train(cfg, tmp_path / "resumed", progress=False, schedule=sched, max_steps_this_run=9)
    assert part == {"finished": False, "step": 9, "stage": 2}
    state = torch.load(tmp_path / "resumed" / "checkpoint" / "checkpoint.pt", weights_only=True)
    assert state["stages"] == {"starts": [0, 4, 8]} and int(state["opt"]["state"][0]["step"]) == 1
    unfinished = mul4.run_log(tmp_path / "resumed")  # read from the checkpoint
    assert [e["step"] for e in unfinished] == [e["step"] for e in log if e["step"] <= 9]
    done = train(cfg, tmp_path / "resumed", progress=False, schedule=sched)
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "resumed" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a) and done["stage_starts"] == [0, 4, 8, 12]
    table = mul4.stage_table(mul4.run_log(tmp_path / "full"))
    assert [(r["stage"], r["removed"], r["last_step"], r["advanced"]) for r in table] == [
        (0, 0, 4, True), (1, 20, 8, True), (2, 40, 12, True), (3, 44, 16, False)]  # fmt: skip
    assert table[0]["val"] == 1.0 and table[3]["val"] is None  # the last stage never advances, so no validation
    with pytest.raises(ArithInterpError, match="holds neither a checkpoint nor training_log.jsonl"):
        mul4.run_log(tmp_path)
    with pytest.raises(ArithInterpError, match=r"steps=15 leaves the last stage .* possibly no steps: .* above 15"):
        train(dataclasses.replace(cfg, steps=15), tmp_path / "short", progress=False, schedule=sched)
    assert not (tmp_path / "short").exists()  # refused before anything was written


def test_a_run_takes_up_internalization_from_another_runs_weights(tmp_path):
    """`init_from` + `start_removed` (Deng et al.'s --from_pretrained / --remove_start_from): the new run starts
    from the other run's latest checkpoint (or a model folder), removes `start_removed` tokens in its first stage,
    and records where its weights came from; a source that does not fit is refused before anything is written."""
    sched = mul4.Mul4Schedule(remove_per_stage=20, steps_per_stage=3)  # stages remove 0, 20, 40, 44
    cfg = TrainConfig(task="mul4-icot", steps=12, **TINY)
    assert train(cfg, tmp_path / "first", progress=False, schedule=sched, max_steps_this_run=4)["stage"] == 1
    state = torch.load(tmp_path / "first" / "checkpoint" / "checkpoint.pt", weights_only=True)
    model = build_model(cfg, mul4.N_POSITIONS_MODEL)
    record = mul4.load_initial_weights(model, str(tmp_path / "first"))
    assert all(torch.equal(model.state_dict()[k], state["model"][k]) for k in state["model"])
    assert record["kind"] == "run checkpoint" and record["step"] == 4
    assert (record["stages"][-1]["stage"], record["stages"][-1]["removed"]) == (1, 20)  # logged at step 4

    first = str(tmp_path / "first")
    later = mul4.Mul4Schedule(start_removed=30, remove_per_stage=7, steps_per_stage=5, init_from=first)
    assert later.removals == [30, 37, 44]
    train(cfg, tmp_path / "zero", progress=False, schedule=later, max_steps_this_run=0)  # saves the start
    start = torch.load(tmp_path / "zero" / "checkpoint" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(start[k], state["model"][k]) for k in state["model"])
    done = train(cfg, tmp_path / "second", progress=False, schedule=later)  # logs at steps 4, 8, 12
    as_json = json.loads(json.dumps(record))  # tuples become lists
    assert done["init"] == json.loads((tmp_path / "second" / "init.json").read_text()) == as_json
    log = mul4.run_log(tmp_path / "second")
    assert [(e["stage"], e["removed"]) for e in log] == [(0, 30), (1, 37), (2, 44)]
    from_folder = mul4.load_initial_weights(build_model(cfg, mul4.N_POSITIONS_MODEL), str(tmp_path / "second"))
    assert from_folder["kind"] == "local model"  # a finished run is a model folder

    with pytest.raises(ArithInterpError, match=r"does not fit .* transformer.wte.weight"):
        train(dataclasses.replace(cfg, d_model=16), tmp_path / "wide", progress=False, schedule=later)
    with pytest.raises(ArithInterpError, match=r"cannot widen d_model=32, d_mlp=64 to d_model=48.*whole multiple"):
        train(dataclasses.replace(cfg, d_model=48), tmp_path / "wide", progress=False, schedule=later)
    with pytest.raises(ArithInterpError, match=r"has n_head=2; .* --set n_head=2"):
        train(dataclasses.replace(cfg, d_model=64, n_head=4), tmp_path / "wide", progress=False, schedule=later)
    with pytest.raises(ArithInterpError, match="init_from='.*nowhere'.*does not exist"):
        train(cfg, tmp_path / "lost", progress=False, schedule=dataclasses.replace(later, init_from="./nowhere"))
    assert not (tmp_path / "wide").exists() and not (tmp_path / "lost").exists()
    with pytest.raises(ArithInterpError, match=r"start_removed=45 must lie in 0\.\.44"):
        mul4.Mul4Schedule(start_removed=45)
    with pytest.raises(ArithInterpError, match="start_removed=4 .* without chain of thought"):
        mul4.Mul4Schedule(remove_per_stage=0, start_removed=4)


def test_start_removed_44_finishes_a_line_with_the_last_stage_alone(tmp_path):
    """start_removed=44 is one stage, the no-cot format: the whole run is a last stage (warm-up, then the cosine
    decay over all its steps), from the source's weights, and it ends as a finished model with its init record."""
    sched = mul4.Mul4Schedule(remove_per_stage=20, steps_per_stage=3)
    cfg = TrainConfig(task="mul4-icot", steps=12, **TINY)
    train(cfg, tmp_path / "line", progress=False, schedule=sched, max_steps_this_run=7)
    finish = mul4.Mul4Schedule(remove_per_stage=1, steps_per_stage=60_000, advance_at=0.9, start_removed=44,
                               init_from=str(tmp_path / "line"))  # fmt: skip
    assert finish.removals == [44]
    done = train(dataclasses.replace(cfg, steps=8), tmp_path / "finish", progress=False, schedule=finish)
    log = mul4.run_log(tmp_path / "finish")
    assert {e["removed"] for e in log} == {44} and not any("val_exact_match" in e for e in log)
    assert done["init"]["step"] == 7 and done["init"]["from"] == str(tmp_path / "line")
    clock = mul4.StageClock.restored(finish, None)
    lrs = [mul4._lr(dataclasses.replace(cfg, steps=8), clock, step) for step in range(8)]
    assert lrs[:2] == [cfg.lr / 2, cfg.lr] and lrs[-1] < lrs[2] == cfg.lr  # warm-up 2, then decay in the stage
    assert (tmp_path / "finish" / "model.safetensors").is_file()


def test_a_warm_start_takes_the_sources_aux_heads(tmp_path):
    """init_from an aux run (its checkpoint, or its finished model folder) starts the new run's running-sum heads
    from the source's; a source without heads of that width leaves them fresh, and the record says which."""
    sched = mul4.Mul4Schedule(remove_per_stage=0, smoothing=0.0, aux_weight=1.0)
    cfg = TrainConfig(task="mul4-aux", steps=6, **TINY)
    train(cfg, tmp_path / "done", progress=False, schedule=sched)
    train(cfg, tmp_path / "half", progress=False, schedule=sched, max_steps_this_run=3)
    saved = load_file(tmp_path / "done" / "aux_heads.safetensors")
    in_ckpt = torch.load(tmp_path / "half" / "checkpoint" / "checkpoint.pt", weights_only=True)["aux"]
    assert not torch.equal(saved["linear.weight"], in_ckpt["linear.weight"])
    for source, want in (("done", saved), ("half", in_ckpt)):
        loaded = mul4.load_aux_heads(tmp_path / source)
        assert (loaded.target, loaded.scale) == ("sum", sched.aux_scale)
        assert all(torch.equal(loaded.state_dict()[k], want[k]) for k in want)
        aux = mul4.AuxHeads(cfg.d_model)
        record = mul4.load_initial_weights(build_model(cfg, mul4.N_POSITIONS_MODEL), str(tmp_path / source), aux=aux)
        assert record["aux_heads"] == "from the source" and record["aux_heads_from_source"] is True
        assert all(torch.equal(aux.state_dict()[k], want[k]) for k in want)
    later = dataclasses.replace(sched, init_from=str(tmp_path / "done"))
    train(cfg, tmp_path / "zero", progress=False, schedule=later, max_steps_this_run=0)  # saves the start
    start = torch.load(tmp_path / "zero" / "checkpoint" / "checkpoint.pt", weights_only=True)["aux"]
    assert all(torch.equal(start[k], saved[k]) for k in saved)
    icot = mul4.Mul4Schedule(remove_per_stage=20, steps_per_stage=3)
    train(TrainConfig(task="mul4-icot", steps=12, **TINY), tmp_path / "plain", progress=False, schedule=icot,
          max_steps_this_run=2)  # fmt: skip
    fresh = mul4.AuxHeads(cfg.d_model)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    record = mul4.load_initial_weights(build_model(cfg, mul4.N_POSITIONS_MODEL), str(tmp_path / "plain"), aux=fresh)
    assert record["aux_heads"].startswith("fresh") and record["aux_heads_from_source"] is False
    assert all(torch.equal(fresh.state_dict()[k], before[k]) for k in before)
    other = mul4.AuxHeads(cfg.d_model, "units")  # same shape as the source's "sum" heads, another target
    before = {k: v.clone() for k, v in other.state_dict().items()}
    record = mul4.load_initial_weights(build_model(cfg, mul4.N_POSITIONS_MODEL), str(tmp_path / "done"), aux=other)
    assert record["aux_heads"] == "fresh (the source's heads regress aux_target='sum', not 'units')"
    assert record["aux_heads_from_source"] is False
    assert all(torch.equal(other.state_dict()[k], before[k]) for k in before)
    wide, wide_cfg = mul4.AuxHeads(64), dataclasses.replace(cfg, d_model=64, d_mlp=128)
    record = mul4.load_initial_weights(build_model(wide_cfg, mul4.N_POSITIONS_MODEL), str(tmp_path / "done"), aux=wide)
    assert record["aux_heads"].startswith("fresh") and "widened" in record and not record["aux_heads_from_source"]


def _last_attn_features(model, a, b):
    """The last block's attention output at the eight positions predicting c_0..c_7 (no-cot format), read with a
    hook of the test's own."""
    got = {}
    handle = model.transformer.h[-1].attn.register_forward_hook(lambda m, i, o: got.update(x=o[0]))
    with torch.no_grad():
        model(mul4.encode(a, b)[:, :-1])
    handle.remove()
    return got["x"][:, mul4.EQ_POS : mul4.EQ_POS + 8].double().numpy()


@pytest.mark.parametrize("target", mul4.AUX_TARGETS)
def test_fit_aux_heads_is_least_squares_through_the_heads_own_forward(target):
    """The fitted heads, run as heads (AuxHeads.forward), give numpy's least-squares predictions per digit, and the
    errors `fit_aux_heads` returns are those predictions' mean squared errors in the values' units."""
    torch.manual_seed(1)
    model = build_model(TrainConfig(task="mul4-aux", **TINY), mul4.N_POSITIONS_MODEL).eval()
    a, b = mul4.held_out(3, 300)
    heads = mul4.AuxHeads(TINY["d_model"], target)
    mse = mul4.fit_aux_heads(model, heads, a, b, ridge=0.0, batch_size=128)
    x = _last_attn_features(model, a, b)
    y = heads.targets(a, b).double().reshape(300, 8, -1).numpy()
    box, handle = mul4._last_attn_capture(model)
    with torch.no_grad():
        model(mul4.encode(a, b)[:, :-1])
        out = heads(box["attn_out"]).double().reshape(300, 8, -1).numpy()
    handle.remove()
    unit = 100.0 if target in mul4.SCALAR_AUX_TARGETS else 1.0
    for k in range(8):
        design = np.hstack([x[:, k], np.ones((300, 1))])
        coef = np.linalg.lstsq(design, y[:, k], rcond=None)[0]
        want = design @ coef
        np.testing.assert_allclose(out[:, k], want, rtol=2e-3, atol=2e-3)  # the heads hold float32
        assert mse[k] == pytest.approx(float(((want - y[:, k]) ** 2).mean()) * unit, rel=1e-3, abs=1e-6)
    assert mse[7] < mse[3]  # c_7's carry is nearly constant, ĉ_3 the widest: a random model's features fit c_7 best
    with pytest.raises(ArithInterpError, match="20 problems cannot fix 32 weights a head"):
        mul4.fit_aux_heads(model, heads, a[:20], b[:20])


def test_a_warm_start_fits_fresh_aux_heads_to_the_sources_attention(tmp_path):
    """aux_heads_fit: a warm start whose source regresses another target starts from heads fitted to the source's
    attention outputs; the record's errors are those of the saved start heads on the fitting problems, no worse
    than the best constant's and far below random heads'. Heads taken from the source are not refitted."""
    cfg = TrainConfig(task="mul4-aux", steps=6, **TINY)
    train(cfg, tmp_path / "sum", progress=False, schedule=mul4.Mul4Schedule(remove_per_stage=0, smoothing=0.0,
                                                                             aux_weight=1.0))  # fmt: skip
    units = mul4.Mul4Schedule(remove_per_stage=0, smoothing=0.0, aux_weight=1.0, aux_target="units",
                              init_from=str(tmp_path / "sum"), aux_heads_fit=True)  # fmt: skip
    train(cfg, tmp_path / "units", progress=False, schedule=units, max_steps_this_run=0)  # saves the start
    record = json.loads((tmp_path / "units" / "init.json").read_text())
    assert record["aux_heads"] == ("fitted by least squares to the source's attention outputs on 4096 problems (the "
                                   "source's heads regress aux_target='sum', not 'units')")  # fmt: skip
    start = torch.load(tmp_path / "units" / "checkpoint" / "checkpoint.pt", weights_only=True)["aux"]
    heads = mul4.AuxHeads(TINY["d_model"], "units")
    heads.load_state_dict(start)
    from transformers import GPT2LMHeadModel

    source = GPT2LMHeadModel.from_pretrained(tmp_path / "sum").eval()
    gen = torch.Generator().manual_seed(cfg.seed + mul4.AUX_FIT_SEED_OFFSET)
    a, b = mul4.ProblemSampler(cfg.seed, cfg.n_test)(mul4.AUX_FIT_PROBLEMS, gen)
    x = torch.from_numpy(_last_attn_features(source, a, b)).float()
    with torch.no_grad():
        err = ((heads(x, torch.zeros(len(a), dtype=torch.long)) - heads.targets(a, b)) ** 2).mean(0) * 100
        fresh = mul4.AuxHeads(TINY["d_model"], "units")
        err_fresh = ((fresh(x, torch.zeros(len(a), dtype=torch.long)) - heads.targets(a, b)) ** 2).mean(0) * 100
    assert err.tolist() == pytest.approx(record["aux_heads_fit_mse"], rel=1e-3)
    variance = heads.targets(a, b).var(0, unbiased=False) * 100  # the best constant's error; a fit with a bias beats it
    assert (err <= variance * (1 + 1e-4)).all() and err.sum() < err_fresh.sum() / 3
    same = dataclasses.replace(units, aux_target="sum")
    train(cfg, tmp_path / "same", progress=False, schedule=same, max_steps_this_run=0)
    assert json.loads((tmp_path / "same" / "init.json").read_text())["aux_heads"] == "from the source"
    with pytest.raises(ArithInterpError, match="aux_heads_fit=true .* needs init_from"):
        mul4.Mul4Schedule(remove_per_stage=0, aux_weight=1.0, aux_heads_fit=True)


@pytest.mark.parametrize("d_model, d_mlp", [(64, 128), (64, 64), (96, 192), (32, 256)])
def test_widening_a_model_keeps_its_function(d_model, d_mlp):
    """Net2Net widening (`widen_gpt2_weights`): with no noise, the wider model's logits are the narrow model's (the
    copies of each LayerNorm see the same statistics, query and key are rescaled for the longer heads, the tied
    unembedding's doubled read is undone in ln_f); with the default noise they move by little, but move."""
    cfg = TrainConfig(task="mul4-icot", steps=1, **TINY)  # d_model 32, d_mlp 64, 2 heads
    narrow = build_model(cfg, mul4.N_POSITIONS_MODEL).eval()
    with torch.no_grad():  # make biases and LayerNorms non-trivial, so that their rules are tested too
        for name, p in narrow.named_parameters():
            if "bias" in name or ".ln_" in name:
                p.add_(0.3 * torch.randn_like(p))
    tokens = torch.randint(0, len(mul4.VOCAB), (5, 30), generator=torch.Generator().manual_seed(1))
    wide_cfg = dataclasses.replace(cfg, d_model=d_model, d_mlp=d_mlp)
    with torch.no_grad():
        want = narrow(tokens).logits
        exact = build_model(wide_cfg, mul4.N_POSITIONS_MODEL).eval()
        exact.load_state_dict(mul4.widen_gpt2_weights(narrow.state_dict(), 2, d_model, d_mlp, noise=0))
        torch.testing.assert_close(exact(tokens).logits, want, atol=2e-5, rtol=1e-5)
        noisy = build_model(wide_cfg, mul4.N_POSITIONS_MODEL).eval()
        noisy.load_state_dict(mul4.widen_gpt2_weights(narrow.state_dict(), 2, d_model, d_mlp))
        moved = (noisy(tokens).logits - want).abs().max().item()
    assert 1e-4 < moved < 0.2 * want.abs().max().item()
    assert noisy.transformer.wte.weight is noisy.lm_head.weight  # still tied
    with pytest.raises(ArithInterpError, match="cannot widen d_model=32, d_mlp=64 to d_model=32, d_mlp=96"):
        mul4.widen_gpt2_weights(narrow.state_dict(), 2, 32, 96)


def test_a_run_can_start_from_a_narrower_runs_weights(tmp_path):
    """init_from a run of half the width: the record says it was widened, and the new run's first model is the
    widened one (same answers as the narrow model on the same problems)."""
    sched = mul4.Mul4Schedule(remove_per_stage=20, steps_per_stage=3)
    cfg = TrainConfig(task="mul4-icot", steps=12, **TINY)
    train(cfg, tmp_path / "narrow", progress=False, schedule=sched, max_steps_this_run=4)
    wide_cfg = dataclasses.replace(cfg, d_model=64, d_mlp=128)
    wide = build_model(wide_cfg, mul4.N_POSITIONS_MODEL)
    record = mul4.load_initial_weights(wide, str(tmp_path / "narrow"), seed=3)
    assert record["widened"] == {"d_model": [32, 64], "d_mlp": [64, 128], "noise": mul4.WIDEN_NOISE}
    narrow, *_ = mul4.checkpoint_model(tmp_path / "narrow")
    tokens = torch.randint(0, len(mul4.VOCAB), (4, 25), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = narrow(tokens).logits, wide.eval()(tokens).logits
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.95 and not torch.equal(a, b)
    source = str(tmp_path / "narrow")
    later = mul4.Mul4Schedule(start_removed=20, remove_per_stage=20, steps_per_stage=3, init_from=source)
    done = train(wide_cfg, tmp_path / "wide", progress=False, schedule=later)
    assert done["init"]["widened"]["d_model"] == [32, 64]


def test_run_origin_follows_warm_starts_back_to_a_fresh_run(tmp_path):
    first, second, third, other = (tmp_path / n for n in ("first", "second", "third", "other"))
    for run in (first, second, third, other):
        run.mkdir()
    (second / "init.json").write_text(json.dumps({"from": str(first), "kind": "run checkpoint", "step": 100}))
    card = {"init": {"from": str(second), "kind": "run checkpoint", "step": 50}}  # a finished run's card
    (third / "arithinterp.json").write_text(json.dumps(card))
    (other / "init.json").write_text(json.dumps({"from": "gpt2", "kind": "hub model", "location": "gpt2"}))
    assert [mul4.run_origin(r) for r in (first, second, third, other)] == [0, 100, 150, 0]
    # a finished model folder as the source: all of its logged steps, then its own origin
    model, after, lost = (tmp_path / n for n in ("model", "after", "lost"))
    model.mkdir()
    (model / "training_log.jsonl").write_text("\n".join(json.dumps({"step": s}) for s in (20, 40)) + "\n")
    (model / "arithinterp.json").write_text(json.dumps({"init": {"from": str(third), "kind": "local model"}}))
    for run, source in ((after, model), (lost, tmp_path / "nowhere")):
        run.mkdir()
        (run / "init.json").write_text(json.dumps({"from": str(source), "kind": "local model"}))
    with pytest.raises(ArithInterpError, match="third' holds neither a checkpoint nor training_log.jsonl"):
        mul4.run_origin(model)  # a source that is there must have a log: no silent 0
    (third / "training_log.jsonl").write_text(json.dumps({"step": 70}) + "\n")
    assert [mul4.run_origin(r) for r in (model, after, lost)] == [70 + 150, 40 + 70 + 150, 0]
    log = [{"step": 50, "stage": 0, "removed": 21, "loss": 1.0},
           {"step": 100, "stage": 0, "removed": 21, "loss": 0.5, "eval_exact_match": 0.25,
            "eval_answer_exact_match": 0.5},
           {"step": 150, "stage": 1, "removed": 22, "loss": 0.9}]  # fmt: skip
    fig = plots.internalization_figure({"C": log, "E": log}, origins={"E": 1000})
    whole, answer, removed = fig.data[3:6]  # run E's three traces
    assert list(whole.x) == [1100] and list(whole.y) == [0.25] and list(answer.y) == [0.5]
    assert list(removed.x) == [1050, 1100, 1150] and list(removed.y) == [21, 21, 22]
    assert list(fig.data[0].x) == [100]  # run C, no origin


def test_run_lineage_sums_each_run_up_to_the_step_taken_from_it(tmp_path, monkeypatch):
    """A chain fresh → A (taken at step 100 of 150) → B (all of its 60 steps): the totals count A's first 100
    steps only, at A's batch; a finished model folder taken up counts all its steps; a source no longer there is
    marked missing; a loop is refused."""
    a, b, gone = tmp_path / "a", tmp_path / "b", tmp_path / "gone"

    def make(run, batch, seed, log, init=None):
        (run / "checkpoint").mkdir(parents=True)
        cfg = {"batch_size": batch, "seed": seed, "d_model": 8}
        (run / "checkpoint" / "settings.json").write_text(json.dumps({"train_config": cfg, "schedule": {}}))
        torch.save({"log": log}, run / "checkpoint" / "checkpoint.pt")
        if init is not None:
            (run / "init.json").write_text(json.dumps({"from": str(init[0]), "kind": "run checkpoint",
                                                       "step": init[1]}))  # fmt: skip

    def entry(step, removed, t):
        return {"step": step, "stage": 0, "removed": removed, "time_s": t}

    make(a, 4, 0, [entry(50, 3, 10.0), entry(100, 4, 25.0), entry(150, 5, 40.0)])
    make(b, 8, 1, [entry(30, 5, 7.0), entry(60, 6, 13.0)], init=(a, 100))
    links = mul4.run_lineage(b)
    assert [(link["run"], link["steps"], link["time_s"], link["problems"], link["removed"]) for link in links] == [
        (str(a), 100, 25.0, 400, (3, 4)),
        (str(b), 60, 13.0, 480, (5, 6)),
    ]
    assert [link["seed"] for link in links] == [0, 1]
    # a finished model folder taken up whole (kind "local model"), and a built-in (by name, from data/models)
    m, c, d = tmp_path / "m", tmp_path / "c", tmp_path / "d"
    m.mkdir()
    (m / "training_log.jsonl").write_text("\n".join(json.dumps(entry(s, 6, s / 2)) for s in (20, 40)) + "\n")
    card = {"train_config": {"batch_size": 2, "seed": 3, "d_model": 8}, "init": {"from": str(b), "kind":
            "run checkpoint", "step": 60}}  # fmt: skip
    (m / "arithinterp.json").write_text(json.dumps(card))
    make(c, 8, 1, [entry(10, 6, 1.0)])
    (c / "init.json").write_text(json.dumps({"from": str(m), "kind": "local model", "location": str(m)}))
    assert [(link["run"], link["steps"], link["time_s"], link["problems"]) for link in mul4.run_lineage(c)] == [
        (str(a), 100, 25.0, 400),
        (str(b), 60, 13.0, 480),
        (str(m), 40, 20.0, 80),
        (str(c), 10, 1.0, 80),
    ]
    monkeypatch.setattr(models, "BUILTIN_DIR", tmp_path)
    make(d, 8, 1, [entry(10, 6, 1.0)])
    (d / "init.json").write_text(json.dumps({"from": "m", "kind": "builtin model", "location": "elsewhere"}))
    assert [link["run"] for link in mul4.run_lineage(d)] == [str(a), str(b), str(m), str(d)]
    assert mul4.run_origin(d) == 100 + 60 + 40
    (c / "init.json").write_text(json.dumps({"from": str(gone), "kind": "local model"}))
    assert mul4.run_lineage(c)[0] == {"run": str(gone), "steps": None, "missing": True}
    (a / "init.json").write_text(json.dumps({"from": str(gone), "kind": "run checkpoint", "step": 7}))
    assert mul4.run_lineage(b)[0] == {"run": str(gone), "steps": 7, "missing": True}
    (a / "init.json").write_text(json.dumps({"from": str(b), "kind": "run checkpoint", "step": 30}))
    with pytest.raises(ArithInterpError, match="loop"):
        mul4.run_lineage(b)


def test_replay_rebuilds_the_problems_each_training_batch_held(tmp_path, monkeypatch):
    """The replayed problems are those the training loop drew (recorded here as it trains), across a stage with
    removal smoothing and the last stage, which draws no offsets; a source taken at step 5 contributes its first 5
    batches only; a checkpoint whose generator state the replay does not reach is refused."""
    drawn: list[list[int]] = []
    real = mul4.training_batch

    def recording(*args):
        a, b, seq, pos = real(*args)
        drawn.append((a * 10**mul4.DIGITS + b).tolist())
        return a, b, seq, pos

    monkeypatch.setattr(mul4, "training_batch", recording)
    sched = mul4.Mul4Schedule(remove_per_stage=1, start_removed=42, steps_per_stage=3, smoothing_per="example",
                              keep_position=True, advance_at=1.0)  # fmt: skip
    # adaptive stages that a tiny model never passes, so each runs out of steps: 42 at 0-2, 43 at 3-5, 44 from 6
    cfg = TrainConfig(task="mul4-icot", steps=20, **TINY)
    train(cfg, tmp_path / "a", progress=False, schedule=sched, max_steps_this_run=9)
    assert len(drawn) == 9
    assert mul4.replay_training_problems(tmp_path / "a").tolist() == sorted({k for d in drawn for k in d})
    assert mul4.replay_training_problems(tmp_path / "a", 5).tolist() == sorted({k for d in drawn[:5] for k in d})

    later = dataclasses.replace(sched, start_removed=44, init_from=str(tmp_path / "a"))
    drawn_a = list(drawn)
    train(dataclasses.replace(cfg, seed=1, steps=4), tmp_path / "b", progress=False, schedule=later)
    b_only = [k for d in drawn[9:] for k in d if k not in {k for d in drawn_a for k in d}]
    query = torch.tensor([k for d in drawn_a for k in d] + b_only)
    seen = mul4.seen_by_sources(tmp_path / "b", query // 10**mul4.DIGITS, query % 10**mul4.DIGITS)
    assert seen.tolist() == [True] * sum(map(len, drawn_a)) + [False] * len(b_only) and b_only

    state = torch.load(tmp_path / "a" / "checkpoint" / "checkpoint.pt", weights_only=True)
    state["stages"] = {"starts": [0, 3, 4]}  # the last stage (no offsets drawn) said to begin two steps early
    torch.save(state, tmp_path / "a" / "checkpoint" / "checkpoint.pt")
    with pytest.raises(ArithInterpError, match="did not end in the generator state"):
        mul4.replay_training_problems(tmp_path / "a")
    with pytest.raises(ArithInterpError, match="upto=10: .* has trained 9 steps"):
        mul4.replay_training_problems(tmp_path / "b" / ".." / "a", 10)


def test_held_out_unseen_leaves_out_the_problems_a_source_drew(tmp_path, monkeypatch):
    """A held-out set made of 10 problems that the source run trained on and 10 it did not: the strict figure is
    the greedy result on the 10 it did not, and the whole-set figure is unchanged."""
    sched = mul4.Mul4Schedule(remove_per_stage=20, steps_per_stage=3)
    cfg = TrainConfig(task="mul4-icot", steps=12, **TINY)
    train(cfg, tmp_path / "a", progress=False, schedule=sched, max_steps_this_run=6)
    drawn = mul4.replay_training_problems(tmp_path / "a")[:10]
    fresh_a, fresh_b = mul4.random_pairs(10, 99, mul4.DIGITS)
    test_a, test_b = torch.cat([drawn // 10**mul4.DIGITS, fresh_a]), torch.cat([drawn % 10**mul4.DIGITS, fresh_b])
    real = mul4.held_out  # the source (seed 0) keeps its own held-out set, which its sampler left out
    monkeypatch.setattr(mul4, "held_out", lambda seed, n: (test_a[:n], test_b[:n]) if seed == 1 else real(seed, n))
    finish = dataclasses.replace(sched, start_removed=44, init_from=str(tmp_path / "a"))
    train(dataclasses.replace(cfg, seed=1, steps=4), tmp_path / "b", progress=False, schedule=finish)
    r = mul4.held_out_unseen(tmp_path / "b")
    assert (r["n"], r["seen_by_sources"]) == (20, 10)
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(tmp_path / "b").eval()
    assert r["unseen"] == mul4.greedy_eval(model, 1, 20, problems=(fresh_a, fresh_b))
    assert r["all"] == mul4.greedy_eval(model, 1, 20) == json.loads((tmp_path / "b" / "arithinterp.json").read_text())[
        "held_out"]  # fmt: skip
    with pytest.raises(ArithInterpError, match="holds no arithinterp.json"):
        mul4.held_out_unseen(tmp_path / "a")

    card = mul4.record_lineage(tmp_path / "b")
    assert card == json.loads((tmp_path / "b" / "arithinterp.json").read_text())
    assert [(link["run"], link["steps"], link["seed"]) for link in card["lineage"]] == [
        (str(tmp_path / "a"), 6, 0), (str(tmp_path / "b"), 4, 1)]  # fmt: skip
    assert card["held_out_unseen"] == {"seen_by_sources": 10, "n": 10, **r["unseen"]}
    card["held_out"]["exact_match"] = 0.5  # a card that does not describe the weights
    (tmp_path / "b" / "arithinterp.json").write_text(json.dumps(card))
    with pytest.raises(ArithInterpError, match="differs from its card"):
        mul4.record_lineage(tmp_path / "b")


def test_replay_ends_in_the_generator_state_of_the_committed_runs():
    """Known truth from a real run: the seed-3 line drew 5,000 batches at 42 tokens removed and 3,500 at 43, then
    passed into the no-cot stage (which draws no offsets) at its checkpoint; the replay must land on the generator
    state saved there, which it misses if it takes any of those steps for the last stage."""
    run = Path(__file__).parents[1] / "data" / "runs" / "icot-b256-seed3-from42"
    if not (run / "checkpoint" / "checkpoint.pt").is_file():
        pytest.skip("data/runs/icot-b256-seed3-from42 is not in this checkout")
    state = torch.load(run / "checkpoint" / "checkpoint.pt", weights_only=True)
    assert state["stages"]["starts"] == [0, 5000, 8500] and state["step"] == 8500
    keys = mul4.replay_training_problems(run)
    draws, space = 256 * state["step"], 10**8
    expected = space * (1 - np.exp(-draws / space))  # distinct problems among uniform draws (~1% come twice)
    assert abs(len(keys) - expected) < 1_000  # the number of repeats has a standard deviation of ~150


def test_committed_runs_are_found_from_any_folder(tmp_path, monkeypatch):
    """Records name the committed runs from the project root (data/runs/...); run_lineage follows them from
    elsewhere too (a notebook runs in a scratch folder), keeping the names as recorded."""
    if not (Path(__file__).parents[1] / "data" / "runs" / "icot-b256-seed3-from42").is_dir():
        pytest.skip("data/runs is not in this checkout")
    monkeypatch.chdir(tmp_path)
    links = mul4.run_lineage("data/runs/icot-b256-seed3-from42")
    assert [link["run"] for link in links] == ["data/runs/icot-r1-keeppos", "data/runs/icot-b256-from30",
                                               "data/runs/icot-b256-seed1-from33", "data/runs/icot-b256-seed2-from35",
                                               "data/runs/icot-b256-seed3-from42"]  # fmt: skip
    assert not any(link.get("missing") for link in links) and links[-1]["steps"] == 8500
    assert mul4.run_origin(mul4.run_folder("data/runs/icot-b256-seed3-from42")) == 52500 + 45000 + 30500 + 30000
    assert mul4.run_folder("runs/nowhere") == Path("runs/nowhere")
    logs, origins = mul4.lineage_logs("data/runs/icot-b256-seed3-from42")
    assert list(origins.values()) == [0, 52500, 97500, 128000, 158000] and list(logs) == list(origins)
    assert [log[-1]["step"] for log in logs.values()] == [52500, 45000, 30500, 30000, 8500]  # cut where taken


def test_a_run_resumed_with_more_steps_is_the_longer_run(tmp_path):
    """Raising `steps` before the last stage gives, bit for bit, the run started with the larger steps; lowering
    it, or raising it once the last stage (whose learning rate decays over `steps`) has begun, is refused."""
    sched = mul4.Mul4Schedule(remove_per_stage=20, steps_per_stage=3)  # stages at 0, 3, 6, the last (no CoT) at 9
    cfg = TrainConfig(task="mul4-icot", steps=14, **TINY)
    train(cfg, tmp_path / "straight", progress=False, schedule=sched)
    short = dataclasses.replace(cfg, steps=12)
    assert train(short, tmp_path / "ext", progress=False, schedule=sched, max_steps_this_run=5)["stage"] == 1
    with pytest.raises(ArithInterpError, match="steps can only be raised"):
        train(dataclasses.replace(cfg, steps=10), tmp_path / "ext", progress=False, schedule=sched)
    done = train(cfg, tmp_path / "ext", progress=False, schedule=sched)
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "ext" / "model.safetensors")
    assert done["train_config"]["steps"] == 14 and all(torch.equal(a[k], b[k]) for k in a)
    train(short, tmp_path / "late", progress=False, schedule=sched, max_steps_this_run=9)  # now in the last stage
    with pytest.raises(ArithInterpError, match="only before the last stage"):
        train(cfg, tmp_path / "late", progress=False, schedule=sched)
    with pytest.raises(ArithInterpError, match="other settings"):  # another difference besides steps
        train(dataclasses.replace(cfg, lr=0.5), tmp_path / "late", progress=False, schedule=sched)


@pytest.mark.slow
def test_an_adaptive_run_may_raise_its_stage_cap(tmp_path, monkeypatch):
    """Raising steps_per_stage while every stage so far passed advance_at gives, bit for bit, the run started with
    the larger cap; once a stage has run out of steps under the old cap (or without adaptive stages), it is
    refused, since the larger cap would have kept that stage going. Also through `train --resume --set`."""
    from arithinterp.cli import main

    real, validation = mul4.evaluate, {"exact_match": 1.0}  # what every validation evaluation is made to say

    def evaluate(model, seed, n, removed=mul4.COT_LEN, batch_size=500, problems=None):
        return real(model, seed, n, removed, batch_size, problems) | (validation if problems is not None else {})

    monkeypatch.setattr(mul4, "evaluate", evaluate)
    passing = mul4.Mul4Schedule(remove_per_stage=20, steps_per_stage=5, advance_at=0.5)  # evaluations every 4 steps
    cfg = TrainConfig(task="mul4-icot", steps=16, **TINY)
    wide, longer = dataclasses.replace(passing, steps_per_stage=6), dataclasses.replace(cfg, steps=19)
    train(longer, tmp_path / "straight", progress=False, schedule=wide)
    assert train(cfg, tmp_path / "raised", progress=False, schedule=passing, max_steps_this_run=5)["stage"] == 1
    done = train(longer, tmp_path / "raised", progress=False, schedule=wide)
    assert done["schedule"]["steps_per_stage"] == 6 and done["stage_starts"] == [0, 4, 8, 12]
    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "raised" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    train(cfg, tmp_path / "cli", progress=False, schedule=passing, max_steps_this_run=5)
    assert main(["train", "--resume", str(tmp_path / "cli"), "--steps", "19", "--set", "steps_per_stage=6"]) == 0
    c = load_file(tmp_path / "cli" / "model.safetensors")
    assert all(torch.equal(a[k], c[k]) for k in a)
    train(cfg, tmp_path / "lower", progress=False, schedule=passing, max_steps_this_run=2)
    with pytest.raises(ArithInterpError, match="steps_per_stage can only be raised"):
        train(cfg, tmp_path / "lower", progress=False, schedule=dataclasses.replace(passing, steps_per_stage=4))

    validation["exact_match"] = 0.0  # no stage passes: stage 0 runs out of its 5 steps at step 5
    train(cfg, tmp_path / "stuck", progress=False, schedule=passing, max_steps_this_run=6)
    with pytest.raises(ArithInterpError, match="steps_per_stage can only be raised.*none ran out of steps"):
        train(longer, tmp_path / "stuck", progress=False, schedule=wide)
    fixed = mul4.Mul4Schedule(remove_per_stage=20, steps_per_stage=5)
    train(cfg, tmp_path / "fixed", progress=False, schedule=fixed, max_steps_this_run=2)
    with pytest.raises(ArithInterpError, match=r"in a run with adaptive stages \(advance_at\)"):
        train(longer, tmp_path / "fixed", progress=False, schedule=dataclasses.replace(fixed, steps_per_stage=6))


@pytest.mark.slow
def test_sft_and_aux_learn_and_export(tmp_path):
    cfg = TrainConfig(task="mul4-aux", steps=50, **{**TINY, "eval_every": 50, "checkpoint_every": 50, "lr": 3e-3})
    summary = train(cfg, tmp_path / "aux", progress=False)
    log = [json.loads(line) for line in (tmp_path / "aux" / "training_log.jsonl").read_text().splitlines()]
    a, b = mul4.held_out(5, 2000)
    cs = mul4.running_sums(a, b)
    assert log[-1]["loss"] < 0.8 * np.log(len(build_char_tokenizer()))  # below the loss of uniform guessing
    assert log[-1]["aux_mse"] < 0.5 * float((cs**2).mean())  # the head learnt more than predicting 0
    assert (tmp_path / "aux" / "aux_heads.safetensors").is_file()
    from transformers import GPT2LMHeadModel

    trained = GPT2LMHeadModel.from_pretrained(tmp_path / "aux").eval()
    assert summary["held_out"] == mul4.greedy_eval(trained, cfg.seed, cfg.n_test)  # the saved model's, no-cot greedy
    sft = TrainConfig(task="mul4-sft", steps=10, **TINY)
    assert train(sft, tmp_path / "sft", progress=False, max_steps_this_run=6)["finished"] is False
    exported = mul4.export_checkpoint(tmp_path / "sft", tmp_path / "shipped")
    assert exported["finished"] is False and exported["step"] == 6
    assert exported["resume"] == f"arithinterp train --resume {tmp_path / 'sft'}"
    from arithinterp.models import load

    assert load(str(tmp_path / "shipped")).cfg.n_layers == 2


# ---------------------------------------------------------------------------------------------------------
# Analyses against planted truths


class DigitReader:
    """A fake model whose logit at the position predicting c_k (k < 4) is the token id at a_k, for every token."""

    def __call__(self, tokens):
        logits = torch.zeros(*tokens.shape, 60)
        for k in range(4):
            logits[:, mul4.EQ_POS + k] = tokens[:, ma.A_POS[k], None].float()
        return logits


def test_digit_swap_finds_the_planted_dependencies():
    a, b = ma.problems(200, 0)
    heat = ma.digit_swap_attribution(DigitReader(), a, b)
    assert heat.shape == (8, 8)
    planted = np.zeros((8, 8), dtype=bool)
    planted[range(4), range(4)] = True  # c_k reads a_k only
    assert (heat[~planted] == 0).all()
    assert (heat[planted] > 2).all()  # |new - old| of two different random digits averages 3.3


def test_ridge_probes_recover_planted_running_sums():
    a, b = ma.problems(400, 0)
    hook = "blocks.1.hook_resid_mid"
    cs = mul4.running_sums(a, b)
    acts = torch.randn(400, 20, 16)
    planted = acts.clone()
    planted[:, mul4.EQ_POS : mul4.EQ_POS + 8, 3] = cs  # ĉ_k written on feature 3 at its position
    model = type("M", (), {"cfg": type("C", (), {"n_layers": 2})()})()
    good = ma.running_sum_probes(model, a, b, acts={hook: planted})
    bad = ma.running_sum_probes(model, a, b, acts={hook: acts})
    assert max(good.mae[:7]) < 0.5 and min(good.r2[:7]) > 0.99
    assert min(good.readout_accuracy) > 0.99  # round(ĉ_k) mod 10 is the digit
    for k in range(7):  # noise: no better than guessing the mean
        assert bad.mae[k] > 0.9 * bad.mean_abs_target[k]
        assert bad.readout_accuracy[k] < 0.35  # ~ the share of the most common digit, not the digit read off
    pp = ma.partial_product_probes(model, a, b, hooks=[hook], positions=[mul4.EQ_POS + 2], acts={
        hook: torch.cat([planted, torch.tensor([m["partial_products"][1][2] for m in ma.metadata(a, b)]).float()
                         [:, None, None].expand(400, 20, 1)], -1)})  # fmt: skip
    assert pp.r2.shape == (1, 1, 4, 4) and pp.r2[0, 0, 1, 2] > 0.99 and pp.control_r2 < 0.2


def test_digit_field_probes_find_the_hook_that_holds_the_field():
    """Column sums s_k planted on one feature of the second hook, carries on the third, noise in the first: the
    s_k probe is exact only where s_k was written, and no better than guessing the mean elsewhere."""
    a, b = ma.problems(400, 0)
    meta = ma.metadata(a, b)
    s = torch.tensor([m["column_sums"] for m in meta]).float()
    carries = torch.tensor([m["carries"] for m in meta]).float()
    noise, with_s, with_carry = (torch.randn(400, 20, 12) for _ in range(3))
    with_s[:, mul4.EQ_POS : mul4.EQ_POS + 8, 5] = s
    with_carry[:, mul4.EQ_POS : mul4.EQ_POS + 8, 2] = carries
    acts = {"noise": noise, "s": with_s, "carry": with_carry}
    model = type("M", (), {"cfg": type("C", (), {"n_layers": 2})()})()
    probe = ma.digit_field_probes(model, a, b, "column_sums", hooks=["noise", "s", "carry"], acts=acts)
    assert probe.mae.shape == (3, 8) and probe.hooks == ["noise", "s", "carry"]
    varying = range(7)  # s_7 is always 0
    assert max(probe.mae[1, k] for k in varying) < 0.25 and min(probe.r2[1, k] for k in varying) > 0.99
    assert min(probe.rounded_exact[1]) > 0.99
    for k in varying:
        assert probe.mae[0, k] > 0.9 * probe.mean_abs_deviation[k]  # noise: no better than the mean
        assert probe.control_mae[1, k] > 0.9 * probe.mean_abs_deviation[k]  # shuffled labels: nothing to find
    assert probe.r2[2, 3] < 0.5  # the carry into place 3 says little about s_3
    carry_probe = ma.digit_field_probes(model, a, b, "carries", hooks=["s", "carry"], acts=acts)
    assert min(carry_probe.rounded_exact[1]) > 0.99
    assert carry_probe.rounded_exact[0, 3] < 0.9  # the carry into 3 is not a linear function of s_3 alone
    with_units = noise.clone()
    with_units[:, mul4.EQ_POS : mul4.EQ_POS + 8, 7] = torch.tensor([m["unit_sums"] for m in meta]).float()
    acts["units"] = with_units
    units_probe = ma.digit_field_probes(model, a, b, "unit_sums", hooks=["s", "units"], acts=acts)
    assert min(units_probe.rounded_exact[1]) > 0.99
    assert max(units_probe.rounded_exact[0, 1:7]) < 0.5  # U_k is not s_k: the products' tens are dropped
    rec = json.loads(json.dumps(probe.record()))
    assert rec["field"] == "column_sums" and rec["positions"] == list(range(mul4.EQ_POS, mul4.EQ_POS + 8))
    assert [ma.digit_field(t) for t in ("running-sum", "Running_Sums", "carry", "column-sum", "unit-sum", "a",
                                        "result")] == [
        "running_sums", "running_sums", "carries", "column_sums", "unit_sums", None, None]  # fmt: skip
    with pytest.raises(ArithInterpError, match="'partial_products' is not a per-digit field"):
        ma.digit_field_probes(model, a, b, "partial_products", acts=acts)
    with pytest.raises(ArithInterpError, match="6 problems are too few for 5-fold"):
        ma.digit_field_probes(model, a[:6], b[:6], hooks=["s"], acts={"s": with_s[:6]})


def test_a_varying_layernorm_scale_blurs_the_running_sum():
    """ĉ_k written on one direction and divided by a per-problem scale of 1 ± 10% (what a LayerNorm does to it when
    the rest of the residual's norm varies): still correlated, but off by several units at the large middle sums,
    so c_k can no longer be read off it, while c_7 (ĉ_7 <= 9) survives."""
    a, b = ma.problems(1000, 0)
    hook = "blocks.1.mlp.hook_in"
    cs = mul4.running_sums(a, b)
    scale = 1 + 0.1 * torch.randn(1000, 1)
    acts = 0.01 * torch.randn(1000, 20, 8)
    acts[:, mul4.EQ_POS : mul4.EQ_POS + 8, 0] = cs / scale
    model = type("M", (), {"cfg": type("C", (), {"n_layers": 2})()})()
    blurred = ma.running_sum_probes(model, a, b, hook=hook, acts={hook: acts})
    assert blurred.r2[3] > 0.9 and blurred.mae[3] > 3 and blurred.readout_accuracy[3] < 0.3
    assert blurred.readout_accuracy[7] > 0.85  # ĉ_7 <= 9: a 10% blur seldom moves it by 0.5 or more
    scales = torch.ones(2, 20, 1)
    scales[1, mul4.EQ_POS : mul4.EQ_POS + 8] = 3.0  # per position: values 1 and 3, mean 2, std √2
    assert ma.scale_variation({"s": scales}, "s") == [round(2**0.5 / 2, 4)] * 8


def test_attention_graph_reads_the_planted_pair():
    a, b = ma.problems(10, 0)
    pat = torch.zeros(10, 2, 20, 20)
    pat[:, 0, :, ma.A_POS[1]] = 0.6  # head L0H0 attends to a_1 and b_2 from every position
    pat[:, 0, :, ma.B_POS[2]] = 0.4
    pat[:, 1, :, 0] = 1.0  # head L0H1 attends to <bos>
    model = type("M", (), {"cfg": type("C", (), {"n_layers": 1})()})()
    g = ma.attention_graph(model, a, b, acts={"blocks.0.attn.hook_pattern": pat})
    assert g.pattern.shape == (1, 2, 8, 20)
    assert all(p["a"] == 1 and p["b"] == 2 and p["operand_share"] == pytest.approx(1.0) for p in g.pairs[0][0])
    assert g.pairs[0][1][0]["operand_share"] == 0
    top = g.edges(0.5)[0]
    assert (top["head"], top["token"]) in {(1, "<bos>")} and g.token_labels[ma.A_POS[1]] == "a1"


@pytest.mark.slow
def test_run_all_on_a_tiny_random_model(tmp_path, char_tokenizer):
    from arithinterp.models import load
    from tests.conftest import build_random_gpt2

    model = load(str(build_random_gpt2(tmp_path / "m", char_tokenizer, n_layer=2, d_model=32)))
    config = ma.Mul4AnalysisConfig(n=120, folds=3)
    report = ma.run_all(model, config, progress=False)
    rec = json.loads(json.dumps(report.record()))
    assert np.asarray(rec["digit_swap"]["mean_abs_logit_change"]).shape == (8, 8)
    assert len(rec["running_sum_probe"]["mae_per_k"]) == 8
    mlp_in = rec["running_sum_probe_mlp_in"]
    assert mlp_in["hook"] == "blocks.1.mlp.hook_in" and len(mlp_in["readout_accuracy_per_k"]) == 8
    assert all(v > 0 for v in mlp_in["ln_scale_cv_per_k"])
    assert np.asarray(rec["partial_product_probe"]["r2"]).shape == (4, 9, 4, 4)
    assert set(rec["fourier"]) == {"embedding", "final_state_c3"}
    assert rec["accuracy"] == ma.accuracy(model, *ma.problems(config.n, config.seed))  # one cached pass = its own
    assert len(report.pca["coords"]) == 120 and len(ma.figures(report, title="t")) == 5


@pytest.mark.slow
def test_cli_mul4_analyze(tmp_path, char_tokenizer, capsys):
    from arithinterp.cli import main
    from tests.conftest import build_random_gpt2

    folder = build_random_gpt2(tmp_path / "m", char_tokenizer, n_layer=2, d_model=32)
    assert main(["mul4-analyze", "--model", str(folder), "--n", "60", "--out", str(tmp_path / "out")]) == 0
    rec = json.loads((tmp_path / "out" / "mul4-analyze.json").read_text())
    assert rec["task"] == "mul4" and rec["n"] == 60 and len(rec["running_sum_probe"]["mae_per_k"]) == 8
    assert (tmp_path / "out" / "mul4-analyze.html").is_file()
    printed = capsys.readouterr().out
    assert "blocks.1.mlp.hook_in" in printed and "round(prediction) mod 10 = c_k" in printed
    assert main(["mul4-analyze", "--model", str(folder), "--n", "3", "--out", str(tmp_path / "o2")]) == 2


def test_analyses_refuse_a_model_with_another_vocabulary(gpt2_tiny_dir, tiny_model):
    """A GPT-2-vocabulary model would be fed the character ids of `mul4.encode` and read garbage: refused with a
    message naming the model and a token, before anything runs; the built-ins' character vocabulary passes."""
    from arithinterp.models import load

    gpt2 = load(str(gpt2_tiny_dir))
    a, b = ma.problems(20, 0)
    with pytest.raises(ArithInterpError, match=r"multiplication vocabulary \(token '<pad>' is not in its vocabulary"):
        ma.accuracy(gpt2, a, b)
    with pytest.raises(ArithInterpError, match="multiplication vocabulary"):
        ma.digit_field_probes(gpt2, a, b, hooks=["blocks.0.hook_resid_post"])
    ma.check_vocabulary(tiny_model)  # the character tokenizer every built-in shares


@pytest.mark.slow
def test_cli_probe_running_sum_per_digit(tmp_path, char_tokenizer, capsys):
    """The issue's command, `probe --task mul4 --target running-sum`: ĉ_k at the position predicting c_k, for every
    residual hook (or the --hook patterns chosen), with probe.json and a figure."""
    from arithinterp.cli import main
    from tests.conftest import build_random_gpt2

    folder = build_random_gpt2(tmp_path / "m", char_tokenizer, n_layer=2, d_model=32)
    args = ["probe", "--model", str(folder), "--task", "mul4", "--target", "running-sum", "--n", "60"]
    assert main([*args, "--out", str(tmp_path / "all")]) == 0
    rec = json.loads((tmp_path / "all" / "probe.json").read_text())
    assert rec["target"] == rec["field"] == "running_sums" and rec["n"] == 60 and rec["method"] == "linear-probe"
    assert rec["hooks"] == ["blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid", "blocks.0.hook_resid_post",
                            "blocks.1.hook_resid_mid", "blocks.1.hook_resid_post"]  # fmt: skip
    assert np.asarray(rec["mae"]).shape == (5, 8) and (tmp_path / "all" / "probe.html").is_file()
    assert "blocks.1.hook_resid_mid" in capsys.readouterr().out
    assert main([*args, "--hook", "blocks.1.hook_attn_out", "--out", str(tmp_path / "one")]) == 0
    assert json.loads((tmp_path / "one" / "probe.json").read_text())["hooks"] == ["blocks.1.hook_attn_out"]
    assert main([*args, "--hook", "blocks.9.*", "--out", str(tmp_path / "bad")]) == 2
    assert "matches none" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main([*args, "--positions", "3", "--estimator", "ridge", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "takes no --positions, --estimator" in err and "--target 'running_sums[3]'" in err
    assert not (tmp_path / "bad").exists()
    assert main(["probe", "--store", str(tmp_path), "--target", "carry", "--out", str(tmp_path / "bad")]) == 2
    assert "which a store does not hold" in capsys.readouterr().err


def test_seen_by_sources_needs_no_replay_for_a_sources_own_held_out_set(tmp_path, monkeypatch):
    """A warm start from a finished model folder (no checkpoint to replay) of the same seed: its held-out set was
    kept out of the source's batches, so none of it counts as seen, without a replay. Problems outside the source's
    held-out set still need the replay, which a model folder cannot give: that raises."""
    cfg = TrainConfig(task="mul4-aux", steps=4, **TINY)
    sched = mul4.Mul4Schedule(remove_per_stage=0, smoothing=0.0, aux_weight=1.0)
    train(cfg, tmp_path / "done", progress=False, schedule=sched)
    assert not (tmp_path / "done" / "checkpoint").exists()
    later = dataclasses.replace(sched, init_from=str(tmp_path / "done"))
    train(dataclasses.replace(cfg, steps=2), tmp_path / "b", progress=False, schedule=later)
    a, b = mul4.held_out(cfg.seed, cfg.n_test)
    replays = []
    monkeypatch.setattr(mul4, "replay_training_problems", lambda *args: replays.append(args) or torch.zeros(0))
    assert not mul4.seen_by_sources(tmp_path / "b", a, b).any() and not replays
    assert mul4.held_out_unseen(tmp_path / "b")["seen_by_sources"] == 0
    monkeypatch.undo()
    other_a, other_b = mul4.held_out(cfg.seed + 1, 5)  # another seed's: the source may have drawn them
    with pytest.raises(ArithInterpError, match="holds no checkpoint"):
        mul4.seen_by_sources(tmp_path / "b", other_a, other_b)
