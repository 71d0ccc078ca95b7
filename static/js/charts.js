// Small live charts of the site page: per model (requests/s, latency p95,
// errors/s, summed over the site's nodes) and per node (CPU, memory).
//
// Everything is kept in 10 s buckets, as the control plane keeps its
// history: the page starts from the last 15 minutes of that history
// (#live-config) and folds in each point the site's socket delivers
// ("edgewise:live" events from live.js), so a chart is the same whether it
// was loaded or watched. Rates divide a bucket's counters by the seconds its
// points covered, per node, then add the nodes up.
(function () {
  "use strict";
  const configEl = document.getElementById("live-config");
  if (!configEl) return;
  const config = JSON.parse(configEl.textContent);
  const BUCKET_MS = 10000;
  const buckets = Math.round(config.window_s / 10);
  const nodeNames = {};
  const models = {};     // "name@version" -> {bucket ms -> {node uuid -> sums}}
  const resources = {};  // node uuid -> {bucket ms -> sums}
  const seen = {};       // node uuid -> highest seq folded in (a point is never counted twice)
  config.nodes.forEach(function (n) { nodeNames[n.uuid] = n.name; seen[n.uuid] = n.seq; });

  function slot(table, key, bucket, node) {
    const series = table[key] = table[key] || {};
    const b = series[bucket] = series[bucket] || {};
    if (node === undefined) return b;
    return b[node] = b[node] || {requests: 0, errors: 0, interval_sum: 0, latency_weight: 0, p95: 0};
  }

  function addResources(node, bucket, r) {
    const b = slot(resources, node, bucket);
    b.points = (b.points || 0) + r.points;
    b.cpu = (b.cpu || 0) + r.cpu;
    b.mem = (b.mem || 0) + r.mem;
    b.memTotal = Math.max(b.memTotal || 0, r.memTotal);
    b.disk = r.disk; b.diskTotal = r.diskTotal;
  }

  config.history.forEach(function (row) {
    const bucket = new Date(row.bucket).getTime();
    if (row.model) {
      const s = slot(models, row.model + "@" + row.version, bucket, row.node);
      s.requests += row.requests; s.errors += row.errors; s.interval_sum += row.interval_sum;
      s.latency_weight += row.latency_weight; s.p95 += row.latency_p95_wsum;
    } else {
      addResources(row.node, bucket, {points: row.points, cpu: row.cpu_sum, mem: row.memory_used_sum,
        memTotal: row.memory_total_max, disk: row.disk_used_sum / Math.max(1, row.points), diskTotal: row.disk_total_max});
    }
  });

  function fold(point) {
    if (point.seq <= (seen[point.node] || 0)) return;
    seen[point.node] = point.seq;
    const at = new Date(point.at).getTime();
    const bucket = at - at % BUCKET_MS;
    const r = point.resources;
    addResources(point.node, bucket, {points: 1, cpu: r.cpu_percent, mem: r.memory_used_mb, memTotal: r.memory_total_mb,
      disk: r.disk_used_mb, diskTotal: r.disk_total_mb});
    point.models.forEach(function (m) {
      const s = slot(models, m.model + "@" + m.version, bucket, point.node);
      s.requests += m.requests; s.errors += m.errors; s.interval_sum += point.interval_s;
      if (m.latency_p95_ms != null && m.requests) { s.latency_weight += m.requests; s.p95 += m.latency_p95_ms * m.requests; }
    });
  }

  function now() { return window.EdgewiseLive ? window.EdgewiseLive.serverNow() : Date.now(); }

  function axis() {
    const end = now() - now() % BUCKET_MS;
    const out = [];
    for (let i = buckets - 1; i >= 0; i--) out.push(end - i * BUCKET_MS);
    return out;
  }

  const SVG = "http://www.w3.org/2000/svg";
  function sparkline(title, values, unit, options) {
    options = options || {};
    const figure = document.createElement("figure");
    figure.className = "chart";
    figure.dataset.chart = title;
    const known = values.filter(function (v) { return v != null; });
    const last = known.length ? known[known.length - 1] : null;
    const max = options.max || Math.max(1e-9, ...known, 0);
    const caption = document.createElement("figcaption");
    const name = document.createElement("span");
    name.textContent = title;
    const value = document.createElement("strong");
    value.textContent = last == null ? "—" : format(last) + " " + unit;
    caption.append(name, " ", value);
    figure.appendChild(caption);
    const svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("viewBox", "0 0 " + values.length + " 40");
    svg.setAttribute("preserveAspectRatio", "none");
    svg.setAttribute("role", "img");
    svg.setAttribute("aria-label", title + ", last " + (last == null ? "none" : format(last) + " " + unit));
    let path = "";
    values.forEach(function (v, i) {
      if (v == null) return;
      const y = 38 - 36 * Math.min(1, v / max);
      path += (path && values[i - 1] != null ? " L" : " M") + i + " " + y.toFixed(2);
    });
    const line = document.createElementNS(SVG, "path");
    line.setAttribute("d", path.trim() || "M0 38");
    line.setAttribute("class", "chart-line" + (options.kind ? " chart-" + options.kind : ""));
    line.setAttribute("vector-effect", "non-scaling-stroke");
    svg.appendChild(line);
    figure.appendChild(svg);
    const scale = document.createElement("span");
    scale.className = "chart-scale muted small";
    scale.textContent = "max " + format(max) + " " + unit;
    figure.appendChild(scale);
    return figure;
  }

  function format(v) {
    if (v >= 100) return v.toFixed(0);
    if (v >= 10) return v.toFixed(1);
    return v.toFixed(2);
  }

  function renderModels(times) {
    const box = document.getElementById("model-charts");
    const names = Object.keys(models).sort();
    if (!names.length) return;
    box.replaceChildren();
    names.forEach(function (name) {
      const rate = [], errors = [], p95 = [];
      times.forEach(function (t) {
        const nodes = models[name][t];
        if (!nodes) { rate.push(null); errors.push(null); p95.push(null); return; }
        let r = 0, e = 0, w = 0, l = 0;
        Object.keys(nodes).forEach(function (n) {
          const s = nodes[n];
          if (s.interval_sum > 0) { r += s.requests / s.interval_sum; e += s.errors / s.interval_sum; }
          w += s.latency_weight; l += s.p95;
        });
        rate.push(r); errors.push(e); p95.push(w ? l / w : null);
      });
      const group = document.createElement("div");
      group.className = "chart-group";
      group.dataset.model = name;
      const h = document.createElement("h4");
      h.textContent = name;
      group.appendChild(h);
      group.appendChild(sparkline("requests", rate, "/s"));
      group.appendChild(sparkline("latency p95", p95, "ms", {kind: "latency"}));
      group.appendChild(sparkline("errors", errors, "/s", {kind: "errors"}));
      box.appendChild(group);
    });
  }

  function renderResources(times) {
    const box = document.getElementById("resource-charts");
    box.replaceChildren();
    Object.keys(nodeNames).forEach(function (node) {
      const series = resources[node] || {};
      const cpu = [], mem = [];
      let disk = null;
      times.forEach(function (t) {
        const b = series[t];
        if (!b || !b.points) { cpu.push(null); mem.push(null); return; }
        cpu.push(b.cpu / b.points);
        mem.push(b.memTotal ? 100 * (b.mem / b.points) / b.memTotal : null);
        if (b.diskTotal) disk = 100 * b.disk / b.diskTotal;
      });
      const group = document.createElement("div");
      group.className = "chart-group";
      group.dataset.node = nodeNames[node];
      const h = document.createElement("h4");
      h.textContent = nodeNames[node] + (disk == null ? "" : " · disk " + disk.toFixed(0) + " %");
      group.appendChild(h);
      group.appendChild(sparkline("CPU", cpu, "%", {max: 100}));
      group.appendChild(sparkline("memory", mem, "%", {max: 100, kind: "memory"}));
      box.appendChild(group);
    });
  }

  let pending = false;
  function render() {
    pending = false;
    const times = axis();
    renderModels(times);
    renderResources(times);
  }
  function schedule() {
    if (!pending) { pending = true; setTimeout(render, 500); }
  }

  document.addEventListener("edgewise:live", function (event) {
    const message = event.detail;
    if (message.type === "telemetry" && message.site === config.site) {
      message.points.forEach(function (p) { if (nodeNames[p.node]) fold(p); });
      schedule();
    }
  });
  render();
  // The time axis moves on even when nothing arrives: a silent node shows as a gap, not a flat line.
  setInterval(schedule, BUCKET_MS);
})();
