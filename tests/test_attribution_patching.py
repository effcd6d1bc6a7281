"""Attribution patching (AtP, EAP, EAP-IG): parity with references, identities, agreement with exact patching."""

from __future__ import annotations

import json

import pytest
import torch
from handwired import operand_a_dataset, planted_path_model, save
from test_patching import build_wide_random_gpt2

from arithinterp import ArithInterpError
from arithinterp.attribution_patching import agreement, attribution_patch
from arithinterp.cli import main
from arithinterp.metrics import make_metric, spearman
from arithinterp.models import load
from arithinterp.patching import patch_components
from arithinterp.tasks import make_dataset


@pytest.fixture(scope="module")
def wide(tmp_path_factory, char_tokenizer):
    model = load(str(build_wide_random_gpt2(tmp_path_factory.mktemp("wide_ap"), char_tokenizer)))
    return model, make_dataset(model.tokenizer, task="add", n=4, seed=4)


def _estimates(res) -> torch.Tensor:
    """Per-example first-order estimates M(patched) - M(base), `[item, batch]` (denoising: base = corrupted)."""
    return res.patched - res.corrupted


def test_atp_and_eap_match_transformer_lens(wide):
    """transformer-lens's `attribution_patch` (node and edge granularity), one example at a time."""
    from transformer_lens.tools.analysis.attribution_patching import EdgeAttributionConfig, Node
    from transformer_lens.tools.analysis.attribution_patching import attribution_patch as tl_attribution_patch

    model, ds = wide
    nodes = attribution_patch(model, ds, position="final", progress=False).nodes
    edges = attribution_patch(model, ds, granularity="edge", position="all", progress=False).edges
    last = ds.clean_tokens.shape[1] - 1
    for i in range(1):
        one = ds.subset([i])
        metric = make_metric("logit_diff", one)
        fn = lambda logits, metric=metric: metric.from_full_logits(logits[:, -1]).sum()  # noqa: E731
        ref = tl_attribution_patch(model, one.clean_tokens, one.corrupted_tokens, fn)
        for c, est in zip(nodes.components, _estimates(nodes)[:, i]):
            kind = "attn_head_out" if c.kind == "head" else "mlp_out"
            node = Node(kind=kind, layer=c.layer, head=c.head, position=last)
            assert est.item() == pytest.approx(ref.node_scores[node], rel=1e-4, abs=1e-4), c.name
        ref_e = tl_attribution_patch(model, one.clean_tokens, one.corrupted_tokens, fn,
                                     EdgeAttributionConfig(granularity="edge"))  # fmt: skip
        summed: dict[str, float] = {}  # transformer-lens scores edges per position; ours sum over positions
        for (wr, rd), score in ref_e.edge_scores.items():
            if wr.kind == "embed":
                continue
            s = f"L{wr.layer}H{wr.head}" if wr.kind == "attn_head_out" else f"MLP{wr.layer}"
            r = {"logits": "logits", "mlp_in": f"MLP{rd.layer}"}.get(rd.kind, f"L{rd.layer}H{rd.head}.{rd.kind[0]}")
            summed[f"{s}->{r}"] = summed.get(f"{s}->{r}", 0.0) + score
        assert len(summed) == len(edges.components)
        for e, est in zip(edges.components, _estimates(edges)[:, i]):
            assert est.item() == pytest.approx(summed[e.name], rel=1e-4, abs=1e-4), e.name


def test_node_estimate_is_the_sum_of_its_edges(wide):
    """A write reaches the metric only through its readers, so node AtP over all positions equals the sum of
    the sender's edge estimates (EAP); the same holds for EAP-IG's averaged gradients."""
    model, ds = wide
    for method in ("eap-ig",):
        res = attribution_patch(model, ds, method=method, ig_steps=2, granularity="edge", position="all",
                                progress=False)  # fmt: skip
        node = dict(zip([c.name for c in res.nodes.components], _estimates(res.nodes)))
        totals: dict[str, torch.Tensor] = {}
        for e, est in zip(res.edges.components, _estimates(res.edges)):
            totals[e.sender.name] = totals.get(e.sender.name, 0) + est
        for name, total in totals.items():
            assert torch.allclose(total, node[name], rtol=1e-4, atol=1e-4), (method, name)


