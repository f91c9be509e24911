"""HTTP errors of the server and its structured (one JSON line per error) log."""
from __future__ import annotations

import json
import logging
import time
from collections import deque
from typing import Deque, Optional

log = logging.getLogger("aimass.serve")

# the last errors, shown on the dashboard
RECENT: Deque[dict] = deque(maxlen=50)


class ServeError(Exception):
    """A request failure with its HTTP status; the message names what was wrong and what to do."""

    def __init__(self, status: int, message: str, retry_after: Optional[float] = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


def log_error(event: str, exc, status: Optional[int] = None, **fields) -> dict:
    rec = {"ts": round(time.time(), 6), "level": "error", "event": event}
    if status is not None:
        rec["status"] = status
    rec.update({k: v for k, v in fields.items() if v is not None})
    rec["error"] = str(exc)
    rec["type"] = type(exc).__name__
    RECENT.append(rec)
    log.error(json.dumps(rec, default=str))
    return rec
