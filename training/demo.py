"""`make demo` (``python -m training.demo``): the whole product on one machine, in a few minutes.

What it does, in the order a hospital would meet it:

1. **Data.** ``training.synth.head`` writes four disjoint sets of synthetic head-CT studies under
   ``demo-out/data``: normals (M0's training set), an unlabeled mixture of normals and abnormals (M1's;
   its ``labels.csv``/``truth.jsonl`` are moved to ``demo-out/sealed`` before anything is trained, so
   M1 cannot see them), held-out normals for calibration, and a labeled held-out test set written
   *with* its distractor series (scouts, bone kernel, thin slices, reformats, dose report), because
   that is what a PACS sends.
2. **Models.** M0 and M1 are trained (``training.train.loop``, the ``cpu-small`` preset) on the volumes
   ``training.data.volumes`` builds through ``triage.assemble.volume``;
   ``triage.model.modelset.create_model_set`` sets the
   operating point on the calibration normals (specificity 0.9, no lesion label used) and the set is
   promoted in the daemon's registry.
3. **Peers.** Orthanc stands in for the PACS (a real one, temporary config, own storage), an MLLP
   listener for the RIS (it acknowledges every ORU^R01), and ``triage serve`` runs as a subprocess on
   ``demo-out/config.toml``: the repo's ``config.toml`` with only the keys the demo must change
   (a busy port, and with ``--quick`` a shorter quiet period); the demo prints each change. Its
   storage root (``var`` next to the config) is therefore ``demo-out/var``.
4. **Traffic.** The test studies are uploaded to Orthanc and Orthanc C-STOREs them to glowtriage, as
   a PACS auto-routing rule would; the demo polls ``triage status --json`` until every study is
   ``sent`` (or ``rejected``/``failed``).
5. **Result.** A triage table (most suspicious first) with each study's log p(normal|x), its
   percentile among the calibration normals, the flag and the truth; the AUC on these studies; where
   the SRs and HL7 messages went. Everything is then stopped (daemon by SIGTERM).

Re-running reuses the data, the volume cache, the trained models and the model set when they were made
with the same plan (``--fresh`` redoes everything); the daemon's state and the PACS are new each run.
Nothing here is tuned to the synthetic lesions: the AUC printed is whatever the models reach in the
few minutes of CPU training a demo can afford. ``training experiment`` runs the paper's protocol at a
size that means something.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MARKER = ".glowtriage-demo"  # in the output folder: --fresh only ever deletes a folder that has it
SETS = ("normal", "mixture", "calibration", "test")
TERMINAL = ("sent", "rejected", "failed")
ORTHANC_CANDIDATES = ("Orthanc", "/usr/sbin/Orthanc", "/usr/bin/Orthanc")


# --------------------------------------------------------------------------------------------------
# plan


@dataclass(frozen=True)
class Plan:
    """Sizes, steps and seeds. Every field is written to demo.json; the data and models made with a
    plan are reused by a later run with the same values."""

    preset: str = "cpu-small"
    normal: int = 24  # M0's training normals
    mixture_normal: int = 12  # M1's unlabeled mixture
    mixture_abnormal: int = 12
    calibration: int = 12  # held-out normals: operating point and percentiles
    test_normal: int = 10  # the studies sent through the daemon
    test_abnormal: int = 10
    steps: int = 100  # the trunk; M0 and M1 then branch for steps // 2 each (batch of the preset)
    seed: int = 7
    specificity: float = 0.9
    test_distractors: bool = True
    slab_samples: int = 3
    quiet_seconds: float | None = None  # None: the config's own [assembly] quiet_seconds


FULL = Plan()
QUICK = Plan(
    preset="test-tiny",
    normal=4,
    mixture_normal=2,
    mixture_abnormal=2,
    calibration=3,
    test_normal=2,
    test_abnormal=2,
    steps=20,
    test_distractors=False,
    slab_samples=1,
    quiet_seconds=2.0,
)


def say(msg: str = "") -> None:
    print(msg, flush=True)


class DemoError(RuntimeError):
    """The demo cannot go on; the message says what failed and where to look."""


# --------------------------------------------------------------------------------------------------
# ports and config


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    """True when a server could listen on (host, port) now (SO_REUSEADDR, as servers bind)."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def set_toml_key(text: str, section: str, key: str, value: Any) -> str:
    """``text`` with ``key`` of ``[section]`` set to ``value``; comments and everything else kept.

    Line-based on purpose: the shipped config.toml documents every key in comments, and a demo config
    that is that file with two lines changed is easy to diff against it.
    """
    lines = text.splitlines()
    header = re.compile(r"^\s*\[\s*([A-Za-z0-9_.]+)\s*\]\s*(#.*)?$")
    keyline = re.compile(rf"^\s*{re.escape(key)}\s*=")
    start = next((i for i, ln in enumerate(lines) if (m := header.match(ln)) and m.group(1) == section), None)
    new = f"{key} = {_toml(value)}"
    if start is None:
        return "\n".join([*lines, "", f"[{section}]", new]) + "\n"
    end = next(
        (
            i
            for i in range(start + 1, len(lines))
            if header.match(lines[i]) or lines[i].lstrip().startswith("[[")
        ),
        len(lines),
    )
    for i in range(start + 1, end):
        if keyline.match(lines[i]):
            lines[i] = new
            break
    else:
        lines.insert(start + 1, new)
    return "\n".join(lines) + "\n"


