"""Who may do what to which object: the one permission read every query goes through.

Every model declares its **scope**, how it hangs off the sites that grants
are made on (:class:`Scope`), and uses :class:`RestrictedQuerySet`, so
``Model.objects.restrict(user, "view")`` narrows any queryset to what
``user`` may ``action``, and no view filters by hand. A model that declares
no scope is an error, never an unfiltered queryset. A user who may not see an
object gets nothing, so views answer 404 rather than hint that it exists.

Grants themselves (roles, per region or per site) are written in
``policies.permissions``; this module only reads them. Regions and sites are
the ``sites`` app's models, named here by label (:data:`SITE_MODEL`,
:data:`REGION_MODEL`) so that this bottom layer imports no app.

Actions: ``view``, ``operate``, ``approve``, ``administer``; ``query`` (run
federated queries against a site) comes with ``operate`` (:data:`IMPLIED_BY`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal, TypeVar

from django.apps import apps
from django.db import models
from guardian.shortcuts import get_objects_for_user

Action = Literal["view", "operate", "approve", "administer", "query"]
ACTIONS: tuple[Action, ...] = ("view", "operate", "approve", "administer")
# Actions granted with another one rather than by a permission of their own.
IMPLIED_BY: dict[Action, Action] = {"query": "operate"}

SITE_MODEL = "sites.Site"
REGION_MODEL = "sites.Region"

M = TypeVar("M", bound=models.Model)


@dataclasses.dataclass(frozen=True)
class Scope:
    """How a model's objects relate to the sites grants are made on.

    * ``Scope.site(*paths)``: an object belongs to the sites its lookups reach
      (``""``: the object is a site); several paths are alternatives; ``key``
      is the site's field the path ends on (``pk`` unless the object keeps a
      site's ``uuid``); ``bypass``, a permission whose holders see every object.
    * ``Scope.estate()``: estate-wide objects (the model registry, policies):
      seen by whoever may view some site; any other action needs the action
      estate-wide.
    * ``Scope.owned(field)``: an object belongs to the user in ``field``;
      estate-wide administrators see every one.
    """

    kind: Literal["site", "estate", "owned"]
    paths: tuple[str, ...] = ()
    key: str = "pk"
    bypass: str = ""

    @classmethod
    def site(cls, *paths: str, key: str = "pk", bypass: str = "") -> Scope:
        return cls("site", paths or ("",), key, bypass)

    @classmethod
    def estate(cls) -> Scope:
        return cls("estate")

    @classmethod
    def owned(cls, field: str) -> Scope:
        return cls("owned", (field,))


def codename(action: Action, model_name: str) -> str:
    return f"{action}_{model_name}"


def site_ids_for(user: Any, action: Action) -> models.QuerySet[Any] | None:
    """Primary keys of the sites ``user`` may ``action``; None means every site."""
    action = IMPLIED_BY.get(action, action)
    site_model = apps.get_model(SITE_MODEL)
    if not user.is_authenticated or not user.is_active:
        return site_model.objects.none().values("pk")
    if user.is_superuser or user.has_perm(f"sites.{codename(action, 'site')}"):
        return None
    direct = get_objects_for_user(
        user, f"sites.{codename(action, 'site')}", klass=site_model, accept_global_perms=False
    ).values("pk")
    regions = get_objects_for_user(
        user, f"sites.{codename(action, 'region')}", klass=apps.get_model(REGION_MODEL), accept_global_perms=False
    ).values("pk")
    return site_model.objects.filter(models.Q(pk__in=direct) | models.Q(region__in=regions)).values("pk")


def may_anywhere(user: Any, action: Action) -> bool:
    """Whether ``user`` may ``action`` at one site at least."""
    ids = site_ids_for(user, action)
    return ids is None or ids.exists()


def may_everywhere(user: Any, action: Action) -> bool:
    """Whether ``user`` holds ``action`` estate-wide."""
    return bool(user.is_authenticated and user.is_active and site_ids_for(user, action) is None)


def user_can(user: Any, action: Action, site: models.Model) -> bool:
    """Whether ``user`` may ``action`` at ``site``."""
    ids = site_ids_for(user, action)
    if ids is None:
        return True
    return apps.get_model(SITE_MODEL).objects.filter(pk=site.pk, pk__in=ids).exists()


class RestrictedQuerySet(models.QuerySet[M]):
    """A queryset that can narrow itself to what a user may do, by its model's declared :class:`Scope`."""

    def restrict(self, user: Any, action: Action = "view") -> RestrictedQuerySet[M]:
        scope: Scope | None = getattr(self.model, "scope", None)
        if not isinstance(scope, Scope):
            raise TypeError(f"{self.model._meta.label} declares no scope: restrict() cannot narrow it")
        if scope.kind == "estate":
            return self._estate(user, action)
        if scope.kind == "owned":
            if may_everywhere(user, "administer"):
                return self
            if not user.is_authenticated or not user.is_active:
                return self.none()
            return self.filter(**{scope.paths[0]: user})
        return self._by_site(scope, user, action)

    def _estate(self, user: Any, action: Action) -> RestrictedQuerySet[M]:
        if not user.is_authenticated or not user.is_active:
            return self.none()
        if action == "view":
            return self if user.is_staff or may_anywhere(user, "view") else self.none()
        return self if may_everywhere(user, action) else self.none()

    def _by_site(self, scope: Scope, user: Any, action: Action) -> RestrictedQuerySet[M]:
        if scope.bypass and user.is_authenticated and (user.is_superuser or user.has_perm(scope.bypass)):
            return self
        ids = site_ids_for(user, action)
        if ids is None:
            return self
        values = ids if scope.key == "pk" else apps.get_model(SITE_MODEL).objects.filter(pk__in=ids).values(scope.key)
        condition = models.Q()
        for path in scope.paths:
            condition |= models.Q(**{f"{path}__in" if path else "pk__in": values})
        narrowed = self.filter(condition)
        # A path through a many-valued relation (a region's sites) would repeat objects.
        return narrowed.distinct() if any(_many_valued(self.model, p) for p in scope.paths) else narrowed


@functools.cache
def _many_valued(model: type[models.Model], path: str) -> bool:
    """Whether ``path`` crosses a many-valued relation (worked out once per model and path)."""
    for name in path.split("__") if path else ():
        field = model._meta.get_field(name)
        if field.many_to_many or field.one_to_many:
            return True
        model = field.related_model  # type: ignore[assignment]
    return False
