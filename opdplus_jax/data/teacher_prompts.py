"""Teacher-side context: the prompt a teacher scores the student's completion after.

By default every teacher scores a completion after the student's own prompt tokens. A
`TeacherPrompt` gives a teacher another prompt for the same record:

* its own chat template (`tokenizer`: the teacher folder's tokenizer, which shares the student's
  vocabulary but may render turns differently), so that the teacher reads the conversation in
  the format it was trained on;
* privileged context (`context_field`: a field of the data row such as ``solution`` or
  ``answer``), placed in its user turn with `context_format`, e.g. ``"{prompt}\\n\\nA reference
  solution: {context}"``: the teacher of on-policy self-distillation, which sees what the
  student does not.

The student samples after its own prompt; the teacher (and its reference) score the same
completion tokens after the teacher's prompt (`rollout.Rollout.teacher_prompt_tokens`), so the
per-token log-ratios compare the two models on the same continuation in different contexts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from opdplus_jax.data.records import FIELDS
from opdplus_jax.tokenizer import Tokenizer

DEFAULT_FORMAT = "{prompt}\n\n{context}"


@dataclasses.dataclass(frozen=True)
class TeacherPrompt:
    """How one teacher's prompt is rendered from a data record.

    Attributes:
      tokenizer: whose chat template renders the prompt (the teacher's own, or the student's).
      max_len: prompts with more tokens are dropped (with their record) and counted.
      context_field: a record field (one of `data.FIELDS`, e.g. "solution") placed in the user
        turn with `context_format`; None: the prompt alone.
      context_format: a str.format template with ``{prompt}`` and ``{context}``.
      system_prompt: an optional system turn before the user turn.
      name: the teacher's name, for messages.
    """

    tokenizer: Tokenizer
    max_len: int
    context_field: str | None = None
    context_format: str = DEFAULT_FORMAT
    system_prompt: str | None = None
    name: str = "teacher"

    def __post_init__(self):
        where = f"teachers.{self.name}"
        if self.context_field is not None and self.context_field not in FIELDS:
            raise ValueError(
                f"{where}.context_field={self.context_field!r} is not a data field; valid: "
                f"{', '.join(FIELDS)}"
            )
        if self.context_field is not None and (
            "{context}" not in self.context_format or "{prompt}" not in self.context_format
        ):
            raise ValueError(
                f"{where}.context_format={self.context_format!r} must contain {{prompt}} and "
                "{context}"
            )
        if isinstance(self.max_len, bool) or not isinstance(self.max_len, int) or self.max_len < 1:
            raise ValueError(f"{where}: the prompt limit must be an int >= 1; got {self.max_len!r}")

    def user_turn(self, record: Mapping[str, Any], where: str) -> str:
        """The teacher's user turn for `record` (`where` names the record in errors)."""
        if self.context_field is None:
            return record["prompt"]
        context = record.get(self.context_field)
        if context is None:
            raise ValueError(
                f"{where}: teachers.{self.name}.context_field={self.context_field!r}, but the "
                f"record has no {self.context_field!r}: add it to every record of this teacher"
            )
        return self.context_format.format(prompt=record["prompt"], context=context)

    def render(self, record: Mapping[str, Any], where: str) -> list[int]:
        """Token ids of the teacher's chat-templated prompt (with the generation prompt)."""
        head = (
            []
            if self.system_prompt is None
            else [{"role": "system", "content": self.system_prompt}]
        )
        text = self.tokenizer.apply_chat_template(
            [*head, {"role": "user", "content": self.user_turn(record, where)}],
            add_generation_prompt=True,
            tokenize=False,
        )
        return list(self.tokenizer.encode([text])[0])

    def describe(self) -> dict[str, Any]:
        """What identifies the rendering (for a data pipeline's resume fingerprint)."""
        return {
            "template": getattr(self.tokenizer.hf, "chat_template", None),
            "context_field": self.context_field,
            "context_format": self.context_format,
            "system_prompt": self.system_prompt,
            "max_len": self.max_len,
        }


def teacher_prompt_tokens(
    builders: Sequence[TeacherPrompt | None],
    records: Sequence[Mapping[str, Any]],
    teacher_ids: Sequence[int],
    where: str,
) -> list[list[int] | None]:
    """Per record: its teacher's prompt tokens, or None when its teacher has no builder (it
    scores the student's prompt)."""
    out = []
    for i, (record, k) in enumerate(zip(records, teacher_ids, strict=True)):
        builder = builders[k] if k < len(builders) else None
        out.append(None if builder is None else builder.render(record, f"{where}, record {i}"))
    return out
