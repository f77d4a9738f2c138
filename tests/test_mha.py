"""``torch.nn.MultiheadAttention`` pruned by whole heads, on its own, in torchvision's ViT and in
a small decoder-only language model (issue 18, item 7).

References: the plain ``nn.MultiheadAttention`` (soft path at full width), attention computed
by hand in float64 from the original weights of the kept heads (hard path), the exported model
against the hard network (1e-5, fp32) and ``torch.utils.flop_counter`` on the export against
``pruner.hard_flops_ratio()`` (1%).
"""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from _exact import counted, full_width_matches_dense, prune
from torch import nn

import s2h
from s2h.export import ExportMismatchWarning
from s2h.torch_attention import PrunedMultiheadAttention


def _leaves(out):
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _check_exact(pruner, model, x, dense):
    """Export == hard network (1e-5); counter on the export / dense == hard_flops_ratio (1%);
    the dense count is torch's counter on the unpruned copy ``dense``."""
    model.eval()
    with torch.no_grad():
        hard = pruner.hard_forward((x,))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExportMismatchWarning)
        exported = pruner.export()
    with torch.no_grad():
        out = exported(x)
    for h, o in zip(_leaves(hard), _leaves(out), strict=True):
        assert h.shape == o.shape
        assert torch.allclose(o, h, rtol=1e-5, atol=1e-5 * max(1.0, float(h.abs().max())))
    assert pruner.dense_flops == counted(dense, x)
    ratio = counted(exported, x) / pruner.dense_flops
    assert ratio == pytest.approx(pruner.hard_flops_ratio(), rel=0.01)
    assert pruner.hard_flops_ratio() < 0.9
    return exported


# ----------------------------------------------------------------------- one attention layer


class AttnNet(nn.Module):
    """fc_in -> self-attention (or attention to a key/value of width ``kdim``) -> fc_out."""

    def __init__(self, batch_first=True, bias=True, need_weights=False, kdim=None, cross=False,
                 heads=4):
        super().__init__()
        self.batch_first, self.need_weights = batch_first, need_weights
        self.fc_in = nn.Linear(12, 32)
        self.kv = nn.Linear(12, kdim or 32) if kdim or cross else None
        self.attn = nn.MultiheadAttention(32, heads, bias=bias, batch_first=batch_first,
                                          kdim=kdim, vdim=kdim)
        self.fc_out = nn.Linear(32, 5)

    def forward(self, x):
        h = torch.relu(self.fc_in(x))
        kv = h if self.kv is None else self.kv(x)
        a, w = self.attn(h, kv, kv, need_weights=self.need_weights)
        y = self.fc_out(torch.relu(a))
        return y if w is None else (y, w)


def _input(batch_first, n=2, seq=7, width=12):
    torch.manual_seed(1)
    return torch.randn(n, seq, width) if batch_first else torch.randn(seq, n, width)


@pytest.mark.parametrize("kdim", [None, 20])
@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch_first", [True, False])
def test_heads_input_and_output_pruned_exactly(batch_first, bias, need_weights, kdim):
    torch.manual_seed(0)
    model = AttnNet(batch_first, bias, need_weights, kdim)
    dense = copy.deepcopy(model)
    x = _input(batch_first)
    pruner, msgs = prune(model, x, divisor=4)
    groups = {g.name: g for g in pruner.groups}
    assert groups["attn.heads"].channels == 32 and groups["attn.heads"].divisor == 8
    assert groups["attn.heads"].consumers == ["attn"]
    assert groups["fc_in"].consumers == ["attn"] and groups["attn"].consumers == ["fc_out"]
    if kdim:  # separate q / k / v weights: the key and value are needed at full width
        assert "kv" not in groups
        assert any("'kv'" in m and "attn needs this input at full width" in m for m in msgs)
    pruner.set_widths({"fc_in": 16, "attn.heads": 16, "attn": 20})
    exported = _check_exact(pruner, model, x, dense)
    a = exported.attn
    assert type(a) is PrunedMultiheadAttention
    assert (a.num_heads, a.head_dim, a.embed_dim, a.out_dim) == (2, 8, 16, 20)
    assert a.batch_first == batch_first and (a.in_proj_bias is None) == (not bias)
    w_in = a.in_proj_weight if kdim is None else a.q_proj_weight
    assert w_in.shape == ((3 if kdim is None else 1) * 16, 16)
    assert a.out_proj.weight.shape == (20, 16)
    if kdim:
        assert a.k_proj_weight.shape == (16, kdim) and a.v_proj_weight.shape == (16, kdim)


