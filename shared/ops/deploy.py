"""``mdmt deploy``: what a coordinator and a hospital install.

- ``certs``: a CA and the SuperLink's TLS certificate (SANs given by the user), and their rotation;
- ``site-key``: a site's SuperNode authentication key (ECDSA P-384, OpenSSH format);
- ``site-config``: a site config file (site, data folder, device, coordinator, CA, key, workspace);
- ``supernode-cmd`` / ``superlink-cmd``: the ``flower-supernode`` / ``flower-superlink`` command lines
  (printed, or executed in place, which is what the systemd units and the compose file do);
- ``connection``: the SuperLink connection the ``flwr`` CLI uses (``flwr run``, ``flwr supernode register``);
- ``check``: run at a site before joining: coordinator (TCP, TLS against the CA), key pair, data, device.

No Flower app classes here; ``cryptography`` is imported only by the verbs that need it.
"""

from __future__ import annotations

import argparse
import base64
import datetime as _dt
import hashlib
import ipaddress
import json
import os
import re
import shlex
import shutil
import socket
import ssl
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mdmt.errors import ConfigError, MDMTError
from mdmt.fed.node import NodeConfig

DEFAULT_SUPERLINK_PORT = 9092
DEFAULT_SUPERNODE_PORT = 9094
DEFAULT_CONNECTION = "mdmt"
DEVICES_HELP = "auto, cpu, cuda or cuda:N"
SITE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
DEVICE_RE = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")
NIST_CURVES = ("secp256r1", "secp384r1", "secp521r1")

# Certificate folder layout (``mdmt deploy certs --out DIR``).
CA_CERT = "ca.pem"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
CA_PREVIOUS = "ca-previous.pem"
CA_BUNDLE = "ca-bundle.pem"
PREVIOUS_DIR = "previous"
# The SuperLink starts its own SuperExec, which connects to the SuperLink's API on the loopback address
# (0.0.0.0 becomes 127.0.0.1): the certificate must name it too.
LOOPBACK_SANS = ("DNS:localhost", "IP:127.0.0.1")

# Every process a deployment starts gets these: no telemetry, no per-run dependency installation.
BASE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}


# ---- small helpers -------------------------------------------------------------------------------


def _bin(name: str) -> str:
    """A console script of this Python environment (also when it is not on PATH)."""
    cand = Path(sys.executable).parent / name
    return str(cand) if cand.exists() else (shutil.which(name) or name)


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret readable by its owner only (created 0600, never world-readable for a moment)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _mkdir(path: Path, what: str) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MDMTError(f"{path}: cannot create the {what} folder ({exc.strerror or exc})") from None


def check_site_name(site: str, source: str = "--site") -> str:
    if not SITE_NAME_RE.match(site or ""):
        raise ConfigError(f"{source} {site!r}: a site name is 1-64 letters, digits, '_' or '-', starting with a "
                          "letter or digit (it names the node in every table)")
    return site


def parse_address(address: str, source: str = "--coordinator") -> tuple[str, int]:
    """``host:port`` or ``[ipv6]:port`` -> (host, port)."""
    text = str(address).strip()
    if "://" in text:
        raise ConfigError(f"{source} {address!r}: give host:port without a URL prefix (TLS is always on)")
    m = re.match(r"^\[([0-9A-Fa-f:.]+)\]:(\d+)$", text) or re.match(r"^([^\s:\[\]]+):(\d+)$", text)
    if not m:
        raise ConfigError(f"{source} {address!r}: expected host:port, e.g. coord.example.org:{DEFAULT_SUPERLINK_PORT}")
    port = int(m.group(2))
    if not 0 < port < 65536:
        raise ConfigError(f"{source} {address!r}: port must be 1-65535")
    return m.group(1), port


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def check_device(device: str, source: str = "--device") -> str:
    if not DEVICE_RE.match(str(device)):
        raise ConfigError(f"{source} {device!r}: use {DEVICES_HELP}")
    return str(device)


# ---- certificates --------------------------------------------------------------------------------


def parse_san(text: str):
    """``DNS:name`` / ``IP:address`` (a bare value is taken as an IP when it parses as one) -> GeneralName."""
    from cryptography import x509

    raw = str(text).strip()
    if raw.upper().startswith("IP:"):
        kind, value = "IP", raw[3:].strip().strip("[]")
    elif raw.upper().startswith("DNS:"):
        kind, value = "DNS", raw[4:].strip()
    else:
        try:
            ipaddress.ip_address(raw.strip("[]"))
            kind, value = "IP", raw.strip("[]")
        except ValueError:
            kind, value = "DNS", raw
    if kind == "IP":
        try:
            return x509.IPAddress(ipaddress.ip_address(value))
        except ValueError:
            raise ConfigError(f"--san {text!r}: {value!r} is not an IP address") from None
    if not re.match(r"^(\*\.)?[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\.?$", value):
        raise ConfigError(f"--san {text!r}: {value!r} is not a DNS name; use DNS:host.example.org or IP:10.0.0.5")
    return x509.DNSName(value.rstrip("."))


def san_text(name) -> str:
    from cryptography import x509

    return f"IP:{name.value}" if isinstance(name, x509.IPAddress) else f"DNS:{name.value}"


def cert_sans(path: Path) -> list[str]:
    """The subject alternative names of a PEM certificate, as ``DNS:...`` / ``IP:...``."""
    from cryptography import x509

    cert = _load_cert(path)
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return [san_text(n) for n in ext.value]


def _load_cert(path: Path):
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except FileNotFoundError:
        raise MDMTError(f"{path}: certificate file not found") from None
    except ValueError as exc:
        raise MDMTError(f"{path}: not a PEM certificate ({exc})") from None


def _load_key(path: Path):
    from cryptography.hazmat.primitives import serialization

    try:
        return serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError:
        raise MDMTError(f"{path}: private key file not found") from None
    except (ValueError, TypeError) as exc:
        raise MDMTError(f"{path}: not an unencrypted PEM private key ({exc})") from None


