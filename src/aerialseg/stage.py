"""How a pipeline stage ends on an error: one line that names the file or key, the traceback on request.

Every `pipeline/*.py` script runs its `main()` through `run_stage`. The library's errors already
name the file, key or value and what was expected; a traceback of ten library frames above
them only hides that line in `dvc repro`'s output. `AERIALSEG_TRACEBACK=1` shows it again.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

TRACEBACK_ENV = "AERIALSEG_TRACEBACK"
"""Set to 1 to see the full traceback of a stage's error."""


def run_stage(main: Callable[[], None]) -> None:
    """Call `main()`; on an error print `<stage>: <message>` to stderr and exit with status 1.

    KeyboardInterrupt and SystemExit pass through untouched (DVC reports an interrupted stage).
    Errors that are not the library's own (a bug) keep their type in the line.
    """
    try:
        main()
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            raise
        stage = Path(sys.argv[0]).stem
        kind = "" if isinstance(err, ValueError | OSError | KeyError) else f"{type(err).__name__}: "
        message = str(err).strip() or type(err).__name__
        print(f"{stage}: {kind}{message}", file=sys.stderr)
        print(f"({TRACEBACK_ENV}=1 shows the traceback)", file=sys.stderr)
        sys.exit(1)
