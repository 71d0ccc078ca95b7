"""The audit trail becomes a Merkle log: pending queue, positions, signed checkpoints; the chain head goes.

Also: the sequence that numbers events on PostgreSQL (no lock between
appends), triggers that keep positions and checkpoints append-only, and the
old chain's events sequenced into the log in ``seq`` order as its first
positions (their leaves and subtree hashes; the first checkpoint is signed
by the checkpointer, which holds the key).
"""

import django.db.models.deletion
from django.db import migrations, models

from audit.models import LEAF_FIELDS, leaf_data
from edge_runtime import merkle

CONTROL_PLANE_LOG = "control-plane"
BATCH = 5000

PG_FORWARD = """
CREATE SEQUENCE audit_event_seq OWNED BY audit_auditevent.seq;
SELECT setval('audit_event_seq', COALESCE((SELECT max(seq) FROM audit_auditevent), 0) + 1, false);
CREATE OR REPLACE FUNCTION audit_append_only() RETURNS trigger AS $$
BEGIN
    RAISE EXCEPTION 'audit records are append-only (%% refused on %%)', TG_OP, TG_TABLE_NAME;
END;
$$ LANGUAGE plpgsql;
CREATE TRIGGER audit_logleaf_append_only BEFORE UPDATE OR DELETE ON audit_auditlogleaf
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();
CREATE TRIGGER audit_checkpoint_append_only BEFORE UPDATE OR DELETE ON audit_auditcheckpoint
    FOR EACH ROW EXECUTE FUNCTION audit_append_only();
"""
PG_BACKWARD = """
DROP TRIGGER IF EXISTS audit_logleaf_append_only ON audit_auditlogleaf;
DROP TRIGGER IF EXISTS audit_checkpoint_append_only ON audit_auditcheckpoint;
DROP FUNCTION IF EXISTS audit_append_only();
DROP SEQUENCE IF EXISTS audit_event_seq;
"""
SQLITE_TABLES = ("audit_auditlogleaf", "audit_auditcheckpoint")


def _sqlite_forward(table):  # type: ignore[no-untyped-def]
    return [f"""CREATE TRIGGER {table}_no_{op.lower()} BEFORE {op} ON {table}
                BEGIN SELECT RAISE(ABORT, 'audit records are append-only ({op} refused on {table})'); END;"""
            for op in ("UPDATE", "DELETE")]


def database_forward(apps, schema_editor):  # type: ignore[no-untyped-def]
    vendor = schema_editor.connection.vendor
    if vendor == "postgresql":
        schema_editor.execute(PG_FORWARD)
    elif vendor == "sqlite":
        for table in SQLITE_TABLES:
            for statement in _sqlite_forward(table):
                schema_editor.execute(statement)


def database_backward(apps, schema_editor):  # type: ignore[no-untyped-def]
    vendor = schema_editor.connection.vendor
    if vendor == "postgresql":
        schema_editor.execute(PG_BACKWARD)
    elif vendor == "sqlite":
        for table in SQLITE_TABLES:
            for op in ("update", "delete"):
                schema_editor.execute(f"DROP TRIGGER IF EXISTS {table}_no_{op};")


def sequence_old_chain(apps, schema_editor):  # type: ignore[no-untyped-def]
    """Give every existing event, in seq order, the next position of the log."""
    event_model = apps.get_model("audit", "AuditEvent")
    leaf_model = apps.get_model("audit", "AuditLogLeaf")
    node_model = apps.get_model("audit", "TreeNode")
    frontier, last = merkle.Frontier(), None
    while True:
        rows = event_model.objects.order_by("seq").values_list("id", *LEAF_FIELDS)
        batch = list((rows.filter(seq__gt=last) if last is not None else rows)[:BATCH])
        if not batch:
            return
        leaves, nodes = [], []
        for event_id, *values in batch:
            leaf = merkle.leaf_hash(leaf_data(tuple(values)))
            leaves.append(leaf_model(position=frontier.size, event_id=event_id, leaf=leaf))
            nodes.extend(node_model(log=CONTROL_PLANE_LOG, level=level, index=index, hash=digest)
                         for (level, index), digest in frontier.append(leaf))
        leaf_model.objects.bulk_create(leaves, batch_size=2000)
        node_model.objects.bulk_create(nodes, batch_size=2000)
        last = batch[-1][1]


def unsequence(apps, schema_editor):  # type: ignore[no-untyped-def]
    apps.get_model("audit", "TreeNode").objects.filter(log=CONTROL_PLANE_LOG).delete()


class Migration(migrations.Migration):

    dependencies = [
        ('audit', '0003_node_logs'),
    ]

    operations = [
        migrations.CreateModel(
            name='AuditCheckpoint',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('size', models.BigIntegerField(unique=True)),
                ('root', models.CharField(max_length=64)),
                ('note', models.TextField()),
                ('created_at', models.DateTimeField()),
            ],
            options={
                'ordering': ['-size'],
            },
        ),
        migrations.CreateModel(
            name='AuditLogLeaf',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('position', models.BigIntegerField(unique=True)),
                ('leaf', models.BinaryField(max_length=32)),
            ],
        ),
        migrations.CreateModel(
            name='AuditPending',
            fields=[
                ('event', models.OneToOneField(on_delete=django.db.models.deletion.PROTECT, primary_key=True, related_name='pending', serialize=False, to='audit.auditevent')),
            ],
        ),
        migrations.DeleteModel(
            name='AuditChainHead',
        ),
        migrations.AlterField(
            model_name='auditevent',
            name='prev_hash',
            field=models.CharField(blank=True, editable=False, max_length=64),
        ),
        migrations.AddField(
            model_name='auditlogleaf',
            name='event',
            field=models.OneToOneField(on_delete=django.db.models.deletion.PROTECT, related_name='log_leaf', to='audit.auditevent'),
        ),
        migrations.RunPython(database_forward, database_backward),
        migrations.RunPython(sequence_old_chain, unsequence),
    ]
