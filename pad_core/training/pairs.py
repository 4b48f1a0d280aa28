"""Preference-pair files: JSONL, one pair a line:
{"messages": [...] | "prompt": str, "preference": str, "chosen": str, "rejected": str}.
The feedback export and `pad data synth` write this format."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


class PairFileError(ValueError):
    """Every problem of a pairs file, each with its line number."""

    def __init__(self, path: Path, problems: list[str]):
        super().__init__(f"{path}: " + "; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class PreferencePair:
    messages: tuple[tuple[str, str], ...]  # (role, content)
    preference: str
    chosen: str
    rejected: str

    def chat(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]

    def to_json(self) -> dict:
        return {"messages": self.chat(), "preference": self.preference, "chosen": self.chosen, "rejected": self.rejected}


def _parse(record: object) -> PreferencePair:
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
        ):
            raise ValueError("'messages' must be a non-empty list of {role, content}")
        turns = tuple((m["role"], m["content"]) for m in messages)
    elif isinstance(record.get("prompt"), str) and record["prompt"].strip():
        turns = (("user", record["prompt"]),)
    else:
        raise ValueError("needs 'messages' or a non-empty 'prompt'")
    for key in ("preference", "chosen", "rejected"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            raise ValueError(f"'{key}' must be a non-empty string")
    if record["chosen"] == record["rejected"]:
        raise ValueError("'chosen' and 'rejected' are the same answer")
    return PreferencePair(turns, record["preference"], record["chosen"], record["rejected"])


def load_pairs(path: str | Path) -> list[PreferencePair]:
    path = Path(path)
    pairs, problems = [], []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                pairs.append(_parse(json.loads(line)))
            except (json.JSONDecodeError, ValueError) as exc:
                problems.append(f"line {number}: {exc}")
    if problems:
        raise PairFileError(path, problems)
    if not pairs:
        raise PairFileError(path, ["no pairs"])
    return pairs


def write_pairs(path: str | Path, pairs: list[PreferencePair]) -> None:
    with Path(path).open("w", encoding="utf-8") as handle:
        for pair in pairs:
            handle.write(json.dumps(pair.to_json(), ensure_ascii=False) + "\n")
