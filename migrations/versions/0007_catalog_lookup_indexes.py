"""indexes for the lookups on a VM's start path: a snapshot by its job and by its VM id, a
layer device by its job

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04 20:00:00

At the thousandth VM every one of these was a scan of the snapshots table
(snapshot_of_job, snapshots_of_vm, unfinished_devices_of_job).
"""
from __future__ import annotations

from alembic import op


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index('ix_snapshots_job_id', 'snapshots', ['job_id'])
    op.create_index('ix_snapshots_vm_id', 'snapshots', ['vm_id'])
    op.create_index('ix_unpacked_images_job_id', 'unpacked_images', ['job_id'])


def downgrade() -> None:
    op.drop_index('ix_unpacked_images_job_id', table_name='unpacked_images')
    op.drop_index('ix_snapshots_vm_id', table_name='snapshots')
    op.drop_index('ix_snapshots_job_id', table_name='snapshots')
