#!/usr/bin/env python3
"""Storage throughput benchmark: dicomagent beside DCMTK storescp and Orthanc.

Generates a synthetic corpus, then sends it with DCMTK's ``storescu`` (one association per
run, the same command for every server) to each server in turn, on 127.0.0.1:

- ``dicomagent serve`` with ``storage.fsync = false`` and with ``storage.fsync = true``;
- DCMTK ``storescp`` (single process, no fsync);
- the same ``storescp`` with a flush per object ("storescp-fsync"): run under
  ``bench/flushclose.c`` (an LD_PRELOAD library, built here with gcc), which fsyncs every
  file it writes as it closes it: what a C++ SCP pays for the durability dicomagent gives
  with fsync on (the file's data and size; its directory entry only where fsync of a new
  file writes that too, as on ext4 without a journal);
- Orthanc (Debian package ``orthanc``; its default ``SyncStorageArea`` fsyncs every file);
- when named in ``--servers`` only: ``bench/floor.py`` ("python-floor", "python-floor-fsync"),
  the least a Python SCP can do per C-STORE (write the data set, answer), a measuring stick
  for how much of a gap is Python's and how much dicomagent's own work.

Workloads: "ct", 300 CT Image Storage objects of 512x512 16-bit (about 157 MB, one study), and
"small", 2,000 Secondary Capture objects of a few KiB (64x64 8-bit) over a few studies. It
prints objects/s, MB/s (10^6 bytes of the Part 10 files sent) and the server's CPU seconds,
median over the rounds, and the ratios of dicomagent to storescp and to Orthanc.

    python3 bench/store.py [--ct 300] [--small 2000] [--rounds 3] [--corpus DIR]
                           [--servers LIST] [--json FILE] [--quick] [--keep-logs DIR]
                           [--against REV] [--against-python PATH]

``--against REV`` runs dicomagent as of another git revision beside each dicomagent slot
chosen ("dicomagent-nofsync@REV", ...) and prints the ratio of the two: whether a change made
storing faster, measured the way the figures above are (fresh servers, rounds rotated).
``--against-python PATH`` does the same with this tree run by another Python interpreter
(another build of Python 3.11, say: it needs dicomagent's dependencies installed).

Every run starts its server afresh on an empty storage directory and checks afterwards
that the server holds every object of the workload (storescu exit 0 and the server's own
count): a run that loses an object fails the benchmark. Before each timed run the first
object of the workload is sent once on its own association (the timed run replaces it:
``on_duplicate = "replace"``, ``OverwriteInstances``), so that nobody's first-use costs
land in the figures. Servers take turns in an order rotated every round, and after each
run the file system is synced, so that write-back of one run does not slow the next, and
(as root) the page cache is dropped and the workload read back in before the next one
(``fresh_page_cache``; ``--keep-cache`` does not).

Storage directories are kept until the end (about rounds x servers x corpus size on
disk), not removed after each run: ext4's inode allocator skips inodes freed in the last
minutes (``recently_deleted``), so after thousands of deletions creating a file costs
about a millisecond of kernel time, more than a small C-STORE itself, and the figures
drift from round to round. ``--delete-each`` removes them after each run instead (chosen
by itself when the disk is short). The same holds for whatever was deleted on that file
system just before the benchmark (a test run, the last benchmark's clean-up): before its
first run it times creating a few hundred files in its working directory and warns when
that costs several times what it costs on a quiet file system (``file_creation_cost``;
``TMPDIR`` chooses where the working directory is).

Timing is the wall clock of the ``storescu`` process (start, scan of the folder, the
association, release); for dicomagent, which acknowledges an object once its file is in
place and indexes it just after, the clock runs until its index lists every object (so
its figures include indexing, as Orthanc's do). Server CPU is utime+stime of the server
process and its children (dicomagent's indexer process), all their threads, from
/proc/PID/stat, read just before the timed ``storescu`` and just after the run.

Needs pydicom and numpy (for the corpus), DCMTK (``storescu``, ``storescp``) and Orthanc.
Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from _process import BenchError, CLOCK_TICKS, HOST, ServerProcess, free_port, stop_on_sigterm

REPO = Path(__file__).resolve().parent.parent
CORPUS_VERSION = 1          # bump when the generator changes: a reused --corpus is regenerated
CALLING_AE_TITLE = "BENCHSCU"
ORTHANC = "/usr/sbin/Orthanc"

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
SECONDARY_CAPTURE_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"

#: Server slots, in the order of the table. ``kind`` picks how it is started and counted.
SERVERS = {
    "dicomagent-nofsync": {"kind": "dicomagent", "label": "dicomagent (fsync off)", "fsync": False},
    "dicomagent-fsync": {"kind": "dicomagent", "label": "dicomagent (fsync on)", "fsync": True},
    "storescp": {"kind": "storescp", "label": "DCMTK storescp"},
    "storescp-fsync": {"kind": "storescp", "label": "storescp + fsync/file", "flush": True},
    "orthanc": {"kind": "orthanc", "label": "Orthanc"},
    # Not run unless named in --servers: bench/floor.py, a measuring stick (see there).
    "python-floor": {"kind": "floor", "label": "Python floor", "fsync": False, "default": False},
    "python-floor-fsync": {"kind": "floor", "label": "Python floor + fsync", "fsync": True,
                           "default": False},
}
WORKLOADS = ("ct", "small")
#: storescp-fsync's flush library: its source, and where ``build_flush_library`` put it.
FLUSH_SOURCE = REPO / "bench" / "flushclose.c"
FLUSH_LIBRARY: Path | None = None


# --- the corpus ---------------------------------------------------------------------------


def _uid_factory(seed: int):
    """Deterministic UUID-derived UIDs (PS3.5 §B.2: ``2.25.`` + a 128-bit integer)."""
    import uuid

    counter = iter(range(1, 1 << 62))
    namespace = uuid.uuid5(uuid.NAMESPACE_URL, f"dicomagent/bench/store/{seed}")

    def make() -> str:
        return "2.25.%d" % uuid.uuid5(namespace, str(next(counter))).int

    return make


def _base_dataset(sop_class: str, sop_instance: str, study: dict, series: dict):
    """The patient, study, series and SOP common attributes every object shares."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = "2.25.31898174427430335436414862612934311681"
    meta.ImplementationVersionName = "DA_BENCH_STORE"
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = study["image_type"]
    ds.InstanceCreationDate = study["date"]
    ds.InstanceCreationTime = study["time"]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_instance
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = study["date"]
    ds.StudyTime = ds.SeriesTime = study["time"]
    ds.AccessionNumber = study["accession"]
    ds.Modality = series["modality"]
    ds.Manufacturer = "dicomagent bench"
    ds.InstitutionName = "Synthetic General Hospital"
    ds.ReferringPhysicianName = "Referrer^Rita"
    ds.StationName = "BENCH01"
    ds.StudyDescription = study["description"]
    ds.SeriesDescription = series["description"]
    ds.ManufacturerModelName = "bench/store.py"
    ds.PatientName = study["patient_name"]
    ds.PatientID = study["patient_id"]
    ds.PatientBirthDate = study["birth_date"]
    ds.PatientSex = study["sex"]
    ds.PatientAge = study["age"]
    ds.StudyInstanceUID = study["uid"]
    ds.SeriesInstanceUID = series["uid"]
    ds.StudyID = study["id"]
    ds.SeriesNumber = series["number"]
    return ds


