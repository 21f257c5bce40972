"""Which ops start a layer, which fuse into one, and which only re-view a tensor.

The capture front-ends (torch.export's ATen graph, meta_trace's copy of it, symbolic_trace's
torch-level graph) name ops canonically: an ATen overload packet's name (``conv2d``, ``linear``, ``add``) or
the Python function / method / module it came from, mapped onto the same names. This
module owns that vocabulary and nothing else.
"""
from __future__ import annotations

# Canonical op name -> layer kind. These ops start a new layer.
ANCHOR_KINDS: dict[str, str] = {
    **dict.fromkeys(("conv1d", "conv2d", "conv3d", "convolution", "conv_transpose1d", "conv_transpose2d",
                     "conv_transpose3d", "_convolution"), "conv"),
    **dict.fromkeys(("linear", "addmm"), "linear"),
    **dict.fromkeys(("matmul", "bmm", "mm", "baddbmm", "einsum"), "matmul"),
    **dict.fromkeys(("scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
                     "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu",
                     "_scaled_dot_product_cudnn_attention", "multi_head_attention_forward"), "attention"),
    **dict.fromkeys(("group_norm", "native_group_norm"), "group_norm"),
    **dict.fromkeys(("layer_norm", "native_layer_norm", "rms_norm"), "layer_norm"),
    **dict.fromkeys(("batch_norm", "native_batch_norm", "_native_batch_norm_legit_no_training",
                     "_native_batch_norm_legit_functional", "instance_norm"), "batch_norm"),
    **dict.fromkeys(("upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "_upsample_nearest_exact2d",
                     "upsample_bilinear2d", "upsample_bicubic2d", "interpolate", "_upsample_bilinear2d_aa"),
                    "upsample"),
    **dict.fromkeys(("avg_pool2d", "max_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d",
                     "max_pool2d_with_indices", "avg_pool1d", "max_pool1d"), "downsample"),
    "embedding": "embedding",
}

# Ops that only re-view a tensor: folded into the edges between layers.
VIEW_OPS = frozenset({
    "view", "reshape", "_unsafe_view", "flatten", "unflatten", "permute", "transpose", "t", "swapaxes",
    "unsqueeze", "squeeze", "expand", "expand_as", "broadcast_to", "slice", "select", "narrow", "getitem",
    "chunk", "split", "split_with_sizes", "unbind", "tensor_split", "as_strided", "movedim", "view_as",
    "reshape_as", "contiguous", "clone", "alias", "detach", "to", "_to_copy", "type_as", "float", "half",
    "bfloat16", "double", "type", "lift_fresh_copy", "dropout_eval", "identity", "mT", "mH", "T", "H", "adjoint",
    "real", "constant_pad_nd_view",
})
# Views whose axis map cannot be read off the shapes alone: they carry a permutation.
PERMUTING_VIEWS = frozenset({"permute", "transpose", "t", "swapaxes", "movedim", "mT", "mH", "T", "H", "adjoint"})

# Ops that create tensors from nothing but constants: not layers, and they carry no data edge.
SOURCE_OPS = frozenset({
    "arange", "ones", "zeros", "full", "empty", "scalar_tensor", "tensor", "randn", "rand", "randint",
    "zeros_like", "ones_like", "full_like", "empty_like", "linspace", "_tensor_constant",
})

# Ops without a tensor result (shape asserts, size queries): dropped.
IGNORED_OPS = frozenset({
    "_assert_tensor_metadata", "_assert_async", "_assert_scalar", "sym_size", "sym_numel", "sym_stride",
    "size", "dim", "numel", "getattr", "sym_constrain_range_for_size", "_set_grad_enabled",
})

CONCAT_OPS = frozenset({"cat", "concat", "concatenate", "stack"})


def layer_kind(canonical: str) -> str | None:
    """The layer kind an op anchors, or None when it is elementwise/view/source."""
    return ANCHOR_KINDS.get(canonical)
