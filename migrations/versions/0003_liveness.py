"""liveness: heartbeats of running tasks and dispatch times of sent ones

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 08:50:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('shards') as batch:
        batch.add_column(sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column('dispatched_at', sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table('audits') as batch:
        batch.add_column(sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column('dispatched_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('audits') as batch:
        batch.drop_column('dispatched_at')
        batch.drop_column('heartbeat_at')
    with op.batch_alter_table('shards') as batch:
        batch.drop_column('dispatched_at')
        batch.drop_column('heartbeat_at')
