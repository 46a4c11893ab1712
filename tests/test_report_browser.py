"""The report in a real browser: headless Chromium over the DevTools protocol, on a real run.

Counts what the page rendered (clusters, members, keepers, pair rows, errors), opens the pair view,
pages, searches and filters, takes screenshots, and fails on any console error, uncaught
exception, failed load (a missing thumbnail or script) or JavaScript dialog.
"""
from __future__ import annotations

import json
import os
import shutil

import pytest
from PIL import Image

from bench.browser import Browser, find_chromium
from conftest import EVIL_FOLDER
from pipeline.cli import main
from pipeline.results import load_run

pytestmark = pytest.mark.skipif(find_chromium() is None,
                                reason="chromium is not installed: `make browser` installs it (apt)")
pytest.importorskip("websocket", reason="websocket-client is missing: `make install` installs the test extras")

ALL_IMAGES_LOADED = "Array.from(document.images).every(function(i){return i.complete})"


def count(b: Browser, selector: str) -> int:
    return b.evaluate(f"document.querySelectorAll({selector!r}).length")


def set_filter(b: Browser, element_id: str, value: str) -> None:
    b.evaluate(f"(function(){{var e=document.getElementById({json.dumps(element_id)}); e.value={json.dumps(value)};"
               "e.dispatchEvent(new Event('input'));})()")


def eager_images(b: Browser) -> None:
    """Load every image now (they are lazy) so a missing file shows up as a failed load."""
    b.evaluate("document.querySelectorAll('img').forEach(function(i){i.loading='eager'})")
    b.wait_for(ALL_IMAGES_LOADED)


def outputs_copy(review_run, tmp_path):
    """A finished run's Parquet files and run.json in a new folder (for `dedupe report` there)."""
    out = tmp_path / "out"
    out.mkdir()
    for name in ("images.parquet", "pairs.parquet", "run.json"):
        shutil.copy(review_run / name, out / name)
    return out


def test_clusters_pairs_and_evidence_render(review_run, tmp_path):
    run = load_run(review_run)
    members = run.clusters()
    n_clusters = members["cluster_id"].nunique()
    with Browser() as b:
        b.open((review_run / "report" / "index.html").as_uri())
        pairs_per_cluster = b.evaluate("window.DEDUPE_REPORT.clusters.map(function(c){return c[3].length})")
        assert count(b, "#clusters .cluster") == n_clusters
        assert count(b, "#clusters .member") == len(members)
        assert count(b, "#clusters .member.keeper") == n_clusters
        assert count(b, "#clusters .pair-row") == sum(min(8, n) for n in pairs_per_cluster)
        assert count(b, "#clusters .pair-row") > 0
        # the HTML-named folder is shown as text, never as markup
        assert b.evaluate("Array.from(document.querySelectorAll('.path')).some(function(e){"
                          f"return e.textContent.indexOf({json.dumps(EVIL_FOLDER)}) === 0}})")
        assert count(b, "img[src=x]") == 0
        eager_images(b)
        assert b.evaluate("Array.from(document.querySelectorAll('img.thumb')).every(function(i){"
                          "return i.naturalWidth > 0})")
        b.screenshot(tmp_path / "clusters.png")

        # search and filters
        set_filter(b, "q", "p3_rot90")
        assert count(b, "#clusters .cluster") == 1
        set_filter(b, "q", "")
        set_filter(b, "stage", "confirm")
        assert count(b, "#clusters .cluster") == int(run.pairs.loc[run.pairs["is_duplicate"], "stage"]
                                                     .astype(str).eq("confirm").sum()) == 1
        set_filter(b, "stage", "")
        set_filter(b, "min-inl", "300")
        want = members[members["image_id"].isin(
            run.pairs.loc[run.pairs["is_duplicate"] & (run.pairs["orb_inliers"] >= 300), "image_id_a"])]
        assert count(b, "#clusters .cluster") == want["cluster_id"].nunique() >= 1
        set_filter(b, "min-inl", "")

        # pair view: a confirm-stage duplicate pair has every tier's evidence and a drawing (a
        # rejected one with a cosine may come first: the run has embedding-only look-alikes)
        i = b.evaluate("window.DEDUPE_REPORT.pairs.findIndex(function(p){return p[6] !== null && p[11] && p[9]})")
        cosine = b.evaluate(f"window.DEDUPE_REPORT.pairs[{i}][6]")
        b.evaluate(f"location.hash = 'pair={i}'")
        b.wait_for(f"document.querySelector('#pair-view[data-pair=\"{i}\"] img.drawing') && "
                   "document.querySelector('#pair-view img.drawing').naturalWidth > 0")
        rows = b.evaluate("Array.from(document.querySelectorAll('#evidence tr')).map(function(r){"
                          "return [r.cells[0].textContent, r.cells[1].textContent]})")
        evidence = dict(rows)
        assert evidence["confirm: cosine"] == f"{cosine:.3f}"
        assert evidence["stage (last tier)"] == "confirm" and evidence["duplicate"] == "yes"
        assert count(b, "#pair-view img.big") == 2
        eager_images(b)
        b.screenshot(tmp_path / "pair.png")
        # a verify-only pair shows a dash for the cosine
        j = b.evaluate("window.DEDUPE_REPORT.pairs.findIndex(function(p){return p[6] === null && p[4] !== null})")
        b.evaluate(f"location.hash = 'pair={j}'")
        b.wait_for(f"document.querySelector('#pair-view[data-pair=\"{j}\"] #evidence')")
        assert b.evaluate("document.querySelectorAll('#evidence tr')[4].cells[1].textContent") == "\u2014"

        # closest rejected pairs and errors
        b.evaluate("location.hash = 'view=rejected'")
        b.wait_for("document.querySelectorAll('.pair-row').length > 0")
        n_rejected = int((~run.pairs["is_duplicate"]).sum())
        assert count(b, ".pair-row") == min(50, n_rejected)
        assert b.evaluate("document.querySelector('.pair-row td').textContent") == "1"
        b.evaluate("location.hash = 'view=errors'")
        b.wait_for("document.querySelectorAll('.error-row').length > 0")
        assert count(b, ".error-row") == 1
        assert b.errors() == []
    for name in ("clusters.png", "pair.png"):
        with Image.open(tmp_path / name) as im:
            assert im.size == (1280, 900)


