"""``mdmt deploy``: certificates, site keys, site configs, the service command lines and the site check.

Fast tests check what the verbs write (against the ``cryptography`` verifier, Flower's own key loader and
config parser, and a real TLS listener). The slow test runs a real TLS deployment on loopback: a SuperLink
with SuperNode authentication, three registered SuperNodes started in a shuffled order, one SuperNode with
an unregistered key (refused), and ``flwr run`` of this project's app to completion."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import random
import re
import shlex
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from mdmt.errors import ConfigError, MDMTError
from mdmt.ops.deploy import checks, commands, files, network, pki, siteconfig
from mdmt.ops.deploy.loopback import Loopback
from mdmt.ops.launch import free_port

REPO = Path(__file__).resolve().parent.parent
DEPLOY_DIR = REPO / "deploy"


def verify_server_cert(ca: Path, cert: Path, name: str) -> None:
    """Raise MDMTError unless ``cert`` chains to ``ca`` and is valid for ``name`` (a DNS name or an IP)."""
    try:
        subject = x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        subject = x509.DNSName(name)
    store = Store(x509.load_pem_x509_certificates(Path(ca).read_bytes()))
    verifier = PolicyBuilder().store(store).build_server_verifier(subject)
    try:
        verifier.verify(x509.load_pem_x509_certificate(Path(cert).read_bytes()), [])
    except VerificationError as exc:
        raise MDMTError(f"{cert}: does not verify against {ca} for {name} ({exc})") from None


def _run(argv: list[str]) -> int:
    from mdmt.ops.cli import main

    return main(["deploy", *(str(a) for a in argv)])


# ---- certificates --------------------------------------------------------------------------------


def test_certs_have_the_sans_and_verify_against_the_ca(tmp_path, capsys):
    out = tmp_path / "certs"
    assert _run(["certs", "--out", out, "--san", "DNS:coord.example.org", "--san", "IP:10.0.0.5"]) == 0
    sans = pki.cert_sans(out / files.SERVER_CERT)
    assert sans == ["DNS:coord.example.org", "IP:10.0.0.5", "DNS:localhost", "IP:127.0.0.1"]
    for name in ("coord.example.org", "10.0.0.5", "localhost", "127.0.0.1"):
        verify_server_cert(out / files.CA_CERT, out / files.SERVER_CERT, name)
    with pytest.raises(MDMTError, match="does not verify"):
        verify_server_cert(out / files.CA_CERT, out / files.SERVER_CERT, "other.example.org")
    # Python's TLS stack (what the site check uses) loads the CA and the server pair as they are
    ctx = ssl.create_default_context(cafile=str(out / files.CA_CERT))
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(out / files.SERVER_CERT, out / files.SERVER_KEY)
    assert ctx.cert_store_stats()["x509_ca"] == 1
    for secret in (tmp_path / "certs-ca" / files.CA_KEY, out / files.SERVER_KEY):
        assert secret.stat().st_mode & 0o777 == 0o600
    # a certificate from another CA does not verify against this one
    other = tmp_path / "other"
    assert _run(["certs", "--out", other, "--san", "DNS:coord.example.org"]) == 0
    with pytest.raises(MDMTError, match="does not verify"):
        verify_server_cert(out / files.CA_CERT, other / files.SERVER_CERT, "coord.example.org")
    assert "keep" in capsys.readouterr().out


def test_certs_refuse_to_overwrite_and_rotate_with_the_same_or_a_new_ca(tmp_path, capsys):
    out = tmp_path / "certs"
    assert _run(["certs", "--out", out, "--san", "DNS:coord.example.org"]) == 0
    ca_before, server_before = (out / files.CA_CERT).read_bytes(), (out / files.SERVER_CERT).read_bytes()
    capsys.readouterr()
    assert _run(["certs", "--out", out, "--san", "DNS:coord.example.org"]) == 2
    err = capsys.readouterr().err.strip()
    assert "server.pem already exists" in err and "--rotate" in err and len(err.splitlines()) == 1
    # --rotate: same CA, new server certificate, same names; the old pair is kept aside
    assert _run(["certs", "--out", out, "--rotate"]) == 0
    assert (out / files.CA_CERT).read_bytes() == ca_before
    assert (out / files.SERVER_CERT).read_bytes() != server_before
    assert pki.cert_sans(out / files.SERVER_CERT)[0] == "DNS:coord.example.org"
    verify_server_cert(out / files.CA_CERT, out / files.SERVER_CERT, "coord.example.org")
    archived = list((out / files.PREVIOUS_DIR).glob(f"*/{files.SERVER_CERT}"))
    assert [p.read_bytes() for p in archived] == [server_before]
    # --new-ca: a new CA; the bundle trusts both while sites switch
    assert _run(["certs", "--out", out, "--new-ca"]) == 0
    assert (out / files.CA_PREVIOUS).read_bytes() == ca_before
    bundle = (out / files.CA_BUNDLE).read_text()
    assert bundle.count("BEGIN CERTIFICATE") == 2
    verify_server_cert(out / files.CA_BUNDLE, out / files.SERVER_CERT, "coord.example.org")
    with pytest.raises(MDMTError):
        verify_server_cert(out / files.CA_PREVIOUS, out / files.SERVER_CERT, "coord.example.org")


MOUNTED = {files.CA_CERT, files.SERVER_CERT, files.SERVER_KEY}


def _ca_key_matches(key: Path, ca: Path) -> bool:
    from cryptography.hazmat.primitives import serialization

    private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    return private.public_key() == x509.load_pem_x509_certificate(ca.read_bytes()).public_key()


def test_certs_keep_the_ca_key_apart_from_the_mounted_folder(tmp_path, capsys):
    out, ca_dir = tmp_path / "certs", tmp_path / "certs-ca"
    assert _run(["certs", "--out", out, "--san", "DNS:coord.example.org"]) == 0
    printed = capsys.readouterr().out
    # the folder the SuperLink reads holds the CA certificate and the server pair, nothing else
    assert {p.name for p in out.iterdir()} == MOUNTED
    assert {p.name for p in ca_dir.iterdir()} == {files.CA_KEY}
    assert ca_dir.stat().st_mode & 0o777 == 0o700 and (ca_dir / files.CA_KEY).stat().st_mode & 0o777 == 0o600
    assert _ca_key_matches(ca_dir / files.CA_KEY, out / files.CA_CERT)
    assert str(ca_dir / files.CA_KEY) in printed
    # --rotate signs with the key from the CA folder; the mounted folder gains only previous/
    assert _run(["certs", "--out", out, "--rotate"]) == 0
    verify_server_cert(out / files.CA_CERT, out / files.SERVER_CERT, "coord.example.org")
    assert {p.name for p in out.iterdir()} == MOUNTED | {files.PREVIOUS_DIR}
    # --new-ca: the new key in the CA folder, the old one (with its certificate) archived there, never in out
    old_ca = (out / files.CA_CERT).read_bytes()
    assert _run(["certs", "--out", out, "--new-ca"]) == 0
    verify_server_cert(out / files.CA_BUNDLE, out / files.SERVER_CERT, "coord.example.org")
    assert _ca_key_matches(ca_dir / files.CA_KEY, out / files.CA_CERT)
    (archived,) = list((ca_dir / files.PREVIOUS_DIR).glob(f"*/{files.CA_KEY}"))
    assert (archived.parent / files.CA_CERT).read_bytes() == old_ca
    assert _ca_key_matches(archived, archived.parent / files.CA_CERT)
    assert archived.stat().st_mode & 0o777 == 0o600 and archived.parent.stat().st_mode & 0o777 == 0o700
    assert {p.name for p in out.iterdir()} == MOUNTED | {files.PREVIOUS_DIR, files.CA_BUNDLE, files.CA_PREVIOUS}
    assert not list(out.rglob(files.CA_KEY))
    capsys.readouterr()
    # the SuperLink's command needs nothing from the CA folder
    offline = tmp_path / "offline"
    ca_dir.rename(offline)
    assert _run(["superlink-cmd", "--certs", out, "--state-dir", tmp_path / "state"]) == 0
    assert "warning" not in capsys.readouterr().err
    # rotating needs the key: without it, one line naming where it is looked for; --ca-dir names another folder
    assert _run(["certs", "--out", out, "--rotate"]) == 2
    err = capsys.readouterr().err.strip()
    assert str(ca_dir / files.CA_KEY) in err and "--ca-dir" in err and len(err.splitlines()) == 1
    assert _run(["certs", "--out", out, "--rotate", "--ca-dir", offline]) == 0
    verify_server_cert(out / files.CA_CERT, out / files.SERVER_CERT, "coord.example.org")
    assert not ca_dir.exists()


@pytest.mark.parametrize("inside", ["private", "."])
def test_certs_refuse_a_ca_dir_inside_or_around_the_mounted_folder(tmp_path, capsys, inside):
    out = tmp_path / "certs"
    ca_dir = out / inside if inside != "." else tmp_path
    assert _run(["certs", "--out", out, "--san", "DNS:coord.example.org", "--ca-dir", ca_dir]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("--ca-dir") >= 1 and "apart from --out" in err and len(err.splitlines()) == 1
    assert not list(tmp_path.rglob(files.CA_KEY))


def test_a_certificate_folder_holding_the_ca_key_is_moved_on_the_next_run(tmp_path, capsys):
    out, ca_dir = tmp_path / "certs", tmp_path / "certs-ca"
    pki.make_certs(out, ["DNS:coord.example.org"])
    pki.make_certs(out, [], new_ca=True)
    # the layout where ca.key (and archived CA keys) lay in the certificate folder
    (ca_dir / files.CA_KEY).rename(out / files.CA_KEY)
    (old,) = list((ca_dir / files.PREVIOUS_DIR).glob(f"*/{files.CA_KEY}"))
    stamp = old.parent.name
    (out / files.PREVIOUS_DIR / stamp).mkdir(parents=True, exist_ok=True)
    old.rename(out / files.PREVIOUS_DIR / stamp / files.CA_KEY)
    shutil.rmtree(ca_dir)
    # it keeps working: the SuperLink starts, with a one-line warning saying how to move the key
    assert _run(["superlink-cmd", "--certs", out, "--state-dir", tmp_path / "state"]) == 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(out / files.CA_KEY) in err and f"mv {out / files.CA_KEY}" in err
    # the next certs run moves every CA key into the CA folder and says so; rotation still verifies
    assert _run(["certs", "--out", out, "--rotate"]) == 0
    printed = capsys.readouterr().out
    assert f"moved the CA key {out / files.CA_KEY}" in printed
    assert not list(out.rglob(files.CA_KEY))
    assert (ca_dir / files.PREVIOUS_DIR / stamp / files.CA_KEY).is_file()
    assert ca_dir.stat().st_mode & 0o777 == 0o700 and (ca_dir / files.CA_KEY).stat().st_mode & 0o777 == 0o600
    assert _ca_key_matches(ca_dir / files.CA_KEY, out / files.CA_CERT)
    verify_server_cert(out / files.CA_BUNDLE, out / files.SERVER_CERT, "coord.example.org")
    # two different keys in the two places: one line, nothing moved
    pki.make_certs(tmp_path / "other", ["DNS:x.example.org"])
    (out / files.CA_KEY).write_bytes((tmp_path / "other-ca" / files.CA_KEY).read_bytes())
    assert _run(["certs", "--out", out, "--rotate"]) == 2
    err = capsys.readouterr().err.strip()
    assert "are different keys" in err and len(err.splitlines()) == 1 and (out / files.CA_KEY).is_file()


@pytest.mark.parametrize("san, message", [("DNS:bad name", "not a DNS name"), ("IP:10.0.0.300", "not an IP address")])
def test_certs_reject_bad_sans_in_one_line(tmp_path, capsys, san, message):
    assert _run(["certs", "--out", tmp_path / "c", "--san", san]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "c" / files.SERVER_CERT).exists()


# ---- site keys -----------------------------------------------------------------------------------


def test_site_key_is_ecdsa_p384_openssh_and_flower_accepts_it(tmp_path, capsys):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from flwr.cli.supernode.register import try_load_public_key

    assert _run(["site-key", "--site", "A", "--out", tmp_path]) == 0
    printed = capsys.readouterr().out
    private, public = tmp_path / "site-A", tmp_path / "site-A.pub"
    assert private.read_text().startswith("-----BEGIN OPENSSH PRIVATE KEY-----")
    assert public.read_text().startswith("ecdsa-sha2-nistp384 ")
    assert private.stat().st_mode & 0o777 == 0o600
    key = serialization.load_ssh_private_key(private.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert try_load_public_key(public)  # Flower's `flwr supernode register` loader
    fingerprint = pki.key_fingerprint(serialization.load_ssh_public_key(public.read_bytes()))
    assert fingerprint in printed and "flwr supernode register site-A.pub" in printed and "--name A" in printed
    assert pki.check_key_pair(private).startswith("ECDSA P-384 pair")
    # an existing key is never replaced silently; a mismatched pair is named
    assert _run(["site-key", "--site", "A", "--out", tmp_path]) == 2
    assert "already exists" in capsys.readouterr().err
    pki.make_site_key("B", tmp_path)
    (tmp_path / "site-A.pub").write_bytes((tmp_path / "site-B.pub").read_bytes())
    with pytest.raises(MDMTError, match="does not belong to"):
        pki.check_key_pair(private)


# ---- site config ---------------------------------------------------------------------------------


def _site_config(
    tmp_path, site="A", data_dir=None, coordinator="127.0.0.1:9092", ca=None, device="cpu", port=None, name=None
) -> Path:
    out = tmp_path / (name or f"site-{site}.toml")
    argv = [
        "site-config",
        "--site",
        site,
        "--data-dir",
        data_dir or tmp_path / "data" / site,
        "--coordinator",
        coordinator,
        "--ca",
        ca or tmp_path / "ca.pem",
        "--device",
        device,
        "--out",
        out,
        "--workspace",
        tmp_path / f"ws-{site}",
    ]
    if port:
        argv += ["--supernode-port", port]
    assert _run(argv) == 0
    return out


def test_site_config_round_trips_into_flower_node_config(tmp_path, small_federation):
    from flwr.common.config import parse_config_args

    from mdmt.fed.config import RunConfig
    from mdmt.fed.sitedata import locate_site

    path = _site_config(tmp_path, data_dir=small_federation / "A", port=9101)
    cfg = siteconfig.load_site_config(path)
    assert cfg == siteconfig.SiteConfig(
        site="A",
        data_dir=small_federation / "A",
        coordinator="127.0.0.1:9092",
        ca=tmp_path / "ca.pem",
        key=tmp_path / "site-A",
        workspace=tmp_path / "ws-A",
        device="cpu",
        supernode_port=9101,
    )
    # rewriting what was read gives the same file
    siteconfig.write_site_config(cfg, tmp_path / "again.toml")
    assert siteconfig.load_site_config(tmp_path / "again.toml") == cfg
    # what flower-supernode parses from --node-config is what the ClientApp uses to find the site
    argv, env = commands.supernode_command(cfg)
    node_config = parse_config_args([argv[argv.index("--node-config") + 1]])
    assert node_config == {
        "site": "A",
        "data-dir": str(small_federation / "A"),
        "workspace": str(tmp_path / "ws-A"),
        "device": "cpu",
    }
    loc = locate_site(RunConfig(), node_config)
    assert loc.device == "cpu"  # the site's choice wins over the run config's device
    assert (loc.site, loc.site_dir, loc.cache_root) == ("A", small_federation / "A", tmp_path / "ws-A" / "cache")
    assert argv[argv.index("--superlink") + 1] == "127.0.0.1:9092"
    assert argv[argv.index("--root-certificates") + 1] == str(tmp_path / "ca.pem")
    assert argv[argv.index("--auth-supernode-private-key") + 1] == str(tmp_path / "site-A")
    assert argv[argv.index("--port") + 1] == "9101" and "--insecure" not in argv
    assert not any("allow-runtime-dependency" in a for a in argv)
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1" and env["CUDA_VISIBLE_DEVICES"] == ""
    # relative paths are relative to the file's folder
    (tmp_path / "rel").mkdir()
    (tmp_path / "rel" / "site.toml").write_text(
        'site = "B"\ndata-dir = "data/B"\ncoordinator = "coord.example.org:9092"\nca = "ca.pem"\n'
        'key = "keys/site-B"\nworkspace = "ws"\n'
    )
    rel = siteconfig.load_site_config(tmp_path / "rel" / "site.toml")
    assert rel.data_dir == tmp_path / "rel" / "data" / "B" and rel.key == tmp_path / "rel" / "keys" / "site-B"
    assert rel.device == "auto" and rel.supernode_port == siteconfig.DEFAULT_SUPERNODE_PORT and rel.cache_dir is None


@pytest.mark.parametrize(
    "text, message",
    [
        ('site = "A"\n', "missing key 'data-dir'"),
        (
            'site = "A"\ndata-dir = "d"\ncoordinator = "https://c:1"\nca = "c"\nkey = "k"\nworkspace = "w"\n',
            "URL prefix",
        ),
        ('site = "A"\ndata-dir = "d"\ncoordinator = "c"\nca = "c"\nkey = "k"\nworkspace = "w"\n', "expected host:port"),
        (
            'site = "A"\ndata-dir = "d"\ncoordinator = "c:1"\nca = "c"\nkey = "k"\nworkspace = "w"\ndevice = "gpu"\n',
            "'device'",
        ),
        (
            'site = "A"\ndata-dir = "d"\ncoordinator = "c:1"\nca = "c"\nkey = "k"\nworkspace = "w"\ncolour = 1\n',
            "unknown key 'colour'",
        ),
        ('site = "A B"\ndata-dir = "d"\ncoordinator = "c:1"\nca = "c"\nkey = "k"\nworkspace = "w"\n', "'site'"),
        ("site = [1\n", "not valid TOML"),
    ],
)
def test_bad_site_config_is_one_line_naming_file_and_key(tmp_path, capsys, text, message):
    path = tmp_path / "site.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as exc:
        siteconfig.load_site_config(path)
    assert str(path) in str(exc.value) and "\n" not in str(exc.value)
    assert _run(["supernode-cmd", path]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_superlink_command_has_tls_auth_and_no_dependency_installs(tmp_path, capsys):
    certs = tmp_path / "certs"
    assert _run(["superlink-cmd", "--certs", certs, "--state-dir", tmp_path / "state"]) == 2
    assert "mdmt deploy certs" in capsys.readouterr().err
    pki.make_certs(certs, ["DNS:coord.example.org"])
    assert _run(["superlink-cmd", "--certs", certs, "--state-dir", tmp_path / "state"]) == 0
    words = shlex.split(capsys.readouterr().out)
    assert "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in words and "FLWR_TELEMETRY_ENABLED=0" in words
    for flag in ("--enable-supernode-auth", "--disable-runtime-dependency-installation"):
        assert flag in words
    assert words[words.index("--ssl-ca-certfile") + 1] == str(certs / files.CA_CERT)
    assert words[words.index("--database") + 1] == str(tmp_path / "state" / "state.db")
    assert "--insecure" not in words


def test_connection_is_written_for_the_flwr_cli(tmp_path):
    from flwr.cli.flower_config import read_superlink_connection

    pki.make_certs(tmp_path / "certs", ["IP:127.0.0.1"])
    home = tmp_path / "flwr-home"
    commands.write_connection(home, "other", "10.0.0.9:9092", tmp_path / "certs" / files.CA_CERT)
    commands.write_connection(home, "mdmt", "127.0.0.1:9092", tmp_path / "certs" / files.CA_CERT)
    old = os.environ.get("FLWR_HOME")
    os.environ["FLWR_HOME"] = str(home)
    try:
        conn = read_superlink_connection("mdmt")
        default = read_superlink_connection(None)
        other = read_superlink_connection("other")
    finally:
        os.environ.pop("FLWR_HOME") if old is None else os.environ.__setitem__("FLWR_HOME", old)
    assert conn.address == "127.0.0.1:9092" and conn.root_certificates == str(tmp_path / "certs" / files.CA_CERT)
    assert not conn.insecure and default.name == "mdmt" and other.address == "10.0.0.9:9092"


# ---- site check ----------------------------------------------------------------------------------


class TLSListener:
    """A TLS endpoint on loopback serving a given certificate: enough for the coordinator check."""

    def __init__(self, cert: Path, key: Path):
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(cert, key)
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            try:
                conn.settimeout(2)
                with self.ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1024)
            except (OSError, ssl.SSLError):
                pass

    def __enter__(self) -> TLSListener:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(5)
        self.sock.close()


def _check(path: Path, capsys) -> tuple[int, list[str]]:
    try:
        rc = _run(["check", "--config", path, "--timeout", "3"])
    except SystemExit as exc:
        rc = exc.code
    return rc, capsys.readouterr().out.strip().splitlines()


def test_check_is_ready_for_a_good_site_and_names_a_wrong_ca(tmp_path, capsys, small_federation):
    from mdmt.data.manifest import read_manifest

    pki.make_certs(tmp_path / "certs", ["IP:127.0.0.1"])
    pki.make_certs(tmp_path / "stranger", ["IP:127.0.0.1"])
    pki.make_site_key("A", tmp_path)
    with TLSListener(tmp_path / "certs" / files.SERVER_CERT, tmp_path / "certs" / files.SERVER_KEY) as srv:
        good = _site_config(
            tmp_path,
            data_dir=small_federation / "A",
            coordinator=f"127.0.0.1:{srv.port}",
            ca=tmp_path / "certs" / files.CA_CERT,
        )
        rc, lines = _check(good, capsys)
        assert rc == 0 and lines[-1] == "READY", lines
        text = "\n".join(lines)
        assert "certificate verified against" in text and "ECDSA P-384 pair" in text
        df = read_manifest(small_federation / "A")
        n_mild, n_severe = (df["prognosis"] == "MILD").sum(), (df["prognosis"] == "SEVERE").sum()
        assert f"prognosis: {n_mild} MILD, {n_severe} SEVERE; severity (brixia global): none" in text
        assert f"{len(df)} images of {df['patient_id'].nunique()} patients, role prognosis" in text
        assert "5 of 5 sampled decoded" in text
        wrong = _site_config(
            tmp_path,
            data_dir=small_federation / "A",
            coordinator=f"127.0.0.1:{srv.port}",
            ca=tmp_path / "stranger" / files.CA_CERT,
            name="wrong.toml",
        )
        rc, lines = _check(wrong, capsys)
    assert rc == 1 and lines[-1].startswith("NOT READY: coordinator:") and "does not verify" in lines[-1], lines


def test_check_not_ready_for_a_missing_data_dir(tmp_path, capsys):
    pki.make_site_key("A", tmp_path)
    path = _site_config(tmp_path, data_dir=tmp_path / "nowhere")
    rc, lines = _check(path, capsys)
    verdict = lines[-1]
    assert rc == 1 and verdict.startswith("NOT READY:") and f"data-dir: {tmp_path / 'nowhere'} not found" in verdict


def test_check_not_ready_for_an_unreachable_coordinator(tmp_path, capsys, small_federation):
    pki.make_certs(tmp_path / "certs", ["IP:127.0.0.1"])
    pki.make_site_key("A", tmp_path)
    port = free_port()  # nothing listens there
    path = _site_config(
        tmp_path,
        data_dir=small_federation / "A",
        coordinator=f"127.0.0.1:{port}",
        ca=tmp_path / "certs" / files.CA_CERT,
    )
    rc, lines = _check(path, capsys)
    assert rc == 1 and lines[-1].startswith(f"NOT READY: coordinator: cannot reach 127.0.0.1:{port}"), lines
    assert "data-dir" not in lines[-1] and "manifest" not in lines[-1]  # only the coordinator is wrong


# ---- the files in deploy/ use the tested commands ------------------------------------------------


def _deploy_argv(command: str) -> list[str] | None:
    """The ``mdmt deploy ...`` part of a command line, if it has one."""
    words = shlex.split(command)
    for i, w in enumerate(words[:-1]):
        if Path(w).name == "mdmt" and words[i + 1] == "deploy":
            return words[i + 1 :]
    return None


def test_systemd_units_and_compose_run_the_deploy_verbs(tmp_path):
    import yaml

    units = sorted((DEPLOY_DIR / "systemd").glob("*.service"))
    assert {u.name for u in units} >= {"mdmt-superlink.service", "mdmt-supernode@.service", "mdmt-job@.service"}
    from mdmt.ops.cli import build_parser

    parser = build_parser()
    for unit in units:
        text = unit.read_text()
        execs = [line.split("=", 1)[1] for line in text.splitlines() if line.startswith("ExecStart=")]
        assert len(execs) == 1, unit
        args = parser.parse_args(_deploy_argv(execs[0].replace("%i", "A")))
        assert (args.deploy_verb in ("superlink-cmd", "supernode-cmd") and args.exec) or (
            args.deploy_verb == "submit" and args.watch
        ), unit
        assert "Restart=" in text and "RestartSec=" in text
        assert "Environment=FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1" in text
    compose = yaml.safe_load((DEPLOY_DIR / "compose.yaml").read_text())
    verbs = set()
    for name, service in compose["services"].items():
        command = service["command"]
        command = shlex.join(command) if isinstance(command, list) else command
        args = parser.parse_args(_deploy_argv("mdmt " + command if not command.startswith("mdmt") else command))
        verbs.add(args.deploy_verb)
        assert service.get("restart") in ("always", "unless-stopped", "on-failure"), name
        assert str(service["environment"]["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"]) == "1", name
    assert verbs == {"superlink-cmd", "supernode-cmd", "proxy-cmd"}
    siteconfig.load_site_config(DEPLOY_DIR / "examples" / "site-A.toml")
    # the install script writes the units with the given environment's mdmt
    venv = Path(sys.executable).parent.parent
    res = subprocess.run(
        ["bash", str(DEPLOY_DIR / "scripts" / "install-units.sh"), "--root", str(tmp_path), "--venv", str(venv)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    for unit in units:
        text = (tmp_path / "etc" / "systemd" / "system" / unit.name).read_text()
        assert f"ExecStart={venv}/bin/mdmt deploy " in text and "/opt/mdmt/.venv" not in text
    res = subprocess.run(
        [
            "bash",
            str(DEPLOY_DIR / "scripts" / "install-units.sh"),
            "--root",
            str(tmp_path),
            "--venv",
            str(tmp_path / "nowhere"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2 and "mdmt not found" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def _unit_directives(path: Path) -> dict[str, list[str]]:
    """``[Service]`` of a systemd unit or drop-in: each directive's values in order (repeats accumulate)."""
    section, found = "", {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, sep, value = line.partition("=")
            assert sep, f"{path}: {raw!r} is not key=value"
            found.setdefault(key.strip(), []).append(value.strip())
    return found


def _bytes(size: str) -> int:
    m = re.fullmatch(r"(\d+)([KMGT]?)", size)
    assert m, size
    return int(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " ")


@pytest.mark.parametrize(
    "unit, memory, restricted",
    [
        ("mdmt-superlink.service", "4G", False),
        ("mdmt-supernode@.service", "16G", True),
        ("mdmt-job@.service", None, False),
    ],
)
def test_systemd_units_are_hardened(unit, memory, restricted):
    d = _unit_directives(DEPLOY_DIR / "systemd" / unit)
    # the hardening the units had
    for key, value in [("NoNewPrivileges", "yes"), ("PrivateTmp", "yes"), ("ProtectSystem", "strict")]:
        assert d[key] == [value], (unit, key)
    assert d["ProtectHome"] and d["ReadWritePaths"] and d["User"] == ["mdmt"]
    # a memory limit, sane for a federated site or coordinator
    (limit,) = d["MemoryMax"]
    assert 1 << 30 <= _bytes(limit) <= 1 << 40, limit
    if memory:
        assert limit == memory
    # no capabilities at all (an empty assignment), the system calls of a service without the privileged ones
    assert d["CapabilityBoundingSet"] == [""]
    filters = " ".join(d["SystemCallFilter"]).split()
    assert filters[0] == "@system-service" and "~@privileged" in filters
    assert d["SystemCallErrorNumber"] == ["EPERM"] and d["SystemCallArchitectures"] == ["native"]
    (families,) = d["RestrictAddressFamilies"]
    assert (
        {"AF_UNIX", "AF_INET", "AF_INET6"} <= set(families.split()) <= {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"}
    )
    if restricted:  # a site: loopback only, the coordinator comes from the drop-in
        assert d["IPAddressDeny"] == ["any"] and d["IPAddressAllow"] == ["localhost"]
    else:  # the SuperLink listens for the sites; the supervisor may use the coordinator's public address
        assert "IPAddressDeny" not in d and "IPAddressAllow" not in d


def test_compose_services_drop_capabilities_and_have_memory_limits():
    import yaml

    compose = yaml.safe_load((DEPLOY_DIR / "compose.yaml").read_text())
    assert set(compose["services"]) == {"superlink", "supernode", "proxy"}
    for name, service in compose["services"].items():
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name
        m = re.fullmatch(r"\$\{MDMT_[A-Z]+_MEMORY:-(\d+)([kmg])\}|(\d+)([kmg])", str(service["mem_limit"]))
        assert m, (name, service["mem_limit"])
        number, unit = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
        assert 1 << 30 <= int(number) * 1024 ** " kmg".index(unit) <= 1 << 40, name
    volumes = " ".join(compose["services"]["superlink"]["volumes"])
    assert ":/certs:ro" in volumes and "-ca:" not in volumes


def _dropin_allows(path: Path) -> tuple[list[str], list[str]]:
    d = _unit_directives(path)
    return d.get("IPAddressDeny", []), d.get("IPAddressAllow", [])


@pytest.mark.parametrize("coordinator, address", [("10.0.0.5:9092", "10.0.0.5"), ("[fd00::5]:9092", "fd00::5")])
def test_site_network_dropin_allows_exactly_the_coordinator(tmp_path, capsys, coordinator, address):
    units = tmp_path / "units"
    config = _site_config(tmp_path, coordinator=coordinator)
    assert _run(["site-network", config, "--unit-dir", units]) == 0
    printed = capsys.readouterr().out
    dropin = units / "mdmt-supernode@A.service.d" / "network.conf"
    assert str(dropin) in printed and "daemon-reload" in printed
    assert _dropin_allows(dropin) == (["any"], ["localhost", address])
    assert dropin.stat().st_mode & 0o777 == 0o644
    # --print shows the same text; --allow adds an address; a bad one is one line naming the flag
    assert _run(["site-network", config, "--print"]) == 0
    assert capsys.readouterr().out == dropin.read_text()
    text, allowed = network.network_dropin(siteconfig.load_site_config(config), ["192.0.2.0/24"])
    assert allowed == [address, "192.0.2.0/24"] and "IPAddressAllow=192.0.2.0/24" in text
    assert _run(["site-network", config, "--allow", "nowhere", "--unit-dir", units]) == 2
    err = capsys.readouterr().err.strip()
    assert "--allow 'nowhere'" in err and len(err.splitlines()) == 1


def test_site_network_for_a_host_name_adds_its_addresses_and_the_dns_servers(tmp_path):
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("# resolv\nnameserver 127.0.0.53\nnameserver 192.0.2.53\nsearch example.org\n")
    cfg = siteconfig.load_site_config(_site_config(tmp_path, coordinator="localhost:9092"))
    text, allowed = network.network_dropin(cfg, resolv_conf=resolv)
    assert "127.0.0.1" in allowed and allowed[-1] == "192.0.2.53" and "127.0.0.53" not in allowed
    cfg = siteconfig.load_site_config(_site_config(tmp_path, coordinator="no-such-host.invalid:9092", name="x.toml"))
    with pytest.raises(ConfigError, match="does not resolve") as exc:
        network.network_dropin(cfg, resolv_conf=resolv)
    assert "--allow" in str(exc.value) and "\n" not in str(exc.value)
    # with --allow the address is known without resolving the name
    assert network.network_dropin(cfg, ["10.0.0.5"], resolv_conf=resolv)[1] == ["192.0.2.53", "10.0.0.5"]


def test_install_script_writes_the_site_dropin_and_check_compares_it(tmp_path, capsys):
    venv = Path(sys.executable).parent.parent
    root = tmp_path / "root"
    (root / "etc" / "mdmt").mkdir(parents=True)
    config = _site_config(root / "etc" / "mdmt", coordinator="10.0.0.5:9092")
    assert config.name == "site-A.toml"
    script = [str(DEPLOY_DIR / "scripts" / "install-units.sh"), "--root", str(root), "--venv", str(venv)]
    res = subprocess.run(["bash", *script, "--site", "A"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    unit_dir = root / "etc" / "systemd" / "system"
    dropin = unit_dir / "mdmt-supernode@A.service.d" / "network.conf"
    assert _dropin_allows(dropin) == (["any"], ["localhost", "10.0.0.5"]) and str(dropin) in res.stdout
    assert _unit_directives(unit_dir / "mdmt-supernode@.service")["IPAddressAllow"] == ["localhost"]
    res = subprocess.run(["bash", *script, "--site", "B"], capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "site-B.toml not found" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    # the check: the drop-in names the coordinator; a changed address or a missing drop-in is NOT READY
    cfg = siteconfig.load_site_config(config)
    report = checks.CheckReport("A")
    checks.check_network(cfg, report, unit_dir)
    assert report.ready and "10.0.0.5" in report.items[0][2]
    moved = dataclasses.replace(cfg, coordinator="10.0.0.6:9092")
    report = checks.CheckReport("A")
    checks.check_network(moved, report, unit_dir, resolve=False)
    assert len(report.problems) == 1 and report.problems[0].startswith(f"network: {dropin} does not allow 10.0.0.6 ")
    assert "mdmt deploy site-network" in report.problems[0]
    dropin.unlink()
    report = checks.CheckReport("A")
    checks.check_network(cfg, report, unit_dir)
    assert not report.ready and "loopback only" in report.problems[0]
    # where the units are not installed there is nothing to compare
    report = checks.CheckReport("A")
    checks.check_network(cfg, report, tmp_path / "no-units")
    assert report.items == []
    # a config whose file name and site disagree would give the unit a drop-in of another instance
    (root / "etc" / "mdmt" / "site-B.toml").write_text(config.read_text())
    assert _run(["site-network", root / "etc" / "mdmt" / "site-B.toml", "--unit-dir", unit_dir]) == 2
    err = capsys.readouterr().err.strip()
    assert "mdmt-supernode@B" in err and len(err.splitlines()) == 1


# ---- a real deployment on loopback ---------------------------------------------------------------


UNIT = "mdmt/resnet18/loco/A/seed0"


def _tree(root: int) -> list[int]:
    """A process and its live descendants (by parent PID; Flower starts its helpers in new sessions)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().split(") ", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def _program(pid: int) -> str:
    """The program a PID runs: its script for a Python console script."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return ""
    words = [Path(w.decode(errors="replace")).name for w in argv if w]
    return words[1] if len(words) > 1 and words[0].startswith("python") else (words[0] if words else "")


def _crash(proc: subprocess.Popen) -> list[str]:
    """SIGKILL a started process and all its descendants, by PID (a crash: nothing is cleaned up)."""
    import signal

    pids = _tree(proc.pid)
    names = sorted({_program(p) for p in pids})
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return names


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _wait_for(what: str, ready, timeout: float, *procs: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        for proc in procs:
            assert proc.poll() is None, f"waiting for {what}: {proc.args[:3]} exited with {proc.returncode}"
        assert time.monotonic() < deadline, f"waiting for {what}: not within {timeout:.0f}s"
        time.sleep(0.5)


def _job_config(path: Path, ws: Path, fed: Path, **extra) -> Path:
    import tomli_w

    values = {
        "method": "mdmt",
        "backbone": "resnet18",
        "num-rounds": 3,
        "image-size": 32,
        "batch-size": 16,
        "seed": 0,
        "device": "cpu",
        "sites": ",".join(SITES),
        "holdouts": "A",
        "fed-dir": str(fed),
        "workspace": str(ws),
        "store": str(ws / "store.sqlite"),
        "round-timeout": 600.0,
    }
    values.update(extra)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(values))
    return path


def test_job_progress_waits_for_a_store_that_is_being_created(tmp_path):
    """`deploy status` and the supervisor poll the job's store while the ServerApp creates it: a file
    without tables (or without its schema version) reads as no progress yet, then the unit appears."""
    import sqlite3

    from mdmt.ops.jobs import Job, read_store, status_lines, unit_progress
    from mdmt.store import RunStore, UnitKey

    path = tmp_path / "store.sqlite"
    assert unit_progress(path, []) == {}  # no file yet
    db = sqlite3.connect(path)  # what the ServerApp's RunStore has done at its first statement
    db.execute("PRAGMA journal_mode=WAL")
    assert unit_progress(path, []) == {} and read_store(path, lambda s: s.units(), None) is None
    db.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
    db.commit()  # one table written, the others and the version not yet
    assert unit_progress(path, []) == {}
    db.close()

    key = UnitKey("mdmt", "resnet18", "loco", "A", 0)
    store = RunStore(path)
    store.start_unit(key, ["B", "BRIXIA"], {"A": "all"}, {}, {})
    store.log_event(key, 1, "missing", "B: no reply")
    store.close()
    assert {u: p["status"] for u, p in unit_progress(path, []).items()} == {key.unit_id: "running"}
    job = Job(
        "j", "j.toml", str(tmp_path / "configs" / "run.toml"), "c", str(tmp_path), "app", str(path), [key.unit_id]
    )
    lines = status_lines(job)
    assert f"  {key.unit_id}: running, 0 rounds" in lines and any("missing B: no reply" in x for x in lines), lines


def _unit(ws: Path) -> tuple[dict, list, list]:
    """The unit's row, events and participation rows in a job's store (empty while it is being created)."""
    from mdmt.ops.jobs import read_store

    def read(store) -> tuple[dict, list, list]:
        units = {u["unit_id"]: dict(u) for u in store.units()}
        events = [dict(e) for e in store.events(UNIT)]
        part = [dict(p) for p in store.participation(UNIT)]
        return units.get(UNIT, {}), events, part

    return read_store(ws / "store.sqlite", read, ({}, [], []))


def _latest_round(ws: Path) -> int:
    from mdmt.fed.checkpoint import load_checkpoint

    path = ws / "checkpoints" / UNIT.replace("/", "__") / "latest.pt"
    try:
        return int(load_checkpoint(path)["round"]) if path.is_file() else 0
    except (OSError, RuntimeError, EOFError):
        return 0


SITES = ("A", "B", "BRIXIA")  # A: the held-out prognosis centre; B: a training centre; BRIXIA: severity


@pytest.mark.slow
def test_tls_deployment_with_registered_sites_runs_the_app(tmp_path, capsys, small_federation, record_property):
    from mdmt.fed.audit import read_message_log
    from mdmt.store import RunStore

    # Loopback's process handling: every process carries a private token in its environment, so all that
    # they spawn (SuperExec, ServerApp and ClientApp processes) is found and stopped by PID
    procs = Loopback(tmp_path, small_federation)
    started = time.monotonic()
    try:
        # The coordinator's certificates and each site's key, with the deploy verbs.
        certs = tmp_path / "coordinator" / "certs"
        assert _run(["certs", "--out", certs, "--san", "IP:127.0.0.1", "--san", "DNS:localhost"]) == 0
        # Each site makes its key pair where its config expects it; the coordinator only gets the .pub.
        sites_dir, keys = tmp_path / "sites", tmp_path / "keys"
        for site in SITES:
            assert _run(["site-key", "--site", site, "--out", sites_dir]) == 0
        assert _run(["site-key", "--site", "ROGUE", "--out", keys]) == 0

        # The SuperLink: TLS, SuperNode authentication, no runtime dependency installation, loopback only.
        port = procs.port = free_port()  # the harness's certificate folder is the one made above
        argv_link, env_link = commands.superlink_command(
            certs, tmp_path / "coordinator" / "state", host="127.0.0.1", port=port
        )
        env_link["UV_CACHE_DIR"] = str(tmp_path / "uv-cache")
        superlink = procs.start("superlink", argv_link, env_link)
        procs.wait_healthy(superlink, 90.0)

        # The operator's flwr CLI: a TLS connection, and each site's public key registered under its name.
        cli_env = {"FLWR_HOME": str(tmp_path / "operator-flwr"), "UV_CACHE_DIR": str(tmp_path / "uv-cache")}
        commands.write_connection(cli_env["FLWR_HOME"], "mdmt-test", f"127.0.0.1:{port}", certs / files.CA_CERT)
        flwr = str(Path(sys.executable).parent / "flwr")
        for site in SITES:
            res = procs.run(
                f"register-{site}",
                [flwr, "supernode", "register", str(sites_dir / f"site-{site}.pub"), "mdmt-test", "--name", site],
                cli_env,
                timeout=120,
            )
            assert res.returncode == 0 and "registered successfully" in procs.log(f"register-{site}"), procs.log(
                f"register-{site}"
            )

        # Three sites, each with its own config, workspace and cache, started in a shuffled order.
        order = list(SITES)
        random.Random(time.time_ns()).shuffle(order)
        site_ws = {}
        for site in order:
            path = _site_config(
                sites_dir,
                site=site,
                data_dir=small_federation / site,
                coordinator=f"127.0.0.1:{port}",
                ca=certs / files.CA_CERT,
                port=free_port(),
            )
            cfg = siteconfig.load_site_config(path)
            assert cfg.key == sites_dir / f"site-{site}" and cfg.workspace == sites_dir / f"ws-{site}"
            rc, lines = _check(path, capsys)  # against the real SuperLink, before the node starts
            assert rc == 0 and lines[-1] == "READY" and "/health 200" in "\n".join(lines), lines
            argv, env = commands.supernode_command(cfg)
            procs.start(f"supernode-{site}", argv, env)
            site_ws[site] = cfg.workspace
            time.sleep(1.0)

        # A SuperNode whose key was never registered is refused.
        rogue_cfg = siteconfig.SiteConfig(
            site="ROGUE",
            data_dir=small_federation / "C",
            coordinator=f"127.0.0.1:{port}",
            ca=certs / files.CA_CERT,
            key=keys / "site-ROGUE",
            workspace=tmp_path / "rogue-ws",
            device="cpu",
            supernode_port=free_port(),
        )
        argv, env = commands.supernode_command(rogue_cfg)
        rogue = procs.start("supernode-ROGUE", argv, env)

        # The project's app, submitted to the SuperLink and supervised until done: the reference run.
        mdmt = str(Path(sys.executable).parent / "mdmt")
        jobs_dir, coord = tmp_path / "coordinator" / "jobs", tmp_path / "coordinator"

        def submit(name: str, ws: Path, *flags: str, **extra) -> list[str]:
            return [
                mdmt,
                "deploy",
                "submit",
                str(_job_config(jobs_dir / f"{name}.toml", ws, small_federation, **extra)),
                "--connection",
                "mdmt-test",
                *flags,
            ]

        ws = coord / "reference"
        res = procs.run("submit-reference", submit("reference", ws, "--watch", "--poll", "5"), cli_env, timeout=1200)
        sup_log = procs.log("submit-reference")
        assert res.returncode == 0 and "job reference: completed" in sup_log, sup_log[-3000:]

        # Refused at activation: the SuperNode exits (status 1, Flower exit code 305) and the SuperLink logs why.
        rogue_rc = rogue.wait(timeout=120)
        rogue_log, link_log = procs.log("supernode-ROGUE"), procs.log("superlink")
        assert rogue_rc == 1 and "Exit Code: 305" in rogue_log and "Failed to activate SuperNode" in rogue_log, (
            rogue_log[-2000:]
        )
        assert "Attempted to register SuperNode with public key" in link_log
        node_of = {s: re.findall(r"SuperNode (\d+) registered", procs.log(f"register-{s}"))[0] for s in SITES}
        assert set(re.findall(r"Activated node_id=(\d+)", link_log)) == set(node_of.values())

        # The store has the unit done with the planned rounds and metrics from every site.
        from mdmt.store import RunStore

        store = RunStore(ws / "store.sqlite", readonly=True)
        try:
            units = {u["unit_id"]: u for u in store.units()}
            metrics = store.metrics(UNIT)
        finally:
            store.close()
        assert list(units) == [UNIT]
        assert units[UNIT]["status"] == "done" and units[UNIT]["rounds_done"] == 3, dict(units[UNIT])
        rows = {(m["round"], m["site"], m["task"], m["split"], m["name"]) for m in metrics}
        assert {r[0] for r in rows} == {1, 2, 3}
        for rnd in (1, 2, 3):
            assert (rnd, "A", "prognosis", "all", "auc") in rows
            assert (rnd, "B", "prognosis", "val", "acc") in rows
            assert (rnd, "BRIXIA", "severity", "val", "acc") in rows
        # Each site kept its own record of what it was asked: the held-out centre never trained.
        logs = {s: read_message_log(site_ws[s] / "sites" / s) for s in SITES}
        assert "train" not in set(logs["A"]["message_type"]) and (logs["A"]["message_type"] == "evaluate").sum() == 3
        for s in ("B", "BRIXIA"):
            assert (logs[s]["message_type"] == "train").sum() == 3, s
        assert "ROGUE" not in "".join(p.read_text(errors="replace") for p in (ws / "logs").glob("*.log"))
        # ... and where each message's time went (mdmt.fed.timing), in order from the server's send to the reply
        from mdmt.fed.timing import read_timing_log

        for s in SITES:
            timings = read_timing_log(site_ws[s] / "sites" / s)
            # the held-out centre first scores the model of round 1, in round 2's trip
            assert {r for t in timings for r in t["rounds"]} == ({2, 3} if s == "A" else {1, 2, 3}), (s, timings)
            for t in timings:
                assert t["sent"] <= t["process"] <= t["handler"] <= t["imported"] <= t["done"], t
                assert set(t["stages"]) <= {"data", "model", "train", "evaluate"} and t["stages"]["model"] > 0, t
            assert any("train" in t["stages"] for t in timings) == (s != "A"), s

        # Coordinator crash: the SuperLink and its ServerApp are killed once round 1 is checkpointed, then
        # the SuperLink restarts on its database. The supervisor resubmits; the unit resumes at round k+1.
        ws_r = coord / "resume"
        supervisor = procs.start("submit-resume", submit("resume", ws_r, "--watch", "--poll", "5"), cli_env)
        _wait_for("round 1 of the resumed job", lambda: _latest_round(ws_r) >= 1, 900, supervisor)
        crashed = _crash(superlink)
        assert "flower-superlink" in crashed and "flwr-serverapp" in crashed, crashed
        from mdmt.fed.checkpoint import arrays_digest, load_checkpoint

        ckpt = load_checkpoint(ws_r / "checkpoints" / UNIT.replace("/", "__") / "latest.pt")
        k, digest = int(ckpt["round"]), arrays_digest(ckpt["state_dict"])
        assert k < 3
        superlink = procs.start("superlink-restarted", argv_link, env_link)
        procs.wait_healthy(superlink, 90.0)
        assert supervisor.wait(timeout=1200) == 0, procs.log("submit-resume")[-3000:]
        sup_log = procs.log("submit-resume")
        # it sees the SuperLink gone, or (when the restart falls between two polls) the run failed
        assert "interrupted" in sup_log and "resubmitting (1 of 5)" in sup_log and "completed" in sup_log, sup_log
        unit, events, _ = _unit(ws_r)
        assert unit["status"] == "done" and unit["rounds_done"] == 3
        resumed = [e for e in events if e["kind"] == "resumed"]
        assert [e["round"] for e in resumed] == [k] and f"arrays sha256 {digest}" in resumed[0]["detail"], events
        final = load_checkpoint(ws_r / "checkpoints" / UNIT.replace("/", "__") / "latest.pt")
        reference = load_checkpoint(ws / "checkpoints" / UNIT.replace("/", "__") / "latest.pt")
        assert final["round"] == reference["round"] == 3
        import torch

        for name, ref in reference["state_dict"].items():
            assert torch.allclose(final["state_dict"][name].double(), ref.double(), rtol=1e-5, atol=1e-6), name
        identical = arrays_digest(final["state_dict"]) == arrays_digest(reference["state_dict"])

        # Site dropout: B's SuperNode dies after round 1. Rounds go on without it (k-of-n, round-timeout),
        # the missing rounds are logged, and the restarted SuperNode (same key, same node id) rejoins.
        ws_d = coord / "dropout"
        res = procs.run(
            "submit-dropout", submit("dropout", ws_d, **{"num-rounds": 4, "round-timeout": 90.0}), cli_env, timeout=300
        )
        assert res.returncode == 0, procs.log("submit-dropout")
        _wait_for("round 1 of the dropout job", lambda: _unit(ws_d)[0].get("rounds_done", 0) >= 1, 900)
        _crash(procs.procs["supernode-B"])
        _wait_for(
            "a round without B",
            lambda: any(p["site"] == "B" and p["kind"] == "train" and p["status"] != "ok" for p in _unit(ws_d)[2]),
            600,
        )
        site_b = siteconfig.load_site_config(sites_dir / "site-B.toml")
        procs.start("supernode-B-restarted", *commands.supernode_command(site_b))
        _wait_for("the dropout job", lambda: _unit(ws_d)[0].get("status") in ("done", "failed"), 900)
        unit, events, part = _unit(ws_d)
        assert unit["status"] == "done" and unit["rounds_done"] == 4, unit
        b_train = [(p["round"], p["status"]) for p in part if p["site"] == "B" and p["kind"] == "train"]
        missed = [r for r, st in b_train if st != "ok"]
        assert missed and b_train[-1] == (4, "ok") and b_train[0] == (1, "ok"), b_train
        assert all(st == "ok" for p in part if p["site"] == "BRIXIA" for st in [p["status"]]), part
        kinds = [(e["kind"], e["detail"].split(":")[0]) for e in events]
        assert ("missing", "B") in kinds and ("rejoined", "B") in kinds, events
        status = subprocess.run(
            [mdmt, "deploy", "status", str(jobs_dir / "dropout.toml")],
            capture_output=True,
            text=True,
            env=procs.env(cli_env),
            timeout=120,
        )
        assert (
            status.returncode == 0
            and "units: 1 of 1 done" in status.stdout
            and "missing B" in status.stdout
            and "rejoined B" in status.stdout
        ), status.stdout + status.stderr
        # with its registered key the restarted SuperNode is the same node
        assert procs.log("superlink-restarted").count(f"Activated node_id={node_of['B']}") >= 1

        # An operator stop: Flower stops the run and the job is marked stopped (a later submit resumes it).
        ws_s = coord / "stopped"
        res = procs.run("submit-stop", submit("stopped", ws_s, **{"num-rounds": 50}), cli_env, timeout=300)
        assert res.returncode == 0, procs.log("submit-stop")
        res = procs.run("stop", [mdmt, "deploy", "stop", str(jobs_dir / "stopped.toml")], cli_env, timeout=120)
        assert res.returncode == 0 and "stopped" in procs.log("stop"), procs.log("stop")
        status = subprocess.run(
            [mdmt, "deploy", "status", str(jobs_dir / "stopped.toml")],
            capture_output=True,
            text=True,
            env=procs.env(cli_env),
            timeout=120,
        )
        assert (
            "job stopped: stopped (stopped by the operator)" in status.stdout and "finished:stopped" in status.stdout
        ), status.stdout + status.stderr
        record_property(
            "figures",
            f"supernode start order {order}; crashed {crashed} after round {k}; final model bit-identical to "
            f"the uninterrupted run: {identical}; B missed rounds {missed}; deployment test "
            f"{time.monotonic() - started:.0f}s",
        )
    finally:
        procs.stop()
        leftovers = procs.alive()
    assert leftovers == [], leftovers
