"""Find shortcut connections in a model's traced graph.

A shortcut is an addition or concatenation where one operand comes from a tensor T through no
weight layer (only parameter-free ops: identity, pooling, reshape, slicing, activations), while
the other operand's path also starts from T and goes through at least one weight layer. That
is exactly what a residual connection is, and what a plain chain never contains.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx
import torch.nn as nn

_COMBINE_FUNCTIONS = {operator.add, operator.iadd, torch.add, torch.cat, torch.concat, torch.stack, torch.sum}
_COMBINE_METHODS = {"add", "add_", "__add__", "__iadd__"}


class _Tracer(fx.Tracer):
    """Keeps modules that declare ``fx_leaf = True`` (channel-wise ops such as a partial norm) whole."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return getattr(m, "fx_leaf", False) or super().is_leaf_module(m, qualname)


def _is_weight(node: fx.Node, modules: dict[str, nn.Module], data: set[fx.Node]) -> bool:
    """A weight layer calls a module holding parameters, or combines data with a parameter-only
    operand (``F.conv2d(h, w)``, ``F.linear(h, K)``, ``x + pos_embed``)."""
    if node.op == "call_module":
        return any(True for _ in modules[node.target].parameters())
    return any(a not in data for a in node.all_input_nodes)


def _data_nodes(graph: fx.Graph) -> set[fx.Node]:
    """Nodes that depend on the input (activations), as opposed to parameter-only subgraphs."""
    data: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op == "placeholder" or any(a in data for a in node.all_input_nodes):
            data.add(node)
    return data


def _operands(node: fx.Node, data: set[fx.Node]) -> list[fx.Node]:
    if node.target in (torch.cat, torch.concat, torch.stack):
        seq = node.args[0] if node.args else node.kwargs["tensors"]
        return [a for a in seq if isinstance(a, fx.Node) and a in data]
    return [a for a in node.all_input_nodes if a in data]


def _param_free_sources(node: fx.Node, modules, data) -> set[fx.Node]:
    """Data nodes reaching ``node`` through parameter-free ops only (``node`` included)."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen or n not in data:
            continue
        seen.add(n)
        if n.op != "placeholder" and not _is_weight(n, modules, data):
            stack.extend(n.all_input_nodes)
    return seen


def _sources_through_weight(node: fx.Node, modules, data) -> set[fx.Node]:
    """Data nodes with a path to ``node`` that passes at least one weight layer."""
    result, seen, stack = set(), set(), [(node, False)]
    while stack:
        n, weighted = stack.pop()
        if (n, weighted) in seen or n not in data:
            continue
        seen.add((n, weighted))
        if weighted:
            result.add(n)
        weighted = weighted or _is_weight(n, modules, data)
        stack.extend((a, weighted) for a in n.all_input_nodes)
    return result


def find_shortcuts(model: nn.Module, example_input: torch.Tensor | None = None) -> list[dict]:
    """List every shortcut in ``model`` (empty for a plain chain).

    Each entry: ``{"node": combining op, "op": its target, "source": the tensor both paths
    start from, "skip": the operand that reaches the op through no weight layer}``.
    The model is traced with torch.fx (``example_input`` is accepted for API symmetry and
    used to check the traced graph runs).
    """
    graph = _Tracer().trace(model)
    graph_module = fx.GraphModule(model, graph)
    if example_input is not None:
        with torch.no_grad():
            was_training = model.training
            model.eval()
            graph_module.eval()
            graph_module(example_input)
            model.train(was_training)
    modules = dict(graph_module.named_modules())
    data = _data_nodes(graph)
    found = []
    for node in graph_module.graph.nodes:
        combines = (node.op == "call_function" and node.target in _COMBINE_FUNCTIONS) or (
            node.op == "call_method" and node.target in _COMBINE_METHODS)
        if not combines:
            continue
        operands = _operands(node, data)
        for i, skip in enumerate(operands):
            sources = _param_free_sources(skip, modules, data)
            for j, other in enumerate(operands):
                if i == j:
                    continue
                shared = sources & _sources_through_weight(other, modules, data)
                if shared:
                    source = next(iter(shared))
                    found.append({"node": node.name, "op": str(node.target), "source": source.name,
                                  "skip": skip.name})
                    break
            else:
                continue
            break
    return found
