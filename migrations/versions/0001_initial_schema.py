"""initial schema: api_keys, audits, pairs, shards, scores

Revision ID: 0001
Revises: 
Create Date: 2026-11-24 00:40:11.514438
"""
from alembic import op
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('api_keys',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('owner', sa.String(length=200), nullable=False),
    sa.Column('key_hash', sa.String(length=64), nullable=False),
    sa.Column('prefix', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('revoked', sa.Boolean(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('key_hash')
    )
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_api_keys_owner'), ['owner'], unique=False)

    op.create_table('audits',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('owner', sa.String(length=200), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('stage', sa.String(length=16), nullable=False),
    sa.Column('manifest', sa.JSON(), nullable=False),
    sa.Column('audit_dir', sa.Text(), nullable=False),
    sa.Column('shards_total', sa.Integer(), nullable=True),
    sa.Column('pairs_total', sa.Integer(), nullable=True),
    sa.Column('pairs_rejected', sa.Integer(), nullable=True),
    sa.Column('damping', sa.Float(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('audits', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_audits_created_at'), ['created_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_audits_owner'), ['owner'], unique=False)
        batch_op.create_index(batch_op.f('ix_audits_status'), ['status'], unique=False)

    op.create_table('pairs',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('audit_id', sa.String(length=36), nullable=False),
    sa.Column('pair_id', sa.Text(), nullable=False),
    sa.Column('row', sa.Integer(), nullable=True),
    sa.Column('slot', sa.BigInteger(), nullable=True),
    sa.Column('image', sa.Text(), nullable=True),
    sa.Column('caption', sa.Text(), nullable=True),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.ForeignKeyConstraint(['audit_id'], ['audits.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('pairs', schema=None) as batch_op:
        batch_op.create_index('ix_pairs_audit_slot', ['audit_id', 'slot'], unique=False)

    op.create_table('scores',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('audit_id', sa.String(length=36), nullable=False),
    sa.Column('slot', sa.BigInteger(), nullable=False),
    sa.Column('shard', sa.Integer(), nullable=False),
    sa.Column('pair_id', sa.Text(), nullable=False),
    sa.Column('influence', sa.Float(precision=53), nullable=True),
    sa.Column('influence_pos', sa.Float(precision=53), nullable=True),
    sa.Column('influence_neg', sa.Float(precision=53), nullable=True),
    sa.Column('self_influence', sa.Float(precision=53), nullable=False),
    sa.Column('leave_own_out', sa.Float(precision=53), nullable=False),
    sa.Column('clip_score', sa.Float(precision=53), nullable=False),
    sa.Column('rank', sa.Integer(), nullable=True),
    sa.Column('suspected', sa.Boolean(), nullable=True),
    sa.ForeignKeyConstraint(['audit_id'], ['audits.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('audit_id', 'slot')
    )
    with op.batch_alter_table('scores', schema=None) as batch_op:
        batch_op.create_index('ix_scores_audit_rank', ['audit_id', 'rank'], unique=False)

    op.create_table('shards',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('audit_id', sa.String(length=36), nullable=False),
    sa.Column('stage', sa.String(length=16), nullable=False),
    sa.Column('shard', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('worker', sa.String(length=200), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('seconds', sa.Float(), nullable=True),
    sa.ForeignKeyConstraint(['audit_id'], ['audits.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('audit_id', 'stage', 'shard')
    )
    with op.batch_alter_table('shards', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_shards_audit_id'), ['audit_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('shards', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_shards_audit_id'))

    op.drop_table('shards')
    with op.batch_alter_table('scores', schema=None) as batch_op:
        batch_op.drop_index('ix_scores_audit_rank')

    op.drop_table('scores')
    with op.batch_alter_table('pairs', schema=None) as batch_op:
        batch_op.drop_index('ix_pairs_audit_slot')

    op.drop_table('pairs')
    with op.batch_alter_table('audits', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_audits_status'))
        batch_op.drop_index(batch_op.f('ix_audits_owner'))
        batch_op.drop_index(batch_op.f('ix_audits_created_at'))

    op.drop_table('audits')
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_api_keys_owner'))

    op.drop_table('api_keys')
