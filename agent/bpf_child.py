"""The pinned load in a short-lived child process, so the node proxy never maps bcc/LLVM.

Compiling with bcc maps libbcc, libLLVM and libclang into the process for good (in the lab an
agent's RSS was 165 MiB with them, 49 MiB without, PSS 84 -> 32 MiB with two agents sharing them). With a pin directory, everything that needs
bcc (compile, load, configure, attach, pin) is done once by ``python -m nodemesh.agent.bpf_child
'<json>'``, a new interpreter (not a fork of the agent's uvloop process) that exits afterwards;
its attachments and maps stay (pinned; see agent/bpf_loader.py), and the agent opens the pinned
maps with agent/bpf_maps.py.

Protocol: the parent passes the RedirectPrograms arguments as one JSON argument; the child prints
one JSON line on stdout: ``{"ok": true, "adopted_maps": [...], "splice_ready": bool, "log": [...]}``
or ``{"ok": false, "error": "ProgramRejected"|"BpfUnavailable"|"NodemeshError", ...}``, and its
log records ride along in ``log`` so the parent logs them as its own. The parent raises the same
BpfUnavailable / ProgramRejected (same message, same exit code) the in-process load would.
Anything else on the child's stderr (bcc's compiler warnings, a traceback) goes to the agent's.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nodemesh.errors import NodemeshError

if TYPE_CHECKING:
    from nodemesh.agent.bpf_loader import RedirectPrograms

LOAD_TIMEOUT = 300.0  # seconds: bcc compiles in ~5-20 s here; a hung compile must not hang the agent forever


@dataclass(frozen=True)
class Loaded:
    """What the child reports after pinning."""

    adopted_maps: list[str]
    splice_ready: bool


def _args_of(progs: RedirectPrograms) -> dict[str, Any]:
    return {"cgroup_path": progs.cgroup_path, "proxy_ip": progs.proxy_ip, "proxy_port": progs.proxy_port,
            "exempt_cgroup_paths": list(progs.exempt_cgroup_paths), "pin_dir": progs.pin_dir,
            "shortcut": progs.shortcut, "splice": progs.splice_allowed, "spread_ports": list(progs.spread_ports)}


def load_pinned(progs: RedirectPrograms) -> Loaded:
    """Run the child for ``progs`` (which has a pin_dir); raises what its load raised."""
    from nodemesh.agent.bpf_loader import BpfUnavailable, ProgramRejected

    argv = [sys.executable, "-m", __name__, json.dumps(_args_of(progs))]
    try:
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
                              timeout=LOAD_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise BpfUnavailable(f"the BPF loader process did not finish within {LOAD_TIMEOUT:.0f} s (compiling with bcc)") from None
    except OSError as exc:
        raise BpfUnavailable(f"cannot start the BPF loader process {sys.executable}: {exc}") from exc
    try:
        result = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise BpfUnavailable(
            f"the BPF loader process exited with code {proc.returncode} without a result "
            "(its error output is in this log above)"
        ) from None
    for level, name, message in result.get("log", []):
        logging.getLogger(name).log(level, "%s", message)
    if result.get("ok"):
        return Loaded(adopted_maps=list(result["adopted_maps"]), splice_ready=bool(result["splice_ready"]))
    kind, message = result.get("error"), str(result.get("message", ""))
    if kind == "ProgramRejected":
        raise ProgramRejected(result["program"], result["verifier"])
    if kind == "BpfUnavailable":
        raise BpfUnavailable(message)
    raise NodemeshError(message)


class _Records(logging.Handler):
    """Collects the child's log records for the parent."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[tuple[int, str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append((record.levelno, record.name, record.getMessage()))


def main(argv: list[str]) -> int:
    """The child: load and pin, print one JSON result line, exit (0 loaded, 3 refused)."""
    from nodemesh.agent.bpf_loader import BpfUnavailable, ProgramRejected, RedirectPrograms

    records = _Records()
    root = logging.getLogger()
    root.addHandler(records)
    root.setLevel(logging.INFO)
    out: dict[str, Any]
    code = 0
    try:
        args = json.loads(argv[0])
        progs = RedirectPrograms(args.pop("cgroup_path"), args.pop("proxy_ip"), args.pop("proxy_port"),
                                 args.pop("exempt_cgroup_paths"), **args)
        progs.load_here()
        out = {"ok": True, "adopted_maps": progs.adopted_maps, "splice_ready": progs.splice_ready}
        progs.close()  # pinned: lets go; the attachments and pins stay
    except ProgramRejected as exc:
        out, code = {"ok": False, "error": "ProgramRejected", "program": exc.program, "verifier": exc.verifier}, exc.exit_code
    except BpfUnavailable as exc:
        out, code = {"ok": False, "error": "BpfUnavailable", "message": str(exc)}, exc.exit_code
    except NodemeshError as exc:
        out, code = {"ok": False, "error": "NodemeshError", "message": str(exc)}, exc.exit_code
    out["log"] = records.records
    print(json.dumps(out), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
