import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    """DesiredState arrives from the sites app with its table, sites_desiredstate, unchanged."""

    dependencies = [
        ('orchestrator', '0002_trust_epochs'),
        ('sites', '0004_desired_state_moves'),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.CreateModel(
                    name='DesiredState',
                    fields=[
                        ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False,
                                                   verbose_name='ID')),
                        ('generation', models.PositiveIntegerField(default=0)),
                        ('content_hash', models.CharField(max_length=64)),
                        ('payload', models.TextField()),
                        ('signature', models.CharField(max_length=200)),
                        ('key_fingerprint', models.CharField(max_length=64)),
                        ('epoch', models.CharField(blank=True, default='', max_length=64)),
                        ('published_at', models.DateTimeField()),
                        ('node', models.OneToOneField(on_delete=django.db.models.deletion.CASCADE,
                                                      related_name='desired', to='sites.node')),
                    ],
                    options={'db_table': 'sites_desiredstate'},
                ),
            ],
            database_operations=[],
        ),
    ]
