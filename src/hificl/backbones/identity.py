"""What a backbone is, beyond the path it was loaded from: its config and a cheap fingerprint of its weight and
tokenizer files. A run's checkpoints record it, so a model folder whose files were replaced between a kill and
the rerun (a symlink repointed, a snapshot downloaded again with other weights) is never resumed as the same.

A file's fingerprint is its size and a hash of 16 blocks of 64 KiB spread evenly over it (the whole file when it
is smaller): about 1 MiB read per file, whatever its size, and different weights differ in every block."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from torch import nn

BLOCK, BLOCKS = 64 * 1024, 16


def file_fingerprint(path: Path) -> str:
    size = path.stat().st_size
    digest = hashlib.sha1(str(size).encode())
    with path.open("rb") as handle:
        if size <= BLOCK * BLOCKS:
            digest.update(handle.read())
        else:
            for index in range(BLOCKS):
                handle.seek(index * (size - BLOCK) // (BLOCKS - 1))
                digest.update(handle.read(BLOCK))
    return digest.hexdigest()[:16]


def model_folder(spec: str | None, model: nn.Module) -> Path | None:
    """The folder the weights were read from: the spec itself, the model's ``name_or_path``, or a hub id's
    snapshot in the local cache; None where there is none (the model was built in memory)."""
    for candidate in (spec, getattr(model, "name_or_path", None)):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    if spec:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(spec, "config.json")
        except Exception:  # not a hub id: nothing cached to fingerprint
            return None
        if isinstance(cached, str):
            return Path(cached).parent
    return None


def backbone_identity(spec: str | None, model: nn.Module) -> dict[str, Any]:
    """The model's config (without paths and versions) as a hash, and the fingerprint of every file of the folder
    its weights came from (weights, tokenizer, processor, configs)."""
    config = {k: v for k, v in model.config.to_dict().items()
              if not k.startswith("_") and k not in ("transformers_version", "name_or_path")}
    identity: dict[str, Any] = {
        "config": hashlib.sha1(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]}
    folder = model_folder(spec, model)
    if folder is not None:
        identity["files"] = {path.name: file_fingerprint(path) for path in sorted(folder.iterdir())
                             if path.is_file() and not path.name.startswith(".") and path.suffix != ".md"}
    return identity
