"""
Credentials made from what a client sent with USER/PASS or SASL PLAIN and
LOGIN, for ``twisted.cred`` checkers.
"""

from __future__ import annotations

import hmac

from twisted.cred.credentials import IUsernamePassword
from zope.interface import implementer

from pop3d.saslprep import prepare_credential


@implementer(IUsernamePassword)
class PreparedUsernamePassword:
    """
    A user name and password in two forms: as SASLprep prepares them (RFC
    6856 section 2.2, RFC 4013: ``élise`` typed as NFC or NFD is one name),
    which ``username`` and ``password`` are, and as the client sent them.

    A password stored before pop3d prepared credentials (``x²y``, with a
    no-break space, or decomposed) would no longer match its prepared form:
    ``usernames`` and ``passwords`` list both forms, prepared first, and
    `checkPassword` accepts either, so no login that worked before stops
    working.  Text that SASLprep prohibits raises
    `pop3d.saslprep.SASLprepError` ("servers MUST reject" it).
    """

    def __init__(self, username: bytes, password: bytes) -> None:
        self.username = prepare_credential(username)
        self.password = prepare_credential(password)
        self.usernames = _both(self.username, username)
        self.passwords = _both(self.password, password)

    def checkPassword(self, password: bytes | str) -> bool:
        if isinstance(password, str):
            password = password.encode("utf-8")
        # Every form compared, so the time does not tell which one matched.
        matches = [hmac.compare_digest(candidate, password) for candidate in self.passwords]
        return any(matches)


def _both(prepared: bytes, raw: bytes) -> tuple[bytes, ...]:
    return (prepared,) if prepared == raw else (prepared, raw)
