"""A throw-away CA and a server certificate for the addresses and names the clients dial.

P-256 keys because they are generated in about a millisecond (RSA-2048 takes tens), so every emulator gets
its own CA and start-up stays well under a second. The SDK's client context checks the host name
(`check_hostname=True`), so an IP the clients dial must be in the SAN as an IP address, not as a DNS name.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALIDITY = datetime.timedelta(days=2)


@dataclass(frozen=True, slots=True)
class Credentials:
    ca_pem: str
    cert_pem: str
    key_pem: str

    def write(self, folder: Path) -> tuple[Path, Path, Path]:
        """Write ca.pem, server.pem and server.key (private key 0600); returns the three paths."""
        ca, cert, key = folder / "ca.pem", folder / "server.pem", folder / "server.key"
        ca.write_text(self.ca_pem)
        cert.write_text(self.cert_pem + self.ca_pem)
        key.touch(mode=0o600)
        key.write_text(self.key_pem)
        return ca, cert, key

    def server_context(self, folder: Path) -> ssl.SSLContext:
        """TLS 1.2 and later, like IoT Hub; the SDK insists on exactly 1.2."""
        _, cert, key = self.write(folder)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(cert, key)
        return ctx


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "LeafGuard hub emulator"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def generate(hosts: list[str]) -> Credentials:
    """A CA and a server certificate valid for each of `hosts` (IP addresses or DNS names)."""
    now = datetime.datetime.now(datetime.UTC)
    # Backdated so a client whose clock is a little behind does not reject a certificate "from the future".
    not_before = now - datetime.timedelta(hours=1)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name(f"LeafGuard emulator CA {hosts[0]}")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
            decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0])).issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before).not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return Credentials(
        ca_pem=ca_cert.public_bytes(serialization.Encoding.PEM).decode(),
        cert_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
        key_pem=_pem(key),
    )
