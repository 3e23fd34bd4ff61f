"""traces and their top pairs

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 01:47:14.063900
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('traces',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('audit_id', sa.String(length=36), nullable=False),
    sa.Column('owner', sa.String(length=200), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('request', sa.JSON(), nullable=False),
    sa.Column('test_losses', sa.JSON(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['audit_id'], ['audits.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('traces', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_traces_audit_id'), ['audit_id'], unique=False)

    op.create_table('trace_pairs',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('trace_id', sa.String(length=36), nullable=False),
    sa.Column('test', sa.Integer(), nullable=False),
    sa.Column('rank', sa.Integer(), nullable=False),
    sa.Column('slot', sa.BigInteger(), nullable=False),
    sa.Column('pair_id', sa.Text(), nullable=False),
    sa.Column('relative_is', sa.Float(precision=53), nullable=False),
    sa.Column('influence', sa.Float(precision=53), nullable=False),
    sa.Column('influence_pos', sa.Float(precision=53), nullable=False),
    sa.Column('influence_neg', sa.Float(precision=53), nullable=False),
    sa.ForeignKeyConstraint(['trace_id'], ['traces.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('trace_pairs', schema=None) as batch_op:
        batch_op.create_index('ix_trace_pairs_trace_test_rank', ['trace_id', 'test', 'rank'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('trace_pairs', schema=None) as batch_op:
        batch_op.drop_index('ix_trace_pairs_trace_test_rank')

    op.drop_table('trace_pairs')
    with op.batch_alter_table('traces', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_traces_audit_id'))

    op.drop_table('traces')
