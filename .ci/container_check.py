#!/usr/bin/env python3
"""The container, built and run for real (issue 16). Called by .ci/run near its end; standard library only.

What it does, in order:
  1. installs what it needs where missing (Debian: docker.io, debootstrap, docker-compose);
  2. starts its own dockerd (own --data-root, --exec-root, --pidfile and socket; --iptables=false and
     --ip-forward=false, so the host's firewall and forwarding are left alone). The data-root lives in
     $CLASSMEANS_CI_DOCKER_DIR (default /var/lib/classmeans-ci-docker), so a later run on the same machine reuses
     the base image and the build cache; a clean machine builds everything;
  3. builds a stand-in for the Dockerfile's base image (no registry is reachable): debootstrap of Debian
     bookworm (python3.11 + venv), imported and tagged `python:3.11-slim-bookworm`, labelled as a CI stand-in and
     never pushed. The host's CA bundle goes in so that pip inside the build reaches PyPI;
  4. serves a wheelhouse of torch/torchvision (`pip download` on the host, with this machine's pip sources) on
     127.0.0.1 and builds the real Dockerfile with --build-arg TORCH_INDEX_URL pointing at it (the published
     default stays PyPI's CPU index). Build time and image size are measured;
  5. rebuilds after a code change under service/ (in a copy of the build context) and asserts the torch layer
     came from the cache;
  6. runs the image and checks: healthy within its start period, /classify answers a real PNG with its exit and
     FLOPs, the server runs as uid/gid 10001, it works with a read-only root file system (writes go to the
     volume and /tmp only; `docker diff` of a writable run), the admin token from the environment is enforced,
     `docker stop` lets an in-flight request finish, a new container on the same volume keeps the profile;
  7. brings up the compose stack (docker-compose) with the real service image and a Prometheus built locally
     from Debian's prometheus package (tagged as the pinned image, CI only), and asserts through Prometheus's
     HTTP API that the target is up and that the exit-depth histogram holds exactly the requests' samples;
  8. stops and removes everything it started (containers, volumes, networks, the rebuild image, dockerd by PID,
     the wheel server), even when a check fails, and checks the host's iptables and ip_forward are as before.

Writes runs/container-check.json (figures and the checks that passed) and logs under runs/container-check/
($CLASSMEANS_CONTAINER_CHECK_OUT instead of runs/ where set).
Exits 0 when every check passed or when no engine could be started (the reason is printed); 1 on a failure.
Set CLASSMEANS_SKIP_CONTAINER_CHECK=1 to skip it (the reason is printed).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# the embedded default (service/api/settings.py DEFAULT_MODEL; this script runs without the venv)
DEFAULT_MODEL = "cifar10-cascade"
DOCKER = "/usr/bin/docker"  # Debian's client: another client earlier on PATH may want buildx
BASE_IMAGE_RE = re.compile(r"^FROM\s+(\S+)", re.M)
STANDIN_LABEL = "io.classmeans.ci-standin"
IMAGE = "classmeans-serve:local"  # docker-compose.yml's image name
REBUILD_IMAGE = "classmeans-serve:ci-rebuild"
BOOKWORM_STANDIN = "classmeans-ci/bookworm:standin"
STATE = Path(os.environ.get("CLASSMEANS_CI_DOCKER_DIR", "/var/lib/classmeans-ci-docker"))
OUT_DIR = Path(os.environ.get("CLASSMEANS_CONTAINER_CHECK_OUT", REPO / "runs"))  # git-ignored
OUT_JSON = OUT_DIR / "container-check.json"
LOG_DIR = OUT_DIR / "container-check"
STORE_IN_IMAGE = "/var/lib/classmeans/model_store"
UID = GID = 10001
WHEEL_PORT = 38417  # the wheel server's port on 127.0.0.1 (CLASSMEANS_CI_WHEEL_PORT overrides)


class Skip(Exception):
    """No engine can be had here: print the reason and exit 0."""


class CheckFailed(Exception):
    pass


def say(msg: str) -> None:
    print(f"container-check: {msg}", flush=True)


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


# ------------------------------------------------------------------------------------------------ processes

def run(argv: list[str], *, log: str | None = None, check: bool = True, timeout: float = 600,
        env: dict[str, str] | None = None, input_bytes: bytes | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run a command; its output goes to LOG_DIR/<log>.log (appended) when ``log`` is given, else is captured."""
    if log is not None:
        path = LOG_DIR / f"{log}.log"
        with path.open("ab") as fh:
            fh.write(f"\n$ {' '.join(argv)}\n".encode())
            fh.flush()
            out = subprocess.run(argv, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout, env=env,
                                 input=input_bytes, cwd=cwd, stdin=None if input_bytes else subprocess.DEVNULL)
        if check and out.returncode != 0:
            raise CheckFailed(f"{argv[0]} {argv[1] if len(argv) > 1 else ''} exited {out.returncode}; "
                              f"log {shown(path)}:\n{tail(path)}")
        return out
    out = subprocess.run(argv, capture_output=True, timeout=timeout, env=env, input=input_bytes, cwd=cwd,
                         stdin=None if input_bytes else subprocess.DEVNULL)
    if check and out.returncode != 0:
        raise CheckFailed(f"{' '.join(argv[:4])} exited {out.returncode}: "
                          f"{out.stderr.decode(errors='replace')[-2000:]}")
    return out


def shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, predicate: Callable[[], object], timeout_s: float, interval_s: float = 1.0) -> object:
    deadline = time.monotonic() + timeout_s
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = predicate()
        except (OSError, CheckFailed, ValueError, KeyError, http.client.HTTPException) as exc:
            last, value = exc, None
        if value:
            return value
        time.sleep(interval_s)
    raise CheckFailed(f"timed out after {timeout_s:.0f} s waiting for {what}" + (f" (last: {last!r})" if last else ""))


# ------------------------------------------------------------------------------------------------ HTTP (127.0.0.1 only)

def fetch(port: int, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None,
         timeout: float = 60) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def http_json(port: int, method: str, path: str, body: object = None, headers: dict[str, str] | None = None,
              timeout: float = 60) -> tuple[int, object]:
    hdrs = dict(headers or {})
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        hdrs["Content-Type"] = "application/json"
    status, _, raw = fetch(port, method, path, data, hdrs, timeout)
    try:
        return status, json.loads(raw or b"null")
    except ValueError:
        return status, raw.decode(errors="replace")


