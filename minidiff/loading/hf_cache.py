"""Hub ids in the local Hugging Face cache: "google/ddpm-cifar10-32" -> the folder its files were downloaded to.

minidiff never downloads. A model fetched once by huggingface_hub (diffusers, transformers, `hf download`) is
read where that left it, without huggingface_hub, by the layout it writes (huggingface_hub constants.py and
file_download.py, try_to_load_from_cache):

    <cache>/models--google--ddpm-cifar10-32/
        refs/main                          the commit hash a branch or tag points at ("main", "fp16", ...)
        snapshots/<commit hash>/...        the repository's files at that commit (links into blobs/)
        blobs/...

<cache> is $HF_HUB_CACHE, else $HUGGINGFACE_HUB_CACHE, else $HF_HOME/hub, else $XDG_CACHE_HOME/huggingface/hub,
else ~/.cache/huggingface/hub.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from minidiff.loading.model_folder import ModelFolderError

# A hub id: "NAME" or "ORG/NAME" of letters, digits, "-", "_", "." (huggingface_hub's validate_repo_id)
HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def cache_dir() -> Path:
    """Where huggingface_hub keeps downloaded repositories, by its environment variables' precedence."""
    home = os.getenv("HF_HOME", os.path.join(os.getenv("XDG_CACHE_HOME", os.path.join("~", ".cache")), "huggingface"))
    hub = os.getenv("HF_HUB_CACHE", os.getenv("HUGGINGFACE_HUB_CACHE", os.path.join(home, "hub")))
    return Path(os.path.expandvars(os.path.expanduser(hub)))


def is_hub_id(name: str) -> bool:
    return bool(HUB_ID.fullmatch(name)) and not name.startswith(".") and ".." not in name and "--" not in name


def resolve(path_or_id: str | os.PathLike, revision: str | None = None) -> Path:
    """An existing local file or folder as it is; else the snapshot folder of hub id "ORG/NAME" (or "NAME") in
    the Hugging Face cache at `revision` (a branch or tag such as "main", the default, or "fp16", or a commit
    hash). Anything else is a ModelFolderError that says where the files should be."""
    path = Path(path_or_id)
    if path.exists():
        return path
    name = os.fspath(path_or_id)
    if not is_hub_id(name):
        raise ModelFolderError(f"{name} does not exist")
    cache = cache_dir()
    repo = cache / ("models--" + name.replace("/", "--"))
    revision = revision or "main"
    ref = repo / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = repo / "snapshots" / commit
    if snapshot.is_dir():
        return snapshot
    option = "" if revision == "main" else f" --revision {revision}"
    if repo.is_dir():
        refs = sorted(p.relative_to(repo / "refs").as_posix() for p in (repo / "refs").rglob("*") if p.is_file())
        raise ModelFolderError(f"{name} is in the Hugging Face cache ({cache}) but not at revision {revision} (it has "
                               f"{', '.join(refs) or 'no refs'}): download that revision with `hf download {name}"
                               f"{option}` on a machine with internet, or pass another revision")
    raise ModelFolderError(f"{name} is not a local folder or file, and not in the Hugging Face cache ({cache}): "
                           f"download it there with `hf download {name}{option}` (pip install huggingface_hub) on a "
                           "machine with internet, or put the files in a folder and pass its path")
