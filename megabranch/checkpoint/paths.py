"""Where the files a checkpoint's metadata names may be: inside the directory that names them.

A step directory may come from a stranger: its meta.json, its shard indexes and the latest/best pointers name
files by path, and a reader must never follow one out of the directory (`../../x`, `/etc/passwd`, a symlink to
`/dev/zero`, which would be read for ever). Every such path is resolved (symlinks included) and refused in one
line unless it stays inside.
"""

from __future__ import annotations

import os

from ..errors import UserError


def contained(root: str, name: str, named_by: str | None = None) -> str:
    """os.path.join(root, name), or a UserError when it resolves to a place outside `root` (or to `root`
    itself). named_by: the file whose content gave `name` (None: the name is the reader's own, e.g. meta.json,
    and only a symlink can lead out)."""
    path = os.path.join(root, name)
    base, real = os.path.realpath(root), os.path.realpath(path)
    if real == base or os.path.commonpath([base, real]) != base:
        what = f"{named_by} names {name!r}, which" if named_by else path
        raise UserError(
            f"{what} resolves to {real}, outside {root}: refused (a checkpoint's files must stay inside its directory)"
        )
    return path
