from __future__ import annotations

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render

from policies.permissions import restrict
from sites.models import Site


@login_required
def fleet(request: HttpRequest) -> HttpResponse:
    sites = restrict(Site.objects.select_related("region"), request.user)
    return render(request, "sites/fleet.html", {"sites": sites})
