// The fleet map: a marker per site, coloured by its status, clustered per
// region, over a basemap bundled with the console (Natural Earth countries,
// 1:110m, from static/vendor/world-atlas): nothing is fetched from anywhere
// else unless the installation configured a tile server (EDGEWISE_MAP_TILE_URL).
//
// Statuses come from the control plane (sites/map/sites.json, the same
// derivation as the fleet table). The map reloads them when the live socket
// says a site changed, when a site that was not online is confirmed again,
// and every 5 s regardless; if the reload fails, the map says since when it
// has not been updated instead of showing old colours as current.
(function () {
  "use strict";
  const config = JSON.parse(document.getElementById("map-config").textContent);
  const element = document.getElementById("fleet-map");
  const staleNote = document.getElementById("map-stale-note");
  const map = L.map(element, {worldCopyJump: true, minZoom: 1, maxZoom: 12, zoomSnap: 0.5});
  map.attributionControl.setPrefix(false);

  if (config.tile_url) {
    L.tileLayer(config.tile_url, {attribution: config.tile_attribution || "", maxZoom: 18}).addTo(map);
  } else {
    map.getContainer().classList.add("bundled-basemap");
    map.attributionControl.addAttribution("Basemap: Natural Earth");
    fetch(config.basemap_url).then(function (r) { return r.json(); }).then(function (topology) {
      const countries = topojson.feature(topology, topology.objects.countries);
      L.geoJSON(countries, {
        interactive: false,
        style: {color: "#9aa7b4", weight: 0.6, fillColor: "#e8edf1", fillOpacity: 1},
      }).addTo(map).bringToBack();
    });
  }

  // An air-gapped site has no link to lose: neutral, above online so that a cluster of them is not green.
  const STATUS_RANK = {offline: 3, degraded: 2, empty: 1, "air-gapped": 0.5, online: 0};
  const groups = {};   // region slug -> L.markerClusterGroup
  const markers = {};  // site uuid -> {marker, site}

  // Everything a site brings (its name, its region's name, its slug) is text
  // set with textContent or setAttribute on nodes built here, never HTML put
  // together from strings: a site named `x" onmouseover="…` stays a name.
  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text != null) node.textContent = String(text);
    return node;
  }

  // A link target must be a path of this console (the server builds site.url);
  // anything else, another origin or a javascript: URL, is not linked.
  function consolePath(url) {
    try {
      const parsed = new URL(String(url), location.href);
      return parsed.origin === location.origin ? parsed.pathname + parsed.search + parsed.hash : null;
    } catch (e) {
      return null;
    }
  }

  function icon(site) {
    const marker = el("span", "site-marker status-" + site.status);
    marker.setAttribute("data-site", site.slug);
    marker.setAttribute("data-status", site.status);
    marker.setAttribute("title", site.name + ": " + (site.label || site.status));
    return L.divIcon({className: "site-marker-wrap", html: marker, iconSize: [18, 18], iconAnchor: [9, 9]});
  }

  function clusterIcon(cluster) {
    // A cluster shows the worst status of its sites, so a problem is never hidden by zooming out.
    let worst = "online";
    cluster.getAllChildMarkers().forEach(function (m) {
      const status = m.options.siteStatus;
      if ((STATUS_RANK[status] || 0) > (STATUS_RANK[worst] || 0)) worst = status;
    });
    return L.divIcon({
      className: "site-cluster-wrap",
      html: el("span", "site-cluster status-" + worst, cluster.getChildCount()),
      iconSize: [30, 30],
    });
  }

  function groupFor(site) {
    if (!groups[site.region]) {
      groups[site.region] = L.markerClusterGroup({
        iconCreateFunction: clusterIcon, showCoverageOnHover: false, maxClusterRadius: 40,
      }).addTo(map);
    }
    return groups[site.region];
  }

  function confirmedTime(at) {
    const time = el("time", "live-ago", window.EdgewiseLive.ago(new Date(at)));
    time.setAttribute("datetime", at);
    return time;
  }

  function popup(site) {
    const box = el("div", "map-popup");
    const name = el("strong", null, site.name);
    const href = consolePath(site.url);
    if (href) {
      const link = el("a");
      link.setAttribute("href", href);
      link.appendChild(name);
      box.appendChild(link);
    } else {
      box.appendChild(name);
    }
    box.appendChild(el("br"));
    if (site.status === "air-gapped") {
      // No link: what is known arrives in bundles out, so the badge says when that was, not "offline".
      const badge = el("span", "badge status-air-gapped", site.label + (site.confirmed_at ? " " : ""));
      if (site.confirmed_at) badge.appendChild(confirmedTime(site.confirmed_at));
      box.appendChild(badge);
      box.appendChild(document.createTextNode(" " + site.nodes_total + " node" + (site.nodes_total === 1 ? "" : "s")));
    } else {
      box.appendChild(el("span", "badge status-" + site.status, site.label || site.status));
      box.appendChild(document.createTextNode(" " + site.nodes_online + " / " + site.nodes_total + " nodes online"));
      box.appendChild(el("br"));
      box.appendChild(document.createTextNode("last confirmed "));
      if (site.confirmed_at) {
        box.appendChild(confirmedTime(site.confirmed_at));
      } else {
        box.appendChild(document.createTextNode("never"));
      }
    }
    box.appendChild(el("br"));
    box.appendChild(el("span", "muted", site.region_name + " · " + site.connectivity));
    return box;
  }

  function place(site) {
    if (site.lat == null || site.lon == null) return;
    const known = markers[site.uuid];
    if (known && known.site.region === site.region) {
      const changed = known.site.status !== site.status;
      known.site = site;
      known.marker.options.siteStatus = site.status;
      known.marker.setLatLng([site.lat, site.lon]);
      if (changed) {
        known.marker.setIcon(icon(site));
        groupFor(site).refreshClusters(known.marker);
      }
      known.marker.setPopupContent(popup(site));
      return;
    }
    if (known) groupFor(known.site).removeLayer(known.marker);
    const marker = L.marker([site.lat, site.lon], {icon: icon(site), siteStatus: site.status, title: site.name});
    marker.bindPopup(function () { return popup(markers[site.uuid].site); });
    groupFor(site).addLayer(marker);
    markers[site.uuid] = {marker: marker, site: site};
  }

  function draw(sites) {
    const seen = {};
    sites.forEach(function (site) { seen[site.uuid] = true; place(site); });
    Object.keys(markers).forEach(function (uuid) {
      if (!seen[uuid]) {
        groupFor(markers[uuid].site).removeLayer(markers[uuid].marker);
        delete markers[uuid];
      }
    });
  }

  let lastUpdate = Date.now();
  let loading = false;
  function reload() {
    if (loading) return;
    loading = true;
    fetch(config.data_url, {credentials: "same-origin", headers: {"Accept": "application/json"}})
      .then(function (r) { if (!r.ok) throw new Error(r.status); return r.json(); })
      .then(function (data) {
        draw(data.sites);
        lastUpdate = Date.now();
        staleNote.hidden = true;
      })
      .catch(function () {
        staleNote.hidden = false;
        const time = staleNote.querySelector("time");
        time.setAttribute("datetime", new Date(lastUpdate).toISOString());
        time.className = "live-ago";
      })
      .finally(function () { loading = false; });
  }

  draw(config.sites);
  const placed = config.sites.filter(function (s) { return s.lat != null && s.lon != null; });
  if (placed.length) {
    map.fitBounds(L.latLngBounds(placed.map(function (s) { return [s.lat, s.lon]; })).pad(0.4), {maxZoom: 6});
  } else {
    map.setView([25, 10], 2);
  }
  setInterval(reload, 5000);

  document.addEventListener("edgewise:live", function (event) {
    const message = event.detail;
    if (message.type === "changed" || message.type === "hello") {
      reload();
    } else if (message.type === "confirmed") {
      let recovered = false;
      Object.keys(message.sites).forEach(function (uuid) {
        const known = markers[uuid];
        if (!known) return;
        // Telemetry taken from an air-gapped site's bundle out is received now but confirms nothing new.
        if (known.site.status === "air-gapped") return;
        known.site.confirmed_at = message.sites[uuid].confirmed_at;
        if (known.site.status !== "online") recovered = true;
      });
      if (recovered) reload();
    }
  });
})();