@dataclass
class Ports:
    """The ports the demo uses and which of them differ from the base config (with why)."""

    dicom: int
    metrics: int
    pacs: int
    hl7: int
    orthanc_http: int
    changes: list[str] = field(default_factory=list)


def choose_ports(base: Any, all_free: bool) -> Ports:
    """The base config's ports where they are free now, otherwise (or with ``all_free``) free ones."""
    s = base.settings
    wanted = [
        ("dicom", "port", s.dicom.port, s.dicom.host),
        ("metrics", "port", s.metrics.port, s.metrics.host),
        ("pacs", "port", s.pacs.port, "127.0.0.1"),
        ("hl7", "port", s.hl7.port, "127.0.0.1"),
    ]
    got: dict[str, int] = {}
    changes: list[str] = []
    taken: set[int] = set()
    for section, _key, port, host in wanted:
        if not all_free and port not in taken and port_free(port, host):
            got[section] = port
        else:
            new = free_port()
            while new in taken:
                new = free_port()
            why = "--free-ports" if all_free else "busy"
            changes.append(f"[{section}] port {port} -> {new} ({why})")
            got[section] = new
        taken.add(got[section])
    http = 8042 if not all_free and 8042 not in taken and port_free(8042) else free_port()
    return Ports(got["dicom"], got["metrics"], got["pacs"], got["hl7"], http, changes)


def write_demo_config(out: Path, base_path: Path | None, ports: Ports, plan: Plan) -> tuple[Path, list[str]]:
    """demo-out/config.toml: the base file with only the demo's changes; returns (path, changes)."""
    text = base_path.read_text() if base_path and base_path.is_file() else ""
    changes = list(ports.changes)
    for section, value in (
        ("dicom", ports.dicom),
        ("metrics", ports.metrics),
        ("pacs", ports.pacs),
        ("hl7", ports.hl7),
    ):
        text = set_toml_key(text, section, "port", value)
    if plan.quiet_seconds is not None:
        text = set_toml_key(text, "assembly", "quiet_seconds", float(plan.quiet_seconds))
        changes.append(f"[assembly] quiet_seconds = {plan.quiet_seconds:g} (--quick)")
    path = out / "config.toml"
    path.write_text(text)
    # The demo wipes its daemon's spool on every run: that must never be a real one (a base config with
    # root = "/var/lib/glowtriage"), so a root outside the output folder becomes demo-out/var.
    from triage.config import load

    root = load(path).storage_root.resolve()
    if not root.is_relative_to(out.resolve()):
        text = set_toml_key(text, "storage", "root", "var")
        changes.append(f"[storage] root {root} -> var (= {out / 'var'}: the demo keeps to its own folder)")
        path.write_text(text)
    return path, changes


# --------------------------------------------------------------------------------------------------
# peers: the RIS (MLLP listener), the PACS (Orthanc), the daemon


class _MLLPHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        import hl7

        buf = b""
        while True:
            chunk = self.request.recv(65536)
            if not chunk:
                return
            buf += chunk
            while b"\x1c\r" in buf:
                frame, buf = buf.split(b"\x1c\r", 1)
                text = frame.lstrip(b"\x0b").decode("utf-8", "replace")
                try:
                    ack = str(hl7.parse(text).create_ack("AA"))
                except Exception:  # not HL7: answer AR rather than hang the sender
                    ack = "MSH|^~\\&|RIS|HOSPITAL|||||ACK|1|P|2.5\rMSA|AR|"
                self.server.messages.append(text)  # type: ignore[attr-defined]
                self.request.sendall(b"\x0b" + ack.encode() + b"\x1c\r")


