// emo-experts explore: draws what Python computed (emo_lightning/experts/explore.py); computes only what the
// interaction needs (which tokens to colour, which documents hold a cluster). Plotly.js draws the heatmaps.
"use strict";
(function () {
  const DATA = JSON.parse(document.getElementById("explore-data").textContent);

  function unpack(p) {
    const bin = atob(p.b64);
    const bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    return p.dtype === "u8" ? bytes : new Uint16Array(bytes.buffer);
  }
  const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;" })[c]);
  const pct = (x, digits = 1) => (100 * x).toFixed(digits) + "%";
  const signed = (x) => (x >= 0 ? "+" : "\u2212") + (100 * Math.abs(x)).toFixed(2) + "%";
  const visible = (s) => s.replace(/ /g, "\u2423").replace(/\n/g, "\u23ce").replace(/\t/g, "\u21e5") || "\u2205";

  const DOCS = DATA.docs;
  const OFFSET = [0];
  DOCS.forEach((d) => OFFSET.push(OFFSET[OFFSET.length - 1] + d.tokens.length));
  const T = OFFSET[DOCS.length];
  const DOC_OF = new Int32Array(T);
  DOCS.forEach((d, i) => DOC_OF.fill(i, OFFSET[i], OFFSET[i + 1]));
  const MODELS = DATA.models.map((m) => Object.assign({}, m, { E: unpack(m.experts), W: unpack(m.weights), C: unpack(m.clusters) }));
  const N_LAYERS = Math.min(...MODELS.map((m) => m.layers));
  const DOMAIN_COLOURS = ["#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#b8a01f", "#b279a2", "#ff9da6", "#9d755d", "#8c8c8c"];
  const domainColour = (name) => DOMAIN_COLOURS[DATA.domains.indexOf(name) % DOMAIN_COLOURS.length];
  // categorical pastels: hues a golden angle apart, two lightness levels (dark text stays readable)
  const palette = (n) => Array.from({ length: n }, (_, i) => `hsl(${((i * 137.508) % 360).toFixed(1)}, 70%, ${i % 2 ? 82 : 70}%)`);
  MODELS.forEach((m) => {
    m.clusterColours = palette(m.k);
    m.expertColours = palette(m.num_routed);
  });

  const state = { tab: "documents", layer: 0, colour: "cluster", doc: 0, cluster: null, showAll: false, token: null };

  // ------------------------------------------------------------------------------------------- accessors
  const experts = (m, t, l) => Array.from(m.E.subarray((t * m.layers + l) * m.top_k, (t * m.layers + l + 1) * m.top_k));
  const weights = (m, t, l) => Array.from(m.W.subarray((t * m.layers + l) * m.top_k, (t * m.layers + l + 1) * m.top_k), (w) => w / 255);
  const cluster = (m, l, t) => m.C[l * T + t];
  function tokenColour(m, t) {
    if (state.colour === "cluster") return m.clusterColours[cluster(m, state.layer, t)];
    const top = m.E[(t * m.layers + state.layer) * m.top_k]; // experts are ordered by descending weight
    return top < m.num_routed ? m.expertColours[top] : "#e2e5ea";
  }

  // ---------------------------------------------------------------------------------------------- tokens
  function tokenSpan(mi, t, cls) {
    const m = MODELS[mi];
    const ex = [], wt = [], cl = [];
    for (let l = 0; l < m.layers; l++) {
      ex.push(experts(m, t, l).join(","));
      wt.push(weights(m, t, l).map((w) => w.toFixed(2)).join(","));
      cl.push(cluster(m, l, t));
    }
    const text = DOCS[DOC_OF[t]].tokens[t - OFFSET[DOC_OF[t]]];
    return `<span class="tok${cls}" tabindex="0" data-m="${mi}" data-t="${t}" data-experts="${ex.join(";")}" ` +
      `data-weights="${wt.join(";")}" data-clusters="${cl.join(",")}">${esc(text)}</span>`;
  }
  function paint(root) {
    for (const span of root.querySelectorAll(".tok")) span.style.backgroundColor = tokenColour(MODELS[+span.dataset.m], +span.dataset.t);
  }

  // ------------------------------------------------------------------------------------------- documents
  const docButtons = [];
  function buildDocList() {
    const ul = document.getElementById("docs");
    ul.innerHTML = DOCS.map((d, i) => `<li><button data-doc="${i}" title="${esc(d.id)}"><span class="dom" style="background:${domainColour(d.domain)}">${esc(d.domain)}</span>` +
      `<span>${esc(d.id)}</span><span class="n">${d.tokens.length}</span></button></li>`).join("");
    ul.querySelectorAll("button").forEach((b) => docButtons.push(b));
    ul.addEventListener("click", (e) => {
      const b = e.target.closest("button[data-doc]");
      if (b) showDoc(+b.dataset.doc);
    });
    let texts = null; // joined document texts, built on the first search
    document.getElementById("doc-filter").addEventListener("input", (e) => {
      const q = e.target.value.toLowerCase();
      texts = texts || DOCS.map((d) => (d.id + "\n" + d.domain + "\n" + d.tokens.join("")).toLowerCase());
      docButtons.forEach((b, i) => { b.parentElement.hidden = q !== "" && !texts[i].includes(q); });
    });
  }

  function legend(mi, doc) {
    const m = MODELS[mi];
    const counts = new Map();
    for (let t = OFFSET[doc]; t < OFFSET[doc + 1]; t++) {
      const key = state.colour === "cluster" ? cluster(m, state.layer, t) : m.E[(t * m.layers + state.layer) * m.top_k];
      counts.set(key, (counts.get(key) || 0) + 1);
    }
    const top = [...counts.entries()].sort((a, b) => b[1] - a[1]).slice(0, 10);
    const what = state.colour === "cluster" ? "cluster" : "expert";
    return `<div class="legend" data-model="${mi}">most frequent ${what}s:` + top.map(([key, n]) => {
      const colour = state.colour === "cluster" ? m.clusterColours[key] : (key < m.num_routed ? m.expertColours[key] : "#e2e5ea");
      const attrs = state.colour === "cluster" ? ` data-cluster="${key}" title="show cluster ${key} in the Clusters tab"` : "";
      return `<button${attrs}><span class="dot" style="background:${colour}"></span>${what[0]}${key} <span>${n}</span></button>`;
    }).join("") + "</div>";
  }

  function showDoc(i) {
    state.doc = Math.max(0, Math.min(DOCS.length - 1, i));
    const d = DOCS[state.doc];
    docButtons.forEach((b, j) => b.setAttribute("aria-current", String(j === state.doc)));
    docButtons[state.doc].scrollIntoView({ block: "nearest" });
    const cutNote = d.length > d.tokens.length ? `, first ${d.tokens.length} of ${d.length} tokens` : `, ${d.length} tokens`;
    document.getElementById("doc-title").innerHTML = `${esc(d.id)} <small><span class="dom" style="background:${domainColour(d.domain)}">${esc(d.domain)}</span>${cutNote}</small>`;
    const cols = document.getElementById("doc-columns");
    cols.style.gridTemplateColumns = `repeat(${MODELS.length}, minmax(0, 1fr))`; // side by side, whatever the width
    cols.innerHTML = MODELS.map((m, mi) => {
      const spans = [];
      for (let t = OFFSET[state.doc]; t < OFFSET[state.doc + 1]; t++) spans.push(tokenSpan(mi, t, ""));
      return `<div class="card doc-col" data-model="${mi}"><h2>${esc(m.label)} <small>layer ${state.layer}, ` +
        `coloured by ${state.colour === "cluster" ? "cluster" : "top expert"}</small></h2>${legend(mi, state.doc)}` +
        `<div class="doc-text" data-model="${mi}">${spans.join("")}</div></div>`;
    }).join("");
    paint(cols);
  }

  function repaintDocs() {
    const cols = document.getElementById("doc-columns");
    cols.querySelectorAll(".doc-col").forEach((col) => {
      const mi = +col.dataset.model;
      col.querySelector("h2 small").textContent = `layer ${state.layer}, coloured by ${state.colour === "cluster" ? "cluster" : "top expert"}`;
      col.querySelector(".legend").outerHTML = legend(mi, state.doc);
    });
    paint(cols);
    if (state.token) showToken(state.token.mi, state.token.t);
  }

  // ------------------------------------------------------------------------------------- a token's routes
  function poolLine(m, doc, l, mine) {
    const pool = m.pools[doc][l];
    const chips = (list) => list.map((e) => (mine.has(e) ? `<b>${e}</b>` : `${e}`)).join(" ");
    if (pool) return `pool (${pool.length} of ${m.num_routed}): ${chips(pool)}`;
    const used = m.used[doc][l];
    return `<details><summary>no document pool (routing ${esc(DATA.meta.routing)}); its tokens use ${used.length} of ` +
      `${m.num_routed}</summary>${chips(used)}</details>`;
  }
  function showToken(mi, t) {
    state.token = { mi, t };
    const doc = DOC_OF[t], pos = t - OFFSET[doc];
    const d = DOCS[doc];
    const cards = MODELS.map((m, j) => {
      const rows = [];
      for (let l = 0; l < m.layers; l++) {
        const ex = experts(m, t, l), wt = weights(m, t, l);
        const chips = ex.map((e, i) => `<span class="ex${e >= m.num_routed ? " shared" : ""}" data-expert="${e}" title="weight ${wt[i].toFixed(3)}">` +
          `${e}<i style="width:${Math.max(2, Math.round(22 * wt[i]))}px"></i></span>`).join("");
        const c = cluster(m, l, t);
        rows.push(`<tr data-layer="${l}" class="${l === state.layer ? "current" : ""}"><td>${l}</td>` +
          `<td><span class="dot" style="background:${m.clusterColours[c]}"></span> c${c}</td>` +
          `<td class="experts">${chips}</td></tr>` +
          `<tr class="${l === state.layer ? "current" : ""}"><td></td><td colspan="2" class="pool" data-layer="${l}">${poolLine(m, doc, l, new Set(ex))}</td></tr>`);
      }
      return `<div class="card" data-model="${j}"><h2>${esc(m.label)}${j === mi ? "" : " <small>(same token)</small>"}</h2>` +
        `<table class="routes"><tr><th>layer</th><th>cluster</th><th>experts (bar: weight)</th></tr>${rows.join("")}</table></div>`;
    });
    document.getElementById("token-info").innerHTML =
      `<div class="card"><h3><code>${esc(visible(d.tokens[pos]))}</code></h3>${esc(d.id)} (${esc(d.domain)}), token ${pos + 1} of ${d.tokens.length}</div>` + cards.join("");
  }
  function onToken(e) {
    const span = e.target.closest && e.target.closest(".tok");
    if (!span) return;
    document.querySelectorAll(".tok.active").forEach((s) => s.classList.remove("active"));
    span.classList.add("active");
    showToken(+span.dataset.m, +span.dataset.t);
  }
  function onTokenKey(e) {
    const span = e.target.closest && e.target.closest(".tok");
    if (!span || (e.key !== "ArrowRight" && e.key !== "ArrowLeft")) return;
    const next = e.key === "ArrowRight" ? span.nextElementSibling : span.previousElementSibling;
    if (next) { next.focus(); e.preventDefault(); }
  }

  // -------------------------------------------------------------------------------------------- clusters
  function clusterItem(mi, c) {
    const m = MODELS[mi];
    const info = m.cluster_layers[state.layer].clusters[c];
    const total = info.size || 1;
    const order = info.domains.map((n, i) => [i, n]).filter(([, n]) => n > 0).sort((a, b) => b[1] - a[1]);
    const bar = order.map(([i, n]) => `<span style="width:${(100 * n) / total}%;background:${domainColour(DATA.domains[i])}" title="${esc(DATA.domains[i])} ${pct(n / total)}"></span>`).join("");
    const top = order.slice(0, 2).map(([i, n]) => `${esc(DATA.domains[i])} ${pct(n / total, 0)}`).join(" \u00b7 ");
    const toks = info.tokens.slice(0, 6).map(([s]) => esc(visible(s))).join("  ");
    const pressed = state.cluster && state.cluster.mi === mi && state.cluster.c === c;
    return `<li><button class="cluster" data-model="${mi}" data-cluster="${c}" aria-pressed="${pressed}">` +
      `<span class="dot" style="background:${m.clusterColours[c]}"></span><span class="cid">c${c}</span>` +
      `<span><span class="bar">${bar}</span><span class="top">${top}</span></span><span class="pct">${pct(info.size / T)}</span>` +
      `<span class="toks" title="most frequent tokens">${toks}</span></button></li>`;
  }
  function buildClusters() {
    document.getElementById("cluster-columns").innerHTML = MODELS.map((m, mi) => {
      const lay = m.cluster_layers[state.layer];
      const order = lay.clusters.map((c, i) => [i, c.size]).sort((a, b) => b[1] - a[1] || a[0] - b[0]);
      const key = DATA.domains.map((d) => `<span><span class="dot" style="background:${domainColour(d)}"></span> ${esc(d)}</span>`).join("");
      return `<div class="card" data-model="${mi}"><h2>${esc(m.label)} <small>layer ${state.layer}: ${m.k} clusters, ` +
        `NMI vs domain ${lay.nmi.toFixed(3)}, purity ${lay.purity.toFixed(3)}</small></h2><div class="legend">${key}</div>` +
        `<ol class="clusters">${order.map(([c]) => clusterItem(mi, c)).join("")}</ol></div>`;
    }).join("");
  }
  function showCluster() {
    const box = document.getElementById("cluster-docs");
    if (!state.cluster) { box.innerHTML = '<p class="hint">Select a cluster to list its documents, its tokens highlighted.</p>'; return; }
    const { mi, c } = state.cluster;
    const m = MODELS[mi], l = state.layer;
    const perDoc = new Int32Array(DOCS.length);
    for (let t = 0; t < T; t++) if (cluster(m, l, t) === c) perDoc[DOC_OF[t]]++;
    const docs = [...perDoc.keys()].filter((i) => perDoc[i] > 0).sort((a, b) => perDoc[b] - perDoc[a] || a - b);
    const shown = state.showAll ? docs : docs.slice(0, 20);
    const cards = shown.map((i) => {
      const spans = [];
      for (let t = OFFSET[i]; t < OFFSET[i + 1]; t++) spans.push(tokenSpan(mi, t, cluster(m, l, t) === c ? " hl" : ""));
      return `<div class="card cdoc" data-doc="${i}"><div class="cdoc-head"><span class="dom" style="background:${domainColour(DOCS[i].domain)}">${esc(DOCS[i].domain)}</span>` +
        `<button data-open="${i}" title="open in the Documents tab">${esc(DOCS[i].id)}</button><span class="n">${perDoc[i]} of ${DOCS[i].tokens.length} tokens</span></div>` +
        `<div class="doc-text">${spans.join("")}</div></div>`;
    });
    const more = shown.length < docs.length ? `<button class="more" id="more-docs">show all ${docs.length} documents</button>` : "";
    const size = m.cluster_layers[l].clusters[c].size;
    box.innerHTML = `<div class="card"><h2><span class="dot" style="background:${m.clusterColours[c]}"></span> ${esc(m.label)}, layer ${l}, cluster ${c} ` +
      `<small id="cluster-summary">${size} tokens in ${docs.length} documents</small></h2></div>${cards.join("")}${more}`;
    for (const span of box.querySelectorAll(".tok.hl")) span.style.backgroundColor = m.clusterColours[c];
  }

  // --------------------------------------------------------------------------------------------- experts
  function keepLabels() {
    const labels = [];
    MODELS.forEach((m) => Object.keys(m.keeps).forEach((k) => { if (!labels.includes(k)) labels.push(k); }));
    return labels.sort((a, b) => +a - +b);
  }
  function loadPlotly() {
    if (window.Plotly) return;
    const script = document.createElement("script");
    script.textContent = document.getElementById("plotly-js").textContent;
    document.head.appendChild(script); // runs now, synchronously
  }
  function drawExperts() {
    loadPlotly();
    const dom = document.getElementById("domain").value, keep = document.getElementById("keep").value, l = state.layer;
    const box = document.getElementById("expert-columns");
    if (!box.children.length) {
      box.innerHTML = MODELS.map((m, mi) => `<div class="card" data-model="${mi}"><h2>${esc(m.label)} <small></small></h2>` +
        `<div class="heatmap" id="heatmap-${mi}"></div><div class="kept" id="kept-${mi}"></div></div>`).join("");
    }
    MODELS.forEach((m, mi) => {
      const card = box.querySelector(`.card[data-model="${mi}"]`);
      card.querySelector("h2 small").textContent = `layer ${l}: share of each domain's routed token slots per expert`;
      const sel = m.select[dom] && m.select[dom].keep[keep];
      const kept = sel ? sel.layers[l] : [];
      const traces = [
        { type: "heatmap", z: m.usage[l], x: [...Array(m.num_routed).keys()], y: DATA.domains, colorscale: "Viridis", zmin: 0,
          colorbar: { title: { text: "share" }, tickformat: ".1%", thickness: 12 },
          hovertemplate: "%{y}, expert %{x}: %{z:.1%} of the domain's routed slots<extra></extra>" },
        { type: "scatter", mode: "markers", x: kept, y: kept.map(() => dom), name: "kept",
          marker: { symbol: "square-open", size: 13, color: "#ff2d55", line: { width: 2.5 } },
          hovertemplate: `expert %{x}: kept for ${esc(dom)}<extra></extra>` },
      ];
      const layout = {
        height: 90 + 26 * DATA.domains.length, margin: { l: 10, r: 10, t: 8, b: 40 }, showlegend: false,
        xaxis: { title: { text: "routable expert" }, dtick: m.num_routed > 32 ? 4 : 1, range: [-0.5, m.num_routed - 0.5] },
        yaxis: { automargin: true, autorange: "reversed" }, paper_bgcolor: "rgba(0,0,0,0)",
      };
      Plotly.react(`heatmap-${mi}`, traces, layout, { displaylogo: false, responsive: true });
      document.getElementById(`kept-${mi}`).innerHTML = keptText(m, dom, keep, l);
    });
  }
  function keptText(m, dom, keep, l) {
    const entry = m.select[dom];
    const sel = entry && entry.keep[keep];
    if (!sel) return `<p class="hint">keep ${esc(keep)} keeps every expert of this model: nothing to select.</p>`;
    const count = m.keeps[keep];
    const rows = sel.layers.map((ex, i) => `<tr class="${i === l ? "current" : ""}" data-layer="${i}"><td>layer ${i}:</td><td class="kept-experts">${ex.join(" ")}</td></tr>`).join("");
    const shared = m.num_shared ? ` + ${m.num_shared} shared` : "";
    let measured = "";
    if (sel.measured) {
      const r = sel.measured;
      measured = `<p class="measured">Measured by the report: loss <span class="rise">${signed(r.rise)}</span> with its ${r.shots}-shot subset ` +
        `(random subsets ${signed(r.random)}); its subset shares ${r.overlap[l]} of ${count - m.num_shared} experts with this one at layer ${l}.</p>`;
    } else if (DATA.meta.report) {
      measured = `<p class="measured hint">The report did not measure ${esc(dom)} at ${count} experts.</p>`;
    } else {
      measured = '<p class="measured hint">Pass --report DIR (an emo-experts report folder) to see the measured loss rise.</p>';
    }
    return `<p><code>emo-experts select --keep ${esc(keep)}</code> keeps <b>${count - m.num_shared}</b> of ${m.num_routed} routable experts per layer${shared}, ` +
      `calibrated on ${entry.calibration.length} ${esc(dom)} document(s) shown here (${entry.calibration.map(esc).join(", ")}):</p>` +
      `${measured}<table>${rows}</table>`;
  }

  // ---------------------------------------------------------------------------------------------- wiring
  function setTab(tab) {
    state.tab = tab;
    for (const name of ["documents", "clusters", "experts"]) {
      document.getElementById(`tab-${name}`).setAttribute("aria-selected", String(name === tab));
      document.getElementById(`panel-${name}`).hidden = name !== tab;
    }
    refresh();
  }
  function refresh() {
    if (state.tab === "documents") repaintDocs();
    else if (state.tab === "clusters") { buildClusters(); showCluster(); }
    else drawExperts();
  }

  function init() {
    const meta = DATA.meta;
    document.getElementById("title").textContent = meta.title;
    document.getElementById("subtitle").textContent = `${DOCS.length} documents of ${DATA.domains.join(", ")} (${T} tokens, each document ` +
      `cut to ${meta.seq_len}); routing ${meta.routing}; ` + MODELS.map((m) => `${m.label}: ${m.checkpoint} (${m.num_experts} experts, top-${m.top_k}, ${m.layers} layers)`).join("; ");
    document.getElementById("footer").textContent = `emo-experts explore, data ${meta.data}${meta.report ? ", report " + meta.report : ""}. ` +
      `Heatmaps: Plotly.js (plotly ${meta.plotly}, MIT licence), inlined.`;
    const layerSel = document.getElementById("layer");
    layerSel.innerHTML = [...Array(N_LAYERS).keys()].map((l) => `<option value="${l}">${l}</option>`).join("");
    layerSel.addEventListener("change", () => {
      state.layer = +layerSel.value;
      state.cluster = null; // each layer has its own clustering: cluster ids do not carry over
      refresh();
    });
    const colourSel = document.getElementById("colour");
    colourSel.addEventListener("change", () => { state.colour = colourSel.value; refresh(); });
    document.getElementById("domain").innerHTML = DATA.domains.map((d) => `<option>${esc(d)}</option>`).join("");
    document.getElementById("keep").innerHTML = keepLabels().map((k) => {
      const counts = MODELS.map((m) => (k in m.keeps ? `${m.keeps[k]}/${m.num_experts}` : "all")).join(", ");
      return `<option value="${esc(k)}">${esc(k)} (${counts} experts)</option>`;
    }).join("");
    for (const id of ["domain", "keep"]) document.getElementById(id).addEventListener("change", drawExperts);
    for (const name of ["documents", "clusters", "experts"]) document.getElementById(`tab-${name}`).addEventListener("click", () => setTab(name));
    document.getElementById("prev-doc").addEventListener("click", () => showDoc(state.doc - 1));
    document.getElementById("next-doc").addEventListener("click", () => showDoc(state.doc + 1));
    const main = document.querySelector("main");
    main.addEventListener("mouseover", onToken);
    main.addEventListener("focusin", onToken);
    main.addEventListener("keydown", onTokenKey);
    document.getElementById("cluster-columns").addEventListener("click", (e) => {
      const b = e.target.closest("button.cluster");
      if (!b) return;
      state.cluster = { mi: +b.dataset.model, c: +b.dataset.cluster };
      state.showAll = false;
      document.querySelectorAll("button.cluster").forEach((x) => x.setAttribute("aria-pressed", String(x === b)));
      showCluster();
    });
    document.getElementById("cluster-docs").addEventListener("click", (e) => {
      if (e.target.id === "more-docs") { state.showAll = true; showCluster(); return; }
      const open = e.target.closest("button[data-open]");
      if (open) { setTab("documents"); showDoc(+open.dataset.open); }
    });
    document.getElementById("doc-columns").addEventListener("click", (e) => {
      const b = e.target.closest(".legend button[data-cluster]");
      if (!b) return;
      state.cluster = { mi: +b.closest(".legend").dataset.model, c: +b.dataset.cluster };
      state.showAll = false;
      setTab("clusters");
    });
    buildDocList();
    showDoc(0);
    window.exploreReadyMs = performance.now();
    document.body.dataset.ready = "true";
  }
  init();
})();
