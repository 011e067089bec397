"""The operator's side of the uplink: ``fleet ingest`` stores what devices send upstream, verified and once.

``worker`` (one member of the shared subscription), ``store`` (a batch decoded, verified and written in one
transaction), ``trust`` (signature chains back to the inventory's device keys, held certificates),
``schema`` (the Peewee tables on SQLite or PostgreSQL), ``query`` (``fleet query``), ``cli``. See docs/fleet.md.
"""
