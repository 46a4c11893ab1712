// Duplicate report: renders window.DEDUPE_REPORT (data.js) one page at a time.
// Plain DOM; every value from the data goes through textContent or an attribute, never innerHTML.
(function () {
  "use strict";
  var D = window.DEDUPE_REPORT;
  // row layouts (pipeline/report.py build_data)
  var I = {id: 0, path: 1, bytes: 2, w: 3, h: 4, format: 5, mtime: 6, error: 7, thumb: 8, named: 9};
  var P = {a: 0, b: 1, dist: 2, matches: 3, inliers: 4, score: 5, cos: 6, stage: 7, rule: 8, dup: 9,
           reason: 10, drawing: 11, by: 12};
  var C = {id: 0, members: 1, keeper: 2, pairs: 3, total: 4};
  var app = document.getElementById("app");
  var state = {view: "clusters", page: 0, pair: null, moves: 0};
  var lowerPaths = D.images.map(function (im) { return im[I.path].toLowerCase(); });

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    if (attrs) Object.keys(attrs).forEach(function (k) {
      if (k === "text") node.textContent = attrs[k];
      else if (k === "cls") node.className = attrs[k];
      else node.setAttribute(k, attrs[k]);
    });
    (children || []).forEach(function (c) {
      if (c !== null && c !== undefined) node.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    });
    return node;
  }
  var DASH = "\u2014";
  function fmtCos(x) { return x === null ? DASH : x.toFixed(3); }
  function fmtNum(x) { return x === null ? DASH : String(x); }
  function fmtScore(x) { return x === null ? DASH : x.toFixed(3); }
  function fmtBytes(n) {
    if (n === null) return DASH;
    var units = ["B", "KB", "MB", "GB"], i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : String(n)) + " " + units[i];
  }
  function thumb(imgIdx, cls) {
    var im = D.images[imgIdx];
    if (!im[I.thumb]) return el("div", {cls: "nothumb " + (cls || ""), text: "no preview"});
    return el("img", {cls: cls || "thumb", src: "thumbs/" + im[I.id] + ".jpg", alt: im[I.path], loading: "lazy"});
  }

  // ---- filters -------------------------------------------------------------------------------
  function readFilters() {
    function num(id) { var v = document.getElementById(id).value; return v === "" ? null : Number(v); }
    return {q: document.getElementById("q").value.trim().toLowerCase(),
            stage: document.getElementById("stage").value, rule: document.getElementById("rule").value,
            minCos: num("min-cos"), minInl: num("min-inl"), maxDist: num("max-dist")};
  }
  function pairFilterActive(f) {
    return f.stage || f.rule || f.minCos !== null || f.minInl !== null || f.maxDist !== null;
  }
  function pairPasses(p, f) {
    if (f.stage && p[P.stage] !== f.stage) return false;
    if (f.rule && p[P.rule] !== f.rule) return false;
    if (f.minCos !== null && (p[P.cos] === null || p[P.cos] < f.minCos)) return false;
    if (f.minInl !== null && (p[P.inliers] === null || p[P.inliers] < f.minInl)) return false;
    if (f.maxDist !== null && (p[P.dist] === null || p[P.dist] > f.maxDist)) return false;
    return true;
  }
  function pathMatches(imgIdx, f) { return !f.q || lowerPaths[imgIdx].indexOf(f.q) >= 0; }
  function clusterPasses(c, f) {
    if (f.q && !c[C.members].some(function (m) { return pathMatches(m, f); })) return false;
    if (pairFilterActive(f) && !c[C.pairs].some(function (i) { return pairPasses(D.pairs[i], f); })) return false;
    return true;
  }

  // ---- pieces --------------------------------------------------------------------------------
  function pager(total, size, onPage) {
    var pages = Math.max(1, Math.ceil(total / size));
    var page = Math.min(state.page, pages - 1);
    var prev = el("button", {type: "button", text: "\u2190 previous"});
    var next = el("button", {type: "button", text: "next \u2192"});
    prev.disabled = page === 0; next.disabled = page >= pages - 1;
    prev.addEventListener("click", function () { onPage(page - 1); });
    next.addEventListener("click", function () { onPage(page + 1); });
    return {page: page, node: el("div", {cls: "pager"}, [prev, "page " + (page + 1) + " of " + pages +
      " (" + total + " in all)", next])};
  }
  function imageDetails(im) {  // size, pixels, format, mtime ("?" for what the run could not read)
    return fmtBytes(im[I.bytes]) + " \u00b7 " + (im[I.w] === null ? "?" : im[I.w] + "\u00d7" + im[I.h]) +
      " \u00b7 " + (im[I.format] || "?") + " \u00b7 " + (im[I.mtime] || "?");
  }
  // the original file: file:// + DATA + its path, or the object's URL on a store (which a browser
  // may not open); none for a name that is not UTF-8 (its text form, with \xNN escapes, is not
  // the file's name: told by the run, as a valid name may hold such text)
  function originalHref(im) {
    var root = D.meta.root, path = im[I.path];
    if (!root || !D.meta.root_named || !im[I.named]) return null;
    function enc(t) { return t.split("/").map(encodeURIComponent).join("/"); }
    var url = /^([a-zA-Z][a-zA-Z0-9+.-]*:\/\/)(.*)$/.exec(root);
    var base = root.charAt(0) === "/" ? "file://" + enc(root) : url ? url[1] + enc(url[2]) : null;
    return base === null ? null : base.replace(/\/+$/, "") + "/" + enc(path);
  }
  function pathLink(im) {
    var href = originalHref(im);
    return href ? el("a", {cls: "path", href: href, target: "_blank", rel: "noopener", title: "open the original",
                            text: im[I.path]})
                : el("span", {cls: "path", text: im[I.path]});
  }
  // the pair view's pictures: the original files themselves when the report is read where they
  // are (a local DATA: their size and detail, to choose a keeper), else, or when the browser
  // cannot show one (HEIC, TIFF, a moved folder), the thumbnail
  function bigPicture(imgIdx) {
    var im = D.images[imgIdx], img = thumb(imgIdx, "big"), href = originalHref(im);
    if (img.tagName !== "IMG" || !href || href.indexOf("file:") !== 0) return img;
    img.className = "big original";
    img.onerror = function () { img.onerror = null; img.className = "big"; img.src = "thumbs/" + im[I.id] + ".jpg"; };
    img.src = href;
    return img;
  }
  function memberFigure(imgIdx, isKeeper) {
    var im = D.images[imgIdx];
    var details = imageDetails(im);
    return el("figure", {cls: "member" + (isKeeper ? " keeper" : "")}, [
      thumb(imgIdx), el("figcaption", null, [
        isKeeper ? el("span", {cls: "badge", text: "keep"}) : null, isKeeper ? " " : null,
        pathLink(im), el("br"), el("span", {cls: "muted", text: details})])]);
  }
  function pairRow(i, rank) {
    var p = D.pairs[i], a = D.images[p[P.a]], b = D.images[p[P.b]];
    var verdict = p[P.dup] ? el("span", {cls: "badge", text: "duplicate"}) : el("span", {cls: "badge reject", text: "different"});
    return el("tr", {cls: "pair-row"}, [
      rank === undefined ? null : el("td", {cls: "num", text: String(rank)}),
      el("td", null, [thumb(p[P.a], "mini"), el("br"), el("span", {text: a[I.path]})]),
      el("td", null, [thumb(p[P.b], "mini"), el("br"), el("span", {text: b[I.path]})]),
      el("td", {cls: "num", text: fmtNum(p[P.dist])}),
      el("td", {cls: "num", text: p[P.matches] === null ? DASH : p[P.inliers] + " / " + p[P.matches]}),
      el("td", {cls: "num", text: fmtCos(p[P.cos])}),
      el("td", null, [verdict, el("br"), el("code", {text: p[P.rule]}), el("br"), el("span", {cls: "muted", text: p[P.stage]})]),
      el("td", null, [el("a", {href: "#pair=" + i, text: p[P.drawing] ? "view matches" : "view"})])]);
  }
  function pairTable(rows, ranked) {
    var head = ["image a", "image b", "hash distance", "ORB inliers / matches", "cosine", "decision", ""];
    if (ranked) head.unshift("rank");
    return el("table", {cls: "pairs"}, [el("tr", null, head.map(function (h) { return el("th", {text: h}); }))].concat(rows));
  }
  function clusterBlock(ci, f) {
    var c = D.clusters[ci];
    var box = el("div", {cls: "cluster", id: "cluster-" + c[C.id]}, [
      el("h3", {text: "Cluster " + (ci + 1) + " \u00b7 " + c[C.members].length + " images \u00b7 " +
        c[C.total] + " duplicate pairs"}),
      el("div", {cls: "members"}, c[C.members].map(function (m) { return memberFigure(m, m === c[C.keeper]); }))]);
    if (c[C.pairs].length < c[C.total]) {  // report.pairs_per_cluster: every pair is in pairs.parquet
      var tree = c[C.pairs].length === c[C.members].length - 1;
      box.appendChild(el("p", {cls: "muted listed-note", text: c[C.pairs].length + " of them listed: the closest " +
        "link of each image" + (tree ? "" : " and the closest others") + " (all " + c[C.total] +
        " are in pairs.parquet)."}));
    }
    // with a pair filter on, the pairs that pass it come first, marked: the cluster is listed
    // because of them, and they may be far down its list
    var order = c[C.pairs];
    if (f && pairFilterActive(f)) {
      var hit = order.filter(function (i) { return pairPasses(D.pairs[i], f); });
      order = hit.concat(order.filter(function (i) { return !pairPasses(D.pairs[i], f); }));
    }
    function row(i) {
      var tr = pairRow(i);
      if (f && pairFilterActive(f) && pairPasses(D.pairs[i], f)) tr.className += " hit";
      return tr;
    }
    var limit = 8;
    var table = pairTable(order.slice(0, limit).map(row));
    box.appendChild(table);
    if (order.length > limit) {
      var more = el("button", {type: "button", text: "show all " + order.length +
        (order.length < c[C.total] ? " listed pairs" : " pairs")});
      more.addEventListener("click", function () {
        order.slice(limit).forEach(function (i) { table.appendChild(row(i)); });
        more.remove();
      });
      box.appendChild(more);
    }
    return box;
  }

  // ---- views ---------------------------------------------------------------------------------
  function viewClusters(f) {
    var hits = [];
    for (var i = 0; i < D.clusters.length; i++) if (clusterPasses(D.clusters[i], f)) hits.push(i);
    var size = D.meta.page_size;
    var pg = pager(hits.length, size, go);
    app.appendChild(pg.node);
    var list = el("div", {id: "clusters"});
    hits.slice(pg.page * size, (pg.page + 1) * size).forEach(function (ci) { list.appendChild(clusterBlock(ci, f)); });
    if (!hits.length) list.appendChild(el("p", {text: D.clusters.length ? "No cluster matches the filters." : "No duplicates found."}));
    app.appendChild(list);
    app.appendChild(pager(hits.length, size, go).node);
  }
  function viewRejected(f) {
    var hits = D.rejected.map(function (i, r) { return [i, r + 1]; }).filter(function (x) {
      var p = D.pairs[x[0]];
      return pairPasses(p, f) && (!f.q || pathMatches(p[P.a], f) || pathMatches(p[P.b], f));
    });
    app.appendChild(el("p", {cls: "muted", text: "The " + D.rejected.length + " closest of " + D.meta.rejected_total +
      " rejected pairs, closest first (ranked by cosine, then ORB inliers, then hash distance: see below)."}));
    var size = 50, pg = pager(hits.length, size, go);
    app.appendChild(pg.node);
    app.appendChild(pairTable(hits.slice(pg.page * size, (pg.page + 1) * size).map(function (x) {
      return pairRow(x[0], x[1]); }), true));
    if (!hits.length) app.appendChild(el("p", {text: D.rejected.length ? "No rejected pair matches the filters."
                                                                       : "No pair was rejected."}));
  }
  function viewErrors(f) {
    var hits = D.errors.filter(function (i) { return pathMatches(i, f); });
    var size = 200, pg = pager(hits.length, size, go);
    app.appendChild(pg.node);
    app.appendChild(el("table", {id: "errors"}, [el("tr", null, [el("th", {text: "path"}), el("th", {text: "error"})])]
      .concat(hits.slice(pg.page * size, (pg.page + 1) * size).map(function (i) {
        return el("tr", {cls: "error-row"}, [el("td", {text: D.images[i][I.path]}), el("td", {text: D.images[i][I.error]})]);
      }))));
    if (!hits.length) app.appendChild(el("p", {text: D.errors.length ? "No file with an error matches the search."
                                                                     : "Every file was read."}));
  }
  function viewPair(i) {
    var p = D.pairs[i];
    if (!p) { app.appendChild(el("p", {text: "No such pair."})); return; }
    var a = D.images[p[P.a]], b = D.images[p[P.b]];
    var box = el("div", {id: "pair-view", "data-pair": String(i)}, [
      el("p", null, [el("a", {href: "#", id: "back", text: "\u2190 back"})]),
      el("h2", {text: p[P.dup] ? "Duplicate pair" : "Rejected pair"})]);
    var sides = el("div", {cls: "side"}, [p[P.a], p[P.b]].map(function (k) {
        var im = D.images[k];
        return el("figure", null, [bigPicture(k), el("figcaption", null, [pathLink(im), el("br"),
          el("span", {cls: "muted", text: imageDetails(im)})])]);
      }));
    if (p[P.drawing]) {
      box.appendChild(el("img", {cls: "drawing", src: "pairs/" + p[P.drawing], alt: "ORB matches between the two images"}));
      box.appendChild(el("p", {cls: "muted"}, ["ORB matches recomputed for this report: ",
        el("span", {cls: "inlier", text: "green = inliers"}), ", ", el("span", {cls: "outlier", text: "red = outliers"}), "."]));
    } else if (p[P.inliers] !== null) {
      box.appendChild(el("p", {cls: "muted", text: p[P.dup] ?
        "Matches are drawn for one pair of each of the first clusters only (report.draw_pairs), and only when " +
          "they can be drawn as the run found them." :
        "Matches are drawn for the closest rejected pairs only (report.draw_rejected), and only when they can " +
          "be drawn as the run found them."}));
    }
    var rows = [
      ["screen: hash distance", fmtNum(p[P.dist])],
      ["verify: ORB matches", fmtNum(p[P.matches])],
      ["verify: ORB inliers", fmtNum(p[P.inliers])],
      ["verify: ORB score", fmtScore(p[P.score])],
      ["confirm: cosine", fmtCos(p[P.cos])],
      ["stage (last tier)", p[P.stage]],
      ["rule", p[P.rule] + (D.rules[p[P.rule]] ? " \u2014 " + D.rules[p[P.rule]] : "")],
      ["duplicate", p[P.dup] ? "yes" : "no"],
      ["reason", p[P.reason] || DASH]];
    if (!p[P.dup]) rows.push(["closeness ranked by", p[P.by]]);
    box.appendChild(el("table", {id: "evidence"}, rows.map(function (r) {
      return el("tr", null, [el("th", {text: r[0]}), el("td", {text: r[1]})]); })));
    box.appendChild(sides);
    app.appendChild(box);
    document.getElementById("back").addEventListener("click", function (e) {
      e.preventDefault();
      // back in the report's own history; a pair opened in a new tab or from a link has none
      // (history.back() did nothing there, or left the report): its list instead
      if (state.moves > 0) history.back(); else location.hash = "view=" + state.view;
    });
  }

  // ---- routing -------------------------------------------------------------------------------
  function parseHash() {
    var out = {};
    location.hash.replace(/^#/, "").split("&").forEach(function (kv) {
      if (!kv) return;
      var at = kv.indexOf("=");
      try {  // (a malformed %-escape, e.g. a link cut short, threw and left the page at "Loading")
        out[decodeURIComponent(at < 0 ? kv : kv.slice(0, at))] = at < 0 ? "" : decodeURIComponent(kv.slice(at + 1));
      } catch (e) { /* the part is left out */ }
    });
    return out;
  }
  function go(page) { location.hash = "view=" + state.view + "&page=" + (page + 1); }
  function render() {
    var h = parseHash();
    state.pair = h.pair !== undefined && h.pair !== "" && isFinite(Number(h.pair)) ? Number(h.pair) : null;
    state.view = h.view || (state.pair !== null ? state.view : "clusters");
    state.page = Math.max(0, (Number(h.page) || 1) - 1);
    app.textContent = "";
    ["clusters", "rejected", "errors"].forEach(function (v) {
      document.getElementById("tab-" + v).className = v === state.view && state.pair === null ? "active" : "";
    });
    document.getElementById("controls").style.display = state.pair === null ? "" : "none";
    var f = readFilters();
    if (state.pair !== null) viewPair(state.pair);
    else if (state.view === "rejected") viewRejected(f);
    else if (state.view === "errors") viewErrors(f);
    else viewClusters(f);
    window.scrollTo(0, 0);
  }
  ["q", "stage", "rule", "min-cos", "min-inl", "max-dist"].forEach(function (id) {
    document.getElementById(id).addEventListener("input", function () {
      if (state.page !== 0) go(0); else render();
    });
  });
  window.addEventListener("hashchange", function () { state.moves += 1; render(); });
  // (a page the browser brings back from its cache keeps its old DOM: drawn again from the filters)
  window.addEventListener("pageshow", function (e) { if (e.persisted) render(); });
  render();
  window.DEDUPE_READY_MS = performance.now();  // navigation start -> first page rendered
  document.body.setAttribute("data-ready", "1");  // for tests
})();
