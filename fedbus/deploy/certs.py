"""A test CA, broker certificates and per-node client certificates, made with the openssl CLI.

The ``cryptography`` package is not a fedbus dependency (the node agent
stays lean, DESIGN.md section 2a), and every host that runs mosquitto has the
openssl command, so the deployment's certificates come from it: EC P-256
keys, SHA-256 signatures, and the extensions that strict verifiers (Python
3.13's ``VERIFY_X509_STRICT``, mosquitto) check: a critical
``basicConstraints`` and ``keyUsage`` on the CA, key identifiers, and
``subjectAltName`` on every leaf (brokers: their compose service name,
``localhost`` and 127.0.0.1; nodes: their id, which is also the CN).

This is a *test* CA for a deployment that starts from nothing; production
deployments should issue from their own PKI (docs/deployment.md). Private
keys are written mode 0600.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from fedbus.errors import ConfigError

__all__ = ["CertificateAuthority", "openssl_path"]

_DAYS: Final = 825
"""Leaf lifetime: the longest that Apple's and browsers' TLS stacks accept."""

_TIMEOUT_S: Final = 30.0

_REQ_CONFIG: Final = """[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
"""


def openssl_path() -> str:
    """The openssl executable.

    Raises:
        ConfigError: openssl is not installed.
    """
    found = shutil.which("openssl")
    if found is None:
        raise ConfigError("--tls needs the openssl command (apt install openssl)", path="--tls")
    return found


def _run(args: Sequence[str]) -> None:
    try:
        subprocess.run(
            [openssl_path(), *args],
            check=True,
            capture_output=True,
            timeout=_TIMEOUT_S,
        )
    except subprocess.CalledProcessError as exc:
        detail = exc.stderr.decode("utf-8", errors="replace").strip().splitlines()
        raise ConfigError(
            f"openssl {args[0]} failed: {detail[-1] if detail else exc}", path="--tls"
        ) from exc
    except subprocess.TimeoutExpired as exc:
        raise ConfigError(f"openssl {args[0]} took over {_TIMEOUT_S:.0f} s", path="--tls") from exc


def _keygen(key: Path) -> None:
    _run(["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(key)])
    key.chmod(0o600)


class CertificateAuthority:
    """A self-signed CA in ``directory`` (``ca.pem``, and ``ca.key`` mode 0600).

    Args:
        directory: where ``ca.pem`` and ``ca.key`` live (created if missing).
        name: the CA's common name.
    """

    def __init__(self, directory: Path, *, name: str) -> None:
        self.directory = directory
        self.cert = directory / "ca.pem"
        self.key = directory / "ca.key"
        directory.mkdir(parents=True, exist_ok=True)
        if not (self.cert.is_file() and self.key.is_file()):
            self._create(name)

    def _create(self, name: str) -> None:
        with tempfile.TemporaryDirectory(prefix="fedbus-ca-") as tmp:
            cnf = Path(tmp, "req.cnf")
            cnf.write_text(_REQ_CONFIG, encoding="utf-8")
            _keygen(self.key)
            _run([
                "req", "-x509", "-new", "-key", str(self.key), "-sha256", "-days", str(_DAYS),
                "-subj", f"/CN={name}", "-config", str(cnf), "-extensions", "ca",
                "-out", str(self.cert),
            ])  # fmt: skip

    def issue(
        self,
        cert: Path,
        key: Path,
        *,
        common_name: str,
        dns: Sequence[str] = (),
        ips: Sequence[str] = (),
        server: bool = False,
    ) -> None:
        """Issue a certificate for ``common_name`` into ``cert`` (its key into ``key``, 0600).

        Args:
            cert: PEM certificate to write.
            key: PEM private key to write.
            common_name: subject CN (a node id, or a broker's service name).
            dns: DNS names of the subjectAltName (the CN is always one).
            ips: IP addresses of the subjectAltName.
            server: a broker certificate (serverAuth; clientAuth is always
                included, so a broker certificate can also authenticate a
                hand-made bridge of the operator's own).
        """
        names = [f"DNS:{n}" for n in dict.fromkeys([common_name, *dns])]
        names += [f"IP:{ip}" for ip in ips]
        usage = "serverAuth, clientAuth" if server else "clientAuth"
        ext = (
            "[leaf]\nbasicConstraints = critical, CA:FALSE\n"
            "keyUsage = critical, digitalSignature, keyEncipherment\n"
            f"extendedKeyUsage = {usage}\nsubjectAltName = {', '.join(names)}\n"
            "subjectKeyIdentifier = hash\nauthorityKeyIdentifier = keyid:always\n"
        )
        with tempfile.TemporaryDirectory(prefix="fedbus-cert-") as tmp:
            cnf, csr = Path(tmp, "req.cnf"), Path(tmp, "leaf.csr")
            cnf.write_text(_REQ_CONFIG + ext, encoding="utf-8")
            _keygen(key)
            _run([
                "req", "-new", "-key", str(key), "-subj", f"/CN={common_name}",
                "-config", str(cnf), "-out", str(csr),
            ])  # fmt: skip
            _run([
                "x509", "-req", "-in", str(csr), "-CA", str(self.cert), "-CAkey", str(self.key),
                "-set_serial", f"0x{secrets.token_hex(16)}", "-sha256", "-days", str(_DAYS),
                "-extfile", str(cnf), "-extensions", "leaf", "-out", str(cert),
            ])  # fmt: skip
        os.chmod(cert, 0o644)
