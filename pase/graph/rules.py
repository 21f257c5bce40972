"""Per-kind layer rules: iteration-space dimensions, tensor maps, FLOPs.

For an anchor op (the op that starts a layer) a rule names the layer's iteration-space
dimensions with extents and roles, says which dimension each axis of each operand and of the
output runs over, and counts forward FLOPs and the FLOPs of each operand's gradient. Counts
follow ``torch.utils.flop_counter`` (2 FLOPs per multiply-add; elementwise, norm and resample
ops count 0) so that layer sums equal ``FlopCounterMode`` on the meta device.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from math import prod

from torch import broadcast_shapes

from pase.graph.ir import TensorMeta

ROLES = ("batch", "out_channel", "reduction", "channel", "spatial", "head", "sequence", "kernel", "other")

DimMap = list[str | None]  # one dimension name (or None: broadcast / not an iteration dim) per tensor axis


@dataclass
class LayerRule:
    dims: dict[str, int]
    roles: dict[str, str]
    operand_maps: list[DimMap | None]  # per operand (None: not a tensor this rule maps)
    out_map: DimMap
    flops_fwd: int = 0
    grad_flops: list[int] = field(default_factory=list)  # per operand: FLOPs of d(loss)/d(operand)
    # FLOPs needed once if any of the listed operands needs a gradient (e.g. d(scores) in attention)
    shared_grads: list[tuple[int, tuple[int, ...]]] = field(default_factory=list)

    def backward_flops(self, requires_grad: list[bool]) -> int:
        """Gradient FLOPs given which operands need gradients (as autograd computes them)."""
        total = sum(g for g, rg in zip(self.grad_flops, requires_grad) if rg)
        return total + sum(f for f, idx in self.shared_grads if any(requires_grad[i] for i in idx))

    def add(self, name: str, extent: int, role: str) -> str:
        self.dims[name] = extent
        self.roles[name] = role
        return name


def generic_names(ndim: int) -> list[tuple[str, str]]:
    """Dimension names and roles for a tensor layout we know only by rank (NCHW / NSC conventions)."""
    table = {
        0: [], 1: [("n", "batch")], 2: [("n", "batch"), ("c", "channel")],
        3: [("n", "batch"), ("s", "sequence"), ("c", "channel")],
        4: [("n", "batch"), ("c", "channel"), ("h", "spatial"), ("w", "spatial")],
        5: [("n", "batch"), ("c", "channel"), ("t", "spatial"), ("h", "spatial"), ("w", "spatial")],
    }
    return table.get(ndim, [("n", "batch")] + [(f"d{i}", "other") for i in range(1, ndim)])


def _spatial_names(count: int) -> list[str]:
    return {1: ["l"], 2: ["h", "w"], 3: ["t", "h", "w"]}.get(count, [f"x{i}" for i in range(count)])


def _batch_names(count: int) -> list[tuple[str, str]]:
    """Leading batch-like axes of matmul/attention operands: (n, heads) for 4-D, n for 3-D."""
    if count == 2:
        return [("n", "batch"), ("heads", "head")]
    return [("n", "batch")] + [(f"b{i}", "batch") for i in range(1, count)]


def generic_rule(out: TensorMeta, operands: list[TensorMeta | None], flops_fwd: int = 0) -> LayerRule:
    """Elementwise / join / input / unknown layers: dims named from the output, operands broadcast-aligned."""
    rule = LayerRule({}, {}, [], [])
    names = [rule.add(name, extent, role) for (name, role), extent in zip(generic_names(len(out.shape)), out.shape)]
    rule.out_map = list(names)
    for meta in operands:
        rule.operand_maps.append(None if meta is None else broadcast_map(meta.shape, out.shape, names))
    rule.flops_fwd = flops_fwd
    rule.grad_flops = [flops_fwd] * len(operands)
    return rule


def broadcast_map(shape: tuple[int, ...], out_shape: tuple[int, ...], names: list[str]) -> DimMap:
    offset = len(out_shape) - len(shape)
    result: DimMap = []
    for i, extent in enumerate(shape):
        j = i + offset
        result.append(names[j] if 0 <= j < len(names) and (extent == out_shape[j] or extent != 1) else None)
    return result


def conv_rule(operands: list[TensorMeta | None], out: TensorMeta, transposed: bool) -> LayerRule:
    x, w = operands[0], operands[1]
    assert x is not None and w is not None
    rule = LayerRule({}, {}, [], [])
    n = rule.add("n", x.shape[0], "batch")
    c_out = rule.add("c_out", out.shape[1], "out_channel")
    c_in = rule.add("c_in", x.shape[1] if transposed else w.shape[1], "reduction")
    spatial = [rule.add(s, e, "spatial") for s, e in zip(_spatial_names(len(out.shape) - 2), out.shape[2:])]
    kernel = [rule.add(f"k{s}", e, "kernel") for s, e in zip(_spatial_names(len(w.shape) - 2), w.shape[2:])]
    weight_map: DimMap = [c_in, c_out, *kernel] if transposed else [c_out, c_in, *kernel]
    bias_map: DimMap = [c_out]
    rule.operand_maps = [[n, c_in, *spatial], weight_map, *[bias_map] * (len(operands) - 2)]
    rule.out_map = [n, c_out, *spatial]
    conv_shape = x.shape[2:] if transposed else out.shape[2:]
    rule.flops_fwd = 2 * x.shape[0] * prod(conv_shape) * prod(w.shape)
    rule.grad_flops = [rule.flops_fwd, rule.flops_fwd] + [0] * (len(operands) - 2)
    return rule


def linear_rule(operands: list[TensorMeta | None], out: TensorMeta) -> LayerRule:
    x, w = operands[0], operands[1]
    assert x is not None and w is not None
    rule = LayerRule({}, {}, [], [])
    lead_names = [("n", "batch")] + ([("s", "sequence")] if len(x.shape) == 3 else
                                     [(f"s{i}", "sequence") for i in range(1, len(x.shape) - 1)])
    lead = [rule.add(name, e, role) for (name, role), e in zip(lead_names, x.shape[:-1])]
    c_out = rule.add("c_out", w.shape[0], "out_channel")
    c_in = rule.add("c_in", w.shape[1], "reduction")
    bias_map: DimMap = [c_out]
    rule.operand_maps = [[*lead, c_in], [c_out, c_in], *[bias_map] * (len(operands) - 2)]
    rule.out_map = [*lead, c_out]
    rule.flops_fwd = 2 * prod(x.shape[:-1]) * w.shape[0] * w.shape[1]
    rule.grad_flops = [rule.flops_fwd, rule.flops_fwd] + [0] * (len(operands) - 2)
    return rule


def matmul_rule(a: TensorMeta, b: TensorMeta, out: TensorMeta) -> LayerRule:
    """``a @ b`` with torch.matmul's 1-D and broadcast-batch rules; m/o/k become q/kv/d if the layer
    turns into attention."""
    rule = LayerRule({}, {}, [], [])
    a_batch, b_batch = (a.shape[:-2] if len(a.shape) > 1 else ()), (b.shape[:-2] if len(b.shape) > 1 else ())
    batch_shape = tuple(broadcast_shapes(a_batch, b_batch))
    batch = [rule.add(name, e, role) for (name, role), e in zip(_batch_names(len(batch_shape)), batch_shape)]
    m = rule.add("m", a.shape[-2] if len(a.shape) > 1 else 1, "sequence")
    k = rule.add("k", a.shape[-1], "reduction")
    o = rule.add("o", b.shape[-1] if len(b.shape) > 1 else 1, "out_channel")
    a_lead = [d if a_batch[i] != 1 or batch_shape[len(batch_shape) - len(a_batch) + i] == 1 else None
              for i, d in enumerate(batch[len(batch) - len(a_batch):])]
    b_lead = [d if b_batch[i] != 1 or batch_shape[len(batch_shape) - len(b_batch) + i] == 1 else None
              for i, d in enumerate(batch[len(batch) - len(b_batch):])]
    rule.operand_maps = [a_lead + [m, k] if len(a.shape) > 1 else [k], b_lead + [k, o] if len(b.shape) > 1 else [k]]
    rule.out_map = [*batch, *([m] if len(a.shape) > 1 else []), *([o] if len(b.shape) > 1 else [])]
    rule.flops_fwd = 2 * prod(batch_shape) * rule.dims["m"] * rule.dims["o"] * rule.dims["k"]
    rule.grad_flops = [rule.flops_fwd, rule.flops_fwd]
    return rule


def einsum_rule(equation: str, operands: list[TensorMeta | None], out: TensorMeta) -> LayerRule:
    """Index letters become dimensions: in every operand and the output -> batch; in the output
    -> out_channel (or sequence when only the first operand has it); summed away -> reduction.
    FLOPs contract operands left to right, 2 per multiply-add, as the bmm calls torch lowers to."""
    terms, output = _einsum_terms(equation, operands)
    rule = LayerRule({}, {}, [], [])
    extents: dict[str, int] = {}
    for term, meta in zip(terms, operands):
        for letter, extent in zip(term, meta.shape if meta else ()):
            extents[letter] = max(extents.get(letter, 1), extent)
    for letter, extent in extents.items():
        in_all = all(letter in term for term in terms)
        if letter not in output:
            role = "reduction"
        elif in_all or (output.index(letter) == 0 and letter in terms[0]):
            role = "batch"
        else:
            role = "sequence" if letter in terms[0] else "out_channel"
        rule.add(letter, extent, role)
    rule.operand_maps = [list(term) for term in terms]
    rule.out_map = list(output)
    flops, live = 0, set(terms[0])
    for index, term in enumerate(terms[1:], start=1):
        joined = live | set(term)
        flops += 2 * prod(extents[letter] for letter in joined)
        needed = set(output).union(*terms[index + 1:])
        live = {letter for letter in joined if letter in needed}
    rule.flops_fwd = flops if len(terms) > 1 else 0
    rule.grad_flops = [rule.flops_fwd] * len(terms)
    return rule


def _einsum_terms(equation: str, operands: list[TensorMeta | None]) -> tuple[list[str], str]:
    equation = equation.replace(" ", "")
    inputs, _, output = equation.partition("->")
    terms = inputs.split(",")
    spare = iter("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    ellipsis = "".join(next(spare) for _ in range(max((len(m.shape) - len(t.replace("...", "")))
                                                      for t, m in zip(terms, operands) if m and "..." in t)
                                                  if "..." in equation else 0))
    terms = [t.replace("...", ellipsis[len(ellipsis) - (len(m.shape) - len(t.replace("...", ""))):] if m else "")
             for t, m in zip(terms, operands)]
    if not _:
        counts = {c: sum(t.count(c) for t in terms) for c in "".join(terms)}
        output = ellipsis + "".join(sorted(c for c, n in counts.items() if n == 1 and c not in ellipsis))
    return terms, output.replace("...", ellipsis)


def embedding_rule(operands: list[TensorMeta | None], out: TensorMeta) -> LayerRule:
    """A table lookup: index dims keep their names, the table is (vocab, c_out); no FLOPs."""
    rule = LayerRule({}, {}, [], [])
    index_slot = next(i for i, m in enumerate(operands) if m is not None and not m.dtype.is_floating_point)
    indices = operands[index_slot]
    assert indices is not None  # chosen above among the non-None operands
    lead = [rule.add(name, e, role) for (name, role), e in zip(generic_names(len(indices.shape) + 1)[:-1],
                                                               indices.shape)]
    weight = operands[1 - index_slot] if len(operands) > 1 else None
    vocab = rule.add("vocab", weight.shape[0] if weight else 0, "reduction")
    c_out = rule.add("c_out", out.shape[-1], "out_channel")
    maps: list[DimMap | None] = [None] * len(operands)
    maps[index_slot] = list(lead)
    if weight is not None:
        maps[1 - index_slot] = [vocab, c_out]
    rule.operand_maps = maps
    rule.out_map = [*lead, c_out]
    rule.grad_flops = [0] * len(operands)
    return rule


def attention_rule(operands: list[TensorMeta | None], out: TensorMeta) -> LayerRule:
    q, k, v = operands[0], operands[1], operands[2]
    assert q is not None and k is not None and v is not None
    rule = LayerRule({}, {}, [], [])
    batch = [rule.add(name, e, role) for (name, role), e in zip(_batch_names(len(q.shape) - 2), q.shape[:-2])]
    sq = rule.add("q", q.shape[-2], "sequence")
    skv = rule.add("kv", k.shape[-2], "sequence")
    d = rule.add("d", q.shape[-1], "reduction")
    dv = d if v.shape[-1] == q.shape[-1] else rule.add("dv", v.shape[-1], "out_channel")
    rule.operand_maps = [[*batch, sq, d], [*batch, skv, d], [*batch, skv, dv], *[None] * (len(operands) - 3)]
    rule.out_map = [*batch, sq, dv]
    scores = prod(q.shape[:-1]) * k.shape[-2]
    qk, pv = 2 * scores * q.shape[-1], 2 * scores * v.shape[-1]
    rule.flops_fwd = qk + pv
    # Gradients as autograd computes them through the two batched matmuls (the meta-device path).
    rule.grad_flops = [qk, qk, pv] + [0] * (len(operands) - 3)
    rule.shared_grads = [(pv, (0, 1))]  # d(probabilities) feeds both d(q) and d(k)
    return rule


def norm_rule(kind: str, operands: list[TensorMeta | None], out: TensorMeta) -> LayerRule:
    x = operands[0]
    assert x is not None
    rule = LayerRule({}, {}, [], [])
    if kind == "layer_norm":
        names = generic_names(len(x.shape))
        names = [(nm, "channel" if i == len(x.shape) - 1 else role) for i, (nm, role) in enumerate(names)]
    else:  # group / batch norm: (N, C, *spatial)
        names = [("n", "batch"), ("c", "channel")] + [(s, "spatial") for s in _spatial_names(len(x.shape) - 2)]
    dims: DimMap = [rule.add(name, e, role) for (name, role), e in zip(names, x.shape)]
    channel = dims[-1] if kind == "layer_norm" else dims[1]
    rule.operand_maps = [dims, *([channel] if m is not None and len(m.shape) == 1 else None for m in operands[1:])]
    rule.out_map = list(dims)
    rule.grad_flops = [0] * len(operands)
    return rule


def resample_rule(operands: list[TensorMeta | None], out: TensorMeta) -> LayerRule:
    x = operands[0]
    assert x is not None
    rule = LayerRule({}, {}, [], [])
    names = [("n", "batch"), ("c", "channel")] + [(s, "spatial") for s in _spatial_names(len(out.shape) - 2)]
    dims: DimMap = [rule.add(name, e, role) for (name, role), e in zip(names, out.shape)]
    rule.operand_maps = [dims] + [None] * (len(operands) - 1)
    rule.out_map = list(dims)
    rule.grad_flops = [0] * len(operands)
    return rule


def anchor_rule(kind: str, canonical: str, operands: list[TensorMeta | None], out: TensorMeta,
                attrs: dict) -> LayerRule:
    """The rule for an anchor op of layer ``kind``; unknown shapes fall back to ``generic_rule``."""
    if kind == "conv":
        return conv_rule(operands, out, transposed=bool(attrs.get("transposed")))
    if kind == "linear" and canonical == "addmm":  # addmm(bias, x, w.T)
        a, b = operands[1], operands[2]
        assert a is not None and b is not None
        rule = matmul_rule(a, b, out)
        rule.operand_maps.insert(0, [rule.out_map[-1]])
        rule.grad_flops.insert(0, 0)
        return rule
    if kind == "linear":
        return linear_rule(operands, out)
    if canonical == "einsum" and "equation" in attrs:
        return einsum_rule(attrs["equation"], operands, out)
    if kind == "embedding":
        return embedding_rule(operands, out)
    if kind == "matmul":
        offset = 1 if canonical == "baddbmm" else 0
        a, b = operands[offset], operands[offset + 1]
        assert a is not None and b is not None
        rule = matmul_rule(a, b, out)
        if offset:
            rule.operand_maps.insert(0, None)
            rule.grad_flops.insert(0, 0)
        return rule
    if kind == "attention":
        return attention_rule(operands, out)
    if kind in ("group_norm", "layer_norm", "batch_norm"):
        return norm_rule(kind, operands, out)
    if kind in ("upsample", "downsample"):
        return resample_rule(operands, out)
    return generic_rule(out, operands, flops_fwd=int(attrs.get("flops_fwd", 0)))
