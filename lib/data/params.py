"""The ``dataset`` node: where rows come from and how the text of a row is built."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from lib.config.fields import bounded


class DatasetFormat(StrEnum):
    auto = "auto"
    parquet = "parquet"
    jsonl = "jsonl"
    csv = "csv"
    hf = "hf"
    builtin = "builtin"


class TextMode(StrEnum):
    field = "field"  # the text is one column (text_field)
    template = "template"  # str.format template over columns
    chat = "chat"  # a list of messages: prompt -> think -> response


class NullText(StrEnum):
    error = "error"
    drop = "drop"


class Sampling(StrEnum):
    first = "first"  # the first per_source rows of each source, in dataset order
    random = "random"  # a seeded draw without replacement per source, kept in dataset order


class EncodingErrors(StrEnum):
    error = "error"  # a byte sequence that does not decode fails the task, naming it
    replace = "replace"  # undecodable bytes become U+FFFD


@dataclass
class ChatParams:
    messages_field: str = "messages"
    role_key: str = "role"
    content_key: str = "content"
    # A separate reasoning key on the assistant turn; else <think>...</think> in the content.
    think_key: str = "reasoning_content"
    assistant_role: str = "assistant"
    turn_template: str = "{role}: {content}"
    turn_separator: str = "\n\n"
    # Order is prompt -> think -> response: the response last, where last-token pooling reads.
    part_separator: str = "\n\n"


@dataclass
class DatasetParams:
    # Default: derived from the path (file stem, hub name, builtin name).
    name: str = "${ef.dataset_name:${dataset.path}}"
    # A local path (a file, a directory or a glob of files), an fsspec URL (s3://, gs://,
    # memory://...), a list of files/globs (one dataset, sorted), a Hugging Face dataset
    # name (format=hf, read from the local cache) or builtin:<name>.
    path: Any = "builtin:stdlib_docstrings"
    format: DatasetFormat = DatasetFormat.auto
    split: str = "train"
    subset: str | None = None  # Hugging Face dataset config name (e.g. 20231101.en)
    text_mode: TextMode = TextMode.field
    text_field: str = "text"
    template: str = "{text}"
    chat: ChatParams = field(default_factory=ChatParams)
    # null = auto: the "id" / "source" column when the dataset has one, else the original
    # row index / the dataset name. A name given explicitly must exist.
    id_field: str | None = None
    source_field: str | None = None
    metadata_fields: list[str] = field(default_factory=list)
    on_null_text: NullText = NullText.error
    # Text read as bytes (a CSV or jsonl with bytes that are not UTF-8) is decoded with
    # this codec, never embedded as "b'...'".
    encoding: str = "utf-8"
    encoding_errors: EncodingErrors = EncodingErrors.error
    # A text column that is not a string (ints, floats) is an error; true: str() of it.
    cast_text: bool = False
    # Empty and whitespace-only texts are dropped and recorded with reason "empty"
    # (false: embedded as they are).
    drop_empty_text: bool = True
    # Duplicate ids are counted in the merge quality report and warned about; true:
    # an error at launch naming the first duplicate and its rows.
    unique_ids: bool = False
    limit: int | None = bounded(None, ge=1)  # use only the first N rows
    # Declared size of the dataset, checked at launch.
    expected_rows: int | None = bounded(None, ge=0)
    # Pilot sampling (lib.data.sampling): N rows of every source (null: all rows), drawn
    # ``first`` (dataset order) or ``random`` (seeded, without replacement); ``sources``
    # keeps only the named sources. Rows keep their dataset index; the sample is recorded
    # in embed/sample.parquet.
    per_source: int | None = bounded(None, ge=1)
    sampling: Sampling = Sampling.first
    seed: int = 0
    sources: list[str] = field(default_factory=list)
    # Keep the embedded text in metadata.parquet: ``text`` (field/template modes), or
    # user_prompt, think_text, response_text and num_turns (chat mode).
    keep_text: bool = True
    # format=hf: never materialised. Parquet (a local directory, or a hub dataset whose
    # split's files are parquet, from the local hub cache) is read by row group; other
    # files with datasets' streaming mode (lib.data.datasets StreamSource), which needs
    # expected_rows when the dataset's info has no row count.
    streaming: bool = False
