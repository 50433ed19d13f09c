"""The settings every file-tailing receiver shares; a receiver's config subclasses `TailSettings`.

Invariants:
- `TailSettings.validate` reports every problem, each prefixed with its key;
  what it accepts can be tailed (patterns compile, the encoding splits lines,
  sizes fit together).
- A subclass may give ``include`` another default (its files) and add fields;
  the keys here keep their meaning in every file receiver.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Literal

from tapio.component import StorageRef, setting
from tapio.units import ByteSize, Duration

from ._lines import supported_encoding

MIN_FINGERPRINT = 16
MAX_FINGERPRINT = 64 * 1024
MAX_LINE_LIMIT = 64 * 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class MultilineConfig:
    line_start_pattern: str = setting(
        "",
        doc="A regular expression matching the first line of each record: lines that do not match are joined to the record before them. Empty: every line is a record.",
    )
    line_end_pattern: str = setting(
        "",
        doc="A regular expression matching the last line of each record (instead of `line_start_pattern`). Empty: not used.",
    )

    def compiled(self) -> tuple[re.Pattern[str] | None, re.Pattern[str] | None]:
        return (
            re.compile(self.line_start_pattern) if self.line_start_pattern else None,
            re.compile(self.line_end_pattern) if self.line_end_pattern else None,
        )

    def validate(self, prefix: str = "multiline") -> list[str]:
        problems = []
        if self.line_start_pattern and self.line_end_pattern:
            problems.append(f"{prefix}: set line_start_pattern or line_end_pattern, not both")
        for key in ("line_start_pattern", "line_end_pattern"):
            pattern = getattr(self, key)
            if pattern:
                try:
                    re.compile(pattern)
                except re.error as e:
                    problems.append(f"{prefix}.{key}: not a valid regular expression: {e}")
        return problems


@dataclass(frozen=True, kw_only=True)
class TailSettings:
    include: list[str] = setting(
        default_factory=list,
        doc="Glob patterns of the files to tail (`*`, `?`, `[...]`, `**` for any depth). Files are told apart by their first bytes, not their names, so a renamed file is not read twice.",
    )
    exclude: list[str] = setting(default_factory=list, doc="Glob patterns of files not to tail even though `include` matches them.")
    start_at: Literal["end", "beginning"] = setting(
        "end",
        doc="Where to start in a file found at startup that has no saved offset: `end` reads only what is written from now on, `beginning` reads it whole. Files that appear later are always read from their beginning.",
    )
    fingerprint_size: ByteSize = setting(
        ByteSize(1024),
        doc="How many first bytes of a file identify it (across renames, copies and restarts). Files that begin alike for this many bytes are taken for the same file.",
    )
    max_line_size: ByteSize = setting(
        ByteSize(1024 * 1024),
        doc="Longest record kept: a longer line keeps its first bytes (marked truncated, counted) and the rest is skipped without being held in memory.",
    )
    encoding: str = setting("utf-8", doc="How the files are encoded: `utf-8`, `ascii`, `latin-1`, `utf-16le` or `utf-16be`. Invalid bytes are replaced and counted.")
    multiline: MultilineConfig = setting(default_factory=MultilineConfig, doc="Records that span several lines.")
    force_flush_period: Duration = setting(
        Duration(0.5),
        doc="How long a line without its newline (or a multiline record) waits for more before it is sent as it is. `0` waits for the newline however long it takes.",
    )
    poll_interval: Duration = setting(
        Duration(1.0),
        doc="How often the globs are matched again and every open file is checked. Changes are seen at once through inotify; this is the fallback (and the only way on file systems without inotify).",
    )
    max_open_files: int = setting(256, doc="Most files tailed at once; more matching files wait (counted) until others are closed.")
    max_unsaved: ByteSize = setting(
        ByteSize(4 * 1024 * 1024),
        doc="With `storage`: how far reading may run ahead of a file's saved offset. After a crash a file repeats at most this many bytes, however slow the checkpoint writes (more only past a record longer than this: that record and the rest of the read that ended it); reading waits for the next write when it is this far ahead. Keep it above what the batch processor's `send_batch_size` holds (records × their size), or that processor waits for its timeout before each send. `0`: no limit.",
    )
    storage: StorageRef | None = setting(
        None,
        doc="The id of a storage extension (e.g. `storage`) to keep the read offsets in, so a restart resumes where delivery stopped. Empty: offsets are kept in memory only and `start_at` applies at every start.",
    )

    def validate(self) -> list[str]:
        problems: list[str] = []
        for key in ("include", "exclude"):
            for i, pattern in enumerate(getattr(self, key)):
                if not pattern.strip():
                    problems.append(f"{key}[{i}]: must not be empty")
                elif not os.path.isabs(os.path.expanduser(pattern)) and not pattern.startswith("."):
                    problems.append(f"{key}[{i}]: {pattern!r} should be an absolute path (or start with ./)")
        if not MIN_FINGERPRINT <= self.fingerprint_size <= MAX_FINGERPRINT:
            problems.append(f"fingerprint_size: must be between {MIN_FINGERPRINT} bytes and 64KiB, got {int(self.fingerprint_size)}")
        if not 1 <= self.max_line_size <= MAX_LINE_LIMIT:
            problems.append(f"max_line_size: must be between 1 byte and 64MiB, got {int(self.max_line_size)}")
        why = supported_encoding(self.encoding)
        if why is not None:
            problems.append(f"encoding: {why}")
        problems += self.multiline.validate()
        if self.force_flush_period < 0:
            problems.append("force_flush_period: must be 0 or more")
        if not 0.01 <= self.poll_interval <= 3600:
            problems.append(f"poll_interval: must be between 10ms and 1h, got {self.poll_interval}s")
        if self.max_open_files < 1:
            problems.append(f"max_open_files: must be at least 1, got {self.max_open_files}")
        return problems