def test_eap_ig_matches_an_independent_huggingface_reference(wide):
    """EAP-IG node estimates recomputed with the Hugging Face model itself: interpolated `inputs_embeds`,
    gradients at each head's merged output (the input of `c_proj`) and each MLP's output, midpoint rule."""
    model, ds = wide
    steps = 4
    ours = attribution_patch(model, ds, method="eap-ig", ig_steps=steps, position="final", progress=False).nodes
    hf = model.original_model
    metric = make_metric("logit_diff", ds)
    wte = hf.transformer.wte.weight.detach()
    n_layers, n_heads = hf.config.n_layer, hf.config.n_head

    def run(embeds):
        grabbed: dict[str, torch.Tensor] = {}

        def keep(name, i):
            def hook(module, args, out=None):
                t = args[0] if out is None else out
                t.retain_grad()
                grabbed[name] = t

            return hook

        handles = []
        for layer, block in enumerate(hf.transformer.h):
            handles.append(block.attn.c_proj.register_forward_pre_hook(keep(f"z{layer}", 0)))
            handles.append(block.mlp.register_forward_hook(lambda m, a, o, layer=layer: keep(f"m{layer}", 0)(m, a, o)))
        try:
            with torch.enable_grad():
                logits = hf(inputs_embeds=embeds).logits
                metric.from_full_logits(logits[:, -1]).sum().backward()
        finally:
            for h in handles:
                h.remove()
        return grabbed

    clean = run(wte[ds.clean_tokens].clone().requires_grad_(True))
    corr = run(wte[ds.corrupted_tokens].clone().requires_grad_(True))
    grads = None
    for k in range(steps):
        alpha = (k + 0.5) / steps
        emb = wte[ds.corrupted_tokens] + alpha * (wte[ds.clean_tokens] - wte[ds.corrupted_tokens])
        g = {n: t.grad.detach() for n, t in run(emb.clone().requires_grad_(True)).items()}
        grads = g if grads is None else {n: grads[n] + g[n] for n in g}
    ref = []
    for layer in range(n_layers):
        dz = (clean[f"z{layer}"] - corr[f"z{layer}"]).detach()[:, -1]  # (batch, d_model) = heads' z concatenated
        g = grads[f"z{layer}"][:, -1] / steps
        ref += list((dz * g).reshape(len(ds), n_heads, -1).sum(-1).T)
        dm = (clean[f"m{layer}"] - corr[f"m{layer}"]).detach()[:, -1]
        ref.append((dm * grads[f"m{layer}"][:, -1] / steps).sum(-1))
    assert torch.allclose(_estimates(ours), torch.stack(ref).detach(), rtol=1e-3, atol=1e-4)


def test_estimates_on_the_planted_path(tmp_path_factory, char_tokenizer):
    """AtP puts the one decisive final-position component (L1H2) first; edge estimates put the planted edges
    first and the edges that carry nothing the logits read (L0H1 -> L1H0.v, L0H1 -> MLP0) at zero."""
    model = load(str(save(planted_path_model(), tmp_path_factory.mktemp("planted_ap"))))
    ds = operand_a_dataset(char_tokenizer, n=16)
    res = attribution_patch(model, ds, method="eap-ig", ig_steps=4, granularity="edge", position="final",
                            progress=False)  # fmt: skip
    assert res.nodes.ranked()[0]["name"] == "L1H2" and res.nodes.ranked()[0]["score"] > 0.5
    edges = {e.name: float(s) for e, s in zip(res.edges.components, res.edges.scores)}
    top2 = {r["name"] for r in res.edges.ranked()[:2]}
    assert top2 == {"L1H2->logits", "L0H1->L1H2.v"}
    # (first order only: the junk written by MLP0 moves the final layer norm's linearisation a little)
    assert abs(edges["L0H1->L1H0.v"]) < 1e-3 and abs(edges["L0H1->MLP0"]) < 1e-3


def test_agreement_with_exact_patching(wide):
    model, ds = wide
    exact = patch_components(model, ds, progress=False)
    est = attribution_patch(model, ds, method="eap-ig", ig_steps=6, progress=False).nodes
    a = agreement(est, exact)
    assert a["n"] == 15 and -1.0 <= a["spearman"] <= 1.0
    assert agreement(exact, exact)["spearman"] == pytest.approx(1.0)


def test_spearman_against_known_values():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spearman(a, a**3) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    # ties take average ranks: ranks (0.5, 0.5, 2, 3) vs (0, 1, 2, 3) -> rho = 0.9486832980505138 (scipy)
    assert spearman(torch.tensor([1.0, 1.0, 2.0, 3.0]), torch.tensor([1.0, 2.0, 3.0, 4.0])) == pytest.approx(
        0.9486832980505138
    )
    with pytest.raises(ArithInterpError):
        spearman(torch.ones(3), torch.ones(4))


def test_errors(wide):
    model, ds = wide
    with pytest.raises(ArithInterpError, match="unknown attribution method"):
        attribution_patch(model, ds, method="saliency", progress=False)
    with pytest.raises(ArithInterpError, match="ig_steps"):
        attribution_patch(model, ds, method="eap-ig", ig_steps=0, progress=False)
    with pytest.raises(ArithInterpError, match="final or all"):
        attribution_patch(model, ds, position="each", progress=False)


def test_cli_attribution_and_eap_ig(tiny_model_dir, tmp_path):
    out = tmp_path / "atp"
    assert main(["patch", "--model", str(tiny_model_dir), "--n", "5", "--out", str(out), "--method", "attribution",
                 "--compare-exact"]) == 0  # fmt: skip
    rec = json.loads((out / "patch.json").read_text())
    assert rec["method"] == "attribution" and len(rec["components"]) == 15 and "edges" not in rec
    assert set(rec["agreement"]["components"]) >= {"spearman", "pearson", "n"}
    out2 = tmp_path / "ig"
    assert main(["patch", "--model", str(tiny_model_dir), "--n", "5", "--out", str(out2), "--method", "eap-ig",
                 "--ig-steps", "3", "--threshold", "0.05"]) == 0  # fmt: skip
    rec2 = json.loads((out2 / "patch.json").read_text())
    assert rec2["granularity"] == "edge" and rec2["ig_steps"] == 3 and len(rec2["edges"]) > 100
    assert {"sender", "receiver", "score"} <= set(rec2["edges"][0])
