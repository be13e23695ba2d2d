"""Time-dependent multi-head self-attention (TMSA, DiffiT eq. 3-6) and the DiffiT transformer block.

The module owns the parameters (spatial and time projections, the relative-position bias table), the processor owns
the computation, and diffusers' `dispatch_attention_fn` owns the kernel:

    q = x_s W_qs + x_t W_qt,  k = x_s W_ks + x_t W_kt,  v = x_s W_vs + x_t W_vt
    TMSA(x_s, x_t) = softmax(q kᵀ / √d + B) v,  B = relative-position bias of a w×w window

x_t (one vector per sample) is broadcast over the tokens. The attention runs on windows of w×w tokens: the latent
model passes its whole token grid as one window, the image-space U-Net passes [B·num_windows, w², C] with the
windows of a sample stored next to each other, and the time token of each sample is broadcast over its windows.
"""

import contextlib

import torch
from diffusers.models.attention import AttentionModuleMixin, FeedForward
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry, dispatch_attention_fn
from diffusers.utils import is_xformers_available
from torch import nn

from .embeddings import get_relative_position_index


# Kernels that accept an additive float bias. Flash kernels (flash-attn, torch's flash SDPA, sage, NPU, XLA) do not.
BIAS_CAPABLE_BACKENDS = (
    AttentionBackendName.NATIVE,
    AttentionBackendName._NATIVE_MATH,
    AttentionBackendName._NATIVE_EFFICIENT,
    AttentionBackendName._NATIVE_CUDNN,
    AttentionBackendName.FLEX,
    AttentionBackendName.XFORMERS,
)
# Where each of them runs: device types (None = any) and dtypes (None = any float). torch's memory-efficient and
# cuDNN SDPA kernels and xformers exist only on CUDA (on the CPU, SDPA then finds "no viable backend"); cuDNN
# attention takes half precision only; FlexAttention runs on the CPU and CUDA (no backward on the CPU, see below).
BACKEND_DEVICES = {
    AttentionBackendName.NATIVE: None,
    AttentionBackendName._NATIVE_MATH: None,
    AttentionBackendName._NATIVE_EFFICIENT: ("cuda",),
    AttentionBackendName._NATIVE_CUDNN: ("cuda",),
    AttentionBackendName.FLEX: ("cpu", "cuda"),
    AttentionBackendName.XFORMERS: ("cuda",),
}
BACKEND_DTYPES = {AttentionBackendName._NATIVE_CUDNN: (torch.float16, torch.bfloat16)}
_BACKEND_NAMES = {b.value for b in AttentionBackendName}


def backends_for(device: torch.device, dtype: torch.dtype) -> list[str]:
    """The bias-capable backends that run on `device` in `dtype`."""
    return [
        b.value
        for b in BIAS_CAPABLE_BACKENDS
        if BACKEND_DEVICES[b] is None or device.type in BACKEND_DEVICES[b]
        if dtype in BACKEND_DTYPES.get(b, (dtype,))
    ]


def check_attention_backend(
    backend: AttentionBackendName | str | None,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
    needs_grad: bool = False,
) -> AttentionBackendName:
    """Resolve `backend` (None = diffusers' active backend) and raise a `ValueError` unless it can add the position
    bias and runs on `device` in `dtype` (both optional; a meta device is not checked) and, with `needs_grad`,
    has a backward pass there."""
    if backend is None:
        backend, _ = _AttentionBackendRegistry.get_active_backend()
    name = backend.value if isinstance(backend, AttentionBackendName) else str(backend).lower()
    allowed = ", ".join(repr(b.value) for b in BIAS_CAPABLE_BACKENDS)
    if name not in _BACKEND_NAMES:
        raise ValueError(f"`backend` {backend!r} is not an attention backend; DiffiT can use: {allowed}.")
    backend = AttentionBackendName(name)
    if backend not in BIAS_CAPABLE_BACKENDS:
        raise ValueError(
            f"Attention backend {backend.value!r} cannot add DiffiT's relative-position bias (an additive float "
            f"mask). Use one of: {allowed}."
        )
    if device is None or device.type == "meta":
        return backend
    devices, dtypes = BACKEND_DEVICES[backend], BACKEND_DTYPES.get(backend)
    if (devices is not None and device.type not in devices) or (dtype is not None and dtypes and dtype not in dtypes):
        where = "/".join(devices) if devices else "any device"
        kinds = f" in {' or '.join(str(d).removeprefix('torch.') for d in dtypes)}" if dtypes else ""
        usable = ", ".join(repr(b) for b in backends_for(device, dtype or torch.float32))
        raise ValueError(
            f"Attention backend {backend.value!r} runs only on {where}{kinds}, but the model is on device "
            f"{device.type!r} in {str(dtype).removeprefix('torch.')}. Backends that run there: {usable}."
        )
    if backend == AttentionBackendName.XFORMERS and not is_xformers_available():
        raise ValueError("Attention backend 'xformers' needs the `xformers` package, which is not installed.")
    if needs_grad and backend == AttentionBackendName.FLEX and device.type == "cpu":
        raise ValueError(
            "Attention backend 'flex' has no backward pass on the CPU (torch's FlexAttention): run it under "
            "`torch.no_grad()` / `torch.inference_mode()`, or use 'native' to train on the CPU."
        )
    return backend


