"""The clients' digest salt, agreed between them through a server that cannot read it.

Each client draws an X25519 key pair and publishes its public key (through the server). One
client, the leader, draws the salt (32 random bytes) and seals it for every other client with
the key it shares with that client (X25519, HKDF-SHA256, AES-256-GCM, the two public keys as
associated data); the server forwards each sealed salt to its addressee, who opens it. The
server sees public keys and ciphertexts only. As in Flower's SecAgg+ (which uses the same
construction for its mask shares), this holds against an honest-but-curious server: one that
replaces public keys in transit (an active attacker) could read the salt; authenticating the
keys needs a PKI outside fedit (e.g. SuperNode authentication keys). No Flower here.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedit.errors import FeditError

SALT_BYTES = 32
_RAW = (serialization.Encoding.Raw, serialization.PublicFormat.Raw)


class SealError(FeditError):
    """A sealed secret that cannot be opened (wrong key, or changed in transit)."""


def new_key_pair() -> tuple[bytes, bytes]:
    """(private key, public key), 32 raw bytes each."""
    sk = X25519PrivateKey.generate()
    return (sk.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()),
            sk.public_key().public_bytes(*_RAW))


def _shared(private: bytes, peer_public: bytes) -> bytes:
    raw = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(peer_public))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"fedit collab digest salt").derive(raw)


def _aad(a: bytes, b: bytes) -> bytes:
    return b"".join(sorted((a, b)))


def seal(private: bytes, peer_public: bytes, secret: bytes) -> bytes:
    """``secret`` encrypted for the holder of ``peer_public`` (nonce ‖ ciphertext)."""
    own = X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(*_RAW)
    nonce = os.urandom(12)
    return nonce + AESGCM(_shared(private, peer_public)).encrypt(nonce, secret, _aad(own, peer_public))


def open_sealed(private: bytes, sender_public: bytes, sealed: bytes) -> bytes:
    """The secret ``seal`` encrypted for this key from ``sender_public``."""
    own = X25519PrivateKey.from_private_bytes(private).public_key().public_bytes(*_RAW)
    try:
        return AESGCM(_shared(private, sender_public)).decrypt(sealed[:12], sealed[12:], _aad(own, sender_public))
    except (InvalidTag, ValueError) as e:
        raise SealError("the sealed salt cannot be opened with this node's key.",
                        "the message was changed in transit or the keys were mixed up; restart the run.") from e


def seal_for_all(private: bytes, publics: dict[int, bytes]) -> tuple[bytes, dict[int, bytes]]:
    """The leader's step: a fresh salt, and that salt sealed for each other node."""
    salt = os.urandom(SALT_BYTES)
    return salt, {nid: seal(private, pk, salt) for nid, pk in publics.items()}
