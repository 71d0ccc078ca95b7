from django.db import migrations


class Migration(migrations.Migration):
    """DesiredState moves to the orchestrator app (orchestrator.desired_state); its table stays as it is."""

    dependencies = [
        ('sites', '0003_trust_epochs'),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[migrations.DeleteModel(name='DesiredState')],
            database_operations=[],
        ),
    ]
