"""``--sort-into DIR``: every image linked (or copied) into a folder per prototype.

``DIR/prototype-0007/<relative path with / replaced by __>``: the relative path keeps names from
different class folders apart. A marker file makes a re-run safe: a folder that holds it was
written by swavctl, and its ``prototype-*`` folders are replaced; any other non-empty folder is
refused rather than mixed into.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from swavctl.errors import UserError
from swavctl.errors.messages import output_is_file, output_not_writable

MARKER = ".swavctl-sort-into"


def folder_name(prototype: int, num_prototypes: int) -> str:
    digits = max(4, len(str(num_prototypes - 1)))
    return f"prototype-{prototype:0{digits}d}"


class Sorter:
    """Places images into ``root/prototype-NNNN/`` as symbolic links (default) or copies."""

    def __init__(self, root: Path, num_prototypes: int, *, copy: bool) -> None:
        self.root = root.expanduser()
        self.num_prototypes = num_prototypes
        self.copy = copy
        self.placed = 0
        self._names: dict[int, set[str]] = {}
        self._prepare()

    def _prepare(self) -> None:
        root = self.root
        if root.exists() and not root.is_dir():
            raise UserError(output_is_file(root, "--sort-into"))
        try:
            root.mkdir(parents=True, exist_ok=True)
            entries = [p for p in root.iterdir() if p.name != MARKER]
            if entries and not (root / MARKER).exists():
                raise UserError(
                    f"--sort-into {root} is not empty and was not written by swavctl; "
                    "choose an empty or new folder"
                )
            for entry in entries:
                if entry.name.startswith("prototype-") and entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
            (root / MARKER).write_text("written by swavctl inspect-clusters --sort-into\n")
        except OSError as exc:
            raise UserError(output_not_writable(root, exc.strerror or exc, "--sort-into")) from None

    def place(self, source: Path, relative: Path, prototype: int) -> None:
        folder = self.root / folder_name(prototype, self.num_prototypes)
        names = self._names.get(prototype)
        if names is None:
            folder.mkdir(exist_ok=True)
            names = self._names[prototype] = set()
        name = "__".join(relative.parts)
        stem, suffix, n = Path(name).stem, Path(name).suffix, 1
        while name in names:  # "a/b__c.png" and "a__b/c.png" would meet
            n += 1
            name = f"{stem}~{n}{suffix}"
        names.add(name)
        target = folder / name
        try:
            if self.copy:
                shutil.copy2(source, target)
            else:
                os.symlink(source.resolve(), target)
        except OSError as exc:
            raise UserError(f"--sort-into: cannot place {target}: {exc.strerror or exc}") from None
        self.placed += 1