class DiffiTModelMixin:
    """What both DiffiT models share on top of diffusers' `ModelMixin`:

    - `set_attention_backend` checks the backend at the door, against the model's device and dtype, and every move
      (`.to()`, `.cuda()`, `.half()` …) checks a backend that was set again. A model moved where its backend cannot
      run raises a `ValueError` (the move itself has happened): pick a backend that runs on both devices ('native'
      runs everywhere) before moving it, e.g. for `enable_model_cpu_offload`.
    - `inference_cache()`: a block in which tensors derived from the weights alone (gathered bias, packed CPU
      weights; see `derived_tensor`) are computed once and reused; they are also dropped on every move and every
      `train()` / `eval()`.
    """

    @contextlib.contextmanager
    def inference_cache(self):
        """Eval-mode, no-grad forwards inside this block reuse what depends on the weights alone (the gathered
        position bias; on the CPU in float32 the oneDNN-packed linear weights), which is dropped when the block ends.
        `DiffiTPipeline` runs each call in one. Changes to the weights inside the block are seen when they go through
        autograd's version counter (`load_state_dict`, optimizer steps, in-place ops), not through `.data`: change
        weights between blocks."""
        if self.__dict__.get("_inference_cache"):  # nested: the outer block owns it
            yield self
            return
        modules = list(self.modules())
        for module in modules:
            module.__dict__["_inference_cache"] = True
        try:
            yield self
        finally:
            for module in modules:
                module.__dict__.pop("_inference_cache", None)
            clear_derived_tensors(self)

    def set_attention_backend(self, backend: str) -> None:
        check_attention_backend(backend, self.device, self.dtype)
        super().set_attention_backend(backend)

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        clear_derived_tensors(self)
        for backend in {p._attention_backend for p in self.attn_processors.values()} - {None}:
            check_attention_backend(backend, self.device, self.dtype)
        return module

    def train(self, mode: bool = True):
        clear_derived_tensors(self)
        return super().train(mode)


# ------------------------------------------------------------------------------------- tensors derived from weights
def reuses_weights(module: nn.Module) -> bool:
    """Whether `module` may reuse tensors derived from its weights: inside `inference_cache()`, in eval mode, without
    autograd, not being compiled (a compiled graph computes them itself). Training and any grad-enabled call always
    compute them afresh."""
    if torch.compiler.is_compiling() or torch.is_grad_enabled() or module.training:
        return False
    return module.__dict__.get("_inference_cache", False)


def derived_tensor(owner: nn.Module, name: str, source: torch.Tensor, build) -> torch.Tensor:
    """`build()`, computed once and kept on `owner` while `source` is the same tensor with the same contents
    version, dtype and device (in-place edits such as `load_state_dict` or an optimizer step bump the version;
    edits through `.data` do not). Only used inside `inference_cache()`, which drops every such tensor when it ends,
    as do moves and `train()` / `eval()`."""
    key = (id(source), source.data_ptr(), source._version, source.dtype, source.device)
    cache = owner.__dict__.setdefault("_derived_tensors", {})
    if name not in cache or cache[name][0] != key:
        cache[name] = (key, build())
    return cache[name][1]


