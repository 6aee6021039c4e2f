"""A booted systemd-nspawn container, driven with nsenter.

On these machines PID 1 is not systemd, so the container is started with
``--register=no --keep-unit`` (no machined, no scope unit) and a private
network (only its own loopback). Commands enter every namespace of the
container's PID 1. It is stopped by signalling the nspawn process that we
started; if that does not end it in time, both nspawn and the container's
PID 1 (and with it every process of the container) are killed by PID.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Sequence

from tests.package.rootfs import SYSPATH

BOOT_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
INNER_ENV = ["env", "-i", "PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8",
             "DEBIAN_FRONTEND=noninteractive", "SYSTEMD_PAGER=", "SYSTEMD_COLORS=0"]


class ContainerError(RuntimeError):
    pass


class Container:
    def __init__(self, root: Path, log: Path, name: str = "metaproxy-test") -> None:
        self.root = root
        self.log = log
        self.name = name
        self.nspawn: subprocess.Popen[bytes] | None = None
        self.pid1 = 0

    # ---- life cycle -----------------------------------------------------------------

    def boot(self) -> None:
        argv = ["systemd-nspawn", "--register=no", "--keep-unit", "--quiet", "--boot",
                f"--directory={self.root}", f"--machine={self.name}", "--private-network",
                "--link-journal=no", "--resolv-conf=off", "--timezone=off"]
        with open(self.log, "wb") as out:
            self.nspawn = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out,
                                           stderr=subprocess.STDOUT, env={"PATH": SYSPATH},
                                           start_new_session=True)
        deadline = time.monotonic() + BOOT_TIMEOUT
        # 1. nspawn's child becomes the container's PID 1 once it has exec'd systemd.
        while time.monotonic() < deadline and not self.pid1:
            if self.nspawn.poll() is not None:
                raise ContainerError(f"systemd-nspawn exited with {self.nspawn.returncode}:\n{self.console()}")
            child = self._child_of(self.nspawn.pid)
            if child and _comm(child) == "systemd":
                self.pid1 = child
            else:
                time.sleep(0.05)
        if not self.pid1:
            raise ContainerError(f"no systemd under nspawn {self.nspawn.pid} after {BOOT_TIMEOUT}s:\n"
                                 f"{self.console()}")
        # 2. Until its manager answers, systemctl says "offline"; then --wait waits for the boot.
        state = ""
        while time.monotonic() < deadline:
            state = self.run(["systemctl", "is-system-running", "--wait"], check=False,
                             timeout=max(1.0, deadline - time.monotonic())).stdout.strip()
            if state not in ("offline", "unknown", ""):
                break
            time.sleep(0.1)
        if state not in ("running", "degraded"):
            raise ContainerError(f"the container did not finish booting ({state!r}):\n{self.console()}")
        if state == "degraded":
            failed = self.run(["systemctl", "--failed", "--no-legend"], check=False).stdout
            raise ContainerError(f"the container booted degraded; failed units:\n{failed}")

    def stop(self) -> None:
        """Power the container off through nspawn; kill by PID what is left."""
        if self.nspawn is None:
            return
        if self.nspawn.poll() is None:
            self.nspawn.send_signal(signal.SIGTERM)  # nspawn asks the container's systemd to power off
            try:
                self.nspawn.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.nspawn.kill()
                self.nspawn.wait(timeout=STOP_TIMEOUT)
        if self.pid1 and _alive(self.pid1):
            os.kill(self.pid1, signal.SIGKILL)  # ends every process in its PID namespace
            for _ in range(100):
                if not _alive(self.pid1):
                    break
                time.sleep(0.05)
        self.nspawn = None

    def console(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-4000:]
        except OSError:
            return "(no console log)"

    # ---- commands -------------------------------------------------------------------

    def run(self, argv: Sequence[str], *, check: bool = True, timeout: float = 60.0,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` inside the container (every namespace, its root and cwd)."""
        if not self.pid1:
            raise ContainerError("the container is not running")
        full = ["nsenter", "-t", str(self.pid1), "-a", "-r", "-w", *INNER_ENV, *argv]
        result = subprocess.run(full, capture_output=True, text=True, timeout=timeout, input=input,
                                env={"PATH": SYSPATH}, stdin=None if input is not None else subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise ContainerError(f"in the container, {' '.join(argv)!r} exited with {result.returncode}:\n"
                                 f"{result.stdout[-3000:]}{result.stderr[-3000:]}")
        return result

    def sh(self, script: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        return self.run(["sh", "-ec", script], **kwargs)  # type: ignore[arg-type]

    def write(self, path: str, text: str) -> None:
        """Write a file through the container's own view (its root, not ours)."""
        self.run(["sh", "-c", 'cat > "$1"', "sh", path], input=text)

    @staticmethod
    def _child_of(pid: int) -> int:
        try:
            tasks = Path(f"/proc/{pid}/task").iterdir()
            children = [int(c) for t in tasks for c in (t / "children").read_text().split()]
        except (OSError, ValueError):
            return 0
        return children[0] if children else 0


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def run_once(root: Path, argv: Sequence[str], *, cwd: str, env: Sequence[str] = (),
             binds_ro: Sequence[tuple[Path, str]] = (), timeout: float = 900.0) -> subprocess.CompletedProcess[str]:
    """Run one command in ``root`` under systemd-nspawn, without booting it.

    The same private network as a booted container (only its own loopback); a
    stub init as PID 1 (--as-pid2) reaps what the command leaves behind. On
    timeout the nspawn process we started is killed by PID, and with it the
    container's PID namespace.
    """
    full = ["systemd-nspawn", "--register=no", "--keep-unit", "--quiet", "--as-pid2", f"--directory={root}",
            f"--machine=metaproxy-run-{os.getpid()}", "--private-network", "--link-journal=no", "--resolv-conf=off",
            "--timezone=off", f"--chdir={cwd}",
            *(f"--bind-ro={host}:{inner}" for host, inner in binds_ro),
            *(f"--setenv={e}" for e in ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8", *env]),
            "--", *argv]
    # SYSTEMD_SECCOMP=0: no filter of nspawn's own, so the tests see only the ones they load.
    process = subprocess.Popen(full, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, env={"PATH": SYSPATH, "SYSTEMD_SECCOMP": "0"}, start_new_session=True)
    try:
        out, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        pid1 = Container._child_of(process.pid)
        process.kill()
        if pid1 and _alive(pid1):
            os.kill(pid1, signal.SIGKILL)  # the container's PID 1: ends every process in its namespace
        out, _ = process.communicate(timeout=STOP_TIMEOUT)
        raise ContainerError(f"{' '.join(argv)!r} in {root} did not finish in {timeout:.0f}s:\n{out[-4000:]}")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=STOP_TIMEOUT)
    return subprocess.CompletedProcess(argv, process.returncode, out, "")
