// The customer's location on a map drawn in the browser from data bundled with the
// console (Natural Earth's countries at 1:110m, from world-atlas): no map server, no
// request leaves the page.

import type { Feature, Geometry, Position } from "geojson";
import { feature } from "topojson-client";
import type { GeometryCollection, Topology } from "topojson-specification";
import countries from "world-atlas/countries-110m.json";

const SVG = "http://www.w3.org/2000/svg";
// Half the height of the map, in degrees of latitude.
const SPAN = 6;

let shapes: Feature<Geometry>[] | null = null;

function world(): Feature<Geometry>[] {
  if (shapes === null) {
    const topology = countries as unknown as Topology;
    const collection = feature(topology, topology.objects.countries as GeometryCollection);
    shapes = collection.features;
  }
  return shapes;
}

function rings(geometry: Geometry): Position[][] {
  if (geometry.type === "Polygon") {
    return geometry.coordinates;
  }
  if (geometry.type === "MultiPolygon") {
    return geometry.coordinates.flat();
  }
  return [];
}

/** An SVG map centred on the point (equirectangular, x = longitude, y = -latitude). */
export function drawMap(latitude: number, longitude: number): SVGSVGElement {
  const svg = document.createElementNS(SVG, "svg");
  const width = SPAN * 3;
  svg.setAttribute(
    "viewBox",
    `${longitude - width} ${-latitude - SPAN} ${2 * width} ${2 * SPAN}`,
  );
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", `Customer's location ${latitude.toFixed(2)}, ${longitude.toFixed(2)}`);
  for (const shape of world()) {
    for (const ring of rings(shape.geometry)) {
      const xs = ring.map(([x]) => x);
      const ys = ring.map(([, y]) => y);
      const overlaps =
        Math.min(...xs) <= longitude + width &&
        Math.max(...xs) >= longitude - width &&
        Math.min(...ys) <= latitude + SPAN &&
        Math.max(...ys) >= latitude - SPAN;
      if (!overlaps) {
        continue;
      }
      const path = document.createElementNS(SVG, "path");
      path.setAttribute("class", "land");
      path.setAttribute("d", `M${ring.map(([x, y]) => `${x},${-y}`).join("L")}Z`);
      svg.appendChild(path);
    }
  }
  const marker = document.createElementNS(SVG, "circle");
  marker.setAttribute("class", "customer");
  marker.setAttribute("cx", String(longitude));
  marker.setAttribute("cy", String(-latitude));
  marker.setAttribute("r", "0.45");
  marker.setAttribute("data-testid", "customer-marker");
  svg.appendChild(marker);
  return svg;
}
