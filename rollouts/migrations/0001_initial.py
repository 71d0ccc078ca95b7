import django.db.models.deletion
import uuid
from django.conf import settings
from django.db import migrations, models


class Migration(migrations.Migration):
    """The rollout models arrive from the orchestrator app with their tables unchanged."""

    initial = True

    dependencies = [
        ('models_registry', '0001_initial'),
        ('orchestrator', '0004_rollouts_move'),
        ('sites', '0001_initial'),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[],
            state_operations=[
                migrations.CreateModel(
                    name='Rollout',
                    fields=[
                        ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                        ('uuid', models.UUIDField(default=uuid.uuid4, editable=False, unique=True)),
                        ('target', models.JSONField(default=dict)),
                        ('strategy', models.JSONField(default=dict)),
                        ('plan', models.JSONField(default=dict)),
                        ('plan_hash', models.CharField(max_length=64)),
                        ('approvals_required', models.PositiveSmallIntegerField(default=0)),
                        ('approval_role', models.CharField(blank=True, max_length=20)),
                        ('approval_rules', models.JSONField(blank=True, default=list)),
                        ('placement_policy_version', models.PositiveIntegerField(default=0)),
                        ('rollout_policy_version', models.PositiveIntegerField(default=0)),
                        ('state', models.CharField(choices=[('pending_approval', 'Pending approval'), ('ready', 'Ready'), ('progressing', 'Progressing'), ('paused', 'Paused'), ('rolling_back', 'Rolling back'), ('succeeded', 'Succeeded'), ('failed', 'Failed'), ('aborted', 'Aborted'), ('rejected', 'Rejected')], db_index=True, default='pending_approval', max_length=20)),
                        ('current_wave', models.PositiveIntegerField(default=0)),
                        ('wave_phase', models.CharField(choices=[('starting', 'Starting'), ('updating', 'Updating'), ('baking', 'Baking')], default='starting', max_length=10)),
                        ('wave_started_at', models.DateTimeField(blank=True, null=True)),
                        ('bake_started_at', models.DateTimeField(blank=True, null=True)),
                        ('pause_kind', models.CharField(blank=True, choices=[('', '—'), ('operator', 'Operator'), ('gate', 'Inconclusive gate'), ('node_offline', 'Node offline'), ('fleet_offline', 'Target offline')], default='', max_length=20)),
                        ('end_state', models.CharField(blank=True, choices=[('pending_approval', 'Pending approval'), ('ready', 'Ready'), ('progressing', 'Progressing'), ('paused', 'Paused'), ('rolling_back', 'Rolling back'), ('succeeded', 'Succeeded'), ('failed', 'Failed'), ('aborted', 'Aborted'), ('rejected', 'Rejected')], max_length=20)),
                        ('reason', models.TextField(blank=True)),
                        ('last_gate', models.JSONField(blank=True, null=True)),
                        ('tick', models.UUIDField(blank=True, null=True)),
                        ('next_tick_at', models.DateTimeField(blank=True, db_index=True, null=True)),
                        ('created_at', models.DateTimeField(auto_now_add=True)),
                        ('started_at', models.DateTimeField(blank=True, null=True)),
                        ('finished_at', models.DateTimeField(blank=True, null=True)),
                        ('requested_by', models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL, related_name='+', to=settings.AUTH_USER_MODEL)),
                        ('sites', models.ManyToManyField(blank=True, related_name='+', to='sites.site')),
                        ('version', models.ForeignKey(on_delete=django.db.models.deletion.PROTECT, related_name='rollouts', to='models_registry.modelversion')),
                    ],
                    options={
                        'db_table': 'orchestrator_rollout',
                        'ordering': ['-created_at'],
                    },
                ),
                migrations.CreateModel(
                    name='RolloutEvent',
                    fields=[
                        ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                        ('kind', models.CharField(max_length=40)),
                        ('from_state', models.CharField(blank=True, max_length=20)),
                        ('to_state', models.CharField(blank=True, max_length=20)),
                        ('wave', models.IntegerField(blank=True, null=True)),
                        ('message', models.TextField(blank=True)),
                        ('data', models.JSONField(blank=True, null=True)),
                        ('actor', models.CharField(blank=True, max_length=160)),
                        ('at', models.DateTimeField(auto_now_add=True, db_index=True)),
                        ('node', models.ForeignKey(blank=True, null=True, on_delete=django.db.models.deletion.SET_NULL, related_name='+', to='sites.node')),
                        ('rollout', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='events', to='rollouts.rollout')),
                    ],
                    options={
                        'db_table': 'orchestrator_rolloutevent',
                        'ordering': ['at', 'pk'],
                    },
                ),
                migrations.CreateModel(
                    name='HealthSample',
                    fields=[
                        ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                        ('model', models.CharField(max_length=100)),
                        ('version', models.CharField(max_length=50)),
                        ('at', models.DateTimeField()),
                        ('requests', models.BigIntegerField()),
                        ('errors', models.BigIntegerField()),
                        ('latency_bounds', models.JSONField(default=list)),
                        ('latency_counts', models.JSONField(default=list)),
                        ('node', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='+', to='sites.node')),
                    ],
                    options={
                        'db_table': 'orchestrator_healthsample',
                        'ordering': ['at', 'pk'],
                        'indexes': [models.Index(fields=['node', 'model', 'version', 'at'], name='orchestrato_node_id_067ea2_idx')],
                    },
                ),
                migrations.CreateModel(
                    name='RolloutNode',
                    fields=[
                        ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                        ('wave', models.PositiveIntegerField()),
                        ('position', models.PositiveIntegerField(default=0)),
                        ('state', models.CharField(choices=[('pending', 'Pending'), ('updating', 'Updating'), ('updated', 'Updated'), ('failed', 'Failed'), ('skipped', 'Skipped'), ('rolling_back', 'Rolling back'), ('rolled_back', 'Rolled back')], default='pending', max_length=20)),
                        ('previous_version', models.CharField(blank=True, max_length=50)),
                        ('assigned_at', models.DateTimeField(blank=True, null=True)),
                        ('generation', models.PositiveIntegerField(default=0)),
                        ('updated_at', models.DateTimeField(auto_now=True)),
                        ('detail', models.TextField(blank=True)),
                        ('node', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='rollout_nodes', to='sites.node')),
                        ('rollout', models.ForeignKey(on_delete=django.db.models.deletion.CASCADE, related_name='nodes', to='rollouts.rollout')),
                    ],
                    options={
                        'db_table': 'orchestrator_rolloutnode',
                        'ordering': ['wave', 'position'],
                        'indexes': [models.Index(fields=['node', 'state'], name='orchestrato_node_id_91d171_idx')],
                        'constraints': [models.UniqueConstraint(fields=('rollout', 'node'), name='rollout_node_once')],
                    },
                ),
            ],
        ),
    ]