def png(seed: int, size: int = 32) -> bytes:
    """A real 32x32 RGB PNG (zlib + CRCs by hand), different for each seed."""
    rows = []
    for y in range(size):
        row = bytearray([0])  # filter: none
        for x in range(size):
            row += bytes(((x * 7 + seed * 53) % 256, (y * 11 + seed * 29) % 256, ((x ^ y) * 5 + seed * 97) % 256))
        rows.append(bytes(row))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", size, size, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"".join(rows), 9))
            + chunk(b"IEND", b""))


def classify(port: int, seed: int) -> dict:
    status, hdrs, raw = fetch(port, "POST", "/classify", png(seed), {"Content-Type": "image/png"})
    if status != 200:
        raise CheckFailed(f"/classify answered {status}: {raw[:500]!r}")
    doc = json.loads(raw)
    (pred,) = doc["predictions"]
    for key in ("exit_index", "exit_name", "num_exits", "flops", "flops_full", "flops_fraction", "profile"):
        if key not in pred:
            raise CheckFailed(f"/classify prediction lacks {key}: {pred}")
    # a sample that reaches the head costs a little more than the plain network (every exit consulted on the way)
    if not (pred["flops"] > 0 and pred["flops_full"] > 0) or not (0 <= pred["exit_index"] < pred["num_exits"]):
        raise CheckFailed(f"/classify exit/FLOPs out of range: {pred}")
    if hdrs.get("x-classmeans-bundle") != doc["bundle"]:
        raise CheckFailed(f"X-Classmeans-Bundle {hdrs.get('x-classmeans-bundle')!r} != {doc['bundle']!r}")
    return pred