def clear_derived_tensors(model: nn.Module):
    for module in model.modules():
        module.__dict__.pop("_derived_tensors", None)


def linear(layer: nn.Module, x: torch.Tensor, reuse: bool, gelu: bool = False) -> torch.Tensor:
    """`layer(x)`, then tanh-GELU if `gelu`. In CPU float32 inference (`reuse`) a plain `nn.Linear` without hooks
    runs through oneDNN with its weight packed once for the kernel (kept until the weight changes) and the GELU
    fused into the GEMM: the same arithmetic, but the packed weight is not re-laid-out on every call and oneDNN's
    kernels beat the default CPU GEMM (see benchmarks/bench_transformer.py, "GEMM floor" rows)."""
    if reuse and _packable(layer, x):
        packed = derived_tensor(layer, "onednn_weight", layer.weight, lambda: _reorder_linear_weight(layer.weight))
        if gelu:
            return torch.ops.mkldnn._linear_pointwise(x, packed, layer.bias, "gelu", [], "tanh")
        return torch.ops.mkldnn._linear_pointwise(x, packed, layer.bias, "none", [], "")
    x = layer(x)
    return nn.functional.gelu(x, approximate="tanh") if gelu else x


def _reorder_linear_weight(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach())


def _packable(layer: nn.Module, x: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and type(layer) is nn.Linear  # not a LoRA / quantized / offloaded wrapper
        and layer.weight.dtype == torch.float32
        and not (layer._forward_hooks or layer._forward_pre_hooks or hasattr(layer, "_hf_hook"))
        and torch.backends.mkldnn.enabled
        and torch.backends.mkldnn.is_available()
    )


class DiffiTAttnProcessor:
    """TMSA through `dispatch_attention_fn`, for fused and unfused projections and every bias-capable backend.

    The bias is gathered as [1, heads, N, N] in the query dtype and broadcast over the batch; in eval-mode inference
    it is gathered once and reused until the bias table changes.
    """

    _attention_backend = None
    _parallel_config = None

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
        backend = self._attention_backend
        if not torch.compiler.is_compiling():
            needs_grad = torch.is_grad_enabled() and (hidden_states.requires_grad or attn.to_out.weight.requires_grad)
            backend = check_attention_backend(backend, hidden_states.device, hidden_states.dtype, needs_grad)
        reuse = reuses_weights(attn)

        def project(spatial: nn.Linear, time: nn.Linear) -> torch.Tensor:  # x_s·W_s + x_t·W_t: [B·nW, N, C']
            x = linear(spatial, hidden_states, reuse).unflatten(0, (-1, num_windows))  # [B, nW, N, C']
            return (x + time(temb)[:, None, None]).flatten(0, 1)  # x_t broadcast over windows and tokens

        if attn.fused_projections:
            query, key, value = project(attn.to_qkv, attn.to_qkv_time).chunk(3, dim=-1)
        else:
            query = project(attn.to_q, attn.to_q_time)
            key = project(attn.to_k, attn.to_k_time)
            value = project(attn.to_v, attn.to_v_time)

        # [B·nW, N, H, D] each
        query, key, value = (x.unflatten(-1, (attn.heads, attn.head_dim)) for x in (query, key, value))
        bias = attn.relative_position_bias(query.dtype, reuse)  # [1, H, N, N]
        hidden_states = dispatch_attention_fn(
            query, key, value, attn_mask=bias, backend=backend, parallel_config=self._parallel_config
        )
        return linear(attn.to_out, hidden_states.flatten(2).to(query.dtype), reuse)  # [B·nW, N, C]


