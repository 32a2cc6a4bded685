"""Alembic environment: qmgr runs migrations from code (see qmgr.catalog.db.Catalog.migrate)."""

from alembic import context
from sqlalchemy import create_engine

from qmgr.catalog.models import Base

config = context.config
target_metadata = Base.metadata


def run_with(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things in place: batch mode copies the table.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    run_with(connection)
else:
    url = config.get_main_option("sqlalchemy.url")
    with create_engine(url).connect() as conn:
        run_with(conn)
        conn.commit()