def metric_sum(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def metric_by(text: str, name: str, label: str) -> dict[str, float]:
    out: dict[str, float] = {}
    pat = re.compile(rf'^{re.escape(name)}\{{(.*)\}} (\S+)$')
    for line in text.splitlines():
        m = pat.match(line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
            out[labels[label]] = out.get(labels[label], 0.0) + float(m.group(2))
    return out


# ------------------------------------------------------------------------------------------------ the run

class ContainerCheck:
    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.report: dict = {"status": "running", "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                             "checks": [], "seconds": {}, "not_exercised": []}
        self.cleanup = contextlib.ExitStack()
        self.tmp = Path(tempfile.mkdtemp(prefix="cmci-"))  # short: unix socket paths live under it
        self.sock = self.tmp / "docker.sock"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("DOCKER_", "COMPOSE_"))}
        self.env.update({"DOCKER_HOST": f"unix://{self.sock}", "DOCKER_BUILDKIT": "0",
                         "COMPOSE_DOCKER_CLI_BUILD": "0", "DOCKER_CONFIG": str(self.tmp / "client-config"),
                         "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"})
        for k in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
            self.env.pop(k, None)
        self.suffix = secrets.token_hex(3)
        self.dockerfile = (REPO / "Dockerfile").read_text()
        self.base_image = BASE_IMAGE_RE.search(self.dockerfile).group(1)
        start_period = re.search(r"--start-period=(\d+)s", self.dockerfile)
        self.start_period_s = float(start_period.group(1)) if start_period else 90.0

    # -- bookkeeping
    def passed(self, name: str, detail: str = "") -> None:
        self.report["checks"].append({"check": name, "result": "passed", "detail": detail})
        say(f"PASS {name}" + (f": {detail}" if detail else ""))

    def timed(self, key: str, seconds: float) -> None:
        self.report["seconds"][key] = round(seconds, 1)

    def docker(self, *args: str, log: str | None = None, check: bool = True, timeout: float = 600,
               input_bytes: bytes | None = None) -> subprocess.CompletedProcess:
        return run([DOCKER, *args], log=log, check=check, timeout=timeout, env=self.env, input_bytes=input_bytes)

    def out(self, *args: str, timeout: float = 120) -> str:
        return self.docker(*args, timeout=timeout).stdout.decode().strip()

    def write_report(self) -> None:
        self.report["seconds"]["total"] = round(time.monotonic() - self.t0, 1)
        OUT_JSON.parent.mkdir(parents=True, exist_ok=True)
        OUT_JSON.write_text(json.dumps(self.report, indent=2) + "\n")

    # -- 1. packages
    def ensure_packages(self) -> None:
        have = shutil.which
        need = []
        if not (Path("/usr/sbin/dockerd").exists() and Path(DOCKER).exists()):
            need.append("docker.io")
        if not have("debootstrap") and not Path("/usr/sbin/debootstrap").exists():
            need.append("debootstrap")
        if not have("docker-compose"):
            need.append("docker-compose")
        if not need:
            return
        if os.geteuid() != 0:
            raise Skip(f"not root, cannot install {' '.join(need)}")
        if not have("apt-get"):
            raise Skip(f"no apt-get to install {' '.join(need)}")
        say(f"installing {' '.join(need)} (apt)")
        made_policy = False
        policy = Path("/usr/sbin/policy-rc.d")
        if not policy.exists():  # keep package scripts from starting a system dockerd
            policy.write_text("#!/bin/sh\nexit 101\n")
            policy.chmod(0o755)
            made_policy = True
        try:
            env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
            if run(["apt-get", "update", "-qq"], log="apt", check=False, env=env, timeout=600).returncode != 0:
                raise Skip(f"apt-get update failed (see {shown(LOG_DIR / 'apt.log')})")
            if run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *need], log="apt", check=False,
                   env=env, timeout=900).returncode != 0:
                raise Skip(f"apt-get install {' '.join(need)} failed (see {shown(LOG_DIR / 'apt.log')})")
        finally:
            if made_policy:
                policy.unlink(missing_ok=True)

    # -- 2. dockerd
    def host_net_state(self) -> dict[str, str]:
        state = {"ip_forward": Path("/proc/sys/net/ipv4/ip_forward").read_text().strip()}
        for tool in ("iptables-save", "ip6tables-save"):
            if shutil.which(tool):
                out = subprocess.run([tool], capture_output=True, text=True, timeout=60)
                # drop comment lines (they carry a timestamp) and packet counters
                state[tool] = "\n".join(re.sub(r"\[\d+:\d+\]", "", ln) for ln in out.stdout.splitlines()
                                        if not ln.startswith("#"))
        links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, timeout=30).stdout
        state["links"] = " ".join(sorted(re.findall(r"^\d+: ([^:@]+)", links, re.M)))
        return state

    def start_dockerd(self) -> None:
        if os.geteuid() != 0:
            raise Skip("not root: dockerd needs root")
        self.net_before = self.host_net_state()
        data_root = STATE / "data-root"
        data_root.mkdir(parents=True, exist_ok=True)
        (self.tmp / "daemon.json").write_text("{}\n")
        (self.tmp / "client-config").mkdir(exist_ok=True)
        log = (LOG_DIR / "dockerd.log").open("ab")
        self.stop_leftover_dockerd(data_root)
        argv = ["/usr/sbin/dockerd", "--data-root", str(data_root), "--exec-root", str(self.tmp / "exec"),
                "--pidfile", str(STATE / "dockerd.pid"), "--host", f"unix://{self.sock}",
                "--config-file", str(self.tmp / "daemon.json"), "--iptables=false", "--ip-forward=false",
                "--ip-masq=false"]
        say("starting dockerd: " + " ".join(argv[1:]))
        self.dockerd = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True, env={**self.env, "DOCKER_HOST": ""})
        log.close()
        self.cleanup.callback(self.stop_dockerd)

        def up() -> bool:
            if self.dockerd.poll() is not None:
                raise Skip(f"dockerd exited with {self.dockerd.returncode}:\n{tail(LOG_DIR / 'dockerd.log')}")
            return self.docker("version", check=False, timeout=30).returncode == 0

        try:
            wait_for("dockerd", up, 90)
        except CheckFailed as exc:
            raise Skip(f"dockerd did not answer: {exc}\n{tail(LOG_DIR / 'dockerd.log')}") from None
        # the data-root is this script's alone: whatever an interrupted run left in it goes (a compose container
        # with `restart: unless-stopped` would otherwise come back up with the engine)
        leftovers = self.out("ps", "-aq").split()
        if leftovers:
            say(f"removing {len(leftovers)} container(s) left by an interrupted run")
            self.docker("rm", "-f", "-v", *leftovers, timeout=300)
        self.docker("volume", "prune", "-f", check=False, timeout=300)
        self.docker("network", "prune", "-f", check=False, timeout=300)
        info = json.loads(self.out("info", "--format", "{{json .}}"))
        self.report["engine"] = {"server_version": info.get("ServerVersion"), "storage_driver": info.get("Driver"),
                                 "cgroup": f"{info.get('CgroupDriver')}/v{info.get('CgroupVersion')}",
                                 "data_root": str(data_root)}
        say(f"dockerd {info.get('ServerVersion')} up (pid {self.dockerd.pid}, {info.get('Driver')}, "
            f"data-root {data_root})")

    @staticmethod
    def stop_leftover_dockerd(data_root: Path) -> None:
        """A dockerd of an earlier, interrupted run of this script (its pidfile, our data-root): stop it by PID."""
        pidfile = STATE / "dockerd.pid"
        try:
            pid = int(pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            pidfile.unlink(missing_ok=True)
            return
        if not cmdline or not cmdline[0].endswith(b"dockerd") or str(data_root).encode() not in cmdline:
            pidfile.unlink(missing_ok=True)
            return
        say(f"stopping dockerd pid {pid}, left running by an interrupted run on {data_root}")
        os.kill(pid, signal.SIGTERM)
        for _ in range(60):
            if not Path(f"/proc/{pid}").exists():
                break
            time.sleep(1)
        else:
            os.kill(pid, signal.SIGKILL)
            time.sleep(2)
        pidfile.unlink(missing_ok=True)

    def stop_dockerd(self) -> None:
        proc = self.dockerd
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                say(f"dockerd (pid {proc.pid}) ignored SIGTERM for 60 s: SIGKILL")
                proc.kill()
                proc.wait(timeout=30)
        say(f"dockerd (pid {proc.pid}) stopped")
        # what dockerd leaves behind: mounts under its exec-root, its bridge, and (not with the flags used
        # here, but checked) changes to iptables and ip_forward
        for line in reversed(Path("/proc/mounts").read_text().splitlines()):
            mnt = line.split()[1]
            if mnt.startswith(str(self.tmp)) or mnt.startswith(str(STATE / "data-root")):
                subprocess.run(["umount", "-l", mnt], capture_output=True, timeout=30)
        before_links = set(self.net_before["links"].split())
        after = self.host_net_state()
        for link in set(after["links"].split()) - before_links:
            if link == "docker0" or link.startswith(("br-", "veth")):
                subprocess.run(["ip", "link", "delete", link], capture_output=True, timeout=30)
                say(f"removed network link {link} left by dockerd")
        if after["ip_forward"] != self.net_before["ip_forward"]:
            Path("/proc/sys/net/ipv4/ip_forward").write_text(self.net_before["ip_forward"] + "\n")
            say(f"restored ip_forward={self.net_before['ip_forward']}")
        for tool in ("iptables-save", "ip6tables-save"):
            if tool in after and after[tool] != self.net_before.get(tool):
                say(f"{tool}: the rules changed while dockerd ran; removing its DOCKER chains")
                self.flush_docker_chains(tool.replace("-save", ""))
        final = self.host_net_state()
        same = all(final.get(k) == self.net_before.get(k) for k in ("ip_forward", "iptables-save", "ip6tables-save"))
        self.report["host_network_restored"] = same and final["links"] == self.net_before["links"]

    @staticmethod
    def flush_docker_chains(tool: str) -> None:
        for table in ("filter", "nat"):
            rules = subprocess.run([f"{tool}-save", "-t", table], capture_output=True, text=True).stdout
            for ln in rules.splitlines():
                if ln.startswith("-A ") and "DOCKER" in ln and not ln.split()[1].startswith("DOCKER"):
                    subprocess.run([tool, "-t", table, "-D", *ln.split()[1:]], capture_output=True)
            for chain in re.findall(r"^:(DOCKER\S*)", rules, re.M):
                subprocess.run([tool, "-t", table, "-F", chain], capture_output=True)
                subprocess.run([tool, "-t", table, "-X", chain], capture_output=True)

    # -- 3. base image
    def image_labels(self, ref: str) -> dict | None:
        out = self.docker("image", "inspect", "--format", "{{json .Config.Labels}}", ref, check=False, timeout=60)
        if out.returncode != 0:
            return None
        return json.loads(out.stdout or b"null") or {}

    def debian_mirror(self) -> str:
        mirror = os.environ.get("CLASSMEANS_CI_DEBIAN_MIRROR")
        if mirror:
            return mirror
        paths = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
        texts = [p.read_text(errors="replace") for p in paths if p.is_file() and p.suffix in ("", ".list", ".sources")]
        for text in texts:
            for m in re.finditer(r"(?:^URIs:\s*|^deb\s+(?:\[[^\]]*\]\s+)?)(https?://\S+/debian)/?\s", text, re.M):
                return m.group(1)
        return "http://deb.debian.org/debian"

    def ensure_base_image(self) -> None:
        t = time.monotonic()
        labels = self.image_labels(self.base_image)
        if labels is not None:
            kind = "stand-in, cached in the data-root" if STANDIN_LABEL in labels else "present (not a stand-in)"
            say(f"base image {self.base_image}: {kind}")
            self.report["base_image"] = {"ref": self.base_image, "standin": STANDIN_LABEL in labels, "built": False}
            if self.image_labels(BOOKWORM_STANDIN) is None:
                self.docker("tag", self.base_image, BOOKWORM_STANDIN)
            return
        if not self.base_image.startswith("python:3.11-") or "bookworm" not in self.base_image:
            raise CheckFailed(f"the stand-in base is Debian bookworm with Python 3.11; the Dockerfile wants "
                              f"{self.base_image}: update {Path(__file__).name}")
        rootfs = self.tmp / "rootfs"
        mirror = self.debian_mirror()
        say(f"building the stand-in base image {self.base_image}: debootstrap bookworm from {mirror}")
        debootstrap = shutil.which("debootstrap") or "/usr/sbin/debootstrap"
        try:
            run([debootstrap, "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
                 "bookworm", str(rootfs), mirror], log="debootstrap", timeout=1200)
            # the host's CA bundle: pip inside the build reaches PyPI only with it
            shutil.copy2("/etc/ssl/certs/ca-certificates.crt", rootfs / "etc/ssl/certs/ca-certificates.crt")
            (rootfs / "etc/pip.conf").write_text("[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n")
            for sub in ("var/cache/apt/archives", "var/lib/apt/lists"):
                for p in (rootfs / sub).glob("*"):
                    if p.is_file():
                        p.unlink()
            py = run(["chroot", str(rootfs), "python3", "-c", "import sys, venv; print(sys.version.split()[0])"])
            version = py.stdout.decode().strip()
            if not version.startswith("3.11."):
                raise CheckFailed(f"the stand-in's python3 is {version}, not 3.11")
            tar = subprocess.Popen(["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
            changes = ["ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "ENV LANG=C.UTF-8",
                       f"ENV PYTHON_VERSION={version}", 'CMD ["python3"]',
                       f"LABEL {STANDIN_LABEL}=debootstrap-bookworm-python{version}"]
            argv = [DOCKER, "import"]
            for c in changes:
                argv += ["--change", c]
            imp = subprocess.run([*argv, "-", self.base_image], stdin=tar.stdout, capture_output=True,
                                 env=self.env, timeout=900)
            tar.stdout.close()
            tar.wait(timeout=60)
            if imp.returncode != 0 or tar.returncode != 0:
                raise CheckFailed(f"docker import failed: {imp.stderr.decode(errors='replace')[-2000:]}")
        finally:
            shutil.rmtree(rootfs, ignore_errors=True)
        self.docker("tag", self.base_image, BOOKWORM_STANDIN)
        self.timed("base_image", time.monotonic() - t)
        self.report["base_image"] = {"ref": self.base_image, "standin": True, "built": True, "python": version}
        say(f"stand-in base image {self.base_image} (python {version}) in {time.monotonic() - t:.0f} s")

    # -- 4. wheelhouse + build
    def torch_pins(self) -> tuple[str, str]:
        text = (REPO / "docker" / "install.sh").read_text()
        torch = re.search(r'TORCH_VERSION="\$\{TORCH_VERSION:-([^}]+)\}"', text).group(1)
        vision = re.search(r'TORCHVISION_VERSION="\$\{TORCHVISION_VERSION:-([^}]+)\}"', text).group(1)
        return torch, vision

    def serve_wheelhouse(self) -> str:
        """torch + torchvision and their dependencies, from this machine's pip sources, as a PEP 503 index on
        127.0.0.1 (the build runs with --network host)."""
        t = time.monotonic()
        torch, vision = self.torch_pins()
        house = STATE / "wheelhouse"
        files = house / "files"
        stamp = house / f".complete-torch{torch}-torchvision{vision}"
        if not stamp.exists():
            files.mkdir(parents=True, exist_ok=True)
            say(f"pip download torch=={torch} torchvision=={vision} into {files}")
            # the host's interpreter is CPython 3.11 on x86_64 glibc, as is the image's (bookworm)
            run([sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--dest", str(files),
                 f"torch=={torch}", f"torchvision=={vision}"], log="wheelhouse", timeout=1800)
            stamp.write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ\n", time.gmtime()))
        simple = house / "simple"
        shutil.rmtree(simple, ignore_errors=True)
        for whl in files.glob("*.whl"):
            name = re.sub(r"[-_.]+", "-", whl.name.split("-")[0]).lower()
            (simple / name).mkdir(parents=True, exist_ok=True)
            (simple / name / whl.name).symlink_to(whl)
        # a fixed port: the index URL is a build argument, part of the torch layer's cache key
        port = int(os.environ.get("CLASSMEANS_CI_WHEEL_PORT", WHEEL_PORT))
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                say(f"127.0.0.1:{port} is taken: the wheel server takes another port (the torch layer is rebuilt)")
                port = free_port()
        log = (LOG_DIR / "wheel-server.log").open("ab")
        server = subprocess.Popen([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory",
                                   str(house), str(port)], stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

        def stop_server() -> None:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(timeout=10)

        self.cleanup.callback(stop_server)
        wait_for("the wheel server", lambda: fetch(port, "GET", "/simple/torch/")[0] == 200, 30, 0.3)
        size = sum(p.stat().st_size for p in files.glob("*.whl"))
        self.report["wheelhouse"] = {"torch": torch, "torchvision": vision, "files": len(list(files.glob("*.whl"))),
                                     "bytes": size}
        self.timed("wheelhouse", time.monotonic() - t)
        return f"http://127.0.0.1:{port}/simple/"

    def build(self, context: Path, tag: str, index: str, log: str) -> tuple[float, str]:
        t = time.monotonic()
        self.docker("build", "--network", "host", "--build-arg", f"TORCH_INDEX_URL={index}", "-t", tag,
                    str(context), log=log, timeout=3600)
        return time.monotonic() - t, (LOG_DIR / f"{log}.log").read_text(errors="replace")

    @staticmethod
    def torch_step_cached(build_log: str) -> bool:
        """Whether the legacy builder took the `install.sh ... --step torch` layer from its cache."""
        m = re.search(r"Step \d+/\d+ : RUN [^\n]*--step torch[^\n]*\n(.*?)(?=\nStep \d+/\d+ |\Z)", build_log, re.S)
        if not m:
            raise CheckFailed("the build log has no `--step torch` step")
        return "Using cache" in m.group(1)

    def build_image(self) -> None:
        index = self.serve_wheelhouse()
        say(f"docker build -t {IMAGE} (torch from {index}; log {shown(LOG_DIR / 'build.log')})")
        (LOG_DIR / "build.log").write_text("")
        seconds, log = self.build(REPO, IMAGE, index, "build")
        cached = self.torch_step_cached(log)
        size = int(self.out("image", "inspect", "--format", "{{.Size}}", IMAGE))
        history = self.out("history", "--no-trunc", "--format", "{{.Size}}\t{{.CreatedBy}}", IMAGE)
        layers = []
        for ln in history.splitlines():
            sz, _, by = ln.partition("\t")
            layers.append({"size": sz, "created_by": re.sub(r"\s+", " ", by)[:160]})
        torch_layer = next((la["size"] for la in layers if "--step torch" in la["created_by"]), None)
        project_layer = next((la["size"] for la in layers if "--step project" in la["created_by"]), None)
        self.timed("build", seconds)
        self.report["image"] = {"ref": IMAGE, "size_bytes": size, "size": f"{size / 1e9:.2f} GB",
                                "build_seconds": round(seconds, 1), "torch_layer_from_cache": cached,
                                "torch_layer": torch_layer, "project_layer": project_layer, "layers": layers}
        how = "torch layer cached" if cached else "cold: no cached torch layer"
        self.passed("image builds", f"{seconds:.0f} s ({how}), "
                    f"{size / 1e9:.2f} GB (torch layer {torch_layer}, project layer {project_layer})")
        self.index = index

    def rebuild_after_code_change(self) -> None:
        ctx = self.tmp / "rebuild-context"
        ctx.mkdir()
        for name in ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md"):
            shutil.copy2(REPO / name, ctx / name)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".admin_token", ".seed-*", "*.tmp")
        for name in ("service", "docker", "model_store"):
            shutil.copytree(REPO / name, ctx / name, ignore=ignore, symlinks=True)
        with (ctx / "service" / "__init__.py").open("a") as fh:
            fh.write(f"\n# container-check: a code change ({self.suffix})\n")
        self.cleanup.callback(lambda: self.docker("rmi", "-f", REBUILD_IMAGE, check=False, timeout=300))
        seconds, log = self.build(ctx, REBUILD_IMAGE, self.index, "rebuild")
        shutil.rmtree(ctx, ignore_errors=True)
        if not self.torch_step_cached(log):
            raise CheckFailed(f"a change under service/ rebuilt the torch layer (see {shown(LOG_DIR / 'rebuild.log')})")
        project = re.search(r"Step \d+/\d+ : RUN [^\n]*--step project[^\n]*\n(.*?)(?=\nStep )", log, re.S)
        if project is None or "Using cache" in project.group(1):
            raise CheckFailed("the code change did not reach the project layer")
        a = json.loads(self.out("image", "inspect", "--format", "{{json .RootFS.Layers}}", IMAGE))
        b = json.loads(self.out("image", "inspect", "--format", "{{json .RootFS.Layers}}", REBUILD_IMAGE))
        shared = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
        self.timed("rebuild", seconds)
        self.report["rebuild_after_code_change"] = {"seconds": round(seconds, 1), "torch_layer_from_cache": True,
                                                    "shared_layers": shared, "layers": len(b)}
        self.passed("a code change keeps the torch layer", f"rebuild {seconds:.0f} s, torch step 'Using cache', "
                    f"{shared}/{len(b)} layers shared with the first build")

    # -- 6. the image, run
    def container_state(self, name: str) -> dict:
        return json.loads(self.out("inspect", "--format", "{{json .State}}", name))

    def wait_healthy(self, name: str, limit_s: float) -> float:
        t = time.monotonic()

        def healthy() -> bool:
            st = self.container_state(name)
            if not st.get("Running"):
                raise CheckFailed(f"{name} stopped (exit {st.get('ExitCode')}):\n{self.logs(name)}")
            health = (st.get("Health") or {}).get("Status")
            if health == "unhealthy":
                raise CheckFailed(f"{name} is unhealthy: {st['Health'].get('Log', [])[-1:]}\n{self.logs(name)}")
            return health == "healthy"

        try:
            wait_for(f"{name} to become healthy", healthy, limit_s, 1.0)
        except CheckFailed as exc:
            raise CheckFailed(f"{exc}\n{self.logs(name)}") from None
        return time.monotonic() - t

    def logs(self, name: str) -> str:
        out = self.docker("logs", "--tail", "40", name, check=False, timeout=60)
        return (out.stdout + out.stderr).decode(errors="replace")

    def run_service(self, name: str, volume: str, port: int, env_file: Path, read_only: bool) -> None:
        argv = ["run", "-d", "--name", name, "--env-file", str(env_file), "-e", "CLASSMEANS_TORCH_THREADS=1",
                "-p", f"127.0.0.1:{port}:8000", "-v", f"{volume}:{STORE_IN_IMAGE}",
                "--cap-drop", "ALL", "--security-opt", "no-new-privileges:true"]
        if read_only:
            argv += ["--read-only", "--tmpfs", "/tmp:rw,nosuid,nodev,size=64m"]
        self.cleanup.callback(lambda: self.docker("rm", "-f", "-v", name, check=False, timeout=120))
        self.docker(*argv, IMAGE, timeout=120)

    def check_image(self) -> None:
        token = secrets.token_urlsafe(32)
        env_file = self.tmp / "service.env"
        env_file.write_text(f"CLASSMEANS_ADMIN_TOKEN={token}\n")
        env_file.chmod(0o600)
        volume = f"cmci-store-{self.suffix}"
        self.cleanup.callback(lambda: self.docker("volume", "rm", "-f", volume, check=False, timeout=120))
        self.docker("volume", "create", volume)
        name = f"cmci-svc-{self.suffix}"
        port = free_port()

        # healthy within the start period, with a read-only root file system
        self.run_service(name, volume, port, env_file, read_only=True)
        took = self.wait_healthy(name, self.start_period_s + 60)
        if took > self.start_period_s:
            raise CheckFailed(f"healthy after {took:.0f} s, past the start period ({self.start_period_s:.0f} s)")
        self.report["healthy_after_seconds"] = round(took, 1)
        self.passed("healthy within the start period", f"{took:.0f} s <= {self.start_period_s:.0f} s "
                    "(docker's HEALTHCHECK, docker/healthcheck.py on /v2/health/ready), read-only root fs")

        pred = classify(port, 1)
        self.passed("/classify answers a real PNG", f"exit {pred['exit_index']} ({pred['exit_name']}) of "
                    f"{pred['num_exits']}, {pred['flops']:.3g} of {pred['flops_full']:.3g} FLOPs, "
                    f"profile {pred['profile']}")

        # uid/gid of the server process, seen from the host
        pid = self.container_state(name)["Pid"]
        status = Path(f"/proc/{pid}/status").read_text()
        uids = re.search(r"^Uid:\s+(.*)$", status, re.M).group(1).split()
        gids = re.search(r"^Gid:\s+(.*)$", status, re.M).group(1).split()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        ident = self.out("exec", name, "id")
        if set(uids) != {str(UID)} or set(gids) != {str(GID)} or "classmeans" not in cmdline:
            raise CheckFailed(f"server process {cmdline!r}: Uid {uids} Gid {gids} (want {UID}/{GID}); id: {ident}")
        self.passed("runs as uid/gid 10001", f"PID 1 `{cmdline}`: Uid {'/'.join(uids)} Gid {'/'.join(gids)}; "
                    f"`id`: {ident}")

        # the volume: seeded, owned by 10001; nothing else writable but /tmp
        foreign = self.out("exec", name, "find", STORE_IN_IMAGE, "(", "!", "-uid", str(UID), "-o", "!", "-gid",
                           str(GID), ")")
        listing = self.out("exec", name, "ls", STORE_IN_IMAGE)
        if foreign or DEFAULT_MODEL not in listing.split():
            raise CheckFailed(f"volume: not owned by {UID}:{GID}: {foreign!r}; holds {listing!r}")
        probe = self.docker("exec", name, "sh", "-c", "touch /app/x /opt/venv/x /var/lib/classmeans/x",
                            check=False, timeout=60)
        if probe.returncode == 0:
            raise CheckFailed("the root file system is writable despite --read-only")
        self.passed("the volume is seeded and owned by 10001:10001",
                    f"{STORE_IN_IMAGE} holds {listing.split()} (entrypoint.sh seeded it), every file owned by "
                    f"{UID}:{GID}; the read-only root refuses writes to /app, /opt/venv, /var/lib/classmeans")

        # the admin token from the environment
        status, profiles = http_json(port, "GET", "/profiles")
        if status != 200:
            raise CheckFailed(f"GET /profiles: {status} {profiles}")
        current = profiles["active"]["name"]
        choices = [p["name"] for p in profiles["profiles"] if not p["active"] and p["name"] != current]
        if not choices:
            raise CheckFailed(f"no inactive profile to switch to: {profiles}")
        target = choices[0]
        answers = {}
        for label, hdrs in (("no token", {}), ("wrong token", {"Authorization": f"Bearer {secrets.token_urlsafe(32)}"}),
                            ("the token", {"Authorization": f"Bearer {token}"})):
            answers[label] = http_json(port, "POST", "/profiles", {"name": target}, hdrs)
        if answers["no token"][0] != 401 or answers["wrong token"][0] != 401:
            raise CheckFailed(f"admin route without the right token: {answers}")
        code, body = answers["the token"]
        if not 200 <= code < 300 or body["active"]["name"] != target:
            raise CheckFailed(f"POST /profiles with the token: {code} {body}")
        err = answers["no token"][1]
        self.passed("the admin token from the environment is enforced",
                    f"POST /profiles: 401 without ({err['error']['code'] if isinstance(err, dict) else err}), 401 "
                    f"with a wrong token, {code} with CLASSMEANS_ADMIN_TOKEN; active {current} -> {target}")
        version = body["version"]

        # docker stop lets an in-flight request finish
        self.check_graceful_stop(name, port)

        # a new container on the same volume keeps the activated profile; a writable root fs: docker diff
        self.docker("rm", name, timeout=120)
        port2 = free_port()
        name2 = f"cmci-svc2-{self.suffix}"
        self.run_service(name2, volume, port2, env_file, read_only=False)
        self.wait_healthy(name2, self.start_period_s + 60)
        status, profiles = http_json(port2, "GET", "/profiles")
        if status != 200 or profiles["active"]["name"] != target or profiles["version"] < version:
            raise CheckFailed(f"after a restart: {status} active {profiles.get('active')} version "
                              f"{profiles.get('version')} (want {target}, >= {version})")
        classify(port2, 2)
        seeded = "seeded model" in self.logs(name2)
        if seeded:
            raise CheckFailed("the second container seeded the volume again")
        self.passed("a new container on the volume keeps the activated profile",
                    f"active {target}, version {profiles['version']}; the volume was not re-seeded")
        diff = [ln.split(None, 1) for ln in self.out("diff", name2).splitlines()]
        outside = [path for _, path in diff if path != "/tmp" and not path.startswith("/tmp/")]
        if outside:
            raise CheckFailed(f"the server wrote outside the volume and /tmp: {outside}")
        self.passed("writes only to the volume (and /tmp)",
                    "runs with --read-only + tmpfs /tmp; `docker diff` of a writable run: "
                    + (", ".join(p for _, p in diff) or "empty"))
        self.docker("stop", "-t", "45", name2, timeout=120)

    def check_graceful_stop(self, name: str, port: int) -> None:
        body = png(7)
        half = len(body) // 2
        head = (f"POST /classify HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: image/png\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        try:
            sock.sendall(head + body[:half])
            time.sleep(1.0)  # the server has the request line and headers: the request is in flight
            t = time.monotonic()
            stopper = subprocess.Popen([DOCKER, "stop", "-t", "45", name], env=self.env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT)

            def draining() -> bool:  # readiness flips at once on SIGTERM (or the listener is gone)
                try:
                    return fetch(port, "GET", "/v2/health/ready", timeout=5)[0] != 200
                except (OSError, http.client.HTTPException):
                    return True

            wait_for("the server to start draining", draining, 20, 0.2)
            sock.sendall(body[half:])
            chunks = []
            while True:
                data = sock.recv(65536)
                if not data:
                    break
                chunks.append(data)
        finally:
            sock.close()
        raw = b"".join(chunks)
        stopper.wait(timeout=120)
        stop_s = time.monotonic() - t
        status_line = raw.split(b"\r\n", 1)[0].decode(errors="replace")
        payload = raw.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in raw else b""
        if " 200 " not in status_line + " ":
            raise CheckFailed(f"the in-flight request got {status_line!r} {payload[:300]!r}\n{self.logs(name)}")
        pred = json.loads(payload)["predictions"][0]
        st = self.container_state(name)
        if st["Running"] or st["ExitCode"] == 137 or st.get("OOMKilled") or stop_s >= 45:
            raise CheckFailed(f"docker stop: exit {st['ExitCode']} after {stop_s:.1f} s (killed?)\n{self.logs(name)}")
        self.passed("docker stop lets an in-flight request finish",
                    f"request sent half before SIGTERM, rest during the drain: 200 (exit {pred['exit_index']}); "
                    f"container exited {st['ExitCode']} after {stop_s:.1f} s (< 45 s, no SIGKILL)")

    # -- 7. compose with Prometheus
    def compose_cmd(self) -> list[str]:
        exe = shutil.which("docker-compose")
        if exe and run([exe, "version"], check=False, env=self.env).returncode == 0:
            return [exe]
        if self.docker("compose", "version", check=False).returncode == 0:
            return [DOCKER, "compose"]
        raise CheckFailed("neither docker-compose nor the docker compose plugin runs here")

    def ensure_prometheus_image(self) -> str:
        compose_text = (REPO / "docker-compose.yml").read_text()
        ref = re.search(r"^\s+image:\s*(prom/prometheus:\S+)", compose_text, re.M).group(1)
        recipe = (REPO / ".ci" / "prometheus-standin.Dockerfile").read_bytes()
        stamp = f"debian-prometheus-{hashlib.sha256(recipe).hexdigest()[:12]}"
        labels = self.image_labels(ref)
        if labels is not None and labels.get(STANDIN_LABEL) == stamp:
            say(f"{ref}: stand-in cached in the data-root")
            return ref
        t = time.monotonic()
        ctx = self.tmp / "prometheus-context"
        ctx.mkdir()
        shutil.copy2(REPO / ".ci" / "prometheus-standin.Dockerfile", ctx / "Dockerfile")
        say(f"building the stand-in {ref} from Debian's prometheus package")
        self.docker("build", "--network", "host", "--build-arg", f"BASE={BOOKWORM_STANDIN}", "--label",
                    f"{STANDIN_LABEL}={stamp}", "-t", ref, str(ctx), log="prometheus-build", timeout=1800)
        self.timed("prometheus_image", time.monotonic() - t)
        return ref

    def check_compose(self) -> None:
        prom_ref = self.ensure_prometheus_image()
        compose = self.compose_cmd()
        project = self.tmp / "compose"
        (project / "docker").mkdir(parents=True)
        shutil.copy2(REPO / "docker-compose.yml", project / "docker-compose.yml")
        for sub in ("prometheus", "grafana"):
            shutil.copytree(REPO / "docker" / sub, project / "docker" / sub)
        token = secrets.token_urlsafe(32)
        (project / "docker" / ".env").write_text(f"CLASSMEANS_ADMIN_TOKEN={token}\nCLASSMEANS_TORCH_THREADS=1\n")
        port, prom_port = free_port(), free_port()
        name = f"cmci{self.suffix}"
        env = {**self.env, "CLASSMEANS_PUBLISHED_PORT": str(port), "PROMETHEUS_PUBLISHED_PORT": str(prom_port),
               "COMPOSE_PROJECT_NAME": name}
        base = [*compose, "--project-directory", str(project), "-f", str(project / "docker-compose.yml"),
                "-p", name]
        run([*base, "config", "-q"], env=env, timeout=120)
        self.cleanup.callback(lambda: run([*base, "down", "-v", "--remove-orphans", "-t", "45"], env=env,
                                          log="compose", check=False, timeout=300))
        t = time.monotonic()
        run([*base, "up", "-d", "--no-build", "classmeans", "prometheus"], env=env, log="compose", timeout=600)
        svc = run([*base, "ps", "-q", "classmeans"], env=env).stdout.decode().strip()
        took = self.wait_healthy(svc, self.start_period_s + 60)
        mtext = fetch(port, "GET", "/metrics")[2].decode()
        base_count = metric_sum(mtext, "classmeans_exit_depth_count")
        base_buckets = metric_by(mtext, "classmeans_exit_depth_bucket", "le")
        preds = [classify(port, 100 + i) for i in range(12)]
        exits = [p["exit_index"] for p in preds]
        (num_exits,) = {p["num_exits"] for p in preds}

        def target_up() -> dict | None:
            _, doc = http_json(prom_port, "GET", "/api/v1/targets", timeout=10)
            for tgt in doc["data"]["activeTargets"]:
                if tgt["labels"].get("job") == "classmeans" and tgt["health"] == "up":
                    return tgt
            return None

        tgt = wait_for("Prometheus to see the classmeans target up", target_up, 90, 2.0)
        self.passed("compose: Prometheus scrapes the service container",
                    f"docker-compose up (classmeans healthy after {took:.0f} s); /api/v1/targets: job classmeans "
                    f"{tgt['scrapeUrl']} health up")

        def query(q: str) -> dict[str, float]:
            from urllib.parse import quote
            _, doc = http_json(prom_port, "GET", f"/api/v1/query?query={quote(q)}", timeout=10)
            if doc.get("status") != "success":
                raise CheckFailed(f"{q}: {doc}")
            return {json.dumps(r["metric"], sort_keys=True): float(r["value"][1]) for r in doc["data"]["result"]}

        want = base_count + len(exits)
        wait_for(f"sum(classmeans_exit_depth_count) == {want:g}",
                 lambda: list(query("sum(classmeans_exit_depth_count)").values()) == [want], 90, 2.0)
        buckets = {json.loads(k).get("le"): v for k, v in query("sum by (le) (classmeans_exit_depth_bucket)").items()}
        bounds = sorted(float(le) for le in buckets if le != "+Inf")
        if bounds != [float(j) for j in range(num_exits)] or "+Inf" not in buckets:
            raise CheckFailed(f"exit-depth buckets {sorted(buckets)}, want le=0..{num_exits - 1} and +Inf")
        for le, value in buckets.items():
            bound = float("inf") if le == "+Inf" else float(le)
            expected = base_buckets.get(le, 0.0) + sum(1 for e in exits if e <= bound)
            if value != expected:
                raise CheckFailed(f"exit-depth bucket le={le}: Prometheus {value}, requests {expected} ({exits})")
        self.passed("compose: Prometheus holds the requests' exit-depth samples",
                    f"sum(classmeans_exit_depth_count) = {want:g} ({base_count:g} warm-up + {len(exits)} requests), "
                    f"every bucket of sum by (le) (classmeans_exit_depth_bucket) equals the responses' exits "
                    f"{exits} over {num_exits} exits; image {prom_ref} (stand-in)")

        t = time.monotonic()
        run([*base, "stop", "-t", "45", "classmeans"], env=env, log="compose", timeout=300)
        stop_s = time.monotonic() - t
        st = self.container_state(svc)
        if st["ExitCode"] == 137 or stop_s >= 45:
            raise CheckFailed(f"compose stop: exit {st['ExitCode']} after {stop_s:.1f} s")
        self.passed("compose: stop through init: true", f"exit {st['ExitCode']} after {stop_s:.1f} s (< 45 s)")
        self.report["compose"] = {"tool": " ".join(Path(c).name for c in compose)}

    # -- the whole run
    def main(self) -> int:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        for old in LOG_DIR.glob("*.log"):
            old.unlink()
        if os.environ.get("CLASSMEANS_SKIP_CONTAINER_CHECK") == "1":
            return self.skip("CLASSMEANS_SKIP_CONTAINER_CHECK=1")
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, _interrupt)
        self.report["not_exercised"] = [
            "Grafana: no image can be pulled; its dashboard JSON and provisioning are checked offline "
            "(tests/deploy/test_dashboard.py, test_compose.py)",
            "PyTorch's CPU wheel index (unreachable here): the image gets torch/torchvision from a local "
            "wheelhouse of this machine's pip sources (the CUDA build), so its size is not the published image's",
            "the real python:3.11-slim-bookworm and prom/prometheus images: local stand-ins (Debian bookworm)",
            "dockerd's iptables mode: this dockerd runs with --iptables=false (the host's firewall is left alone), "
            "so published ports go through docker-proxy, as they do for 127.0.0.1 anyway",
        ]
        try:
            with self.cleanup:
                t = time.monotonic()
                self.ensure_packages()
                self.start_dockerd()
                self.timed("setup", time.monotonic() - t)
                self.ensure_base_image()
                self.build_image()
                self.rebuild_after_code_change()
                t = time.monotonic()
                self.check_image()
                self.timed("image_checks", time.monotonic() - t)
                t = time.monotonic()
                self.check_compose()
                self.timed("compose_checks", time.monotonic() - t)
                self.docker("image", "prune", "-f", check=False, timeout=300)  # dangling layers of old builds
            self.report["status"] = "passed"
        except Skip as exc:
            return self.skip(str(exc))
        except (CheckFailed, KeyboardInterrupt, subprocess.TimeoutExpired) as exc:
            self.report["status"] = "failed"
            self.report["error"] = str(exc)[-4000:]
            say(f"FAIL: {exc}")
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.write_report()
        if not self.report.get("host_network_restored", True):
            say("warning: the host's iptables/ip_forward/links differ from before dockerd started")
        passed = len(self.report["checks"])
        if self.report["status"] == "passed":
            im = self.report["image"]
            secs = self.report["seconds"]
            say(f"image {im['size']}, build {im['build_seconds']:.0f} s (rebuild after a code change "
                f"{secs.get('rebuild', 0):.0f} s), whole check {secs['total']:.0f} s; "
                f"report {shown(OUT_JSON)}")
            say(f"{passed} passed, 0 failed")
            return 0
        say(f"{passed} passed, 1 failed")
        return 1

    def skip(self, reason: str) -> int:
        self.report["status"] = "skipped"
        self.report["skipped_reason"] = reason
        say(f"SKIPPED: {reason}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.write_report()
        return 0


def main() -> int:
    return ContainerCheck().main()


if __name__ == "__main__":
    sys.exit(main())
