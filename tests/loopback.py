"""A Flower deployment on loopback for tests, set up as users run one: a real SuperLink with TLS
(a CA and a server certificate for 127.0.0.1/localhost made here) and SuperNode authentication
(each node's key pair made here, its public key registered with `flwr supernode register`),
SuperNodes that present their key and trust the CA, runs started by `flwr run`; and every
process (and every helper Flower starts) gone afterwards. docs/federation.md gives the same
sequence as shell commands."""

import datetime
import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

BIN = Path(sys.executable).parent
SRC = Path(__file__).resolve().parents[1] / "src" / "fedit"
REFUSED_EXIT = 305  # Flower's exit code (in the SuperNode's log) when the SuperLink will not activate it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- credentials -----------------------------------------------------------------------------
# The commands of docs/federation.md ("TLS and node authentication"), run in the folder.
OPENSSL = [
    "openssl ecparam -genkey -name secp384r1 -out ca.key",
    "openssl req -x509 -new -key ca.key -sha256 -days 365 -subj /CN=fedit-CA -out ca.crt",
    "openssl ecparam -genkey -name secp384r1 -out server.key",
    "openssl req -new -key server.key -subj /CN=localhost -out server.csr",
    "openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 -sha256 "
    "-extfile server.ext -out server.pem",
]
SERVER_EXT = "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=critical,CA:FALSE\n"


def tls_files(folder: Path) -> dict[str, Path]:
    """A CA (``ca.crt``) and a server certificate it signed for 127.0.0.1 and localhost
    (``server.pem``, key ``server.key``): with the openssl commands of docs/federation.md, or
    their equivalent in ``cryptography`` where there is no openssl binary."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"ca": folder / "ca.crt", "cert": folder / "server.pem", "key": folder / "server.key"}
    if shutil.which("openssl"):
        (folder / "server.ext").write_text(SERVER_EXT)
        for cmd in OPENSSL:
            subprocess.run(cmd.split(), cwd=folder, check=True, capture_output=True)
        return files
    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject: str, key, issuer: x509.Name, signer, ca: bool, names=()):
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
             .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=365))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if names:
            b = b.add_extension(x509.SubjectAlternativeName(list(names)), critical=False)
        return b.sign(signer, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedit-CA")])
    ca = cert("fedit-CA", ca_key, ca_name, ca_key, ca=True)
    key = ec.generate_private_key(ec.SECP384R1())
    server = cert("localhost", key, ca_name, ca_key, ca=False,
                  names=(x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))))
    files["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files["cert"].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    files["key"].write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    return files


def node_keys(folder: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's key pair, EC P-384 in OpenSSH format: ``ssh-keygen -t ecdsa -b 384`` (or the
    same made with ``cryptography``). Returns (private key file, public key file)."""
    folder.mkdir(parents=True, exist_ok=True)
    priv, pub = folder / name, folder / f"{name}.pub"
    if shutil.which("ssh-keygen"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(priv)], check=True,
                       capture_output=True)
        return priv, pub
    key = ec.generate_private_key(ec.SECP384R1())
    priv.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                       serialization.NoEncryption()))
    priv.chmod(0o600)
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH))
    return priv, pub


# --- processes -------------------------------------------------------------------------------
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


def wait_for(check, timeout: float, what: str) -> None:
    """Poll ``check()`` until true; a test failure naming ``what`` after ``timeout`` s (a hang guard, not a timing claim)."""
    deadline = time.time() + timeout
    while not check():
        if time.time() > deadline:
            raise AssertionError(f"gave up waiting for {what} after {timeout:.0f} s")
        time.sleep(0.5)


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


