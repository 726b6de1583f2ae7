"""``pnnh.convert(model, example_input)``: the PNNH twin of a residual network.

The model is traced with torch.fx. A residual block is an addition of two paths that start
from the same tensor T, one of them (the shortcut) through at most one weight layer (the
identity, or a projection such as a ``downsample`` conv + BN), the other (the branch) through
more; however the code writes it (``out += identity``, ``x + self.block(x)``, ``torch.add``)
it is the same graph. Each block, with the ReLU that follows its addition, becomes:

- a convolutional branch (a chain of Conv2d, BatchNorm2d, ReLU; post- or pre-activation):
  one :class:`PNNHConv` per convolution, with its widths, kernel and stride. Consecutive blocks
  form stages (a new one at each strided block) whose layers share coders as in ``pnnh{D}``,
  so ``convert(resnet56)`` has the structure and parameter count of ``pnnh56``;
- a pre-LN Transformer sub-layer ``x + f(LN(x))``: one :class:`PNNHLinear`,
  ``concat(K x, f'(LN(x)))`` with f' = f whose last Linear keeps only its first
  ``learner_dim`` rows; sub-layers of one kind (the same ops) share a coder, as in ``pnnh_vit``.

The stem, the head and everything between blocks are kept, except norms and activations that
sit between two blocks (a pre-activation block's BN-ReLU), which the next block absorbs: a
ReLU there would cut the code channels. Where blocks are exactly one submodule (a
``BasicBlock``), that submodule is replaced and the twin keeps the model's class (blocks in an
``nn.Sequential`` are spliced into it); otherwise the twin is a ``torch.fx.GraphModule``.

What cannot be converted faithfully raises :class:`ConversionError` naming the module or graph
node: a model fx cannot trace, a branch holding ops a PNNH layer does not have (grouped or
dilated convolutions, squeeze-excitation, layer scale, ...), nested blocks, and any shortcut
that is left in the twin (``find_shortcuts`` must find none).
"""
from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.shape_prop import ShapeProp

from pnnh.io import format_table
from pnnh.models.layers import (PNNH_CHANNELS_LAST_MIN_LEARNER, CoderSpec, PNNHConv, PNNHLinear, coder_spec,
                               pnnh_layers)
from pnnh.models.registry import count_params, create_model, register_prefix
from pnnh.models.shortcuts import _data_nodes, _Tracer, find_shortcuts

__all__ = ["ConversionError", "ConvertedBlock", "ConversionReport", "convert", "CONVERT_PREFIX"]

CONVERT_PREFIX = "convert:"  # create_model("convert:resnet56"): the PNNH twin of a registered model

_ADDS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_", "__add__", "__iadd__"}
_RELUS = {F.relu, torch.relu, torch.relu_}
_DROPOUTS = {F.dropout}
_PASS_MODULES = (nn.Identity, nn.Dropout)  # parameter-free modules a convolutional branch may hold


class ConversionError(ValueError):
    """``convert`` cannot turn this model into its PNNH twin; the message names the node and why."""


@dataclass
class ConvertedBlock:
    """One line of the report: a residual block and the PNNH layers that replaced it."""

    name: str          # the replaced module's path, else the addition's graph node
    shortcut: str      # "identity" or "projection (<module>)"
    layers: str        # the twin's layers, e.g. "3x3/2 16->32, 3x3 32->32"
    params_before: int
    params_after: int  # a coder shared with an earlier block counts there


@dataclass
class ConversionReport:
    """What ``convert`` did, block by block; ``str()`` is the printed table."""

    model: str
    blocks: list[ConvertedBlock]
    params_before: int
    params_after: int

    def __str__(self) -> str:
        rows = [(b.name, b.shortcut, b.layers, f"{b.params_before:,}", f"{b.params_after:,}") for b in self.blocks]
        table = format_table(("block", "shortcut", "PNNH layers", "params before", "after"), rows, align="<<<>>")
        total = (f"{self.model}: {len(self.blocks)} residual blocks -> PNNH layers; parameters "
                 f"{self.params_before:,} -> {self.params_after:,} ({self.params_after / max(self.params_before, 1):.2f}x)")
        return f"{table}\n{total}"


