"""A throwaway certificate authority for the emulator, made at test time (never committed).

nomad trusts it through ``--ca-bundle``, so the emulator serves the real host
names over real TLS and nomad's certificate checks stay on in tests.
"""
from __future__ import annotations

import os
import ssl
import tempfile
from dataclasses import dataclass
from typing import Sequence

import trustme


@dataclass
class EmulatorTLS:
    """Server-side SSL context plus the CA bundle path clients pass to ``--ca-bundle``."""

    context: ssl.SSLContext
    ca_bundle: str
    _dir: tempfile.TemporaryDirectory

    def cleanup(self) -> None:
        self._dir.cleanup()


def make_tls(hosts: Sequence[str], wildcards: Sequence[str] = ()) -> EmulatorTLS:
    """Issue one certificate whose SAN list covers ``hosts`` (and ``*.domain`` wildcards)."""
    ca = trustme.CA(organization_name="nomad emulator test CA")
    leaf = ca.issue_cert(*hosts, *wildcards, common_name=hosts[0])
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    leaf.configure_cert(context)
    tmp = tempfile.TemporaryDirectory(prefix="nomad-emulator-")
    path = os.path.join(tmp.name, "ca.pem")
    ca.cert_pem.write_to_path(path)
    return EmulatorTLS(context, path, tmp)
