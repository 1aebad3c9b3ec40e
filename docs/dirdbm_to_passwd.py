"""Print a pop3d passwd-file for the users of a twisted.mail DirDBM."""

import os
import sys

from twisted.persisted.dirdbm import DirDBM

from pop3d.passwords import SCHEMES

path = sys.argv[1]
if not os.path.isdir(path):
    sys.exit(f"{path} is not a directory (twisted.mail keeps its DirDBM in DOMAIN/passwd)")
argon2id = SCHEMES["ARGON2ID"]
for user, password in sorted(DirDBM(path).items()):
    print(f"{user.decode()}:{{ARGON2ID}}{argon2id.hash(password).decode()}::")
