"""images: when each was last used (eviction's "least recently used") and whether it is pinned

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 01:20:00

Plain ALTER TABLE (recreate='never'): a batch recreate of `images` would drop the table,
and with foreign keys on, ON DELETE CASCADE would empty image_layers with it. Existing
images count as last used when last updated.
"""
from __future__ import annotations

from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('images', schema=None, recreate='never') as batch_op:
        batch_op.add_column(sa.Column('last_used_at', sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column('pinned', sa.Boolean(), server_default=sa.false(), nullable=False))
    op.execute("UPDATE images SET last_used_at = updated_at")


def downgrade() -> None:
    with op.batch_alter_table('images', schema=None, recreate='never') as batch_op:
        batch_op.drop_column('pinned')
        batch_op.drop_column('last_used_at')
