"""CUDA's autocast op lists applied to CPU tensors, so a measurement on a machine without a GPU sees
the dtypes (and so the bytes) a GPU run keeps (:func:`cuda_autocast_policy`)."""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Iterator

import torch

from .live_bytes import _tensor_leaves

__all__ = ["CUDA_AUTOCAST_POLICY", "cuda_autocast_policy"]

# ATen/autocast_mode.h of torch 2.x: the op lists CUDA's autocast kernels are built from.
_LOWER = (
    "_convolution.deprecated", "_convolution", "conv1d", "conv2d", "conv3d", "conv_tbc", "conv_transpose1d",
    "conv_transpose2d.input", "conv_transpose3d.input", "convolution", "prelu", "addmm", "addmv", "addr",
    "matmul", "einsum", "mm", "mv", "linalg_vecdot", "linear", "addbmm", "baddbmm", "bmm", "chain_matmul",
    "linalg_multi_dot", "_thnn_fused_lstm_cell", "_thnn_fused_gru_cell", "lstm_cell", "gru_cell",
    "rnn_tanh_cell", "rnn_relu_cell", "_scaled_dot_product_flash_attention", "scaled_dot_product_attention",
)
_FP32 = (
    "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
    "sinh", "tan", "pow.Tensor_Scalar", "pow.Tensor_Tensor", "pow.Scalar", "softplus", "layer_norm",
    "native_layer_norm", "rms_norm", "group_norm", "frobenius_norm.dim", "nuclear_norm", "nuclear_norm.dim",
    "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss", "nll_loss", "nll_loss2d",
    "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss",
    "margin_ranking_loss", "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss",
    "multi_margin_loss", "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm", "logsumexp",
    "upsample_nearest1d", "_upsample_nearest_exact1d", "upsample_nearest2d", "_upsample_nearest_exact2d",
    "upsample_nearest3d", "_upsample_nearest_exact3d", "upsample_linear1d", "upsample_bilinear2d",
    "_upsample_bilinear2d_aa", "upsample_trilinear3d", "upsample_bicubic2d", "_upsample_bicubic2d_aa",
    "linalg_matrix_sqrth",  # registered apart from the header's lists; taken as fp32, as CPU autocast has it
)
_FP32_SET_OPT_DTYPE = (
    "prod", "prod.dim_int", "softmax.int", "log_softmax.int", "cumprod", "cumsum", "linalg_vector_norm",
    "linalg_matrix_norm", "linalg_matrix_norm.str_ord", "sum", "sum.dim_IntList",
)
_FP32_APPEND_DTYPE = {"norm.Scalar": "norm.ScalarOpt_dtype", "norm.ScalarOpt_dim": "norm.ScalarOpt_dim_dtype"}
_PROMOTE = ("addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "vdot", "grid_sampler", "index_put",
            "tensordot", "scatter_add")
#: CUDA's policies by op; ops with a CPU autocast kernel that are in none of these lists pass through.
CUDA_AUTOCAST_POLICY: dict[str, str] = {
    **{op: "lower" for op in _LOWER}, **{op: "fp32" for op in _FP32},
    **{op: "fp32_set_opt_dtype" for op in _FP32_SET_OPT_DTYPE},
    **{op: "fp32_append_dtype" for op in _FP32_APPEND_DTYPE},
    **{op: "promote" for op in _PROMOTE},
}
_NO_AUTOCAST_CPU = torch._C.DispatchKeySet(torch._C.DispatchKey.AutocastCPU)


def _aten_op(name: str) -> Any:
    base, _, overload = name.partition(".")
    return getattr(getattr(torch.ops.aten, base), overload or "default")


def _eligible(value: Any) -> bool:
    return (isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64
            and value.device.type == "cpu")


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if _eligible(value) and value.dtype != dtype:
        return value.to(dtype)
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


