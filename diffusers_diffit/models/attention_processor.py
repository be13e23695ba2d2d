"""The two TMSA processors: `DiffiTAttnProcessor` (plain: every call computes everything from the weights) and
`DiffiTInferenceAttnProcessor` (eval-mode inference: reuses what depends on the weights alone, and on the CPU in
float32 runs the linear layers through oneDNN with their weights packed once). `DiffiTModelMixin.inference_cache()`
selects the second for the length of a block; both dispatch the attention itself through diffusers'
`dispatch_attention_fn`, so every bias-capable backend works with either.
"""

from typing import TYPE_CHECKING

import torch
from diffusers.models.attention import FeedForward
from diffusers.models.attention_dispatch import dispatch_attention_fn
from torch import nn

from .attention_backends import backend_for_call


if TYPE_CHECKING:
    from .attention import DiffiTAttention


class DiffiTAttnProcessor:
    """TMSA through `dispatch_attention_fn`, for fused and unfused projections and every bias-capable backend:

        q = x_s W_qs + x_t W_qt,  k = x_s W_ks + x_t W_kt,  v = x_s W_vs + x_t W_vt
        TMSA(x_s, x_t) = softmax(q kᵀ / √d + B) v

    with the bias B gathered as [1, heads, N, N] in the query dtype and broadcast over the batch. The processor also
    runs its block's MLP (`feed_forward`), so that an alternative processor can change the kernels of both.
    """

    _attention_backend = None
    _parallel_config = None

    @classmethod
    def like(cls, processor: "DiffiTAttnProcessor") -> "DiffiTAttnProcessor":
        """A processor of this class with `processor`'s attention backend and parallel config."""
        new = cls()
        new._attention_backend, new._parallel_config = processor._attention_backend, processor._parallel_config
        return new

    def __call__(
        self, attn: "DiffiTAttention", hidden_states: torch.Tensor, temb: torch.Tensor, num_windows: int = 1
    ) -> torch.Tensor:
        # hidden_states: [B·nW, N, C], the nW = num_windows windows of each sample adjacent; temb: [B, C_t]
        batch, num_tokens, _ = hidden_states.shape
        if num_tokens != attn.window_size**2:
            raise ValueError(
                f"TMSA was built for windows of {attn.window_size}x{attn.window_size} = {attn.window_size**2} tokens, "
                f"got {num_tokens} tokens."
            )
        if batch != temb.shape[0] * num_windows:
            raise ValueError(
                f"`hidden_states` holds {batch} windows, but `temb` has {temb.shape[0]} samples of "
                f"num_windows={num_windows} windows each."
            )
        needs_grad = torch.is_grad_enabled() and (hidden_states.requires_grad or attn.to_out.weight.requires_grad)
        backend = backend_for_call(self._attention_backend, hidden_states, needs_grad)

        def project(spatial: nn.Linear, time: nn.Linear) -> torch.Tensor:  # x_s·W_s + x_t·W_t: [B·nW, N, C']
            x = self.linear(spatial, hidden_states).unflatten(0, (-1, num_windows))  # [B, nW, N, C']
            return (x + time(temb)[:, None, None]).flatten(0, 1)  # x_t broadcast over windows and tokens

        if attn.fused_projections:
            query, key, value = project(attn.to_qkv, attn.to_qkv_time).chunk(3, dim=-1)
        else:
            query = project(attn.to_q, attn.to_q_time)
            key = project(attn.to_k, attn.to_k_time)
            value = project(attn.to_v, attn.to_v_time)

        # [B·nW, N, H, D] each
        query, key, value = (x.unflatten(-1, (attn.heads, attn.head_dim)) for x in (query, key, value))
        bias = self.position_bias(attn, query.dtype)  # [1, H, N, N]
        hidden_states = dispatch_attention_fn(
            query, key, value, attn_mask=bias, backend=backend, parallel_config=self._parallel_config
        )
        return self.linear(attn.to_out, hidden_states.flatten(2).to(query.dtype))  # [B·nW, N, C]

    def linear(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return layer(x)

    def position_bias(self, attn: "DiffiTAttention", dtype: torch.dtype) -> torch.Tensor:
        return attn.relative_position_bias(dtype)  # [1, H, N, N]

    def feed_forward(self, ff: FeedForward, x: torch.Tensor) -> torch.Tensor:
        return ff(x)


class DiffiTInferenceAttnProcessor(DiffiTAttnProcessor):
    """`DiffiTAttnProcessor` for eval-mode inference without autograd, with the same arithmetic and faster kernels:

    - the gathered position bias is kept until the bias table changes (`derived_tensor`);
    - on the CPU in float32, every plain `nn.Linear` of the block (projections, output, MLP) runs through oneDNN
      with its weight packed once for the kernel, and the MLP's tanh-GELU fused into its first GEMM: oneDNN's
      kernels beat the default CPU GEMM and the weight is not re-laid-out on every call (see
      benchmarks/bench_transformer.py, "GEMM floor" rows).

    In training mode, with autograd, or while being compiled (a compiled graph computes all of it itself) it computes
    everything afresh, as `DiffiTAttnProcessor` does. `DiffiTModelMixin.inference_cache()` selects it for the length
    of a block and drops what it kept when the block ends; moves and `train()` / `eval()` drop it too.
    """

    def linear(self, layer: nn.Module, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
        """`layer(x)`, then tanh-GELU if `gelu`; through oneDNN with a packed weight where `_packable`."""
        if reuses_weights(layer) and _packable(layer, x):
            packed = derived_tensor(layer, "onednn_weight", layer.weight, lambda: _reorder_linear_weight(layer.weight))
            if gelu:
                return torch.ops.mkldnn._linear_pointwise(x, packed, layer.bias, "gelu", [], "tanh")
            return torch.ops.mkldnn._linear_pointwise(x, packed, layer.bias, "none", [], "")
        x = layer(x)
        return nn.functional.gelu(x, approximate="tanh") if gelu else x

    def position_bias(self, attn: "DiffiTAttention", dtype: torch.dtype) -> torch.Tensor:
        if not reuses_weights(attn):
            return attn.relative_position_bias(dtype)
        table = attn.relative_position_bias_table
        return derived_tensor(attn, f"bias_{dtype}", table, lambda: attn.relative_position_bias(dtype))

    def feed_forward(self, ff: FeedForward, x: torch.Tensor) -> torch.Tensor:
        """`ff(x)` (Linear → tanh-GELU → Linear; its dropout is 0) with the GELU fused into the first GEMM."""
        if not reuses_weights(ff):
            return ff(x)
        hidden = self.linear(ff.net[0].proj, x, gelu=True)  # [..., C·mlp_ratio]
        return self.linear(ff.net[2], hidden)


def reuses_weights(module: nn.Module) -> bool:
    """Whether `module` may reuse tensors derived from its weights: in eval mode, without autograd, not being
    compiled. Training and any grad-enabled call always compute them afresh."""
    return not (torch.compiler.is_compiling() or torch.is_grad_enabled() or module.training)


def derived_tensor(owner: nn.Module, name: str, source: torch.Tensor, build) -> torch.Tensor:
    """`build()`, computed once and kept on `owner` while `source` is the same tensor with the same contents
    version, dtype and device (in-place edits such as `load_state_dict` or an optimizer step bump the version;
    edits through `.data` do not, hence `inference_cache()` drops every such tensor when it ends, as do moves and
    `train()` / `eval()`)."""
    key = (id(source), source.data_ptr(), source._version, source.dtype, source.device)
    cache = owner.__dict__.setdefault("_derived_tensors", {})
    if name not in cache or cache[name][0] != key:
        cache[name] = (key, build())
    return cache[name][1]


def clear_derived_tensors(model: nn.Module):
    for module in model.modules():
        module.__dict__.pop("_derived_tensors", None)


def _reorder_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach())


def _packable(layer: nn.Module, x: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and type(layer) is nn.Linear  # not a LoRA / quantized / offloaded wrapper
        and type(layer.weight) is nn.Parameter  # not a torchao / quanto tensor subclass reporting float32
        and layer.weight.dtype == torch.float32
        and not (layer._forward_hooks or layer._forward_pre_hooks or hasattr(layer, "_hf_hook"))
        and torch.backends.mkldnn.enabled
        and torch.backends.mkldnn.is_available()
    )
