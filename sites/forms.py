"""Console forms: they validate what a person typed and nothing else.

What a valid form leads to is decided by a service (``sites.services``); the
forms only turn text into typed values and name the field that is wrong.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from django import forms

from sites.selectors import SITE_STATUSES, region_list

MAX_TOKEN_HOURS = 720  # 30 days, services.MAX_TOKEN_LIFETIME


class FleetFilterForm(forms.Form):
    region = forms.ChoiceField(required=False)
    status = forms.ChoiceField(required=False, choices=[("", "Any status"), *SITE_STATUSES])
    q = forms.CharField(required=False, max_length=100, label="Search")

    def __init__(self, *args: Any, user: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Only the regions this person may see: any other slug is "not a valid
        # choice", the same answer as for a region that does not exist.
        regions = [(r.slug, r.name) for r in region_list(user=user)]
        region = self.fields["region"]
        assert isinstance(region, forms.ChoiceField)
        region.choices = [("", "All regions"), *regions]


class TokenCreateForm(forms.Form):
    max_uses = forms.IntegerField(
        label="Max uses", min_value=1, max_value=10_000, initial=1,
        help_text="How many nodes may enroll with this token (1–10000).",
    )
    lifetime_hours = forms.IntegerField(
        label="Lifetime (hours)", min_value=1, max_value=MAX_TOKEN_HOURS, initial=24,
        help_text=f"The token expires after this many hours (1–{MAX_TOKEN_HOURS}).",
    )
    note = forms.CharField(label="Note", required=False, max_length=200)

    def lifetime(self) -> dt.timedelta:
        return dt.timedelta(hours=self.cleaned_data["lifetime_hours"])


class InstallerForm(forms.Form):
    token = forms.CharField(max_length=200)
