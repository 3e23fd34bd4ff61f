"""liveness of traces and edits: heartbeats, dispatch times and attempts, as audits' tasks have

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02 08:30:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

TABLES = ('traces', 'edits')


def upgrade() -> None:
    for table in TABLES:
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column('attempts', sa.Integer(), server_default='0', nullable=False))
            batch.add_column(sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True))
            batch.add_column(sa.Column('dispatched_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    for table in reversed(TABLES):
        with op.batch_alter_table(table) as batch:
            batch.drop_column('dispatched_at')
            batch.drop_column('heartbeat_at')
            batch.drop_column('attempts')
