"""top-m partners: each pair's dropped_partner_mass (NULL on the exact path and for older audits)

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03 01:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('scores') as batch:
        batch.add_column(sa.Column('dropped_partner_mass', sa.Float(precision=53), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('scores') as batch:
        batch.drop_column('dropped_partner_mass')
