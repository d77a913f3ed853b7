#!/usr/bin/env python3
"""Where a small C-STORE's time goes on dicomagent's event loop, with no network and no sender.

A measuring stick for developers, like ``floor.py``, not a comparison with other nodes. It
starts a real ``Agent`` (fsync off, in a temporary data dir), gives one association a
stand-in transport, and feeds it, as bytes, what a serial sender would send for each object
of ``bench/store.py``'s small workload: a P-DATA-TF with the C-STORE-RQ command, then one
with the data set. Around three steps of each object it reads the event loop thread's CPU
time (``time.thread_time_ns``, system calls included):

- command: the Upper Layer and DIMSE assembly of the command PDU, decoding the command,
  opening the data set's sink (a temporary file taken from the spares that the indexer
  process makes);
- data: the data set PDU, the file write, the header walk and check, the link into the
  archive, the hand-over to the indexer, the C-STORE-RSP encoded and handed to the transport;
- after: the event loop's turn once the response is out (``make_spare``, which makes a
  temporary file only where the indexer process cannot: creating one costs several times
  more on a file system where many files were deleted in the last minutes; the script
  measures that first and warns).

What it leaves out is what every server pays alike on a socket (receiving, sending, being
woken) and the sender's own turn, which make ``bench/store.py`` figures scatter by several
per cent: the per-object work that is dicomagent's own is what is left, and ``--against REV``
compares it between two trees in alternating passes (up to the response, and in all: "after"
depends on the file system's state more than on the code). The indexer process runs as in the
daemon; when responses wait for it (back-pressure), or the spares it makes run low (this feed
has none of a sender's pauses), the wait is outside the timed steps.

    python3 bench/hotpath.py [--corpus DIR] [--passes 5] [--against REV]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import store as bench  # noqa: E402 - bench/store.py: the corpus, the revision trees

#: Objects sent before the timed ones: first-use costs (imports, the indexer process, the
#: archive's first directories) stay out of the figures.
WARM_UP = 100


def load_objects(corpus_dir: str) -> list[tuple[str, str, str, bytes]]:
    """(SOP Class UID, SOP Instance UID, transfer syntax, data set bytes) of each file."""
    from dicomagent.store import read_local_file
    objects = []
    for path in sorted(Path(corpus_dir).rglob("*.dcm")):
        local = read_local_file(str(path))
        objects.append((local.sop_class_uid, local.sop_instance_uid, local.transfer_syntax,
                        path.read_bytes()[local.data_offset:]))
    return objects


class StandInTransport:
    """What ``ULTransport`` asks of an asyncio transport; keeps what is written."""

    def __init__(self):
        self.written: list[bytes] = []

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 104) if name == "peername" else default

    def write(self, data) -> None:
        self.written.append(bytes(data))

    def writelines(self, buffers) -> None:
        self.written.append(b"".join(buffers))

    def close(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False


async def one_pass(corpus_dir: str, work: str) -> dict:
    """Feed the workload to a fresh Agent whose data dir is made in ``work`` (left there:
    see ``main``); CPU microseconds per object of each step."""
    from dicomagent.config import load_config
    from dicomagent.dimse.commands import C_STORE_RQ, decode_command, encode_command
    from dicomagent.server import Agent
    from dicomagent.ul.negotiation import ProposedContext, accepted_contexts, build_associate_rq
    from dicomagent.ul.pdu import decode_pdu, p_data_tf_header

    objects = load_objects(corpus_dir)
    config_path = Path(work) / "agent.toml"
    config_path.write_text("[agent]\nlog_contexts = false\n[storage]\nfsync = false\n"
                           "min_free_mb = 1\non_duplicate = \"replace\"\n")
    config = load_config(config_path)
    config.agent.data_dir = str(Path(work) / "data")
    agent = Agent(config)
    transport = StandInTransport()
    ul = agent._new_connection()
    ul.connection_made(transport)
    pairs = sorted({(sop_class, syntax) for sop_class, _, syntax, _ in objects})
    rq = build_associate_rq("HOTPATH", config.agent.ae_title,
                            [ProposedContext(sop_class, (syntax,))
                             for sop_class, syntax in pairs])
    ul.data_received(rq.encode())
    ac = decode_pdu(memoryview(transport.written[-1]))
    context_of = {(c.abstract_syntax, c.transfer_syntax): c.context_id
                  for c in accepted_contexts(rq, ac).values()}
    pdus = []
    for number, (sop_class, sop_instance, syntax, data_set) in enumerate(objects, 1):
        context_id = context_of[(sop_class, syntax)]
        command = encode_command(C_STORE_RQ(AffectedSOPClassUID=sop_class,
                                            MessageID=number % 0xFFFF or 1,
                                            AffectedSOPInstanceUID=sop_instance))
        pdus.append((p_data_tf_header(context_id, 3, len(command)) + command,
                     p_data_tf_header(context_id, 2, len(data_set)) + data_set))
    feed, cpu = ul.data_received, time.thread_time_ns
    totals = [0, 0, 0]
    answered_before = len(transport.written)
    for number, (command_pdu, data_pdu) in enumerate(pdus):
        if number == WARM_UP:
            totals = [0, 0, 0]
        start = cpu()
        feed(command_pdu)
        fed_command = cpu()
        feed(data_pdu)
        fed_data = cpu()
        await asyncio.sleep(0)          # the loop's turn after the response
        after = cpu()
        totals[0] += fed_command - start
        totals[1] += fed_data - fed_command
        totals[2] += after - fed_data
        while len(transport.written) - answered_before < number + 1 - 64:
            await asyncio.sleep(0.002)  # back-pressure: wait, untimed, for the index
        waited = 0
        while (len(agent.archive._spares) < 16 and waited < 500
               and getattr(agent.archive._indexer, "makes_spares", False)):   # older trees
            await asyncio.sleep(0.002)  # wait, untimed, for spares (when they come)
            waited += 1
    while len(transport.written) - answered_before < len(pdus):
        await asyncio.sleep(0.002)
    statuses = [decode_command(response[12:]).Status
                for response in transport.written[answered_before:]]
    if len(statuses) != len(pdus) or any(statuses):
        raise SystemExit(f"{len(statuses)} responses for {len(pdus)} objects, "
                         f"{sum(1 for status in statuses if status)} not Success")
    agent.archive.close()
    timed = len(pdus) - WARM_UP
    steps = {name: total / timed / 1000
             for name, total in zip(("command", "data", "after"), totals)}
    steps["total"] = sum(steps.values())
    steps["objects"] = timed
    return steps


def run_pass(tree: Path, corpus_dir: str, work: Path) -> dict:
    """One pass in a process of its own, dicomagent imported from ``tree``."""
    env = bench.with_tree(dict(os.environ), tree)
    work.mkdir()
    out = subprocess.run([sys.executable, __file__, "--one-pass", corpus_dir, str(work)], env=env,
                         capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise SystemExit(f"pass failed ({tree}):\n{out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", metavar="DIR",
                        help="bench/store.py's corpus folder: its small workload is reused, or "
                             "made there (default: made in the working directory, and removed)")
    parser.add_argument("--small", type=int, default=2000, help="objects (default 2000)")
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--against", metavar="REV",
                        help="alternate with the tree of git revision REV")
    parser.add_argument("--one-pass", nargs=2, metavar=("CORPUS", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_pass:
        import uvloop
        print(json.dumps(uvloop.run(one_pass(*args.one_pass))))
        return 0
    trees = {"this tree": bench.REPO}
    # Every pass's data dir stays until the end: files deleted a moment ago make creating
    # new ones several times slower on ext4 without a journal (see bench/README.md), and
    # the next pass would pay for the last one's clean-up.
    with tempfile.TemporaryDirectory(prefix="bench-hotpath-") as work:
        corpus_root = Path(args.corpus) if args.corpus else Path(work) / "corpus"
        corpus = bench.prepare_corpus(corpus_root, {"small": args.small})["small"]
        bench.check_file_creation(Path(work), "'after' (making the next temporary file) "
                                              "will be inflated")
        if args.against:
            trees[f"@{args.against}"] = bench.extract_revision(args.against, Path(work))
        results: dict[str, list[dict]] = {name: [] for name in trees}
        for number in range(args.passes):
            for name, tree in (list(trees.items()) if number % 2 == 0
                               else list(reversed(trees.items()))):
                steps = run_pass(tree, corpus["path"],
                                 Path(work) / f"pass{number}-{list(trees).index(name)}")
                results[name].append(steps)
                print(f"pass {number + 1} {name:>14}: " + ", ".join(
                    f"{key} {steps[key]:.1f}" for key in ("command", "data", "after", "total"))
                    + " µs", flush=True)
    print(f"\nevent loop CPU per small object, median of {args.passes} passes "
          f"({results['this tree'][0]['objects']} objects each):")
    medians = {name: {key: statistics.median(r[key] for r in runs)
                      for key in ("command", "data", "after", "total")}
               for name, runs in results.items()}
    for name, values in medians.items():
        print(f"hotpath: {name:>14}: " + ", ".join(f"{key} {value:.1f} µs"
                                                   for key, value in values.items()))
    if args.against:
        mine, other = medians["this tree"], medians[f"@{args.against}"]
        to_response = (mine["command"] + mine["data"]) / (other["command"] + other["data"])
        print(f"hotpath: this tree / @{args.against} (below 1: less CPU per object): up to the "
              f"response (command + data) {to_response:.3f}, in all "
              f"{mine['total'] / other['total']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
