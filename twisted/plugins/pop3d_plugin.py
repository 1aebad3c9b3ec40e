"""
The twistd dropin: ``twistd pop3d`` and the ``--auth passwd-file:`` checker.
"""

from twisted.application.service import ServiceMaker

from pop3d.checkers import PasswdFileCheckerFactory

pop3d = ServiceMaker(
    "pop3d",
    "pop3d.tap",
    "A POP3 server (RFC 1939) for Maildirs and mbox files",
    "pop3d",
)

passwdFile = PasswdFileCheckerFactory()
