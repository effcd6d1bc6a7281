"""Activation store: values equal transformer-lens's cache, disk equals memory, resumes byte-identically."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from arithinterp._errors import ArithInterpError
from arithinterp.store import (
    ActivationStore,
    StoreConfig,
    TaskStream,
    activation_rms,
    collect,
    resolve_hooks,
    write_store,
)
from arithinterp.tasks import TaskConfig, make_dataset

REPO = Path(__file__).resolve().parents[1]
HOOKS = ("blocks.*.hook_resid_post", "blocks.0.attn.hook_pattern", "blocks.1.attn.hook_z")


@pytest.fixture(scope="module")
def dataset(tiny_model):
    return make_dataset(tiny_model.tokenizer, TaskConfig(n=120))


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_collect_equals_run_with_cache(tiny_model, dataset):
    cfg = StoreConfig(hooks=HOOKS, positions=(-1, 3), batch_size=16)
    store = collect(tiny_model, dataset, cfg, progress=False)
    assert store.positions == [8, 3] and store.n == 120
    assert store.hooks[0] == "blocks.0.attn.hook_pattern"  # model order: block 0's attention before its output
    _, cache = tiny_model.run_with_cache(dataset.clean_tokens[:20])
    for layer in range(3):
        name = f"blocks.{layer}.hook_resid_post"
        torch.testing.assert_close(store.get(name, examples=range(20)), cache[name][:, [8, 3]], rtol=0, atol=1e-6)
    pattern = cache["blocks.0.attn.hook_pattern"][:, :, [8, 3]]  # query positions on axis 2
    torch.testing.assert_close(store.get("blocks.0.attn.hook_pattern", examples=range(20)), pattern, rtol=0, atol=1e-6)
    assert store.shape("blocks.1.attn.hook_z") == (120, 2, 4, 16)
    assert store.manifest["hooks"]["blocks.1.attn.hook_z"]["axes"] == ["example", "pos", "head", "d_head"]
    assert torch.equal(store.tokens(), dataset.clean_tokens)


def test_disk_equals_memory_with_selection(tiny_model, dataset, tmp_path):
    cfg = StoreConfig(hooks=HOOKS, positions=(-1, 3), batch_size=16, shard_size=50)  # 50: not a multiple of 16
    mem = collect(tiny_model, dataset, cfg, progress=False)
    disk = write_store(tiny_model, dataset, tmp_path / "s", cfg, progress=False)
    assert len(disk.manifest["shards"]) == 3
    pick = [119, 0, 49, 50, 77, 3]  # out of order, across shard boundaries
    for hook in disk.hooks:
        assert torch.equal(disk.get(hook), mem.get(hook))
        assert torch.equal(disk.get(hook, examples=pick, positions=[3]), mem.get(hook, examples=pick, positions=[3]))
        assert torch.equal(disk.get(hook, examples=slice(45, 60)), mem.get(hook)[45:60])
    assert torch.equal(
        disk.get("blocks.0.hook_resid_post", positions=[-1])[:, 0], mem.get("blocks.0.hook_resid_post")[:, 0]
    )
    assert torch.equal(disk.tokens(pick), dataset.clean_tokens[pick])
    chunks = [a for _, a in disk.iter_shards("blocks.2.hook_resid_post")]
    assert [len(c) for c in chunks] == [50, 50, 20]
    assert torch.equal(torch.cat(chunks), mem.get("blocks.2.hook_resid_post"))
    assert disk.meta == [e.meta for e in dataset.examples] == mem.meta
    assert disk.examples[7]["clean"] == dataset.examples[7].clean and disk.examples[7]["index"] == 7


def test_manifest_records_what_is_needed(tiny_model, dataset, tmp_path):
    cfg = StoreConfig(hooks=("blocks.1.hook_resid_post",), dtype="float16", batch_size=32, shard_size=64)
    write_store(tiny_model, dataset, tmp_path / "s", cfg, progress=False)
    m = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert m["complete"] is True and m["model"] == tiny_model.arithinterp_spec
    assert m["dataset_fingerprint"] == dataset.fingerprint() and m["version"]
    assert m["hooks"] == {"blocks.1.hook_resid_post": {"shape": [9, 64], "axes": ["example", "pos", "d_model"]}}
    assert m["dtype"] == "float16" and m["task"]["task"] == "add" and m["positions"] == list(range(9))
    assert m["position_labels"][-1] == "=" and "carries" in m["meta_keys"]
    for s in m["shards"]:
        assert hashlib.sha256((tmp_path / "s" / s["file"]).read_bytes()).hexdigest() == s["sha256"]
        assert hashlib.sha256((tmp_path / "s" / s["examples_file"]).read_bytes()).hexdigest() == s["examples_sha256"]
    store = ActivationStore.open(tmp_path / "s")
    assert store.get("blocks.1.hook_resid_post").dtype == torch.float16


def test_any_metadata_is_copied(tiny_model, dataset, tmp_path):
    """Fields a task adds later (multiplication's partial products, running sums) reach the store unchanged."""
    examples = []
    for e in dataset.examples:
        a, b = e.meta["a_digits"], e.meta["b_digits"]
        pp = [[x * y for y in b] for x in a]
        examples.append(replace(e, meta={**e.meta, "partial_products": pp, "running_sums": np.cumsum(a).tolist(),
                                         "note": "x"}))  # fmt: skip
    ds = replace(dataset, examples=examples)
    store = write_store(
        tiny_model, ds, tmp_path / "s", StoreConfig(hooks=("blocks.0.hook_resid_post",)), progress=False
    )
    assert store.meta[5]["partial_products"] == examples[5].meta["partial_products"]
    assert ActivationStore.open(tmp_path / "s").meta[5]["running_sums"] == examples[5].meta["running_sums"]


def test_interrupted_states_resume_identically(tiny_model, dataset, tmp_path):
    cfg = StoreConfig(hooks=HOOKS, batch_size=16, shard_size=40)
    write_store(tiny_model, dataset, tmp_path / "ref", cfg, progress=False)
    ref = _files(tmp_path / "ref")
    part = tmp_path / "part"
    write_store(tiny_model, dataset, part, cfg, progress=False)
    # a kill after shard 1's files were renamed into place but before the manifest listed it, with a
    # half-written temporary file of shard 2 left behind
    m = json.loads((part / "manifest.json").read_text())
    m["complete"], m["shards"] = False, m["shards"][:1]
    (part / "manifest.json").write_text(json.dumps(m))
    (part / "shard-00002.safetensors").unlink()
    (part / ".shard-00002.safetensors.abc.tmp").write_bytes(b"partial")
    with pytest.raises(ArithInterpError, match="incomplete"):
        ActivationStore.open(part)
    write_store(tiny_model, dataset, part, cfg, progress=False)
    assert _files(part) == ref


def test_damaged_shard_is_caught_and_repaired(tiny_model, dataset, tmp_path):
    cfg = StoreConfig(hooks=("blocks.1.hook_resid_post",), batch_size=32, shard_size=50)
    write_store(tiny_model, dataset, tmp_path / "s", cfg, progress=False)
    ref = _files(tmp_path / "s")
    shard = tmp_path / "s" / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # one flipped bit pattern in the tensor data: the header still parses
    shard.write_bytes(bytes(data))
    store = ActivationStore.open(tmp_path / "s")
    store.get("blocks.1.hook_resid_post", examples=[0, 1])  # shard 0 is fine
    with pytest.raises(ArithInterpError, match="damaged"):
        store.get("blocks.1.hook_resid_post", examples=[60])
    with pytest.raises(ArithInterpError, match="shard-00001"):
        ActivationStore.open(tmp_path / "s").verify()
    write_store(tiny_model, dataset, tmp_path / "s", cfg, progress=False)  # the rerun rewrites it
    assert _files(tmp_path / "s") == ref


KILL_CFG = dict(hooks=("blocks.*.hook_resid_post", "blocks.1.attn.hook_pattern"), batch_size=10, shard_size=30)
CHILD = textwrap.dedent("""
    import sys, time
    import arithinterp.store as st
    from arithinterp.models import load
    from arithinterp.tasks import TaskConfig, make_dataset

    model = load(sys.argv[1])
    real = st.atomic_write_bytes

    def slow(path, data):  # slow the writes down so that the parent's SIGKILL lands mid-run
        time.sleep(0.15)
        return real(path, data)

    st.atomic_write_bytes = slow
    st.write_store(model, make_dataset(model.tokenizer, TaskConfig(n=400)), sys.argv[2], st.StoreConfig(**KILL_CFG),
                   progress=False)
""").replace("KILL_CFG", repr(KILL_CFG))


@pytest.mark.slow
def test_sigkill_mid_write_then_resume_is_identical(tiny_model, tiny_model_dir, tmp_path):
    """A child process writing a store is SIGKILLed mid-run; the rerun ends byte-identical to a clean write."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    out = tmp_path / "store"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, str(script), str(tiny_model_dir), str(out)], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.time() + 240
        while time.time() < deadline:  # wait until a few shards are on record, then kill mid-run
            try:
                if len(json.loads((out / "manifest.json").read_text())["shards"]) >= 3:
                    break
            except (OSError, ValueError):
                pass
            assert child.poll() is None, "the child finished (or failed) before it could be killed"
            time.sleep(0.05)
        time.sleep(0.1)
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    finally:
        if child.poll() is None:
            child.kill()
    m = json.loads((out / "manifest.json").read_text())
    assert m["complete"] is False and 3 <= len(m["shards"]) < 14
    with pytest.raises(ArithInterpError, match="incomplete"):
        ActivationStore.open(out)
    ds = make_dataset(tiny_model.tokenizer, TaskConfig(n=400))
    cfg = StoreConfig(**KILL_CFG)
    write_store(tiny_model, ds, out, cfg, progress=False)
    write_store(tiny_model, ds, tmp_path / "ref", cfg, progress=False)
    assert _files(out) == _files(tmp_path / "ref")
    store = ActivationStore.open(out)
    store.verify()
    assert store.n == 400 and len(store.manifest["shards"]) == 14


def test_task_stream_is_lazy_and_deterministic(tiny_model, tmp_path):
    cfg = TaskConfig(n=70, seed=3)
    a, b = TaskStream(tiny_model.tokenizer, cfg, chunk_size=32), TaskStream(tiny_model.tokenizer, cfg, chunk_size=32)
    assert a.fingerprint() == b.fingerprint() and len(a) == 70
    whole = a.slice(0, 70)
    assert len(whole) == 70 and [e.clean for e in whole.examples] == [e.clean for e in b.slice(0, 70).examples]
    assert [e.clean for e in a.slice(30, 40).examples] == [e.clean for e in whole.examples[30:40]]
    assert a.chunk(0).examples[0].clean != a.chunk(1).examples[0].clean
    store = write_store(tiny_model, a, tmp_path / "s", StoreConfig(hooks=("blocks.0.hook_resid_post",), shard_size=25),
                        progress=False)  # fmt: skip
    assert store.n == 70 and store.manifest["source"] == "stream"
    assert [r["clean"] for r in store.examples] == [e.clean for e in whole.examples]


def test_user_errors(tiny_model, dataset, tmp_path):
    with pytest.raises(ArithInterpError, match="matches no hook point.*did you mean"):
        resolve_hooks(tiny_model, ["blocks.0.hook_resid_pots"])
    assert resolve_hooks(tiny_model, ["blocks.0.*resid_p*"]) == ["blocks.0.hook_resid_post", "blocks.0.hook_resid_pre"]
    with pytest.raises(ArithInterpError, match="position 9 is outside"):
        collect(tiny_model, dataset, StoreConfig(positions=(9,)), progress=False)
    with pytest.raises(ArithInterpError, match="non-empty tuple"):
        StoreConfig(hooks="blocks.0.hook_resid_post")
    cfg = StoreConfig(hooks=("blocks.0.hook_resid_post",), positions=(-1,))
    store = write_store(tiny_model, dataset, tmp_path / "s", cfg, progress=False)
    with pytest.raises(ArithInterpError, match="position 3 is not in this store"):
        store.get("blocks.0.hook_resid_post", positions=[3])
    with pytest.raises(ArithInterpError, match="hook 'blocks.1.hook_resid_post' is not in this store"):
        store.get("blocks.1.hook_resid_post")
    with pytest.raises(ArithInterpError, match="other settings.*positions"):
        write_store(tiny_model, dataset, tmp_path / "s", replace(cfg, positions=(-2,)), progress=False)
    again = write_store(
        tiny_model, dataset, tmp_path / "s", replace(cfg, positions=(-2,)), overwrite=True, progress=False
    )
    assert again.positions == [7]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ArithInterpError, match="not empty and holds no activation store"):
        write_store(tiny_model, dataset, tmp_path / "other", cfg, progress=False)
    write_store(tiny_model, dataset, tmp_path / "other", cfg, overwrite=True, progress=False)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"  # overwrite deletes store files only
    with pytest.raises(ArithInterpError, match="not an activation store"):
        ActivationStore.open(tmp_path)


def test_cli_store_then_probe(tiny_model_dir, tmp_path, capsys):
    from arithinterp.cli import main

    out = tmp_path / "store"
    args = ["store", "--model", str(tiny_model_dir), "--n", "150", "--positions", "-1,3", "--shard-size", "64",
            "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    assert {"manifest.json", "store.json", "store.html", "shard-00002.safetensors"} <= set(os.listdir(out))
    record = json.loads((out / "store.json").read_text())
    assert record["n"] == 150 and record["positions"] == [8, 3] and record["shards"] == 3
    assert main(args) == 0  # a finished store is verified and kept
    assert main(["store", "--model", str(tiny_model_dir), "--n", "151", "--out", str(out)]) == 2
    assert "other settings" in capsys.readouterr().err
    assert main(["probe", "--store", str(out), "--target", "a_digits[0]", "--hook", "blocks.2.*",
                 "--out", str(tmp_path / "p")]) == 0  # fmt: skip
    probe = json.loads((tmp_path / "p" / "probe.json").read_text())
    assert probe["hooks"] == ["blocks.2.hook_resid_post"] and probe["positions"] == [8, 3]
    assert probe["store"] == str(out) and probe["n"] == 150


def test_shard_files_are_exactly_what_safetensors_writes(tmp_path):
    from safetensors.torch import save

    from arithinterp._shards import write_safetensors

    tensors = {"blocks.0.hook_resid_post": torch.randn(5, 3, 4), "tokens": torch.arange(6).reshape(2, 3),
               "h16": torch.randn(2, 2).half(), "hb": torch.randn(3).bfloat16()}  # fmt: skip
    n, digest = write_safetensors(tmp_path / "x.safetensors", tensors, metadata={"examples": "0:5"})
    reference = save(tensors, metadata={"examples": "0:5"})
    assert (tmp_path / "x.safetensors").read_bytes() == reference
    assert n == len(reference) and digest == hashlib.sha256(reference).hexdigest()


def test_activation_rms_on_paper(tiny_model, dataset):
    t = torch.zeros(4, 2, 3)  # [example, pos, d]
    t[:, 0] = 2.0  # RMS 2 at position 0
    t[0, 1], t[1, 1] = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 4.0, 0.0])  # mean square (9 + 16) / 12
    store = ActivationStore.from_tensors({"h": t}, [{}] * 4)
    np.testing.assert_allclose(activation_rms(store), [[2.0, (25 / 12) ** 0.5]], rtol=1e-6)
    np.testing.assert_allclose(activation_rms(store, max_examples=1), [[2.0, 3 / 3**0.5]], rtol=1e-6)
    acts = collect(tiny_model, dataset, StoreConfig(hooks=HOOKS, positions=(-1, 3)), progress=False)
    rms = activation_rms(acts)  # rows in acts.hooks order; attention patterns have no position axis after example
    assert rms.shape == (5, 2) and np.isnan(rms[acts.hooks.index("blocks.0.attn.hook_pattern")]).all()
    resid = acts.get("blocks.1.hook_resid_post")
    np.testing.assert_allclose(rms[acts.hooks.index("blocks.1.hook_resid_post")],
                               resid.pow(2).mean((0, 2)).sqrt().numpy(), rtol=1e-5)  # fmt: skip


def test_store_files_get_the_usual_modes_without_touching_the_umask(tiny_model, dataset, tmp_path, monkeypatch):
    """Files are 0666 less the umask, read afresh each write; the umask is never set to read it where Linux
    reports it (the writer thread would race other threads' files), and set only once, under a lock, elsewhere."""
    from arithinterp import _io

    cfg = StoreConfig(hooks=("blocks.0.hook_resid_post",), shard_size=50)
    old = os.umask(0o022)
    try:
        if _io._proc_umask() is not None:
            monkeypatch.setattr(_io.os, "umask", lambda mask: pytest.fail("os.umask called to read the umask"))
        write_store(tiny_model, dataset, tmp_path / "a", cfg, progress=False)
        monkeypatch.undo()
        os.umask(0o077)
        write_store(tiny_model, dataset, tmp_path / "b", cfg, progress=False)
    finally:
        os.umask(old)
    modes = lambda d: {oct(p.stat().st_mode & 0o777) for p in d.iterdir()}  # noqa: E731
    assert modes(tmp_path / "a") == {"0o644"}
    if _io._proc_umask() is not None:
        assert modes(tmp_path / "b") == {"0o600"}
    calls = []
    real_umask = os.umask

    def umask(mask):
        calls.append(mask)
        return real_umask(mask)

    monkeypatch.setattr(_io, "_proc_umask", lambda: None)  # no /proc: set-and-restore, once, then cached
    monkeypatch.setattr(_io, "_umask_cached", None)
    monkeypatch.setattr(_io.os, "umask", umask)
    assert _io._umask() == _io._umask() == old and len(calls) == 2 and calls[1] == old