def _spki(public_key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.timezone.utc)


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def _new_ca(name: str, days: int):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "MDMT federation"),
                         x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5)).not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def _new_server_cert(ca_key, ca_cert, sans: list, days: int):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP384R1())
    cn = str(sans[0].value)
    now = _now()
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "MDMT federation"),
                                 x509.NameAttribute(NameOID.COMMON_NAME, cn[:64])]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(min(now + _dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=True, key_cert_sign=False, crl_sign=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def _dedupe_sans(sans: list) -> list:
    seen, out = set(), []
    for n in sans:
        k = san_text(n).lower()
        if k not in seen:
            seen.add(k)
            out.append(n)
    return out


def _archive(out: Path, names: list[str]) -> Path | None:
    """Move the given files of ``out`` to ``out/previous/<UTC time>/``; returns that folder (None if none)."""
    present = [n for n in names if (out / n).exists()]
    if not present:
        return None
    dest = out / PREVIOUS_DIR / _now().strftime("%Y%m%dT%H%M%SZ")
    k = 1
    while dest.exists():
        dest = dest.with_name(f"{dest.name.split('.')[0]}.{k}")
        k += 1
    dest.mkdir(parents=True)
    os.chmod(dest, 0o700)
    for n in present:
        os.replace(out / n, dest / n)
    return dest


def make_certs(out: str | Path, sans: list[str], days: int = 397, ca_days: int = 3650, rotate: bool = False,
               new_ca: bool = False, ca_name: str = "MDMT federation CA") -> dict[str, Any]:
    """Create (or rotate) the CA and the SuperLink certificate in ``out``; returns what was written.

    - empty folder: a new CA (``ca.pem``, ``ca.key``) and a server certificate (``server.pem``, ``server.key``);
    - CA present, no server certificate: a server certificate from that CA;
    - ``rotate``: a new server key and certificate from the same CA (sites keep their ``ca.pem``);
    - ``new_ca``: a new CA and server certificate; the old CA stays in ``ca-previous.pem`` and
      ``ca-bundle.pem`` holds both, for sites to trust during the switch.
    Replaced files are moved to ``out/previous/<UTC time>/``. Without ``sans`` a rotation reuses the SANs
    of the current certificate. ``localhost`` and ``127.0.0.1`` are always added."""
    out = Path(out).expanduser()
    if days <= 0 or ca_days <= 0:
        raise ConfigError("--days and --ca-days must be positive")
    if rotate and new_ca:
        raise ConfigError("give --rotate (new server certificate, same CA) or --new-ca (new CA too), not both")
    have_ca = (out / CA_KEY).is_file() and (out / CA_CERT).is_file()
    have_server = (out / SERVER_CERT).exists() or (out / SERVER_KEY).exists()
    if (out / CA_CERT).is_file() and not (out / CA_KEY).is_file() and not new_ca:
        raise ConfigError(f"{out / CA_CERT} exists without {CA_KEY}: put the CA key back (it signs server "
                          "certificates) or pass --new-ca to start a new CA")
    if have_server and not (rotate or new_ca):
        raise ConfigError(f"{out / SERVER_CERT} already exists; pass --rotate to issue a new server certificate "
                          "from the same CA (sites keep their ca.pem), or --new-ca to replace the CA too")
    if rotate and not have_ca:
        raise ConfigError(f"--rotate: no CA in {out} ({CA_CERT} and {CA_KEY}); run without --rotate to create one")
    names = [parse_san(s) for s in sans]
    if not names and (out / SERVER_CERT).is_file():
        names = [parse_san(s) for s in cert_sans(out / SERVER_CERT)]
    if not names:
        raise ConfigError("give at least one --san: the DNS name or IP address sites use to reach the SuperLink, "
                          "e.g. --san DNS:coord.example.org --san IP:10.0.0.5")
    names = _dedupe_sans(names + [parse_san(s) for s in LOOPBACK_SANS])
    _mkdir(out, "certificate")

    written: dict[str, Any] = {"out": str(out), "sans": [san_text(n) for n in names]}
    if new_ca or not have_ca:
        previous_ca = (out / CA_CERT).read_bytes() if new_ca and (out / CA_CERT).is_file() else None
        archived = _archive(out, [CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY, CA_BUNDLE, CA_PREVIOUS]) if new_ca else None
        ca_key, ca_cert = _new_ca(ca_name, ca_days)
        _write_private(out / CA_KEY, _pem_key(ca_key))
        _write_public(out / CA_CERT, _pem_cert(ca_cert))
        written["ca"] = "new"
        if previous_ca is not None:
            _write_public(out / CA_PREVIOUS, previous_ca)
            _write_public(out / CA_BUNDLE, _pem_cert(ca_cert) + previous_ca)
            written["bundle"] = str(out / CA_BUNDLE)
        if archived:
            written["archived"] = str(archived)
    else:
        ca_key, ca_cert = _load_key(out / CA_KEY), _load_cert(out / CA_CERT)
        if _spki(ca_cert.public_key()) != _spki(ca_key.public_key()):
            raise MDMTError(f"{out / CA_KEY} does not belong to {out / CA_CERT}; restore the matching pair")
        written["ca"] = "kept"
        if rotate:
            archived = _archive(out, [SERVER_CERT, SERVER_KEY])
            if archived:
                written["archived"] = str(archived)
    key, cert = _new_server_cert(ca_key, ca_cert, names, days)
    _write_private(out / SERVER_KEY, _pem_key(key))
    _write_public(out / SERVER_CERT, _pem_cert(cert))
    written["server_not_after"] = cert.not_valid_after_utc.strftime("%Y-%m-%d")
    written["ca_not_after"] = ca_cert.not_valid_after_utc.strftime("%Y-%m-%d")
    return written


def verify_server_cert(ca: str | Path, cert: str | Path, name: str) -> None:
    """Raise MDMTError unless ``cert`` chains to ``ca`` and is valid for ``name`` (a DNS name or an IP)."""
    from cryptography import x509
    from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

    try:
        subject = x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        subject = x509.DNSName(name)
    store = Store(x509.load_pem_x509_certificates(Path(ca).read_bytes()))
    verifier = PolicyBuilder().store(store).build_server_verifier(subject)
    try:
        verifier.verify(_load_cert(Path(cert)), [])
    except VerificationError as exc:
        raise MDMTError(f"{cert}: does not verify against {ca} for {name} ({exc})") from None


# ---- site keys -----------------------------------------------------------------------------------


def site_key_paths(out: str | Path, site: str) -> tuple[Path, Path]:
    private = Path(out).expanduser() / f"site-{site}"
    return private, private.with_name(private.name + ".pub")


def make_site_key(site: str, out: str | Path, force: bool = False) -> tuple[Path, Path]:
    """An ECDSA P-384 key pair in OpenSSH format: ``out/site-<site>`` (0600) and ``out/site-<site>.pub``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    check_site_name(site)
    private, public = site_key_paths(out, site)
    if (private.exists() or public.exists()) and not force:
        raise ConfigError(f"{private} already exists; a registered key must not be replaced by accident "
                          "(pass --force, then register the new .pub and unregister the old node)")
    _mkdir(private.parent, "key")
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                              serialization.NoEncryption()))
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write_public(public, pub + f" mdmt-site-{site}\n".encode())
    return private, public


def key_fingerprint(public_key) -> str:
    """``SHA256:...`` as ``ssh-keygen -l`` prints it: read it to the coordinator over a second channel."""
    from cryptography.hazmat.primitives import serialization

    blob = public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).split()[1]
    digest = hashlib.sha256(base64.b64decode(blob)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def check_key_pair(private: str | Path) -> str:
    """Check ``private`` and ``private.pub`` are an OpenSSH ECDSA (NIST curve) pair; returns a description.
    Raises MDMTError with the reason otherwise."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    private = Path(private).expanduser()
    public = private.with_name(private.name + ".pub")
    for p in (private, public):
        if not p.is_file():
            raise MDMTError(f"{p}: key file not found; create the pair with 'mdmt deploy site-key'")
    try:
        key = serialization.load_ssh_private_key(private.read_bytes(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise MDMTError(f"{private}: not an unencrypted OpenSSH private key ({exc})") from None
    except PermissionError:
        raise MDMTError(f"{private}: not readable by this user; the SuperNode's user must read it") from None
    try:
        pub = serialization.load_ssh_public_key(public.read_bytes())
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise MDMTError(f"{public}: not an OpenSSH public key ({exc})") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name not in NIST_CURVES:
        raise MDMTError(f"{private}: Flower needs an ECDSA key on a NIST curve (P-384 recommended), "
                        f"got {type(key).__name__.replace('_', '')}")
    if not isinstance(pub, ec.EllipticCurvePublicKey) or pub.public_numbers() != key.public_key().public_numbers():
        raise MDMTError(f"{public} does not belong to {private}; regenerate the pair with 'mdmt deploy site-key'")
    bits = {"secp256r1": 256, "secp384r1": 384, "secp521r1": 521}[key.curve.name]
    return f"ECDSA P-{bits} pair {private}(.pub), {key_fingerprint(pub)}"


# ---- site config ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SiteConfig:
    """What a hospital's SuperNode needs: who it is, where its data are, how it reaches the coordinator."""

    site: str
    data_dir: Path
    coordinator: str
    ca: Path
    key: Path
    workspace: Path
    cache_dir: Path | None = None
    device: str = "auto"
    supernode_port: int = DEFAULT_SUPERNODE_PORT
    source: str = field(default="site config", compare=False)

    @property
    def public_key(self) -> Path:
        return self.key.with_name(self.key.name + ".pub")

    @property
    def node(self) -> NodeConfig:
        """What the SuperNode's ``--node-config`` tells the site. The site's own device wins over the run
        config's (``cuda:N`` is narrowed by CUDA_VISIBLE_DEVICES, so the node sees plain ``cuda``)."""
        return NodeConfig(self.site, self.data_dir, self.workspace, self.cache_dir,
                          "cuda" if self.device.startswith("cuda") else self.device)

    @property
    def cache_root(self) -> Path:
        return self.node.cache_path

    def validate(self) -> "SiteConfig":
        check_site_name(self.site, f"{self.source}: 'site'")
        parse_address(self.coordinator, f"{self.source}: 'coordinator'")
        check_device(self.device, f"{self.source}: 'device'")
        if not 0 < int(self.supernode_port) < 65536:
            raise ConfigError(f"{self.source}: 'supernode-port' must be 1-65535, got {self.supernode_port}")
        for key in ("data-dir", "ca", "key", "workspace", "cache-dir"):
            value = getattr(self, key.replace("-", "_"))
            if value is not None and any(c in str(value) for c in '"\\\n'):
                raise ConfigError(f"{self.source}: '{key}' {str(value)!r} contains a double quote, a backslash or "
                                  "a line break; use a path without them")
        return self


SITE_CONFIG_KEYS = ("site", "data-dir", "coordinator", "ca", "key", "workspace", "cache-dir", "device",
                    "supernode-port")
_REQUIRED_KEYS = ("site", "data-dir", "coordinator", "ca", "key", "workspace")


def _toml_str(value: Any) -> str:
    return json.dumps(str(value), ensure_ascii=False)


def site_config_text(cfg: SiteConfig) -> str:
    lines = [
        "# MDMT site configuration: read by 'mdmt deploy supernode-cmd' and 'mdmt deploy check'.",
        "# Relative paths are relative to this file's folder.",
        f"site = {_toml_str(cfg.site)}  # the name the coordinator sees in every table",
        f"data-dir = {_toml_str(cfg.data_dir)}  # the site folder: manifest.csv and its images (may be read-only)",
        f"coordinator = {_toml_str(cfg.coordinator)}  # the SuperLink, host:port",
        f"ca = {_toml_str(cfg.ca)}  # the federation CA certificate (or a CA bundle during a CA rotation)",
        f"key = {_toml_str(cfg.key)}  # this site's private key; its public half is the same path + .pub",
        f"workspace = {_toml_str(cfg.workspace)}  # message log, predictions, cache; never sent anywhere",
        f"cache-dir = {_toml_str(cfg.cache_dir or '')}  # empty: <workspace>/cache",
        f"device = {_toml_str(cfg.device)}  # {DEVICES_HELP}",
        f"supernode-port = {int(cfg.supernode_port)}  # the SuperNode's local API (loopback; unique per host)",
    ]
    return "\n".join(lines) + "\n"


def write_site_config(cfg: SiteConfig, out: str | Path, force: bool = False) -> Path:
    out = Path(out).expanduser()
    cfg.validate()
    if out.exists() and not force:
        raise ConfigError(f"{out} already exists; pass --force to replace it")
    _mkdir(out.parent, "config")
    _write_public(out, site_config_text(cfg).encode())
    return out


def load_site_config(path: str | Path) -> SiteConfig:
    """Read and validate a site config file; one-line ConfigError naming the file and key otherwise."""
    import tomllib

    path = Path(path).expanduser()
    try:
        values = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: site config not found; write one with 'mdmt deploy site-config'") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read the site config ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc})") from None
    unknown = sorted(set(values) - set(SITE_CONFIG_KEYS))
    if unknown:
        raise ConfigError(f"{path}: unknown key '{unknown[0]}'; valid keys: {', '.join(SITE_CONFIG_KEYS)}")
    missing = [k for k in _REQUIRED_KEYS if not str(values.get(k, "")).strip()]
    if missing:
        raise ConfigError(f"{path}: missing key '{missing[0]}'; required: {', '.join(_REQUIRED_KEYS)}")
    for k in SITE_CONFIG_KEYS:
        v = values.get(k)
        if k == "supernode-port":
            if v is not None and (not isinstance(v, int) or isinstance(v, bool)):
                raise ConfigError(f"{path}: 'supernode-port' must be an integer, got {v!r}")
        elif v is not None and not isinstance(v, str):
            raise ConfigError(f"{path}: '{k}' must be a string, got {v!r}")
    base = path.resolve().parent

    def p(key: str) -> Path | None:
        v = str(values.get(key, "") or "").strip()
        return (base / Path(v).expanduser()).resolve() if v else None

    cfg = SiteConfig(site=values["site"], data_dir=p("data-dir"), coordinator=values["coordinator"].strip(),
                     ca=p("ca"), key=p("key"), workspace=p("workspace"), cache_dir=p("cache-dir"),
                     device=str(values.get("device", "auto") or "auto"),
                     supernode_port=int(values.get("supernode-port", DEFAULT_SUPERNODE_PORT)), source=str(path))
    return cfg.validate()


# ---- command lines -------------------------------------------------------------------------------


def node_config_string(cfg: SiteConfig) -> str:
    """The ``--node-config`` value that ``mdmt.fed.site.locate_site`` reads."""
    return cfg.node.to_flower()


def device_env(device: str) -> dict[str, str]:
    """How the site's device choice reaches the ClientApp processes: through the CUDA devices they see.
    ``cpu`` hides every GPU; ``cuda:N`` shows only GPU N; ``auto``/``cuda`` leave the choice alone."""
    if device == "cpu":
        return {"CUDA_VISIBLE_DEVICES": ""}
    if device.startswith("cuda:"):
        return {"CUDA_VISIBLE_DEVICES": device.split(":", 1)[1]}
    return {}


def supernode_command(cfg: SiteConfig) -> tuple[list[str], dict[str, str]]:
    """(argv, environment additions) of the site's ``flower-supernode``. Runtime dependency installation
    stays off (the SuperNode's default; ``--allow-runtime-dependency-installation`` is never passed)."""
    host, port = parse_address(cfg.coordinator)
    argv = [_bin("flower-supernode"), "--superlink", format_address(host, port), "--root-certificates", str(cfg.ca),
            "--auth-supernode-private-key", str(cfg.key), "--node-config", node_config_string(cfg),
            "--isolation", "subprocess", "--host", "127.0.0.1", "--port", str(cfg.supernode_port)]
    env = dict(BASE_ENV)
    env.update({"FLWR_HOME": str(cfg.workspace / "flwr-home"), "UV_CACHE_DIR": str(cfg.workspace / "uv-cache")})
    env.update(device_env(cfg.device))
    return argv, env


def superlink_command(certs: str | Path, state_dir: str | Path, host: str = "0.0.0.0",
                      port: int = DEFAULT_SUPERLINK_PORT, database: bool = True) -> tuple[list[str], dict[str, str]]:
    """(argv, environment additions) of the coordinator's ``flower-superlink``: TLS with the CA folder of
    ``mdmt deploy certs``, SuperNode authentication on, runtime dependency installation off, state in
    ``state_dir`` (its SQLite database, FLWR_HOME and uv cache)."""
    certs, state_dir = Path(certs).expanduser().resolve(), Path(state_dir).expanduser().resolve()
    for name in (CA_CERT, SERVER_CERT, SERVER_KEY):
        if not (certs / name).is_file():
            raise ConfigError(f"{certs / name}: not found; create the certificates with 'mdmt deploy certs --out {certs}'")
    if not 0 < int(port) < 65536:
        raise ConfigError(f"--port {port}: must be 1-65535")
    argv = [_bin("flower-superlink"), "--ssl-ca-certfile", str(certs / CA_CERT),
            "--ssl-certfile", str(certs / SERVER_CERT), "--ssl-keyfile", str(certs / SERVER_KEY),
            "--enable-supernode-auth", "--disable-runtime-dependency-installation", "--isolation", "subprocess",
            "--host", host, "--port", str(int(port))]
    if database:
        argv += ["--database", str(state_dir / "state.db")]
    env = dict(BASE_ENV)
    env.update({"FLWR_HOME": str(state_dir / "flwr-home"), "UV_CACHE_DIR": str(state_dir / "uv-cache")})
    return argv, env


def command_text(argv: list[str], env: dict[str, str]) -> str:
    """A shell line: ``env K=V ... program args`` (quoted)."""
    return shlex.join(["env", *(f"{k}={v}" for k, v in env.items()), *argv])


def _exec(argv: list[str], env: dict[str, str], dirs: list[Path]) -> None:
    for d in dirs:
        _mkdir(d, "state")
    full = os.environ.copy()
    full.update(env)
    bindir = str(Path(sys.executable).parent)  # Flower starts its helpers by name: use this environment's
    full["PATH"] = bindir + os.pathsep + full.get("PATH", "")
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        if os.path.isabs(argv[0]):
            os.execve(argv[0], argv, full)
        else:
            os.execvpe(argv[0], argv, full)
    except OSError as exc:
        raise MDMTError(f"cannot start {argv[0]} ({exc.strerror or exc}); install this project in the environment") from None


def write_connection(flwr_home: str | Path, name: str, address: str, ca: str | Path, default: bool = True) -> Path:
    """Add or replace the SuperLink connection ``name`` in ``flwr_home/config.toml`` (TLS with ``ca``)."""
    import tomllib

    import tomli_w

    parse_address(address, "--address")
    if not re.match(r"^[A-Za-z0-9_-]+$", name):
        raise ConfigError(f"--name {name!r}: a connection name is letters, digits, '_' or '-'")
    ca = Path(ca).expanduser().resolve()
    if not ca.is_file():
        raise ConfigError(f"--ca {ca}: CA certificate not found")
    home = Path(flwr_home).expanduser()
    _mkdir(home, "FLWR_HOME")
    path = home / "config.toml"
    try:
        data = tomllib.loads(path.read_text()) if path.is_file() else {}
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML ({exc}); fix or move it") from None
    link = data.setdefault("superlink", {})
    link[name] = {"address": address, "root-certificates": str(ca)}
    if default or "default" not in link:
        link["default"] = name
    path.write_text(tomli_w.dumps(data))
    return path


# ---- check ---------------------------------------------------------------------------------------

OK, WARN, FAIL, INFO = "ok", "warn", "FAIL", "info"


@dataclass
class CheckReport:
    site: str
    items: list[tuple[str, str, str]] = field(default_factory=list)  # (status, topic, detail)

    def add(self, status: str, topic: str, detail: str) -> None:
        self.items.append((status, topic, detail))

    @property
    def problems(self) -> list[str]:
        return [f"{topic}: {detail}" for status, topic, detail in self.items if status == FAIL]

    @property
    def ready(self) -> bool:
        return not self.problems

    @property
    def verdict(self) -> str:
        return "READY" if self.ready else "NOT READY: " + "; ".join(self.problems)

    def lines(self) -> list[str]:
        return [f"  {status:<5} {topic:<12} {detail}" for status, topic, detail in self.items] + [self.verdict]


def check_coordinator(cfg: SiteConfig, report: CheckReport, timeout: float = 5.0) -> None:
    host, port = parse_address(cfg.coordinator)
    where = format_address(host, port)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except socket.gaierror as exc:
        report.add(FAIL, "coordinator", f"cannot resolve {host} ({exc.strerror or exc})")
        return
    except OSError as exc:
        report.add(FAIL, "coordinator", f"cannot reach {where} ({exc.strerror or exc.__class__.__name__}); "
                   "check the address, the SuperLink and the firewalls between")
        return
    if not cfg.ca.is_file():
        sock.close()
        report.add(FAIL, "coordinator", f"{where} reachable, but the CA file {cfg.ca} is not found")
        return
    try:
        ctx = ssl.create_default_context(cafile=str(cfg.ca))
    except (ssl.SSLError, ValueError) as exc:
        sock.close()
        report.add(FAIL, "coordinator", f"{cfg.ca}: not a PEM CA certificate ({exc})")
        return
    try:
        with ctx.wrap_socket(sock, server_hostname=host) as tls:
            version = tls.version()
    except ssl.SSLCertVerificationError as exc:
        report.add(FAIL, "coordinator", f"{where}: the TLS certificate does not verify against {cfg.ca} "
                   f"({exc.verify_message or exc.reason}); get the federation's current ca.pem")
        return
    except (ssl.SSLError, OSError) as exc:
        report.add(FAIL, "coordinator", f"{where}: TLS handshake failed ({exc.__class__.__name__}: "
                   f"{getattr(exc, 'reason', None) or exc}); is this a TLS SuperLink?")
        return
    detail = f"{where} reachable; {version} certificate verified against {cfg.ca} for {host}"
    try:
        import httpx

        r = httpx.get(f"https://{where}/health", verify=ctx, timeout=timeout)
        detail += f"; /health {r.status_code}"
    except Exception as exc:  # an older SuperLink without /health is still a valid coordinator
        detail += f"; /health not answered ({exc.__class__.__name__})"
    report.add(OK, "coordinator", detail)


def check_key(cfg: SiteConfig, report: CheckReport) -> None:
    try:
        report.add(OK, "site key", check_key_pair(cfg.key))
    except MDMTError as exc:
        report.add(FAIL, "site key", str(exc))
        return
    try:
        mode = cfg.key.stat().st_mode & 0o077
    except OSError:
        mode = 0
    if mode:
        report.add(WARN, "site key", f"{cfg.key} is readable by other users (mode {oct(cfg.key.stat().st_mode & 0o777)}); "
                   f"chmod 600 {cfg.key}")


def _label_counts(df) -> tuple[str, str]:
    from mdmt.data.manifest import brixia_global, severity_class, SEVERITY_CLASS_NAMES

    prog = df["prognosis"][df["prognosis"] != ""].value_counts()
    prog_txt = ", ".join(f"{int(prog.get(k, 0))} {k}" for k in ("MILD", "SEVERE")) if len(prog) else "none"
    sev = df["brixia"][df["brixia"] != ""].map(lambda s: severity_class(brixia_global(s))).value_counts()
    sev_txt = (", ".join(f"{int(sev.get(k, 0))} in {name}" for k, name in enumerate(SEVERITY_CLASS_NAMES))
               if len(sev) else "none")
    return prog_txt, sev_txt


def check_data(cfg: SiteConfig, report: CheckReport, sample: int = 5) -> None:
    from mdmt.data.manifest import MANIFEST, manifest_hash, read_manifest, read_rejected, site_role
    from mdmt.errors import DataError

    d = cfg.data_dir
    if not d.is_dir():
        report.add(FAIL, "data-dir", f"{d} not found (or not a folder); set 'data-dir' in {cfg.source} "
                   "to the site folder holding manifest.csv")
        return
    try:
        df = read_manifest(d)
    except DataError as exc:
        report.add(FAIL, "manifest", str(exc))
        return
    except OSError as exc:
        report.add(FAIL, "manifest", f"{d / MANIFEST}: cannot be read ({exc.strerror or exc})")
        return
    if not len(df):
        report.add(FAIL, "manifest", f"{d / MANIFEST} has no rows")
        return
    try:
        role = site_role(df)
    except DataError:
        report.add(FAIL, "labels", f"{d / MANIFEST}: no row has a prognosis or brixia label")
        return
    report.add(OK, "manifest", f"{d / MANIFEST}: {len(df)} images of {df['patient_id'].nunique()} patients, "
               f"role {role}")
    prog_txt, sev_txt = _label_counts(df)
    report.add(INFO, "labels", f"prognosis: {prog_txt}; severity (brixia global): {sev_txt}")
    paths = [d / img for img in df["image"]]
    missing = [p for p in paths if not p.is_file()]
    if len(missing) == len(paths):
        report.add(FAIL, "images", f"none of the {len(paths)} image files exists (first: {missing[0]}); "
                   "'image' paths are relative to data-dir")
        return
    if missing:
        report.add(WARN, "images", f"{len(missing)} of {len(paths)} image files missing (first: {missing[0]}); "
                   "ingestion will list them in rejected.csv")
    rejected = read_rejected(d)
    if len(rejected):
        report.add(INFO, "rejected", f"{len(rejected)} rows in {d / 'rejected.csv'} from earlier imports/ingests")
    _check_images(report, [p for p in paths if p.is_file()], sample)
    _check_cache(cfg, report, manifest_hash(d))


def _check_images(report: CheckReport, files: list[Path], sample: int) -> None:
    import numpy as np

    from mdmt.data.dicom import read_image
    from mdmt.errors import DicomRejected

    if sample <= 0 or not files:
        return
    picks = [files[int(i)] for i in np.unique(np.linspace(0, len(files) - 1, min(sample, len(files))).round())]
    stats, failed = [], []
    for f in picks:
        try:
            arr, meta = read_image(f)
        except DicomRejected as exc:
            failed.append(f"{f.name}: {exc}")
            continue
        stats.append((arr.shape, float(arr.min()), float(arr.max()), float(arr.mean()), float(arr.std()),
                      str(meta.get("photometric", "?"))))
    if stats:
        shapes = sorted({f"{s[0][1]}x{s[0][0]}" for s in stats})
        flat = sum(1 for s in stats if s[4] == 0.0)
        report.add(OK if not flat else WARN, "images",
                   f"{len(stats)} of {len(picks)} sampled decoded: sizes {', '.join(shapes)}; "
                   f"value range {min(s[1] for s in stats):.0f}..{max(s[2] for s in stats):.0f}, "
                   f"mean {sum(s[3] for s in stats) / len(stats):.1f}; photometric "
                   f"{', '.join(sorted({s[5] for s in stats}))}" + (f"; {flat} constant (blank) image(s)" if flat else ""))
    if failed and not stats:
        report.add(FAIL, "images", f"none of {len(picks)} sampled images decodes ({failed[0]})")
    elif failed:
        report.add(WARN, "images", f"{len(failed)} of {len(picks)} sampled images do not decode ({failed[0]})")


def _check_cache(cfg: SiteConfig, report: CheckReport, mhash: str) -> None:
    from mdmt.data.cache import META, cache_dir_for

    site_root = cache_dir_for(cfg.data_dir, cfg.cache_root, 32, "none").parent
    metas = sorted(site_root.glob(f"*/{META}")) if site_root.is_dir() else []
    if not metas:
        report.add(INFO, "cache", f"none yet under {cfg.cache_root}; the first run ingests the images "
                   f"('mdmt ingest {cfg.data_dir} --cache-dir {cfg.cache_root} --image-size N', N = the runs' "
                   "image-size, prepares it ahead)")
        return
    for m in metas:
        try:
            meta = json.loads(m.read_text())
            cached, rejected = int(meta["counts"]["cached"]), int(meta["counts"]["rejected"])
            fresh = meta.get("manifest_sha256") == mhash
        except (OSError, ValueError, KeyError, TypeError) as exc:
            report.add(WARN, "cache", f"{m}: unreadable ({exc.__class__.__name__}); delete {m.parent} and ingest again")
            continue
        state = "up to date" if fresh else "stale (the manifest changed; the next run re-ingests what changed)"
        report.add(OK if fresh else INFO, "cache", f"{m.parent.name}: {cached} images cached, {rejected} rejected, {state}")


def check_workspace(cfg: SiteConfig, report: CheckReport) -> None:
    ws = cfg.workspace
    try:
        ws.mkdir(parents=True, exist_ok=True)
        probe = ws / f".mdmt-write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        report.add(FAIL, "workspace", f"{ws} is not writable ({exc.strerror or exc}); the SuperNode's user must own it")
        return
    free = shutil.disk_usage(ws).free / 2**30
    report.add(OK if free >= 1 else WARN, "workspace", f"{ws} writable, {free:.1f} GiB free")


def check_compute(cfg: SiteConfig, report: CheckReport) -> None:
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if cfg.device == "cpu":
        report.add(OK, "device", "cpu (GPUs hidden from training)")
    elif cfg.device == "auto":
        report.add(OK, "device", f"auto: {'cuda (' + str(n) + ' GPU(s))' if n else 'cpu (no GPU visible)'}")
    elif n == 0:
        report.add(FAIL, "device", f"{cfg.device} requested but no CUDA GPU is visible; set device = \"cpu\" or "
                   "\"auto\" in the site config, or install the GPU driver")
    elif cfg.device.startswith("cuda:") and int(cfg.device.split(":")[1]) >= n:
        report.add(FAIL, "device", f"{cfg.device} requested but only {n} GPU(s) are visible (0..{n - 1})")
    else:
        report.add(OK, "device", f"{cfg.device} ({torch.cuda.get_device_name(int(cfg.device.split(':')[1]) if ':' in cfg.device else 0)})")


def check_site(cfg: SiteConfig, network: bool = True, timeout: float = 5.0, sample: int = 5,
               compute: bool = True) -> CheckReport:
    """Everything a site can check before joining; the report's verdict is READY or NOT READY: reasons."""
    report = CheckReport(cfg.site)
    if network:
        check_coordinator(cfg, report, timeout)
    else:
        report.add(INFO, "coordinator", "not checked (--offline)")
    check_key(cfg, report)
    check_data(cfg, report, sample)
    check_workspace(cfg, report)
    if compute:
        check_compute(cfg, report)
    return report


# ---- verbs ---------------------------------------------------------------------------------------


def cmd_certs(a: argparse.Namespace) -> None:
    w = make_certs(a.out, a.san or [], days=a.days, ca_days=a.ca_days, rotate=a.rotate, new_ca=a.new_ca)
    out = Path(w["out"])
    print(f"CA: {out / CA_CERT} ({w['ca']}; valid until {w['ca_not_after']}), key {out / CA_KEY}")
    print(f"SuperLink certificate: {out / SERVER_CERT}, key {out / SERVER_KEY} (valid until {w['server_not_after']})")
    print(f"  names: {', '.join(w['sans'])}")
    if w.get("archived"):
        print(f"replaced files moved to {w['archived']}")
    if w.get("bundle"):
        print(f"CA bundle (new + previous CA) for sites during the switch: {w['bundle']}")
    print(f"sites need only {out / (CA_BUNDLE if w.get('bundle') else CA_CERT)}; keep {out / CA_KEY} offline "
          "when not issuing certificates")


def cmd_site_key(a: argparse.Namespace) -> None:
    private, public = make_site_key(a.site, a.out, force=a.force)
    print(f"private key: {private} (keep it at the site, mode 600)")
    print(f"public key:  {public}  {check_key_pair(private).rsplit(', ', 1)[1]}")
    print("send the public key to the coordinator, who registers it:")
    print(f"  flwr supernode register {public.name} {DEFAULT_CONNECTION} --name {a.site}")


def cmd_site_config(a: argparse.Namespace) -> None:
    out = Path(a.out).expanduser().resolve()
    key = Path(a.key).expanduser() if a.key else site_key_paths(out.parent, a.site)[0]

    def absolute(p: str | Path) -> Path:
        return Path(p).expanduser().resolve()

    cfg = SiteConfig(site=a.site, data_dir=absolute(a.data_dir), coordinator=a.coordinator, ca=absolute(a.ca),
                     key=absolute(key), workspace=absolute(a.workspace or out.parent / "workspace"),
                     cache_dir=absolute(a.cache_dir) if a.cache_dir else None, device=a.device,
                     supernode_port=a.supernode_port, source="mdmt deploy site-config")
    check_device(cfg.device)
    write_site_config(cfg, out, force=a.force)
    print(f"wrote {out}")
    print(f"next: mdmt deploy check --config {out}")


def cmd_supernode_cmd(a: argparse.Namespace) -> None:
    cfg = load_site_config(a.config)
    argv, env = supernode_command(cfg)
    if a.exec:
        _exec(argv, env, [cfg.workspace])
    print(command_text(argv, env))


def cmd_superlink_cmd(a: argparse.Namespace) -> None:
    argv, env = superlink_command(a.certs, a.state_dir, host=a.host, port=a.port, database=not a.in_memory)
    if a.exec:
        _exec(argv, env, [Path(a.state_dir).expanduser()])
    print(command_text(argv, env))


def cmd_connection(a: argparse.Namespace) -> None:
    home = a.flwr_home or os.environ.get("FLWR_HOME") or str(Path.home() / ".flwr")
    path = write_connection(home, a.name, a.address, a.ca)
    print(f"connection '{a.name}' -> {a.address} (TLS, CA {Path(a.ca).expanduser().resolve()}) in {path}")


def cmd_check(a: argparse.Namespace, echo: Callable[[str], None] = print) -> None:
    cfg = load_site_config(a.config)
    echo(f"mdmt deploy check: site {cfg.site} ({cfg.source})")
    report = check_site(cfg, network=not a.offline, timeout=a.timeout, sample=a.sample)
    for line in report.lines():
        echo(line)
    if not report.ready:
        sys.stdout.flush()
        raise SystemExit(1)


def _job(a: argparse.Namespace):
    from mdmt.ops.jobs import find_job

    return find_job(a.config, a.name)


def cmd_submit(a: argparse.Namespace) -> None:
    from mdmt.ops import jobs

    job = jobs.submit(a.config, a.connection, a.flwr_home, a.app, a.name)
    if not a.watch:
        print(f"follow it with: mdmt deploy status {a.config}")
        return
    if job.state == "completed":
        return
    log_dir = Path(job.run_config).parent.parent / "logs"
    print(f"watching (every {a.poll:g}s; server logs in {log_dir})", flush=True)
    if jobs.watch(job, poll=a.poll, max_restarts=a.max_restarts, log_dir=log_dir,
                  echo=lambda line: print(line, flush=True)) != 0:
        raise SystemExit(1)


def cmd_status(a: argparse.Namespace) -> None:
    from mdmt.ops.jobs import status_lines

    print("\n".join(status_lines(_job(a))))


def cmd_stop(a: argparse.Namespace) -> None:
    from mdmt.ops.jobs import stop

    stop(_job(a))


def _add_job_verbs(sub) -> None:
    def common(s, flower: bool = False) -> None:
        s.add_argument("config", help="the job's run config (run-config keys of pyproject.toml; coordinator paths)")
        s.add_argument("--name", default="", help="job name (default: the config file's name)")
        if flower:
            s.add_argument("--connection", default=DEFAULT_CONNECTION,
                           help=f"SuperLink connection of 'mdmt deploy connection' (default {DEFAULT_CONNECTION})")
            s.add_argument("--flwr-home", default="", help="default: $FLWR_HOME or ~/.flwr")

    s = sub.add_parser("submit", help="submit a federated experiment to the SuperLink; --watch resubmits it "
                                      "after an interruption until every unit is done")
    common(s, flower=True)
    s.add_argument("--app", default="", help="a Flower app folder (default: the installed mdmt app, generated "
                                             "in the workspace's flwr/app)")
    s.add_argument("--watch", action="store_true", help="stay and supervise the run (systemd: mdmt-job@.service)")
    s.add_argument("--poll", type=float, default=10.0, help="seconds between status checks (default 10)")
    s.add_argument("--max-restarts", type=int, default=5, help="resubmissions before giving up (default 5)")
    s.set_defaults(fn=cmd_submit)
    s = sub.add_parser("status", help="a submitted job: Flower run status, units and rounds done, events")
    common(s)
    s.set_defaults(fn=cmd_status)
    s = sub.add_parser("stop", help="stop a submitted job (its supervisor then stops too)")
    common(s)
    s.set_defaults(fn=cmd_stop)


def _add_verbs(sub) -> None:
    s = sub.add_parser("certs", help="create the CA and the SuperLink's TLS certificate, or rotate them")
    s.add_argument("--out", required=True, help="certificate folder (ca.pem, ca.key, server.pem, server.key)")
    s.add_argument("--san", action="append", metavar="DNS:NAME|IP:ADDR",
                   help="a name sites use to reach the SuperLink (repeatable); localhost and 127.0.0.1 are always "
                        "added; on --rotate the current certificate's names are kept when none is given")
    s.add_argument("--days", type=int, default=397, help="server certificate lifetime in days (default 397)")
    s.add_argument("--ca-days", type=int, default=3650, help="CA lifetime in days (default 3650)")
    s.add_argument("--rotate", action="store_true", help="new server key and certificate from the same CA")
    s.add_argument("--new-ca", action="store_true", help="new CA too; writes ca-bundle.pem (new + previous CA)")
    s.set_defaults(fn=cmd_certs)

    s = sub.add_parser("site-key", help="create a site's SuperNode key pair (ECDSA P-384, OpenSSH format)")
    s.add_argument("--site", required=True)
    s.add_argument("--out", required=True, help="folder for site-<SITE> and site-<SITE>.pub")
    s.add_argument("--force", action="store_true", help="replace an existing key (it must be registered again)")
    s.set_defaults(fn=cmd_site_key)

    s = sub.add_parser("site-config", help="write a site config file (site, data, coordinator, CA, key, device)")
    s.add_argument("--site", required=True, help="the site name the coordinator sees")
    s.add_argument("--data-dir", required=True, help="the site folder (manifest.csv and images)")
    s.add_argument("--coordinator", required=True, metavar="HOST:PORT", help="the SuperLink's address")
    s.add_argument("--ca", required=True, help="the federation CA certificate (ca.pem)")
    s.add_argument("--key", default="", help="the site's private key (default: site-<SITE> next to --out)")
    s.add_argument("--workspace", default="", help="the site's own output folder (default: workspace/ next to --out)")
    s.add_argument("--cache-dir", default="", help="image cache folder (default: <workspace>/cache)")
    s.add_argument("--device", default="auto", help=f"{DEVICES_HELP} (default auto)")
    s.add_argument("--supernode-port", type=int, default=DEFAULT_SUPERNODE_PORT,
                   help=f"the SuperNode's local API port (default {DEFAULT_SUPERNODE_PORT}; unique per host)")
    s.add_argument("--out", required=True, help="the config file to write, e.g. /etc/mdmt/site-A.toml")
    s.add_argument("--force", action="store_true", help="replace an existing file")
    s.set_defaults(fn=cmd_site_config)

    s = sub.add_parser("supernode-cmd", help="print (or --exec) the site's flower-supernode command")
    s.add_argument("config", help="a site config file")
    s.add_argument("--exec", action="store_true", help="replace this process with the SuperNode (systemd, compose)")
    s.set_defaults(fn=cmd_supernode_cmd)

    s = sub.add_parser("superlink-cmd", help="print (or --exec) the coordinator's flower-superlink command")
    s.add_argument("--certs", required=True, help="the folder of 'mdmt deploy certs'")
    s.add_argument("--state-dir", required=True, help="SuperLink state: state.db, flwr-home/, uv-cache/")
    s.add_argument("--host", default="0.0.0.0", help="address to bind (default 0.0.0.0)")
    s.add_argument("--port", type=int, default=DEFAULT_SUPERLINK_PORT, help=f"default {DEFAULT_SUPERLINK_PORT}")
    s.add_argument("--in-memory", action="store_true", help="keep no state database (runs are lost on restart)")
    s.add_argument("--exec", action="store_true", help="replace this process with the SuperLink (systemd, compose)")
    s.set_defaults(fn=cmd_superlink_cmd)

    s = sub.add_parser("connection", help="add the SuperLink connection that 'flwr run' / 'flwr supernode' use")
    s.add_argument("--address", required=True, metavar="HOST:PORT")
    s.add_argument("--ca", required=True, help="the federation CA certificate")
    s.add_argument("--name", default=DEFAULT_CONNECTION, help=f"connection name (default {DEFAULT_CONNECTION})")
    s.add_argument("--flwr-home", default="", help="default: $FLWR_HOME or ~/.flwr")
    s.set_defaults(fn=cmd_connection)

    s = sub.add_parser("check", help="at a site: coordinator, TLS, key pair, data, device; ends READY or NOT READY")
    s.add_argument("--config", required=True, help="the site config file")
    s.add_argument("--offline", action="store_true", help="skip the coordinator (data and key only)")
    s.add_argument("--timeout", type=float, default=5.0, help="seconds for the connection checks (default 5)")
    s.add_argument("--sample", type=int, default=5, help="images decoded for statistics (default 5)")
    s.set_defaults(fn=cmd_check)
    _add_job_verbs(sub)


def add_arguments(subparsers) -> argparse.ArgumentParser:
    """Add the ``deploy`` verb and its sub-verbs to the ``mdmt`` sub-parsers; each sub-verb sets ``fn``."""
    p = subparsers.add_parser("deploy", help="certificates, site keys and configs, service commands, site checks")
    _add_verbs(p.add_subparsers(dest="deploy_verb", required=True, metavar="VERB"))
    return p
