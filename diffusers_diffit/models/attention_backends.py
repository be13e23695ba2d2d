"""Which attention backends DiffiT can use, and where: the policy behind `set_attention_backend`.

TMSA adds a relative-position bias to the attention logits, so only kernels that take an additive float mask apply.
`DiffiTModelMixin` checks a backend once, when it is set and whenever the model moves (device or dtype); the
processors then dispatch without checking again.
"""

import torch
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry
from diffusers.utils import is_xformers_available


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


def backend_for_call(
    backend: AttentionBackendName | None, hidden_states: torch.Tensor, needs_grad: bool
) -> AttentionBackendName | None:
    """The part of the policy that depends on the call: a processor without a backend of its own follows diffusers'
    process-wide default, which can change at any time (e.g. `attention_backend(...)` blocks), so it is checked
    here; and FlexAttention has no backward pass on the CPU, which depends on grad mode. A backend that was set has
    been checked already (`DiffiTModelMixin`) and costs nothing more."""
    if torch.compiler.is_compiling():
        return backend
    if backend is None:
        return check_attention_backend(None, hidden_states.device, hidden_states.dtype, needs_grad)
    if needs_grad and backend == AttentionBackendName.FLEX:
        return check_attention_backend(backend, hidden_states.device, hidden_states.dtype, needs_grad)
    return backend
