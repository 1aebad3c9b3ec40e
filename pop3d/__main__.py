"""
pop3d's commands, ``python -m pop3d COMMAND`` (also installed as ``pop3d``):
``who`` and ``kick`` talk to a running server's ``--control`` socket (see
`pop3d.control`), as ``doveadm who`` and ``doveadm kick`` do.

``python -m pop3d pw`` (also installed as ``pop3d-pw``): print a
``{SCHEME}hash`` for a passwd-file line, as ``doveadm pw`` does.

The password comes from ``-p``, else from a prompt (asked twice) when
standard input is a terminal, else from the first line of standard input::

    $ python -m pop3d pw
    Enter new password:
    Retype new password:
    {ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$...
    $ printf 'secret\\n' | python -m pop3d pw -s BLF-CRYPT
    {BLF-CRYPT}$2y$10$...

The default scheme is ``{ARGON2ID}`` (see `pop3d.passwords.DEFAULT_SCHEME`).
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from pop3d import control
from pop3d.passwords import (
    DEFAULT_SCHEME,
    SCHEMES,
    PasswordSchemeError,
    get_scheme,
    split_scheme,
)

#: The name the console script is installed under: it needs no "pw".
CONSOLE_SCRIPT = "pop3d-pw"
#: The console script for every command (``pop3d who``, ``pop3d kick``).
MAIN_SCRIPT = "pop3d"


class _Failed(Exception):
    """Something the user must fix: printed without a traceback."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pop3d",
        description="pop3d's command-line tools.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    pw = commands.add_parser(
        "pw",
        help="make a {SCHEME}hash for a passwd-file (like doveadm pw)",
        description=(
            "Print a {SCHEME}hash for a Dovecot-style passwd-file.  The password is "
            "read from a prompt (twice) when standard input is a terminal, else from "
            "the first line of standard input."
        ),
    )
    pw.add_argument(
        "-s",
        "--scheme",
        default=DEFAULT_SCHEME,
        help=(
            f"password scheme (default {DEFAULT_SCHEME}: memory-hard Argon2id, "
            "no 72-byte limit, read by Dovecot); -l lists them"
        ),
    )
    pw.add_argument(
        "-p",
        "--password",
        help="the password (other users may see it in the process list; prefer the prompt)",
    )
    pw.add_argument(
        "-r",
        "--rounds",
        type=int,
        help="cost: rounds for SHA-crypt, cost for BLF-CRYPT, passes for Argon2, "
        "iterations for SCRAM-SHA-256",
    )
    pw.add_argument(
        "-t",
        "--test",
        metavar="HASH",
        help="check the password against {SCHEME}HASH instead of making a hash",
    )
    pw.add_argument("-l", "--list", action="store_true", help="list the supported schemes")
    who = commands.add_parser(
        "who",
        help="list the logged-in sessions of a running server (like doveadm who)",
        description=(
            "List the logged-in sessions of the twistd pop3d started with --control PATH: "
            "user, peer, RFC 1939 state, login time and the worker's process id."
        ),
    )
    who.add_argument(
        "--control", required=True, metavar="PATH", help="the server's --control socket"
    )
    who.add_argument("user", nargs="?", help="list only this user's sessions")
    kick = commands.add_parser(
        "kick",
        help="close a user's sessions without UPDATE (like doveadm kick)",
        description=(
            "Close USER's sessions on the twistd pop3d started with --control PATH, without "
            "UPDATE: nothing the client marked with DELE is deleted.  A session already in "
            "UPDATE is left to finish.  Exit status 1 when no session was kicked."
        ),
    )
    kick.add_argument(
        "--control", required=True, metavar="PATH", help="the server's --control socket"
    )
    kick.add_argument("user", metavar="USER")
    return parser


def _who(options: argparse.Namespace) -> int:
    rows = control.request(options.control, {"command": "who"})["sessions"]
    if options.user is not None:
        rows = [row for row in rows if row["user"] == options.user]
    sys.stdout.write(control.format_who(rows))
    return 0


def _kick(options: argparse.Namespace) -> int:
    answer = control.request(options.control, {"command": "kick", "user": options.user})
    kicked = int(answer["kicked"])
    sys.stdout.write(f"kicked {kicked} session{'s' if kicked != 1 else ''} of {options.user}\n")
    return 0 if kicked else 1


def _read_password(confirm: bool) -> bytes:
    if sys.stdin.isatty():
        try:
            first = getpass.getpass("Enter new password: " if confirm else "Enter password: ")
            if confirm and getpass.getpass("Retype new password: ") != first:
                raise _Failed("the passwords do not match")
        except (EOFError, KeyboardInterrupt):
            raise _Failed("no password given") from None
        return first.encode("utf-8")
    line = sys.stdin.buffer.readline()
    if line.endswith(b"\n"):
        line = line[:-1]
    if line.endswith(b"\r"):
        line = line[:-1]
    return line


def _pw(options: argparse.Namespace) -> int:
    out = sys.stdout.buffer
    if options.list:
        for name in sorted(SCHEMES):
            out.write(name.encode() + (b" (default)" if name == DEFAULT_SCHEME else b"") + b"\n")
        return 0
    if options.test is not None:
        name, secret = split_scheme(os.fsencode(options.test))
    else:
        name, secret = options.scheme, b""
    scheme = get_scheme(name)
    if options.test is not None:
        scheme.check(secret)
    elif options.rounds is not None and scheme.rounds_help == "not used":
        raise _Failed(f"{{{scheme.name}}} takes no -r", 2)
    if options.password is not None:
        password = os.fsencode(options.password)
    else:
        password = _read_password(confirm=options.test is None)
    if not password:
        raise _Failed("empty password")
    if options.test is not None:
        if not scheme.verify(secret, password):
            raise _Failed("password mismatch")
        out.write(os.fsencode(options.test) + b" (verified)\n")
        return 0
    if scheme.plaintext and any(c in password for c in b":\r\n"):
        raise _Failed(
            f"a {{{scheme.name}}} password with ':' or a line break cannot be stored in a "
            "passwd-file; use a hashed scheme"
        )
    hashed = scheme.hash(password, options.rounds)
    out.write(b"{" + scheme.name.encode() + b"}" + hashed + b"\n")
    out.flush()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; returns the exit status (0 success, 1 failure, 2 usage)."""
    program = "python -m pop3d"
    named: str | None = None
    if argv is None:
        argv = sys.argv[1:]
        stem = Path(sys.argv[0]).stem
        if stem == CONSOLE_SCRIPT:
            argv = ["pw", *argv]
            named = CONSOLE_SCRIPT
        elif stem == MAIN_SCRIPT:
            program = MAIN_SCRIPT
    parser = _parser()
    parser.prog = program
    options = parser.parse_args(argv)
    command = named or f"{program} {options.command}"
    try:
        if options.command == "who":
            return _who(options)
        if options.command == "kick":
            return _kick(options)
        return _pw(options)
    except control.ControlError as error:
        parser.exit(1, f"{command}: {error}\n")
    except PasswordSchemeError as error:
        parser.exit(2, f"{command}: error: {error}\n")
    except _Failed as error:
        parser.exit(error.status, f"{command}: {error}\n")


if __name__ == "__main__":
    sys.exit(main())
