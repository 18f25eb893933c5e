"""Where a user's labelled images come from: an ImageFolder tree or a CSV / list file.

Nothing here opens an image: the result is a list of candidate files with class *names*, plus the
entries that could not even be candidates (a file outside any class folder, a listed file that
does not exist). :mod:`longtail.fit.images` then decides which candidates are readable images.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

from longtail.core.errors import LongtailError

HEADER_PATHS = ("path", "file", "filename", "file_name", "image", "img", "filepath")
HEADER_LABELS = ("label", "class", "target", "category", "y")


@dataclass
class LabelledFiles:
    """Candidate files and their class names.

    Attributes:
        paths: absolute file paths (``N``).
        names: class name of each path (``N``).
        origin: ``"folder"`` or ``"list"``, and ``source`` the folder or file given.
        skipped: ``(path, reason)`` of entries that are not candidates at all.
    """

    paths: list[str]
    names: list[str]
    origin: str
    source: str
    skipped: list[tuple[str, str]] = field(default_factory=list)


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def read_image_folder(root: str | os.PathLike) -> LabelledFiles:
    """Every regular, non-hidden file under ``ROOT/<class>/`` (recursively), class = folder name.

    Files directly in ``ROOT`` belong to no class and are listed in ``skipped``.
    """
    root = Path(root).expanduser().resolve()
    classes = sorted(p for p in root.iterdir() if p.is_dir() and _visible(p))
    if not classes:
        raise LongtailError(
            f"{root}: no class folders; expected an ImageFolder tree ROOT/<class>/<image>"
        )
    paths, names = [], []
    for cdir in classes:
        for dirpath, dirnames, filenames in os.walk(cdir):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for f in sorted(filenames):
                if not f.startswith("."):
                    paths.append(str(Path(dirpath) / f))
                    names.append(cdir.name)
    skipped = [
        (str(p), "not inside a class folder")
        for p in sorted(root.iterdir())
        if p.is_file() and _visible(p)
    ]
    return LabelledFiles(paths, names, "folder", str(root), skipped)


def _split_line(line: str) -> tuple[str, str] | None:
    """``(path, label)`` of a ``path,label`` (CSV quoting allowed) or ``path label`` line."""
    if "," in line:
        row = next(csv.reader([line], skipinitialspace=True))
        if len(row) < 2:
            return None
        return ",".join(row[:-1]).strip(), row[-1].strip()
    parts = line.rsplit(None, 1)
    return (parts[0].strip(), parts[1].strip()) if len(parts) == 2 else None


def read_labelled_list(path: str | os.PathLike) -> LabelledFiles:
    """A CSV (``path,label``) or list file (``path label``), one image per line.

    The label is an integer or a class name; paths are relative to the list file's folder
    (absolute paths are kept). Blank lines and ``#`` comments are ignored, and so is a header
    line such as ``path,label``. Listed files that do not exist go to ``skipped``.

    Raises:
        LongtailError: the file is unreadable, a line has no label, or no line is left.
    """
    path = Path(path).expanduser().resolve()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise LongtailError(f"list file {str(path)!r} unreadable: {e}") from e
    base = path.parent
    paths, names, skipped = [], [], []
    first = True
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = _split_line(line)
        if parts is None or not parts[0] or not parts[1]:
            raise LongtailError(
                f"{path}:{lineno}: expected 'path,label' or 'path label', got {line!r}"
            )
        rel, label = parts
        if first and rel.lower() in HEADER_PATHS and label.lower() in HEADER_LABELS:
            first = False
            continue
        first = False
        p = Path(rel).expanduser()
        p = p if p.is_absolute() else base / p
        if not p.is_file():
            skipped.append((str(p), "file not found"))
            continue
        paths.append(str(p))
        names.append(label)
    if not paths and not skipped:
        raise LongtailError(f"list file {str(path)!r} holds no 'path,label' lines")
    return LabelledFiles(paths, names, "list", str(path), skipped)


def read_source(source: str | os.PathLike) -> LabelledFiles:
    """An ImageFolder tree when ``source`` is a folder, else a CSV / list file."""
    p = Path(source).expanduser()
    if p.is_dir():
        return read_image_folder(p)
    if p.is_file():
        return read_labelled_list(p)
    raise LongtailError(
        f"{str(source)!r} not found: give an ImageFolder tree (ROOT/<class>/<image>) or a CSV "
        "/ list file ('path,label' per line)"
    )


def class_names(files: LabelledFiles) -> tuple[list[str], list[str]]:
    """``(names, classes)``: each file's class name and the sorted distinct names.

    Folder classes sort by name (as torchvision's ImageFolder). List labels that are all
    integers sort numerically and are written canonically (``007`` and ``7`` are class ``7``).
    """
    names = list(files.names)
    if files.origin == "list":
        try:
            ints = [int(n) for n in names]
        except ValueError:
            ints = None
        if ints is not None:
            return [str(v) for v in ints], [str(v) for v in sorted(set(ints))]
    return names, sorted(set(names))
