"""A planner worker process: ``python -m eep_controller.planner.worker``.

Reads frames ``(module, function name, args)`` from stdin, calls that planner function and
writes ``("ok", result)`` or ``("error", message)`` to stdout; exits when stdin closes. Started
and stopped by :mod:`eep_controller.planner.workers`; only functions of this package run.
"""

from __future__ import annotations

import importlib
import sys

from eep_controller.planner.workers import read_frame, send_frame

PACKAGE = "eep_controller.planner."


def serve() -> None:
    """Answer requests until stdin closes."""
    source, sink = sys.stdin.buffer, sys.stdout.buffer
    # results go only through the frames: anything printed would corrupt them
    sys.stdout = sys.stderr
    send_frame(sink, "ready")
    while True:
        try:
            module, name, args = read_frame(source)
        except EOFError:
            return
        try:
            if not module.startswith(PACKAGE):
                raise ValueError(f"{module}.{name} is not a planner function")
            fn = getattr(importlib.import_module(module), name)
            reply: tuple[str, object] = ("ok", fn(*args))
        except Exception as exc:
            reply = ("error", f"{type(exc).__name__}: {exc}")
        send_frame(sink, reply)


if __name__ == "__main__":
    serve()
