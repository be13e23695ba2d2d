"""GPU speed suite for DiffiT-XL/2: one table, one run (≤ 8 min on one H100/H200 with the default budget).

Rows, at 256 and 512 px, bf16 and fp16, and image batch 1 / 8 / 32 / 128 (the model runs at twice the batch:
classifier-free guidance):
  - this package's model, fused QKV: eager (native SDPA), `torch.compile` (inductor), `torch.compile` with CUDA
    graphs (mode="reduce-overhead"), and each bias-capable backend (SDPA memory-efficient, cuDNN, compiled
    FlexAttention, xformers if importable);
  - the naive official-layout reference (benchmarks/reference_diffit.py) in fp32 (no TF32) and under bf16 autocast: the
    stand-in for NVIDIA's script;
  - diffusers' DiTTransformer2DModel at DiT-XL/2 size, in the same dtype.
For each: forward latency at the model batch, and images/s of the official sampling recipe
(docs/diffit-equations.md#sampling: per step one forward at 2·batch, guidance of 3 ε channels with the power-cosine /
constant weight, a DDPM learned-range ancestral step), timed over a window of steps after warm-up and scaled to 250
steps, plus peak memory. Then the SD-VAE decode of a batch (its share of the sampling time), a latent training step
at batch 32 with and without gradient checkpointing (bf16 autocast, AdamW), and the GPU-hours a 50k-image
official-recipe run takes at the best setting.
Weights are random (speed does not depend on them); nothing is downloaded.

    python -m benchmarks.gpu_suite                      # the full table on CUDA
    python -m benchmarks.gpu_suite --tiny --device cpu  # every code path on a tiny config, quickly
"""

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DiTTransformer2DModel

from benchmarks.reference_diffit import ReferenceDiffiT
from diffusers_diffit import DIFFIT_CONFIGS, DiffiTTransformer2DModel, model_config
from diffusers_diffit.guidance import apply_guidance, guidance_weight
from diffusers_diffit.pipelines import OFFICIAL_RECIPES, official_scheduler


STEPS = 250  # the official recipe
IMAGES = 50_000  # an FID run
# stabilityai/sd-vae-ft-ema's architecture (random weights: speed only)
SD_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    sample_size=256,
)
TINY_VAE = dict(SD_VAE, block_out_channels=(8, 8, 8, 8), norm_num_groups=4, layers_per_block=1)
# --tiny: the tests' tiny transformer at the reference's width (2 heads of 16) with ImageNet's classes
TINY = dict(model_config("tiny-transformer")[1], attention_head_dim=16, num_classes=1000)


