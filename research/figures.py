"""Saving matplotlib figures into run directories that may be open in a viewer or killed mid-write.

No first-party imports: every plotting module (run reports, sweeps, tune studies, the AutoML
plots) uses it.
"""

from __future__ import annotations

import os


def save_figure(figure, path: str | os.PathLike, *, dpi: int = 110) -> str:
    """Saves a matplotlib figure through a temporary file and a rename: a viewer that opens the
    image while a run writes it, or a run killed mid-save, never sees a half-written file (the
    previous image stays until the new one is complete). The format is ``path``'s extension.

    Returns:
      ``path`` as a string.
    """
    path = os.fspath(path)
    fmt = os.path.splitext(path)[1].lstrip(".").lower()
    if not fmt:
        raise ValueError(f"{path!r} has no extension; name the image format, e.g. {path + '.png'!r}")
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp")
    try:
        figure.savefig(tmp, dpi=dpi, format=fmt)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