class Deployment:
    """A running SuperLink (TLS, node authentication) and its SuperNodes; calling it runs `flwr run`."""

    def __init__(self, tmp_path: Path):
        self.tmp, self.link = tmp_path, free_port()
        self.tls = tls_files(tmp_path / "tls")
        self.keys = tmp_path / "keys"
        home = tmp_path / "flwr-home"
        home.mkdir()
        # the connection `flwr run` and `flwr supernode register` use: address and the CA to trust
        (home / "config.toml").write_text(f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\n'
                                          f'address = "127.0.0.1:{self.link}"\n'
                                          f'root-certificates = "{self.tls["ca"]}"\n')
        self.env = {**os.environ, "FLWR_HOME": str(home), "FLWR_TELEMETRY_ENABLED": "0",
                    "FLWR_DISABLE_UPDATE_CHECK": "1", "OMP_NUM_THREADS": "1",
                    "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}  # Flower starts its helpers by name
        self.procs: list[subprocess.Popen] = []
        self.nodes: list[subprocess.Popen | None] = []

    def _start(self, args: list[str], log: str) -> subprocess.Popen:
        p = subprocess.Popen(args, env=self.env, stdout=open(self.tmp / log, "a"), stderr=subprocess.STDOUT,
                             start_new_session=True)  # own process group: its children die with it
        self.procs.append(p)
        return p

    def log(self, name: str) -> str:
        return (self.tmp / name).read_text(errors="replace")

    def start_superlink(self) -> None:
        t = self.tls
        self._start([str(BIN / "flower-superlink"), "--ssl-ca-certfile", str(t["ca"]), "--ssl-certfile", str(t["cert"]),
                     "--ssl-keyfile", str(t["key"]), "--enable-supernode-auth", "--port", str(self.link),
                     "--disable-runtime-dependency-installation"], "superlink.log")
        _wait_port(self.link)

    def register(self, public_key: Path) -> None:
        done = subprocess.run([str(BIN / "flwr"), "supernode", "register", str(public_key), "loopback"],
                              env=self.env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "registered successfully" in done.stdout, done.stdout + done.stderr

    def start_node(self, name: str, node_config: str) -> subprocess.Popen:
        """Start SuperNode ``name`` (its key pair ``keys/name``, made if missing) with ``node_config``."""
        priv = self.keys / name
        if not priv.exists():
            node_keys(self.keys, name)
        return self._start([str(BIN / "flower-supernode"), "--root-certificates", str(self.tls["ca"]),
                            "--superlink", f"127.0.0.1:{self.link}", "--auth-supernode-private-key", str(priv),
                            "--port", str(free_port()), "--node-config", node_config], f"{name}.log")

    def kill_node(self, i: int) -> None:
        """SIGKILL node ``i``'s process group (the SuperNode and the ClientApp it runs): a crash."""
        p = self.nodes[i]
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(timeout=30)

    def restart_node(self, i: int, node_config: str) -> None:
        """Start node ``i`` again with its own (registered) key: the SuperLink knows it by the same node id."""
        self.nodes[i] = self.start_node(f"node{i}", node_config)

    def start_run(self, app: Path, run_config: str) -> subprocess.Popen:
        return subprocess.Popen([str(BIN / "flwr"), "run", str(app), "loopback", "--stream", "--run-config", run_config],
                                env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def __call__(self, app: Path, run_config: str) -> subprocess.CompletedProcess:
        """`flwr run` against this deployment; the finished process."""
        return subprocess.run([str(BIN / "flwr"), "run", str(app), "loopback", "--stream", "--run-config", run_config],
                              env=self.env, capture_output=True, text=True, timeout=1200)

    def stop(self) -> None:
        _stop(self.procs)
        # Every process we started, and every helper Flower started for them (SuperExec,
        # ServerApp, ClientApp processes: their command lines name our port or folder), has ended.
        left = _live(lambda cmd: str(self.link) in cmd or str(self.tmp) in cmd, wait=30)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"processes still running after the test: {left}"


@contextmanager
def deployment(tmp_path: Path, node_configs: list[str]):
    """A SuperLink with TLS and node authentication, and one registered SuperNode per node config
    (``node<i>``); yields the ``Deployment`` (call it as ``run(app_folder, run_config)``)."""
    d = Deployment(tmp_path)
    try:
        d.start_superlink()
        for i, nc in enumerate(node_configs):
            d.register(node_keys(d.keys, f"node{i}")[1])
            d.nodes.append(d.start_node(f"node{i}", nc))
        yield d
    finally:
        d.stop()


# --- fault injection -------------------------------------------------------------------------
_HELD = '''"""The real ClientApp, except on a node whose config says ``hold-at`` = "<message type>/<slot or
round>": there it writes ``hold-file`` and waits, so a test can kill the node mid-step."""

import time
from pathlib import Path

from flwr.clientapp import ClientApp

from {module} import app as real


def _where(message) -> str:
    for rec in message.content.config_records.values():
        for key in ("slot", "round"):
            if key in rec:
                return f"{{message.metadata.message_type}}/{{rec[key]}}"
    return message.metadata.message_type


class Held(ClientApp):
    def __call__(self, message, context):
        at = str(context.node_config.get("hold-at", ""))
        if at and at == _where(message):
            Path(str(context.node_config["hold-file"])).write_text(_where(message))
            time.sleep(900)  # until the test kills this node
        return real(message, context)


app = Held()
'''


def held_app(folder: Path, app: Path, module: str) -> Path:
    """A copy of the Flower app in ``app`` whose ClientApp is ``module``'s, held on request (``_HELD``)."""
    folder.mkdir(parents=True)
    toml = (app / "pyproject.toml").read_text()
    lines = ['clientapp = "held_client:app"' if ln.startswith("clientapp =") else ln for ln in toml.splitlines()]
    (folder / "pyproject.toml").write_text("\n".join(lines) + "\n")
    (folder / "held_client.py").write_text(_HELD.format(module=module))
    return folder