class Suite:
    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.start = time.perf_counter()
        self.rows = []

    # ----------------------------------------------------------------------------------------------- utilities
    def over_budget(self) -> bool:
        return time.perf_counter() - self.start > self.args.budget_s

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def reset_peak(self):
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated() / 2**30 if self.device.type == "cuda" else None

    def timed(self, fn, repeats: int) -> float:
        """Median seconds of `fn()` over `repeats` calls (after the caller's warm-up)."""
        times = []
        for _ in range(repeats):
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def compile(self, module, mode: str | None = None):
        if self.args.tiny and self.device.type != "cuda":  # the smoke test: dynamo + AOT autograd, no C++ compiler
            return torch.compile(module, fullgraph=True, dynamic=True, backend="aot_eager")
        return torch.compile(module, fullgraph=True, dynamic=True, mode=mode)

    def add(self, **row):
        self.rows.append(row)
        cells = " | ".join(_fmt(row.get(k), k) for k in COLUMNS)
        print(f"| {cells} |", flush=True)

    # ------------------------------------------------------------------------------------------------- models
    def models(self, resolution: int, dtype: torch.dtype):
        side = resolution // 8
        config = dict(TINY, sample_size=side) if self.args.tiny else DIFFIT_CONFIGS[f"DiffiT-XL/2-{resolution}"]
        ours = DiffiTTransformer2DModel(**config).to(self.device, dtype).eval()
        ours.fuse_qkv_projections()
        reference_size = dict(hidden_size=32, depth=2, num_heads=2) if self.args.tiny else {}
        reference = ReferenceDiffiT(input_size=side, **reference_size).to(self.device).eval()  # fp32
        dit_size = dict(num_layers=2, num_attention_heads=2, attention_head_dim=16) if self.args.tiny else {}
        dit = DiTTransformer2DModel(sample_size=side, out_channels=8, num_embeds_ada_norm=1000, **dit_size)
        return ours, reference, dit.to(self.device, dtype).eval()

    def variants(self, ours, reference, dit, dtype):
        """name -> (forward(x, t, y) -> [B, 8, s, s], setup) for every row of one resolution and dtype."""
        backends = ["_native_efficient", "_native_cudnn"] if self.device.type == "cuda" else []
        try:
            import xformers  # noqa: F401

            if self.device.type == "cuda":
                backends.append("xformers")
        except ImportError:
            pass

        def with_backend(backend, model=ours):
            def setup():
                for processor in model.attn_processors.values():
                    processor._attention_backend = backend

            return setup

        # each compiled variant gets its own copy, its backend set once, so no variant's guards see another's
        copies = [copy.deepcopy(ours) for _ in range(3)]
        for model, backend in zip(copies, ("native", "native", "flex")):
            with_backend(backend, model)()
        compiled, graphs = self.compile(copies[0]), self.compile(copies[1], "reduce-overhead")
        flex = self.compile(copies[2])

        def reference_fp32(x, t, y):
            saved = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = False
            try:
                return reference(x.float(), t, y).to(dtype)
            finally:
                torch.backends.cuda.matmul.allow_tf32 = saved

        def reference_autocast(x, t, y):
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                return reference(x.float(), t, y).to(dtype)

        rows = {
            "DiffiT fused, eager (native)": (lambda x, t, y: ours(x, t, y).sample, with_backend("native")),
            "DiffiT fused, compile": (lambda x, t, y: compiled(x, t, y).sample, lambda: None),
            "DiffiT fused, compile + CUDA graphs": (lambda x, t, y: graphs(x, t, y).sample, lambda: None),
        }
        for backend in backends:
            rows[f"DiffiT fused, {backend}"] = (lambda x, t, y: ours(x, t, y).sample, with_backend(backend))
        rows["DiffiT fused, flex (compiled)"] = (lambda x, t, y: flex(x, t, y).sample, lambda: None)
        rows["reference (naive), fp32"] = (reference_fp32, lambda: None)
        rows["reference (naive), bf16 autocast"] = (reference_autocast, lambda: None)
        rows["diffusers DiT-XL/2"] = (lambda x, t, y: dit(x, t, class_labels=y).sample, with_backend(None))
        return rows

    # ------------------------------------------------------------------------------------------------ sampling
    def sampling_window(self, forward, resolution: int, batch: int, dtype: torch.dtype) -> tuple[float, float]:
        """(forward seconds at 2·batch, seconds per sampling step) of the official recipe, over a timed window."""
        side = resolution // 8
        recipe = OFFICIAL_RECIPES[resolution]
        scheduler = official_scheduler()
        scheduler.set_timesteps(STEPS, device=self.device)
        generator = torch.Generator(self.device).manual_seed(0)
        latents = torch.randn(batch, 4, side, side, device=self.device, dtype=dtype, generator=generator)
        labels = torch.randint(0, 1000, (batch,), device=self.device, generator=generator)
        labels = torch.cat([labels, torch.full_like(labels, 1000)])
        timesteps = scheduler.timesteps

        def step(i):
            nonlocal latents
            t = timesteps[i]
            output = forward(torch.cat([latents, latents]), t.expand(2 * batch), labels)
            weight = guidance_weight(
                float(t),
                recipe["guidance_scale"],
                recipe["guidance_schedule"],
                recipe.get("guidance_power", 1.0),
                1000,
            )
            output = apply_guidance(*output.float().chunk(2), weight, recipe["guided_channels"])
            latents = scheduler.step(output, t, latents.float(), generator=generator).prev_sample.to(dtype)

        x = torch.cat([latents, latents])
        fwd = self.timed(lambda: forward(x, timesteps[0].expand(2 * batch), labels), self.args.repeats)
        warm, window = self.args.warmup, self.args.window
        for i in range(warm):
            step(i)
        self.sync()
        start = time.perf_counter()
        for i in range(warm, warm + window):
            step(i)
        self.sync()
        return fwd, (time.perf_counter() - start) / window

    def vae_decode(self, resolution: int, batch: int, dtype) -> float:
        vae = AutoencoderKL(**(TINY_VAE if self.args.tiny else SD_VAE)).to(self.device, dtype).eval()
        z = torch.randn(batch, 4, resolution // 8, resolution // 8, device=self.device, dtype=dtype)
        with torch.no_grad():
            vae.decode(z / 0.18215)
            return self.timed(lambda: vae.decode(z / 0.18215), 2)

    def sampling_table(self):
        for resolution in self.args.resolutions:
            for dtype in self.args.dtypes:
                ours, reference, dit = self.models(resolution, dtype)
                rows = self.variants(ours, reference, dit, dtype)
                for batch in self.args.batches:
                    decode = None
                    for name, (forward, setup) in rows.items():
                        label = REFERENCE_DTYPES.get(name, _dtype_name(dtype))
                        if name in REFERENCE_DTYPES and dtype != self.args.dtypes[0]:
                            continue  # the references do not depend on the dtype of the table: one row each
                        row = dict(resolution=resolution, dtype=label, batch=batch, variant=name)
                        if self.over_budget():
                            self.add(**row, note="skipped: time budget")
                            continue
                        setup()
                        self.reset_peak()
                        try:  # inference_cache: what DiffiTPipeline does for each call
                            with torch.no_grad(), ours.inference_cache():
                                fwd, per_step = self.sampling_window(forward, resolution, batch, dtype)
                        except torch.OutOfMemoryError:
                            self.add(**row, note="out of memory")
                            continue
                        except Exception as error:  # a backend that cannot run here: say why, keep going
                            self.add(**row, note=f"failed: {type(error).__name__}: {str(error).splitlines()[0][:80]}")
                            continue
                        if decode is None:
                            decode = self.vae_decode(resolution, batch, dtype)
                        seconds = STEPS * per_step + decode
                        self.add(
                            **row,
                            forward_ms=fwd * 1e3,
                            step_ms=per_step * 1e3,
                            images_s=batch / seconds,
                            decode_share=decode / seconds,
                            peak_gib=self.peak_gib(),
                            gpu_hours=IMAGES / (batch / seconds) / 3600,
                        )
                del ours, reference, dit, rows
                torch._dynamo.reset()

    # ------------------------------------------------------------------------------------------------ training
    def training_table(self):
        """Two rows, always run (the time budget covers the sampling table; these take seconds on a GPU)."""
        resolution = self.args.resolutions[0]
        batch = 4 if self.args.tiny else 32
        side = resolution // 8
        config = dict(TINY, sample_size=side) if self.args.tiny else DIFFIT_CONFIGS[f"DiffiT-XL/2-{resolution}"]
        model = DiffiTTransformer2DModel(**config).to(self.device).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randn(batch, 4, side, side, device=self.device)
        t = torch.randint(0, 1000, (batch,), device=self.device)
        y = torch.randint(0, 1000, (batch,), device=self.device)

        def train_step():
            with torch.autocast(self.device.type, dtype=torch.bfloat16):
                loss = F.mse_loss(model(x, t, y).sample[:, :4].float(), x)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for checkpointing in (False, True):
            row = dict(
                resolution=resolution,
                dtype="bf16 autocast",
                batch=batch,
                variant=f"training step, AdamW{', gradient checkpointing' if checkpointing else ''}",
            )
            model.enable_gradient_checkpointing() if checkpointing else model.disable_gradient_checkpointing()
            self.reset_peak()
            try:
                train_step()
                self.add(**row, step_ms=self.timed(train_step, self.args.repeats) * 1e3, peak_gib=self.peak_gib())
            except torch.OutOfMemoryError:
                self.add(**row, note="out of memory")

    def summary(self):
        done = [r for r in self.rows if "images_s" in r and r["variant"].startswith("DiffiT")]
        references = [r for r in self.rows if "images_s" in r and r["variant"] == "reference (naive), fp32"]
        print(f"\nwall time {time.perf_counter() - self.start:.0f} s")
        for resolution in self.args.resolutions:
            rows = [r for r in done if r["resolution"] == resolution]
            if not rows:
                continue
            best = max(rows, key=lambda r: r["images_s"])
            print(
                f"{resolution} px best: {best['variant']}, {best['dtype']}, batch {best['batch']}: "
                f"{best['images_s']:.2f} images/s, {best['gpu_hours']:.1f} GPU-hours for {IMAGES:,} images "
                f"(NVIDIA's run: 128 GPUs x ~30 min = ~64 GPU-hours)"
            )
            at32 = {r["variant"]: r for r in rows if r["batch"] == 32 and r["dtype"] == "bf16"}
            eager = at32.get("DiffiT fused, eager (native)")
            fp32 = next((r for r in references if (r["resolution"], r["batch"]) == (resolution, 32)), None)
            fastest = max(at32.values(), key=lambda r: r["images_s"]) if at32 else None
            compiled = [at32[k] for k in ("DiffiT fused, compile", "DiffiT fused, compile + CUDA graphs") if k in at32]
            if fp32 and fastest:
                print(
                    f"  batch 32 bf16: best DiffiT / fp32 reference = {fastest['images_s'] / fp32['images_s']:.2f}x "
                    f"(target >= 3x)"
                )
            if eager and compiled:
                best_compiled = max(compiled, key=lambda r: r["images_s"])
                print(
                    f"  batch 32 bf16: best compile / eager = {best_compiled['images_s'] / eager['images_s']:.2f}x "
                    f"(target >= 1.3x)"
                )


REFERENCE_DTYPES = {"reference (naive), fp32": "fp32", "reference (naive), bf16 autocast": "bf16 autocast"}
COLUMNS = [
    "resolution",
    "dtype",
    "batch",
    "variant",
    "forward_ms",
    "step_ms",
    "images_s",
    "decode_share",
    "peak_gib",
    "gpu_hours",
    "note",
]
HEADER = [
    "px",
    "dtype",
    "batch",
    "variant",
    "forward at 2·batch (ms)",
    "sampling step (ms)",
    "images/s (250 steps)",
    "VAE decode share",
    "peak memory (GiB)",
    "GPU-hours / 50k images",
    "note",
]


def _fmt(value, key: str = "") -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if key == "decode_share":
            return f"{value:.1%}"
        return f"{value:.3g}" if value < 1000 else f"{value:.0f}"
    return str(value)


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and VAE: every code path, quickly")
    parser.add_argument("--resolutions", type=int, nargs="+", default=[256, 512], choices=[256, 512])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"], choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128])
    parser.add_argument("--repeats", type=int, default=3, help="timed forwards per row (median)")
    parser.add_argument("--warmup", type=int, default=2, help="sampling steps before the timed window")
    parser.add_argument("--window", type=int, default=3, help="timed sampling steps, scaled to 250")
    parser.add_argument("--budget-s", type=float, default=420.0, help="rows after this many seconds are skipped")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available (use --tiny --device cpu for the smoke test)")
    if any(b < 1 for b in args.batches):
        parser.error(f"--batches must be >= 1, got {args.batches}")
    if args.window < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--window and --repeats must be >= 1 and --warmup >= 0")
    args.dtypes = [{"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[d] for d in args.dtypes]

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    suite = Suite(args)
    name = torch.cuda.get_device_name() if suite.device.type == "cuda" else "cpu"
    print(
        f"torch {torch.__version__}, {name}, {'tiny config' if args.tiny else 'DiffiT-XL/2'}, "
        f"window {args.window} steps after {args.warmup} (scaled to {STEPS}), budget {args.budget_s:.0f} s\n"
    )
    print("| " + " | ".join(HEADER) + " |")
    print("|" + "---|" * 3 + "---|" + "---:|" * 6 + "---|")
    suite.sampling_table()
    suite.training_table()
    suite.summary()


if __name__ == "__main__":
    main()