def test_cross_attention_key_joins_the_query_group():
    """Packed q/k/v weight, key and value from another layer: both inputs are one group."""
    torch.manual_seed(0)
    model = AttnNet(cross=True)
    dense = copy.deepcopy(model)
    x = _input(True)
    pruner, _ = prune(model, x, divisor=4)
    an = pruner.analysis
    assert an.layer_out_group["kv"] == an.layer_out_group["fc_in"] == an.layer_in_group["attn"]
    assert sorted(an.groups[an.layer_in_group["attn"]].consumers) == ["attn"]
    pruner.set_widths({"fc_in": 12, "attn.heads": 8})
    exported = _check_exact(pruner, model, x, dense)
    assert exported.kv.out_features == 12 and exported.attn.num_heads == 1


def _reference(mha, keep_heads, q_in, kv_in, attn_mask=None, kpm=None):
    """Attention by hand in float64 from ``mha``'s weights, over ``keep_heads`` only
    (batch first inputs). Returns the output and the weights averaged over those heads."""
    e, hd = mha.embed_dim, mha.head_dim
    w, b = mha.in_proj_weight.double(), mha.in_proj_bias.double()
    q_in, kv_in = q_in.double(), kv_in.double()
    outs, probs = [], []
    for h in keep_heads:
        sl = slice(h * hd, (h + 1) * hd)
        q = q_in @ w[sl].T + b[sl]
        k = kv_in @ w[e:][sl].T + b[e:][sl]
        v = kv_in @ w[2 * e:][sl].T + b[2 * e:][sl]
        s = q @ k.transpose(-1, -2) / hd ** 0.5
        if attn_mask is not None:  # (N * H, L, S) for the layer's H heads
            s = s + attn_mask.double().view(q.shape[0], mha.num_heads, *s.shape[1:])[:, h]
        if kpm is not None:
            s = s.masked_fill(kpm[:, None, :], float("-inf"))
        p = s.softmax(-1)
        probs.append(p)
        outs.append(p @ v)
    cols = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in keep_heads])
    out = torch.cat(outs, -1) @ mha.out_proj.weight.double()[:, cols].T \
        + mha.out_proj.bias.double()
    return out, torch.stack(probs).mean(0)


