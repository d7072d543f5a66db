"""The deployment tests' credentials (``loopback.tls_files``/``node_keys``), made with openssl and
ssh-keygen (the commands of docs/federation.md) or without them: a TLS client that trusts only
the CA accepts the server for 127.0.0.1 and localhost, and the node keys are what Flower loads."""

import socket
import ssl
import threading

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

import loopback


def _handshake(files, host: str) -> None:
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(files["cert"], files["key"])
    client = ssl.create_default_context(cafile=str(files["ca"]))
    with socket.socket() as ls:
        ls.bind(("127.0.0.1", 0))
        ls.listen(1)

        def serve():
            conn, _ = ls.accept()
            try:
                with server.wrap_socket(conn, server_side=True) as s:
                    s.recv(1)
            except (ssl.SSLError, OSError):
                pass

        t = threading.Thread(target=serve)
        t.start()
        try:
            with client.wrap_socket(socket.create_connection(("127.0.0.1", ls.getsockname()[1])),
                                    server_hostname=host) as s:
                s.send(b"x")
        finally:
            t.join(timeout=30)


@pytest.mark.parametrize("tools", ["installed", "absent"])
def test_certificates_name_loopback_and_keys_load(tmp_path, monkeypatch, tools):
    if tools == "absent":
        monkeypatch.setattr(loopback.shutil, "which", lambda name: None)
    else:  # the docs' commands need both tools (.ci/run installs them): their absence is a failure, not a skip
        assert loopback.shutil.which("openssl") and loopback.shutil.which("ssh-keygen"), \
            "install openssl and openssh-client (apt-get install openssl openssh-client)"
    files = loopback.tls_files(tmp_path / "tls")
    for host in ("127.0.0.1", "localhost"):
        _handshake(files, host)
    with pytest.raises(ssl.SSLCertVerificationError):  # a name the certificate does not carry
        _handshake(files, "coordinator.example")
    priv, pub = loopback.node_keys(tmp_path / "keys", "node0")
    key = load_ssh_private_key(priv.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert load_ssh_public_key(pub.read_bytes()).public_numbers() == key.public_key().public_numbers()
