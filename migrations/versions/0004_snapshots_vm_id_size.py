"""snapshots: the VM each snapshot belongs to, and its own size

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 01:10:00

A snapshot's size is its row's (it may be larger than its origin's: the VM asked for
more room). Rows made before this revision took their origin's size, which is filled in.
"""
from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('snapshots', schema=None) as batch_op:
        batch_op.add_column(sa.Column('vm_id', sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column('size_bytes', sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column('updated_at', sa.DateTime(), nullable=True))
        batch_op.create_unique_constraint('uq_snapshots_image_id_vm_id', ['image_id', 'vm_id'])
    op.execute("UPDATE snapshots SET size_bytes = (SELECT u.size_bytes FROM unpacked_images u "
               "WHERE u.device_id = snapshots.origin_device_id), updated_at = created_at")


def downgrade() -> None:
    with op.batch_alter_table('snapshots', schema=None) as batch_op:
        batch_op.drop_constraint('uq_snapshots_image_id_vm_id', type_='unique')
        batch_op.drop_column('updated_at')
        batch_op.drop_column('size_bytes')
        batch_op.drop_column('vm_id')
