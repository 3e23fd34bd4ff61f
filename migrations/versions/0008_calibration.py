"""calibrated estimates: each pair's misaligned_probability and the audit's summary (fraction, flag precision)

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-02 16:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('scores') as batch:
        batch.add_column(sa.Column('misaligned_probability', sa.Float(precision=53), nullable=True))
    with op.batch_alter_table('audits') as batch:
        batch.add_column(sa.Column('summary', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('audits') as batch:
        batch.drop_column('summary')
    with op.batch_alter_table('scores') as batch:
        batch.drop_column('misaligned_probability')
