"""A real OpenSSH server on 127.0.0.1 for the SSH push tests.

`Sshd` writes a private sshd_config (its own host key, one authorized
client key, public-key login only, `StrictModes no`, root allowed with a key
only), runs `/usr/sbin/sshd -D -e` on the given port and stops it again.
Pushes through it run the real `git-receive-pack` over a real SSH session,
as a forge's SSH endpoint does. `find_sshd()` says where sshd is, or None:
Debian's `openssh-server` package provides it (`make test` installs it when
it runs as root with apt).
"""

from __future__ import annotations

import getpass
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

__all__ = ["Sshd", "find_sshd", "keygen", "port_is_free"]

MISSING = ("no sshd: install Debian's openssh-server (`apt-get install openssh-server`; "
           "`make test` does it when run as root with apt)")


def find_sshd() -> str | None:
    found = shutil.which("sshd") or "/usr/sbin/sshd"
    return found if os.access(found, os.X_OK) and shutil.which("ssh-keygen") else None


def keygen(path: Path, comment: str = "meshc-test") -> Path:
    """A fresh passphrase-less ed25519 key pair at `path` and `path`.pub."""
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, capture_output=True)
    return path


def port_is_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


class Sshd:
    """sshd on host:port, trusting `client_pub`; `host_key` is its own (generated)."""

    def __init__(self, workdir: Path, port: int, client_pub: Path, host: str = "127.0.0.1"):
        self.dir, self.host, self.port = workdir, host, port
        self.dir.mkdir(parents=True, exist_ok=True)
        self.host_key = keygen(self.dir / "ssh_host_ed25519_key", "meshc-test-host")
        (self.dir / "authorized_keys").write_text(client_pub.read_text())
        self.user = getpass.getuser()
        self.log = self.dir / "sshd.log"
        self.config = self.dir / "sshd_config"
        self.config.write_text(
            f"Port {port}\n"
            f"ListenAddress {host}\n"
            f"HostKey {self.host_key}\n"
            f"PidFile {self.dir / 'sshd.pid'}\n"
            f"AuthorizedKeysFile {self.dir / 'authorized_keys'}\n"
            "PubkeyAuthentication yes\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "PermitRootLogin prohibit-password\n"
            "StrictModes no\n"
            "UsePAM no\n"
            "LogLevel VERBOSE\n")
        self._proc: subprocess.Popen | None = None

    @property
    def known_hosts_line(self) -> str:
        """This server's line for a known_hosts file."""
        name = self.host if self.port == 22 else f"[{self.host}]:{self.port}"
        kind, key = Path(f"{self.host_key}.pub").read_text().split()[:2]
        return f"{name} {kind} {key}\n"

    def __enter__(self) -> "Sshd":
        sshd = find_sshd()
        assert sshd, MISSING
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # root's sshd wants its privsep directory
        with self.log.open("wb") as log:
            self._proc = subprocess.Popen([sshd, "-D", "-e", "-f", str(self.config)],
                                          stdout=log, stderr=subprocess.STDOUT)
        self._wait_ready()
        return self

    def _wait_ready(self, timeout_s: float = 20.0) -> None:
        """Until the server greets with its SSH banner (or fails: its log says why)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"sshd exited {self._proc.returncode}: {self.log.read_text()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=1) as sock:
                    if sock.recv(64).startswith(b"SSH-2.0-"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        self.__exit__()
        raise RuntimeError(f"sshd did not come up on {self.host}:{self.port}: {self.log.read_text()}")

    def __exit__(self, *exc) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
