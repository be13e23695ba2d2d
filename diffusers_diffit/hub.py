"""The Hugging Face Hub side of the package, shared by the pipeline, the conversion script and the training scripts:
snapshot-first loading, model cards built with `huggingface_hub.ModelCard`, and uploads with `huggingface_hub`."""

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import HfApi, ModelCard, ModelCardData, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError
from huggingface_hub.hf_api import DEFAULT_IGNORE_PATTERNS
from huggingface_hub.utils import filter_repo_objects


logger = logging.getLogger(__name__)

# `from_pretrained` keyword arguments that concern the download, not the loading.
HUB_DOWNLOAD_KWARGS = ("cache_dir", "revision", "token", "force_download", "local_files_only")
# Safetensors only: pickled or other-framework weights are never fetched.
NOT_DOWNLOADED = ["*.bin", "*.ckpt", "*.pt", "*.pth", "*.pkl", "*.msgpack", "*.onnx", "*.h5"]
# A card is its metadata block and then the text as written (the Hub's default template adds sections to fill in).
CARD_TEMPLATE = "---\n{{ card_data }}\n---\n{{ model_description }}\n"

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
    data = existing_card_data(repo_id_or_path, token)
    data.library_name = data.library_name or "diffusers"
    data.license = license
    if base_model is not None:
        data.base_model = base_model
    if pipeline_tag is not None:
        data.pipeline_tag = pipeline_tag
    data.tags = list(dict.fromkeys([*(data.tags or []), *tags])) or None
    return ModelCard.from_template(data, template_str=CARD_TEMPLATE, model_description=model_description)


def existing_card_data(repo_id_or_path: str | os.PathLike, token: str | None = None) -> ModelCardData:
    """The metadata of the card already at `repo_id_or_path` (a local folder's README.md or a Hub repo's card);
    empty when there is none yet."""
    folder = Path(repo_id_or_path)
    if folder.is_dir():
        readme = folder / "README.md"
        return ModelCard.load(readme).data if readme.is_file() else ModelCardData()
    try:
        return ModelCard.load(os.fspath(repo_id_or_path), token=token).data
    except (EntryNotFoundError, RepositoryNotFoundError):  # a new repo, or one without a card
        return ModelCardData()


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
