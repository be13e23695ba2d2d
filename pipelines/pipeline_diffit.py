"""DiffiTPipeline: class-conditional (or unconditional) sampling with any diffusers scheduler and DiffiT's guidance.

Each step, with guidance on:   [x; x], labels [y; null] -> model -> (cond, uncond) -> guided ε (+ cond's variance)
                               -> scheduler.step(..., generator) -> x
With a diffusers guider (`pipe.guider`): one forward per batch the guider asks for (labels for "pred_cond", the null
class for "pred_uncond") -> the guider combines the ε channels -> guided ε (+ cond's variance) -> scheduler.step.
Latent models (a VAE is registered) decode with `vae.decode(x / scaling_factor)`; pixel-space models (vae=None) output
images in [-1, 1] directly. The official recipe (docs/diffit-equations.md#sampling) is `OFFICIAL_RECIPES` +
`official_scheduler()`.
"""

import contextlib
import inspect
import json
import logging
import math
import numbers
import os
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import AutoencoderKL, DDPMParallelScheduler, DDPMScheduler
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.guiders import BaseGuidance
from diffusers.models.modeling_utils import ModelMixin
from diffusers.pipelines.pipeline_utils import DiffusionPipeline, ImagePipelineOutput
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from ..guidance import apply_guidance, check_guidance_recipe, check_guider, guidance_weight, schedule_horizon
from ..hub import HUB_DOWNLOAD_KWARGS, download_pipeline
from ..labels import imagenet_id2label, lookup_label_ids, normalize_id2label
from ..loaders import DiffiTLoraLoaderMixin
from ..memory import check_fits, check_max_batch_size, sample_in_batches
from ..schedulers.compatibility import COMPATIBLE, check_scheduler, infer_denoiser_type, scheduler_class
from ..utils import denormalize_latents, resolve_dtype, vae_scale_factor


logger = logging.getLogger(__name__)

# What NVIDIA's FID numbers were measured with (docs/diffit-equations.md#sampling), by image side in pixels.
OFFICIAL_RECIPES = {
    256: dict(
        num_inference_steps=250,
        guidance_scale=4.4,
        guidance_schedule="power-cosine",
        guidance_power=4.0,
        guided_channels=3,
    ),
    512: dict(num_inference_steps=250, guidance_scale=1.49, guidance_schedule="constant", guided_channels=3),
}
OUTPUT_TYPES = ("pil", "np", "pt", "latent")
_LEARNED_VARIANCE = ("learned", "learned_range")


# The sampling defaults a pipeline saves in model_index.json.
RECIPE_KEYS = (
    "num_inference_steps",
    "guidance_scale",
    "guidance_schedule",
    "guidance_power",
    "guided_channels",
    "guidance_interval",
)


def official_scheduler() -> DDPMScheduler:
    """ADM's diffusion (1000 linear betas 1e-4 → 0.02, ε, learned-range variance, no clipping); with 250 inference
    steps diffusers' linspace spacing gives the official respaced timesteps round(linspace(0, 999, 250))."""
    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule="linear",
        variance_type="learned_range",
        clip_sample=False,
        prediction_type="epsilon",
        timestep_spacing="linspace",
    )


