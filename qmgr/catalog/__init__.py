"""The catalog: SQLAlchemy models, engine setup, migrations and queries. No HTTP in here."""