@dataclass
class _Block:
    add: fx.Node
    input: fx.Node                       # T: the tensor branch and shortcut start from
    output: fx.Node                      # the addition, or the ReLU (Identity) after it
    nodes: set[fx.Node]                  # every node of the block (T excluded)
    branch: list[fx.Node]                # in graph order
    shortcut: list[fx.Node]
    layers: list[nn.Module] = field(default_factory=list)
    kind: str = ""                       # "conv" or "linear"
    convs: list[tuple] = field(default_factory=list)


def convert(model: nn.Module, example_input: torch.Tensor, *, spec: CoderSpec | None = None,
            verbose: bool = True, **coder_kwargs) -> nn.Module:
    """The PNNH twin of ``model``: every residual block replaced by PNNH layers (module docstring).

    ``example_input`` is a batch the model accepts (its values do not matter). The PNNH design
    is ``spec`` and/or ``coder_*`` keywords (defaults as in ``pnnh{D}``). ``model`` is left
    untouched; the twin is new, with fresh PNNH layers and copies of everything else. The
    report (:class:`ConversionReport`) is printed when ``verbose`` and kept as
    ``twin.conversion_report``. Raises :class:`ConversionError` for what it cannot convert.
    """
    spec = coder_spec(spec, **coder_kwargs)
    name = type(model).__name__
    graph_module = _trace(model)
    _propagate_shapes(graph_module, model, example_input)
    modules = dict(model.named_modules())  # the graph module holds only the leaves, not their owners
    graph = graph_module.graph
    data = _data_nodes(graph)
    blocks = _find_blocks(graph, modules, data)
    if not blocks:
        raise ConversionError(f"{name} has no residual block (an addition of a branch and a shortcut from one "
                              "tensor) in its traced graph: there is nothing to convert")
    _check_all_shortcuts_in_blocks(model, graph, blocks, modules)
    for block in blocks:
        _build_branch(block, modules, data)
    _build_conv_layers(blocks, spec)
    _build_linear_layers(blocks, modules, spec)
    report = _report(name, model, blocks, modules)
    twin = _place(model, graph_module, blocks, modules)
    _check_twin(model, twin, example_input, name)
    report.params_after = count_params(twin)
    twin.conversion_report = report
    if verbose:
        print(report)
    return twin


def _check_all_shortcuts_in_blocks(model: nn.Module, graph: fx.Graph, blocks: list[_Block], modules) -> None:
    """Every shortcut ``find_shortcuts`` sees must belong to a block that will be replaced."""
    converted = {n.name for block in blocks for n in block.nodes}
    nodes = {n.name: n for n in graph.nodes}
    for found in find_shortcuts(model):
        if found["node"] not in converted:
            raise ConversionError(f"{type(model).__name__} has a shortcut at {_describe(nodes[found['node']], modules)} "
                                  f"(from {found['source']!r}) that is not an addition of a branch and a shortcut "
                                  "(e.g. a DenseNet-style concatenation): convert cannot replace it")


def _trace(model: nn.Module) -> fx.GraphModule:
    try:
        return fx.GraphModule(model, _Tracer().trace(model))
    except Exception as err:  # fx raises many types (TraceError, TypeError, NotImplementedError, ...)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConversionError(f"cannot trace {type(model).__name__} with torch.fx ({type(err).__name__}: {reason}); "
                              "convert needs a forward that torch.fx.symbolic_trace can follow (no Python "
                              "control flow on tensor values)") from err


def _propagate_shapes(graph_module: fx.GraphModule, model: nn.Module, example_input: torch.Tensor) -> None:
    """Run ``example_input`` through the graph once, recording each node's shape (eval mode)."""
    if not isinstance(example_input, torch.Tensor):
        raise ConversionError(f"example_input must be a tensor batch the model accepts, got {type(example_input).__name__}")
    was_training = model.training
    graph_module.eval()
    try:
        with torch.no_grad():
            ShapeProp(graph_module).propagate(example_input)
    except Exception as err:
        raise ConversionError(f"{type(model).__name__} does not run on example_input of shape "
                              f"{tuple(example_input.shape)}: {type(err).__name__}: {err}") from err
    finally:
        graph_module.train(was_training)


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    """A node as a reader finds it in the model: the module path, or the op and where it runs."""
    if node.op == "call_module":
        return f"module {node.target!r} ({type(modules[node.target]).__name__})"
    op = getattr(node.target, "__name__", str(node.target))
    scope = list(node.meta.get("nn_module_stack", {}))
    return f"graph node {node.name!r} ({op}{f' in {scope[-1]!r}' if scope else ''})"


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADDS) or (
        node.op == "call_method" and node.target in _ADD_METHODS)