def test_every_cluster_is_reachable_page_by_page(review_run, tmp_path):
    out = outputs_copy(review_run, tmp_path)
    assert main(["report", str(out), "--set", "report.page_size=2"]) == 0
    n_clusters = load_run(out).clusters()["cluster_id"].nunique()
    seen = []
    with Browser() as b:
        b.open((out / "report" / "index.html").as_uri())
        while True:
            seen += b.evaluate("Array.from(document.querySelectorAll('#clusters .cluster')).map(function(e){"
                               "return e.id})")
            if b.evaluate("document.querySelector('.pager button:last-child').disabled"):
                break
            b.evaluate("document.querySelector('.pager button:last-child').click()")
            b.wait_for(f"document.querySelectorAll('#clusters .cluster').length && "
                       f"document.querySelector('#clusters .cluster').id !== {seen[-1]!r}")
        eager_images(b)
        assert b.errors() == []
    assert len(seen) == len(set(seen)) == n_clusters > 2


def test_a_capped_report_says_so_and_shows_the_largest_clusters(review_run, tmp_path):
    out = outputs_copy(review_run, tmp_path)
    assert main(["report", str(out), "--set", "report.max_clusters=2"]) == 0
    sizes = load_run(out).clusters().groupby("cluster_id").size().sort_values(ascending=False)
    with Browser() as b:
        b.open((out / "report" / "index.html").as_uri())
        assert count(b, "#clusters .cluster") == 2
        assert count(b, "#clusters .member") == int(sizes.iloc[:2].sum())
        note = b.evaluate("document.getElementById('capped').innerText")
        assert f"the 2 largest of {len(sizes)} clusters" in " ".join(note.split())
        tab = b.evaluate("document.getElementById('tab-clusters').innerText")
        assert " ".join(tab.split()) == f"Clusters (the 2 largest of {len(sizes)})"
        eager_images(b)
        assert b.errors() == []


def test_a_cluster_with_more_pairs_than_it_lists_says_so(review_run, tmp_path):
    """report.pairs_per_cluster=0: each cluster lists the closest link of each member only; its
    heading counts every duplicate pair it has, and a note says how many are listed and that
    pairs.parquet has them all."""
    out = outputs_copy(review_run, tmp_path)
    assert main(["report", str(out), "--set", "report.pairs_per_cluster=0"]) == 0
    run = load_run(out)
    members = run.clusters()
    sizes = members.groupby("cluster_id").size()
    dup = run.pairs[run.pairs["is_duplicate"]]
    cluster_of = members.set_index("image_id")["cluster_id"]
    totals = dup["image_id_a"].map(cluster_of).value_counts()
    assert (totals > sizes.reindex(totals.index) - 1).any()  # some cluster has a pair beyond its tree
    with Browser() as b:
        b.open((out / "report" / "index.html").as_uri())
        rows = b.evaluate("window.DEDUPE_REPORT.clusters.map(function(c){return [c[1].length, c[3].length, c[4]]})")
        assert sorted(rows) == sorted([int(sizes[c]), int(sizes[c]) - 1, int(totals[c])] for c in sizes.index)
        headings = b.evaluate("Array.from(document.querySelectorAll('#clusters .cluster h3'))"
                              ".map(function(h){return h.textContent})")
        assert sorted(int(h.split("\u00b7")[2].split()[0]) for h in headings) == sorted(r[2] for r in rows)
        notes = b.evaluate("Array.from(document.querySelectorAll('#clusters .listed-note'))"
                           ".map(function(n){return n.textContent})")
        assert len(notes) == sum(r[1] < r[2] for r in rows) > 0
        assert all("pairs.parquet" in n for n in notes)
        assert count(b, "#clusters .pair-row") == sum(min(8, r[1]) for r in rows)
        eager_images(b)
        assert b.errors() == []


