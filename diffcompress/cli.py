"""Entry-point wrapper: user errors end the script with one line on stderr, not a traceback."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

from .errors import UserError

USER_ERRORS = (UserError, ValueError, FileNotFoundError)


def run(main: Callable[[], object]) -> None:
    """Call ``main()``; on a user error print ``error: <message>`` and exit 2 (DIFFCOMPRESS_DEBUG=1 re-raises)."""
    try:
        main()
    except USER_ERRORS as e:
        if os.environ.get("DIFFCOMPRESS_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