def _is_relu(node: fx.Node, modules) -> bool:
    return ((node.op == "call_module" and type(modules[node.target]) is nn.ReLU)
            or (node.op == "call_function" and node.target in _RELUS)
            or (node.op == "call_method" and node.target in ("relu", "relu_")))


def _after_add(node: fx.Node, modules) -> bool:
    """The ReLU after a block's addition (or an ``nn.Identity`` standing in for one)."""
    return _is_relu(node, modules) or (node.op == "call_module" and type(modules[node.target]) is nn.Identity)


def _is_norm(node: fx.Node, modules) -> bool:
    return node.op == "call_module" and isinstance(modules[node.target], (nn.BatchNorm2d, nn.LayerNorm))


def _is_weight_layer(node: fx.Node, modules) -> bool:
    """A convolution or linear map (what makes a path a branch rather than a shortcut)."""
    if node.op == "call_module":
        return isinstance(modules[node.target], (nn.modules.conv._ConvNd, nn.Linear))
    return node.op == "call_function" and node.target in (F.conv1d, F.conv2d, F.conv3d, F.linear)


def _holds_params(node: fx.Node, modules) -> bool:
    """A module with parameters, or an op reading a parameter (``x * self.gamma``)."""
    if node.op == "call_module":
        return any(True for _ in modules[node.target].parameters())
    return any(a.op == "get_attr" for a in node.all_input_nodes)


def _data_inputs(node: fx.Node, data) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if a in data]


def _ancestors(node: fx.Node, data) -> set[fx.Node]:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n not in seen and n in data:
            seen.add(n)
            stack.extend(n.all_input_nodes)
    return seen


def _descendants(node: fx.Node) -> set[fx.Node]:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n not in seen:
            seen.add(n)
            stack.extend(n.users)
    return seen