@pytest.mark.parametrize("batch_first", [True, False])
def test_hard_path_matches_a_float64_reference(batch_first):
    """Kept heads only, a per-head 3-D mask and a key padding mask: the hard layer and the
    export equal multi-head attention computed by hand on the kept heads' weights."""

    class Only(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(24, 4, batch_first=batch_first)
            self.register_buffer("mask", torch.randn(2 * 4, 5, 6))
            self.register_buffer("kpm", torch.tensor([[False] * 5 + [True], [False] * 6]))

        def forward(self, q, kv):
            return self.attn(q, kv, kv, attn_mask=self.mask, key_padding_mask=self.kpm)

    torch.manual_seed(0)
    model = Only()
    q, kv = torch.randn(2, 5, 24), torch.randn(2, 6, 24)
    args = (q, kv) if batch_first else (q.transpose(0, 1), kv.transpose(0, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = s2h.S2HPruner(model, args, 0.5)
    assert [g.name for g in pruner.groups] == ["attn.heads"]
    pruner.set_widths({"attn.heads": 12})  # 2 of 4 heads
    keep = pruner.gates["attn/heads"].keep_index()
    heads = (keep[::6] // 6).tolist()
    assert len(heads) == 2 and torch.equal(keep, torch.cat([torch.arange(h * 6, h * 6 + 6)
                                                            for h in heads]))
    ref_out, ref_w = _reference(model.attn, heads, q, kv, model.mask, model.kpm)
    with pruner.mode("hard"), torch.no_grad():
        out, w = model(*args)
    exported = pruner.export()
    with torch.no_grad():
        e_out, e_w = exported(*args)
    if not batch_first:
        out, e_out = out.transpose(0, 1), e_out.transpose(0, 1)
    for got, gw in ((out, w), (e_out, e_w)):
        assert torch.allclose(got.double(), ref_out, atol=1e-5)
        assert torch.allclose(gw.double(), ref_w, atol=1e-6)


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("batch_first", [True, False])
def test_soft_path_at_full_width_equals_the_unpruned_module(batch_first, need_weights):
    torch.manual_seed(0)
    model = AttnNet(batch_first, need_weights=need_weights)
    dense = copy.deepcopy(model).eval()
    x = _input(batch_first)
    pruner, _ = prune(model, x, divisor=4)
    pruner.set_widths({g.name: g.channels for g in pruner.groups})
    assert all(float(g.soft_mask().detach().min()) == 1.0 for g in pruner.gates.values())
    model.eval()
    with torch.no_grad():
        ref = _leaves(dense(x))
        for mode in ("soft", "hard"):
            with pruner.mode(mode):
                got = _leaves(model(x))
            for r, g in zip(ref, got, strict=True):
                assert torch.allclose(g, r, rtol=1e-5, atol=1e-6)


def test_gates_get_gradients_through_soft_and_hard_paths():
    torch.manual_seed(0)
    model = AttnNet(need_weights=True)
    x = _input(True)
    pruner, _ = prune(model, x, divisor=4)
    pruner.set_widths({"fc_in": 24, "attn.heads": 16, "attn": 24})
    for mode in ("soft", "hard"):
        for p in pruner.gate_parameters():
            p.grad = None
        with pruner.mode(mode):
            y, w = model(x)
            (y.square().mean() + w.square().mean()).backward()
        for name in ("attn/heads", "fc_in", "attn"):
            g = pruner.gates[name].logits.grad
            assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, (mode, name)


def test_bias_kv_is_kept_whole_with_a_warning_naming_it():
    class BiasKV(nn.Module):
        def __init__(self):
            super().__init__()
            self.hidden = nn.Linear(8, 32)
            self.fc = nn.Linear(32, 16)
            self.attn = nn.MultiheadAttention(16, 2, add_bias_kv=True, batch_first=True)
            self.out = nn.Linear(16, 3)

        def forward(self, x):
            h = self.fc(torch.relu(self.hidden(x)))
            return self.out(self.attn(h, h, h)[0])

    pruner, msgs = prune(BiasKV(), torch.randn(2, 5, 8), divisor=4)
    assert [g.name for g in pruner.groups] == ["hidden"]
    assert any("attn (MultiheadAttention, add_bias_kv=True is not supported)" in m for m in msgs)


# ----------------------------------------------------------------------- torchvision ViT


def _train_steps(pruner, x, classes=10):
    opt = torch.optim.SGD([{"params": list(pruner.weight_parameters())},
                           {"params": list(pruner.gate_parameters()), "lr": 0.05}], lr=1e-3)
    y = torch.randint(0, classes, (x.shape[0],))
    for _ in range(2):
        pruner.train_step(x, y, opt, max_grad_norm=5.0)


def test_torchvision_vit_heads_and_mlp():
    tv = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = tv.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                        hidden_dim=64, mlp_dim=128, num_classes=10)
    dense = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32)
    pruner, msgs = prune(model, x, divisor=4)
    groups = {g.name: g for g in pruner.groups}
    for i in range(2):
        heads = groups[f"encoder.layers.encoder_layer_{i}.self_attention.heads"]
        assert heads.channels == 64 and heads.divisor == 16
        assert groups[f"encoder.layers.encoder_layer_{i}.mlp.0"].channels == 128
    # the embedding width is a group too (class token, position embedding: tests/
    # test_embed_width.py)
    assert len(groups) == 5
    assert not any("'class_token'" in m for m in msgs)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in pruner.gate_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 2)
    _train_steps(pruner, x)
    pruner.set_widths({"encoder.layers.encoder_layer_0.self_attention.heads": 32,
                       "encoder.layers.encoder_layer_1.self_attention.heads": 16,
                       "encoder.layers.encoder_layer_0.mlp.0": 64})
    exported = _check_exact(pruner, model, x, dense)
    for i, kept in enumerate((2, 1)):
        a = exported.encoder.layers[i].self_attention
        assert type(a) is PrunedMultiheadAttention
        assert (a.num_heads, a.head_dim) == (kept, 16)
        assert a.embed_dim == pruner.widths()["conv_proj"]  # the embedding width, pruned too
    assert exported.encoder.layers[0].mlp[0].out_features == 64


# ----------------------------------------------------------------------- a small language model


class Block(nn.Module):
    def __init__(self, d, heads, hidden, is_causal):
        super().__init__()
        self.is_causal = is_causal
        self.ln_1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))

    def forward(self, x, mask):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, attn_mask=mask, need_weights=False,
                          is_causal=self.is_causal)[0]
        return x + self.mlp(self.ln_2(x))


