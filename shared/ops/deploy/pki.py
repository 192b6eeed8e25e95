"""The federation's PKI: the CA and the SuperLink's TLS certificate (``mdmt deploy certs``, with their
rotation), and the sites' SuperNode authentication keys (``mdmt deploy site-key``).

This module imports ``cryptography``; the modules that need it import this one only when a verb runs."""

from __future__ import annotations

import base64
import datetime as _dt
import hashlib
import ipaddress
import os
import re
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mdmt.errors import ConfigError, MDMTError
from mdmt.ops.deploy.files import (
    CA_BUNDLE,
    CA_CERT,
    CA_KEY,
    CA_PREVIOUS,
    PREVIOUS_DIR,
    SERVER_CERT,
    SERVER_KEY,
    default_ca_dir,
    make_dir,
    site_key_paths,
    write_private,
    write_public,
)
from mdmt.ops.deploy.siteconfig import check_site_name

NIST_CURVES = ("secp256r1", "secp384r1", "secp521r1")
# The SuperLink starts its own SuperExec, which connects to the SuperLink's API on the loopback address
# (0.0.0.0 becomes 127.0.0.1): the certificate must name it too.
LOOPBACK_SANS = ("DNS:localhost", "IP:127.0.0.1")


# ---- certificates --------------------------------------------------------------------------------


def parse_san(text: str):
    """``DNS:name`` / ``IP:address`` (a bare value is taken as an IP when it parses as one) -> GeneralName."""
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
    return f"IP:{name.value}" if isinstance(name, x509.IPAddress) else f"DNS:{name.value}"


def cert_sans(path: Path) -> list[str]:
    """The subject alternative names of a PEM certificate, as ``DNS:...`` / ``IP:...``."""
    cert = _load_cert(path)
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return [san_text(n) for n in ext.value]


def _load_cert(path: Path):
    try:
        return x509.load_pem_x509_certificate(Path(path).read_bytes())
    except FileNotFoundError:
        raise MDMTError(f"{path}: certificate file not found") from None
    except ValueError as exc:
        raise MDMTError(f"{path}: not a PEM certificate ({exc})") from None


def _load_key(path: Path):
    try:
        return serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except FileNotFoundError:
        raise MDMTError(f"{path}: private key file not found") from None
    except (ValueError, TypeError) as exc:
        raise MDMTError(f"{path}: not an unencrypted PEM private key ({exc})") from None


def _spki(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _now() -> _dt.datetime:
    return _dt.datetime.now(_dt.UTC)


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _pem_cert(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _new_ca(name: str, days: int):
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "MDMT federation"),
            x509.NameAttribute(NameOID.COMMON_NAME, name),
        ]
    )
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(now + _dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def _new_server_cert(ca_key, ca_cert, sans: list, days: int):
    key = ec.generate_private_key(ec.SECP384R1())
    cn = str(sans[0].value)
    now = _now()
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(
            x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "MDMT federation"),
                    x509.NameAttribute(NameOID.COMMON_NAME, cn[:64]),
                ]
            )
        )
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _dt.timedelta(minutes=5))
        .not_valid_after(min(now + _dt.timedelta(days=days), ca_cert.not_valid_after_utc))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
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


def _check_apart(out: Path, ca_dir: Path) -> None:
    o, c = Path(os.path.abspath(out)), Path(os.path.abspath(ca_dir))
    if o == c or o in c.parents or c in o.parents:
        raise ConfigError(
            f"--ca-dir {ca_dir}: must be apart from --out {out} (neither inside the other); the SuperLink "
            "reads the certificate folder and must not see the CA key"
        )


def _move_ca_keys(out: Path, ca_dir: Path) -> list[str]:
    """Move CA keys left in the certificate folder (``ca.key`` and archived ``previous/*/ca.key``) into
    ``ca_dir`` (same relative place); returns the moved paths."""
    moved = []
    for src in [out / CA_KEY, *sorted((out / PREVIOUS_DIR).glob(f"*/{CA_KEY}"))]:
        if not src.is_file():
            continue
        dest = ca_dir / src.relative_to(out)
        make_dir(dest.parent, "CA key", private=True)
        if not dest.is_file():
            write_private(dest, src.read_bytes())
        src.unlink()
        moved.append(str(src))
    return moved


