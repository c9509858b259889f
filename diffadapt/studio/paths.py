"""The studio's adapter folder: names that cannot leave it, files read into memory, writes that never replace.

A name from the browser or the API is a file stem, never a path: separators, ``..``, absolute paths, hidden
names and the characters of the prompt-tag syntax are refused, so ``folder / f"{name}.safetensors"`` is always
a direct child of the folder. Files are read whole into memory (not memory-mapped): a file replaced or
truncated on disk after loading can neither crash the server (SIGBUS) nor change what a loaded adapter does.
New files (uploads, merges) are linked into place only if the name is free, so nothing loaded is overwritten.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import FormatError, SourceError
from ..spec import RawAdapter

SUFFIX = ".safetensors"
PREVIEW_SUFFIXES = (".preview.png", ".png", ".preview.jpg", ".jpg", ".preview.webp", ".webp")
MAX_NAME = 120


class UnsafeNameError(SourceError):
    """A name that would reach outside the adapter folder, or cannot be used as an adapter name."""


def check_name(name: str, *, what: str = "adapter name") -> str:
    """``name`` if it is a plain file stem, else :class:`UnsafeNameError` saying why."""
    if not isinstance(name, str) or not name.strip():
        raise UnsafeNameError(f"the {what} is empty")
    problem = None
    if name != name.strip():
        problem = "has leading or trailing spaces"
    elif os.path.isabs(name) or name.startswith("~"):
        problem = "is an absolute path; give a name inside the adapter folder"
    elif any(sep in name for sep in ("/", "\\", os.sep)) or ".." in name:
        problem = "contains a path separator or '..'; give a name inside the adapter folder"
    elif name.startswith("."):
        problem = "starts with '.'"
    elif any(c in name for c in ':<>"|?*') or any(ord(c) < 32 for c in name) or name.count("=") == 1:
        problem = "contains a character that cannot be used in a <lora:…> tag or a file name"
    elif len(name) > MAX_NAME:
        problem = f"is longer than {MAX_NAME} characters"
    if problem:
        raise UnsafeNameError(f"the {what} '{name}' {problem}")
    return name


@dataclass(frozen=True)
class FileBytes:
    """One adapter file as read: its bytes' identity, for noticing that the file on disk changed."""

    size: int
    mtime_ns: int


def parse_safetensors(data: bytes, *, where: str) -> RawAdapter:
    """Tensors (copied into memory) and metadata from the bytes of a safetensors file."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n]) if len(data) >= 8 + n else None
        if not isinstance(header, dict):
            raise ValueError("bad header length")
        tensors = {k: v.clone() for k, v in load(data).items()}
    except (SafetensorError, ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"{where}: cannot read safetensors: {e} (truncated or not a safetensors file?)") from e
    if not tensors:
        raise FormatError(f"{where}: the file holds no tensors")
    metadata = {str(k): str(v) for k, v in (header.get("__metadata__") or {}).items()}
    return RawAdapter(tensors=tensors, metadata=metadata, source=where, files=(where,))


class AdapterFolder:
    """The folder the studio reads adapters from and writes uploads and merges to."""

    def __init__(self, folder: str | os.PathLike):
        self.root = Path(folder).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.root / f"{check_name(name)}{SUFFIX}"

    def names(self) -> list[str]:
        """Adapter names (file stems) in the folder whose names are usable; hidden and odd files are skipped."""
        out = []
        for p in self.root.glob(f"*{SUFFIX}"):
            try:
                out.append(check_name(p.name[: -len(SUFFIX)]))
            except UnsafeNameError:
                continue
        return sorted(out, key=str.lower)

    def stamp(self, name: str) -> FileBytes | None:
        try:
            st = self.path(name).stat()
        except FileNotFoundError:
            return None
        return FileBytes(st.st_size, st.st_mtime_ns)

    def read(self, name: str) -> tuple[bytes, FileBytes]:
        """The whole file, and its stamp taken from the open file (so the two agree)."""
        path = self.path(name)
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read()
        except FileNotFoundError:
            raise SourceError(f"no adapter '{name}' in {self.root}") from None
        if not data:
            raise FormatError(f"{path}: the file is empty")
        return data, FileBytes(st.st_size, st.st_mtime_ns)

    def preview(self, name: str) -> Path | None:
        """A1111's preview image next to the adapter (``name.preview.png``, ``name.png``, …), if any."""
        check_name(name)
        return next((p for s in PREVIEW_SUFFIXES if (p := self.root / f"{name}{s}").is_file()), None)

    def free_name(self, stem: str, taken: set[str] = frozenset()) -> str:
        """``stem``, or ``stem-1``, ``stem-2``… — the first that is neither a file nor in ``taken``."""
        check_name(stem)
        name, i = stem, 1
        while name in taken or self.path(name).exists():
            name, i = f"{stem}-{i}", i + 1
        return name

    def create(self, name: str, write) -> Path:
        """Write a new ``name.safetensors`` with ``write(tmp_path)``; refused if the name exists (never replaced)."""
        dest = self.path(name)
        fd, tmp = tempfile.mkstemp(prefix=".incoming-", suffix=SUFFIX, dir=self.root)
        os.close(fd)
        try:
            write(Path(tmp))
            try:
                os.link(tmp, dest)  # fails if dest exists: an existing file is never replaced
            except FileExistsError:
                raise SourceError(f"'{dest.name}' already exists in the adapter folder; pick another name") from None
        finally:
            os.unlink(tmp)
        return dest
