"""the model's prediction for each test example of a trace (ecif trace shows it)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02 12:10:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('traces') as batch:
        batch.add_column(sa.Column('predictions', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('traces') as batch:
        batch.drop_column('predictions')
