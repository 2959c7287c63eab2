"""Kiln's text-generation step graph rewritten for onnxruntime-genai: each layer's attention and its cache append
as one `com.microsoft::GroupQueryAttention` (with the rotary embedding inside it where the graph's rotary is the
usual rotate-half form), and the RMS norms as `SimplifiedLayerNormalization` / `SkipSimplifiedLayerNormalization`.

Not a registered `-O` pass: it changes what the graph computes for inputs Kiln's gate does not use. The fused
attention is causal over `attention_mask`'s length (ones up to each row's length, as onnxruntime-genai feeds it),
takes its sliding window from the model (`Attention.windows`), and appends to a cache buffer in place when the
runtime shares past and present (`past_present_share_buffer`). The route that uses it (`kiln.targets.onnxrt_genai`)
is gated like every other: the decoding states and greedy tokens against the user's model.

The match is anchored on the graph Kiln's generation wrapper makes (`kiln.compiler.generation.export`): each
`present.{i}.key|value` output is `Concat(past_key_values.{i}.*, new)`; from the key's, the chain of layout ops
(Unsqueeze, Expand, Reshape, Transpose: GQA's repeat_kv) and scalar scales leads to the `MatMul` of the scores,
then optional scalar scales and soft-cap (`tanh(x * f) * c`), the `Add` of the mask, `Softmax`, and the `MatMul`
with the values' chain. The rotary tables are the graph's own cos and sin, evaluated from `position_ids` at every
position. A layer whose attention does not read so is left as it is (`Fusion.skipped` says why).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from kiln.compiler.ort_session import ort_session

if TYPE_CHECKING:
    import onnx_ir as ir

MS_DOMAIN = "com.microsoft"
_LAYOUT_OPS = ("Unsqueeze", "Expand", "Reshape", "Transpose")
_HEADS_FIRST = (0, 2, 1, 3)  # [B, S, H, D] <-> [B, H, S, D]
UNFUSED = ".unfused"  # the name a replaced cache append's output keeps


@dataclass(frozen=True)
class Attention:
    """What the fused op needs to know of the model: heads, each layer's sliding window (None: full attention) and
    the positions it has (the rotary tables' length)."""

    heads: int
    kv_heads: int
    head_dim: int
    windows: tuple[int | None, ...]  # per layer
    positions: int


@dataclass
class Fusion:
    """What the rewrite did: layers fused (and with the rotary inside), norms fused, layers left and why."""

    fused_attention: int = 0
    fused_rotary: int = 0
    packed_qkv: int = 0  # fused layers whose query, key and value projections became one MatMul
    rms_norms: int = 0
    skipped: dict[int, str] = field(default_factory=dict)  # -1: the graph as a whole

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, for the manifest."""
        return {
            "fused_attention": self.fused_attention,
            "fused_rotary": self.fused_rotary,
            "packed_qkv": self.packed_qkv,
            "rms_norms": self.rms_norms,
            "skipped": {str(k): v for k, v in self.skipped.items()},
        }


class _NoMatch(Exception):
    """A layer's attention does not read as expected (the reason)."""


@dataclass
class _Graph:
    """One rewrite's state: the model, its outputs by name, and what every layer shares (the lengths, the rotary
    caches by their cos and sin)."""

    model: ir.Model
    attention: Attention
    outputs: dict[str, ir.Value]
    lengths: dict[str, ir.Value] = field(default_factory=dict)
    caches: dict[tuple[str, str], tuple[ir.Value, ir.Value]] = field(default_factory=dict)


def rewrite_for_genai(model: ir.Model, attention: Attention) -> Fusion:
    """Rewrite `model` (Kiln's growing-cache step graph) in place; what was fused."""
    import onnx_ir.passes.common as common

    fusion = Fusion()
    state = _Graph(model, attention, {v.name or "": v for v in model.graph.outputs})
    layer = 0
    while f"present.{layer}.key" in state.outputs:
        try:
            fusion.fused_rotary += _fuse_layer(state, layer)
            fusion.fused_attention += 1
        except _NoMatch as reason:
            fusion.skipped[layer] = str(reason)
        layer += 1
    common.RemoveUnusedNodesPass()(model)
    left = sorted({v.name or "" for n in model.graph for v in n.outputs if (v.name or "").endswith(UNFUSED)})
    if left:  # something else still reads a replaced cache append: correct, but computed twice
        fusion.skipped[-1] = f"still computed besides the fused attention: {', '.join(left[:4])}"
    fusion.packed_qkv = sum(_pack_projections(model, node) for node in list(model.graph) if _is_gqa(node))
    fusion.rms_norms = _fuse_rms_norms(model)
    _clean_up(model)
    return fusion


def _is_gqa(node: ir.Node) -> bool:
    return node.op_type == "GroupQueryAttention" and node.domain == MS_DOMAIN


def _pack_projections(model: ir.Model, attention: ir.Node) -> bool:
    """The fused attention's query, key and value as one packed projection, as onnxruntime-genai's model builder
    makes them (one MatMul of the weights side by side, and one Add of the biases when the projections have them;
    GroupQueryAttention then reads the packed tensor alone): a decoded token runs one matrix product, not three.
    Whether it packed; a layer whose projections are not MatMuls of constant weights on one input (a bias Add
    or none for all three) is left as it is."""
    import onnx_ir as ir

    projections = [p for p in (_projection(v) for v in attention.inputs[:3]) if p is not None]
    if len(projections) != 3 or len({id(p[0]) for p in projections}) != 1:
        return False
    biases = [p[2] for p in projections if p[2] is not None]
    if len(biases) not in (0, 3):
        return False
    source = projections[0][0]
    weights = np.concatenate([p[1] for p in projections], axis=1)
    tape = ir.tape.Tape()
    name = f"kiln_qkv_{attention.name or id(attention)}"
    packed_weights = ir.Value(name=f"{name}_weight", const_value=ir.tensor(weights))
    model.graph.register_initializer(packed_weights)
    packed = tape.op("MatMul", [source, packed_weights])
    if biases:
        packed_bias = ir.Value(name=f"{name}_bias", const_value=ir.tensor(np.concatenate(biases)))
        model.graph.register_initializer(packed_bias)
        packed = tape.op("Add", [packed, packed_bias])
    for node in tape.nodes:
        model.graph.insert_before(attention, node)
    attention.replace_input_with(0, packed)
    attention.replace_input_with(1, None)
    attention.replace_input_with(2, None)
    return True


def _projection(value: ir.Value | None) -> tuple[ir.Value, np.ndarray, np.ndarray | None] | None:
    """(input, weight [in, out], bias [out] or None) when `value` is `MatMul(input, W)` or `Add` of it and a
    constant bias, with W a constant matrix and nothing else reading `value` or the product; else None."""
    node = value.producer() if value is not None else None
    if value is None or node is None or len(value.uses()) != 1:
        return None
    bias = None
    if node.op_type == "Add":
        product, constant = node.inputs
        if product is None or constant is None or constant.const_value is None or product.const_value is not None:
            product, constant = constant, product
        if product is None or constant is None or constant.const_value is None or len(product.uses()) != 1:
            return None
        bias = np.asarray(constant.const_value.numpy())
        node = product.producer()
        if node is None or bias.ndim != 1:
            return None
    if node.op_type != "MatMul" or node.inputs[0] is None or node.inputs[1] is None:
        return None
    weight = node.inputs[1].const_value
    if weight is None or len(weight.shape) != 2:
        return None
    return node.inputs[0], np.asarray(weight.numpy()), bias


def _fuse_layer(state: _Graph, layer: int) -> bool:
    """Replace one layer's attention by GroupQueryAttention; whether its rotary went inside."""
    import onnx_ir as ir

    graph, attention, outputs = state.model.graph, state.attention, state.outputs
    present_key, present_value = outputs[f"present.{layer}.key"], outputs[f"present.{layer}.value"]
    past_key, new_key = _cache_append(present_key, f"past_key_values.{layer}.key")
    past_value, new_value = _cache_append(present_value, f"past_key_values.{layer}.value")
    scores, key_scale = _follow_layout(present_key, "MatMul")
    weighted, _ = _follow_layout(present_value, "MatMul")
    query, query_scale = _scaled_source(scores.inputs[0])
    after, scale, softcap = _after_scores(scores)
    if after.op_type != "Add":
        raise _NoMatch(f"{after.op_type} where the mask's Add should follow the scores")
    softmax = _single_user(after.outputs[0], "Softmax")
    if _single_user(softmax.outputs[0], "MatMul") is not weighted or weighted.inputs[0] is not softmax.outputs[0]:
        raise _NoMatch("the probabilities' MatMul does not read the values' cache")
    rotary = _rotary(query, new_key)
    tape = ir.tape.Tape()
    inputs: list[ir.Value | None]
    if rotary is not None:
        inputs = [_as_bsd(tape, rotary[0]), _as_bsd(tape, rotary[1])]
    else:
        inputs = [_as_bsd(tape, query), _as_bsd(tape, new_key)]
    inputs += [_as_bsd(tape, new_value), past_key, past_value, *_lengths(state, tape)]
    if rotary is not None:
        position_ids = next(v for v in graph.inputs if v.name == "position_ids")
        inputs += [*_rotary_caches(state, rotary[2], rotary[3]), position_ids]
    window = attention.windows[layer] if layer < len(attention.windows) else None
    settings = {
        "num_heads": attention.heads,
        "kv_num_heads": attention.kv_heads,
        "scale": float(query_scale * key_scale * scale),
        "local_window_size": window or -1,  # keys at q - window < k <= q, as transformers
        "softcap": float(softcap),
        "do_rotary": int(rotary is not None),
        "rotary_interleaved": 0,
    }
    out, new_present_key, new_present_value = tape.op_multi_out(
        "GroupQueryAttention", inputs, settings, num_outputs=3, domain=MS_DOMAIN
    )
    merged = _merged_heads(weighted.outputs[0], attention.heads * attention.head_dim)
    if merged is None:  # the heads-first result the rest of the graph reads
        heads = tape.op("Reshape", [out, _ints(tape, [0, 0, attention.heads, -1])])
        heads_first = tape.op("Transpose", [heads], {"perm": list(_HEADS_FIRST)})
    for node in tape.nodes:
        graph.insert_before(scores, node)
    _replace_output(graph, outputs, f"present.{layer}.key", new_present_key)
    _replace_output(graph, outputs, f"present.{layer}.value", new_present_value)
    if merged is not None:
        merged.replace_all_uses_with(out)
    else:
        weighted.outputs[0].replace_all_uses_with(heads_first)
    state.model.opset_imports.setdefault(MS_DOMAIN, 1)
    return rotary is not None


def _merged_heads(value: ir.Value, width: int) -> ir.Value | None:
    """The [B, S, heads * head_dim] tensor the graph makes of the attention's [B, H, S, D] result (a Transpose to
    heads-last, then a Reshape merging them, maybe after a Reshape that keeps the shape), which the fused op's
    output replaces; None when it does not read so."""
    users = [u.node for u in value.uses()]
    if len(users) == 1 and users[0].op_type == "Reshape" and _rank(users[0].outputs[0]) == 4:
        value = users[0].outputs[0]
        users = [u.node for u in value.uses()]
    if len(users) != 1 or users[0].op_type != "Transpose":
        return None
    if tuple(users[0].attributes.get_ints("perm", ())) != _HEADS_FIRST:
        return None
    after = [u.node for u in users[0].outputs[0].uses()]
    if len(after) != 1 or after[0].op_type != "Reshape":
        return None
    merged = after[0].outputs[0]
    shape = merged.shape
    return merged if shape is not None and len(shape) == 3 and shape[2] == width else None


def _rank(value: ir.Value) -> int | None:
    return len(value.shape) if value.shape is not None else None


def _cache_append(present: ir.Value, past_name: str) -> tuple[ir.Value, ir.Value]:
    """(past input, new tensor) of `present = Concat(past, new)` on the sequence axis."""
    node = present.producer()
    if node is None or node.op_type != "Concat" or len(node.inputs) != 2:
        raise _NoMatch(f"{present.name} is not a Concat of the past and the new")
    axis = node.attributes.get_int("axis", 0)
    past, new = node.inputs
    if past is None or new is None or past.name != past_name or axis not in (2, -2):
        raise _NoMatch(f"{present.name} does not append to {past_name} on the sequence axis")
    return past, new


def _follow_layout(value: ir.Value, until: str) -> tuple[ir.Node, float]:
    """The `until` node that reads `value` (as its second operand) through layout ops and scalar scales, and the
    scale on the way; shape computations (Shape) on the way are left aside."""
    scale = 1.0
    while True:
        users = [u for u in value.uses() if u.node.op_type != "Shape"]
        if len(users) != 1:
            raise _NoMatch(f"{value.name} has {len(users)} users on the way to the {until}")
        node = users[0].node
        if node.op_type == until:
            if users[0].idx != 1:
                raise _NoMatch(f"{value.name} is not the second operand of the {until}")
            return node, scale
        factor = _scalar_factor(node, value)
        if node.op_type not in _LAYOUT_OPS and factor is None:
            raise _NoMatch(f"{node.op_type} on the way from {value.name} to the {until}")
        scale *= factor if factor is not None else 1.0
        value = node.outputs[0]


def _scaled_source(value: ir.Value | None) -> tuple[ir.Value, float]:
    """The tensor before any scalar scales (Mul/Div by a constant) that produce `value`, and their product."""
    scale = 1.0
    while value is not None:
        node = value.producer()
        operand = next((i for i in node.inputs if i is not None and i.const_value is None), None) if node else None
        factor = _scalar_factor(node, operand) if node is not None else None
        if factor is None or operand is None:
            break
        scale, value = scale * factor, operand
    if value is None:
        raise _NoMatch("the scores have no query operand")
    return value, scale


def _scalar_factor(node: ir.Node, operand: ir.Value | None) -> float | None:
    """The factor a `Mul`/`Div` by a scalar constant applies to `operand`, else None."""
    if node.op_type not in ("Mul", "Div") or len(node.inputs) != 2 or operand is None:
        return None
    other = node.inputs[1] if node.inputs[0] is operand else node.inputs[0]
    if other is None or other.const_value is None or other.const_value.size != 1:
        return None
    if node.op_type == "Div" and node.inputs[0] is not operand:
        return None
    number = float(np.asarray(other.const_value.numpy()).reshape(-1)[0])
    return 1.0 / number if node.op_type == "Div" else number


def _after_scores(scores: ir.Node) -> tuple[ir.Node, float, float]:
    """The node after the scores' scalar scales and soft-cap (`tanh(x * f) * c`), the scale and the cap (0: none)."""
    value, scale, cap = scores.outputs[0], 1.0, 0.0
    while True:
        node = _single_user(value, None)
        factor = _scalar_factor(node, value)
        if factor is None:
            return node, scale, cap
        following = _single_user(node.outputs[0], None)
        if following.op_type == "Tanh" and cap == 0.0:
            back = _single_user(following.outputs[0], None)
            multiplier = _scalar_factor(back, following.outputs[0])
            if multiplier is None:
                raise _NoMatch("a tanh on the scores that is not a soft-cap")
            cap, scale, value = multiplier, scale * factor * multiplier, back.outputs[0]
        else:
            scale, value = scale * factor, node.outputs[0]


def _single_user(value: ir.Value, op_type: str | None) -> ir.Node:
    """The one node that reads `value` (of `op_type`, when given); a _NoMatch otherwise."""
    users = [u.node for u in value.uses()]
    if len(users) != 1 or (op_type is not None and users[0].op_type != op_type):
        raise _NoMatch(f"{value.name} is not read by one {op_type or 'node'}")
    return users[0]


def _rotary(query: ir.Value, key: ir.Value) -> tuple[ir.Value, ir.Value, ir.Value, ir.Value] | None:
    """When the query and key are `x * cos + rotate_half(x) * sin` of the same cos and sin: (the query before it,
    the key before it, cos, sin); else None (the rotary stays in the graph)."""
    q = _rotate_half_form(query)
    k = _rotate_half_form(key)
    if q is None or k is None or q[1] is not k[1] or q[2] is not k[2]:
        return None
    return q[0], k[0], q[1], q[2]


def _rotate_half_form(value: ir.Value) -> tuple[ir.Value, ir.Value, ir.Value] | None:
    """(x, cos, sin) when `value = Add(Mul(x, cos), Mul(Concat(Neg(Slice(x, half:)), Slice(x, :half)), sin))`."""
    add = value.producer()
    if add is None or add.op_type != "Add" or len(add.inputs) != 2:
        return None
    for first, second in (tuple(add.inputs), tuple(reversed(add.inputs))):
        direct, rotated = (v.producer() if v is not None else None for v in (first, second))
        if direct is None or rotated is None or direct.op_type != "Mul" or rotated.op_type != "Mul":
            continue
        for x, cos in (tuple(direct.inputs), tuple(reversed(direct.inputs))):
            for half, sin in (tuple(rotated.inputs), tuple(reversed(rotated.inputs))):
                if x is not None and cos is not None and sin is not None and _is_rotate_half(half, x):
                    return x, cos, sin
    return None


def _is_rotate_half(value: ir.Value | None, x: ir.Value) -> bool:
    """Whether `value = Concat(Neg(Slice(x, ...)), Slice(x, ...))` (the halves are checked by the caches: a table
    whose two halves are equal)."""
    node = value.producer() if value is not None else None
    if node is None or node.op_type != "Concat" or len(node.inputs) != 2 or node.inputs[0] is None:
        return False
    negated = node.inputs[0].producer()
    if negated is None or negated.op_type != "Neg":
        return False
    slices = [v.producer() if v is not None else None for v in (negated.inputs[0], node.inputs[1])]
    return all(s is not None and s.op_type == "Slice" and s.inputs[0] is x for s in slices)


def _rotary_caches(state: _Graph, cos: ir.Value, sin: ir.Value) -> tuple[ir.Value, ir.Value]:
    """GroupQueryAttention's cos and sin caches [positions, head_dim / 2]: the graph's own cos and sin (made from
    `position_ids`) evaluated at every position the model has; a _NoMatch when they depend on anything else or
    are not the rotate-half form (both halves equal)."""
    import onnx_ir as ir

    key = (cos.name or "", sin.name or "")
    if key in state.caches:
        return state.caches[key]
    dim, positions = state.attention.head_dim, state.attention.positions
    caches = []
    for name, table in zip(("cos", "sin"), _evaluate(state.model, [cos, sin], positions)):
        table = table.reshape(-1, table.shape[-1])
        if table.shape != (positions, dim) or not np.array_equal(table[:, : dim // 2], table[:, dim // 2 :]):
            raise _NoMatch(f"the rotary {name} is not a [positions, {dim}] table of two equal halves")
        half = ir.tensor(np.ascontiguousarray(table[:, : dim // 2]))
        cache = ir.Value(name=f"kiln_rotary_{name}_{len(state.caches)}", const_value=half)
        state.model.graph.register_initializer(cache)
        caches.append(cache)
    state.caches[key] = (caches[0], caches[1])
    return state.caches[key]


def _evaluate(model: ir.Model, values: list[ir.Value], positions: int) -> list[np.ndarray]:
    """`values` computed by the graph from `position_ids` = 0..positions-1 alone (ONNX Runtime on the extracted
    subgraph); a _NoMatch when they need any other input."""
    import onnx_ir as ir

    position_ids = next((v for v in model.graph.inputs if v.name == "position_ids"), None)
    if position_ids is None:
        raise _NoMatch("the graph has no position_ids input")
    try:
        sub = ir.convenience.extract(model.graph, [position_ids], values)
    except ValueError as exc:
        raise _NoMatch(f"the rotary tables need more than position_ids ({exc})") from None
    for item in sub.initializers.values():
        if item.const_value is not None:
            item.const_value = ir.tensor(item.const_value.numpy())  # in memory: the small model has no data file
    small = ir.Model(sub, ir_version=model.ir_version)
    session = ort_session(ir.to_proto(small).SerializeToString())
    feeds = {"position_ids": np.arange(positions, dtype=np.int64)[None]}
    return [np.asarray(t, np.float32) for t in session.run(None, feeds)]


def _as_bsd(tape: ir.tape.Tape, value: ir.Value) -> ir.Value:
    """`value` [B, H, S, D] as [B, S, H * D]: the tensor before its Transpose to heads-first when it has one."""
    node = value.producer()
    if node is not None and node.op_type == "Transpose" and tuple(node.attributes.get_ints("perm", ())) == _HEADS_FIRST:
        source = node.inputs[0]
        assert source is not None
        split = source.producer()  # the projection [B, S, H * D] split into heads: the projection itself
        projection = split.inputs[0] if split is not None and split.op_type == "Reshape" else None
        if projection is not None and _rank(projection) == 3 and _rank(source) == 4:
            return projection
        return tape.op("Reshape", [source, _ints(tape, [0, 0, -1])])
    heads_last = tape.op("Transpose", [value], {"perm": list(_HEADS_FIRST)})
    return tape.op("Reshape", [heads_last, _ints(tape, [0, 0, -1])])


def _ints(tape: ir.tape.Tape, values: list[int]) -> ir.Value:
    import onnx_ir as ir

    return tape.op("Constant", [], {"value": ir.tensor(np.asarray(values, np.int64))})


def _lengths(state: _Graph, tape: ir.tape.Tape) -> tuple[ir.Value, ir.Value]:
    """GroupQueryAttention's `seqlens_k` (each row's ones in `attention_mask`, minus 1, int32) and
    `total_sequence_length` (its length, int32), made once per graph."""
    import onnx_ir as ir

    if not state.lengths:
        mask = next(v for v in state.model.graph.inputs if v.name == "attention_mask")
        counted = tape.op("ReduceSum", [mask, _ints(tape, [1])], {"keepdims": 0})
        one = tape.op("Constant", [], {"value": ir.tensor(np.int64(1))})
        state.lengths["seqlens"] = tape.op("Cast", [tape.op("Sub", [counted, one])], {"to": ir.DataType.INT32})
        length = tape.op("Gather", [tape.op("Shape", [mask]), one], {"axis": 0})
        state.lengths["total"] = tape.op("Cast", [length], {"to": ir.DataType.INT32})
    return state.lengths["seqlens"], state.lengths["total"]


def _replace_output(graph: ir.Graph, outputs: dict[str, ir.Value], name: str, value: ir.Value) -> None:
    """Make `value` the graph output `name` in the old one's place."""
    old = outputs[name]
    index = list(graph.outputs).index(old)
    old.name = f"{name}{UNFUSED}"
    value.name = name
    value.type, value.shape = old.type, old.shape
    graph.outputs[index] = value
    outputs[name] = value


def _fuse_rms_norms(model: ir.Model) -> int:
    """onnxscript's RMS-norm fusions (ONNX Runtime's SimplifiedLayerNormalization and its skip form)."""
    import onnx_ir.passes.common as common
    from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization
    from onnxscript.rewriter.ort_fusions.skip_normalization import fuse_skip_rms_normalization

    common.ShapeInferencePass()(model)
    count = int(fuse_rms_normalization(model)) + int(fuse_skip_rms_normalization(model))
    common.RemoveUnusedNodesPass()(model)
    return count


def _clean_up(model: ir.Model) -> None:
    """Consecutive Reshapes (the projections' split into heads and the fused op's merge) as one, and the
    constants and nodes nothing reads removed."""
    import onnx_ir.passes.common as common
    from onnxscript.rewriter import pattern
    from onnxscript.rewriter.rules import common as rules

    pattern.RewriteRuleSet([rules.reshape_reshape_rule]).apply_to_model(model)
    common.RemoveUnusedNodesPass()(model)
