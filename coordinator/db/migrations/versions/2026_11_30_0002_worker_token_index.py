"""index workers by token hash

Calls are authenticated from their metadata before any message is read, by the
token alone; the index keeps that lookup cheap for large fleets.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 05:40:00
"""

from __future__ import annotations

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index(op.f("ix_workers_token_hash"), "workers", ["token_hash"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_workers_token_hash"), table_name="workers")
