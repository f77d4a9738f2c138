"""A model whose own code reads a pruned width (a reshape to a constant) is found when the
pruner is built -- the group is kept whole with a warning naming it -- never a crash at the
first training step that narrows it (issue 18 item 8)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import s2h
from s2h.flops import count_flops


class ReadsWidth(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.c = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.b(torch.relu(self.a(x)))))
        n, _, h, w = y.shape
        # a Python constant the forward reshapes to (a width held in a module attribute,
        # ``self.dim``, is set to the kept width instead: tests/test_embed_width.py)
        y = y.reshape(n, 16, h * w).reshape(n, 16, h, w)
        return self.head(torch.relu(self.c(y)).mean((2, 3)))


def test_a_group_whose_narrowing_breaks_the_model_is_kept_whole():
    torch.manual_seed(0)
    model = ReadsWidth()
    keys = set(model.state_dict())
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruner = s2h.S2HPruner(model, (x,), 0.3, divisor=4)
    msgs = [str(w.message) for w in caught]
    assert any("group 'b'" in m and "fails when it is narrower" in m for m in msgs), msgs
    assert set(pruner.widths()) == {"a", "c"}
    # the layers of the group kept whole are plain again: no hard BatchNorm statistics
    assert type(model.bn) is nn.BatchNorm2d and set(model.state_dict()) == keys
    # the other groups train and export at their narrowest
    pruner.set_widths({"a": 4, "c": 4})
    opt = torch.optim.SGD(list(pruner.weight_parameters()) + list(pruner.gate_parameters()), 0.01)
    pruner.train_step(x, torch.tensor([0, 1]), opt)
    model.eval()
    exported = pruner.export()
    assert exported.b.out_channels == 16 and exported.a.out_channels == 4
    torch.testing.assert_close(exported(x), pruner.hard_forward(x), rtol=1e-5, atol=1e-6)
    assert pruner.hard_flops_ratio() == pytest.approx(
        count_flops(exported, x) / count_flops(ReadsWidth(), x), rel=1e-9)


def test_a_model_failing_at_every_narrowing_is_refused_with_the_reason():
    class AllRead(nn.Module):  # its only group goes through a reshape to a constant
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 16, 3, padding=1)
            self.head = nn.Linear(16, 4)

        def forward(self, x):
            y = torch.relu(self.a(x))
            return self.head(y.reshape(y.shape[0], 16, 64).mean(-1))

    with pytest.raises(ValueError, match="nothing prunable"):
        s2h.S2HPruner(AllRead(), (torch.randn(2, 3, 8, 8),), 0.5, divisor=4, warn=False)


@pytest.mark.slow  # timm pvt_v2_b0: ~10 s on the CPU
def test_pvt_v2_trains_at_half_width_instead_of_crashing():
    """pvt_v2 reshapes with widths read from its config: 10 of its groups used to crash the
    hard network one divisor step narrower (at the README recipe's second train_step). Its
    attention is a layer now (tests/test_pvt.py), which reads the widths off its weights: no
    group needs the narrowing check's guard, and every group trains at half width."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("pvt_v2_b0", num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pruner = s2h.S2HPruner(model, (x,), 0.5)
    kept = [g for g in pruner.analysis.groups
            if any("fails when it is narrowed" in r for r in g.reasons)]
    assert not kept and pruner.groups
    pruner.set_widths(0.5)
    opt = torch.optim.AdamW([{"params": pruner.weight_parameters(), "lr": 1e-3},
                             {"params": pruner.gate_parameters(), "lr": 5e-2}])
    for _ in range(2):
        pruner.train_step(x, torch.randint(0, 10, (2,)), opt)
    model.eval()
    exported = pruner.export()
    torch.testing.assert_close(exported(x), pruner.hard_forward(x), rtol=1e-5, atol=1e-5)
