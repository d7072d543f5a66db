"""What a FedEdit node lets out, decided by the node itself (its own node config), never by the
run config of whoever starts the run. No Flower import.

Node config keys (``flower-supernode --node-config "share-requests=true ..."``; in ``fedit fed
run`` the simulation gives every simulated node the same config):

``share-requests`` (default false)
    consent to send its plaintext requests with its MKVs (paper mode). A node without it
    refuses a paper-mode run at setup (:class:`ConsentError`), before any edit.
``share-metrics`` (default false)
    send per-record metrics at evaluation; without it the server gets the node's aggregates only.
``fact-key`` (default: a random key per run, kept in the node's state)
    the hex key of the node's fact tokens (:func:`fact_token`). Set it only to map tokens back to
    records later (``fedit fed run`` does, for its centralised reference); with a fixed key a
    fact's token is the same in every run.

Errors that cross the wire carry the error's type and step only (:func:`wire_message`); the
full message, which may quote a request, goes to the node's own log.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from typing import Any

from fedit.federation.fededit import FedError
from fedit.federation.settings import SettingsError

log = logging.getLogger(__name__)

SHARE_REQUESTS = "share-requests"
SHARE_METRICS = "share-metrics"
FACT_KEY = "fact-key"


class ConsentError(FedError):
    """A node asked to send what its own node config does not allow."""


def node_flag(node_config: dict[str, Any], key: str) -> bool:
    """A yes/no node setting (Flower parses ``key=true`` to a bool; strings are read too)."""
    v = node_config.get(key, False)
    return v if isinstance(v, bool) else str(v).strip().lower() in ("1", "true", "yes")


def check_consent(mode: str, node_config: dict[str, Any], client_id: str) -> bool:
    """Whether this node sends plaintext requests: only in paper mode and only with its own consent.

    Raises :class:`ConsentError` (a message with no request text) in paper mode without it."""
    consent = node_flag(node_config, SHARE_REQUESTS)
    if mode == "paper" and not consent:
        raise ConsentError(f"node {client_id} has not agreed to send its requests in plaintext, which paper mode "
                           "needs.", "its operator adds share-requests=true to the SuperNode's --node-config, or "
                                     "the run uses --mode private.")
    return mode == "paper" and consent


def new_fact_key() -> str:
    return secrets.token_hex(16)


def fact_key(node_config: dict[str, Any], kept: str | None) -> str:
    """The node's token key (hex): its node config's ``fact-key``, else ``kept`` (the random key of
    this run, from the node's state), else a new random one (the caller keeps it)."""
    key = str(node_config.get(FACT_KEY, "") or kept or new_fact_key())
    try:
        bytes.fromhex(key)
    except ValueError as e:
        raise SettingsError(f"the node's {FACT_KEY} is not hex.", f"give {FACT_KEY} as hex digits, e.g. "
                                                                  "from `python -c 'import secrets; print(secrets.token_hex(16))'`.") from e
    return key


def fact_token(key: str, client_id: str, case_id: Any) -> str:
    """An opaque id of one of a node's facts: HMAC-SHA256 under the node's key of (client id, case id),
    16 hex digits. Without the key nobody (the server included) can tell which record it names or
    test a guess; the same fact gets a different token on another node or with another key."""
    msg = f"{client_id}\x00{case_id}".encode()
    return hmac.new(bytes.fromhex(key), msg, hashlib.sha256).hexdigest()[:16]


# Errors whose messages are built from settings and node config only, never from request text.
_WIRE_SAFE = (ConsentError, SettingsError)


def wire_message(e: BaseException, step: str, client_id: str) -> str:
    """What a node's failure may tell the server: the step and the error's type; the message itself
    only for errors that never quote requests. The full message goes to the node's log here."""
    log.error("client %s failed at %s: %s", client_id, step, e, exc_info=e)
    if isinstance(e, _WIRE_SAFE):
        return f"client {client_id} failed at {step}: {type(e).__name__}: {e}"
    return (f"client {client_id} failed at {step}: {type(e).__name__} (its message may quote a request, so it "
            "stays in that client's log)")
