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

  const STATUS_RANK = {offline: 3, degraded: 2, empty: 1, online: 0};
  const groups = {};   // region slug -> L.markerClusterGroup
  const markers = {};  // site uuid -> {marker, site}

  function escapeHtml(text) {
    const div = document.createElement("div");
    div.textContent = text == null ? "" : String(text);
    return div.innerHTML;
  }

  function icon(site) {
    return L.divIcon({
      className: "site-marker-wrap",
      html: '<span class="site-marker status-' + site.status + '" data-site="' + escapeHtml(site.slug) +
            '" data-status="' + site.status + '" title="' + escapeHtml(site.name) + ": " + site.status + '"></span>',
      iconSize: [18, 18], iconAnchor: [9, 9],
    });
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
      html: '<span class="site-cluster status-' + worst + '">' + cluster.getChildCount() + "</span>",
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

  function popup(site) {
    const confirmed = site.confirmed_at
      ? '<time class="live-ago" datetime="' + site.confirmed_at + '">' +
        window.EdgewiseLive.ago(new Date(site.confirmed_at)) + "</time>"
      : "never";
    return '<div class="map-popup"><a href="' + site.url + '"><strong>' + escapeHtml(site.name) + "</strong></a>" +
      '<br><span class="badge status-' + site.status + '">' + (site.status === "empty" ? "no nodes" : site.status) +
      "</span> " + site.nodes_online + " / " + site.nodes_total + " nodes online" +
      "<br>last confirmed " + confirmed +
      '<br><span class="muted">' + escapeHtml(site.region_name) + " · " + escapeHtml(site.connectivity) +
      "</span></div>";
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
        known.site.confirmed_at = message.sites[uuid].confirmed_at;
        if (known.site.status !== "online") recovered = true;
      });
      if (recovered) reload();
    }
  });
})();