def _with_dtype(op: Any, args: tuple, kwargs: dict, dtype: torch.dtype) -> tuple[tuple, dict]:
    """``args``/``kwargs`` of ``op`` with its optional ``dtype`` argument set to ``dtype`` if unset."""
    for index, argument in enumerate(op._schema.arguments):
        if argument.name != "dtype":
            continue
        if argument.kwarg_only or index >= len(args):
            if kwargs.get("dtype") is None:
                kwargs = {**kwargs, "dtype": dtype}
        elif args[index] is None:
            args = args[:index] + (dtype,) + args[index + 1:]
    return args, kwargs


def _policy_kernel(name: str, policy: str) -> Callable[..., Any]:
    """A CPU autocast kernel for aten op ``name`` that applies CUDA's ``policy`` (autocast_mode.h)."""
    op = _aten_op(name)

    def kernel(*args: Any, **kwargs: Any) -> Any:
        with torch._C._ExcludeDispatchKeyGuard(_NO_AUTOCAST_CPU):
            first = next(_tensor_leaves(args), None)
            if policy == "lower":
                dtype = torch.get_autocast_dtype("cpu")
                return op(*_cast(args, dtype), **_cast(kwargs, dtype))
            if policy == "fp32":
                return op(*_cast(args, torch.float32), **_cast(kwargs, torch.float32))
            if policy == "promote":
                dtype = torch.get_autocast_dtype("cpu")
                for tensor in filter(_eligible, _tensor_leaves((args, kwargs))):
                    dtype = torch.promote_types(dtype, tensor.dtype)
                return op(*_cast(args, dtype), **_cast(kwargs, dtype))
            if not _eligible(first):
                return op(*args, **kwargs)
            if policy == "fp32_set_opt_dtype":
                args, kwargs = _with_dtype(op, args, kwargs, torch.float32)
                return op(*args, **kwargs)
            return _aten_op(_FP32_APPEND_DTYPE[name])(*args, **kwargs, dtype=torch.float32)

    return kernel


def _cpu_lower_precision_ops() -> set[str]:
    """aten ops whose CPU autocast kernel is already CUDA's: lower precision with the weight-cast cache."""
    return {op for op in _LOWER if op in _autocast_ops("AutocastCPU")}


def _autocast_ops(key: str) -> set[str]:
    """aten ops (``name`` or ``name.overload``) with a kernel for dispatch key ``key``."""
    ops = set()
    for qualified in torch._C._dispatch_get_all_op_names():
        if qualified.startswith("aten::") and torch._C._dispatch_has_kernel_for_dispatch_key(qualified, key):
            ops.add(qualified[len("aten::"):])
    return ops


@contextlib.contextmanager
def cuda_autocast_policy() -> Iterator[None]:
    """Within the block, ``torch.autocast("cpu")`` applies CUDA's autocast op lists instead of CPU's.

    Why: a measurement of what a GPU run keeps runs on (fake) CPU tensors, and the two policies
    differ where memory is made: CUDA autocast computes ``layer_norm``, ``softmax``, norms, sums and
    upsampling in fp32 (so a Swin's residual stream is fp32), CPU autocast keeps bf16 there. The ops
    that both run in bf16 keep CPU's C++ kernel, which caches the bf16 copy of each weight as CUDA's
    does; every other CPU autocast kernel is replaced (a pass-through where CUDA has none) and the
    replacement is removed on exit.
    """
    library = torch.library.Library("aten", "IMPL")
    keep = _cpu_lower_precision_ops()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Overriding a previously registered kernel"
            for name, policy in CUDA_AUTOCAST_POLICY.items():
                if name not in keep and _has_op(name):
                    library.impl(name, _policy_kernel(name, policy), "AutocastCPU")
            for name in _autocast_ops("AutocastCPU") - set(CUDA_AUTOCAST_POLICY):
                library.impl(name, torch.library.fallthrough_kernel, "AutocastCPU")
        yield
    finally:
        library._destroy()


def _has_op(name: str) -> bool:
    try:
        _aten_op(name)
    except (AttributeError, RuntimeError):
        return False
    return True