def _find_blocks(graph: fx.Graph, modules, data) -> list[_Block]:
    """Every residual addition with its block: the nodes between its source T and its output."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    blocks: list[_Block] = []
    for node in graph.nodes:
        if not _is_add(node):
            continue
        operands = [a for a in node.args[:2] if isinstance(a, fx.Node) and a in data]
        if len(operands) != 2 or operands[0] is operands[1]:
            continue
        anc = [_ancestors(a, data) for a in operands]
        common = anc[0] & anc[1]
        if not common:
            continue
        source = max(common, key=order.__getitem__)
        after = _descendants(source) - {source}
        paths = [a & after for a in anc]
        weights = [sum(_is_weight_layer(n, modules) for n in paths[i] - paths[1 - i]) for i in (0, 1)]
        skip = 0 if weights[0] < weights[1] else 1
        if weights[skip] > 1 or weights[skip] == weights[1 - skip]:
            continue  # two weighted paths summed (a multi-branch block): no shortcut to remove
        nodes = paths[0] | paths[1] | {node}
        output = node
        while len(output.users) == 1 and _after_add(next(iter(output.users)), modules):
            output = next(iter(output.users))
            nodes.add(output)
        inner = [b for b in blocks if b.add in nodes]
        if inner:
            raise ConversionError(f"the residual block ending at {_describe(node, modules)} contains another "
                                  f"one (ending at {_describe(inner[0].add, modules)}): nested residual blocks "
                                  "are not supported")
        _check_closed(nodes, source, output, node, modules, data)
        branch = sorted(paths[1 - skip], key=order.__getitem__)
        shortcut = sorted(paths[skip] - paths[1 - skip], key=order.__getitem__)
        blocks.append(_Block(node, source, output, nodes, branch, shortcut))
    _absorb_between(blocks, modules, data)
    return blocks


def _check_closed(nodes: set[fx.Node], source: fx.Node, output: fx.Node, add: fx.Node, modules, data) -> None:
    """A block must be a sub-graph with one input (T) and one output to be replaced by a chain."""
    for n in nodes:
        outside = [u for u in n.users if u not in nodes]
        if n is not output and outside:
            raise ConversionError(f"the residual block ending at {_describe(add, modules)} is not self-contained: "
                                  f"{_describe(n, modules)} inside it is also used by {_describe(outside[0], modules)}")
        foreign = [a for a in _data_inputs(n, data) if a not in nodes and a is not source]
        if foreign:
            raise ConversionError(f"the residual block ending at {_describe(add, modules)} reads "
                                  f"{_describe(foreign[0], modules)} from outside it besides its input "
                                  f"{_describe(source, modules)}")


def _absorb_between(blocks: list[_Block], modules, data) -> None:
    """Norms and activations between two blocks join the later one (a pre-activation BN-ReLU)."""
    outputs = {b.output for b in blocks}
    for block in blocks:
        t, chain = block.input, []
        while t not in outputs and (_is_norm(t, modules) or _is_relu(t, modules)):
            inputs = _data_inputs(t, data)
            if len(inputs) != 1 or any(u not in block.nodes and u not in chain for u in t.users):
                break
            chain.append(t)
            t = inputs[0]
        if chain and t in outputs:
            block.input = t
            block.nodes |= set(chain)
            block.branch = chain[::-1] + block.branch


def _build_branch(block: _Block, modules, data) -> None:
    """Classify the branch (convolutional chain or pre-LN sub-layer); refuse anything else."""
    first = block.branch[0]
    if _is_norm(first, modules) and isinstance(modules[first.target], nn.LayerNorm):
        block.kind = "linear"
        return
    block.kind = "conv"
    previous = block.input
    for n in block.branch:
        if _data_inputs(n, data) != [previous]:
            raise ConversionError(f"the branch of the residual block ending at {_describe(block.add, modules)} is "
                                  f"not a chain of layers at {_describe(n, modules)}: a PNNH layer chain cannot "
                                  "express a branch that forks and merges (e.g. squeeze-excitation)")
        module = modules[n.target] if n.op == "call_module" else None
        if isinstance(module, nn.Conv2d):
            block.convs.append(_conv_spec(n.target, module))
        elif not (isinstance(module, (nn.BatchNorm2d, *_PASS_MODULES)) or _is_relu(n, modules)
                  or (n.op == "call_function" and n.target in _DROPOUTS)):
            raise ConversionError(f"the branch of the residual block ending at {_describe(block.add, modules)} "
                                  f"holds {_describe(n, modules)}, which a PNNH layer does not have: convert takes "
                                  "branches of Conv2d, BatchNorm2d and ReLU (ResNet blocks) or pre-LN Transformer "
                                  "sub-layers (LayerNorm first, a Linear last)")
        previous = n
    if not block.convs:
        raise ConversionError(f"the residual block ending at {_describe(block.add, modules)} has no Conv2d in "
                              "its branch: nothing to make PNNH layers from")


def _conv_spec(name: str, conv: nn.Conv2d) -> tuple[int, int, int, int]:
    k, s = conv.kernel_size, conv.stride
    problems = [text for bad, text in (
        (conv.groups != 1, f"groups={conv.groups}"), (conv.dilation != (1, 1), f"dilation={conv.dilation}"),
        (k[0] != k[1] or k[0] % 2 == 0, f"kernel_size={k}"), (s[0] != s[1], f"stride={s}"),
        (conv.padding != (k[0] // 2, k[1] // 2), f"padding={conv.padding}"),
        (conv.padding_mode != "zeros", f"padding_mode={conv.padding_mode!r}")) if bad]
    if problems:
        raise ConversionError(f"module {name!r} (Conv2d) has {', '.join(problems)}: a PNNH layer is a dense "
                              "convolution with a square odd kernel, square stride and padding kernel // 2")
    return conv.in_channels, conv.out_channels, k[0], s[0]


def _runs(blocks: list[_Block], kind: str) -> list[list[_Block]]:
    """Consecutive blocks of one kind (each block's input is the previous block's output)."""
    runs: list[list[_Block]] = []
    for block in blocks:
        if block.kind != kind:
            continue
        if runs and runs[-1][-1].output is block.input:
            runs[-1].append(block)
        else:
            runs.append([block])
    return runs


def _build_conv_layers(blocks: list[_Block], spec: CoderSpec) -> None:
    """PNNHConv layers for every convolutional block, coders shared by stage as in ``pnnh{D}``."""
    for run in _runs(blocks, "conv"):
        stages: list[list[_Block]] = []
        for block in run:
            if not stages or any(s != 1 for *_, s in block.convs):
                stages.append([])
            stages[-1].append(block)
        for stage in stages:
            layers = iter(pnnh_layers(spec, [[c for block in stage for c in block.convs]]))
            for block in stage:
                block.layers = [next(layers) for _ in block.convs]


def _build_linear_layers(blocks: list[_Block], modules, spec: CoderSpec) -> None:
    """A PNNHLinear for every pre-LN sub-layer; sub-layers of one kind in a run share a coder."""
    for run in _runs(blocks, "linear"):
        coders: dict[tuple, nn.Module] = {}
        for block in run:
            norm = modules[block.branch[0].target]
            dim = norm.normalized_shape[-1]
            kind = tuple(_op_name(n, modules) for n in block.branch)
            coder = coders.get((kind, dim))
            layer = PNNHLinear(dim, fn=nn.Identity(), spec=spec, coder=coder, norm=copy.deepcopy(norm))
            layer.fn = _narrowed_learner(block, modules, layer.learner_dim)
            if coder is None and spec.sharing == "stage":
                coders[(kind, dim)] = layer.coder
            block.layers = [layer]


def _op_name(node: fx.Node, modules) -> str:
    return type(modules[node.target]).__name__ if node.op == "call_module" else str(node.target)


def _narrowed_learner(block: _Block, modules, learner_dim: int) -> nn.Module:
    """The sub-layer's function after its LayerNorm, its last Linear keeping ``learner_dim`` rows."""
    norm_node, nodes = block.branch[0], block.branch[1:]
    last = next((n for n in reversed(nodes) if _holds_params(n, modules)), None)
    if last is None or last.op != "call_module" or not isinstance(modules[last.target], nn.Linear):
        where = _describe(last, modules) if last is not None else "nothing"
        raise ConversionError(f"the pre-LN sub-layer ending at {_describe(block.add, modules)} ends in {where}, "
                              "not a Linear: its output width cannot be narrowed to the PNNH learner's")
    tail = nodes[nodes.index(last) + 1:]
    bad = [n for n in tail if not (n.op == "call_module" or (n.op == "call_function" and n.target in _DROPOUTS))]
    if bad:
        raise ConversionError(f"the pre-LN sub-layer ending at {_describe(block.add, modules)} applies "
                              f"{_describe(bad[0], modules)} after its last Linear {last.target!r}: narrowing that "
                              "Linear to the learner width would change what it computes")
    root, prefix = _common_root(nodes, modules)
    scope = [n for n in nodes if root and n.meta.get("nn_module_stack") and root in n.meta["nn_module_stack"]]
    if root and len(scope) == len(nodes) and _scope_size(norm_node.graph, root) == len(nodes):
        learner = copy.deepcopy(modules[root])  # the sub-layer's own module (e.g. Attention), class kept
    else:
        learner = _subgraph_module(nodes, norm_node, block.branch[-1], modules, root, prefix)
    linear = modules[last.target]
    narrow = nn.Linear(linear.in_features, learner_dim, bias=linear.bias is not None,
                       device=linear.weight.device, dtype=linear.weight.dtype)
    with torch.no_grad():  # the first rows of the trained/initialised map: same distribution, fewer outputs
        narrow.weight.copy_(linear.weight[:learner_dim])
        if linear.bias is not None:
            narrow.bias.copy_(linear.bias[:learner_dim])
    _set_module(learner, last.target[len(prefix):], narrow)
    return learner


