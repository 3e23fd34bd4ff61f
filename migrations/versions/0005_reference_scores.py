"""the suspicion statistic, reference scores, the Algorithm 3 self-influence and per-example validation influence per pair;
audits.damping renamed curvature_shift (delta + lambda)

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-26 12:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

COLUMNS = ('suspicion', 'influence_per_example', 'self_influence_clip', 'clip_score_loo', 'reference_clip_score',
           'reference_negclip')


def upgrade() -> None:
    with op.batch_alter_table('scores') as batch:
        for name in COLUMNS:
            batch.add_column(sa.Column(name, sa.Float(precision=53), nullable=True))
    # one name per concept: `damping` is lambda (an option); the audit stores delta + lambda
    with op.batch_alter_table('audits') as batch:
        batch.alter_column('damping', new_column_name='curvature_shift')


def downgrade() -> None:
    with op.batch_alter_table('audits') as batch:
        batch.alter_column('curvature_shift', new_column_name='damping')
    with op.batch_alter_table('scores') as batch:
        for name in reversed(COLUMNS):
            batch.drop_column(name)
