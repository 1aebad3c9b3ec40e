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
