"""Lockstep dual forward: the soft and the hard network through the model *together*.

The plain dual forward runs the model twice (soft, then hard). The fused dual kernels
(``s2h.functional.dual_linear`` / ``dual_conv2d``) want both paths of a layer in one launch, so
both activations must reach the layer at the same time. Here every activation is a
:class:`DualTensor` — a pair ``(soft, hard)`` — and:

* any torch function applied to a ``DualTensor`` is applied to both halves (``__torch_function__``);
  a function whose non-tensor result differs between the halves (e.g. ``x.shape`` of a pruned
  group read by Python code) raises :class:`LockstepUnsupported`: never a silently wrong result;
* each masked layer computes both paths: conv / linear through the fused dual op, every other
  masked layer by running its own soft and hard code on the two halves.

:func:`validate` compares the lockstep outputs and gradients with the two-pass ones once, at
half width, on the example inputs; the pruner falls back to two passes if they differ or
anything raises.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import torch
import torch.utils._pytree as pytree
from torch import nn

from .nn import MaskedConv2d, MaskedLayer, MaskedLinear

if TYPE_CHECKING:
    from .pruner import S2HPruner


class LockstepUnsupported(RuntimeError):
    """The model does something the lockstep forward cannot mirror on both halves."""


class DualTensor(torch.Tensor):
    """A (soft, hard) pair of activations with the soft half's metadata.

    It holds no storage of its own: anything that reaches the dispatcher instead of
    ``__torch_function__`` fails loudly rather than computing on one half only.
    """

    soft: torch.Tensor
    hard: torch.Tensor

    @staticmethod
    def __new__(cls, soft: torch.Tensor, hard: torch.Tensor):
        r = torch.Tensor._make_wrapper_subclass(
            cls, soft.shape, dtype=soft.dtype, device=soft.device, requires_grad=False
        )
        r.soft = soft
        r.hard = hard
        return r

    def __repr__(self) -> str:  # pragma: no cover - debugging aid
        return f"DualTensor(soft={tuple(self.soft.shape)}, hard={tuple(self.hard.shape)})"

    @classmethod
    def __torch_function__(cls, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        # Autograd bookkeeping done by tools such as FlopCounterMode's module tracker: a hook
        # goes on both halves; the graph node read is the soft half's (what the class mirrors).
        if func is torch.Tensor.register_hook:
            return _BothHandles([func(half, *args[1:], **kwargs)
                                 for half in (args[0].soft, args[0].hard)])
        if getattr(func, "__self__", None) is _GRAD_FN:
            return args[0].soft.grad_fn
        soft_args = pytree.tree_map(lambda a: a.soft if isinstance(a, DualTensor) else a,
                                    (args, kwargs))
        hard_args = pytree.tree_map(lambda a: a.hard if isinstance(a, DualTensor) else a,
                                    (args, kwargs))
        with torch._C.DisableTorchFunctionSubclass():
            s = func(*soft_args[0], **soft_args[1])
            h = func(*hard_args[0], **hard_args[1])
        return _merge(s, h, func)

    @classmethod
    def __torch_dispatch__(cls, func, types_, args=(), kwargs=None):
        raise LockstepUnsupported(f"{func} reached the dispatcher with a DualTensor")


_GRAD_FN = torch._C.TensorBase.grad_fn


class _BothHandles:
    """The hook handles of both halves, removed together."""

    def __init__(self, handles) -> None:
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _merge(s, h, func):
    if isinstance(s, torch.Tensor) and isinstance(h, torch.Tensor):
        return DualTensor(s, h)
    if isinstance(s, (list, tuple)) and isinstance(h, (list, tuple)) and len(s) == len(h):
        if isinstance(s, torch.Size):
            if s != h:
                raise LockstepUnsupported(f"{getattr(func, '__name__', func)}: shapes differ "
                                          f"between soft and hard ({tuple(s)} vs {tuple(h)})")
            return s
        merged = [_merge(a, b, func) for a, b in zip(s, h, strict=True)]
        return type(s)(merged) if not hasattr(s, "_fields") else type(s)(*merged)
    if s is None and h is None:
        return None
    if type(s) is not type(h) or s != h:
        raise LockstepUnsupported(f"{getattr(func, '__name__', func)} gives different results "
                                  f"for the soft and the hard network ({s!r} vs {h!r})")
    return s


def _ones(n, like):
    return torch.ones(n, device=like.device, dtype=torch.float32)


def _all(n, like):
    return torch.arange(n, device=like.device)


def _dual_layer(m: MaskedLayer, x):
    """Both paths of masked layer ``m`` for a DualTensor input."""
    from . import functional

    rt = m._s2h.runtime
    cls = type(m)
    # a layer class that computes more than a plain conv / linear (timm's "SAME"-padded or
    # weight-standardised convs) says so with s2h_dual_fused = False: it runs its own code
    fused = isinstance(m, (MaskedConv2d, MaskedLinear)) and getattr(cls, "s2h_dual_fused", True)
    if fused and not (
        isinstance(m, MaskedConv2d) and (m.padding_mode != "zeros"
                                         or (m.passes_group and not m.is_depthwise))
    ):  # a grouped conv (whole conv groups): its own soft and hard code below
        in_gate, out_gate = m._s2h.in_gate, m._s2h.out_gate
        cin = m.in_channels if isinstance(m, MaskedConv2d) else m.in_features
        cout = m.out_channels if isinstance(m, MaskedConv2d) else m.out_features
        if in_gate is not None:
            st = rt.state(in_gate)
            soft_mask, hard_mask, in_keep = st.soft_mask, st.hard_mask, st.keep
        else:
            soft_mask, hard_mask = _ones(cin, x.soft), _ones(cin, x.soft)
            in_keep = _all(cin, x.soft)
        if isinstance(m, MaskedConv2d) and m.is_depthwise:
            out_keep = in_keep
        elif out_gate is not None:
            out_keep = rt.state(out_gate).keep
        else:
            out_keep = _all(cout, x.soft)
        if isinstance(m, MaskedConv2d):
            s, h = functional.dual_conv2d(x.soft, x.hard, m.weight, m.bias, soft_mask, hard_mask,
                                          in_keep, out_keep, m.stride, m.padding, m.dilation,
                                          m.groups)
        else:
            s, h = functional.dual_linear(x.soft, x.hard, m.weight, m.bias, soft_mask, hard_mask,
                                          in_keep, out_keep)
        return DualTensor(s, h)
    # any other masked layer: its own soft code on the soft half, its hard code on the hard one
    with rt.use("soft"):
        s = cls.forward(m, x.soft)
    with rt.use("hard"):
        h = cls.forward(m, x.hard)
    return DualTensor(s, h)


def _patched_forward(m):
    cls = type(m)

    def forward(self, x, *args, **kwargs):
        if isinstance(x, DualTensor):
            if args or kwargs:
                raise LockstepUnsupported(f"{self._s2h.name}: extra forward arguments")
            return _dual_layer(self, x)
        return cls.forward(self, x, *args, **kwargs)

    return types.MethodType(forward, m)


@contextlib.contextmanager
def lockstep(masked_modules: Iterable[nn.Module]) -> AbstractContextManager[None]:
    """Within the context, masked layers accept DualTensors (instance-level forward patch)."""
    patched = []
    try:
        for m in masked_modules:
            m.forward = _patched_forward(m)
            patched.append(m)
        yield
    finally:
        for m in patched:
            del m.forward


def dual_forward(model: nn.Module, masked_modules: Iterable[nn.Module], inputs: tuple
                 ) -> tuple[Any, Any]:
    """``(soft_out, hard_out)`` of ``model(*inputs)`` in one lockstep pass."""
    dual_inputs = tuple(DualTensor(t, t) if isinstance(t, torch.Tensor) else t for t in inputs)
    with lockstep(masked_modules):
        out = model(*dual_inputs)
    leaves, spec = pytree.tree_flatten(out)
    if not all(isinstance(t, DualTensor) for t in leaves if isinstance(t, torch.Tensor)):
        raise LockstepUnsupported("the model returned a plain tensor in lockstep mode")
    soft = pytree.tree_unflatten([t.soft if isinstance(t, DualTensor) else t for t in leaves], spec)
    hard = pytree.tree_unflatten([t.hard if isinstance(t, DualTensor) else t for t in leaves], spec)
    return soft, hard


def validate(pruner: S2HPruner) -> str | None:
    """Check ``pruner``'s lockstep forward against two passes once, at about half width; None
    if they agree.

    Forward *and* backward: the outputs of both networks and the gradient of every weight
    and gate logit under a fixed random linear loss. Error rule (as the kernel tests'): the
    lockstep error against a float64 two-pass reference must be at most twice the error of
    the same-dtype two-pass path, plus a small floor. Anything raised (a kernel that does
    not compile, a model that cannot run in lockstep) is the reason, named.
    """
    params = [(n, p) for n, p in pruner.model.named_parameters() if p.requires_grad]
    params += [(f"gate {g.name}", g.logits) for g in pruner.gates.values()]
    # TF32 off while checking: the kernels follow torch's TF32 switches (``dot_precision``), but
    # cuDNN / cuBLAS use TF32 only for some layers and algorithms, so with it on the two paths'
    # errors differ for reasons that say nothing of the kernels (on an H200 the check refused
    # ResNet-50 and MobileNetV3 that way; with TF32 off the lockstep step matched two passes).
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with pruner.trial_widths():  # half width, eval mode; logits and mode put back
            pruner.set_widths(0.5)

            def run(lockstep: bool, dtype: torch.dtype | None = None):
                inputs = tuple(t.to(dtype) if dtype is not None and torch.is_floating_point(t)
                               else t for t in pruner.example_inputs)
                for _, p in params:
                    p.grad = None
                pruner.runtime.prepare(pruner.gates.values(), pruner.device(), pruner.gate_bank())
                if lockstep:
                    s, h = dual_forward(pruner.model, list(pruner.masked_layers.values()), inputs)
                else:
                    s, h = pruner.two_pass_forward(inputs)
                outs = [t for t in torch.utils._pytree.tree_leaves((s, h))
                        if isinstance(t, torch.Tensor) and torch.is_floating_point(t)]
                gen = torch.Generator().manual_seed(0)
                loss = sum((o.double() * torch.randn(o.shape, generator=gen, dtype=torch.float64)
                            .to(o.device)).sum() for o in outs)
                loss.backward()
                grads = {n: (None if p.grad is None else p.grad.detach().double().clone())
                         for n, p in params}
                for _, p in params:
                    p.grad = None
                return [o.detach().double() for o in outs], grads

            got_out, got_grad = run(lockstep=True)
            same_out, same_grad = run(lockstep=False)
            # float64 reference: the same modules with float64 copies of every floating
            # parameter and buffer (the originals are put back untouched afterwards)
            swapped, seen = [], set()
            for m in list(pruner.model.modules()) + list(pruner.gates.modules()):
                for table in (m._parameters, m._buffers):
                    for t in table.values():
                        if t is not None and torch.is_floating_point(t) and id(t) not in seen:
                            seen.add(id(t))
                            swapped.append((t, t.data))
                            t.data = t.data.double()
            eps = max(torch.finfo(data.dtype).eps for _, data in swapped)
            try:
                want_out, want_grad = run(lockstep=False, dtype=torch.float64)
            finally:
                for t, data in swapped:
                    t.data = data

            def bad(have, same, want) -> bool:
                if have.shape != want.shape:
                    return True
                scale = max(float(want.abs().max()), 1e-6) if want.numel() else 1.0
                err = float((have - want).abs().max()) if want.numel() else 0.0
                torch_err = float((same - want).abs().max()) if want.numel() else 0.0
                return err > 2 * torch_err + 64 * eps * scale

            if len(got_out) != len(want_out):
                return "the lockstep forward returned a different number of outputs"
            for i, (a, b, c) in enumerate(zip(got_out, same_out, want_out, strict=True)):
                if bad(a, b, c):
                    what = "soft" if i < len(got_out) // 2 else "hard"
                    return f"its {what} output differs from the two-pass forward"
            for name, _ in params:
                a, b, c = got_grad[name], same_grad[name], want_grad[name]
                if (a is None) != (c is None):
                    return f"the gradient of {name} is missing in one of the two paths"
                if a is not None and bad(a, b, c):
                    layer = name.rsplit(".", 1)[0]
                    kind = type(pruner.model.get_submodule(layer)).__name__ \
                        if not name.startswith("gate ") else "gate"
                    return (f"the gradient of {name} ({kind}: fused dual kernel backward) "
                            "differs from the two-pass backward")
            return None
    except Exception as exc:  # LockstepUnsupported, a kernel that fails, anything the model does
        return f"{type(exc).__name__}: {exc}"
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        for _, p in params:
            p.grad = None
