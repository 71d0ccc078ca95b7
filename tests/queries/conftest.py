"""A small estate with a catalog: nodes at Berlin (eu) and Ohio (us) whose datasets are real files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from sites.models import Node, Site
from tests.models_registry.helpers import make_node
from tests.queries.helpers import OPEN_POLICY, data_policy, plant_frame, register_catalog, write_dataset


@dataclass
class Estate:
    berlin: Site
    ohio: Site
    berlin_node: Node
    ohio_node: Node
    berlin_credential: str
    ohio_credential: str
    folders: dict[str, Path]
    frames: dict[str, pd.DataFrame]
    entries: dict[str, list[dict[str, Any]]]


@pytest.fixture
def estate(site_berlin: Site, site_ohio: Site, tmp_path: Path) -> Estate:
    data_policy(OPEN_POLICY)
    berlin_node, berlin_credential = make_node(site_berlin, "gw-1", role="gateway")
    ohio_node, ohio_credential = make_node(site_ohio, "gw-2", role="gateway")
    frames = {"plant-berlin": plant_frame(11), "plant-ohio": plant_frame(12, lines=("L2", "L4"))}
    folders = {slug: tmp_path / slug for slug in frames}
    entries = {"plant-berlin": [write_dataset(folders["plant-berlin"], frames["plant-berlin"], "parquet")],
               "plant-ohio": [write_dataset(folders["plant-ohio"], frames["plant-ohio"], "sqlite")]}
    register_catalog(berlin_node, folders["plant-berlin"], entries["plant-berlin"])
    register_catalog(ohio_node, folders["plant-ohio"], entries["plant-ohio"])
    return Estate(site_berlin, site_ohio, berlin_node, ohio_node, berlin_credential, ohio_credential, folders,
                  frames, entries)
