"""``anti-sus keygen``: a CURVE key pair for a server or a client."""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .options import settings


def add_keygen(sub: Any) -> None:
    p = sub.add_parser("keygen", help="make a CURVE key pair (NAME.key public, NAME.key_secret secret)")
    p.add_argument("directory", type=Path, help="where to write the key files")
    settings(p).add("--name", env="KEYGEN_NAME", default="server", help="file name stem")


def cmd_keygen(args: argparse.Namespace) -> int:
    from photocore.curve import keygen

    public, secret = keygen(args.directory, args.name)
    print(f"public key: {public}\nsecret key: {secret} (keep it private; give the .key file to the other side)")
    return 0
