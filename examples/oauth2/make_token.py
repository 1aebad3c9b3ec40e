"""
Print a signed access token for the README's ``--auth oauth2:`` example.

The first run writes a fresh RSA key pair beside this script: the private key
to ``example-key.json`` (mode 0600) and its public half, the JWK Set that
``dovecot-oauth2.conf.ext`` trusts, to ``jwks.json``.  Later runs reuse them.
Both are example keys, made on this machine and kept out of git: never trust
them for real mail.

    python3 examples/oauth2/make_token.py alice

prints a JWT (RS256) for ``alice`` from issuer ``https://id.example.test``
with scope ``mail``, valid for an hour.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from joserfc import jwt
from joserfc.jwk import RSAKey

HERE = Path(__file__).resolve().parent
PRIVATE_KEY = HERE / "example-key.json"
PUBLIC_KEYS = HERE / "jwks.json"
ISSUER = "https://id.example.test"
KEY_ID = "example"
LIFETIME = 3600


def example_key() -> RSAKey:
    """The example's key pair: read, or made and written once."""
    if PRIVATE_KEY.exists():
        return RSAKey.import_key(json.loads(PRIVATE_KEY.read_text()))
    key = RSAKey.generate_key(2048, parameters={"kid": KEY_ID, "use": "sig", "alg": "RS256"})
    # Only the owner may read the private key, from its first byte on disk.
    descriptor = os.open(PRIVATE_KEY, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as stream:
        json.dump(key.as_dict(private=True), stream)
    PUBLIC_KEYS.write_text(json.dumps({"keys": [key.as_dict(private=False)]}, indent=2) + "\n")
    return key


def main(arguments: list[str]) -> int:
    if len(arguments) != 1:
        print("usage: make_token.py USER", file=sys.stderr)
        return 2
    now = int(time.time())
    claims = {
        "iss": ISSUER,
        "sub": arguments[0],
        "scope": "mail",
        "iat": now,
        "exp": now + LIFETIME,
    }
    print(jwt.encode({"alg": "RS256", "kid": KEY_ID}, claims, example_key()))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
