"""vLLM pooling throughput on the same Qwen3-Embedding-0.6B-shaped model and rows as
``bench.gpu.embed``, through our ``vllm`` backend with its CUDA defaults (CUDA graphs,
gpu_memory_utilization 0.9). Without vLLM's CUDA build it records why it did not run.

    python -m bench.gpu.vllm_embed --out results/vllm.json [--rows 4096]
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from omegaconf import OmegaConf

from bench.gpu.common import device, gpu_name, parser, row, timed, write
from bench.gpu.embed import MAX_LENGTH, token_ids
from bench.gpu.models import qwen3_embedding_shaped
from lib.config.schema import EmbedfleetConfig


def why_not() -> str | None:
    """None when vLLM's CUDA build is importable, else the reason."""
    if importlib.util.find_spec("vllm") is None:
        return "vLLM not installed (pip install 'embedfleet[vllm]')"
    try:
        from vllm.platforms import current_platform
    except Exception as exc:  # a broken install
        return f"vLLM does not import: {type(exc).__name__}: {exc}"
    return "vLLM is the CPU build" if current_platform.is_cpu() else None


def main() -> None:
    ap = parser(__doc__)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cache", default="bench/gpu/.models")
    args = ap.parse_args()
    dev = device(args.smoke)
    reason = "--smoke: vLLM is not started" if args.smoke else why_not()
    if reason:
        write(args.out, [row("vllm", "vLLM pooling, CUDA defaults", None, "tokens/s", reason)],
              gpu=gpu_name(dev))  # fmt: skip
        return
    from lib.embed.backends.vllm import VllmEmbedder

    path = qwen3_embedding_shaped(Path(args.cache), smoke=False)
    cfg = OmegaConf.structured(EmbedfleetConfig)
    cfg.model.path, cfg.model.name = str(path), path.name
    cfg.model.pooling, cfg.model.normalize, cfg.model.max_length = "last", True, MAX_LENGTH
    cfg.embed.backend, cfg.embed.device = "vllm", "cuda"
    t_start, emb = timed(lambda: VllmEmbedder.from_config(cfg.model, cfg.embed), dev)
    ids = token_ids(args.rows)
    tokens = sum(len(x) for x in ids)
    emb.embed(ids[:64])
    seconds, _ = timed(lambda: emb.embed(ids), dev)
    emb.close()
    write(
        args.out,
        [
            row("vllm", "vLLM pooling, CUDA defaults", tokens / seconds, "tokens/s",
                f"engine start {t_start:.0f} s"),
        ],
        gpu=gpu_name(dev),
    )  # fmt: skip


if __name__ == "__main__":
    main()
