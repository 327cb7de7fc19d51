"""torchrun, saying what it waits for and ending a rendezvous that does not complete with one line.

``python train_scripts/launch.py <torchrun arguments> script.py <script arguments>`` (what the launch scripts
``train_scripts/run*.sh`` run) is ``torchrun`` with two additions:

* at start-up, one line says what the launch waits for: the nodes expected, the processes per node and the
  rendezvous address (or that the rendezvous is local, ``--standalone``), and for how long;
* a rendezvous that does not complete within its time (``--rdzv-conf join_timeout=N``; the scripts'
  ``RDZV_TIMEOUT``) or whose address cannot be reached ends with one ``error:`` line naming what is missing and
  what to check, and exit status ``EXIT_RENDEZVOUS`` (8), instead of torchrun's bare ``RendezvousTimeoutError``
  traceback.

Everything else (the workers' exit statuses, torchrun's failure summary) is torchrun's own.
"""

from __future__ import annotations

import socket
import sys
from typing import Optional, Sequence

EXIT_RENDEZVOUS = 8
#: torchrun's default join_timeout of the c10d rendezvous (torch/distributed/elastic/rendezvous)
TORCH_JOIN_TIMEOUT_S = 600


def _conf(args, key: str) -> Optional[str]:
    for part in (getattr(args, "rdzv_conf", "") or "").split(","):
        k, _, v = part.partition("=")
        if k.strip() == key:
            return v.strip()
    return None


def describe(args) -> str:
    """The start-up line: what this launch waits for."""
    nodes = str(args.nnodes)
    procs = args.nproc_per_node
    if args.standalone or (nodes in ("1", "1:1") and not args.rdzv_endpoint):
        return f"launch: 1 node x {procs} process(es), rendezvous on this node (--standalone)"
    wait = _conf(args, "join_timeout") or TORCH_JOIN_TIMEOUT_S
    return (f"launch: waiting for {nodes} node(s) x {procs} process(es) at the rendezvous {args.rdzv_endpoint} "
            f"(backend {args.rdzv_backend}, id {args.rdzv_id}), for up to {wait} s; this node is "
            f"{socket.gethostname()}")


def failure_line(args, error: BaseException) -> str:
    """The one line a rendezvous failure ends with: what is missing and what to check."""
    from torch.distributed.elastic.rendezvous.api import RendezvousTimeoutError

    endpoint, nodes = args.rdzv_endpoint, str(args.nnodes)
    wait = _conf(args, "join_timeout") or TORCH_JOIN_TIMEOUT_S
    check = (f"start the same command on every node with the same MASTER_ADDR / MASTER_PORT ({endpoint}) and NNODES "
             f"({nodes}); check that {endpoint} is reachable from every node (the first node's address, a firewall) "
             "and that no other job uses that port")
    if isinstance(error, RendezvousTimeoutError):
        return (f"error: the rendezvous at {endpoint} did not complete within {wait} s: {nodes} node(s) were expected "
                f"and not all of them joined (this node, {socket.gethostname()}, did). Missing nodes: {check}; or "
                "allow them more time with RDZV_TIMEOUT (seconds)")
    cause = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    return (f"error: the rendezvous at {endpoint} could not be reached or failed ({type(error).__name__}: {cause}); "
            f"{check}")


def main(argv: Optional[Sequence[str]] = None) -> None:
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import parse_args, run

    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    print(describe(args), file=sys.stderr, flush=True)
    try:
        run(args)
    except RendezvousError as e:
        print(failure_line(args, e), file=sys.stderr, flush=True)
        sys.exit(EXIT_RENDEZVOUS)


if __name__ == "__main__":
    main()