def _save(ds, path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path.stat().st_size


def generate_ct(directory: Path, count: int) -> dict:
    """``count`` axial CT slices of one series: 512x512, 16-bit signed, Explicit VR LE."""
    import numpy as np

    uid = _uid_factory(1)
    rng = np.random.default_rng(20240601)
    study = {
        "uid": uid(), "date": "20240601", "time": "101500", "accession": "BENCHCT0001",
        "description": "CT CHEST ABDOMEN PELVIS W/O CONTRAST", "patient_name": "Bench^Ct^Patient",
        "patient_id": "BENCH-CT-0001", "birth_date": "19640229", "sex": "F", "age": "060Y",
        "id": "1001", "image_type": ["ORIGINAL", "PRIMARY", "AXIAL"],
    }
    series = {"uid": uid(), "modality": "CT", "description": "Axial 1.25mm STANDARD", "number": 2}
    frame_of_reference = uid()
    rows = columns = 512
    spacing = 0.78125
    # A body-shaped ellipse of soft tissue (~40 HU) in air (-1000 HU), stored with
    # RescaleIntercept -1024, plus a little noise that changes from slice to slice.
    y, x = np.mgrid[0:rows, 0:columns]
    body = ((x - 256) / 230.0) ** 2 + ((y - 270) / 170.0) ** 2 <= 1.0
    base = np.where(body, 1064, 24).astype(np.int16)
    total = 0
    for i in range(count):
        sop_instance = uid()
        ds = _base_dataset(CT_IMAGE_STORAGE, sop_instance, study, series)
        ds.FrameOfReferenceUID = frame_of_reference
        ds.PositionReferenceIndicator = ""
        ds.BodyPartExamined = "CHEST"
        ds.SliceThickness = "1.25"
        ds.KVP = "120"
        ds.DataCollectionDiameter = "500"
        ds.ReconstructionDiameter = "400"
        ds.GantryDetectorTilt = "0"
        ds.TableHeight = "150"
        ds.RotationDirection = "CW"
        ds.ExposureTime = "500"
        ds.XRayTubeCurrent = "250"
        ds.Exposure = "125"
        ds.ConvolutionKernel = "STANDARD"
        ds.PatientPosition = "FFS"
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = i + 1
        z = -100.0 - 1.25 * i
        ds.ImagePositionPatient = [-200.0, -200.0, z]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.SliceLocation = f"{z:.2f}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = columns
        ds.PixelSpacing = [spacing, spacing]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.WindowCenter = "40"
        ds.WindowWidth = "400"
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        noise = rng.integers(-20, 21, size=(rows, columns), dtype=np.int16)
        ds.PixelData = (base + noise).tobytes()
        ds["PixelData"].VR = "OW"
        total += _save(ds, directory / f"CT{i + 1:05d}.dcm")
    return {"objects": count, "bytes": total, "studies": 1, "study_uid": study["uid"],
            "sop_class": CT_IMAGE_STORAGE, "what": "CT Image Storage 512x512 16-bit"}


def generate_small(directory: Path, count: int, studies: int = 8, series_per_study: int = 2) -> dict:
    """``count`` Secondary Capture objects of 64x64 8-bit (~5 KiB each), over a few studies."""
    import numpy as np

    uid = _uid_factory(2)
    rng = np.random.default_rng(20240602)
    studies = max(1, min(studies, count))
    groups = []
    for s in range(studies):
        study = {
            "uid": uid(), "date": f"202406{s % 28 + 1:02d}", "time": "083000",
            "accession": f"BENCHSC{s + 1:04d}", "description": "Screen captures",
            "patient_name": f"Bench^Small^{s + 1}", "patient_id": f"BENCH-SC-{s + 1:04d}",
            "birth_date": "19800101", "sex": "O", "age": "044Y", "id": str(2000 + s),
            "image_type": ["DERIVED", "SECONDARY"],
        }
        for k in range(series_per_study):
            groups.append((study, {"uid": uid(), "modality": "OT",
                                   "description": f"Captures {k + 1}", "number": 100 + k}))
    total = 0
    for i in range(count):
        study, series = groups[i % len(groups)]
        sop_instance = uid()
        ds = _base_dataset(SECONDARY_CAPTURE_IMAGE_STORAGE, sop_instance, study, series)
        ds.ConversionType = "WSD"
        ds.InstanceNumber = i // len(groups) + 1
        ds.PatientOrientation = ""
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = 64
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        ds.PixelData = rng.integers(0, 256, size=(64, 64), dtype=np.uint8).tobytes()
        ds["PixelData"].VR = "OB"
        series_dir = directory / f"study{study['id']}" / f"series{series['number']}"
        total += _save(ds, series_dir / f"SC{i + 1:05d}.dcm")
    return {"objects": count, "bytes": total, "studies": studies,
            "sop_class": SECONDARY_CAPTURE_IMAGE_STORAGE, "what": "Secondary Capture 64x64 8-bit"}


GENERATORS = {"ct": generate_ct, "small": generate_small}


def prepare_corpus(root: Path, sizes: dict[str, int]) -> dict[str, dict]:
    """Each workload's folder under ``root``, generated unless a matching one is there.

    ``root/manifest.json`` records what was generated; the workload folders hold only
    DICOM files (storescu scans them whole).
    """
    root.mkdir(parents=True, exist_ok=True)
    manifest_path = root / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        manifest = {}
    if manifest.get("version") != CORPUS_VERSION:
        manifest = {"version": CORPUS_VERSION, "workloads": {}}
    result = {}
    for name, count in sizes.items():
        directory = root / name
        entry = manifest["workloads"].get(name)
        on_disk = sum(1 for p in directory.rglob("*.dcm")) if directory.is_dir() else 0
        if entry and entry["objects"] == count and on_disk == count:
            print(f"corpus {name}: reusing {count} objects in {directory}", flush=True)
        else:
            if directory.exists():
                if not entry and any(directory.iterdir()):
                    raise BenchError(f"{directory} exists and was not made by this script; "
                                     f"choose another --corpus")
                shutil.rmtree(directory)
            start = time.perf_counter()
            print(f"corpus {name}: generating {count} objects in {directory} ...", end="", flush=True)
            entry = GENERATORS[name](directory, count)
            print(f" {entry['bytes'] / 1e6:.1f} MB in {time.perf_counter() - start:.1f} s", flush=True)
            manifest["workloads"][name] = entry
            manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
        result[name] = dict(entry, path=str(directory), first=str(min(directory.rglob("*.dcm"))))
    return result


# --- the servers --------------------------------------------------------------------------


#: Straight to 127.0.0.1, whatever http_proxy says.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_get_json(url: str, timeout: float):
    with _HTTP.open(url, timeout=timeout) as response:
        return json.load(response)


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (proc(5): /proc/stat "cpu")."""
    with open("/proc/stat", "rb") as handle:
        fields = handle.readline().split()[1:]
    user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / CLOCK_TICKS


def build_flush_library(workdir: Path) -> Path:
    """Compile ``bench/flushclose.c`` (see its header) for storescp-fsync."""
    target = workdir / "flushclose.so"
    out = subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", str(target), str(FLUSH_SOURCE),
                          "-ldl"], capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise BenchError(f"gcc could not build {FLUSH_SOURCE.name}:\n{out.stderr.strip()}")
    return target


def with_tree(env: dict[str, str], tree: Path) -> dict[str, str]:
    """``env`` with ``tree`` first on PYTHONPATH: dicomagent runs from the checkout this script
    is in (or, for --against, the revision's tree), not from an older install."""
    return dict(env, PYTHONPATH=os.pathsep.join(filter(None, [str(tree), env.get("PYTHONPATH")])))


class Server(ServerProcess):
    """One server process, started afresh for one run on an empty storage directory."""

    def __init__(self, slot: str, workdir: Path, run_id: str, env: dict[str, str],
                 cpus: set[int] | None, max_pdu: int | None):
        self.slot = slot
        self.spec = SERVERS[slot]
        self.kind = self.spec["kind"]
        self.dir = workdir / f"{slot}-{run_id}"
        self.dir.mkdir()
        self.storage = self.dir / "data"
        self.port = free_port()
        self.http_port = 0
        self._http_ok = self.kind != "orthanc"
        self.ae_title, argv, env = getattr(self, f"_{self.kind}")(env, max_pdu)
        super().__init__(slot, argv, self.port, self.dir, env, cpus,
                         log_path=self.dir / "server.log")

    # How each kind is started: (AE title, argv, environment).

    def _dicomagent(self, env, max_pdu):
        config = self.dir / "dicomagent.toml"
        config.write_text(
            "[agent]\nlog_contexts = false\n"
            + (f"max_pdu_length = {max_pdu}\n" if max_pdu else "")
            + f"\n[storage]\nfsync = {'true' if self.spec['fsync'] else 'false'}\n"
            "min_free_mb = 1\non_duplicate = \"replace\"\n")
        env = with_tree(env, self.spec.get("tree", REPO))
        python = self.spec.get("python", sys.executable)
        return "DICOMAGENT", [python, "-m", "dicomagent", "serve", "--host", HOST,
                              "--port", str(self.port), "--data-dir", str(self.storage),
                              "-c", str(config)], env

    def _storescp(self, env, max_pdu):
        self.storage.mkdir()
        pdu = ["-pdu", str(max_pdu)] if max_pdu else []
        if self.spec.get("flush"):
            env = dict(env, LD_PRELOAD=str(FLUSH_LIBRARY), FLUSHCLOSE_COUNT=str(self.dir / "flushed"))
        return "STORESCP", ["storescp", "-aet", "STORESCP", *pdu, "-od", str(self.storage),
                            str(self.port)], env

    def _floor(self, env, max_pdu):
        env = with_tree(env, REPO)
        return "FLOOR", [sys.executable, str(REPO / "bench" / "floor.py"), "--port", str(self.port),
                         "--dir", str(self.storage), *(["--fsync"] if self.spec["fsync"] else [])], env

    def _orthanc(self, env, max_pdu):
        self.http_port = free_port()
        config = {
            "Name": f"bench-{self.dir.name}",
            "StorageDirectory": str(self.storage),
            "IndexDirectory": str(self.storage),
            "DicomAet": "ORTHANC",
            "DicomPort": self.port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "StorageCompression": False,
            "HttpServerEnabled": True,
            "Plugins": [],
            "DicomAlwaysAllowStore": True,
            "OverwriteInstances": True,
            "DicomScpTimeout": 30,
            "ConcurrentJobs": 2,
            "SyncStorageArea": True,          # Orthanc's default since 1.7.4, spelt out
        }
        if max_pdu:
            config["MaximumPduLength"] = max_pdu
        path = self.dir / "orthanc.json"
        path.write_text(json.dumps(config, indent=1) + "\n")
        return "ORTHANC", [ORTHANC, str(path)], env

    # Readiness, counting, stopping.

    def ready(self) -> bool:
        """For Orthanc, its REST API answers first (objects are counted through it);
        then the DICOM port takes a connection."""
        if not self._http_ok:
            try:
                self._http_ok = "Version" in http_get_json(f"http://{HOST}:{self.http_port}/system", 1)
            except ValueError:              # an answer, not JSON yet (URLError is an OSError)
                return False
        return self._http_ok and super().ready()

    def flushes(self) -> int:
        """storescp-fsync: the files its flush library has flushed so far."""
        try:
            return int((self.dir / "flushed").read_text())
        except (OSError, ValueError):
            return 0

    def count_live(self) -> int:
        """Objects the running server holds, by its own account."""
        if self.kind in ("storescp", "floor"):
            return sum(1 for p in self.storage.iterdir() if p.is_file())
        if self.kind == "orthanc":
            return int(http_get_json(f"http://{HOST}:{self.http_port}/statistics", 30)["CountInstances"])
        return sum(1 for p in (self.storage / "archive").rglob("*.dcm"))

    def wait_indexed(self, expected: int, timeout: float = 120.0) -> float:
        """dicomagent only: wait until its index lists ``expected`` instances (it indexes
        just after acknowledging); returns the ``time.perf_counter()`` when it did."""
        deadline = time.monotonic() + timeout
        path = self.storage / "index.sqlite"
        while True:
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
            try:
                (count,) = db.execute("SELECT count(*) FROM instances").fetchone()
            finally:
                db.close()
            if count >= expected:
                return time.perf_counter()
            if time.monotonic() > deadline:
                raise BenchError(f"{self.slot}: the index lists {count} of {expected} "
                                 f"instances {timeout} s after the run")
            time.sleep(0.001)

    def count_index(self) -> int:
        """dicomagent only, after ``stop``: instances in the index (``dicomagent ls``)."""
        env = with_tree(dict(os.environ), self.spec.get("tree", REPO))
        out = subprocess.run([sys.executable, "-m", "dicomagent", "ls", "--data-dir", str(self.storage),
                              "--level", "instance", "--json"], capture_output=True, text=True,
                             env=env, timeout=120)
        if out.returncode != 0:
            raise BenchError(f"dicomagent ls failed ({out.returncode}): {out.stderr.strip()}")
        return len(json.loads(out.stdout))

    def problems(self) -> list[str]:
        """Log lines that say something went wrong."""
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return []
        if self.kind == "orthanc":
            # glog format, "E1127 11:32:26.355954 file.cpp:1] ...": Orthanc logs its ordinary
            # start-up messages at W, so only E (error) and F (fatal) count.
            return [l for l in lines if l[:1] in "EF" and l[1:5].isdigit()]
        if self.kind == "storescp":
            # The warm-up object comes again in the timed run: that overwrite is expected.
            return [l for l in lines if l[:3] in ("W: ", "E: ", "F: ")
                    and "already exists, overwriting" not in l]
        return [l for l in lines if any(m in l for m in (" WARNING ", " ERROR ", " CRITICAL ",
                                                          "Traceback"))]


# --- the sender ---------------------------------------------------------------------------


def storescu_argv(server: Server, path: str) -> list[str]:
    """The one sender command: every file under ``path`` in one association.

    ``+sd +r``: scan the folder recursively. storescu proposes, for each SOP class it
    finds, the uncompressed transfer syntaxes (Explicit VR Little Endian first, one
    presentation context each) and sends every file as it is stored when the peer accepts
    the file's own syntax. It halts on the first failed C-STORE (no ``-nh``). ``-ta``/``-td``:
    a stuck server ends the run instead of hanging it.
    """
    return ["storescu", "-aet", CALLING_AE_TITLE, "-aec", server.ae_title, "-ta", "30", "-td", "120",
            "+sd", "+r", HOST, str(server.port), path]


@dataclass
class Send:
    started: float              # time.perf_counter() when storescu started
    seconds: float
    client_cpu: float
    returncode: int
    stderr: str


def run_storescu(argv: list[str], env: dict[str, str], timeout: float, cpus: set[int] | None) -> Send:
    # Output to a file, not a pipe: nothing can block storescu however much it writes.
    output_file = tempfile.TemporaryFile()
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=output_file,
                            stderr=subprocess.STDOUT,
                            preexec_fn=None if cpus is None else (lambda: os.sched_setaffinity(0, cpus)))
    # Polled with wait4, which also gives storescu's own CPU time (rusage).
    deadline = time.monotonic() + timeout
    try:
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"storescu did not finish within {timeout} s: {' '.join(argv)}")
            time.sleep(0.002)
    except BaseException:
        proc.kill()          # timed out, or the benchmark is being interrupted
        proc.wait()
        output_file.close()
        raise
    seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    output_file.seek(0)
    output = output_file.read().decode(errors="replace")
    output_file.close()
    return Send(start, seconds, usage.ru_utime + usage.ru_stime, proc.returncode, output)


