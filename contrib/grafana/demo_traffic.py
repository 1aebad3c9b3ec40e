"""
Real POP3 traffic for a while, so that a pop3d's metrics have something to
show (the picture of contrib/grafana/pop3d.json in the docs is made from
such a run; see render_dashboard.py).

    python contrib/grafana/demo_traffic.py --port 1110 --tls-port 1995 \\
        --cafile cert.pem --users alice:wonderland,bob:builder --seconds 180

Each round, for every user: a login with USER/PASS (over STLS with TLS 1.2
every third round), STAT, LIST, RETR of the first message, TOP, sometimes a
DELE, QUIT; a login over implicit TLS (TLS 1.3); a wrong password now and
then; a second login while the first holds the maildrop (IN-USE); an
unknown command.  The pace rises and falls over the run.  Only loopback.
Standard library only.
"""

from __future__ import annotations

import argparse
import math
import poplib
import ssl
import time


def session(args: argparse.Namespace, user: str, password: str, round_: int) -> None:
    client = poplib.POP3(args.host, args.port, timeout=30)
    try:
        if args.cafile and round_ % 3 == 0:
            context = ssl.create_default_context(cafile=args.cafile)
            context.maximum_version = ssl.TLSVersion.TLSv1_2
            context.check_hostname = False
            client.stls(context=context)
        client.user(user)
        client.pass_(password)
        count, _ = client.stat()
        client.list()
        if count:
            client.retr(1)
            client.top(1, 0)
            if round_ % 5 == 4:
                client.dele(count)
        if round_ % 4 == 1:
            # A second client while this one holds the maildrop: IN-USE.
            other = poplib.POP3(args.host, args.port, timeout=30)
            other.user(user)
            try:
                other.pass_(password)
            except poplib.error_proto:
                pass
            other.quit()
        try:
            client._shortcmd("XYZZY")
        except poplib.error_proto:
            pass
        client.quit()
    finally:
        client.close()


def wrong_password(args: argparse.Namespace, user: str) -> None:
    client = poplib.POP3(args.host, args.port, timeout=30)
    client.user(user)
    try:
        client.pass_("not-the-password")
    except poplib.error_proto:
        pass
    client.quit()


def implicit_tls(args: argparse.Namespace, user: str, password: str) -> None:
    context = ssl.create_default_context(cafile=args.cafile)
    context.check_hostname = False
    client = poplib.POP3_SSL(args.host, args.tls_port, context=context, timeout=30)
    client.user(user)
    client.pass_(password)
    client.stat()
    client.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tls-port", type=int)
    parser.add_argument("--cafile")
    parser.add_argument("--users", required=True, help="user:password,...")
    parser.add_argument("--seconds", type=float, default=180.0)
    args = parser.parse_args()
    if args.host not in ("127.0.0.1", "::1", "localhost"):
        parser.error("--host: loopback only")
    users = [tuple(item.split(":", 1)) for item in args.users.split(",")]
    started = time.monotonic()
    round_ = 0
    while (elapsed := time.monotonic() - started) < args.seconds:
        for user, password in users:
            try:
                session(args, user, password, round_)
                if round_ % 2 == 0 and args.tls_port and args.cafile:
                    implicit_tls(args, user, password)
                if round_ % 3 == 1:
                    wrong_password(args, user)
            except poplib.error_proto:
                # Another client of this user holds the maildrop (IN-USE): as
                # a mail client does, try again at the next round.
                pass
        round_ += 1
        # From one round every 1.5 s to about 4 a second and back.
        pace = 0.25 + 0.5 * (1 + math.cos(2 * math.pi * elapsed / args.seconds)) / 2
        time.sleep(pace)
    print(f"{round_} rounds in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