class MLLPListener(socketserver.ThreadingTCPServer):
    """A RIS stand-in: acknowledges every HL7 v2 message (AA) and keeps it in ``messages``."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, port: int = 0, host: str = "127.0.0.1") -> None:
        super().__init__((host, port), _MLLPHandler)
        self.messages: list[str] = []
        self.thread = threading.Thread(target=self.serve_forever, name="mllp", daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def orthanc_binary() -> str | None:
    for cand in ORTHANC_CANDIDATES:
        found = shutil.which(cand) or (cand if Path(cand).is_file() else None)
        if found:
            return found
    return None


class Orthanc:
    """Orthanc as the PACS: temporary JSON config, own storage, loopback only, no authentication."""

    def __init__(
        self, base: Path, *, aet: str, dicom_port: int, http_port: int, modalities: dict[str, list[Any]]
    ):
        self.base, self.aet, self.dicom_port, self.http_port = base, aet, dicom_port, http_port
        self.modalities = modalities
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout: float = 60.0) -> Orthanc:
        binary = orthanc_binary()
        if binary is None:
            raise DemoError("Orthanc is not installed (scripts/bootstrap.sh installs it)")
        self.base.mkdir(parents=True, exist_ok=True)
        conf = {
            "Name": "glowtriage-demo-pacs",
            "StorageDirectory": str(self.base / "db"),
            "IndexDirectory": str(self.base / "db"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "StableAge": 1,
            "DicomModalities": self.modalities,
            "Plugins": [],
            "HttpServerEnabled": True,
        }
        (self.base / "orthanc.json").write_text(json.dumps(conf, indent=1))
        log = open(self.base / "orthanc.log", "ab")  # noqa: SIM115 - handed to the child
        env = {**os.environ, "TCP_NODELAY": "1"}
        self.proc = subprocess.Popen(
            [binary, str(self.base / "orthanc.json")],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.base,
            env=env,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DemoError(
                    f"Orthanc exited with {self.proc.returncode}; see {self.base / 'orthanc.log'}"
                )
            with contextlib.suppress(OSError):
                self.request("GET", "/system", timeout=2)
                return self
            time.sleep(0.2)
        raise DemoError(f"Orthanc not answering after {timeout:.0f} s; see {self.base / 'orthanc.log'}")

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        ctype: str = "application/json",
        timeout: float = 120.0,
    ) -> Any:
        data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", ctype)
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            is_json = "json" in r.headers.get("Content-Type", "")
        return json.loads(raw) if is_json and raw else raw

    def upload(self, files: Sequence[Path], threads: int = 4) -> list[str]:
        """POST /instances for every file (a few in parallel); returns the Orthanc study ids."""
        from concurrent.futures import ThreadPoolExecutor

        def one(f: Path) -> str:
            return str(self.request("POST", "/instances", f.read_bytes(), "application/dicom")["ParentStudy"])

        with ThreadPoolExecutor(threads) as pool:
            return sorted(set(pool.map(one, files)))

    def sr_count(self, study_uid: str) -> int:
        found = self.request(
            "POST",
            "/tools/find",
            {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid, "Modality": "SR"}},
        )
        return len(found or [])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class DaemonProcess:
    """``triage serve --config FILE`` as a subprocess; its JSON log lines go to ``log``."""

    def __init__(self, config: Path, log: Path):
        self.config, self.log = config, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120.0) -> DaemonProcess:
        offset = self.log.stat().st_size if self.log.exists() else 0
        out = open(self.log, "ab")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "triage.cli", "serve", "--config", str(self.config)],
            cwd=self.config.parent,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise DemoError(f"triage serve exited with {self.proc.returncode}:\n{self.tail()}")
            if any(ev.get("event") == "serving" for ev in self.events(offset)):
                return self
            time.sleep(0.2)
        raise DemoError(f"triage serve not serving after {timeout:.0f} s:\n{self.tail()}")

    def events(self, offset: int = 0) -> Iterator[dict[str, Any]]:
        if not self.log.exists():
            return
        with open(self.log, "rb") as f:
            f.seek(offset)
            for line in f:
                with contextlib.suppress(ValueError):
                    ev = json.loads(line)
                    if isinstance(ev, dict):
                        yield ev

    def tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def status(self) -> dict[str, Any]:
        """`triage status --json` (a separate process, exactly what an operator would run)."""
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "triage.cli",
                "status",
                "--json",
                "--limit",
                "100000",
                "--config",
                str(self.config),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if out.returncode != 0:
            raise DemoError(f"triage status failed ({out.returncode}): {out.stderr.strip()[-500:]}")
        return json.loads(out.stdout)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


# --------------------------------------------------------------------------------------------------
# 1. data


def _set_spec(plan: Plan) -> dict[str, dict[str, Any]]:
    """(normal, abnormal, seed, distractors) of each set; seeds disjoint so no phantom is shared."""
    return {
        "normal": {"normal": plan.normal, "abnormal": 0, "seed": plan.seed * 100 + 1, "distractors": False},
        "mixture": {
            "normal": plan.mixture_normal,
            "abnormal": plan.mixture_abnormal,
            "seed": plan.seed * 100 + 2,
            "distractors": False,
        },
        "calibration": {
            "normal": plan.calibration,
            "abnormal": 0,
            "seed": plan.seed * 100 + 3,
            "distractors": False,
        },
        "test": {
            "normal": plan.test_normal,
            "abnormal": plan.test_abnormal,
            "seed": plan.seed * 100 + 4,
            "distractors": plan.test_distractors,
        },
    }


def _write_set(folder: str, spec: dict[str, Any], slab_samples: int) -> float:
    """One set (runs in a worker process); returns its seconds."""
    from training.synth.head import SynthOptions, write_dataset

    t0 = time.perf_counter()
    out = Path(folder)
    shutil.rmtree(out, ignore_errors=True)
    write_dataset(
        out,
        normal=spec["normal"],
        abnormal=spec["abnormal"],
        seed=spec["seed"],
        options=SynthOptions(distractors=spec["distractors"], slab_samples=slab_samples),
    )
    return time.perf_counter() - t0


def make_data(out: Path, plan: Plan, workers: int = 2) -> dict[str, Path]:
    """Write (or reuse) the four sets; the mixture's labels are sealed away from training."""
    data, sealed = out / "data", out / "sealed"
    specs = _set_spec(plan)
    todo = []
    for name, spec in specs.items():
        want = {**spec, "slab_samples": plan.slab_samples}
        done = data / name / ".demo-set.json"
        if done.is_file() and json.loads(done.read_text()) == want:
            continue
        todo.append(name)
    reused = [n for n in SETS if n not in todo]
    if reused:
        say(f"  reusing {', '.join(reused)} (same plan; --fresh to redo)")
    if todo:
        n = sum(specs[k]["normal"] + specs[k]["abnormal"] for k in todo)
        say(f"  writing {n} studies ({', '.join(todo)}), {min(workers, len(todo))} processes ...")
        # biggest first, so two workers finish together
        order = sorted(
            todo,
            key=lambda k: (
                -(specs[k]["normal"] + specs[k]["abnormal"]) * (3 if specs[k]["distractors"] else 1)
            ),
        )
        with ProcessPoolExecutor(max_workers=max(1, min(workers, len(order)))) as pool:
            futs = {k: pool.submit(_write_set, str(data / k), specs[k], plan.slab_samples) for k in order}
            for k in order:
                secs = futs[k].result()
                s = specs[k]
                extra = " with distractor series" if s["distractors"] else ""
                say(
                    f"    {k:<12} {s['normal']:>3} normal + {s['abnormal']:>3} abnormal{extra}"
                    f"  ({secs:.0f} s)"
                )
        for k in todo:
            if k == "mixture":  # M1 learns from an unlabeled mixture: its labels leave the data folder
                (sealed / k).mkdir(parents=True, exist_ok=True)
                for name in ("labels.csv", "truth.jsonl"):
                    shutil.move(str(data / k / name), str(sealed / k / name))
            (data / k / ".demo-set.json").write_text(
                json.dumps({**specs[k], "slab_samples": plan.slab_samples})
            )
    return {k: data / k for k in SETS}