def _common_root(nodes: list[fx.Node], modules) -> tuple[str, str]:
    """The deepest module path holding every node, and the prefix (``path.``) to strip from targets."""
    stacks = [list(n.meta.get("nn_module_stack", {})) for n in nodes]
    root = ""
    for paths in zip(*stacks):
        if len(set(paths)) != 1:
            break
        root = paths[0]
    while root and any(n.op in ("call_module", "get_attr") and not n.target.startswith(root + ".") for n in nodes):
        root = root.rpartition(".")[0]
    return root, (root + "." if root else "")


def _scope_size(graph: fx.Graph, path: str) -> int:
    return sum(1 for n in graph.nodes if path in n.meta.get("nn_module_stack", {}))


def _subgraph_module(nodes: list[fx.Node], input_node: fx.Node, output_node: fx.Node, modules, root: str,
                     prefix: str) -> fx.GraphModule:
    """``nodes`` (fed by ``input_node``) as a module of their own, targets relative to ``root``."""
    graph = fx.Graph()
    env = {input_node: graph.placeholder("x")}
    for n in nodes:
        env[n] = graph.node_copy(n, env.__getitem__)
        if n.op in ("call_module", "get_attr"):
            env[n].target = n.target[len(prefix):]
    graph.output(env[output_node])
    return fx.GraphModule(copy.deepcopy(modules[root]), graph)


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


