"""The demo: regions, sites, trained models, plant data and ``manage.py demo``, which runs them as real processes.

Set-up goes through the same services an operator's actions use, and every
step is safe to run again.
"""