# --------------------------------------------------------------------------------------------------
# 2. models


def _digest(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16]


def train_models(out: Path, sets: dict[str, Path], plan: Plan) -> tuple[Path, Path, dict[str, Any]]:
    """A trunk on the normals, then M0 (normals) and M1 (unlabeled mixture) branching from it with the
    same budget, as ``training experiment`` does (its docstring says why). Each model is reused when
    the plan, its data and the trunk it started from are unchanged."""
    from training.data.volumes import volumes_from_dicom
    from training.train.loop import forget_stale_warm_start, train, weights_digest

    models = out / "models"
    models.mkdir(parents=True, exist_ok=True)
    cache = out / "cache"
    info: dict[str, Any] = {}
    branch = max(1, plan.steps // 2)
    stages = (("trunk", "normal", None, plan.steps), ("m0", "normal", "trunk", branch),
              ("m1", "mixture", "trunk", branch))
    vols_of: dict[str, Any] = {}
    for name, role, start, steps in stages:
        t0 = time.perf_counter()
        if role not in vols_of:
            vols_of[role] = volumes_from_dicom(sets[role], cache / role, workers=2)
        vols = vols_of[role]
        assemble_s = time.perf_counter() - t0
        if not len(vols):
            raise DemoError(f"{sets[role]}: no usable study (see {cache / role / 'rejects.csv'})")
        path = models / f"{name}.pt"
        init_from = models / f"{start}.pt" if start else None
        want = {
            "preset": plan.preset,
            "steps": steps,
            "seed": plan.seed,
            "role": role,
            "ids": _digest(vols.ids),
            "init_from": weights_digest(init_from) if init_from else None,
        }
        stamp = models / f"{name}.json"
        label = f"{name.upper() if start else name} ({role}{', from the trunk' if start else ''})"
        if path.is_file() and stamp.is_file() and json.loads(stamp.read_text()).get("want") == want:
            prev = json.loads(stamp.read_text())
            say(f"  {label}: reusing {path.relative_to(out)} "
                f"({prev['final_bpd']:.3f} bits/dim after {steps} steps)")
            info[name] = prev
            continue
        if init_from is not None:
            forget_stale_warm_start(path, init_from)
        say(f"  {label}: {len(vols)} volumes (assembled in {assemble_s:.0f} s), "
            f"{steps} steps of {plan.preset} ...")
        # tqdm draws a bar on a terminal; elsewhere (CI, a pipe) a line every tenth of the run
        hook = None if sys.stderr.isatty() else _progress_lines(name, steps)
        res = train(
            vols,
            plan.preset,
            path,
            role=role,
            seed=plan.seed,
            steps=steps,
            resume=True,
            init_from=init_from,
            progress=True,
            checkpoint_every=max(10, steps // 4),
            hook=hook,
        )
        rec = {
            "want": want,
            "final_bpd": res.final_bpd,
            "seconds": round(res.seconds, 1),
            "volumes": len(vols),
        }
        stamp.write_text(json.dumps(rec))
        info[name] = rec
        say(f"    done in {res.seconds:.0f} s: {res.final_bpd:.3f} bits/dim (mean of the last steps)")
    return models / "m0.pt", models / "m1.pt", info


def _progress_lines(name: str, total: int) -> Callable[..., None]:
    """A training hook that only reports progress (it is called before each step, and reads nothing)."""
    t0 = time.perf_counter()
    every = max(1, total // 10)

    def hook(step: int, *_: Any) -> None:
        if step and step % every == 0:
            el = time.perf_counter() - t0
            say(f"    {name}: step {step}/{total}, {el:.0f} s, ~{el / step * (total - step):.0f} s to go")

    return hook


def install_model_set(cfg: Any, m0: Path, m1: Path, calibration: Path, plan: Plan) -> Any:
    """create_model_set on the calibration normals (specificity rule) and promote it; reused when the
    current set holds these very models calibrated on this folder."""
    from triage.model.modelset import create_model_set
    from triage.model.registry import Registry, RegistryError, sha256_file

    reg = Registry(cfg.models_dir)
    try:
        cur = reg.current()
    except RegistryError:  # a damaged current set is not reused; a new one is promoted over it
        cur = None
    want_method = f"specificity={plan.specificity:g}"
    if (
        cur is not None
        and cur.manifest["m0_sha256"] == sha256_file(m0)
        and cur.manifest["m1_sha256"] == sha256_file(m1)
        and cur.manifest["operating_point"]["method"] == want_method
        and cur.manifest["provenance"]["calibration"]["data"] == str(calibration)
    ):
        say(f"  reusing model set {cur.version}")
        return cur
    s = create_model_set(cfg, reg, m0, m1, calibration, specificity=plan.specificity,
                         trunk=m0.with_name("trunk.pt"))
    reg.promote(s.version, reason="training.demo")
    return s


# --------------------------------------------------------------------------------------------------
# 3-5. run the daemon with its peers and report


@dataclass
class Truth:
    study_uid: str
    name: str  # the study's folder, e.g. study_0003
    label: str
    lesion: str
    subtype: str

    @property
    def text(self) -> str:
        if self.label == "normal":
            return "normal"
        return f"{self.lesion} ({self.subtype})" if self.subtype else self.lesion or self.label


def read_truth(folder: Path) -> dict[str, Truth]:
    out: dict[str, Truth] = {}
    with (folder / "truth.jsonl").open() as f:
        for line in f:
            t = json.loads(line)
            out[t["study_uid"]] = Truth(
                t["study_uid"],
                Path(t["study_dir"]).name,
                t["label"],
                t["lesion"],
                t.get("lesion_subtype", ""),
            )
    return out


def _reset_daemon_state(root: Path) -> None:
    """The daemon's storage without its model sets: each run starts from an empty spool and database."""
    if not root.is_dir():
        return
    for p in root.iterdir():
        if p.name == "models":
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def wait_terminal(
    daemon: DaemonProcess, uids: set[str], timeout_s: float, every_s: float = 2.0
) -> dict[str, dict[str, Any]]:
    """Poll `triage status --json` until every study in ``uids`` is sent/rejected/failed."""
    t0 = time.monotonic()
    last = ""
    studies: dict[str, dict[str, Any]] = {}
    while True:
        st = daemon.status()
        studies = {s["study_uid"]: s for s in st["studies"] if s["study_uid"] in uids}
        counts: dict[str, int] = {}
        for uid in uids:
            state = studies.get(uid, {}).get("state", "not yet received")
            counts[state] = counts.get(state, 0) + 1
        line = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        if line != last:
            say(f"    {time.monotonic() - t0:5.0f} s  {line}")
            last = line
        if all(studies.get(u, {}).get("state") in TERMINAL for u in uids):
            return studies
        if daemon.proc is not None and daemon.proc.poll() is not None:
            raise DemoError(f"triage serve exited with {daemon.proc.returncode}:\n{daemon.tail()}")
        if time.monotonic() - t0 > timeout_s:
            say(f"  timed out after {timeout_s:.0f} s; see {daemon.log}")
            return studies
        time.sleep(every_s)


def _hl7_priorities(messages: Sequence[str], uids: set[str]) -> dict[str, list[str]]:
    """study UID -> the OBR-5 priorities of the ORU^R01 messages that name it."""
    out: dict[str, list[str]] = {}
    for text in messages:
        uid = next((u for u in uids if u in text), None)
        obr = next((seg.split("|") for seg in text.split("\r") if seg.startswith("OBR|")), None)
        if uid is not None and obr is not None and len(obr) > 5:
            out.setdefault(uid, []).append(obr[5])
    return out


def build_rows(
    store_root: Path,
    truth: dict[str, Truth],
    studies: dict[str, dict[str, Any]],
    srs: dict[str, int],
    hl7: dict[str, list[str]],
) -> list[dict[str, Any]]:
    from triage.store.db import Store

    rows = []
    with Store(store_root) as store:
        for uid, t in truth.items():
            score = store.score(uid)
            st = studies.get(uid, {})
            rows.append(
                {
                    "study": t.name,
                    "study_uid": uid,
                    "state": st.get("state", "missing"),
                    "reason": st.get("reason"),
                    "log_posterior": score["log_posterior"] if score else None,
                    "percentile": score.get("percentile") if score else None,
                    "flagged": score.get("flagged") if score else None,
                    "threshold": score.get("threshold") if score else None,
                    "truth": t.text,
                    "abnormal": t.label != "normal",
                    "sr_in_pacs": srs.get(uid, 0),
                    "hl7_priority": "/".join(hl7.get(uid, [])) or None,
                }
            )
    scored = sorted((r for r in rows if r["log_posterior"] is not None), key=lambda r: r["log_posterior"])
    return scored + [r for r in rows if r["log_posterior"] is None]


def auc_of(rows: Sequence[dict[str, Any]]) -> float | None:
    """ROC AUC of -log p(normal|x) for abnormal vs normal on the scored rows (None: one class only)."""
    from sklearn.metrics import roc_auc_score

    scored = [r for r in rows if r["log_posterior"] is not None]
    y = [int(r["abnormal"]) for r in scored]
    if len(set(y)) < 2:
        return None
    return float(roc_auc_score(y, [-r["log_posterior"] for r in scored]))


def print_table(rows: Sequence[dict[str, Any]]) -> None:
    say(
        f"  {'#':>3}  {'study':<11} {'log p(normal|x)':>16} {'pctl':>6}  {'flag':<7} {'truth':<30} "
        f"{'SR':>2} {'HL7':>3}"
    )
    for i, r in enumerate(rows, 1):
        if r["log_posterior"] is None:
            why = f"{r['state']}: {r['reason'] or ''}"[:60]
            say(f"  {i:>3}  {r['study']:<11} {'-':>16} {'-':>6}  {'-':<7} {r['truth']:<30} {why}")
            continue
        pct = "-" if r["percentile"] is None else f"{r['percentile']:.0f}"
        say(
            f"  {i:>3}  {r['study']:<11} {r['log_posterior']:>16.1f} {pct:>6}  "
            f"{'FLAG' if r['flagged'] else '-':<7} {r['truth']:<30} {r['sr_in_pacs']:>2} "
            f"{r['hl7_priority'] or '-':>3}"
        )


def _wait_for_interrupt() -> None:
    """Block until Ctrl-C or SIGTERM (both end the demo the same way: everything is stopped)."""
    stop = threading.Event()
    # Handlers for both, so a SIGINT also ends it where a shell started the demo with SIGINT ignored
    # (a background job).
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not stop.wait(0.5):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _prepare_out(out: Path, fresh: bool) -> None:
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise DemoError(f"{out} exists and is not a demo output folder (no {MARKER}); choose another --out")
    if fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by python -m training.demo; --fresh deletes this folder\n")


def run(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    plan = QUICK if args.quick else FULL
    if args.steps is not None:
        plan = dataclasses.replace(plan, steps=args.steps)
    out = Path(args.out).resolve()
    _prepare_out(out, args.fresh)
    timings: dict[str, float] = {}

    def lap(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 1)

    say(f"glowtriage demo -> {out}  (preset {plan.preset}{', --quick' if args.quick else ''})")
    say("\n[1/5] synthetic head-CT studies (training.synth.head)")
    t0 = time.perf_counter()
    sets = make_data(out, plan)
    lap("data", t0)

    from triage.config import ConfigError, load
    from triage.ops.logs import configure

    configure("warning", "console", stream=sys.stderr)
    if args.quick:
        import torch

        # test-tiny is far too small to gain from threads, and on a busy machine idle OpenMP threads
        # spinning against other processes' make it 30x slower
        torch.set_num_threads(1)
    say("\n[2/5] models: M0 on normals, M1 on the unlabeled mixture (training.train.loop)")
    t0 = time.perf_counter()
    m0, m1, train_info = train_models(out, sets, plan)
    lap("train", t0)

    base = Path(args.config) if args.config else REPO / "config.toml"
    try:
        base_cfg = load(base if base.is_file() else None)
    except ConfigError as exc:
        raise DemoError("; ".join(exc.lines)) from None
    ports = choose_ports(base_cfg, args.free_ports)
    cfg_path, changes = write_demo_config(out, base if base.is_file() else None, ports, plan)
    cfg = load(cfg_path)
    _reset_daemon_state(cfg.storage_root)

    say(f"\n[3/5] model set: operating point on {plan.calibration} held-out normals (triage models create)")
    t0 = time.perf_counter()
    ms = install_model_set(cfg, m0, m1, sets["calibration"], plan)
    op = ms.manifest["operating_point"]
    say(
        f"  model set {ms.version}: flag when log p(normal|x) < {op['threshold']:.1f} ({op['method']} on "
        f"the calibration normals)"
    )
    lap("model_set", t0)

    s = cfg.settings
    say(f"\n[4/5] daemon, PACS and RIS  (config {cfg_path.relative_to(out.parent)})")
    base_name = base if base.is_file() else "the embedded defaults"
    if changes:
        say(f"  differs from {base_name} only in:")
        for c in changes:
            say(f"    {c}")
    else:
        say(f"  identical to {base_name} (storage root: {cfg.storage_root})")
    truth = read_truth(sets["test"])
    uids = set(truth)
    orthanc = mllp = daemon = None
    code = 0
    result: dict[str, Any] = {}
    try:
        t0 = time.perf_counter()
        mllp = MLLPListener(ports.hl7)
        orthanc = Orthanc(
            out / "pacs",
            aet=s.pacs.ae_title,
            dicom_port=ports.pacs,
            http_port=ports.orthanc_http,
            modalities={"GLOWTRIAGE": [s.dicom.ae_title, "127.0.0.1", ports.dicom]},
        )
        shutil.rmtree(out / "pacs", ignore_errors=True)
        orthanc.start()
        say(f"  PACS: Orthanc AE {s.pacs.ae_title} on DICOM port {ports.pacs}, web {orthanc.url}")
        say(f"  RIS:  MLLP listener on port {ports.hl7} (acknowledges every message)")
        daemon = DaemonProcess(cfg_path, out / "daemon.log").start()
        say(
            f"  glowtriage: AE {s.dicom.ae_title} on port {ports.dicom}, metrics "
            f"http://{s.metrics.host}:{ports.metrics}/metrics, log {daemon.log.relative_to(out.parent)}"
        )
        lap("start_peers", t0)

        t0 = time.perf_counter()
        files = sorted(f for f in sets["test"].rglob("*.dcm"))
        say(f"  uploading the {len(uids)} test studies ({len(files)} instances) to the PACS ...")
        ids = orthanc.upload(files)
        say(f"  PACS sends them to glowtriage (Orthanc C-STORE to {s.dicom.ae_title}) ...")
        sent = orthanc.request(
            "POST", "/modalities/GLOWTRIAGE/store", {"Resources": ids, "Synchronous": True}, timeout=1800
        )
        failed = sent.get("FailedInstancesCount", 0) if isinstance(sent, dict) else 0
        if failed:
            say(f"  note: Orthanc reports {failed} instances it could not send")
        lap("send", t0)
        t0 = time.perf_counter()
        say(
            f"  waiting for every study to be sent (quiet period {s.assembly.quiet_seconds:g} s, then "
            "assemble, score, report, deliver):"
        )
        studies = wait_terminal(daemon, uids, timeout_s=args.timeout)
        lap("triage", t0)
        if not all(studies.get(u, {}).get("state") in TERMINAL for u in uids):
            code = 1
        srs = {u: orthanc.sr_count(u) for u in uids}
        hl7 = _hl7_priorities(list(mllp.messages), uids)
        rows = build_rows(cfg.storage_root, truth, studies, srs, hl7)

        say(
            "\n[5/5] triage table: most suspicious first (log p(normal|x) in nats; "
            "pctl: percentile among the calibration normals)"
        )
        print_table(rows)
        auc = auc_of(rows)
        scored = [r for r in rows if r["log_posterior"] is not None]
        n_abn = sum(r["abnormal"] for r in scored)
        flagged = [r for r in scored if r["flagged"]]
        tp = sum(r["abnormal"] for r in flagged)
        auc_txt = f"{auc:.3f}" if auc is not None else "n/a (one class only)"
        say(
            f"\n  AUC (log p(normal|x), abnormal vs normal) on these {len(scored)} studies "
            f"({len(scored) - n_abn} normal, {n_abn} abnormal): {auc_txt}"
        )
        if scored:
            sens = tp / n_abn if n_abn else float("nan")
            spec = 1 - (len(flagged) - tp) / max(1, len(scored) - n_abn)
            say(
                f"  at the operating point: {len(flagged)} flagged, "
                f"sensitivity {sens:.2f}, specificity {spec:.2f}"
            )
        say(
            f"  ({plan.preset}, a {plan.steps}-step trunk and {max(1, plan.steps // 2)}-step branches on "
            f"{plan.normal} normals and "
            f"{plan.mixture_normal + plan.mixture_abnormal} mixture studies:\n   a demo-sized model, not a "
            "validated one; `training experiment` runs the paper's protocol at scale.)"
        )
        n_sr = sum(1 for r in rows if r["sr_in_pacs"])
        prio = [p for r in rows for p in (r["hl7_priority"] or "").split("/") if p]
        say(
            f"\n  SRs: {n_sr} of {len(rows)} studies have their Structured Report in the PACS "
            f"(Orthanc AE {s.pacs.ae_title}, port {ports.pacs});\n"
            f"       copies under {(cfg.storage_root / 'results').relative_to(out.parent)}"
        )
        say(
            f"  HL7: {len(mllp.messages)} ORU^R01 acknowledged by the RIS listener "
            f"({prio.count('S')} priority S = flagged, {prio.count('R')} routine)"
        )
        result = {"auc": auc, "rows": rows, "flagged": len(flagged)}
        if args.keep_running:
            say(
                "\n  --keep-running: everything stays up. `triage status --config "
                f"{cfg_path}`; Ctrl-C to stop."
            )
            _wait_for_interrupt()
    finally:
        t0 = time.perf_counter()
        if daemon is not None:
            rc = daemon.stop()
            if rc not in (0, None):
                say(f"  note: triage serve exited with {rc}; see {daemon.log}")
        if orthanc is not None:
            orthanc.stop()
        if mllp is not None:
            mllp.stop()
        lap("stop", t0)
    total = time.perf_counter() - t_start
    timings["total"] = round(total, 1)
    summary = {
        "plan": dataclasses.asdict(plan),
        "timings_s": timings,
        "models": train_info,
        "model_set": ms.version,
        "threshold": op["threshold"],
        "config": str(cfg_path),
        "config_changes": changes,
        "ports": dataclasses.asdict(ports),
        **result,
    }
    (out / "demo.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    say(
        f"\n  stopped daemon, PACS and RIS. Wall time {total / 60:.1f} min ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items() if k != "total")
        + f"); {out / 'demo.json'}"
    )
    return code


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo-out", help="output folder (default ./demo-out)")
    p.add_argument("--config", help="base config.toml (default: the repo's config.toml)")
    p.add_argument("--quick", action="store_true", help="tiny sizes and the test-tiny preset (a smoke test)")
    p.add_argument("--fresh", action="store_true", help="delete the output folder first and redo everything")
    p.add_argument("--keep-running", action="store_true", help="leave daemon, PACS and RIS up until Ctrl-C")
    p.add_argument("--free-ports", action="store_true", help="free ports for everything, not the config's")
    p.add_argument("--steps", type=int,
                   help="trunk steps; M0 and M1 branch for half as many (default: the plan's)")
    p.add_argument(
        "--timeout", type=float, default=900.0, help="seconds to wait for the studies (default 900)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return run(args)
    except DemoError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("demo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
