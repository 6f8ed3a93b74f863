"""deployment: run identity and attempts, the node registry

Revision ID: 0003
Revises: 0002
"""

import uuid

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("uid", sa.String(32), nullable=True))
        batch.add_column(
            sa.Column("engine", sa.String(16), nullable=False, server_default="simulation")
        )
        batch.add_column(sa.Column("enterprises", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("started_by", sa.String(64), nullable=True))
        batch.add_column(sa.Column("flower_run_id", sa.String(24), nullable=True))
        batch.add_column(sa.Column("resumes", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(
            sa.Column("stop_requested", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    connection = op.get_bind()
    for (run_id,) in connection.execute(sa.text("SELECT id FROM runs")).fetchall():
        connection.execute(
            sa.text("UPDATE runs SET uid = :uid WHERE id = :id"),
            {"uid": uuid.uuid4().hex, "id": run_id},
        )
    with op.batch_alter_table("runs") as batch:
        batch.alter_column("uid", existing_type=sa.String(32), nullable=False)
        batch.create_unique_constraint("uq_runs_uid", ["uid"])
    op.create_table(
        "nodes",
        sa.Column("id", sa.Integer(), primary_key=True),
        sa.Column("enterprise", sa.String(64), nullable=False),
        sa.Column("public_key", sa.Text(), nullable=False),
        sa.Column("fingerprint", sa.String(80), nullable=False),
        sa.Column("flower_node_id", sa.String(24), nullable=False),
        sa.Column("registered_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("registered_by", sa.String(64), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_by", sa.String(64), nullable=True),
        sa.UniqueConstraint("fingerprint", name="uq_nodes_fingerprint"),
    )
    op.create_index(
        "ux_nodes_active_enterprise",
        "nodes",
        ["enterprise"],
        unique=True,
        sqlite_where=sa.text("revoked_at IS NULL"),
        postgresql_where=sa.text("revoked_at IS NULL"),
    )


def downgrade() -> None:
    op.drop_index("ux_nodes_active_enterprise", table_name="nodes")
    op.drop_table("nodes")
    with op.batch_alter_table("runs") as batch:
        batch.drop_constraint("uq_runs_uid", type_="unique")
        for column in (
            "stop_requested",
            "resumes",
            "flower_run_id",
            "started_by",
            "enterprises",
            "engine",
            "uid",
        ):
            batch.drop_column(column)
