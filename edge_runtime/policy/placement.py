"""Placement policy: which model may run at which site and on which node.

The same evaluator answers the control plane (planning a rollout or a
deployment) and every node (enforcing its site's policy on what it is told to
serve), so the two can never disagree about a rule.

A decision takes three sets of facts:

* :class:`SiteFacts`: the site's slug, region, clearance (0 Public, 1
  Internal, 2 Confidential, 3 Secret), jurisdiction and labels;
* :class:`NodeFacts`: the node's role, memory and execution providers as it
  reported them;
* :class:`ModelFacts`: the model's data classification and the version's
  hardware requirements.

Checks run in this order and the first that refuses names itself in the
:class:`Decision` (``rule``) with a sentence an operator can act on:

1. ``clearance`` (built in, cannot be switched off): the classification may
   not exceed the site's clearance;
2. the policy's rules, in document order (see :class:`PlacementRule`):
   ``deny`` forbids the listed classifications at the sites it selects,
   ``only`` allows them at the sites it selects and nowhere else;
3. ``memory``, ``role`` and ``provider``: the version's requirements against
   what the node reported.

A node only knows its own site and hardware, so it enforces 1 and 2 with
:func:`site_decision`; the control plane plans with :func:`place`.

Documents are pydantic models that refuse unknown fields. :func:`parse_document`
turns a validation error into one sentence that names the rule by its
position and name (``rules[1] "no-secret-abroad": classifications.0: ...``),
so a bad rule is refused with an error naming it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Any, Literal, Protocol, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from edge_runtime.names import first_repeat
from edge_runtime.protocol.providers import NON_COMPUTE_PROVIDERS

CLEARANCE_LABELS: dict[int, str] = {0: "Public", 1: "Internal", 2: "Confidential", 3: "Secret"}
RULE_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,59}$"
BUILTIN_RULES = ("clearance", "memory", "role", "provider")
NODE_ROLES = ("device", "gateway", "server")


def clearance_label(value: int) -> str:
    return CLEARANCE_LABELS.get(value, str(value))


class PolicyInvalid(ValueError):
    """A policy document that cannot be used; the message names the offending rule and field."""


class PolicyDocument(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


D = TypeVar("D", bound=PolicyDocument)


class _Named(Protocol):
    @property
    def name(self) -> str: ...


R = TypeVar("R", bound=_Named)


def unique_rule_names(rules: list[R]) -> list[R]:
    """``rules`` as given; a ValueError naming the first rule whose name an earlier rule uses."""
    repeat = first_repeat(rule.name for rule in rules)
    if repeat is not None:
        raise ValueError(f"rules[{repeat[0]}] \"{repeat[1]}\": the name is used by an earlier rule")
    return rules


def _where(data: Any, loc: Sequence[int | str]) -> str:
    """``rules[1] "name"``-style location of an error, naming the rule when the document gives one."""
    parts: list[str] = []
    node: Any = data
    for item in loc:
        if isinstance(item, int):
            parts[-1:] = [f"{parts[-1]}[{item}]" if parts else f"[{item}]"]
            node = node[item] if isinstance(node, list) and 0 <= item < len(node) else None
            if isinstance(node, Mapping) and isinstance(node.get("name"), str) and node.get("name"):
                parts[-1] += f' "{node["name"]}"'
        else:
            parts.append(str(item))
            node = node.get(item) if isinstance(node, Mapping) else None
    return ".".join(parts) or "document"


def parse_document(model: type[D], data: Any) -> D:
    """Validate ``data`` as ``model``; a PolicyInvalid naming the first offending rule and field."""
    if not isinstance(data, Mapping):
        raise PolicyInvalid(f"a policy document is a JSON object, not {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        loc = list(error.get("loc", ()))
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        # Rule-level checks report at the rule; point at the field when the message starts with it.
        where = _where(data, [p for p in loc if isinstance(p, int | str)])
        extra = f" (and {exc.error_count() - 1} more problem{'s' if exc.error_count() > 2 else ''})" \
            if exc.error_count() > 1 else ""
        raise PolicyInvalid(f"{where}: {message}{extra}") from None


def _classifications(values: list[int]) -> list[int]:
    for value in values:
        if value not in CLEARANCE_LABELS:
            raise ValueError(f"{value} is not a classification (0 Public, 1 Internal, 2 Confidential, 3 Secret)")
    if len(set(values)) != len(values):
        raise ValueError("a classification is listed twice")
    return values


# -- facts ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class SiteFacts:
    slug: str
    region: str = ""
    clearance: int = 1
    jurisdiction: str = ""
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True, slots=True)
class NodeFacts:
    role: str = "device"
    memory_mb: int = 0
    execution_providers: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class ModelFacts:
    classification: int
    min_memory_mb: int = 0
    node_roles: tuple[str, ...] = ()
    required_providers: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, slots=True)
class Decision:
    """Whether a model may run there; when not, which rule says so and why."""

    allowed: bool
    reason: str = ""
    rule: str = ""


ALLOWED = Decision(True)


# -- the document --------------------------------------------------------------


class SiteSelector(PolicyDocument):
    """Selects sites; every listed condition must hold, and an empty selector selects every site."""

    regions: list[str] = Field(default_factory=list, max_length=200)
    sites: list[str] = Field(default_factory=list, max_length=1000)
    # Compared case-insensitively: "de" and "DE" are one jurisdiction.
    jurisdictions: list[str] = Field(default_factory=list, max_length=200)
    labels: dict[str, str] = Field(default_factory=dict, max_length=50)
    min_clearance: int | None = Field(default=None, ge=0, le=3)

    @field_validator("jurisdictions")
    @classmethod
    def _upper(cls, values: list[str]) -> list[str]:
        cleaned = [v.strip().upper() for v in values]
        if any(not v for v in cleaned):
            raise ValueError("a jurisdiction is empty")
        return cleaned

    def is_empty(self) -> bool:
        return not (self.regions or self.sites or self.jurisdictions or self.labels or self.min_clearance is not None)

    def matches(self, site: SiteFacts) -> bool:
        if self.regions and site.region not in self.regions:
            return False
        if self.sites and site.slug not in self.sites:
            return False
        if self.jurisdictions and site.jurisdiction.strip().upper() not in self.jurisdictions:
            return False
        if self.labels and any(site.labels.get(k) != v for k, v in self.labels.items()):
            return False
        return not (self.min_clearance is not None and site.clearance < self.min_clearance)

    def describe(self) -> str:
        parts: list[str] = []
        if self.regions:
            parts.append(f"region {' or '.join(self.regions)}")
        if self.sites:
            parts.append(f"site {' or '.join(self.sites)}")
        if self.jurisdictions:
            parts.append(f"jurisdiction {' or '.join(self.jurisdictions)}")
        if self.labels:
            parts.append("labels " + ", ".join(f"{k}={v}" for k, v in sorted(self.labels.items())))
        if self.min_clearance is not None:
            parts.append(f"clearance {clearance_label(self.min_clearance)} or above")
        return "sites with " + " and ".join(parts) if parts else "every site"


class PlacementRule(PolicyDocument):
    """One rule. ``deny``: the classifications may not run at the selected sites.
    ``only``: the classifications may run at the selected sites and nowhere else."""

    name: str = Field(pattern=RULE_NAME_PATTERN)
    description: str = Field(default="", max_length=500)
    effect: Literal["deny", "only"]
    # Empty: every classification.
    classifications: list[int] = Field(default_factory=list, max_length=4)
    where: SiteSelector = Field(default_factory=SiteSelector)

    _check_classifications = field_validator("classifications")(_classifications)

    @model_validator(mode="after")
    def _sensible(self) -> PlacementRule:
        if self.effect == "only" and self.where.is_empty():
            raise ValueError("an 'only' rule needs a non-empty 'where' (it would allow every site, which is no rule)")
        if self.name in BUILTIN_RULES:
            raise ValueError(f"'{self.name}' is the name of a built-in check; choose another name")
        return self

    def applies_to(self, classification: int) -> bool:
        return not self.classifications or classification in self.classifications

    def decide(self, site: SiteFacts, classification: int) -> Decision:
        if not self.applies_to(classification):
            return ALLOWED
        label = clearance_label(classification)
        if self.effect == "deny" and self.where.matches(site):
            return Decision(False, f"placement rule '{self.name}' forbids {label} models at {self.where.describe()}",
                            self.name)
        if self.effect == "only" and not self.where.matches(site):
            return Decision(False, f"placement rule '{self.name}' allows {label} models only at "
                                   f"{self.where.describe()}", self.name)
        return ALLOWED


class PlacementPolicy(PolicyDocument):
    kind: Literal["placement"] = "placement"
    rules: Annotated[list[PlacementRule], AfterValidator(unique_rule_names)] = Field(
        default_factory=list, max_length=200)


class SiteProfile(PolicyDocument):
    """The site facts as carried in a node's signed policy bundle."""

    slug: str
    region: str = ""
    clearance: int = Field(default=1, ge=0, le=3)
    jurisdiction: str = ""
    labels: dict[str, str] = Field(default_factory=dict)

    def facts(self) -> SiteFacts:
        return SiteFacts(slug=self.slug, region=self.region, clearance=self.clearance,
                         jurisdiction=self.jurisdiction, labels=dict(self.labels))


