"""The usage page's period and grouping, from its query string; the dashboard's Pin and Unpin buttons."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta

from django import forms

from portal.usage.selectors import MAX_WINDOW

PERIODS = {"24h": timedelta(hours=24), "7d": timedelta(days=7), "30d": timedelta(days=30)}
MAX_CUSTOM_DAYS = MAX_WINDOW.days  # both days included


class UsagePeriodForm(forms.Form):
    period = forms.ChoiceField(
        choices=[("24h", "Last 24 hours"), ("7d", "Last 7 days"), ("30d", "Last 30 days"), ("custom", "From – to")],
        required=False,
    )
    since = forms.DateField(required=False, label="From", widget=forms.DateInput(attrs={"type": "date"}))
    until = forms.DateField(required=False, label="To", widget=forms.DateInput(attrs={"type": "date"}))
    group = forms.ChoiceField(choices=[("adapter", "Adapter"), ("key", "API key")], required=False)

    def clean(self) -> dict:
        data = super().clean()
        data["period"] = data.get("period") or "24h"
        data["group"] = data.get("group") or "adapter"
        if data["period"] == "custom":
            since, until = data.get("since"), data.get("until")
            if since is None or until is None:
                raise forms.ValidationError("choose both dates of the period (UTC days, both included)")
            if since > until:
                raise forms.ValidationError("the period's first day comes after its last")
            if (until - since).days >= MAX_CUSTOM_DAYS:
                raise forms.ValidationError(
                    f"choose at most {MAX_CUSTOM_DAYS} days; see a longer period one part at a time"
                )
        return data

    def period_range(self, now: datetime) -> tuple[datetime, datetime]:
        """[since, until) in UTC; a preset ends at the next whole hour (or day), so buckets fall on the clock."""
        data = self.cleaned_data
        if data["period"] == "custom":
            since = datetime.combine(data["since"], time(), tzinfo=UTC)
            return since, datetime.combine(data["until"], time(), tzinfo=UTC) + timedelta(days=1)
        length = PERIODS[data["period"]]
        step = timedelta(hours=1) if length <= timedelta(days=2) else timedelta(days=1)
        now = now.astimezone(UTC)
        floor = now.replace(minute=0, second=0, microsecond=0)
        if step == timedelta(days=1):
            floor = floor.replace(hour=0)
        until = floor + step
        return until - length, until


class AdapterPinForm(forms.Form):
    """What a Pin (``pinned=1``) or Unpin (``pinned=0``) button on the residency table sends."""

    pinned = forms.TypedChoiceField(choices=[("1", "pin"), ("0", "unpin")], coerce=lambda value: value == "1")
