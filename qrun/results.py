"""Reading a results.json that may be damaged: a kill or a full disk must not jam its folder."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)


def read_results(path: Path) -> Optional[dict[str, Any]]:
    """The stored results, or None (with a warning) when the file is missing, empty, corrupt or not a mapping.

    None means "not finished": the caller then trains or resumes from its checkpoint, which always survived.
    """
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as error:  # unreadable (permissions) or not text
        log.warning("ignoring %s (%s): treated as not finished", path, error)
        return None
    try:
        results = json.loads(text)
    except json.JSONDecodeError as error:
        log.warning("ignoring %s (%s): treated as not finished", path, "empty" if not text.strip() else error)
        return None
    if not isinstance(results, dict):
        log.warning("ignoring %s (holds a %s, not a mapping): treated as not finished", path, type(results).__name__)
        return None
    return results
