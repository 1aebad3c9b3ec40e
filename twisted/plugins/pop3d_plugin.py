"""
The twistd dropin: ``twistd pop3d``, the ``--auth passwd-file:`` checker and
the ``--mail-location`` kinds ``maildir:`` and ``mbox:``.
"""

from twisted.application.service import ServiceMaker

from pop3d.authdb.ldap import LdapCheckerFactory
from pop3d.checkers import PasswdFileCheckerFactory
from pop3d.stores.locations import MaildirLocation, MboxLocation

pop3d = ServiceMaker(
    "pop3d",
    "pop3d.tap",
    "A POP3 server (RFC 1939) for Maildirs and mbox files",
    "pop3d",
)

passwdFile = PasswdFileCheckerFactory()
ldapDirectory = LdapCheckerFactory()

maildirLocation = MaildirLocation()
mboxLocation = MboxLocation()
