"""The blind rating page's template: one self-contained HTML file (no network, no external file).

Items are rendered server-side as hidden <div class="item">s in a shuffled order with opaque ids;
the script shows one at a time, keeps the ratings in the browser's localStorage under the kit id
(so a reload or a closed tab loses nothing) and builds the CSV download from them. Nothing on the
page says which SAE, kind or layer an item came from: that key stays in the run folder.
"""

from __future__ import annotations

import html
import json

RATINGS = ("interpretable", "not", "unsure")

CSS = """
body{font-family:system-ui,sans-serif;max-width:980px;margin:1.5em auto;padding:0 1em;color:#222;line-height:1.45}
.bar{display:flex;gap:.5em;align-items:center;flex-wrap:wrap;margin:.6em 0}
button{font-size:1em;padding:.35em .9em;border:1px solid #888;border-radius:4px;background:#f6f6f6;cursor:pointer}
button.chosen{background:#1f77b4;color:#fff;border-color:#1f77b4}
.small{color:#666;font-size:.85em} mark{background:#ffd54f;font-weight:bold}
.ctx{font-family:ui-monospace,monospace;white-space:pre-wrap;font-size:.85em}
.act{display:inline-block;min-width:3.5em;font-family:ui-monospace,monospace}
ul.examples{list-style:none;padding-left:.5em} svg.hist{display:block;border-bottom:1px solid #999}
.item{border:1px solid #ddd;border-radius:6px;padding:.6em 1em}
"""

SCRIPT = """
(function(){
  const KIT = document.body.dataset.kit;
  const STORE = "ghsae-ratings-" + KIT;
  const items = Array.from(document.querySelectorAll(".item"));
  let ratings = {};
  try { ratings = JSON.parse(localStorage.getItem(STORE) || "{}"); } catch (e) { ratings = {}; }
  let at = items.findIndex(el => !(el.dataset.id in ratings));
  if (at < 0) at = 0;
  function save(){ try { localStorage.setItem(STORE, JSON.stringify(ratings)); } catch (e) {} }
  function show(j){
    at = Math.max(0, Math.min(items.length - 1, j));
    items.forEach((el, k) => { el.hidden = k !== at; });
    const r = ratings[items[at].dataset.id];
    document.querySelectorAll("button.rate").forEach(b => b.classList.toggle("chosen", !!r && b.dataset.rating === r.rating));
    document.getElementById("progress").textContent =
      "item " + (at + 1) + " of " + items.length + " \\u00b7 " + Object.keys(ratings).length + " rated";
  }
  function rate(value){
    ratings[items[at].dataset.id] = {rating: value, at: new Date().toISOString()};
    save();
    show(at + 1 < items.length ? at + 1 : at);
  }
  function csv(){
    const lines = ["kit,item,rating,rated_at"];
    items.forEach(el => { const r = ratings[el.dataset.id]; if (r) lines.push([KIT, el.dataset.id, r.rating, r.at].join(",")); });
    return lines.join("\\n") + "\\n";
  }
  document.querySelectorAll("button.rate").forEach(b => b.addEventListener("click", () => rate(b.dataset.rating)));
  document.getElementById("prev").addEventListener("click", () => show(at - 1));
  document.getElementById("next").addEventListener("click", () => show(at + 1));
  document.getElementById("download").addEventListener("click", () => {
    const a = document.createElement("a");
    a.href = URL.createObjectURL(new Blob([csv()], {type: "text/csv"}));
    a.download = "ratings-" + KIT + ".csv";
    document.body.appendChild(a); a.click(); a.remove();
  });
  document.addEventListener("keydown", e => {
    const keys = {"1": "interpretable", "2": "not", "3": "unsure"};
    if (keys[e.key]) rate(keys[e.key]);
    else if (e.key === "ArrowLeft") show(at - 1);
    else if (e.key === "ArrowRight") show(at + 1);
  });
  show(at);
})();
"""


def render(kit: str, items: list[tuple[str, str]], intro: str) -> str:
    """The page for items [(opaque id, dashboard HTML)], already shuffled."""
    blocks = "".join(
        f'<div class="item" data-id="{html.escape(i)}" hidden><p class="small">item {html.escape(i)}</p>{body}</div>'
        for i, body in items
    )
    buttons = "".join(
        f'<button class="rate" id="rate-{r}" data-rating="{r}">{label} <span class="small">({n})</span></button>'
        for n, (r, label) in enumerate(zip(RATINGS, ("interpretable", "not interpretable", "unsure")), 1)
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>ghsae blind latent rating</title>"
        f"<style>{CSS}</style></head><body data-kit={json.dumps(kit)}>"
        f"<h1>Blind latent rating</h1><p>{intro}</p>"
        f'<div class="bar">{buttons}</div>'
        '<div class="bar"><button id="prev">◀ previous</button><button id="next">next ▶</button>'
        '<span id="progress" class="small"></span><button id="download">download ratings (CSV)</button></div>'
        f"{blocks}<script>{SCRIPT}</script></body></html>"
    )