def _report(name: str, model: nn.Module, blocks: list[_Block], modules) -> ConversionReport:
    rows, counted = [], set()
    for block in blocks:
        before = {id(p): p.numel() for n in block.nodes if n.op == "call_module"
                  for p in modules[n.target].parameters()}
        after = {id(p): p.numel() for layer in block.layers for p in layer.parameters() if id(p) not in counted}
        counted |= set(after)
        projection = [n.target for n in block.shortcut if _is_weight_layer(n, modules) and n.op == "call_module"]
        shortcut = f"projection ({projection[0].rpartition('.')[0] or projection[0]})" if projection else (
            "projection" if any(_is_weight_layer(n, modules) for n in block.shortcut) else "identity")
        if block.kind == "conv":
            layers = ", ".join(f"{k}x{k}{f'/{s}' if s > 1 else ''} {i}->{o}" for i, o, k, s in block.convs)
        else:
            layer = block.layers[0]
            layers = f"PNNHLinear {layer.norm.normalized_shape[-1]} (learner {layer.learner_dim})"
        root, _ = _common_root(list(block.nodes), modules)
        rows.append(ConvertedBlock(root or f"node {block.add.name!r}", shortcut, layers, sum(before.values()),
                                   sum(after.values())))
    return ConversionReport(name, rows, count_params(model), 0)


def _place(model: nn.Module, graph_module: fx.GraphModule, blocks: list[_Block], modules) -> nn.Module:
    """Put each block's layers in place of its module, or rewrite the graph where blocks are not modules."""
    graph = graph_module.graph
    owners = _module_owners(graph, blocks)
    if owners is not None:
        twin = copy.deepcopy(model)
        placed = []
        for path, group in owners:
            layers = [layer for block in group for layer in block.layers]
            placed.append(layers[0] if len(layers) == 1 else nn.Sequential(*layers))
            _set_module(twin, path, placed[-1])
        _splice(twin, [path for path, _ in owners], {id(m) for m in placed}, graph)
        return _finish(twin, model)
    # A GraphModule holds the model's own submodules: rewrite one built on a copy.
    graph_module = fx.GraphModule(copy.deepcopy(model), graph)
    order = {n: i for i, n in enumerate(graph.nodes)}
    for i, block in enumerate(blocks):
        layers = block.layers
        target = f"pnnh_blocks.{i}"
        graph_module.add_submodule(target, layers[0] if len(layers) == 1 else nn.Sequential(*layers))
        with graph.inserting_after(block.output):
            new = graph.call_module(target, (block.input,))
        block.output.replace_all_uses_with(new)
        for later in blocks[i + 1:]:
            if later.input is block.output:
                later.input = new
        for n in sorted(block.nodes, key=order.__getitem__, reverse=True):
            graph.erase_node(n)
    graph.lint()
    graph_module.recompile()
    graph_module.delete_all_unused_submodules()
    for attr in ("arch", "prefers_channels_last_on_cpu"):
        if hasattr(model, attr):
            setattr(graph_module, attr, getattr(model, attr))
    return _finish(graph_module, model)


