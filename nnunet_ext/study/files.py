"""Files a study writes whole or not at all: a temporary file in the same folder, then ``os.replace``."""
from __future__ import annotations

import json
import os
import tempfile


def write_text_atomically(path: str, text: str) -> str:
    """``path`` replaced in one step (a kill or an error leaves the previous file, or none); returns ``path``."""
    folder = os.path.dirname(path) or '.'
    descriptor, temporary = tempfile.mkstemp(prefix=f'.{os.path.basename(path)}.', suffix='.tmp', dir=folder)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)  # as open() would create it (mkstemp: 0600)
        with os.fdopen(descriptor, 'w', encoding='utf-8') as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
    return path


def write_json_atomically(path: str, document) -> str:
    return write_text_atomically(path, json.dumps(document, indent=2, allow_nan=False) + '\n')
