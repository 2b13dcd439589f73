"""Security against a real nats-server: nkey, creds file (operator JWTs), TLS with a test CA (also
client certificates and ``tls://``), and the permissions example of docs/nats-permissions.conf.

User/password and token are covered in tests/test_process.py. Every key, seed, JWT and password
here is generated per test; each test checks that none of them reaches a log line or an error.
The user JWTs are made with the ``nkeys`` package and the standard JWT encoding (``encode_jwt``):
header ``{"typ": "JWT", "alg": "ed25519-nkey"}``, base64url without padding, signed by the issuer.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import nkeys
import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from llmsrv.bus import Bus, BusError
from llmsrv.client import Client
from llmsrv.config import NatsConfig
from llmsrv.natsserver import NatsServer
from llmsrv.service import Service

from .conftest import test_config, user
from .test_fleet import serve_process, stop_process, wait_for_line

ENC = msgspec.json.encode
ROOT = Path(__file__).parent.parent
REFUSE_FAST = {"initial_connect_timeout_s": 2.0, "max_reconnect_attempts": 0}


@asynccontextmanager
async def served(url: str, client_nats: NatsConfig, **service_nats: Any) -> AsyncIterator[Client]:
    """An in-process llmsrv connected with ``service_nats`` credentials, and a client with its own."""
    cfg = test_config(url, nats=service_nats)
    async with Bus.connect(cfg.nats, url) as bus:
        service = Service(cfg, bus)
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run)
            async with Client.connect(url, cfg.nats.subject_prefix, client_nats) as client:
                yield client
            service.shutdown()


async def round_trip(client: Client) -> None:
    text = f"secure {uuid.uuid4().hex[:6]}"
    assert (await client.complete({"messages": user(text), "model": "mock:echo"}, timeout_s=10)).text == text


def assert_not_leaked(caplog: pytest.LogCaptureFixture, *secrets_: str | bytes, also: str = "") -> None:
    seen = caplog.text + also
    for secret in secrets_:
        text = secret.decode() if isinstance(secret, bytes) else secret
        # the no-run-of-8 rule of CONTRACT section 8, for a few windows across the secret
        for start in range(0, max(1, len(text) - 8), max(1, len(text) // 6)):
            assert text[start:start + 8] not in seen, f"a secret's characters in the logs: {text[:4]}..."


# ---- nkey --------------------------------------------------------------------------------------

def new_nkey(prefix: int) -> nkeys.KeyPair:
    return nkeys.from_seed(nkeys.encode_seed(secrets.token_bytes(32), prefix))


def write_seed(path: Path, kp: nkeys.KeyPair) -> str:
    path.write_bytes(kp.seed)
    path.chmod(0o600)
    return str(path)


async def test_nkey_auth(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    service_kp, client_kp, stranger_kp = (new_nkey(nkeys.PREFIX_BYTE_USER) for _ in range(3))
    conf = tmp_path / "nkey.conf"
    users = ", ".join(f"{{nkey: {kp.public_key.decode()}}}" for kp in (service_kp, client_kp))
    conf.write_text(f"authorization {{ users = [ {users} ] }}\n")
    with NatsServer(args=("-c", str(conf))) as server:
        service_seed = write_seed(tmp_path / "service.nk", service_kp)
        client_seed = write_seed(tmp_path / "client.nk", client_kp)
        async with served(server.url, NatsConfig(nkey_seed_file=client_seed), nkey_seed_file=service_seed) as client:
            await round_trip(client)
        with pytest.raises(BusError, match="refused the credentials") as info:
            async with Bus.connect(NatsConfig(nkey_seed_file=write_seed(tmp_path / "x.nk", stranger_kp),
                                              **REFUSE_FAST), server.url):
                pass
    assert_not_leaked(caplog, service_kp.seed, client_kp.seed, stranger_kp.seed, also=str(info.value))


# ---- creds file: operator, account and user JWTs -----------------------------------------------

def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def encode_jwt(claims: dict[str, Any], issuer: nkeys.KeyPair) -> str:
    """A NATS v2 JWT: ``claims`` (with ``sub``, ``name``, ``nats``) issued and signed by ``issuer``."""
    body = {"iat": int(time.time()), "iss": issuer.public_key.decode(), **claims}
    body["jti"] = base64.b32encode(hashlib.sha256(json.dumps(body, sort_keys=True).encode()).digest()
                                   ).rstrip(b"=").decode()
    head = _b64(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
    signing_input = f"{head}.{_b64(json.dumps(body).encode())}"
    return f"{signing_input}.{_b64(issuer.sign(signing_input.encode()))}"


def user_claims(kp: nkeys.KeyPair, name: str) -> dict[str, Any]:
    return {"sub": kp.public_key.decode(), "name": name,
            "nats": {"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1, "type": "user", "version": 2}}


def write_creds(path: Path, jwt: str, kp: nkeys.KeyPair) -> str:
    path.write_text(f"-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n"
                    "************************* IMPORTANT *************************\n"
                    "NKEY Seed printed below can be used to sign and prove identity.\n\n"
                    f"-----BEGIN USER NKEY SEED-----\n{kp.seed.decode()}\n------END USER NKEY SEED------\n")
    path.chmod(0o600)
    return str(path)


async def test_creds_file_auth(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    operator, account, other_account = (new_nkey(p) for p in (
        nkeys.PREFIX_BYTE_OPERATOR, nkeys.PREFIX_BYTE_ACCOUNT, nkeys.PREFIX_BYTE_ACCOUNT))
    operator_jwt = encode_jwt({"sub": operator.public_key.decode(), "name": "test-operator",
                               "nats": {"type": "operator", "version": 2}}, operator)
    limits = {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1, "wildcards": True,
              "conn": -1, "leaf": -1}
    account_jwt = encode_jwt({"sub": account.public_key.decode(), "name": "llm",
                              "nats": {"limits": limits, "type": "account", "version": 2}}, operator)
    (tmp_path / "operator.jwt").write_text(operator_jwt)
    conf = tmp_path / "operator.conf"
    conf.write_text(f'operator: "{tmp_path / "operator.jwt"}"\nresolver: MEMORY\n'
                    f'resolver_preload: {{ {account.public_key.decode()}: "{account_jwt}" }}\n')
    service_kp, client_kp, stranger_kp = (new_nkey(nkeys.PREFIX_BYTE_USER) for _ in range(3))
    service_creds = write_creds(tmp_path / "service.creds", encode_jwt(user_claims(service_kp, "llmsrv"), account),
                                service_kp)
    client_creds = write_creds(tmp_path / "client.creds", encode_jwt(user_claims(client_kp, "app"), account),
                               client_kp)
    # signed by an account this server does not know
    stranger_creds = write_creds(tmp_path / "stranger.creds",
                                 encode_jwt(user_claims(stranger_kp, "x"), other_account), stranger_kp)
    with NatsServer(args=("-c", str(conf))) as server:
        async with served(server.url, NatsConfig(creds_file=client_creds), creds_file=service_creds) as client:
            await round_trip(client)
        with pytest.raises(BusError, match="refused the credentials") as info:
            async with Bus.connect(NatsConfig(creds_file=stranger_creds, **REFUSE_FAST), server.url):
                pass
    assert_not_leaked(caplog, service_kp.seed, client_kp.seed, stranger_kp.seed, also=str(info.value))


# ---- TLS ---------------------------------------------------------------------------------------

@dataclass
class Pki:
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca: str  # a CA that signed nothing here


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write(path: Path, *pems: bytes) -> str:
    path.write_bytes(b"".join(pems))
    return str(path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(cn: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False),
                           critical=True)
            .sign(key, hashes.SHA256()))
    return key, cert


def issue(ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate], cn: str,
          server: bool) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca[1].subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.ExtendedKeyUsage([x509.ExtendedKeyUsageOID.SERVER_AUTH if server
                                                     else x509.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
    return key, builder.sign(ca[0], hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca("llmsrv test CA")
    server_key, server_cert = issue(ca, "127.0.0.1", server=True)
    client_key, client_cert = issue(ca, "llmsrv", server=False)
    pem = serialization.Encoding.PEM
    return Pki(ca=_write(d / "ca.pem", ca[1].public_bytes(pem)),
               server_cert=_write(d / "server.pem", server_cert.public_bytes(pem)),
               server_key=_write(d / "server-key.pem", _key_pem(server_key)),
               client_cert=_write(d / "client.pem", client_cert.public_bytes(pem)),
               client_key=_write(d / "client-key.pem", _key_pem(client_key)),
               other_ca=_write(d / "other-ca.pem", make_ca("some other CA")[1].public_bytes(pem)))


def tls_server(pki: Pki, tmp_path: Path, verify_clients: bool = False) -> NatsServer:
    conf = tmp_path / "tls.conf"
    conf.write_text(f'tls {{\n  cert_file: "{pki.server_cert}"\n  key_file: "{pki.server_key}"\n'
                    f'  ca_file: "{pki.ca}"\n  verify: {str(verify_clients).lower()}\n  timeout: 5\n}}\n')
    return NatsServer(args=("-c", str(conf)))


async def test_tls_with_a_test_ca(pki: Pki, tmp_path: Path) -> None:
    with tls_server(pki, tmp_path) as server:
        async with served(server.url, NatsConfig(tls_ca_file=pki.ca), tls_ca_file=pki.ca) as client:
            await round_trip(client)
        for refused in (NatsConfig(tls_ca_file=pki.other_ca, **REFUSE_FAST),  # certificate not verified
                        NatsConfig(**REFUSE_FAST)):  # plain text to a TLS-only server
            with pytest.raises(BusError, match="cannot connect to NATS"):
                async with Bus.connect(refused, server.url):
                    pass


async def test_tls_client_certificates(pki: Pki, tmp_path: Path) -> None:
    with tls_server(pki, tmp_path, verify_clients=True) as server:
        mtls = {"tls_ca_file": pki.ca, "tls_cert_file": pki.client_cert, "tls_key_file": pki.client_key}
        async with served(server.url, NatsConfig(**mtls), **mtls) as client:
            await round_trip(client)
        with pytest.raises(BusError, match="cannot connect to NATS"):  # no client certificate
            async with Bus.connect(NatsConfig(tls_ca_file=pki.ca, **REFUSE_FAST), server.url):
                pass


async def test_serve_process_over_tls_url(pki: Pki, tmp_path: Path) -> None:
    with tls_server(pki, tmp_path) as server:
        url = f"tls://127.0.0.1:{server.port}"
        prefix, log = f"s{uuid.uuid4().hex[:8]}", tmp_path / "llmsrv.log"
        proc = serve_process(url, prefix, log, LLMSRV__NATS__TLS_CA_FILE=pki.ca)
        try:
            await wait_for_line(log, "llmsrv: ready on tls://")
            async with Client.connect(url, prefix, NatsConfig(tls_ca_file=pki.ca)) as client:
                await round_trip(client)
            stop_process(proc, log)
        finally:
            if proc.poll() is None:
                proc.kill()


# ---- permissions: docs/nats-permissions.conf ---------------------------------------------------

PASSWORDS = {"LLMSRV_NATS_PASSWORD": "svc-" + secrets.token_hex(12),
             "CLIENT_NATS_PASSWORD": "app-" + secrets.token_hex(12),
             "OPERATOR_NATS_PASSWORD": "ops-" + secrets.token_hex(12)}


def as_user(name: str, env: str) -> NatsConfig:
    return NatsConfig(name=f"test-{name}", user=name, password=PASSWORDS[env])


async def test_permissions_example_keeps_admin_to_operators(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    conf = ROOT / "docs" / "nats-permissions.conf"
    with NatsServer(args=("-c", str(conf)), env=PASSWORDS) as server:  # the file's port is overridden
        log = tmp_path / "llmsrv.log"
        proc = serve_process(server.url, "llm", log, LLMSRV__NATS__USER="llmsrv",
                             LLMSRV__NATS__PASSWORD=PASSWORDS["LLMSRV_NATS_PASSWORD"],
                             LLMSRV__PROVIDERS__MOCK__BREAKER_THRESHOLD="2", LLMSRV__ROUTING__RETRY__MAX_ATTEMPTS="1")
        try:
            await wait_for_line(log, "llmsrv: ready on")
            async with Client.connect(server.url, "llm", as_user("client", "CLIENT_NATS_PASSWORD")) as client, \
                    Client.connect(server.url, "llm", as_user("operator", "OPERATOR_NATS_PASSWORD")) as operator:
                await round_trip(client)  # clients may ask

                async def fail_breaker() -> dict[str, Any]:
                    doc = await operator.request_json("admin.status")
                    return dict(doc["breakers"]["mock"]["models"].get("fail", {"state": "closed"}))

                # a client retunes the breaker: the server refuses the publish, llmsrv never sees it
                client.bus.publish_nowait("llm.admin.breaker.set", ENC({"provider": "mock", "threshold": 999}),
                                          reply=client.bus.new_inbox())
                # and it cannot pose as llmsrv to take requests
                await client.bus.subscribe("llm.request", lambda msg: None, queue="llmsrv")
                await client.bus.flush()
                with trio.fail_after(10):
                    while not all(f"permissions violation for {what}" in caplog.text.lower()
                                  for what in ('publish to "llm.admin.breaker.set"',
                                               'subscription to "llm.request"')):
                        await trio.sleep(0.02)
                await round_trip(client)  # a refused publish does not cost the client its connection
                # the threshold is still 2: two failures of mock:fail open its breaker, as llm.admin.status shows
                # (the status document carries no threshold; with 999 it would still be closed)
                for _ in range(2):
                    msg = await client.request_raw("llm.request", ENC({"messages": user(), "model": "mock:fail"}))
                    assert msgspec.json.decode(msg.data)["error_code"] == "PROVIDER_ERROR"
                assert (await fail_breaker())["state"] == "open"
                # the operator can retune it
                reply = await operator.request_raw("llm.admin.breaker.set", ENC({"provider": "mock", "threshold": 999}))
                assert msgspec.json.decode(reply.data)["threshold"] == 999
                assert "retuned by admin: threshold=999" in await trio.Path(log).read_text()
            stop_process(proc, log)
        finally:
            if proc.poll() is None:
                proc.kill()
    service_log = log.read_text()
    assert "permissions violation" not in service_log.lower(), service_log[-3000:]  # llmsrv's own rights suffice
    assert_not_leaked(caplog, *PASSWORDS.values(), also=service_log)