def _module_owners(graph: fx.Graph, blocks: list[_Block]) -> list[tuple[str, list[_Block]]] | None:
    """(module path, blocks) for blocks that together are exactly one submodule's nodes; None if any is not."""
    owners: list[tuple[str, list[_Block]]] = []
    for block in blocks:
        stacks = [list(n.meta.get("nn_module_stack", {})) for n in block.nodes]
        common = [p for p in stacks[0] if all(p in s for s in stacks)]
        if not common:
            return None
        path = common[-1]
        if owners and owners[-1][0] == path:
            owners[-1][1].append(block)
        else:
            owners.append((path, [block]))
    for path, group in owners:
        nodes = set().union(*(b.nodes for b in group))
        scope = {n for n in graph.nodes if path in n.meta.get("nn_module_stack", {})}
        if scope != nodes or any(a.output is not b.input for a, b in zip(group, group[1:])):
            return None
    return owners


def _splice(twin: nn.Module, paths: list[str], placed: set[int], graph: fx.Graph) -> None:
    """Flatten a replaced block's layers into its parent ``nn.Sequential`` (so resnet56 -> pnnh56's layout),
    where the parent runs as a whole (its children are not called one by one by index)."""
    called = {p for n in graph.nodes for p in n.meta.get("nn_module_stack", {})}
    for parent_path in dict.fromkeys(p.rpartition(".")[0] for p in paths if "." in p):
        parent = twin.get_submodule(parent_path)
        if (type(parent) is not nn.Sequential or parent_path not in called
                or not all(k.isdigit() for k in parent._modules)):
            continue
        children = []
        for child in parent:
            children += list(child) if id(child) in placed and type(child) is nn.Sequential else [child]
        _set_module(twin, parent_path, nn.Sequential(*children))


def _finish(twin: nn.Module, model: nn.Module) -> nn.Module:
    """Device, mode and the CPU layout preference of the twin (as ``pnnh{D}`` sets it)."""
    param = next(model.parameters(), None)
    if param is not None:
        twin.to(param.device)
    twin.train(model.training)
    learners = [m.weight.shape[0] for m in twin.modules() if isinstance(m, PNNHConv)]
    if learners:
        twin.prefers_channels_last_on_cpu = min(learners) >= PNNH_CHANNELS_LAST_MIN_LEARNER
    return twin


def _check_twin(model: nn.Module, twin: nn.Module, example_input: torch.Tensor, name: str) -> None:
    """The twin runs on the example, gives the model's output shape and has no shortcut left."""
    was_training = twin.training
    twin.eval()
    model_mode = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected, got = model(example_input), twin(example_input)
    except Exception as err:
        raise ConversionError(f"the PNNH twin of {name} does not run on example_input: {type(err).__name__}: {err}. "
                              "Some op between the converted layers depends on the replaced widths") from err
    finally:
        twin.train(was_training)
        model.train(model_mode)
    if getattr(expected, "shape", None) != getattr(got, "shape", None):
        raise ConversionError(f"the PNNH twin of {name} outputs shape {tuple(got.shape)}, the model "
                              f"{tuple(expected.shape)}")
    left = find_shortcuts(twin)
    if left:
        raise ConversionError(f"the PNNH twin of {name} still has a shortcut at graph node {left[0]['node']!r} "
                              f"(from {left[0]['source']!r}): it is not an addition of a branch and a shortcut "
                              "that convert can replace (e.g. a concatenation, DenseNet-style)")


def _build_twin(name: str, kwargs: dict) -> nn.Module:
    """``create_model("convert:NAME", ...)``: the twin of registered model NAME. ``coder_*``
    keywords go to the conversion, the others to NAME's constructor; the example input is a batch
    of ``in_chans`` x ``img_size`` images (given, else recorded by the model, else 3 x 32)."""
    coder = {k: v for k, v in kwargs.items() if k.startswith("coder_")}
    rest = {k: v for k, v in kwargs.items() if k not in coder}
    model = create_model(name, **rest)
    chans, size = (rest.get(k, getattr(model, k, None)) or default for k, default in (("in_chans", 3), ("img_size", 32)))
    key = (name, repr(sorted(kwargs.items())))  # print the table once per process, not at every rebuild
    twin = convert(model, torch.zeros(2, chans, size, size), verbose=key not in _REPORTED, **coder)
    _REPORTED.add(key)
    return twin


_REPORTED: set[tuple[str, str]] = set()  # the convert: twins whose table this process has printed


register_prefix(CONVERT_PREFIX, _build_twin)
