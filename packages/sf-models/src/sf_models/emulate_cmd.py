"""``streamfusion emulate``: run a torch.distributed program as several machines on one host.

    streamfusion emulate --topology 2x2 --inter-gbps 10 [--inter-latency-us 20] -- CMD ARGS...

Starts CMD once per rank (MACHINES x GPUS ranks). The ranks of machine i run in network
namespace i; the machines are cabled to one switch by links of --inter-gbps per direction
(shared by a machine's ranks, as a NIC is) and --inter-latency-us one way; ranks of one
machine talk over loopback (unshaped unless --intra-gbps). Each rank gets torchrun's
environment (MASTER_ADDR, RANK, LOCAL_RANK, ...), SF_TOPOLOGY and GLOO_SOCKET_IFNAME=eth0.
Each output line is prefixed with its rank. The exit status is 0 when every rank succeeds,
else the first failing rank's (128 + N for a death by signal N); the other ranks are then
stopped after --grace seconds. Needs root (network namespaces); everything it creates is
removed when it ends, however it ends (docs/emulate.md).

Wired into the ``streamfusion`` command by :func:`add_parser`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ._cli_args import UsageError, number_above, topology


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``emulate`` on the ``streamfusion`` sub-command parsers; returns its parser.

    The handler is set with ``set_defaults(fn=run)``: ``args.fn(args)`` returns the exit code
    (Note [Command-line errors] in :mod:`sf_models._cli_args` for the one-line errors).
    """
    p = subparsers.add_parser(
        "emulate",
        help="run a torch.distributed program as several machines: namespaces + shaped links",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--topology", type=topology, required=True, help="MACHINESxGPUS: machines x ranks each"
    )
    p.add_argument(
        "--inter-gbps",
        type=number_above(0),
        required=True,
        help="each machine's NIC, Gbit/s per direction, shared by its ranks",
    )
    p.add_argument(
        "--inter-latency-us",
        type=number_above(0, or_equal=True),
        default=0.0,
        help="one-way latency between two machines, microseconds (default 0)",
    )
    p.add_argument(
        "--intra-gbps",
        type=number_above(0),
        default=None,
        help="loopback rate inside a machine (default: unshaped)",
    )
    p.add_argument(
        "--timeout",
        type=number_above(0),
        default=None,
        help="seconds the whole run may take; then every rank is stopped (exit status 124)",
    )
    p.add_argument(
        "--grace",
        type=number_above(0, or_equal=True),
        default=5.0,
        help="seconds the other ranks get to end after one fails, before they are stopped",
    )
    p.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ARGS", help="the program")
    p.set_defaults(fn=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``args.cmd`` under the emulation; the exit status (see the module docstring)."""
    from sf_comm.emulate import Emulation, EmulationError

    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise UsageError("CMD", "no command to run; put it after --, e.g. -- python prog.py")
    if cmd[0].startswith("-"):
        raise UsageError("CMD", f"unknown option {cmd[0]!r}; put the command after --")
    try:
        with Emulation(
            args.topology,
            inter_gbps=args.inter_gbps,
            inter_latency_us=args.inter_latency_us,
            intra_gbps=args.intra_gbps,
            grace_s=args.grace,
        ) as emu:
            return emu.run(cmd, timeout=args.timeout)
    except EmulationError as exc:
        print(f"streamfusion emulate: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            "streamfusion emulate: interrupted; ranks stopped, namespaces removed", file=sys.stderr
        )
        return 130
