"""The model ledger: which embedding model's vectors each vector column holds (embeddings/ledger.py)."""
from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('embeddings', '0002_bookkeeping_moved_to_segments'),
    ]

    operations = [
        migrations.CreateModel(
            name='VectorColumn',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('table_schema', models.CharField(max_length=63)),
                ('table_name', models.CharField(max_length=63)),
                ('column_name', models.CharField(max_length=63)),
                ('model_name', models.CharField(help_text='as configured: a Hugging Face id or a directory', max_length=500)),
                ('description', models.CharField(blank=True, default='', help_text='what the model is', max_length=500)),
                ('fingerprint', models.JSONField(blank=True, help_text="the model's vectors of a few fixed texts; empty when declared", null=True)),
                ('dimensions', models.PositiveIntegerField()),
                ('storage', models.CharField(help_text="the column's type: vector or halfvec", max_length=20)),
                ('normalized', models.BooleanField(help_text='unit-length vectors; unknown when declared', null=True)),
                ('query_instruction', models.TextField(blank=True, help_text='prefix of questions; unknown when declared', null=True)),
                ('source', models.CharField(help_text='first write, declared, adopted or simulated', max_length=40)),
                ('recorded_at', models.DateTimeField(auto_now_add=True)),
                ('retired_at', models.DateTimeField(blank=True, null=True)),
            ],
            options={
                'db_table': 'embeddings_vector_column',
                'constraints': [models.UniqueConstraint(condition=models.Q(('retired_at__isnull', True)), fields=('table_schema', 'table_name', 'column_name'), name='embeddings_vector_column_active')],
            },
        ),
    ]
