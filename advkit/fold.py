"""BN folding, a speed-up of the paper's protocol (Section 3: the attacks run the model on BN running statistics,
as the original pipeline does): a BN in running-statistics mode after a convolution is an affine map per channel, so the pair is
one convolution with scaled weights and a bias. An attack that uses running statistics (every evaluation, and
training attacks by default) runs such a folded view: the same function with one layer less per pair, in the
forward and the backward pass.

The view is a ``torch.fx`` trace of the model in which each convolution whose only user is a BatchNorm (a
Mixture BN's selected branch included: the trace follows ``branch``) is replaced by a new convolution holding
the folded weights, detached from the model's parameters. The model itself is never modified. The trace is
cached per model; every call of :func:`fold_batch_norms` folds the current weights and statistics into the
cached view again, in place (O(parameters)), so a training attack always sees the step's weights. GroupNorm
and BN in batch-statistics mode are not affine in this sense and stay as they are.
"""

from __future__ import annotations

import weakref
from collections import Counter

import torch
from torch import fx, nn

from .norm import MixtureBatchNorm2d


def folded_weights(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of the one convolution that computes ``bn(conv(x))`` with BN's running statistics."""
    with torch.no_grad():
        inv_std = torch.rsqrt(bn.running_var + bn.eps)
        scale = bn.weight * inv_std if bn.affine else inv_std
        shift = (bn.bias if bn.affine else 0) - bn.running_mean * scale
        bias = shift if conv.bias is None else conv.bias * scale + shift
        return conv.weight * scale.reshape(-1, 1, 1, 1), bias  # the weight keeps its memory format


def _set_folded(fused: nn.Conv2d, conv: nn.Conv2d, bn: nn.BatchNorm2d, channels_last: bool = False) -> None:
    """Fold into ``fused``: new parameters the first time, then in place (a compiled view keeps its graph)."""
    weight, bias = folded_weights(conv, bn)
    if channels_last:
        weight = weight.contiguous(memory_format=torch.channels_last)
    if fused.weight.is_meta:
        fused.weight = nn.Parameter(weight, requires_grad=False)
        fused.bias = nn.Parameter(bias, requires_grad=False)
    else:
        with torch.no_grad():
            fused.weight.copy_(weight)
            fused.bias.copy_(bias)


def folded_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d, channels_last: bool = False) -> nn.Conv2d:
    """``bn(conv(x))`` with BN's running statistics as one convolution (weights detached from both)."""
    fused = nn.Conv2d(  # on the meta device: no memory, no random initialisation; the weights are replaced
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
        conv.groups, bias=True, padding_mode=conv.padding_mode, device="meta")
    _set_folded(fused, conv, bn, channels_last)
    return fused


class _Tracer(fx.Tracer):
    """Traces through Mixture BN (its selected branch becomes the BN of the graph); torch.nn layers are leaves."""

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        return not isinstance(m, MixtureBatchNorm2d) and super().is_leaf_module(m, qualified_name)


def _foldable(bn: nn.Module) -> bool:
    return type(bn) is nn.BatchNorm2d and not bn.training and bn.track_running_stats and bn.running_var is not None


# model -> (structure key, view or None, [(folded conv, conv, bn)]): traced once per structure and branch; None
# where nothing folds (the model itself is the view, and a weak-keyed cache must not hold it)
_views: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _structure_key(model: nn.Module) -> tuple:
    """What decides the traced graph: the modules, each Mixture BN's branch and each BN's mode, and the tensors
    the trace holds (``model.to`` replaces buffers and changes parameters' dtype and device in place)."""
    return (tuple((id(m), getattr(m, "branch", None), m.training) for m in model.modules()),
            tuple((id(t), t.dtype, t.device) for t in (*model.parameters(), *model.buffers())))


def fold_batch_norms(model: nn.Module, channels_last: bool = False) -> nn.Module:
    """A view of ``model`` (in eval mode: BN on running statistics) with every conv -> BN pair folded, from the
    current weights and statistics. Returns ``model`` itself when it has nothing to fold (GroupNorm, or BNs in
    batch-statistics mode). The trace is cached per model and structure; later calls only refold the weights.
    ``channels_last``: the folded weights in channels_last memory format (the view's ``channels_last`` attribute
    says so; feed it channels_last inputs). The model's own layers are never converted."""
    key = (_structure_key(model), channels_last)
    cached = _views.get(model)
    if cached is not None and cached[0] == key:
        _, view, pairs = cached
        for fused, conv, bn in pairs:
            _set_folded(fused, conv, bn, channels_last)
        return model if view is None else view
    view, pairs = _trace_and_fold(model, channels_last)
    _views[model] = (key, view if pairs else None, pairs)
    return view


Pair = tuple[nn.Conv2d, nn.Conv2d, nn.BatchNorm2d]  # (folded conv in the view, the model's conv, its BN)


def _trace_and_fold(model: nn.Module, channels_last: bool) -> tuple[nn.Module, list[Pair]]:
    graph = _Tracer().trace(model)
    view = fx.GraphModule(model, graph)
    modules = dict(view.named_modules())
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = []
    for node in list(graph.nodes):
        if node.op != "call_module" or not _foldable(modules[node.target]):
            continue
        source = node.args[0]
        if not (isinstance(source, fx.Node) and source.op == "call_module" and len(source.users) == 1
                and type(modules[source.target]) is nn.Conv2d and calls[source.target] == 1):
            continue
        conv, bn = modules[source.target], modules[node.target]
        fused = folded_conv(conv, bn, channels_last)
        parent, _, name = source.target.rpartition(".")
        setattr(view.get_submodule(parent) if parent else view, name, fused)
        pairs.append((fused, conv, bn))
        node.replace_all_uses_with(source)
        graph.erase_node(node)
    if not pairs:
        return model, pairs
    view.delete_all_unused_submodules()
    view.recompile()
    view.channels_last = channels_last
    view.training = False  # the view's own flag only: its submodules are the model's, whose flags are not ours
    return view, pairs