def test_a_pair_of_files_the_run_could_not_read_shows_no_null(photo_paths, tmp_path):
    """Two byte-identical files that are no images make an exact_bytes cluster with no pixel size:
    the pair view says "?" for it, as the cluster view does (it printed "null×null")."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a.jpg", "b.jpg"):
        (data / name).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" + bytes(100))
    (data / "photo.jpg").write_bytes(photo_paths[0].read_bytes())
    out = tmp_path / "out"
    assert main(["dedupe", str(data), "--out", str(out), "--tiers", "screen", "--scheduler", "sync", "--quiet"]) == 0
    with Browser() as b:
        b.open((out / "report" / "index.html").as_uri())
        i = b.evaluate("window.DEDUPE_REPORT.pairs.findIndex(function(p){return p[8] === 'exact_bytes'})")
        assert i >= 0
        b.evaluate(f"location.hash = 'pair={i}'")
        b.wait_for(f"document.querySelector('#pair-view[data-pair=\"{i}\"] #evidence')")
        text = b.evaluate("document.getElementById('pair-view').textContent")
        assert "null" not in text and "? \u00b7" in text
        assert b.errors() == []


def test_a_big_cluster_reads_closest_links_first_filters_show_their_pairs_and_paths_link_the_originals(
        photo_paths, tmp_path):
    """One photo in 14 sizes and brightnesses, in folders with long names (one with '#', '%' and a
    space): each cluster's rows begin with the links that put its members in it, closest first
    (they were in path order: the closest pair was row ~80 of 100, behind "show all"); a pair
    filter puts the pairs that pass it first, marked; long paths wrap inside the window; a path
    links to its original file; "back" from a pair opened in a fresh tab goes to the list (it did
    nothing); the filters are not restored by the browser without the list they filter."""
    from urllib.parse import unquote

    from PIL import ImageEnhance
    data = tmp_path / "data"
    deep = data / ("Backup_of_the_family_phone_2019_Samsung_Galaxy_S10_" * 2) / "DCIM #1 100%"
    deep.mkdir(parents=True)
    with Image.open(photo_paths[0]) as im:
        base = im.convert("RGB")
    base.thumbnail((960, 960))
    for k in range(14):
        w = 960 - 40 * k
        copy = ImageEnhance.Brightness(base.resize((w, w * base.height // base.width))).enhance(0.9 + 0.015 * k)
        copy.save((deep if k % 2 else data) / f"IMG_20190714_1234{k:02d}_HDR_Camera_Export.jpg", quality=95 - 3 * k)
    out = tmp_path / "out"
    assert main(["dedupe", str(data), "--out", str(out), "--tiers", "verify", "--scheduler", "sync", "--quiet"]) == 0
    run = load_run(out)
    dup = run.pairs[run.pairs["is_duplicate"]]
    assert run.clusters()["cluster_id"].nunique() == 1 and len(dup) > 14
    with Browser() as b:
        b.open((out / "report" / "index.html").as_uri())
        [(members, listed)] = b.evaluate("window.DEDUPE_REPORT.clusters.map(function(c){return [c[1], c[3]]})")
        rows = b.evaluate("window.DEDUPE_REPORT.pairs")
        inliers = [rows[i][4] for i in listed]
        tree = listed[:len(members) - 1]
        # the first len(members) - 1 rows join every member (a spanning tree), the closest pair first,
        # each part closest first
        assert {rows[i][k] for i in tree for k in (0, 1)} == set(members)
        assert inliers[0] == max(inliers)
        assert [rows[i][4] for i in tree] == sorted((rows[i][4] for i in tree), reverse=True)
        rest = listed[len(members) - 1:]
        assert [rows[i][4] for i in rest] == sorted((rows[i][4] for i in rest), reverse=True)
        assert b.evaluate("document.documentElement.scrollWidth <= window.innerWidth")  # (was 1783 px at 1280)
        b.screenshot(tmp_path / "long-paths.png")

        # a filter that one pair far down the list passes: that pair first, marked
        weakest_tree = min(rows[i][4] for i in tree)
        strong = [i for i in rest if rows[i][4] > weakest_tree]
        target = max(inliers) if not strong else rows[strong[0]][4]
        set_filter(b, "min-inl", str(target))
        hits = [i for i in listed if rows[i][4] >= target]
        first = b.evaluate("Array.from(document.querySelectorAll('#clusters .pair-row')).slice(0, %d)"
                           ".map(function(r){return r.classList.contains('hit')})" % (len(hits) + 1))
        assert first[:len(hits)] == [True] * len(hits) and (len(first) == len(hits) or not first[-1])
        set_filter(b, "min-inl", "")
        assert b.evaluate("Array.from(document.querySelectorAll('#controls input, #controls select'))"
                          ".every(function(e){return e.getAttribute('autocomplete') === 'off'})")

        # each shown path links to its original file
        links = b.evaluate("Array.from(document.querySelectorAll('#clusters .member a.path'))"
                           ".map(function(a){return [a.textContent, a.href]})")
        assert len(links) == len(members)
        for text, href in links:
            assert href.startswith("file:///") and "#" not in href[len("file://"):].replace("%23", "")
            assert unquote(href[len("file://"):]) == str(data / text)
        eager_images(b)
        assert b.errors() == []

    with Browser() as fresh:  # a pair opened in a tab of its own: "back" shows the list
        fresh.open((out / "report" / "index.html").as_uri() + f"#pair={listed[0]}")
        fresh.wait_for("document.getElementById('back')")
        # the pair view shows the original files (a local DATA), not the 160 px thumbnails
        fresh.wait_for(ALL_IMAGES_LOADED)
        shown = fresh.evaluate("Array.from(document.querySelectorAll('#pair-view img.big.original'))"
                               ".map(function(i){return [i.naturalWidth, decodeURIComponent(i.src)]})")
        assert len(shown) == 2, shown
        for width, src in shown:
            assert src.startswith("file://" + str(data))
            with Image.open(src[len("file://"):]) as original:
                assert width == original.size[0] > 160
        fresh.screenshot(tmp_path / "pair-originals.png")
        fresh.evaluate("document.getElementById('back').click()")
        fresh.wait_for("document.querySelectorAll('#clusters .cluster').length === 1")
        assert fresh.errors() == []


def test_a_name_holding_backslash_x_links_its_file_and_a_malformed_link_still_opens_the_page(photo_paths, tmp_path):
    """A valid name may hold the text `\\x41`: the page took any such text for the escape of a name
    that is not UTF-8 and gave it no link (and every file none when DATA's own path held it); the
    run now says which names are not UTF-8. A link whose %-escape is cut short threw in the page's
    router and left it at "Loading"."""
    from urllib.parse import unquote
    data = tmp_path / "data \\x41"
    data.mkdir()
    first, second = photo_paths[0].read_bytes(), photo_paths[1].read_bytes()
    for name, content in (("lit\\x41.jpg", first), ("plain.jpg", first), ("other.jpg", second)):
        (data / name).write_bytes(content)
    with open(os.path.join(os.fsencode(data), b"bad-\xff.jpg"), "wb") as fh:  # (not UTF-8)
        fh.write(second)
    out = tmp_path / "out"
    assert main(["dedupe", str(data), "--out", str(out), "--tiers", "screen", "--scheduler", "sync", "--quiet"]) == 0
    with Browser() as b:
        b.open((out / "report" / "index.html").as_uri())
        b.wait_for("document.querySelectorAll('#clusters .cluster').length === 2")
        links = b.evaluate("Array.from(document.querySelectorAll('#clusters .member .path'))"
                           ".map(function(e){return [e.textContent, e.tagName, e.href || null]})")
        by_text = {text: (tag, href) for text, tag, href in links}
        assert set(by_text) == {"lit\\x41.jpg", "plain.jpg", "other.jpg", "bad-\\xff.jpg"}, links
        assert by_text["bad-\\xff.jpg"] == ("SPAN", None)  # (its text names no file)
        for text in ("lit\\x41.jpg", "plain.jpg", "other.jpg"):
            tag, href = by_text[text]
            assert tag == "A" and unquote(href[len("file://"):]) == str(data / text)
        assert b.errors() == []
        # empty lists say so (a bare table header before), and the rejected tab gives its count
        assert b.evaluate("document.getElementById('tab-rejected').textContent.replace(/\\s+/g, ' ')") \
            == "Closest rejected pairs (0)"
        for view, text in (("rejected", "No pair was rejected."), ("errors", "Every file was read.")):
            b.evaluate(f"location.hash = 'view={view}'")
            b.wait_for(f"document.getElementById('app').textContent.indexOf({text!r}) >= 0")
        assert b.errors() == []
    for hash_ in ("#view=%E0%A4%A", "#pair=", "#pair=%zz"):
        with Browser() as b:
            b.open((out / "report" / "index.html").as_uri() + hash_)
            b.wait_for("document.querySelectorAll('#clusters .cluster').length === 2")
            assert b.errors() == [], hash_