def make_certs(
    out: str | Path,
    sans: list[str],
    days: int = 397,
    ca_days: int = 3650,
    rotate: bool = False,
    new_ca: bool = False,
    ca_name: str = "MDMT federation CA",
    ca_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Create (or rotate) the CA and the SuperLink certificate; returns what was written.

    ``out`` is the folder the SuperLink reads: ``ca.pem``, ``server.pem``, ``server.key`` (and during a CA
    switch ``ca-previous.pem``, ``ca-bundle.pem``). The CA key ``ca.key`` goes to ``ca_dir`` (default: the
    sibling ``<out>-ca``), an owner-only folder (0700) apart from ``out``.
    - empty folders: a new CA (``ca.pem``, ``ca.key``) and a server certificate (``server.pem``, ``server.key``);
    - CA present, no server certificate: a server certificate from that CA;
    - ``rotate``: a new server key and certificate from the same CA (sites keep their ``ca.pem``);
    - ``new_ca``: a new CA and server certificate; the old CA stays in ``ca-previous.pem`` and
      ``ca-bundle.pem`` holds both, for sites to trust during the switch.
    Replaced files are moved to ``out/previous/<UTC time>/`` (a replaced CA key to ``ca_dir/previous/...``).
    A CA key still in ``out`` is moved into ``ca_dir`` (``moved`` in the result). Without ``sans`` a rotation
    reuses the SANs of the current certificate. ``localhost`` and ``127.0.0.1`` are always added."""
    out = Path(out).expanduser()
    ca_dir = Path(ca_dir).expanduser() if ca_dir else default_ca_dir(out)
    if days <= 0 or ca_days <= 0:
        raise ConfigError("--days and --ca-days must be positive")
    if rotate and new_ca:
        raise ConfigError("give --rotate (new server certificate, same CA) or --new-ca (new CA too), not both")
    _check_apart(out, ca_dir)
    key_path, stray = ca_dir / CA_KEY, out / CA_KEY
    if stray.is_file() and key_path.is_file() and stray.read_bytes() != key_path.read_bytes():
        raise ConfigError(
            f"{stray} and {key_path} are different keys; the CA key belongs in {ca_dir} only: keep there the "
            f"one that matches {out / CA_CERT} and delete the other"
        )
    have_key = key_path.is_file() or stray.is_file()
    have_cert = (out / CA_CERT).is_file()
    have_ca = have_key and have_cert
    have_server = (out / SERVER_CERT).exists() or (out / SERVER_KEY).exists()
    if have_cert and not have_key and not new_ca:
        raise ConfigError(
            f"{out / CA_CERT} exists without its key {key_path}: put the CA key there (it signs server "
            "certificates; --ca-dir names another folder) or pass --new-ca to start a new CA"
        )
    if have_key and not have_cert and not new_ca:
        raise ConfigError(
            f"{key_path if key_path.is_file() else stray} exists without {out / CA_CERT}: restore the CA "
            "certificate, or pass --new-ca to start a new CA (the old key is archived)"
        )
    if have_server and not (rotate or new_ca):
        raise ConfigError(
            f"{out / SERVER_CERT} already exists; pass --rotate to issue a new server certificate "
            "from the same CA (sites keep their ca.pem), or --new-ca to replace the CA too"
        )
    if rotate and not have_ca:
        raise ConfigError(f"--rotate: no CA ({out / CA_CERT} and {key_path}); run without --rotate to create one")
    names = [parse_san(s) for s in sans]
    if not names and (out / SERVER_CERT).is_file():
        names = [parse_san(s) for s in cert_sans(out / SERVER_CERT)]
    if not names:
        raise ConfigError(
            "give at least one --san: the DNS name or IP address sites use to reach the SuperLink, "
            "e.g. --san DNS:coord.example.org --san IP:10.0.0.5"
        )
    names = _dedupe_sans(names + [parse_san(s) for s in LOOPBACK_SANS])
    make_dir(out, "certificate")
    make_dir(ca_dir, "CA key", private=True)

    written: dict[str, Any] = {
        "out": str(out),
        "ca_dir": str(ca_dir),
        "ca_key": str(key_path),
        "sans": [san_text(n) for n in names],
    }
    moved = _move_ca_keys(out, ca_dir)
    if moved:
        written["moved"] = moved
    if new_ca or not have_ca:
        previous_ca = (out / CA_CERT).read_bytes() if new_ca and have_cert else None
        if new_ca:
            archived = _archive(out, [CA_CERT, SERVER_CERT, SERVER_KEY, CA_BUNDLE, CA_PREVIOUS])
            archived_key = _archive(ca_dir, [CA_KEY])
            if archived:
                written["archived"] = str(archived)
            if archived_key:
                written["archived_key"] = str(archived_key)
                if previous_ca is not None:  # the old pair stays together
                    write_public(archived_key / CA_CERT, previous_ca)
        ca_key, ca_cert = _new_ca(ca_name, ca_days)
        write_private(key_path, _pem_key(ca_key))
        write_public(out / CA_CERT, _pem_cert(ca_cert))
        written["ca"] = "new"
        if previous_ca is not None:
            write_public(out / CA_PREVIOUS, previous_ca)
            write_public(out / CA_BUNDLE, _pem_cert(ca_cert) + previous_ca)
            written["bundle"] = str(out / CA_BUNDLE)
    else:
        ca_key, ca_cert = _load_key(key_path), _load_cert(out / CA_CERT)
        if _spki(ca_cert.public_key()) != _spki(ca_key.public_key()):
            raise MDMTError(f"{key_path} does not belong to {out / CA_CERT}; restore the matching pair")
        written["ca"] = "kept"
        if rotate:
            archived = _archive(out, [SERVER_CERT, SERVER_KEY])
            if archived:
                written["archived"] = str(archived)
    key, cert = _new_server_cert(ca_key, ca_cert, names, days)
    write_private(out / SERVER_KEY, _pem_key(key))
    write_public(out / SERVER_CERT, _pem_cert(cert))
    written["server_not_after"] = cert.not_valid_after_utc.strftime("%Y-%m-%d")
    written["ca_not_after"] = ca_cert.not_valid_after_utc.strftime("%Y-%m-%d")
    return written


# ---- site keys -----------------------------------------------------------------------------------


def make_site_key(site: str, out: str | Path, force: bool = False) -> tuple[Path, Path]:
    """An ECDSA P-384 key pair in OpenSSH format: ``out/site-<site>`` (0600) and ``out/site-<site>.pub``."""
    check_site_name(site)
    private, public = site_key_paths(out, site)
    if (private.exists() or public.exists()) and not force:
        raise ConfigError(
            f"{private} already exists; a registered key must not be replaced by accident "
            "(pass --force, then register the new .pub and unregister the old node)"
        )
    make_dir(private.parent, "key")
    key = ec.generate_private_key(ec.SECP384R1())
    write_private(
        private,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    write_public(public, pub + f" mdmt-site-{site}\n".encode())
    return private, public


def key_fingerprint(public_key) -> str:
    """``SHA256:...`` as ``ssh-keygen -l`` prints it: read it to the coordinator over a second channel."""
    blob = public_key.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).split()[1]
    digest = hashlib.sha256(base64.b64decode(blob)).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def check_key_pair(private: str | Path) -> str:
    """Check ``private`` and ``private.pub`` are an OpenSSH ECDSA (NIST curve) pair; returns a description.
    Raises MDMTError with the reason otherwise."""
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
        raise MDMTError(
            f"{private}: Flower needs an ECDSA key on a NIST curve (P-384 recommended), "
            f"got {type(key).__name__.replace('_', '')}"
        )
    if not isinstance(pub, ec.EllipticCurvePublicKey) or pub.public_numbers() != key.public_key().public_numbers():
        raise MDMTError(f"{public} does not belong to {private}; regenerate the pair with 'mdmt deploy site-key'")
    bits = {"secp256r1": 256, "secp384r1": 384, "secp521r1": 521}[key.curve.name]
    return f"ECDSA P-{bits} pair {private}(.pub), {key_fingerprint(pub)}"
