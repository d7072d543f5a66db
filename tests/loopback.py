"""A Flower deployment on loopback for tests: a real SuperLink and SuperNodes, runs started by
`flwr run`, and every process (and every helper Flower starts) gone afterwards."""

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

BIN = Path(sys.executable).parent
SRC = Path(__file__).resolve().parents[1] / "src" / "fedit"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _live(match, wait: float) -> list[int]:
    """PIDs of running (not zombie) processes whose command line matches, after up to ``wait`` s."""
    deadline = time.time() + wait
    while True:
        found = []
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == os.getpid():
                continue
            try:
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if state != "Z" and match(cmd):
                found.append(int(d.name))
        if not found or time.time() > deadline:
            return found
        time.sleep(1)


def _wait_port(port: int, timeout: float = 60.0) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        try:
            os.killpg(p.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.time() + 20
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)


@contextmanager
def deployment(tmp_path: Path, node_configs: list[str]):
    """A SuperLink and one SuperNode per node config; yields ``run(app_folder, run_config)``,
    which runs `flwr run` against them and returns the finished process."""
    link = free_port()
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
                                      f'address = "127.0.0.1:{link}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
           "OMP_NUM_THREADS": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # Flower starts its own helpers by name
    procs: list[subprocess.Popen] = []

    def start(args, log):
        p = subprocess.Popen(args, env=env, stdout=open(tmp_path / log, "w"), stderr=subprocess.STDOUT,
                             start_new_session=True)  # own process group: its children die with it
        procs.append(p)

    def run(app: Path, run_config: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "flwr"), "run", str(app), "loopback", "--stream", "--run-config", run_config],
                              env=env, capture_output=True, text=True, timeout=600)

    try:
        start([str(BIN / "flower-superlink"), "--insecure", "--port", str(link),
               "--disable-runtime-dependency-installation"], "superlink.log")
        _wait_port(link)
        for i, nc in enumerate(node_configs):
            start([str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link}",
                   "--port", str(free_port()), "--node-config", nc], f"node{i}.log")
        yield run
    finally:
        _stop(procs)
        # Every process we started, and every helper Flower started for them (SuperExec,
        # ServerApp, ClientApp processes: their command lines name our port), has ended.
        left = _live(lambda cmd: str(link) in cmd or str(tmp_path) in cmd, wait=30)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"processes still running after the test: {left}"