class PolicyBundle(PolicyDocument):
    """``DesiredState.policy``: what a node enforces (its site and the placement policy in force)."""

    site: SiteProfile
    placement: PlacementPolicy = Field(default_factory=PlacementPolicy)
    # The placement policy's version number at the control plane (0: none written yet).
    placement_version: int = Field(default=0, ge=0)
    # Other parts (a data policy) are added by later features; the node ignores what it does not know.
    model_config = ConfigDict(extra="ignore", frozen=True)


# -- evaluation ----------------------------------------------------------------


def site_decision(policy: PlacementPolicy, site: SiteFacts, classification: int) -> Decision:
    """May a model of ``classification`` run at ``site`` at all (clearance and rules)?"""
    if classification > site.clearance:
        return Decision(False, f"the model is classified {clearance_label(classification)}, above the site's "
                               f"clearance {clearance_label(site.clearance)}", "clearance")
    for rule in policy.rules:
        decision = rule.decide(site, classification)
        if not decision.allowed:
            return decision
    return ALLOWED


def hardware_decision(node: NodeFacts, model: ModelFacts) -> Decision:
    """Does ``node`` meet the version's requirements (memory, role, providers)?"""
    if model.min_memory_mb and node.memory_mb < model.min_memory_mb:
        reported = f"reports {node.memory_mb} MB" if node.memory_mb else "has not reported its memory"
        return Decision(False, f"needs {model.min_memory_mb} MB of memory; the node {reported}", "memory")
    if model.node_roles and node.role not in model.node_roles:
        return Decision(False, f"runs only on {', '.join(model.node_roles)} nodes; this node is a {node.role}", "role")
    missing = [p for p in model.required_providers if p not in node.execution_providers]
    if missing:
        return Decision(False, f"needs execution provider {', '.join(missing)}, which the node does not report",
                        "provider")
    return ALLOWED


def place(policy: PlacementPolicy, site: SiteFacts, node: NodeFacts, model: ModelFacts) -> Decision:
    """The whole placement decision for one node: site rules first, then hardware."""
    decision = site_decision(policy, site, model.classification)
    if not decision.allowed:
        return decision
    return hardware_decision(node, model)


def node_facts(role: str, hardware: Mapping[str, Any] | None) -> NodeFacts:
    """NodeFacts from a reported hardware profile (the protocol's ``Hardware`` as a dict)."""
    hardware = hardware or {}
    try:
        memory = int(hardware.get("memory_mb") or 0)
    except (TypeError, ValueError):
        memory = 0
    providers = hardware.get("execution_providers") or ()
    return NodeFacts(role=role, memory_mb=memory if math.isfinite(memory) else 0,
                     execution_providers=tuple(str(p) for p in providers if p not in NON_COMPUTE_PROVIDERS))


def model_facts(classification: int, *, min_memory_mb: int = 0, node_roles: Iterable[str] = (),
                required_providers: Iterable[str] = ()) -> ModelFacts:
    return ModelFacts(classification=classification, min_memory_mb=min_memory_mb, node_roles=tuple(node_roles),
                      required_providers=tuple(required_providers))
