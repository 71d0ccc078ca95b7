from django.db import migrations


class Migration(migrations.Migration):
    """The rollout models move to the rollouts app; their tables stay as they are."""

    dependencies = [
        ('orchestrator', '0003_desired_state'),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[],
            state_operations=[
                migrations.DeleteModel(name='RolloutEvent'),
                migrations.DeleteModel(name='RolloutNode'),
                migrations.DeleteModel(name='HealthSample'),
                migrations.DeleteModel(name='Rollout'),
            ],
        ),
    ]
