"""Prompt data: record loading (JSONL / Parquet), prompt and SFT batch pipelines (grain)."""

from opdplus_jax.data.pipeline import (
    PromptPipeline,
    SFTPipeline,
    chat_prompt_texts,
    sft_batches,
)
from opdplus_jax.data.records import FIELDS, load_records, records_from, write_parquet
from opdplus_jax.data.teacher_prompts import TeacherPrompt

__all__ = [
    "FIELDS",
    "PromptPipeline",
    "SFTPipeline",
    "TeacherPrompt",
    "chat_prompt_texts",
    "load_records",
    "records_from",
    "sft_batches",
    "write_parquet",
]
