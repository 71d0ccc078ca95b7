from __future__ import annotations

from django import forms


class PolicyForm(forms.Form):
    document = forms.CharField(widget=forms.Textarea(attrs={"rows": 24, "class": "mono", "spellcheck": "false"}),
                               help_text="The whole policy as JSON; it is validated rule by rule before it is saved.")
    comment = forms.CharField(required=False, max_length=500, help_text="Why this change (kept with the version)")
