"""
The dropin that makes ``--mail-location sqlite:PATH`` known to ``twistd
pop3d``: any module in a ``twisted/plugins/`` directory (without an
``__init__.py``) of a ``sys.path`` entry is one.
"""

from pop3d_sqlite import SQLiteLocation

sqliteLocation = SQLiteLocation()
