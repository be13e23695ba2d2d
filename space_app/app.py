"""Gradio Space: sample from a DiffiT pipeline.

The model is `DIFFIT_MODEL` (a Hub id or local pipeline folder) when set, else the digits model shipped inside
`diffusers-diffit`, which runs on a CPU Space in seconds. Run locally with `python space_app/app.py`.
"""

import os

import torch

from diffusers_diffit import DiffiTPipeline, embedded_model_path
from diffusers_diffit.cli import make_grid, parse_labels

MAX_IMAGES = 64
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def load_pipeline(model: str | None = None) -> DiffiTPipeline:
    model = model or os.environ.get("DIFFIT_MODEL") or embedded_model_path("digits")
    dtype = torch.float16 if DEVICE == "cuda" else torch.float32
    return DiffiTPipeline.from_pretrained(model, dtype=dtype).to(DEVICE)


def generate(pipe: DiffiTPipeline, labels: str, images_per_label: int, steps: int, guidance_scale: float, seed: int):
    """Comma-separated class ids / names -> a grid image, one row per label (empty labels: unconditional)."""
    tokens = [token.strip() for token in labels.split(",") if token.strip()]
    class_labels = parse_labels(tokens) if tokens else None
    rows = len(tokens) if tokens else 1
    if not 1 <= rows * images_per_label <= MAX_IMAGES:
        raise ValueError(f"At most {MAX_IMAGES} images per request, asked for {rows * images_per_label}.")
    generator = torch.Generator(DEVICE).manual_seed(int(seed))
    images = pipe(
        class_labels,
        num_images_per_label=int(images_per_label),
        num_inference_steps=int(steps),
        guidance_scale=float(guidance_scale),
        generator=generator,
    ).images
    return make_grid(images, int(images_per_label), upscale=max(1, 512 // (images[0].width * int(images_per_label))))


def build_demo(pipe: DiffiTPipeline):
    import gradio as gr

    names = [names[0] for _, names in sorted(pipe.id2label.items())]
    example = ", ".join(names[:3]) if names else ""

    def run(labels, images_per_label, steps, guidance_scale, seed):
        try:
            return generate(pipe, labels, images_per_label, steps, guidance_scale, seed)
        except ValueError as error:  # bad label names, too many images: show the message, not a stack trace
            raise gr.Error(str(error))

    with gr.Blocks(title="DiffiT") as demo:
        gr.Markdown("# DiffiT: Diffusion Vision Transformers\nClass ids or names, comma-separated "
                    f"(this model knows {len(names) or 'no'} classes).")
        with gr.Row():
            with gr.Column():
                labels = gr.Textbox(label="Classes", value=example)
                per_label = gr.Slider(1, 16, value=4, step=1, label="Images per class")
                steps = gr.Slider(1, 250, value=pipe.config.num_inference_steps, step=1, label="Steps")
                guidance = gr.Slider(1.0, 10.0, value=pipe.config.guidance_scale, step=0.05, label="Guidance scale")
                seed = gr.Number(value=0, precision=0, label="Seed")
                button = gr.Button("Generate")
            output = gr.Image(label="Samples", type="pil")
        button.click(run, [labels, per_label, steps, guidance, seed], output)
    return demo


if __name__ == "__main__":
    build_demo(load_pipeline()).launch()
