"""Named designs in the workspace: save, list, open, rename, duplicate, delete.

Each is a ``delta-design/1`` document in ``<workspace>/designs/<name>.json``, written atomically
(a crash leaves the old file or the new one, never a mix). A file that cannot be read is listed as
unreadable with the reason — it never breaks the list — and is never overwritten by a save.
Names and counts are bounded: every input that sizes the disk is.
"""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path
from typing import Any

from designer.payloads import PayloadError
from engine import atomic_write_bytes

#: a name is a file name on every system: letters, digits, and ``-_.`` inside
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_DESIGNS = 256
#: a saved design is one design: larger files are listed as unreadable, not parsed
MAX_DESIGN_BYTES = 4 * 1024 * 1024


def check_name(name: Any, field: str = "name") -> str:
    if not isinstance(name, str) or not _NAME.match(name) or name.endswith(".json"):
        raise PayloadError(f"a design name is 1–64 letters, digits, '-', '_' or '.', starting with a letter or "
                           f"digit; got {name!r}", field)
    return name


class NamedDesigns:
    """The workspace's named designs; one lock for all (renames must not interleave)."""

    def __init__(self, workspace: Path) -> None:
        self.directory = workspace / "designs"
        self._lock = threading.Lock()

    def _path(self, name: str) -> Path:
        return self.directory / f"{check_name(name)}.json"

    def list(self) -> list[dict[str, Any]]:
        """Every saved design, readable or not (with why), sorted by name."""
        entries = []
        files = sorted(self.directory.glob("*.json"), key=lambda p: p.stem) if self.directory.is_dir() else []
        for path in files[:MAX_DESIGNS]:
            entry: dict[str, Any] = {"name": path.stem}
            try:
                document = self._read(path)
                backbone = document.get("backbone") or {}
                entry.update(readable=True, source=backbone.get("source"), deltas=len(document.get("deltas", [])),
                             trainable=(document.get("totals") or {}).get("trainable_parameters"))
            except (OSError, ValueError) as error:
                entry.update(readable=False, error=str(error))
            entries.append(entry)
        return entries

    @staticmethod
    def _read(path: Path) -> dict[str, Any]:
        if path.stat().st_size > MAX_DESIGN_BYTES:
            raise ValueError(f"larger than {MAX_DESIGN_BYTES // 1024 // 1024} MB")
        document = json.loads(path.read_text())
        if not isinstance(document, dict) or document.get("format") != "delta-design/1":
            raise ValueError("not a delta-design/1 document")
        return document

    def read(self, name: str) -> dict[str, Any]:
        path = self._path(name)
        if not path.is_file():
            raise PayloadError(f"there is no saved design {name!r}", "name")
        try:
            return self._read(path)
        except (OSError, ValueError) as error:
            raise PayloadError(f"saved design {name!r} is unreadable: {error}", "name") from error

    def save(self, name: str, document: dict[str, Any], *, replace: bool = False) -> None:
        with self._lock:
            path = self._path(name)
            if path.exists() and not replace:
                raise PayloadError(f"a design named {name!r} exists; choose another name or replace it", "name")
            if not path.exists() and self._count() >= MAX_DESIGNS:
                raise PayloadError(f"the workspace holds at most {MAX_DESIGNS} designs; delete one first", "name")
            atomic_write_bytes(path, json.dumps(document, indent=1, allow_nan=False).encode())

    def rename(self, name: str, new: str) -> None:
        with self._lock:
            source, target = self._path(name), self._path(check_name(new, "new_name"))
            if not source.is_file():
                raise PayloadError(f"there is no saved design {name!r}", "name")
            if target.exists():
                raise PayloadError(f"a design named {new!r} exists already", "new_name")
            source.rename(target)

    def duplicate(self, name: str, new: str) -> None:
        document = self.read(name)
        self.save(check_name(new, "new_name"), document)

    def delete(self, name: str) -> None:
        with self._lock:
            path = self._path(name)
            if not path.is_file():
                raise PayloadError(f"there is no saved design {name!r}", "name")
            path.unlink()

    def _count(self) -> int:
        return len(list(self.directory.glob("*.json"))) if self.directory.is_dir() else 0
