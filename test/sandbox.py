"""A sitecustomize for subprocesses under test: blocks the network and writes outside allowed folders.

Write it as ``sitecustomize.py`` into a folder on the child's ``PYTHONPATH`` and set
``SANDBOX_WRITABLE`` (os.pathsep-separated folders). Violations raise in the child and are listed on
stderr after "SANDBOX VIOLATIONS" at exit.
"""

import textwrap

SANDBOX = textwrap.dedent(
    """
    import atexit, os, socket, sys
    ALLOWED = [os.path.realpath(p) for p in os.environ["SANDBOX_WRITABLE"].split(os.pathsep)]
    VIOLATIONS = []

    def _allowed(path):
        real = os.path.realpath(os.fsdecode(path))
        return real == os.devnull or any(real == a or real.startswith(a + os.sep) for a in ALLOWED)

    def _hook(event, args):
        if event in ("socket.connect", "socket.bind", "socket.getaddrinfo"):
            VIOLATIONS.append(f"network: {event} {args!r}")
            raise PermissionError("network blocked by the test sandbox")
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            mode, flags = args[1] or "r", args[2] or 0
            writing = any(c in str(mode) for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            if writing and not _allowed(args[0]):
                VIOLATIONS.append(f"write outside output/tmp: {args[0]!r}")
                raise PermissionError(f"write blocked by the test sandbox: {args[0]}")
        target = {"os.rename": 1, "os.replace": 1, "os.remove": 0, "os.mkdir": 0, "os.rmdir": 0}.get(event)
        if target is not None and not _allowed(args[target]):
            VIOLATIONS.append(f"{event} outside output/tmp: {args!r}")
            raise PermissionError(f"{event} blocked by the test sandbox")

    sys.addaudithook(_hook)
    atexit.register(lambda: VIOLATIONS and print("SANDBOX VIOLATIONS:", *VIOLATIONS, sep="\\n", file=sys.stderr))
    """
)
