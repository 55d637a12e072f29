"""Alembic's environment for crv's store: always run from crv.service.database.upgrade, on the
connection (and transaction) it passes; never from the `alembic` command line."""

from alembic import context

from crv.service.store import METADATA

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=METADATA)
context.run_migrations()