# --- one run ------------------------------------------------------------------------------


@dataclass
class Run:
    slot: str
    workload: str
    round: int
    objects: int
    bytes: int
    seconds: float
    server_user: float
    server_system: float
    client_cpu: float
    other_cpu: float
    problems: list[str] = field(default_factory=list)

    @property
    def server_cpu(self) -> float:
        return self.server_user + self.server_system

    @property
    def objects_per_second(self) -> float:
        return self.objects / self.seconds

    @property
    def mb_per_second(self) -> float:
        return self.bytes / self.seconds / 1e6


DROP_CACHES = Path("/proc/sys/vm/drop_caches")


#: Microseconds to create an empty file above which the working directory's file system
#: is taken as slowed by recent deletions (about 10 on a quiet one on this project's machines).
SLOW_FILE_CREATION_US = 40.0


def file_creation_cost(workdir: Path, count: int = 300) -> float:
    """Median microseconds to create an empty file in ``workdir`` (the files stay: they
    go with the working directory at the end, not now, which would free their inodes)."""
    probe = workdir / "file-creation-probe"
    probe.mkdir()
    times = []
    for n in range(count):
        start = time.perf_counter()
        os.close(os.open(probe / f"f{n}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def check_file_creation(workdir: Path, consequence: str) -> float:
    """Time file creation in ``workdir``, print it, and warn (saying ``consequence``) when
    recent deletions have slowed it; returns the microseconds."""
    cost = file_creation_cost(workdir)
    print(f"creating a file in {workdir}: {cost:.0f} µs", flush=True)
    if cost > SLOW_FILE_CREATION_US:
        print(f"bench: warning: creating a file costs {cost:.0f} µs here, several times what it "
              f"costs on a quiet file system: files were deleted on it in the last minutes "
              f"(ext4 without a journal skips recently freed inodes), and {consequence}. Wait a "
              f"few minutes, or set TMPDIR to another file system.", flush=True)
    return cost


def fresh_page_cache(corpus_dir: str) -> None:
    """Give every run the same page cache: drop it (root only; the earlier runs' files,
    synced, are clean) and read the workload's files back in.

    Otherwise the page cache grows by each run's files, and on a virtual machine whose
    memory the host hands out on first touch, writing into never-used memory costs more
    than into memory freed before: the CT rounds got slower as a benchmark went on
    (storescp 792, 773, 421, 315, 339 objects/s in one 5-round run), for every server.
    """
    try:
        DROP_CACHES.write_text("1\n")
    except OSError:
        return
    for path in sorted(Path(corpus_dir).rglob("*.dcm")):
        path.read_bytes()


def one_run(slot: str, workload: str, round_no: int, corpus: dict, workdir: Path,
            env: dict[str, str], args, server_cpus, client_cpus, keep_logs: Path | None) -> Run:
    info = corpus[workload]
    if args.fresh_cache:
        fresh_page_cache(info["path"])
    server = Server(slot, workdir, f"{workload}-r{round_no}", env, server_cpus, args.max_pdu)
    expected = info["objects"]
    try:
        server.wait_ready()
        if args.warmup:
            warm = run_storescu(storescu_argv(server, info["first"]), env, args.timeout, client_cpus)
            if warm.returncode != 0:
                raise BenchError(f"{slot}: warm-up storescu exit code {warm.returncode}\n"
                                 f"{warm.stderr.strip()}\n{server.log_tail()}")
            if server.kind == "dicomagent":
                server.wait_indexed(1)      # its indexer process starts with the first object
        before, busy_before = server.cpu_times(), machine_busy_seconds()
        sent = run_storescu(storescu_argv(server, info["path"]), env, args.timeout, client_cpus)
        seconds = sent.seconds
        if server.kind == "dicomagent" and sent.returncode == 0:
            # The clock stops when the last object is in the index, not at its response.
            seconds = max(seconds, server.wait_indexed(expected) - sent.started)
        after, busy_after = server.cpu_times(), machine_busy_seconds()
        if sent.returncode != 0:
            raise BenchError(f"{slot} {workload}: storescu exit code {sent.returncode}\n"
                             f"{sent.stderr.strip()[-3000:]}\n{server.log_tail()}")
        if sent.stderr.strip():
            # storescu prints nothing on success without -v: anything here is a warning or error.
            raise BenchError(f"{slot} {workload}: storescu reported:\n{sent.stderr.strip()[-3000:]}")
        held = server.count_live()
        if held != expected:
            raise BenchError(f"{slot} {workload}: the server holds {held} objects after the run, "
                             f"{expected} were sent and acknowledged\n{server.log_tail()}")
        if server.spec.get("flush") and server.flushes() < expected:
            raise BenchError(f"{slot} {workload}: {server.flushes()} files flushed for "
                             f"{expected} objects: the flush library did not take")
    finally:
        code = server.stop()
    if server.kind == "dicomagent":
        indexed = server.count_index()
        if indexed != expected:
            raise BenchError(f"{slot} {workload}: the index lists {indexed} instances after the "
                             f"daemon stopped, {expected} were acknowledged")
        if code != 0:
            raise BenchError(f"{slot}: dicomagent serve exited with code {code} on SIGTERM\n"
                             f"{server.log_tail()}")
    problems = server.problems()
    if keep_logs is not None:
        shutil.copy(server.log_path, keep_logs / f"{server.dir.name}.log")
    if args.delete_each:
        shutil.rmtree(server.dir, ignore_errors=True)
    os.sync()       # the next run must not pay for this one's write-back
    server_user, server_system = after[0] - before[0], after[1] - before[1]
    # Whatever else the machine did meanwhile: this script, kernel threads (write-back,
    # softirq) and any other process. Large values mean the run shared the CPUs.
    other = busy_after - busy_before - server_user - server_system - sent.client_cpu
    return Run(slot, workload, round_no, expected, info["bytes"], seconds,
               server_user, server_system, sent.client_cpu, max(other, 0.0), problems)


# --- reporting ----------------------------------------------------------------------------


def versions() -> dict[str, str]:
    def first_line(argv, pick=None):
        try:
            out = subprocess.run(argv, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            return "unknown"
        lines = (out.stdout + out.stderr).splitlines()
        for line in lines:
            if pick is None or pick(line):
                return line.strip("$ ").strip()
        return "unknown"

    return {
        "storescu": first_line(["storescu", "--version"], lambda l: l.startswith("$dcmtk:")),
        "storescp": first_line(["storescp", "--version"], lambda l: l.startswith("$dcmtk:")),
        "orthanc": first_line([ORTHANC, "--version"]),
        "python": platform.python_version(),
    }


def summarize(runs: list[Run], slots: list[str], workloads: list[str]) -> dict:
    summary: dict = {}
    for workload in workloads:
        for slot in slots:
            mine = [r for r in runs if r.slot == slot and r.workload == workload]
            if not mine:
                continue
            summary.setdefault(workload, {})[slot] = {
                "objects": mine[0].objects,
                "bytes": mine[0].bytes,
                "objects_per_second": statistics.median(r.objects_per_second for r in mine),
                "mb_per_second": statistics.median(r.mb_per_second for r in mine),
                "seconds": statistics.median(r.seconds for r in mine),
                "server_cpu_seconds": statistics.median(r.server_cpu for r in mine),
                "client_cpu_seconds": statistics.median(r.client_cpu for r in mine),
                "other_cores_busy": statistics.median(r.other_cpu / r.seconds for r in mine),
                "per_round_objects_per_second": [round(r.objects_per_second, 1) for r in mine],
                "log_problems": sum(len(r.problems) for r in mine),
            }
    return summary


RATIOS = [("dicomagent-nofsync", "storescp"), ("dicomagent-fsync", "storescp"),
          ("dicomagent-fsync", "storescp-fsync"),
          ("dicomagent-nofsync", "orthanc"), ("dicomagent-fsync", "orthanc"),
          ("storescp-fsync", "orthanc"),
          ("dicomagent-nofsync", "python-floor"), ("python-floor", "storescp"),
          ("dicomagent-fsync", "python-floor-fsync"), ("python-floor-fsync", "orthanc")]


def ratios(summary: dict) -> dict:
    out: dict = {}
    for workload, table in summary.items():
        for a, b in RATIOS:
            if a in table and b in table:
                out.setdefault(workload, {})[f"{a}/{b}"] = \
                    table[a]["objects_per_second"] / table[b]["objects_per_second"]
    return out


def paired_ratios(runs: list[Run]) -> dict:
    """Each ratio taken within a round (the two servers ran minutes apart at most), then
    the median over the rounds: this VM's speed drifts over a benchmark, and a slow
    stretch that catches one server's run in one round moves a ratio of medians more."""
    rate = {(r.workload, r.slot, r.round): r.objects_per_second for r in runs}
    out: dict = {}
    for workload in dict.fromkeys(r.workload for r in runs):
        rounds = sorted({r.round for r in runs if r.workload == workload})
        for a, b in RATIOS:
            each = [rate[workload, a, n] / rate[workload, b, n] for n in rounds
                    if (workload, a, n) in rate and (workload, b, n) in rate]
            if each:
                out.setdefault(workload, {})[f"{a}/{b}"] = statistics.median(each)
    return out


def print_report(summary: dict, ratio_table: dict, paired: dict, args, corpus: dict) -> None:
    print()
    print(f"storescu -> server on {HOST}, one association per run; median of {args.rounds} "
          f"round(s); MB = 10^6 bytes of Part 10 files")
    for workload in summary:
        info = corpus[workload]
        print(f"  {workload}: {info['objects']} x {info['what']}, {info['bytes'] / 1e6:.1f} MB, "
              f"{info['studies']} stud{'y' if info['studies'] == 1 else 'ies'}")
    print()
    header = f"{'server':<24} {'workload':<8} {'objects/s':>10} {'MB/s':>8} {'seconds':>8} " \
             f"{'server CPU s':>13} {'busy elsewhere':>15}  per round (objects/s)"
    print(header)
    print("-" * len(header))
    for workload, table in summary.items():
        for slot, row in table.items():
            print(f"{SERVERS[slot]['label']:<24} {workload:<8} {row['objects_per_second']:>10.1f} "
                  f"{row['mb_per_second']:>8.1f} {row['seconds']:>8.2f} "
                  f"{row['server_cpu_seconds']:>13.2f} {row['other_cores_busy']:>9.2f} cores  "
                  + " ".join(f"{v:.0f}" for v in row["per_round_objects_per_second"]))
    busiest = max(row["other_cores_busy"] for table in summary.values() for row in table.values())
    if busiest > 0.3:
        print(f"\nnote: up to {busiest:.1f} CPU(s) were busy with other work during the runs "
              f"(\"busy elsewhere\": the whole machine's CPU time less the server's and "
              f"storescu's, per second); the figures are noisier than on a quiet machine")
    print()
    for title, table_of in (("ratios", ratio_table), ("paired by round", paired)):
        if title != "ratios" and args.rounds < 2:
            continue
        for workload, table in table_of.items():
            print(f"{title}, {workload} (objects/s): "
                  + ", ".join(f"{_ratio_name(k)} {v:.2f}" for k, v in table.items()))


def _ratio_name(key: str) -> str:
    return key.replace("dicomagent-nofsync", "dicomagent(fsync off)").replace(
        "dicomagent-fsync", "dicomagent(fsync on)")


# --- main ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ct", type=int, default=None, help="CT objects (default 300; --quick 60)")
    p.add_argument("--small", type=int, default=None, help="small objects (default 2000; --quick 300)")
    p.add_argument("--rounds", type=int, default=None, help="rounds (default 3; --quick 1)")
    p.add_argument("--quick", action="store_true", help="CI smoke run: 60 CT, 300 small, 1 round")
    p.add_argument("--corpus", metavar="DIR", help="generate the corpus here, or reuse the one there")
    p.add_argument("--servers", default=",".join(s for s in SERVERS if SERVERS[s].get("default", True)),
                   help=f"comma-separated subset of {', '.join(SERVERS)} (default all but "
                        "the python-floor ones)")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated subset of ct, small")
    p.add_argument("--max-pdu", type=int, default=0, metavar="BYTES",
                   help="make every server announce this Maximum Length (default: each server's "
                        "own: dicomagent unlimited, storescp and Orthanc 16384)")
    p.add_argument("--keep-cache", dest="fresh_cache", action="store_false",
                   help="do not drop the page cache before each run (see fresh_page_cache; "
                        "dropping needs root)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="do not send the first object once before each timed run")
    p.add_argument("--cpus", choices=("any", "split"), default="any",
                   help="any = no pinning (default); split = storescu on the last CPU, servers on the others")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one storescu run may take")
    p.add_argument("--keep-logs", metavar="DIR", help="copy every server log into DIR")
    p.add_argument("--delete-each", action="store_true",
                   help="remove each run's storage right after it (default: at the end; "
                        "see the module docstring)")
    p.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    p.add_argument("--against", metavar="REV",
                   help="also run dicomagent as of git revision REV beside each dicomagent slot "
                        "chosen (slot@REV), with the ratio of the two: A/B of two trees")
    p.add_argument("--against-python", metavar="PATH",
                   help="also run each dicomagent slot chosen with the Python interpreter PATH "
                        "(slot@python), with the ratio of the two: A/B of two interpreters")
    args = p.parse_args(argv)
    args.ct = args.ct if args.ct is not None else (60 if args.quick else 300)
    args.small = args.small if args.small is not None else (300 if args.quick else 2000)
    args.rounds = args.rounds if args.rounds is not None else (1 if args.quick else 3)
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = [s for s in args.servers if s not in SERVERS] + [w for w in args.workloads if w not in WORKLOADS]
    if unknown:
        p.error(f"unknown server or workload: {', '.join(unknown)}")
    if args.against:
        args.servers = add_revision_slots(args.servers, args.against)
    if args.against_python:
        if not os.access(args.against_python, os.X_OK):
            p.error(f"--against-python: {args.against_python} is not an executable")
        args.servers = add_twin_slots(args.servers, "python", python=args.against_python)
    sizes = {"ct": args.ct, "small": args.small}
    args.workloads = [w for w in args.workloads if sizes[w] > 0]
    if args.rounds < 1 or not args.workloads or not args.servers or args.ct < 0 or args.small < 0:
        p.error("--rounds must be positive, and at least one server and one non-empty workload chosen")
    if args.max_pdu and not 4096 <= args.max_pdu <= 131072:
        p.error("--max-pdu: 4096 to 131072 (the range storescp and Orthanc accept)")
    return args


def add_revision_slots(servers: list[str], rev: str) -> list[str]:
    """--against: a slot "NAME@REV" after each dicomagent slot chosen, and its ratio."""
    return add_twin_slots(servers, rev, rev=rev)


def add_twin_slots(servers: list[str], name: str, **differences) -> list[str]:
    """A slot "NAME@name" after each dicomagent slot chosen, its spec changed by
    ``differences`` (``rev``: a git revision's tree; ``python``: an interpreter), and the
    ratio of the two."""
    out = []
    for slot in servers:
        out.append(slot)
        if SERVERS[slot]["kind"] == "dicomagent" and "@" not in slot:
            twin = f"{slot}@{name}"
            SERVERS[twin] = dict(SERVERS[slot], label=f"{SERVERS[slot]['label']} @{name}",
                                 **differences)
            RATIOS.append((slot, twin))
            out.append(twin)
    return out


def extract_revision(rev: str, workdir: Path) -> Path:
    """The tree of git revision ``rev`` of this checkout, in ``workdir`` (for --against)."""
    tree = workdir / "against"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], capture_output=True)
    if archive.returncode != 0:
        raise BenchError(f"git archive {rev}: {archive.stderr.decode(errors='replace').strip()}")
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive.stdout, check=True)
    for spec in SERVERS.values():
        if spec.get("rev") == rev:
            spec["tree"] = tree
    return tree


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    needed = {"storescu"} | {"storescp" for s in args.servers if SERVERS[s]["kind"] == "storescp"}
    flushing = any(SERVERS[s].get("flush") for s in args.servers)
    if flushing:
        needed.add("gcc")
    if args.against:
        needed.add("git")
    missing = [tool for tool in sorted(needed) if shutil.which(tool) is None]
    if any(SERVERS[s]["kind"] == "orthanc" for s in args.servers) and not os.access(ORTHANC, os.X_OK):
        missing.append(ORTHANC)
    if missing:
        print(f"bench: not found: {', '.join(missing)} (Debian packages dcmtk and orthanc)", file=sys.stderr)
        return 2
    stop_on_sigterm()

    available = sorted(os.sched_getaffinity(0))
    client_cpus = server_cpus = None
    if args.cpus == "split" and len(available) > 1:
        client_cpus, server_cpus = {available[-1]}, set(available[:-1])
    env = dict(os.environ, TCP_NODELAY="1")   # DCMTK (storescu, storescp, Orthanc): no Nagle
    keep_logs = Path(args.keep_logs) if args.keep_logs else None
    if keep_logs:
        keep_logs.mkdir(parents=True, exist_ok=True)

    runs: list[Run] = []
    creation_us = None
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        workdir = Path(tmp)
        try:
            if flushing:
                global FLUSH_LIBRARY
                FLUSH_LIBRARY = build_flush_library(workdir)
            if args.against:
                extract_revision(args.against, workdir)
            corpus_root = Path(args.corpus) if args.corpus else workdir / "corpus"
            corpus = prepare_corpus(corpus_root, {w: getattr(args, w) for w in args.workloads})
            needed = 1.2 * args.rounds * len(args.servers) * sum(c["bytes"] for c in corpus.values())
            if not args.delete_each and shutil.disk_usage(workdir).free < needed + 2**30:
                print(f"bench: {needed / 1e9:.1f} GB needed to keep every run's storage: "
                      f"removing it after each run instead (--delete-each)", flush=True)
                args.delete_each = True
            os.sync()
            creation_us = check_file_creation(workdir, "every server's figures will be lower "
                                                       "and noisier")
            total = args.rounds * len(args.workloads) * len(args.servers)
            done = 0
            for round_no in range(args.rounds):
                shift = round_no % len(args.servers)
                order = args.servers[shift:] + args.servers[:shift]
                for workload in args.workloads:
                    for slot in order:
                        done += 1
                        run = one_run(slot, workload, round_no + 1, corpus, workdir, env, args,
                                      server_cpus, client_cpus, keep_logs)
                        runs.append(run)
                        flag = f"  ({len(run.problems)} log warnings)" if run.problems else ""
                        print(f"[{done}/{total}] round {round_no + 1} {workload:<5} {slot:<19} "
                              f"{run.seconds:7.2f} s {run.objects_per_second:8.1f} objects/s "
                              f"{run.mb_per_second:7.1f} MB/s  server CPU {run.server_cpu:6.2f} s "
                              f"({run.server_user:.2f} user + {run.server_system:.2f} sys), "
                              f"storescu {run.client_cpu:.2f} s, rest of machine {run.other_cpu:.2f} s"
                              f"{flag}", flush=True)
        except BenchError as exc:
            print(f"bench: FAILED: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("bench: interrupted", file=sys.stderr)
            return 130

    summary = summarize(runs, args.servers, args.workloads)
    ratio_table, paired = ratios(summary), paired_ratios(runs)
    print_report(summary, ratio_table, paired, args, corpus)
    problems = [(r.slot, r.workload, r.round, line) for r in runs for line in r.problems]
    if problems:
        print(f"\n{len(problems)} warning/error line(s) in server logs, first ones:")
        for slot, workload, round_no, line in problems[:10]:
            print(f"  {slot} {workload} r{round_no}: {line[:200]}")

    if args.json:
        report = {
            "benchmark": "store",
            "rounds": args.rounds,
            "warmup": args.warmup,
            "fresh_cache": args.fresh_cache,
            "max_pdu": args.max_pdu or None,
            "cpus": args.cpus,
            "file_creation_us": round(creation_us, 1) if creation_us is not None else None,
            "workloads": {w: {k: v for k, v in corpus[w].items() if k not in ("path", "first")}
                          for w in args.workloads},
            "servers": {s: SERVERS[s]["label"] for s in args.servers},
            "summary": summary,
            "ratios": ratio_table,
            "paired_ratios": paired,
            "runs": [{"server": r.slot, "workload": r.workload, "round": r.round,
                      "seconds": round(r.seconds, 4), "objects_per_second": round(r.objects_per_second, 1),
                      "mb_per_second": round(r.mb_per_second, 1), "server_cpu_seconds": round(r.server_cpu, 2),
                      "server_user_seconds": round(r.server_user, 2),
                      "server_system_seconds": round(r.server_system, 2),
                      "client_cpu_seconds": round(r.client_cpu, 2),
                      "other_cpu_seconds": round(r.other_cpu, 2), "log_problems": r.problems[:20]}
                     for r in runs],
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), **versions()},
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
