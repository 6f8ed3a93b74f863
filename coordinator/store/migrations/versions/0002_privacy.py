"""privacy: epsilon per enterprise per round, the run's privacy plan, updates the coordinator saw

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("privacy_plan", sa.JSON(), nullable=True))
    with op.batch_alter_table("rounds") as batch:
        batch.add_column(sa.Column("updates_seen", sa.Integer(), nullable=True))
    with op.batch_alter_table("participations") as batch:
        batch.add_column(sa.Column("epsilon_record", sa.Float(), nullable=True))
        batch.add_column(sa.Column("epsilon_enterprise", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("participations") as batch:
        batch.drop_column("epsilon_enterprise")
        batch.drop_column("epsilon_record")
    with op.batch_alter_table("rounds") as batch:
        batch.drop_column("updates_seen")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("privacy_plan")
