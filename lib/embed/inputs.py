"""What a launch decides about the embed stage's input before planning: how many rows
(``dataset.limit``, or the sample's), the sample (``lib.data.sampling``), and a
many-file dataset's files with their row counts, so a task opens only its own files."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig

from lib.data.columns import check_dataset, open_dataset
from lib.data.datasets import FILES_RECORD_KEY, MultiSource
from lib.data.sampling import Sample, check_sample_config, dataset_sample, wants_sample
from lib.plan.spec import Plan


@dataclass
class EmbedInput:
    rows: int  # rows the plan embeds (the sample's when there is one)
    sample: Sample | None = None
    files: dict | None = None  # MultiSource.record()

    def record(self, plan: Plan) -> None:
        """Keep the sample's summary and the files' record in ``plan.extra``."""
        from lib.embed.task import SAMPLE_KEY

        if self.sample is not None:
            plan.extra[SAMPLE_KEY] = self.sample.summary()
        if self.files is not None:
            plan.extra[FILES_RECORD_KEY] = self.files


def embed_input(cfg: DictConfig) -> EmbedInput:
    """Open and check the dataset (``check_dataset``), draw the sample. Raises
    ``DatasetError``/``ConfigError`` naming the problem."""
    check_sample_config(cfg)
    source = open_dataset(cfg)
    rows = check_dataset(source, cfg)
    files = source.record() if isinstance(source, MultiSource) else None
    if not wants_sample(cfg):
        return EmbedInput(rows, None, files)
    sample = dataset_sample(source, cfg, rows)
    return EmbedInput(len(sample.row_index), sample, files)