class TinyLM(nn.Module):
    """Decoder-only LM: token embedding -> causal pre-norm blocks -> LayerNorm -> vocabulary."""

    def __init__(self, vocab=50, d=32, heads=4, hidden=64, layers=2, tied=True,
                 is_causal=False):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(16, d) * 0.02)
        self.blocks = nn.ModuleList(Block(d, heads, hidden, is_causal) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, idx):
        t = idx.shape[1]
        mask = torch.triu(torch.full((t, t), float("-inf"), device=idx.device), 1)
        x = self.emb(idx) + self.pos[:t]
        for blk in self.blocks:
            x = blk(x, mask)
        return self.head(self.ln_f(x))


@pytest.mark.parametrize("tied", [True, False])
def test_language_model_prunes_heads_and_mlp(tied):
    torch.manual_seed(0)
    model = TinyLM(tied=tied, is_causal=tied)
    dense = copy.deepcopy(model)
    idx = torch.randint(0, 50, (2, 12))
    pruner, _ = prune(model, idx, divisor=4)
    names = sorted(g.name for g in pruner.groups)
    assert names == ["blocks.0.attn.heads", "blocks.0.mlp.0", "blocks.1.attn.heads",
                     "blocks.1.mlp.0"]
    assert pruner.gates["blocks/0/attn/heads"].divisor == 8
    # a few steps of the two-pass objective on next-token prediction
    opt = torch.optim.SGD([{"params": list(pruner.weight_parameters())},
                           {"params": list(pruner.gate_parameters()), "lr": 0.05}], lr=1e-3)
    for mode in ("soft", "hard"):
        opt.zero_grad()
        with pruner.mode(mode):
            logits = model(idx[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), idx[:, 1:].flatten()).backward()
        assert pruner.gates["blocks/1/attn/heads"].logits.grad.abs().sum() > 0
        opt.step()
    pruner.set_widths({"blocks.0.attn.heads": 8, "blocks.1.attn.heads": 24,
                       "blocks.0.mlp.0": 32, "blocks.1.mlp.0": 16})
    exported = _check_exact(pruner, model, idx, dense)
    assert [b.attn.num_heads for b in exported.blocks] == [1, 3]
    assert [b.mlp[0].out_features for b in exported.blocks] == [32, 16]
    # the residual stream (the embedding width) is kept whole, so the tie is untouched: the
    # export shares one tensor exactly when the model did
    assert (exported.head.weight is exported.emb.weight) == tied
    assert torch.equal(exported.head.weight, model.head.weight)
    assert exported.head.weight.shape == (50, 32)


# ----------------------------------------------------------------------- torchvision Swin


def test_torchvision_swin_window_attention_heads():
    """Swin v1's ShiftedWindowAttention by heads (shifted windows, padding): full width equals
    torchvision's own forward; pruned equals the dense module with the dropped heads' proj
    columns zeroed; export == hard; FLOPs == counter."""
    tv = pytest.importorskip("torchvision")
    from s2h.torchvision_support import PrunedShiftedWindowAttention

    torch.manual_seed(0)
    model = tv.models.SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[2, 2],
                                      num_heads=[2, 4], window_size=[4, 4], num_classes=10)
    dense = copy.deepcopy(model).eval()
    x = torch.randn(2, 3, 36, 36)  # 9 x 9 tokens: padded to 12 x 12, shifted by 2
    pruner, _ = prune(model, x, divisor=4)
    groups = {g.name: g for g in pruner.groups}
    assert groups["features.1.0.attn.heads"].divisor == 16
    assert groups["features.3.1.attn.heads"].channels == 64
    assert "features.1.1.mlp.0" in groups
    model.eval()
    full_width_matches_dense(pruner, model, dense, x)
    pruner.set_widths({"features.1.1.attn.heads": 16, "features.3.0.attn.heads": 32})
    zeroed = copy.deepcopy(dense)
    with torch.no_grad():
        for blk, name, width in ((zeroed.features[1][1], "features/1/1/attn/heads", 32),
                                 (zeroed.features[3][0], "features/3/0/attn/heads", 64)):
            dropped = torch.ones(width, dtype=torch.bool)
            dropped[pruner.gates[name].keep_index()] = False
            blk.attn.proj.weight[:, dropped] = 0
        with pruner.mode("hard"):
            assert torch.allclose(model(x), zeroed(x), rtol=1e-5, atol=1e-5)
    exported = _check_exact(pruner, model, x, dense)
    a = exported.features[3][0].attn
    assert type(a) is PrunedShiftedWindowAttention
    assert (a.num_heads, a.head_dim) == (2, 16) and a.relative_position_bias_table.shape[1] == 2
    assert type(exported.features[1][0].attn) is tv.models.swin_transformer.ShiftedWindowAttention
