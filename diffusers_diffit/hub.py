"""The Hugging Face Hub side of the package, shared by the pipeline, the conversion script and the training scripts:
snapshot-first loading, model cards built with diffusers' card helpers, and uploads with `huggingface_hub`."""

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from diffusers.utils.hub_utils import load_or_create_model_card, populate_model_card
from huggingface_hub import HfApi, ModelCard, snapshot_download
from huggingface_hub.hf_api import DEFAULT_IGNORE_PATTERNS
from huggingface_hub.utils import filter_repo_objects


logger = logging.getLogger(__name__)

# `from_pretrained` keyword arguments that concern the download, not the loading.
HUB_DOWNLOAD_KWARGS = ("cache_dir", "revision", "token", "force_download", "local_files_only")
# Safetensors only: pickled or other-framework weights are never fetched.
NOT_DOWNLOADED = ["*.bin", "*.ckpt", "*.pt", "*.pth", "*.pkl", "*.msgpack", "*.onnx", "*.h5"]

DIFFIT_CITATION = """\
@inproceedings{hatamizadeh2024diffit,
  title     = {DiffiT: Diffusion Vision Transformers for Image Generation},
  author    = {Hatamizadeh, Ali and Song, Jiaming and Liu, Guilin and Kautz, Jan and Vahdat, Arash},
  booktitle = {European Conference on Computer Vision (ECCV)},
  year      = {2024}
}"""


def download_pipeline(pretrained_model_name_or_path: str | os.PathLike, **hub_kwargs) -> str:
    """A local folder as is, or a Hub repo fetched with `snapshot_download` (`hub_kwargs`: cache_dir, revision,
    token, force_download, local_files_only) -> the local folder to load from.

    diffusers 0.42 refuses to download repos whose model_index.json names a library other than its own, so
    DiffiT pipelines are downloaded here and loaded from disk.
    """
    if os.path.isdir(pretrained_model_name_or_path):
        return os.fspath(pretrained_model_name_or_path)
    return snapshot_download(os.fspath(pretrained_model_name_or_path), ignore_patterns=NOT_DOWNLOADED, **hub_kwargs)


def create_model_card(
    repo_id_or_path: str | os.PathLike,
    model_description: str,
    *,
    license: str,
    base_model: str | None = None,
    tags: Sequence[str] = (),
    pipeline_tag: str | None = None,
    token: str | None = None,
) -> ModelCard:
    """A diffusers model card whose text is `model_description` (markdown), with `library_name: diffusers`,
    `license`, `base_model`, `pipeline_tag` (the Hub task, e.g. "unconditional-image-generation") and `tags` in its
    metadata. Save it with `card.save(folder / "README.md")`.

    `repo_id_or_path` is where the card will live, a Hub repo id or a local folder: a card already there keeps its
    other metadata and its tags (new ones are added) and gets the new text. A Hub id is looked up online.
    """
    local = Path(repo_id_or_path)
    if local.is_dir() and not (local / "README.md").is_file():
        # diffusers' helper reads a card file or a Hub repo; a folder without a card has nothing to load.
        card = ModelCard("---\n{}\n---\n" + model_description)  # empty metadata, filled in below
    else:
        source = os.fspath(local / "README.md") if local.is_dir() else os.fspath(repo_id_or_path)
        # `is_modular` is diffusers' switch for "use model_description verbatim" (not the training template with its
        # TODO sections); `update_model_card` puts the new text into a card that already exists.
        card = load_or_create_model_card(
            source, token=token, is_pipeline=True, model_description=model_description, is_modular=True,
            update_model_card=True,
        )
    card.data.license = license
    if base_model is not None:
        card.data.base_model = base_model
    if pipeline_tag is not None:
        card.data.pipeline_tag = pipeline_tag
    return populate_model_card(card, tags=[tag for tag in dict.fromkeys(tags) if tag not in (card.data.tags or [])])


@dataclass
class UploadPlan:
    """What `push_to_hub` uploaded (or, in a dry run, would upload)."""

    repo_id: str
    files: list[str]  # paths relative to the folder, as in the repo
    commit_message: str
    commit_url: str | None = None  # None in a dry run


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    commit_message: str = "Upload with diffusers-diffit",
    private: bool | None = None,
    token: str | None = None,
    ignore_patterns: Sequence[str] = (),
    dry_run: bool = False,
) -> UploadPlan:
    """Upload `folder` to the model repo `repo_id` (created if missing) in one commit with `huggingface_hub`.

    `ignore_patterns` (glob, e.g. `["checkpoint-*"]`) add to the Hub's defaults (`.git`, `.cache/huggingface`).
    `dry_run=True` touches no network and only returns the plan: the files and the commit message.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"`folder` must be an existing directory, got {os.fspath(folder)!r}.")
    patterns = [*ignore_patterns, *DEFAULT_IGNORE_PATTERNS]
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    files = list(filter_repo_objects(files, ignore_patterns=patterns))
    if not files:
        raise ValueError(f"Nothing to upload: {os.fspath(folder)!r} has no files outside {patterns}.")
    plan = UploadPlan(repo_id=repo_id, files=files, commit_message=commit_message)
    if dry_run:
        return plan
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id, folder_path=folder, commit_message=commit_message, ignore_patterns=list(ignore_patterns)
    )
    plan.commit_url = commit.commit_url
    logger.info("Uploaded %d files to %s: %s", len(files), repo_id, commit.commit_url)
    return plan
