"""Coordinator persistence: SQLAlchemy tables, Alembic migrations, blob directory, store."""
