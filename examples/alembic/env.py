"""Alembic environment for the examples: the database URL comes from alembic.ini's
sqlalchemy.url or from the DATABASE_URL environment variable."""

import os

from alembic import context
from sqlalchemy import create_engine, pool

url = os.environ.get("DATABASE_URL") or context.config.get_main_option("sqlalchemy.url")
engine = create_engine(url, poolclass=pool.NullPool)
with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=None)
    with context.begin_transaction():
        context.run_migrations()
