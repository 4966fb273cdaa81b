"""One error convention for every ``python -m`` entry point.

    if __name__ == "__main__":
        run_main(main)

``main`` keeps raising (tests call it directly and expect the exception); only the process boundary
turns errors into exit statuses:

- a user-input error (``USER_ERRORS``: a bad value or a missing path, which the code raises on purpose
  with a message that says what was wrong and where) -> ``error: <message>`` on stderr, exit status 2,
  no traceback; argparse's own usage errors also exit 2;
- a failure the entry point reports itself (``run_main(..., reported=(JudgeFailed,))``: a remote judge
  that failed after its retries, say) -> ``error: <message>``, exit status 1, no traceback;
- KeyboardInterrupt -> exit status 130 (128 + SIGINT), quietly;
- anything else (a RuntimeError, a bug) keeps its traceback: that is what a bug report needs.

Light on purpose (standard library only): it is imported before the entry point's heavy work.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, NoReturn

# ValueError covers the package's own input errors (train.data.BadRecord, train.make_instruct.ParseError)
# and JSON/Unicode decoding errors; the OSErrors are the ones a wrong path on the command line gives.
USER_ERRORS: tuple[type[BaseException], ...] = (
    ValueError, FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)

EXIT_REPORTED = 1
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def run_main(main: Callable[..., Any], *args: Any,
             reported: tuple[type[BaseException], ...] = ()) -> NoReturn:
    """Call ``main(*args)`` and exit: with its return value if that is an int, else 0 (``None``, or a
    summary dict that tests use). ``USER_ERRORS`` -> ``error: <message>`` on stderr, exit 2; ``reported``
    exception types -> the same message, exit 1; Ctrl-C -> exit 130. Other exceptions propagate.
    """
    try:
        result = main(*args)
    except KeyboardInterrupt:
        sys.exit(EXIT_INTERRUPTED)
    except USER_ERRORS as e:
        _fail(e, EXIT_USER_ERROR)
    except reported as e:
        _fail(e, EXIT_REPORTED)
    sys.exit(result if isinstance(result, int) else 0)


def _fail(e: BaseException, status: int) -> NoReturn:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(status)
