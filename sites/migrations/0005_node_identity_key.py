from django.db import migrations, models


class Migration(migrations.Migration):
    """Each node's identity key (the Ed25519 key that signs its audit log), one key to one node."""

    dependencies = [
        ('sites', '0004_desired_state_moves'),
    ]

    operations = [
        migrations.AddField(
            model_name='node',
            name='identity_key',
            field=models.CharField(blank=True, editable=False, max_length=44),
        ),
        migrations.AddField(
            model_name='node',
            name='identity_key_at',
            field=models.DateTimeField(blank=True, editable=False, null=True),
        ),
        migrations.AddField(
            model_name='node',
            name='identity_key_pending',
            field=models.CharField(blank=True, editable=False, max_length=44),
        ),
        migrations.AddConstraint(
            model_name='node',
            constraint=models.UniqueConstraint(condition=models.Q(('identity_key', ''), _negated=True), fields=('identity_key',), name='node_identity_key_unique'),
        ),
    ]
