"""a fleet's nodes, each node's copies of blobs, the node that runs a job

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03 18:00:00.000000
"""

from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('nodes',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('name', sa.String(length=128), nullable=False),
    sa.Column('address', sa.String(length=1024), nullable=True),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('hardware', sa.JSON(), nullable=False),
    sa.Column('loaded', sa.JSON(), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_nodes')),
    sa.UniqueConstraint('name', name=op.f('uq_nodes_name'))
    )
    op.create_table('blob_copies',
    sa.Column('blob_id', sa.Integer(), nullable=False),
    sa.Column('node_id', sa.Integer(), nullable=False),
    sa.Column('path', sa.String(length=4096), nullable=False),
    sa.Column('in_store', sa.Boolean(), nullable=False),
    sa.Column('mtime_ns', sa.BigInteger(), nullable=True),
    sa.ForeignKeyConstraint(['blob_id'], ['blobs.id'], name=op.f('fk_blob_copies_blob_id_blobs'), ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['node_id'], ['nodes.id'], name=op.f('fk_blob_copies_node_id_nodes'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('blob_id', 'node_id', name=op.f('pk_blob_copies'))
    )
    with op.batch_alter_table('blob_copies', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_blob_copies_node_id'), ['node_id'], unique=False)
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('node_id', sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f('ix_jobs_node_id'), ['node_id'], unique=False)
        batch_op.create_foreign_key(batch_op.f('fk_jobs_node_id_nodes'), 'nodes', ['node_id'], ['id'], ondelete='SET NULL')


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_jobs_node_id_nodes'), type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_jobs_node_id'))
        batch_op.drop_column('node_id')
    with op.batch_alter_table('blob_copies', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_blob_copies_node_id'))
    op.drop_table('blob_copies')
    op.drop_table('nodes')