class DiffiTAttention(nn.Module, AttentionModuleMixin):
    """TMSA parameters: spatial q/k/v, time q/k/v (all with bias), output projection, relative-position bias table.

    `fuse_projections()` fuses the spatial projections into `to_qkv` and the time projections into `to_qkv_time`.
    """

    _default_processor_cls = DiffiTAttnProcessor
    _available_processors = [DiffiTAttnProcessor]

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        window_size: int,
        time_embed_dim: int | None = None,
        processor: DiffiTAttnProcessor | None = None,
    ):
        super().__init__()
        self.heads = heads
        self.head_dim = head_dim
        self.window_size = window_size
        self.use_bias = True
        inner_dim = heads * head_dim
        time_embed_dim = time_embed_dim or dim

        self.to_q = nn.Linear(dim, inner_dim)
        self.to_k = nn.Linear(dim, inner_dim)
        self.to_v = nn.Linear(dim, inner_dim)
        self.to_q_time = nn.Linear(time_embed_dim, inner_dim)
        self.to_k_time = nn.Linear(time_embed_dim, inner_dim)
        self.to_v_time = nn.Linear(time_embed_dim, inner_dim)
        self.to_out = nn.Linear(inner_dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", get_relative_position_index(window_size), persistent=False)

        self.set_processor(processor or self._default_processor_cls())

    def relative_position_bias(self, dtype: torch.dtype | None = None, reuse: bool = False) -> torch.Tensor:
        """The bias B of eq. 6 -> [1, heads, N, N] in `dtype` (default: the table's); `reuse` keeps it until the
        table changes (see `derived_tensor`)."""
        table = self.relative_position_bias_table
        dtype = dtype or table.dtype
        if reuse:
            return derived_tensor(self, f"bias_{dtype}", table, lambda: self._gather_bias(dtype))
        return self._gather_bias(dtype)

    def _gather_bias(self, dtype: torch.dtype) -> torch.Tensor:
        n = self.window_size**2
        # gathering along the table's transpose lands directly in the contiguous [H, N·N] layout the kernels want
        # (a gather to [N·N, H] followed by a permute costs several times more, and a strided mask slows SDPA)
        bias = self.relative_position_bias_table.t().index_select(1, self.relative_position_index.view(-1))
        return bias.view(1, self.heads, n, n).to(dtype)

    @torch.no_grad()
    def fuse_projections(self):
        if self.fused_projections:
            return
        for suffix in ("", "_time"):
            parts = [getattr(self, f"to_{name}{suffix}") for name in "qkv"]
            fused = nn.Linear(parts[0].in_features, 3 * parts[0].out_features)
            fused.to(device=parts[0].weight.device, dtype=parts[0].weight.dtype)
            fused.weight.copy_(torch.cat([p.weight for p in parts]))
            fused.bias.copy_(torch.cat([p.bias for p in parts]))
            setattr(self, f"to_qkv{suffix}", fused)
        self.fused_projections = True

    @torch.no_grad()
    def unfuse_projections(self):
        if not self.fused_projections:
            return
        del self.to_qkv, self.to_qkv_time
        self.fused_projections = False

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor, num_windows: int = 1) -> torch.Tensor:
        return self.processor(self, hidden_states, temb, num_windows=num_windows)


class DiffiTTransformerBlock(nn.Module):
    """x = x + TMSA(LN(x), c); x = x + MLP(LN(x)). LayerNorms without affine, eps 1e-6; tanh-GELU MLP."""

    def __init__(
        self,
        dim: int,
        num_attention_heads: int,
        attention_head_dim: int,
        window_size: int,
        time_embed_dim: int | None = None,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = DiffiTAttention(dim, num_attention_heads, attention_head_dim, window_size, time_embed_dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ff = FeedForward(dim, inner_dim=int(dim * mlp_ratio), activation_fn="gelu-approximate")

    def forward(self, hidden_states: torch.Tensor, temb: torch.Tensor, num_windows: int = 1) -> torch.Tensor:
        # hidden_states: [B·nW, N, C], the nW = num_windows windows of each sample adjacent; temb: [B, C_t]
        hidden_states = hidden_states + self.attn(self.norm1(hidden_states), temb, num_windows)
        return hidden_states + self.feed_forward(self.norm2(hidden_states))

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """`self.ff(x)` (Linear → tanh-GELU → Linear; its dropout is 0), with the GELU fused into the first GEMM in
        CPU float32 inference (see `linear`)."""
        reuse = reuses_weights(self)
        if not reuse:
            return self.ff(x)
        hidden = linear(self.ff.net[0].proj, x, reuse, gelu=True)  # [..., C·mlp_ratio]
        return linear(self.ff.net[2], hidden, reuse)
