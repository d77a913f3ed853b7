"""``dicomagent probe HOST PORT``: the command around ``dicomagent.probe``."""

from __future__ import annotations

import json
import sys

from dicomagent.probe import GROUPS, Probe, to_json, to_markdown, to_table


def add_parser(commands, add_scu_options) -> None:
    probe = commands.add_parser("probe", help="examine a peer: what it accepts and how it "
                                              "answers (a conformance matrix)")
    add_scu_options(probe)
    probe.add_argument("--checks", metavar="LIST",
                       help=f"comma-separated groups: {', '.join(GROUPS)} (default: all but "
                            f"writes; writes needs --allow-writes)")
    probe.add_argument("--allow-writes", action="store_true",
                       help="also store objects, create an MPPS, ask for storage commitment "
                            "(this changes the peer)")
    probe.add_argument("--listen-port", type=int, metavar="PORT",
                       help="accept C-MOVE sub-operations and commitment reports on this port")
    probe.add_argument("--json", metavar="FILE", help="write the results as JSON")
    probe.add_argument("--md", metavar="FILE", help="write the results as Markdown")


def cmd_probe(args) -> int:
    from dicomagent.cli import EXIT_FAILURE_STATUS, EXIT_OK, EXIT_USAGE, _run
    groups = None
    if args.checks:
        groups = tuple(name.strip() for name in args.checks.split(",") if name.strip())
        unknown = [name for name in groups if name not in GROUPS]
        if unknown:
            print(f"dicomagent probe: unknown check group {', '.join(unknown)} "
                  f"(known: {', '.join(GROUPS)})", file=sys.stderr)
            return EXIT_USAGE
        if "writes" in groups and not args.allow_writes:
            print("dicomagent probe: the writes group changes the peer: add --allow-writes",
                  file=sys.stderr)
            return EXIT_USAGE
    probe = Probe(args.host, args.port, args.aet, args.aec, args.timeout, args.allow_writes,
                  args.listen_port, groups)
    _run(probe.run())
    print(to_table(probe))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(to_json(probe), handle, indent=1)
    if args.md:
        with open(args.md, "w", encoding="utf-8") as handle:
            handle.write(to_markdown(probe))
    return EXIT_FAILURE_STATUS if probe.failed else EXIT_OK