class DiffiTPipeline(DiffusionPipeline, DiffiTLoraLoaderMixin):
    r"""
    Sampling for DiffiT denoisers: the latent `DiffiTTransformer2DModel` (with a VAE) or a pixel-space model
    (`vae=None`), class-conditional or unconditional.

    Args:
        transformer: the denoiser, called as `transformer(x, t, class_labels=..., return_dict=False)[0]`; its config
            gives `in_channels`, `out_channels` (2·in_channels = ε then the learned-variance interpolation v),
            `sample_size` and `num_classes` (0 = unconditional; the null class is `num_classes`).
        scheduler: a scheduler that can drive the denoiser (`diffusers_diffit.schedulers.compatibility`): assigning
            one that cannot (`pipe.scheduler = ...`) raises a `ValueError` listing those that can. The learned
            variance is passed on only to DDPM with `variance_type="learned"/"learned_range"`; the other schedulers
            get ε alone.
        vae: decodes latents; None for pixel-space models.
        guider: a diffusers guider (`diffusers.guiders`: `ClassifierFreeGuidance`, `ClassifierFreeZeroStarGuidance`,
            `AdaptiveProjectedGuidance`, `SkipLayerGuidance` with `transformer_blocks.N`, ...) used instead of
            DiffiT's recipe, saved and loaded with the pipeline; None (the default) = DiffiT's recipe below. The
            guider guides the ε channels (all of them; the learned variance stays the conditional prediction's),
            with the null class as the unconditional input. One it cannot drive (predictions other than
            `guidance.GUIDER_PREDICTIONS`, an unconditional model, anything but whole-block skips of existing
            `transformer_blocks.N`) raises a `ValueError` when assigned (`pipe.guider = ...`).
        id2label: class id -> names (list of synonyms, or one comma-separated string). None with a 1000-class model
            means the ImageNet-1k names shipped with the package.
        num_inference_steps, guidance_scale, guidance_schedule, guidance_power, guided_channels, guidance_interval:
            the default recipe of `__call__` (see there; `RECIPE_KEYS`), saved with the pipeline.
            `OFFICIAL_RECIPES` holds NVIDIA's.
        denoiser_type: what the denoiser was trained as, "ddpm" (discrete-time ε, optionally with the learned
            variance) or "edm" (EDM-preconditioned); saved with the pipeline. None infers it from the scheduler
            (EDM σ-space schedulers mean "edm"), which is also how folders saved without it load.
    """

    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae", "guider"]
    # "prompt_embeds" is the class-label conditioning of the model batch (int64 ids; [labels; null] while guiding),
    # under the name diffusers' stock CFG callbacks read. It is for reading: the labels are rebuilt every step.
    _callback_tensor_inputs = ["latents", "prompt_embeds"]

    def __init__(
        self,
        transformer: ModelMixin,
        scheduler: SchedulerMixin,
        vae: AutoencoderKL | None = None,
        guider: BaseGuidance | None = None,
        id2label: dict | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        guidance_schedule: str = "constant",
        guidance_power: float = 4.0,
        guided_channels: int | None = None,
        guidance_interval: tuple[float, float] | list[float] | None = None,
        denoiser_type: str | None = None,
    ):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae, guider=guider)
        config = transformer.config
        if id2label is not None:
            id2label = normalize_id2label(id2label, num_classes=config.num_classes)
        check_steps(num_inference_steps)
        recipe = check_guidance_recipe(
            guidance_scale, guidance_schedule, guidance_power, guided_channels, guidance_interval, config.in_channels
        )
        denoiser_type = denoiser_type or infer_denoiser_type(type(scheduler).__name__)
        self.register_to_config(
            id2label=id2label, num_inference_steps=num_inference_steps, **recipe, denoiser_type=denoiser_type
        )
        self.scheduler = scheduler  # through the gate in __setattr__, now that denoiser_type is registered
        self.vae_scale_factor = vae_scale_factor(vae)
        self._interrupt = False
        self._current_timestep = None

    def __setattr__(self, name, value):
        # `pipe.scheduler = X`: refuse a scheduler that cannot drive the model before it samples noise
        if name == "scheduler" and "denoiser_type" in self.__dict__.get("_internal_dict", {}):
            value = check_scheduler(value, self.denoiser_type, self.__dict__.get("scheduler"))
        if name == "guider":  # `pipe.guider = X`: refuse a guider this pipeline cannot drive before any sampling
            check_guider(value, self.transformer)
        super().__setattr__(name, value)

    @property
    def denoiser_type(self) -> str:
        """ "ddpm" or "edm": what the denoiser was trained as, hence which schedulers can drive it."""
        return self.config.denoiser_type

    @property
    def compatible_schedulers(self) -> list[type[SchedulerMixin]]:
        """The scheduler classes that can drive this pipeline's denoiser (build one with
        `Cls.from_config(pipe.scheduler.config)`)."""
        return [scheduler_class(name) for name in COMPATIBLE[self.denoiser_type]]

    @property
    def id2label(self) -> dict[int, list[str]]:
        """Class id -> names: the pipeline's own, else ImageNet-1k's for a 1000-class model, else empty."""
        if self.config.id2label is not None:
            return normalize_id2label(self.config.id2label)
        return imagenet_id2label() if self.transformer.config.num_classes == 1000 else {}

    # The live sampling state, as in diffusers' pipelines: set when a call starts, read at every step, so a
    # step-end callback can change them (diffusers' `SDCFGCutoffCallback` sets `_guidance_scale = 0`).
    @property
    def guidance_scale(self) -> float:
        """w of the running (or last) call; the pipeline's default before any call."""
        return getattr(self, "_guidance_scale", self.config.guidance_scale)

    @property
    def do_classifier_free_guidance(self) -> bool:
        """Guidance is on while w > 1 (diffusers' convention: a callback turns it off by setting w <= 1)."""
        return self.guidance_scale > 1

    @property
    def guidance_schedule(self) -> str:
        return getattr(self, "_guidance_schedule", self.config.guidance_schedule)

    @property
    def guidance_power(self) -> float:
        return getattr(self, "_guidance_power", self.config.guidance_power)

    @property
    def guided_channels(self) -> int | None:
        return getattr(self, "_guided_channels", self.config.guided_channels)

    @property
    def guidance_interval(self) -> list[float] | None:
        return getattr(self, "_guidance_interval", self.config.guidance_interval)

    @property
    def num_timesteps(self) -> int:
        """Model-call steps of the running (or last) call: `len(scheduler.timesteps)`."""
        return self._num_timesteps

    @property
    def current_timestep(self) -> torch.Tensor | None:
        """The timestep of the running step (None outside a call), e.g. for `PyramidAttentionBroadcastConfig(
        current_timestep_callback=lambda: pipe.current_timestep)`."""
        return self._current_timestep

    @property
    def interrupt(self) -> bool:
        """Set `pipe._interrupt = True` in a step-end callback to stop after that step."""
        return self._interrupt

    def get_label_ids(self, label: str | list[str]) -> list[int]:
        """Class ids of names (case-insensitive, any synonym: "golden retriever" -> [207]); unknown or ambiguous
        names raise `ValueError` with the closest matches."""
        return lookup_label_ids(label, self.id2label)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "DiffiTPipeline":
        """`DiffusionPipeline.from_pretrained` for a local folder or a Hub id (fetched with `snapshot_download` first:
        diffusers 0.42 does not download repos whose model_index.json names a third-party library)."""
        hub_kwargs = {k: kwargs.pop(k) for k in HUB_DOWNLOAD_KWARGS if k in kwargs}
        folder = download_pipeline(pretrained_model_name_or_path, **hub_kwargs)
        from ..loading import check_pipeline_folder  # not in remote code: plain diffusers checks nothing here

        check_pipeline_folder(folder)  # a damaged file: a ValueError naming it and the fix, before anything is built
        return super().from_pretrained(folder, **kwargs)

    def save_pretrained(self, save_directory: str | os.PathLike, remote_code: bool = False, **kwargs) -> None:
        """`DiffusionPipeline.save_pretrained`; with `remote_code=True` the folder also gets the DiffiT code generated
        from this package (`diffusers_diffit.remote_code.write_remote_code`), so that plain diffusers loads it with
        `trust_remote_code=True`."""
        if remote_code and kwargs.get("push_to_hub"):
            raise ValueError(
                "`push_to_hub=True` with `remote_code=True` would upload before the code is written: save first, then "
                "upload the folder with `diffusers_diffit.hub.push_to_hub`."
            )
        super().save_pretrained(save_directory, **kwargs)
        drop_nonfinite_defaults(Path(save_directory) / "scheduler" / "scheduler_config.json", type(self.scheduler))
        if remote_code:
            from ..remote_code import write_remote_code

            write_remote_code(self, save_directory)

    @classmethod
    def from_single_file(
        cls,
        pretrained_model_link_or_path: str | os.PathLike | dict,
        vae: str | os.PathLike | AutoencoderKL = "stabilityai/sd-vae-ft-ema",
        image_size: int | None = None,
        torch_dtype: torch.dtype | None = None,
        dtype: torch.dtype | None = None,
    ) -> "DiffiTPipeline":
        """A pipeline around one of NVIDIA's released checkpoints (a file or its state dict, as for
        `DiffiTTransformer2DModel.from_single_file`), with the official scheduler and the recipe of its resolution
        (`OFFICIAL_RECIPES`) as defaults, and the ImageNet names for 1000-class models.

        `image_size` (256 or 512) picks the recipe; by default it is the checkpoint's latent side × the VAE's
        downsampling factor, and it must agree with it when that is an official resolution. `dtype` and
        `torch_dtype` are the same (diffusers accepts both).
        """
        from ..models import DiffiTTransformer2DModel

        torch_dtype = resolve_dtype(dtype, torch_dtype)
        if image_size is not None and image_size not in OFFICIAL_RECIPES:
            raise ValueError(f"`image_size` must be one of {sorted(OFFICIAL_RECIPES)}, got {image_size}.")
        transformer = DiffiTTransformer2DModel.from_single_file(pretrained_model_link_or_path, torch_dtype=torch_dtype)
        if not isinstance(vae, AutoencoderKL):
            vae = AutoencoderKL.from_pretrained(vae, torch_dtype=torch_dtype)
        vae_factor = vae_scale_factor(vae)
        native_size = transformer.config.sample_size * vae_factor
        if image_size is None:
            image_size = native_size
        if image_size not in OFFICIAL_RECIPES:
            raise ValueError(f"`image_size` must be one of {sorted(OFFICIAL_RECIPES)}, got {image_size}.")
        if native_size != image_size:
            if native_size in OFFICIAL_RECIPES:
                raise ValueError(
                    f"`image_size` {image_size} does not match the checkpoint, which makes {native_size}-px images "
                    f"(latent side {transformer.config.sample_size} × VAE factor {vae_factor})."
                )
            logger.warning(
                "The checkpoint makes %d-px images, not an official resolution; using the %d-px recipe.",
                native_size,
                image_size,
            )
        id2label = imagenet_id2label() if transformer.config.num_classes == 1000 else None
        return cls(
            transformer,
            official_scheduler(),
            vae=vae,
            id2label=id2label,
            denoiser_type="ddpm",
            **OFFICIAL_RECIPES[image_size],
        )

    def check_inputs(
        self, num_inference_steps, recipe: dict, output_type, callback_on_step_end_tensor_inputs, recipe_arguments=()
    ) -> dict:
        """Every argument checked before any work; `recipe` is the guidance recipe with the defaults filled in,
        `recipe_arguments` the names of those the call gave (refused with a guider). Returns the recipe normalised
        (`check_guidance_recipe`)."""
        config = self.transformer.config
        check_steps(num_inference_steps)
        recipe = check_guidance_recipe(**recipe, in_channels=config.in_channels)
        if self.guider is not None:
            check_guider(self.guider, self.transformer)  # the model may have changed since the guider was assigned
            if recipe_arguments:
                raise ValueError(
                    f"{', '.join(f'`{k}`' for k in recipe_arguments)}: DiffiT's guidance recipe, which the pipeline's "
                    f"guider ({type(self.guider).__name__}) replaces; configure the guider instead (e.g. "
                    "`pipe.guider = pipe.guider.new(guidance_scale=...)`), or set `pipe.guider = None` for the recipe."
                )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}.")
        unknown = [k for k in callback_on_step_end_tensor_inputs if k not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(
                f"`callback_on_step_end_tensor_inputs` must be from {self._callback_tensor_inputs}, got {unknown}."
            )
        if recipe["guidance_scale"] != 1 and config.num_classes == 0:
            raise ValueError(
                f"`guidance_scale` is {recipe['guidance_scale']} but this model is unconditional "
                "(num_classes=0); classifier-free guidance needs a class-conditional model (use 1)."
            )
        schedule_horizon(recipe["guidance_schedule"], self.scheduler)  # raises if the scheduler cannot drive it
        # the scheduler may have been changed in place since it was assigned
        checked = check_scheduler(self.scheduler, self.denoiser_type)
        if checked is not self.scheduler:  # adapted (variance_type=None): keep the adapted one
            self.scheduler = checked
        if self._keeps_learned_variance() and config.out_channels != 2 * config.in_channels:
            raise ValueError(
                f"The scheduler has `variance_type={self.scheduler.config.variance_type!r}` but the model predicts "
                f"no variance (out_channels={config.out_channels}, in_channels={config.in_channels}); use a fixed "
                "variance type."
            )
        return recipe

    def prepare_class_labels(self, class_labels, num_images_per_label: int, device) -> torch.Tensor | None:
        """Ids and names -> int64 [len · num_images_per_label] (each label repeated), or None (unconditional).

        `class_labels` may be an int, a str, a list/tuple of them (also numpy integers and 0-d integer tensors), a
        0-d/1-d integer tensor or numpy array, or None."""
        n = num_images_per_label
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"`num_images_per_label` must be an int >= 1, got {num_images_per_label!r}.")
        num_classes = self.transformer.config.num_classes
        if class_labels is None:
            return None
        if num_classes == 0:
            raise ValueError("`class_labels` were given but this model is unconditional (num_classes=0); pass None.")
        if isinstance(class_labels, np.ndarray):
            class_labels = torch.from_numpy(class_labels) if class_labels.dtype.kind in "iu" else class_labels.tolist()
        if torch.is_tensor(class_labels):
            if class_labels.is_floating_point() or class_labels.is_complex() or class_labels.ndim > 1:
                raise ValueError(
                    f"`class_labels` as a tensor must be 0-d or 1-d integers, got {class_labels.dtype} "
                    f"of shape {tuple(class_labels.shape)}."
                )
            class_labels = class_labels.reshape(-1).tolist()
        if isinstance(class_labels, (str, numbers.Integral)):
            class_labels = [class_labels]
        if not isinstance(class_labels, (list, tuple)) or not class_labels:
            raise ValueError(
                f"`class_labels` must be an int, a str, or a non-empty list of them, got {class_labels!r}."
            )
        ids = []
        for label in class_labels:
            if torch.is_tensor(label) and label.ndim == 0 and not (label.is_floating_point() or label.is_complex()):
                label = int(label)
            if isinstance(label, str):
                ids.extend(self.get_label_ids(label))
            elif isinstance(label, numbers.Integral) and not isinstance(label, (bool, np.bool_)):
                if not 0 <= label < num_classes:
                    raise ValueError(f"Class id {label} in `class_labels` is outside [0, {num_classes}).")
                ids.append(int(label))
            else:
                raise ValueError(f"`class_labels` entries must be ints or strings, got {label!r}.")
        return torch.tensor(ids, device=device).repeat_interleave(num_images_per_label)

    def prepare_latents(self, batch: int, generator, latents: torch.Tensor | None, device) -> torch.Tensor:
        """x_T: `latents`, or noise drawn from `generator`, times the scheduler's `init_noise_sigma`."""
        config = self.transformer.config
        shape = (batch, config.in_channels, config.sample_size, config.sample_size)
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"`generator` is a list of {len(generator)}; it must have one per image ({batch}).")
        if latents is None:
            # drawn in float32 whatever the model's dtype: a seed gives the same image in fp16, bf16 and fp32
            # (torch's CPU generator can draw a different sequence for reduced-precision dtypes)
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(
                f"`latents` must have shape {shape} (batch, in_channels, side, side), got {tuple(latents.shape)}."
            )
        elif not torch.isfinite(latents).all():
            raise ValueError("`latents` contains NaN or infinite values.")
        return latents.to(device=device, dtype=self.transformer.dtype) * self.scheduler.init_noise_sigma

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | str | list[int | str] | torch.Tensor | np.ndarray | None = None,
        num_images_per_label: int = 1,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        guidance_schedule: str | None = None,
        guidance_power: float | None = None,
        guided_channels: int | None = None,
        guidance_interval: tuple[float, float] | list[float] | str | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end=None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],
        attention_kwargs: dict | None = None,
        max_batch_size: int | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Args:
            class_labels: class ids and/or names ("golden retriever", any synonym, case-insensitive), one or a list
                (or an integer tensor / numpy array); ids lie in [0, num_classes). None = unconditional (the null
                class of a class-conditional model).
            num_images_per_label: images per entry of `class_labels` (the number of images when it is None).
            num_inference_steps: scheduler steps.
            guidance_scale: w >= 1; 1 = no guidance (one forward per step instead of two).
            guidance_schedule: a name in `diffusers_diffit.GUIDANCE_SCHEDULES`: "constant" (w(t) = w),
                "power-cosine" (w(t) = 1 + (w − 1)·½·(1 − cos(π·(1 − t/T)^p)), t the training timestep;
                discrete-time schedulers) or one added with `diffusers_diffit.guidance.register_guidance_schedule`.
            guidance_power: p of "power-cosine".
            guided_channels: how many leading latent channels are guided (3 = the release); `in_channels` = all.
            guidance_interval: (t_low, t_high) in the units of `scheduler.timesteps`: no guidance (and no
                unconditional forward) at steps with t outside it; "all" = every step. None = the pipeline's.
            generator: one generator, or one per image.
            latents: initial noise [batch, in_channels, sample_size, sample_size] (scaled by the scheduler's
                `init_noise_sigma`, like freshly drawn noise).
            output_type: "pil", "np" ([B, H, W, 3] in [0, 1]), "pt" ([B, 3, H, W] in [0, 1]) or "latent" (the raw
                final sample).
            return_dict: return an `ImagePipelineOutput` rather than a tuple.
            callback_on_step_end: `f(pipe, step, t, callback_kwargs) -> dict` after every step (a tensor it returns
                under "latents" replaces the latents), or a `PipelineCallback` / `MultiPipelineCallbacks` such as
                diffusers' `SDCFGCutoffCallback`. It may change the live recipe (`pipe._guidance_scale`,
                `_guidance_schedule`, `_guidance_power`, `_guided_channels`, `_guidance_interval`) for the next steps.
            callback_on_step_end_tensor_inputs: tensors passed in `callback_kwargs` (from `_callback_tensor_inputs`).
            attention_kwargs: passed to the transformer; `{"scale": s}` scales the loaded LoRA adapters
                (`load_lora_weights`) by s, 0 = the base model.
            max_batch_size: at most this many images per forward batch; a larger request runs in batches (with a
                progress bar over them) giving the same images (`diffusers_diffit.memory.sample_in_batches` states the
                generator rule). A batch estimated not to fit in the memory available is refused before any work.

        Every recipe argument left as None takes the pipeline's config value (`pipe.config.guidance_scale`, ...).
        With a guider (`pipe.guider`) the guider's own configuration guides instead: the saved recipe is not used and
        recipe arguments raise a `ValueError` (configure the guider, or set `pipe.guider = None`).

        Examples:
        ```py
        >>> import torch
        >>> from diffusers_diffit import DiffiTPipeline

        >>> pipe = DiffiTPipeline.from_pretrained("<converted DiffiT-256 repo>", dtype=torch.float16).to("cuda")
        >>> image = pipe("golden retriever", generator=torch.manual_seed(0)).images[0]  # official recipe
        ```
        """
        # 0. Memory: a batch that cannot fit is refused before any work; a request over `max_batch_size` is split
        check_max_batch_size(max_batch_size)
        ids = self.prepare_class_labels(class_labels, num_images_per_label, "cpu")
        images = num_images_per_label if ids is None else len(ids)
        check_fits(self, images, max_batch_size, self._execution_device)
        if max_batch_size is not None and images > max_batch_size:
            return sample_in_batches(
                self,
                ids,
                images,
                max_batch_size,
                generator,
                latents,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                guidance_schedule=guidance_schedule,
                guidance_power=guidance_power,
                guided_channels=guided_channels,
                guidance_interval=guidance_interval,
                output_type=output_type,
                return_dict=return_dict,
                callback_on_step_end=callback_on_step_end,
                callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
                attention_kwargs=attention_kwargs,
            )

        # 1. Check inputs, the recipe's defaults filled in from the config
        cfg = self.config
        num_inference_steps = cfg.num_inference_steps if num_inference_steps is None else num_inference_steps
        given = dict(
            guidance_scale=guidance_scale,
            guidance_schedule=guidance_schedule,
            guidance_power=guidance_power,
            guided_channels=guided_channels,
            guidance_interval=guidance_interval,
        )
        recipe = {key: cfg[key] if value is None else value for key, value in given.items()}
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        recipe = self.check_inputs(
            num_inference_steps,
            recipe,
            output_type,
            callback_on_step_end_tensor_inputs,
            recipe_arguments=[key for key, value in given.items() if value is not None],
        )
        for key, value in recipe.items():
            setattr(self, f"_{key}", value)
        self._interrupt = False

        # 2. Class labels
        device = self._execution_device
        config = self.transformer.config
        labels = self.prepare_class_labels(class_labels, num_images_per_label, device)
        batch = num_images_per_label if labels is None else len(labels)
        conditional = labels is not None
        if not conditional and config.num_classes > 0:  # unconditional samples of a conditional model
            labels = torch.full((batch,), config.num_classes, device=device)
        null = torch.full((batch,), config.num_classes, device=device)

        # 3. Timesteps, before the initial noise: a scheduler's `init_noise_sigma` can depend on them
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)

        # 4. Initial noise
        latents = self.prepare_latents(batch, generator, latents, device)
        keep_variance = self._keeps_learned_variance()
        takes_generator = "generator" in inspect.signature(self.scheduler.step).parameters
        step_kwargs = {"generator": generator} if takes_generator else {}

        # diffusers' UNet2DModel (the digits baseline) takes no attention_kwargs
        model_kwargs = {"return_dict": False} | ({"attention_kwargs": attention_kwargs} if attention_kwargs else {})

        # 5. Denoising loop (the weights are fixed for the call: the model may reuse what it derives from them)
        cache = getattr(self.transformer, "inference_cache", None)
        self._reset_cache_hooks()
        with cache() if cache is not None else contextlib.nullcontext():
            for i, t in enumerate(self.progress_bar(timesteps)):
                if self.interrupt:
                    break
                self._current_timestep = t
                model_input = self.scheduler.scale_model_input(latents, t)
                if self.guider is not None:
                    output, model_labels = self._guider_prediction(model_input, t, i, labels, null, model_kwargs)
                else:
                    interval = self.guidance_interval
                    guided = conditional and self.do_classifier_free_guidance
                    guided = guided and (interval is None or interval[0] <= float(t) <= interval[1])
                    model_labels = torch.cat([labels, null]) if guided else labels
                    if guided:
                        model_input = torch.cat([model_input, model_input])
                    # one cache context per batch composition: a cache compares a step with the last of the same kind
                    with self._cache_context("cond_uncond" if guided else "cond", i, t):
                        output = self.transformer(
                            model_input, t.expand(model_input.shape[0]), class_labels=model_labels, **model_kwargs
                        )[0]
                    if guided:
                        output = apply_guidance(
                            *output.chunk(2), self._guidance_weight(t), self.guided_channels or config.in_channels
                        )
                if not keep_variance:
                    output = output[:, : config.in_channels]  # ε (or F_θ) alone; a no-op for models without variance
                latents = self.scheduler.step(output, t, latents, **step_kwargs, return_dict=False)[0]

                if callback_on_step_end is not None:
                    tensors = {"latents": latents, "prompt_embeds": model_labels}
                    callback_kwargs = {k: tensors[k] for k in callback_on_step_end_tensor_inputs}
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)

        self._current_timestep = None
        self._reset_cache_hooks()  # no cache state outlives the call (the next may differ in batch size or labels)

        # 6. Decode
        images = latents if output_type == "latent" else self._postprocess(self._decode(latents), output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    def _keeps_learned_variance(self) -> bool:
        """Whether the scheduler reads the learned variance: DDPM's ancestral step with a learned variance type. Every
        other scheduler gets ε (or F_θ) alone."""
        ddpm = isinstance(self.scheduler, (DDPMScheduler, DDPMParallelScheduler))
        return ddpm and self.scheduler.config.variance_type in _LEARNED_VARIANCE

    def _guider_prediction(self, model_input, t, step: int, labels, null, model_kwargs) -> tuple:
        """The guider's step: one forward per batch it asks for (each between its `prepare_models` and
        `cleanup_models`, which add and remove its hooks), the labels [y] or [null] by the prediction each batch is
        for; the guider combines the ε channels. Returns (guided ε + the conditional prediction's remaining channels
        (the learned variance) [B, C_out, H, W], the labels of those forwards concatenated)."""
        guider, channels = self.guider, self.transformer.config.in_channels
        guider.set_state(step=step, num_inference_steps=self._num_timesteps, timestep=t)
        batches = guider.prepare_inputs({"class_labels": (labels, null)})
        for batch in batches:
            guider.prepare_models(self.transformer)
            with self._cache_context(getattr(batch, guider._identifier_key), step, t):
                output = self.transformer(
                    model_input, t.expand(model_input.shape[0]), class_labels=batch.class_labels, **model_kwargs
                )[0]
            guider.cleanup_models(self.transformer)
            batch.noise_pred = output[:, :channels]  # [B, C, H, W]: ε (or F_θ) alone
            if getattr(batch, guider._identifier_key) == "pred_cond":
                rest = output[:, channels:]  # [B, C_out - C, H, W]
        guided = guider(batches).pred
        return torch.cat([guided, rest], dim=1), torch.cat([batch.class_labels for batch in batches])

    def _cache_context(self, name: str, step: int, t: torch.Tensor):
        """`transformer.cache_context(...)` around one forward: diffusers' cache hooks keep one state per `name`.
        A denoiser without `CacheMixin` (diffusers' `UNet2DModel`) gets no context."""
        if not hasattr(self.transformer, "cache_context"):
            return contextlib.nullcontext()
        return self.transformer.cache_context(
            name, step_index=step, num_inference_steps=self._num_timesteps, timestep=float(t)
        )

    def _reset_cache_hooks(self) -> None:
        if getattr(self.transformer, "is_cache_enabled", False):
            self.transformer._reset_stateful_cache()

    def _guidance_weight(self, t: torch.Tensor) -> float:
        """w(t) of the live recipe."""
        horizon = schedule_horizon(self.guidance_schedule, self.scheduler)
        return guidance_weight(float(t), self.guidance_scale, self.guidance_schedule, self.guidance_power, horizon)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Final sample -> images in [-1, 1] (identity for pixel-space models)."""
        if self.vae is None:
            return latents
        return self.vae.decode(denormalize_latents(self.vae, latents.to(self.vae.dtype)), return_dict=False)[0]

    @staticmethod
    def _postprocess(images: torch.Tensor, output_type: str):
        """[B, 3, H, W] in [-1, 1] -> "pt" / "np" in [0, 1], or PIL via clamp((x + 1)·127.5) truncated to uint8 (the
        official conversion)."""
        if output_type == "pil":
            pixels = ((images.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
            return [PIL.Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p) for p in pixels]  # 1 channel -> "L"
        images = (images.float() / 2 + 0.5).clamp(0, 1)
        return images if output_type == "pt" else images.permute(0, 2, 3, 1).cpu().numpy()


def drop_nonfinite_defaults(path: Path, scheduler_cls: type) -> None:
    """Remove the entries of a saved scheduler config that are ±Infinity or NaN and equal to the class's default
    (e.g. DPM-Solver's `lambda_min_clipped=-inf`): Python's json writes them, strict JSON parsers reject them, and
    loading without them restores the same default."""
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    defaults = inspect.signature(scheduler_cls.__init__).parameters
    dropped = [
        key
        for key, value in config.items()
        if isinstance(value, float)
        and not math.isfinite(value)
        and key in defaults
        and repr(defaults[key].default) == repr(value)
    ]
    if dropped:
        path.write_text(
            json.dumps({k: v for k, v in config.items() if k not in dropped}, indent=2, sort_keys=True) + "\n"
        )


def check_steps(num_inference_steps) -> None:
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"`num_inference_steps` must be an int >= 1, got {num_inference_steps!r}.")
