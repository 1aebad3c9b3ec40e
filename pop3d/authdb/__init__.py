"""
Users kept in the databases mail administrators already run, read through
Dovecot's own configuration files: ``--auth sql:`` (``dovecot-sql.conf.ext``),
``--auth ldap:`` (``dovecot-ldap.conf.ext``) and ``--auth oauth2:``
(``dovecot-oauth2.conf.ext``).

Each module holds a credentials checker and its ``twisted.cred.strcred``
factory.  What they share is elsewhere: the file format in
`pop3d.dovecotconf`, the ``%`` variables in `pop3d.dovecotvars`, and what a
database says about a user besides the password (`pop3d.userdb`).
"""

from __future__ import annotations

from twisted.logger import Logger

log = Logger()


class OutageLog:
    """
    A user database's outages, logged once each: the first failure of an
    outage (an error, with its reason) and the first success after it; every
    login in between answers ``-ERR [SYS/TEMP]`` without a line of its own.
    ``what`` names the database in both lines, ``where`` follows (details).
    """

    def __init__(self, what: str, where: str = "") -> None:
        self.what = what
        self.where = where
        self.down = False

    def failed(self, reason: str) -> None:
        if not self.down:
            self.down = True
            log.error(
                "{what} unavailable{where}: {reason}",
                what=self.what,
                where=self.where,
                reason=reason,
            )

    def succeeded(self) -> None:
        if self.down:
            self.down = False
            log.info("{what} available again{where}", what=self.what, where=self.where)
